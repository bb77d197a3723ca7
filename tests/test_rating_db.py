"""Rating store: concurrent writers, upsert, resume order, CSV export, precision curve, CLI."""
import csv
import itertools
import sqlite3
import threading

import matplotlib.axes
import numpy as np
import pytest

from part_distill.rating import cli
from part_distill.rating.curve import RATING_LEVELS, plot_precision_curve, precision_curve
from part_distill.rating.db import RatingDB, next_unrated, parse_rating, validate_rater
from part_distill.rating.server import Method, rating_queue


def test_concurrent_writers_lose_nothing(tmp_path):
    db = RatingDB(tmp_path / "r.sqlite")
    n_threads, per_thread = 8, 30
    errors, barrier = [], threading.Barrier(n_threads)

    def work(t):
        try:
            barrier.wait(timeout=60)
            for i in range(per_thread):
                db.rate(f"rater{t}", "m", f"c{i:03d}", 3 + (t + i) % 7)
                # Every thread also fights over one shared key.
                db.rate("shared", "m", "c000", 3 + t % 7)
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not errors and not any(th.is_alive() for th in threads)
    rows = db.rows()
    own = {(r["rater"], r["collage"]): r["rating"] for r in rows if r["rater"] != "shared"}
    assert own == {(f"rater{t}", f"c{i:03d}"): 3 + (t + i) % 7 for t in range(n_threads) for i in range(per_thread)}
    shared = [r for r in rows if r["rater"] == "shared"]
    assert len(shared) == 1 and shared[0]["rating"] in {3 + t % 7 for t in range(n_threads)}
    with sqlite3.connect(tmp_path / "r.sqlite") as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_upsert_keeps_one_row_with_the_last_rating(tmp_path):
    db = RatingDB(tmp_path / "r.sqlite")
    db.rate("ann", "m1", "c1", 5)
    db.rate("ann", "m1", "c1", "8")
    db.rate("ann", "m2", "c1", 4)  # other method: separate row
    db.rate("bob", "m1", "c1", 3)  # other rater: separate row
    got = {(r["rater"], r["method"], r["collage"]): r["rating"] for r in db.rows()}
    assert got == {("ann", "m1", "c1"): 8, ("ann", "m2", "c1"): 4, ("bob", "m1", "c1"): 3}
    # A reopened database (new process, same file) sees the same rows.
    assert RatingDB(tmp_path / "r.sqlite").rating_of("ann", "m1", "c1") == 8


@pytest.mark.parametrize("bad", ["2", "10", "7.0", "seven", "", " 7", "+7", "-3", 2, 10, 7.0, True, None, "٧"])
def test_rating_validation(bad, tmp_path):
    with pytest.raises(ValueError):
        parse_rating(bad)
    with pytest.raises(ValueError):
        RatingDB(tmp_path / "r.sqlite").rate("ann", "m", "c", bad)


def test_rating_validation_accepts_the_paper_scale():
    assert [parse_rating(str(r)) for r in range(3, 10)] == list(range(3, 10))


@pytest.mark.parametrize("bad", ["", "a b", "../x", ".hidden", "a/b", "é", "x" * 65, "a;b", "<b>", None])
def test_rater_validation(bad):
    with pytest.raises(ValueError, match="rater name"):
        validate_rater(bad)


def test_resume_order_is_the_first_unrated_in_the_queue(tmp_path):
    methods = [Method("a", "", {f"c{i}": {} for i in range(5)}, {}),
               Method("b", "", {f"c{i}": {} for i in range(4)}, {})]
    queue = rating_queue(methods, seed=1)
    assert sorted(queue) == sorted([("a", f"c{i}") for i in range(5)] + [("b", f"c{i}") for i in range(4)])
    assert queue == rating_queue(methods, seed=1) and queue != rating_queue(methods, shuffle=False)
    assert rating_queue(methods, shuffle=False)[:2] == [("a", "c0"), ("a", "c1")]
    db = RatingDB(tmp_path / "r.sqlite")
    rng = np.random.default_rng(0)
    for step in range(len(queue)):
        rated = db.rated("ann")
        brute = [q for q in queue if q not in rated]
        assert next_unrated(queue, rated) == brute[0]
        # Rate a random unrated item (not always the next one), as a rater who jumps around would.
        m, c = brute[rng.integers(len(brute))]
        db.rate("ann", m, c, 5)
    assert next_unrated(queue, db.rated("ann")) is None
    assert next_unrated(queue, db.rated("bob")) == queue[0]


def _random_ratings(db, seed=0):
    rng = np.random.default_rng(seed)
    expected = {}
    for rater, method, c in itertools.product(["ann", "bob", "cy"], ["m1", "m2"], range(12)):
        if rng.random() < 0.7:
            r = int(rng.integers(3, 10))
            db.rate(rater, method, f"c{c:02d}", r)
            expected[(rater, method, f"c{c:02d}")] = r
    return expected


def test_csv_export_matches_the_ratings(tmp_path):
    db = RatingDB(tmp_path / "r.sqlite")
    expected = _random_ratings(db)
    assert db.export_csv(tmp_path / "out.csv") == len(expected)
    with open(tmp_path / "out.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["rater", "method", "collage", "rating", "updated"]
    assert {(r["rater"], r["method"], r["collage"]): int(r["rating"]) for r in rows} == expected
    assert len(rows) == len(expected)


def test_precision_curve_equals_direct_computation(tmp_path):
    db = RatingDB(tmp_path / "r.sqlite")
    expected = _random_ratings(db, seed=3)
    curves = precision_curve(db.rows())
    assert set(curves) == {"m1", "m2"}
    for method in ("m1", "m2"):
        # Per collage: mean over its raters; precision at r: share of rated collages with mean >= r.
        collages = sorted({c for (_, m, c) in expected if m == method})
        means = [sum(v for (_, m, c), v in expected.items() if m == method and c == col)
                 / sum(1 for (_, m, c) in expected if m == method and c == col) for col in collages]
        direct = [sum(1 for x in means if x >= r) / len(means) for r in range(3, 10)]
        levels, prec, n = curves[method]
        assert list(levels) == list(RATING_LEVELS) == list(range(3, 10))
        assert n == len(collages)
        np.testing.assert_allclose(prec, direct, rtol=0, atol=1e-12)
        assert prec[0] == 1.0  # every rating is >= 3


def _hand_ratings(db):
    """m1: a = mean(4, 7) = 5.5, b = 9, c = mean(3, 3) = 3, d = 8 (its rater changed 6 to 8); m2: a = 5."""
    for rater, method, collage, rating in [("r1", "m1", "a", 4), ("r2", "m1", "a", 7), ("r1", "m1", "b", 9),
                                           ("r1", "m1", "c", 3), ("r2", "m1", "c", 3), ("r2", "m1", "d", 6),
                                           ("r2", "m1", "d", 8), ("r1", "m2", "a", 5)]:
        db.rate(rater, method, collage, rating)


# Fraction of the collages with mean rating >= r, r = 3..9, counted by hand from _hand_ratings.
HAND_CURVES = {"m1": [1.0, 0.75, 0.75, 0.5, 0.5, 0.5, 0.25], "m2": [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]}


def test_precision_curve_and_its_plot_equal_hand_count(tmp_path, monkeypatch):
    db = RatingDB(tmp_path / "r.sqlite")
    _hand_ratings(db)
    curves = precision_curve(db.rows())
    assert {m: (list(levels), list(prec), n) for m, (levels, prec, n) in curves.items()} == {
        "m1": (list(range(3, 10)), HAND_CURVES["m1"], 4), "m2": (list(range(3, 10)), HAND_CURVES["m2"], 1)}
    drawn = {}
    real_plot = matplotlib.axes.Axes.plot

    def record(self, x, y, *args, label=None, **kwargs):
        drawn[label] = (list(x), list(y))
        return real_plot(self, x, y, *args, label=label, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", record)
    plot_precision_curve(db.rows(), tmp_path / "c.png")
    assert drawn == {"m1 (4 parts)": (list(range(3, 10)), HAND_CURVES["m1"]),
                     "m2 (1 parts)": (list(range(3, 10)), HAND_CURVES["m2"])}


def test_cli_export_and_curve(tmp_path, capsys):
    db = RatingDB(tmp_path / "r.sqlite")
    _hand_ratings(db)
    assert cli.main(["export", "--db", str(tmp_path / "r.sqlite"), "--csv", str(tmp_path / "o.csv")]) == 0
    with open(tmp_path / "o.csv", newline="") as f:
        rows = {(r["rater"], r["method"], r["collage"]): r["rating"] for r in csv.DictReader(f)}
    assert rows == {("r1", "m1", "a"): "4", ("r2", "m1", "a"): "7", ("r1", "m1", "b"): "9", ("r1", "m1", "c"): "3",
                    ("r2", "m1", "c"): "3", ("r2", "m1", "d"): "8", ("r1", "m2", "a"): "5"}
    assert cli.main(["curve", "--db", str(tmp_path / "r.sqlite"), "--png", str(tmp_path / "c.png")]) == 0
    png = (tmp_path / "c.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    out = capsys.readouterr().out.splitlines()
    assert out[-3:] == ["m1 (4 collages): >=3: 1.000  >=4: 0.750  >=5: 0.750  >=6: 0.500  >=7: 0.500  >=8: 0.500  "
                        ">=9: 0.250",
                        "m2 (1 collages): >=3: 1.000  >=4: 1.000  >=5: 1.000  >=6: 0.000  >=7: 0.000  >=8: 0.000  "
                        ">=9: 0.000",
                        f"wrote {tmp_path / 'c.png'}"]
    with pytest.raises(SystemExit, match="no ratings database"):
        cli.main(["export", "--db", str(tmp_path / "missing.sqlite"), "--csv", str(tmp_path / "x.csv")])
