"""SQLite store of purity ratings: one row per (rater, method, collage), upserted.

Durability and concurrency come from SQLite itself: WAL journal (readers never block the writer),
``synchronous=FULL`` (a committed rating survives a crash of the process or the machine), one
short-lived connection per operation (safe from any thread of a threading HTTP server) and a busy
timeout so concurrent raters queue instead of failing.
"""
import contextlib
import csv
import io
import re
import sqlite3
import time

from ..utils.io import atomic_write_bytes

__all__ = ["MIN_RATING", "MAX_RATING", "RatingDB", "validate_rater", "validate_name", "parse_rating",
           "next_unrated"]

MIN_RATING, MAX_RATING = 3, 9  # paper Sec 5.2: how many of the 9 tiles show the same part
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_RATING = re.compile(r"-?[0-9]{1,6}")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS ratings (
    rater   TEXT NOT NULL,
    method  TEXT NOT NULL,
    collage TEXT NOT NULL,
    rating  INTEGER NOT NULL CHECK (rating BETWEEN {lo} AND {hi}),
    updated REAL NOT NULL,
    UNIQUE (rater, method, collage)
);
""".format(lo=MIN_RATING, hi=MAX_RATING)
CSV_COLUMNS = ("rater", "method", "collage", "rating", "updated")


def validate_name(value, what):
    """``value`` if it is 1-64 chars of ``[A-Za-z0-9_.-]`` starting alphanumeric, else ``ValueError``."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError(f"invalid {what} {value!r}: use 1-64 letters, digits, '_', '.' or '-', "
                         "starting with a letter or digit")
    return value


def validate_rater(value):
    return validate_name(value, "rater name")


def parse_rating(value):
    """A rating given as int or decimal string -> int in [MIN_RATING, MAX_RATING], else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"rating must be an integer {MIN_RATING}..{MAX_RATING}, got {value!r}")
    if isinstance(value, str):
        if not _RATING.fullmatch(value):
            raise ValueError(f"rating must be an integer {MIN_RATING}..{MAX_RATING}, got {value!r}")
        value = int(value)
    if not MIN_RATING <= value <= MAX_RATING:
        raise ValueError(f"rating {value} out of range {MIN_RATING}..{MAX_RATING}")
    return value


def next_unrated(queue, rated):
    """First ``(method, collage)`` of ``queue`` not in ``rated`` (a set), or ``None``."""
    for item in queue:
        if item not in rated:
            return item
    return None


class RatingDB:
    """Ratings in the SQLite file ``path`` (created with its schema on first use)."""

    def __init__(self, path, timeout=30.0):
        self.path, self.timeout = str(path), timeout
        with self._connect() as con:
            # WAL is a property of the file: set once, every later connection uses it.
            con.execute("PRAGMA journal_mode=WAL")
            con.executescript(_SCHEMA)

    @contextlib.contextmanager
    def _connect(self):
        con = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        try:
            con.execute("PRAGMA synchronous=FULL")
            yield con
        finally:
            con.close()

    def rate(self, rater, method, collage, rating):
        """Insert or replace the rater's rating of ``(method, collage)``, committed before returning."""
        rater, rating = validate_rater(rater), parse_rating(rating)
        validate_name(method, "method")
        validate_name(collage, "collage id")
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                con.execute(
                    "INSERT INTO ratings (rater, method, collage, rating, updated) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT (rater, method, collage) DO UPDATE SET rating = excluded.rating, "
                    "updated = excluded.updated",
                    (rater, method, collage, rating, time.time()))
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise

    def rated(self, rater):
        """Set of ``(method, collage)`` the rater has rated."""
        with self._connect() as con:
            return {tuple(r) for r in con.execute(
                "SELECT method, collage FROM ratings WHERE rater = ?", (rater,))}

    def rating_of(self, rater, method, collage):
        with self._connect() as con:
            row = con.execute("SELECT rating FROM ratings WHERE rater = ? AND method = ? AND collage = ?",
                              (rater, method, collage)).fetchone()
        return None if row is None else row[0]

    def rows(self):
        """All ratings as dicts (keys ``CSV_COLUMNS``), ordered by method, collage, rater."""
        with self._connect() as con:
            cur = con.execute("SELECT rater, method, collage, rating, updated FROM ratings "
                              "ORDER BY method, collage, rater")
            return [dict(zip(CSV_COLUMNS, r)) for r in cur]

    def export_csv(self, path):
        """Write every rating to ``path`` as CSV (header ``CSV_COLUMNS``), atomically; returns the row count."""
        rows = self.rows()
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(path, buf.getvalue().encode("utf-8"))
        return len(rows)
