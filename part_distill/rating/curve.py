"""Precision-vs-rating curve (paper Fig 4): for each r in 3..9, the fraction of rated collages whose
rating is >= r, one curve per method.

Each collage counts once: with several raters its rating is the mean of their ratings. The
denominator is the number of that method's collages with at least one rating.
"""
import collections
import io

import numpy as np

from ..utils.io import atomic_write_bytes
from .db import MAX_RATING, MIN_RATING

__all__ = ["RATING_LEVELS", "collage_ratings", "precision_curve", "plot_precision_curve"]

RATING_LEVELS = tuple(range(MIN_RATING, MAX_RATING + 1))


def collage_ratings(rows):
    """{method: {collage: mean rating over raters}} from rating rows (dicts with method/collage/rating)."""
    acc = collections.defaultdict(lambda: collections.defaultdict(list))
    for r in rows:
        acc[r["method"]][r["collage"]].append(r["rating"])
    return {m: {c: float(np.mean(v)) for c, v in cs.items()} for m, cs in sorted(acc.items())}


def precision_curve(rows):
    """{method: (levels, precision, num_collages)} with ``precision[i]`` = fraction rated >= levels[i]."""
    out = {}
    for method, per_collage in collage_ratings(rows).items():
        values = np.array(list(per_collage.values()), np.float64)
        prec = np.array([(values >= r).mean() for r in RATING_LEVELS], np.float64)
        out[method] = (RATING_LEVELS, prec, len(values))
    return out


def plot_precision_curve(rows, path, title="Purity rating"):
    """Draw the curves as a PNG at ``path`` (matplotlib Agg, atomic write); returns ``precision_curve``."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    curves = precision_curve(rows)
    if not curves:
        raise ValueError("no ratings to plot: the database holds no rating yet")
    fig, ax = plt.subplots(figsize=(4.5, 3.5), dpi=120)
    for method, (levels, prec, n) in curves.items():
        ax.plot(levels, prec, marker="o", label=f"{method} ({n} parts)")
    ax.set_xlabel("purity rating r")
    ax.set_ylabel("precision (fraction rated >= r)")
    ax.set_xticks(list(RATING_LEVELS))
    ax.set_ylim(0.0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return curves
