"""The rating web app: input validation over raw HTTP, then a full session in headless Chromium
(driven through chromedriver's W3C WebDriver API with urllib) including a server crash mid-session."""
import base64
import contextlib
import http.client
import json
import multiprocessing
import os
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import urllib.parse
import urllib.request

import cv2
import numpy as np
import pytest

from part_distill.rating import cli
from part_distill.rating.db import RatingDB
from part_distill.rating.server import RatingApp, load_method, make_server, rating_queue
from part_distill.utils.masks import encode_rle
from part_distill.visualization.collages import collage_size, make_collages

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
TILE = 24


def _toy_method(root, name, num_clusters, colour):
    """A collage dir with ``num_clusters`` collages of a one-colour toy image."""
    root.mkdir(parents=True)
    img = np.empty((32, 32, 3), np.uint8)
    img[:] = colour
    cv2.imwrite(str(root / "img.png"), img)
    parts = []
    for k in range(num_clusters):
        m = np.zeros((32, 32), bool)
        m[4 + 3 * k:8 + 3 * k, 4:20] = True
        parts.append({"segmentation": encode_rle(m), "score": 1.0, "cluster_id": k, "object_class": k % 2,
                      "object_bbox": [2, 2, 28, 28]})
    out = root / "collages"
    make_collages([{"file_name": str(root / "img.png"), "height": 32, "width": 32, "parts": parts}],
                  ["mug", "kettle"], str(out), tile_size=TILE, method=name)
    return out


@pytest.fixture
def methods(tmp_path):
    return [_toy_method(tmp_path / "a", "alpha", 3, (40, 90, 200)),
            _toy_method(tmp_path / "b", "beta", 3, (200, 90, 40))]


@contextlib.contextmanager
def _thread_server(methods, db_path, **server_kwargs):
    app = RatingApp([load_method(d) for d in methods], str(db_path))
    server = make_server(app, "127.0.0.1", 0, **server_kwargs)
    th = threading.Thread(target=server.serve_forever, daemon=True)
    th.start()
    try:
        yield app, server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        th.join(timeout=10)


def _request(port, method, path, body=None, headers=None):
    con = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        con.putrequest(method, path, skip_accept_encoding=True)  # path sent verbatim, no normalisation
        body = body.encode() if isinstance(body, str) else body
        hdrs = dict(headers or {})
        if body is not None:
            hdrs.setdefault("Content-Type", "application/x-www-form-urlencoded")
            hdrs["Content-Length"] = str(len(body))
        for k, v in hdrs.items():
            con.putheader(k, v)
        con.endheaders(body)
        r = con.getresponse()
        return r.status, r.read(), dict(r.getheaders())
    finally:
        con.close()


def _recv_all(sock):
    """Everything the server sends until it closes the connection (the socket has a timeout)."""
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk


def test_stalled_requests_time_out(methods, tmp_path):
    import socket

    with _thread_server(methods, tmp_path / "r.sqlite", timeout=0.5) as (app, port):
        # A POST whose headers promise a body that never comes: 408, the connection is closed and
        # nothing is rated. Without a server timeout the recv below waits until its own 20 s limit.
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            sock.sendall(b"POST /rate HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                         b"Content-Length: 60\r\n\r\nrater=ann")
            reply = _recv_all(sock)
        assert reply.startswith(b"HTTP/1.0 408") and b"did not arrive within 0.5 s" in reply
        assert app.db.rows() == []
        # Headers that stall half-way: the server drops the connection without an answer.
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            sock.sendall(b"GET /rate HTTP/1.1\r\nHost: x\r\n")
            assert _recv_all(sock) == b""
        # The server still answers (its threads were not held).
        status, body, _ = _request(port, "GET", "/")
        assert status == 200


def test_http_input_validation(methods, tmp_path):
    secret = tmp_path / "a" / "secret.txt"
    secret.write_text("TOP-SECRET")
    db_path = tmp_path / "r.sqlite"
    with _thread_server(methods, db_path) as (app, port):
        cid = sorted(app.methods["alpha"].collages)[0]
        status, body, hdr = _request(port, "GET", f"/image/alpha/{cid}")
        assert status == 200 and hdr["Content-Type"] == "image/png"
        assert body == (methods[0] / f"{cid}.png").read_bytes()
        for path in ["/image/../../etc/passwd", "/image/alpha/..%2F..%2Fetc%2Fpasswd", "/image/%2e%2e/%2e%2e",
                     "/image/alpha/..%2Fsecret.txt", "/image/alpha/../secret.txt", "/image/alpha/secret",
                     "/image/alpha/img.png", "/image/alpha/index.json", f"/image/alpha/{cid}/..",
                     "/image/alpha/%ff", "/../../etc/passwd", "/image/", f"/image/gamma/{cid}",
                     "/rate?rater=ann&method=alpha&collage=..%2Fsecret.txt",
                     "/rate?rater=ann&method=..&collage=x"]:
            status, body, _ = _request(port, "GET", path)
            assert status in (400, 404), path
            assert b"TOP-SECRET" not in body and b"root:" not in body, path
        status, body, _ = _request(port, "GET", "/rate?rater=ann&method=alpha&collage=class0009_cluster009")
        assert status == 404 and b"unknown collage id" in body
        for rater in ["a%20b", "..%2F..", "%3Cscript%3E", ""]:
            status, body, _ = _request(port, "GET", f"/rate?rater={rater}")
            assert status == 400 and b"invalid rater name" in body, rater
        ok = {"rater": "ann", "method": "alpha", "collage": cid, "rating": "7"}
        bad_posts = [({"rating": "10"}, 400, b"out of range"), ({"rating": "2"}, 400, b"out of range"),
                     ({"rating": "7.5"}, 400, b"integer"), ({"rating": "x"}, 400, b"integer"),
                     ({"collage": "class0009_cluster009"}, 404, b"unknown collage id"),
                     ({"collage": "../../etc/passwd"}, 400, b"invalid collage id"),
                     ({"method": "gamma"}, 404, b"unknown method"), ({"rater": "a b"}, 400, b"invalid rater")]
        for change, code, msg in bad_posts:
            status, body, _ = _request(port, "POST", "/rate", urllib.parse.urlencode(dict(ok, **change)))
            assert status == code and msg in body, change
        status, _, _ = _request(port, "POST", "/rate", urllib.parse.urlencode(ok) + "&rating=8")
        assert status == 400  # duplicated field
        status, _, _ = _request(port, "POST", "/rate", "x" * 5000)
        assert status == 413
        status, _, _ = _request(port, "POST", "/rate", json.dumps(ok), {"Content-Type": "application/json"})
        assert status == 415
        assert RatingDB(db_path).rows() == []  # no bad request wrote anything
        status, _, hdr = _request(port, "POST", "/rate", urllib.parse.urlencode(ok))
        assert status == 303 and hdr["Location"] == "/rate?rater=ann"
        assert RatingDB(db_path).rating_of("ann", "alpha", cid) == 7
        assert _request(port, "GET", "/nowhere")[0] == 404


def test_index_pointing_outside_the_dir_is_refused(methods, tmp_path):
    index = json.loads((methods[0] / "index.json").read_text())
    first = sorted(index["collages"])[0]
    index["collages"][first]["file"] = "../img.png"
    (methods[0] / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="outside"):
        load_method(methods[0])


# ----------------------------------------------------------------------------------- browser


class WebDriver:
    """The few W3C WebDriver commands the test needs, over urllib."""

    ELEMENT = "element-6066-11e4-a52e-4f735466cecf"

    def __init__(self, port, profile_dir):
        self.base = f"http://127.0.0.1:{port}"
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": CHROMIUM,
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--window-size=900,800", f"--user-data-dir={profile_dir}"]}}}}
        self.session = self._call("POST", "/session", caps)["sessionId"]
        # Element look-ups wait (bounded) for the element, so a click's navigation has time to finish.
        self.cmd("POST", "/timeouts", {"implicit": 30000, "pageLoad": 60000, "script": 30000})

    def _call(self, method, path, payload=None):
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read())["value"]
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"webdriver {method} {path}: {e.read()[:500]!r}") from None

    def cmd(self, method, path, payload=None):
        return self._call(method, f"/session/{self.session}{path}", payload)

    def get(self, url):
        self.cmd("POST", "/url", {"url": url})

    def find(self, css):
        found = self.cmd("POST", "/element", {"using": "css selector", "value": css})
        if self.ELEMENT not in found:
            raise AssertionError(f"no element {css!r} on {self.cmd('GET', '/url')}: {found}; page: "
                                 f"{self.cmd('GET', '/source')[:300]}")
        return found[self.ELEMENT]

    def click(self, css):
        self.cmd("POST", f"/element/{self.find(css)}/click", {})

    def type(self, css, text):
        self.cmd("POST", f"/element/{self.find(css)}/value", {"text": text})

    def text(self, css):
        return self.cmd("GET", f"/element/{self.find(css)}/text")

    def script(self, js):
        return self.cmd("POST", "/execute/sync", {"script": js, "args": []})

    def screenshot(self, path):
        with open(path, "wb") as f:
            f.write(base64.b64decode(self.cmd("GET", "/screenshot")))

    def quit(self):
        with contextlib.suppress(Exception):
            self._call("DELETE", f"/session/{self.session}")


def _read_line(fd, what, timeout=120):
    """One line from a pipe, waiting at most ``timeout`` seconds in total."""
    buf = b""
    while not buf.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            raise TimeoutError(f"{what} printed no line within {timeout}s (so far: {buf!r})")
        chunk = os.read(fd, 1)
        if not chunk:
            raise RuntimeError(f"{what} exited before printing a line (so far: {buf!r})")
        buf += chunk
    return buf.decode()


@pytest.fixture(scope="module")
def webdriver():
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.skip(f"headless browser test needs {CHROMIUM} and {CHROMEDRIVER} "
                    "(Debian: apt-get install -y chromium chromium-driver)")
    proc = subprocess.Popen([CHROMEDRIVER, "--port=0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    profile = tempfile.mkdtemp(prefix="part_distill_chromium_")
    driver = None
    try:
        for _ in range(10):  # a banner first, then "ChromeDriver was started successfully on port N."
            line = _read_line(proc.stdout.fileno(), "chromedriver")
            if "started successfully" in line:
                break
        port = int(line.rsplit("port", 1)[1].strip(" .\n"))
        driver = WebDriver(port, profile)
        yield driver
    finally:
        if driver is not None:
            driver.quit()
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)
        shutil.rmtree(profile, ignore_errors=True)


def _cli_serve_child(argv, write_fd):
    """Forked child: the real ``rate_parts.py serve`` CLI with stdout on a pipe to the test."""
    import sys

    os.dup2(write_fd, 1)
    sys.stdout = os.fdopen(1, "w")
    cli.main(argv)


@contextlib.contextmanager
def _cli_server(methods, db_path):
    """The app in a forked process (imports already done, so it starts at once); yields its URL
    and the process, which the test may SIGKILL to simulate a crash."""
    read_fd, write_fd = os.pipe()
    argv = ["serve", "--db", str(db_path), "--port", "0"]
    for d in methods:
        argv += ["--collages", str(d)]
    proc = multiprocessing.get_context("fork").Process(target=_cli_serve_child, args=(argv, write_fd), daemon=True)
    proc.start()
    os.close(write_fd)
    try:
        line = _read_line(read_fd, "rate_parts.py serve")
        assert line.startswith("serving 6 collages of 2 method(s) on http://127.0.0.1:"), line
        yield line.split(" on ", 1)[1].strip(), proc
    finally:
        os.close(read_fd)
        if proc.is_alive():
            proc.kill()
        proc.join(timeout=20)


def _shown(driver):
    """(method, collage) on screen, read from the image URL, after checking the image really loaded."""
    src = driver.script("var i=document.getElementById('collage');"
                        "return i.complete && i.naturalWidth > 0 ? i.getAttribute('src') : null;")
    assert src is not None, "collage image did not load"
    assert driver.script("return document.getElementById('collage').naturalWidth") == collage_size(TILE)
    _, _, method, collage = src.split("/")
    return method, collage


def test_full_rating_session_in_chromium_with_server_crash(webdriver, methods, tmp_path):
    db_path = tmp_path / "ratings.sqlite"
    queue = rating_queue([load_method(d) for d in methods], seed=0)
    assert len(queue) == 6 and {m for m, _ in queue} == {"alpha", "beta"}
    given = {}
    with _cli_server(methods, db_path) as (url, proc):
        webdriver.get(url)
        webdriver.type("#rater", "alice")
        webdriver.click("#go")
        assert webdriver.text("#rater-name") == "alice"
        for step in range(3):
            webdriver.find(f"#progress[data-n='{step}']")  # waits for the page after the last click
            assert _shown(webdriver) == queue[step] and webdriver.text("#progress") == str(step)
            rating = 3 + 2 * step
            webdriver.click(f"#rate-{rating}")
            given[queue[step]] = rating
        webdriver.find("#progress[data-n='3']")
        assert _shown(webdriver) == queue[3]
        webdriver.screenshot(tmp_path / "rating_page.png")
        proc.kill()  # SIGKILL: no shutdown hook runs
        proc.join(timeout=20)
        assert proc.exitcode == -signal.SIGKILL
    # Restarted server: the rater's cookie brings them back to the first unrated collage.
    with _cli_server(methods, db_path) as (url, proc):
        webdriver.get(url)
        assert _shown(webdriver) == queue[3] and webdriver.text("#progress") == "3"
        for step in range(3, 6):
            webdriver.find(f"#progress[data-n='{step}']")
            assert _shown(webdriver) == queue[step]
            webdriver.click(f"#rate-{9 - step}")
            given[queue[step]] = 9 - step
        assert "All 6 collages rated" in webdriver.text("#done")
        # Change one rating: the page marks the current one, the click upserts.
        m, c = queue[0]
        webdriver.get(f"{url}rate?rater=alice&method={m}&collage={c}")
        assert webdriver.script("return document.querySelector('button.cur').value") == "3"
        webdriver.click("#rate-8")
        given[queue[0]] = 8
        webdriver.find("#done")  # nothing left to rate: back on the final page
        # An invalid rating typed into the URL bar is refused with a message.
        webdriver.get(f"{url}rate?rater=alice&method={m}&collage=..%2F..%2Fetc%2Fpasswd")
        assert "invalid collage id" in webdriver.text("#error")
    rows = RatingDB(db_path).rows()
    assert {(r["method"], r["collage"]): r["rating"] for r in rows} == given
    assert {r["rater"] for r in rows} == {"alice"} and len(rows) == 6
    png = cv2.imread(str(tmp_path / "rating_page.png"))
    assert png is not None and png.shape[0] > 200
