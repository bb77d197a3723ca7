"""Robust image reading for real datasets, plus a counter for what had to be skipped.

``read_image`` returns uint8 HxWx3 for any file PIL can decode: grayscale, palette, CMYK,
RGBA/LA (alpha dropped), 16-bit (scaled down by the most significant byte, as PIL does for
16-bit RGB, never clipped), and honours the EXIF orientation tag so pixels match what a
viewer shows (and what annotators saw). A file that cannot be decoded raises
``UnreadableImageError`` (an ``OSError``) so callers can skip it and count it with
``SkipCounter`` instead of crashing a long job or silently losing images.
"""
import logging
from collections import Counter

import numpy as np
from PIL import Image, ImageOps

__all__ = ["UnreadableImageError", "read_image", "read_image_or_skip", "SkipCounter"]

logger = logging.getLogger(__name__)


class UnreadableImageError(OSError):
    """The file is missing, truncated, corrupt or in a format PIL cannot decode."""

    def __init__(self, path, reason):
        super().__init__(f"cannot read image {path!r}: {reason}")
        self.path = path
        self.reason = reason


def _to_uint8_rgb(img):
    """PIL image in any mode -> uint8 HxWx3 RGB array."""
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img)
        if mode == "F":
            arr = arr.astype(np.float64)
            # Float images are either [0, 1] or [0, 255]; anything else is out of range by construction.
            scale = 255.0 if np.nanmax(arr, initial=0.0) <= 1.0 else 1.0
            gray = np.clip(np.nan_to_num(arr) * scale, 0, 255).round().astype(np.uint8)
        else:
            # 16-bit data (mode "I" is how PIL reports 16/32-bit TIFFs): keep the high byte, the same
            # rule PIL applies to 16-bit RGB, so a bright 16-bit image stays bright instead of saturating.
            gray = (np.clip(arr.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL warns when converting transparent palettes straight to RGB
    if img.mode != "RGB":
        img = img.convert("RGB")  # L, 1, P, CMYK (Adobe-inverted handled by PIL), RGBA, LA, YCbCr, ...
    return np.asarray(img, dtype=np.uint8)


def _exif_transposed(img, path):
    """Apply the EXIF orientation; a malformed EXIF block keeps the stored pixels, with a warning."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception as e:  # noqa: BLE001 - EXIF parsers raise struct.error, KeyError, TypeError, ...
        logger.warning(f"{path}: ignoring unreadable EXIF orientation ({type(e).__name__}: {e})")
        return img


def read_image(path, format="BGR"):
    """Read ``path`` as a uint8 HxWx3 array in ``format`` ("BGR" or "RGB"), EXIF orientation applied.

    Raises ``UnreadableImageError`` when the file is missing or cannot be decoded.
    """
    if format not in ("BGR", "RGB"):
        raise ValueError(f"read_image: format must be 'BGR' or 'RGB', got {format!r}")
    try:
        with Image.open(path) as img:
            img.load()  # decode now: truncated files fail here, not later inside a worker
            img = _exif_transposed(img, path)
            arr = _to_uint8_rgb(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        if isinstance(e, UnreadableImageError):
            raise
        raise UnreadableImageError(path, f"{type(e).__name__}: {e}") from e
    if format == "BGR":
        arr = arr[:, :, ::-1]
    return np.ascontiguousarray(arr)


def read_image_or_skip(path, counter, format="BGR"):
    """``read_image`` or ``None`` after recording the failure in ``counter`` (a ``SkipCounter``)."""
    try:
        return read_image(path, format=format)
    except UnreadableImageError as e:
        counter.skip("unreadable_image", e)
        return None


class SkipCounter:
    """Counts skipped items by reason and reports them once, as one warning.

    Loaders and workers call ``skip(reason, detail)`` for each dropped item, then
    ``warn_summary()`` at the end, so a dataset with thousands of bad annotations yields one
    readable line with counts (plus the first few examples) instead of thousands of lines.
    """

    def __init__(self, what, max_examples=3):
        self.what = what
        self.counts = Counter()
        self.examples = {}
        self._max_examples = max_examples

    def skip(self, reason, detail=None, n=1):
        self.counts[reason] += n
        if detail is not None:
            ex = self.examples.setdefault(reason, [])
            if len(ex) < self._max_examples:
                ex.append(str(detail))

    def __getitem__(self, reason):
        return self.counts[reason]

    @property
    def total(self):
        return sum(self.counts.values())

    def as_dict(self):
        return dict(self.counts)

    def merge(self, other):
        """Add another counter's counts (e.g. from a worker process)."""
        for reason, n in other.counts.items():
            self.skip(reason, None, n)
            for detail in other.examples.get(reason, []):
                ex = self.examples.setdefault(reason, [])
                if len(ex) < self._max_examples:
                    ex.append(detail)
        return self

    def summary(self):
        parts = []
        for reason, n in sorted(self.counts.items()):
            ex = self.examples.get(reason)
            parts.append(f"{reason}: {n}" + (f" (e.g. {'; '.join(ex)})" if ex else ""))
        return f"{self.what}: skipped " + ", ".join(parts)

    def warn_summary(self, log=None):
        """Log one warning with all counts; silent when nothing was skipped. Returns the total."""
        if self.total:
            (log or logger).warning(self.summary())
        return self.total
