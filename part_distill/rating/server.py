"""The local purity-rating web app (paper Sec 5.2): one collage at a time, buttons 3..9, SQLite store.

stdlib only (``http.server.ThreadingHTTPServer``). Routes::

    GET  /                          start page (asks the rater's name once; kept in a cookie)
    GET  /start?rater=NAME          sets the cookie, redirects to /rate
    GET  /rate?rater=NAME           next collage this rater has not rated (or "all done")
    GET  /rate?rater=N&method=M&collage=C   a given collage (to change a rating)
    POST /rate   rater, method, collage, rating (form)   upsert, then redirect to the next one
    GET  /image/METHOD/COLLAGE      the collage PNG

Files are only ever served by looking the (method, collage id) pair up in the methods' index.json,
never by joining a request string onto a path, so no parameter can reach outside a collage dir.
Bad input gets a 4xx with a message: malformed names or ratings 400, unknown method/collage 404.
Every socket read and write has a timeout (``make_server(..., timeout=)``): a client that stalls
mid-request (say, a POST that never sends its body) gets 408 or is dropped, instead of holding
its server thread forever.
"""
import dataclasses
import html
import http.cookies
import json
import logging
import os
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from .db import MAX_RATING, MIN_RATING, RatingDB, next_unrated, parse_rating, validate_name, validate_rater

__all__ = ["Method", "load_method", "rating_queue", "RatingApp", "make_server"]

logger = logging.getLogger(__name__)
_MAX_BODY = 4096
# Seconds a connection may stall on a read or write (a rater's browser sends each request at once).
REQUEST_TIMEOUT_S = 30.0
COOKIE = "part_distill_rater"


class BadRequest(Exception):
    """A client error: ``status`` (400/404/...) and a message for the response body."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass
class Method:
    name: str
    root: str                 # real path of the collage dir
    collages: dict            # id -> index.json entry
    files: dict               # id -> real path of the PNG (checked to lie inside root)


def load_method(directory, name=None):
    """Read ``directory/index.json`` (part_distill/visualization/collages.py); check every file.

    The method name is ``name``, else the index's ``method``, else the directory's base name.
    """
    root = os.path.realpath(directory)
    index_path = os.path.join(root, "index.json")
    if not os.path.isfile(index_path):
        raise FileNotFoundError(f"collage dir {directory!r} has no index.json; make it with tools/make_collages.py")
    with open(index_path) as f:
        index = json.load(f)
    if index.get("format") != "part_distill.collages":
        raise ValueError(f"{index_path}: not a collage index (format={index.get('format')!r})")
    name = validate_name(name or index.get("method") or os.path.basename(root), "method")
    files = {}
    for cid, entry in index["collages"].items():
        validate_name(cid, f"collage id in {index_path}")
        path = os.path.realpath(os.path.join(root, entry["file"]))
        if os.path.dirname(path) != root or not os.path.isfile(path):
            raise ValueError(f"{index_path}: collage {cid!r} file {entry['file']!r} is missing or outside {root}")
        files[cid] = path
    return Method(name, root, dict(index["collages"]), files)


def rating_queue(methods, seed=0, shuffle=True):
    """The order collages are shown in: all (method, collage) pairs, seeded-shuffled so methods are
    interleaved and a rater cannot tell which method a collage comes from (or sorted, if not)."""
    items = [(m.name, cid) for m in methods for cid in sorted(m.collages)]
    if shuffle:
        order = np.random.default_rng(seed).permutation(len(items))
        items = [items[i] for i in order]
    return items


class RatingApp:
    """State shared by the request threads: the methods, the queue and the database path."""

    def __init__(self, methods, db_path, seed=0, shuffle=True):
        names = [m.name for m in methods]
        if not methods or len(set(names)) != len(names):
            raise ValueError(f"need at least one method, with distinct names; got {names}")
        self.methods = {m.name: m for m in methods}
        self.queue = rating_queue(methods, seed, shuffle)
        self.position = {item: i for i, item in enumerate(self.queue)}
        self.db = RatingDB(db_path)

    def lookup(self, method, collage):
        """(Method, entry) of a valid, known pair; ``BadRequest`` 400 if malformed, 404 if unknown."""
        for value, what in ((method, "method"), (collage, "collage id")):
            try:
                validate_name(value, what)
            except ValueError as e:
                raise BadRequest(HTTPStatus.BAD_REQUEST, str(e)) from None
        m = self.methods.get(method)
        if m is None:
            raise BadRequest(HTTPStatus.NOT_FOUND, f"unknown method {method!r}")
        if collage not in m.collages:
            raise BadRequest(HTTPStatus.NOT_FOUND, f"unknown collage id {collage!r} for method {method!r}")
        return m, m.collages[collage]


_STYLE = ("body{font-family:sans-serif;background:#202020;color:#ddd;margin:20px}"
          "button{font-size:22px;width:52px;height:46px;margin:3px;cursor:pointer}"
          "button.cur{outline:3px solid #e33}img{max-width:96vw;max-height:70vh;border:1px solid #555}"
          "a{color:#8cf}.hint{color:#aaa;font-size:14px;max-width:720px}")


def _page(title, body):
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>{body}</body></html>").encode("utf-8")


def _single(params, key, required=True):
    values = params.get(key, [])
    if len(values) > 1:
        raise BadRequest(HTTPStatus.BAD_REQUEST, f"parameter {key!r} given {len(values)} times")
    if not values:
        if required:
            raise BadRequest(HTTPStatus.BAD_REQUEST, f"missing parameter {key!r}")
        return None
    return values[0]


def _parse_qs(qs):
    try:
        return urllib.parse.parse_qs(qs, keep_blank_values=True, strict_parsing=False,
                                     max_num_fields=16, errors="strict")
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(HTTPStatus.BAD_REQUEST, f"malformed parameters: {e}") from None


def _rater(value):
    try:
        return validate_rater(value)
    except ValueError as e:
        raise BadRequest(HTTPStatus.BAD_REQUEST, str(e)) from None


def make_handler(app, timeout=REQUEST_TIMEOUT_S):
    request_timeout = timeout

    class Handler(BaseHTTPRequestHandler):
        server_version = "part_distill-rating/1"
        # StreamRequestHandler applies it to the socket: a stalled request line or header is dropped by
        # BaseHTTPRequestHandler ("Request timed out"), a stalled body gets 408 in _rate_post.
        timeout = request_timeout

        def log_message(self, fmt, *args):
            logger.info("%s %s", self.address_string(), fmt % args)

        # ---- responses
        def _send(self, status, body, content_type="text/html; charset=utf-8", headers=()):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            for k, v in headers:
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _redirect(self, location, headers=()):
            self._send(HTTPStatus.SEE_OTHER, b"", headers=(("Location", location),) + tuple(headers))

        def _error(self, err):
            body = _page(f"{int(err.status)} error", f"<h2>{int(err.status)} {err.status.phrase}</h2>"
                         f"<p id='error'>{html.escape(str(err))}</p><p><a href='/'>start page</a></p>")
            self._send(err.status, body)

        def _cookie_rater(self):
            jar = http.cookies.SimpleCookie()
            try:
                jar.load(self.headers.get("Cookie", ""))
            except http.cookies.CookieError:
                return None
            value = jar[COOKIE].value if COOKIE in jar else None
            try:
                return validate_rater(value) if value else None
            except ValueError:
                return None

        # ---- dispatch
        def do_GET(self):
            self._dispatch({"/": self._start_page, "/start": self._start, "/rate": self._rate_page})

        def do_HEAD(self):
            self.do_GET()

        def do_POST(self):
            self._dispatch({"/rate": self._rate_post})

        def _dispatch(self, routes):
            try:
                url = urllib.parse.urlsplit(self.path)
                if self.command in ("GET", "HEAD") and url.path.startswith("/image/"):
                    return self._image(url.path[len("/image/"):])
                handler = routes.get(url.path)
                if handler is None:
                    raise BadRequest(HTTPStatus.NOT_FOUND, f"no page {url.path!r}")
                handler(_parse_qs(url.query))
            except BadRequest as e:
                self._error(e)
            except UnicodeDecodeError as e:
                self._error(BadRequest(HTTPStatus.BAD_REQUEST, f"request is not valid UTF-8: {e}"))
            except Exception as e:  # noqa: BLE001 - a broken request must not kill the rater's session
                logger.exception("rating app: internal error on %s %s", self.command, self.path)
                self._error(BadRequest(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {type(e).__name__}"))

        # ---- pages
        def _start_page(self, params):
            rater = self._cookie_rater()
            if rater:
                return self._redirect("/rate?" + urllib.parse.urlencode({"rater": rater}))
            self._send(HTTPStatus.OK, _page("Part purity rating", (
                "<h2>Part purity rating</h2><form action='/start' method='get'>"
                "<label>Your name: <input id='rater' name='rater' required pattern='[A-Za-z0-9][A-Za-z0-9_.\\-]{0,63}'>"
                "</label> <button id='go' type='submit' style='width:auto'>Start</button></form>"
                f"<p class='hint'>{len(app.queue)} collages to rate.</p>")))

        def _start(self, params):
            rater = _rater(_single(params, "rater"))
            cookie = f"{COOKIE}={rater}; Path=/; SameSite=Strict; Max-Age=31536000"
            self._redirect("/rate?" + urllib.parse.urlencode({"rater": rater}), (("Set-Cookie", cookie),))

        def _rate_page(self, params):
            raw = _single(params, "rater", required=False)
            rater = _rater(raw) if raw is not None else self._cookie_rater()
            if rater is None:
                return self._redirect("/")
            method, collage = _single(params, "method", False), _single(params, "collage", False)
            rated = app.db.rated(rater)
            if method is None and collage is None:
                item = next_unrated(app.queue, rated)
                if item is None:
                    return self._send(HTTPStatus.OK, _page("Done", (
                        f"<h2 id='done'>All {len(app.queue)} collages rated - thank you, {html.escape(rater)}.</h2>"
                        "<p class='hint'>Ratings are saved. You can close this page.</p>")))
                method, collage = item
            elif method is None or collage is None:
                raise BadRequest(HTTPStatus.BAD_REQUEST, "give both 'method' and 'collage', or neither")
            _, entry = app.lookup(method, collage)
            current = app.db.rating_of(rater, method, collage)
            n_rated = len(rated & app.position.keys())
            buttons = "".join(
                f"<button type='submit' name='rating' value='{r}' id='rate-{r}'"
                f"{' class=cur' if r == current else ''}>{r}</button>"
                for r in range(MIN_RATING, MAX_RATING + 1))
            img = "/image/" + urllib.parse.quote(method) + "/" + urllib.parse.quote(collage)
            body = (
                f"<div>rater <b id='rater-name'>{html.escape(rater)}</b> &middot; rated "
                f"<span id='progress' data-n='{n_rated}'>{n_rated}</span> / {len(app.queue)}</div>"
                f"<h3>object: <span id='class-name'>{html.escape(entry['class_name'])}</span></h3>"
                f"<img id='collage' data-collage='{html.escape(collage)}' src='{html.escape(img)}' alt='collage'>"
                "<form method='post' action='/rate'>"
                f"<input type='hidden' name='rater' value='{html.escape(rater)}'>"
                f"<input type='hidden' name='method' value='{html.escape(method)}'>"
                f"<input type='hidden' name='collage' value='{html.escape(collage)}'>"
                f"<div>{buttons}</div></form>"
                "<p class='hint'>Purity: the largest number of tiles (3-9) in which the red part is the same "
                "part of the object. 3 also means 3 or fewer. Keys 3-9 work too.</p>"
                "<script>document.addEventListener('keydown',function(e){var b=document.getElementById("
                "'rate-'+e.key);if(b){b.click();}});</script>")
            self._send(HTTPStatus.OK, _page("Rate part purity", body))

        def _rate_post(self, params):
            if params:
                raise BadRequest(HTTPStatus.BAD_REQUEST, "POST /rate takes its fields in the body, not the URL")
            ctype = self.headers.get("Content-Type", "").split(";")[0].strip()
            if ctype != "application/x-www-form-urlencoded":
                raise BadRequest(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                                 f"expected a form (application/x-www-form-urlencoded), got {ctype!r}")
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                raise BadRequest(HTTPStatus.LENGTH_REQUIRED, "Content-Length header missing or not a number") from None
            if not 0 <= length <= _MAX_BODY:
                raise BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"form larger than {_MAX_BODY} bytes")
            try:
                body = self.rfile.read(length)
            except TimeoutError:
                self.close_connection = True  # the rest of the body may still arrive: never parse it
                raise BadRequest(HTTPStatus.REQUEST_TIMEOUT,
                                 f"the form body did not arrive within {self.timeout:g} s") from None
            try:
                form = _parse_qs(body.decode("utf-8"))
            except UnicodeDecodeError:
                raise BadRequest(HTTPStatus.BAD_REQUEST, "form is not UTF-8") from None
            rater = _rater(_single(form, "rater"))
            method, collage = _single(form, "method"), _single(form, "collage")
            app.lookup(method, collage)
            try:
                rating = parse_rating(_single(form, "rating"))
            except ValueError as e:
                raise BadRequest(HTTPStatus.BAD_REQUEST, str(e)) from None
            app.db.rate(rater, method, collage, rating)
            self._redirect("/rate?" + urllib.parse.urlencode({"rater": rater}))

        def _image(self, rest):
            segments = [urllib.parse.unquote(s, errors="strict") for s in rest.split("/")]
            if len(segments) != 2:
                raise BadRequest(HTTPStatus.BAD_REQUEST, "image path must be /image/METHOD/COLLAGE_ID")
            m, _ = app.lookup(*segments)
            with open(m.files[segments[1]], "rb") as f:
                data = f.read()
            self._send(HTTPStatus.OK, data, "image/png")

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def make_server(app, host="127.0.0.1", port=8000, timeout=REQUEST_TIMEOUT_S):
    """A ``ThreadingHTTPServer`` for ``app``; ``port=0`` picks a free port (see ``server_address``);
    ``timeout``: seconds a connection may stall on one read or write before it is answered 408 / closed."""
    return _Server((host, port), make_handler(app, timeout))
