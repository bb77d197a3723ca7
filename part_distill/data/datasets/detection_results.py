"""COCO-results files (a detector's output, e.g. Detic's) read at scale: a per-row index built by one
streaming pass and cached next to the file, then only the rows that are kept are read back.

A results file is a JSON array of rows ``{image_id | file_name, category_id, segmentation, score, ...}``
(``coco_instances_results.json`` of detectron2's COCOEvaluator, Detic's output) or JSON Lines (one row
per line). The index (:func:`load_results_index`) holds, per row, its image key, ``category_id``,
``score`` and byte span; it is written atomically to ``<file>.index.npz`` and rebuilt when the file's
size or modification time changes. Nothing here holds more than one row's JSON at a time, so a
multi-GB file costs one sequential read per machine (the first rank to need it) plus a seek per kept row.
"""
import glob
import json
import logging
import os
import re

import numpy as np

from ...utils.io import atomic_open

__all__ = ["expand_result_files", "iter_json_rows", "load_results_index", "read_rows", "INDEX_SUFFIX", "NO_IMAGE_ID"]

logger = logging.getLogger(__name__)

INDEX_SUFFIX = ".index.npz"
_INDEX_VERSION = 1
# JSON whitespace and the commas between array elements (not \s: latin-1 text has more "spaces").
_SEPARATORS = re.compile(r"[ \t\n\r,]*")
# image_id of rows keyed by file_name only.
NO_IMAGE_ID = np.iinfo(np.int64).min


def expand_result_files(patterns, what="DATASETS.IMAGE_COLLECTION.OBJECTS"):
    """Sorted files of ``patterns`` (paths or globs, in the given order, duplicates dropped).

    A pattern matching nothing raises ``FileNotFoundError`` naming it: a missing shard must not
    silently leave its images without objects.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    out = []
    for p in patterns:
        files = sorted(glob.glob(p)) if glob.has_magic(p) else ([p] if os.path.isfile(p) else [])
        if not files:
            raise FileNotFoundError(f"{what}: {p!r} matches no file")
        out += [f for f in files if f not in out]
    return out


def iter_json_rows(path, chunk_bytes=1 << 24):
    """Yield ``(byte_offset, byte_length, row_dict)`` for every top-level object of ``path``.

    Accepts a JSON array of objects or JSON Lines. The file is read in ``chunk_bytes`` pieces and
    decoded as latin-1, which maps every byte to one character, so string offsets are byte offsets;
    a row holding non-ASCII bytes is decoded again as UTF-8.
    """
    decoder = json.JSONDecoder()
    with open(path, "rb") as f:
        buf, base, pos, eof, in_array, closed = "", 0, 0, False, None, False
        while True:
            pos = _SEPARATORS.match(buf, pos).end()
            if pos >= len(buf):
                if eof:
                    break
                data = f.read(chunk_bytes)
                buf, base, pos, eof = buf[pos:] + data.decode("latin-1"), base + pos, 0, not data
                continue
            ch = buf[pos]
            if in_array is None:
                in_array = ch == "["
                pos += in_array
                continue
            if closed:
                raise ValueError(f"{path}: data after the closing ']' at byte {base + pos}")
            if ch == "]" and in_array:
                closed, pos = True, pos + 1
                continue
            try:
                row, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as e:
                if not eof:  # the row may continue in the next chunk
                    data = f.read(chunk_bytes)
                    buf, base, pos, eof = buf[pos:] + data.decode("latin-1"), base + pos, 0, not data
                    continue
                raise ValueError(f"{path}: invalid JSON at byte {base + pos}: {e.msg}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}: expected a JSON object per result row at byte {base + pos}, "
                                 f"got {type(row).__name__}")
            if not buf[pos:end].isascii():
                row = json.loads(buf[pos:end].encode("latin-1").decode("utf-8"))
            yield base + pos, end - pos, row
            pos = end
        if in_array and not closed:
            raise ValueError(f"{path}: truncated JSON array (no closing ']')")


def _build_index(path):
    ids, name_idx, names, name_of, cats, scores, offsets, lengths = [], [], [], {}, [], [], [], []
    for row_no, (off, length, row) in enumerate(iter_json_rows(path)):
        if "image_id" not in row and "file_name" not in row:
            raise ValueError(f"{path}: row {row_no} (byte {off}) has neither 'image_id' nor 'file_name'")
        if "category_id" not in row or "segmentation" not in row:
            raise ValueError(f"{path}: row {row_no} (byte {off}) lacks 'category_id' or 'segmentation'")
        ids.append(int(row["image_id"]) if "image_id" in row else NO_IMAGE_ID)
        if "file_name" in row:
            name = str(row["file_name"])
            name_idx.append(name_of.setdefault(name, len(names)))
            if name_idx[-1] == len(names):
                names.append(name)
        else:
            name_idx.append(-1)
        cats.append(int(row["category_id"]))
        scores.append(float(row.get("score", 1.0)))
        offsets.append(off)
        lengths.append(length)
    return {
        "version": np.array(_INDEX_VERSION),
        "image_id": np.array(ids, dtype=np.int64),
        "name_index": np.array(name_idx, dtype=np.int64),
        "names": np.array(names, dtype=str),
        "category_id": np.array(cats, dtype=np.int64),
        "score": np.array(scores, dtype=np.float64),
        "offset": np.array(offsets, dtype=np.int64),
        "length": np.array(lengths, dtype=np.int64),
    }


def _stamp(path):
    st = os.stat(path)
    return np.array([st.st_size, st.st_mtime_ns], dtype=np.int64)


def load_results_index(path):
    """The row index of results file ``path`` (dict of numpy arrays; docstring of this module).

    ``image_id`` is ``NO_IMAGE_ID`` for rows keyed by ``file_name`` only; ``name_index`` is -1 for rows
    without ``file_name``, else an index into ``names``. Cached in ``path + INDEX_SUFFIX`` (atomic
    write; when the folder is read-only the index is kept in memory and a warning says so).
    """
    cache = path + INDEX_SUFFIX
    stamp = _stamp(path)
    if os.path.exists(cache):
        try:
            with np.load(cache, allow_pickle=False) as z:
                if int(z["version"]) == _INDEX_VERSION and np.array_equal(z["stamp"], stamp):
                    return {k: z[k] for k in z.files if k != "stamp"}
        except (OSError, ValueError, KeyError) as e:
            logger.warning("Ignoring unreadable results index %s (%s); rebuilding it", cache, e)
    logger.info("Indexing results file %s (one streaming pass) ...", path)
    index = _build_index(path)
    try:
        with atomic_open(cache, "wb") as f:
            np.savez(f, stamp=stamp, **index)
    except OSError as e:
        logger.warning("Could not cache the index of %s at %s (%s); every process re-indexes it", path, cache, e)
    logger.info("Indexed %d result rows of %s", len(index["offset"]), path)
    return index


def read_rows(path, offsets, lengths):
    """The rows at byte spans ``(offsets[i], lengths[i])`` of ``path``, in the given order (read in file order)."""
    rows = [None] * len(offsets)
    with open(path, "rb") as f:
        for i in np.argsort(offsets, kind="stable"):
            f.seek(int(offsets[i]))
            rows[i] = json.loads(f.read(int(lengths[i])).decode("utf-8"))
    return rows
