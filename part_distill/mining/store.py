"""The mined-parts store: COCO-format JSON shards with RLE masks, plus a run stamp and a manifest.

Layout of ``MINING.OUTPUT_DIR``::

    run.json                    config subset + inputs + their hash, written before any shard
    shards/shard_00000.json     images [c*SHARD_SIZE, (c+1)*SHARD_SIZE) of the mined image list
    summaries/shard_00000.json  its config hash, image / part numbers and counts (for the manifest)
    manifest.json               run.json + code version + shard list + summed counts (written last)
    stream_index/               cached byte-offset indexes of training readers (data/store_dataset.py)

A shard is a COCO dataset (``pycocotools.coco.COCO`` and detectron2's ``load_coco_json`` read it):
``images`` (``id`` = position in the mined list + 1, plus ``file_name``, ``height``, ``width``,
``dataset`` and ``source_image_id``), ``categories`` = one class ``part``, ``annotations`` = the
parts, each with ``object_id`` and ``object_category_id``. The objects themselves are a separate
top-level list ``objects`` (ignored by COCO readers): ``id``, ``image_id``, ``category_id`` (the
object class as its source numbers it), ``source_id``, ``score``, ``segmentation`` (RLE), ``bbox``,
``area``, ``num_parts`` and ``skip_reason`` (null when mined). ``skipped_images`` lists images that
could not be mined and why; ``counts`` sums the shard.

Ids depend only on an image's position in the mined list, never on rank or shard size:
object id = (image index + 1) * OBJECT_STRIDE + object row, part id = object id * PART_STRIDE + cluster.

Shards are numbered globally and rank r mines shards c with c % world_size == r, so the files
(and the manifest) do not depend on the world size, and a rerun skips every shard already on disk.

Resume after a kill anywhere: files are written atomically (temp file + rename), so a kill leaves
complete files plus at most a temp file per writer. ``start_run`` deletes those temp files and every
shard that does not parse or is not the shard it claims to be (named in a warning), so the rerun
re-makes it; a shard of another configuration is refused (``ConfigMismatchError``), never mixed in.
"""
import contextlib
import json
import logging
import os
import re
import shutil
import subprocess

import numpy as np

from ..utils.hashing import config_hash
from ..utils.io import DamagedFileError, atomic_write_json, read_json, remove_stale_temps

__all__ = [
    "EmptyStoreError",
    "PartStore",
    "ConfigMismatchError",
    "config_hash",
    "code_version",
    "OBJECT_STRIDE",
    "PART_STRIDE",
    "PART_CATEGORY",
    "empty_counts",
    "add_counts",
    "scan_shard",
    "read_span",
    "shard_summary",
]

FORMAT_VERSION = 1
OBJECT_STRIDE = 4096
PART_STRIDE = 64
PART_CATEGORY = {"id": 1, "name": "part", "supercategory": "part"}
# Compact, key-sorted JSON: identical inputs give identical bytes.
_JSON = {"sort_keys": True, "separators": (",", ":")}

logger = logging.getLogger(__name__)


class EmptyStoreError(RuntimeError):
    """A finished store holds no part at all: later stages would train on nothing."""


class ConfigMismatchError(RuntimeError):
    """The output directory holds shards mined with another configuration or inputs."""


def code_version():
    """``{"part_distill": __version__, "git_sha": sha or None}`` of the running code."""
    from .. import __version__

    sha = None
    try:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        sha = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"part_distill": __version__, "git_sha": sha}


def empty_counts():
    return {"images": 0, "images_skipped": {}, "instances": 0, "instances_skipped": {}, "parts": 0}


def add_counts(total, counts):
    """Add ``counts`` into ``total`` in place (nested reason dicts are summed per reason)."""
    for key, v in counts.items():
        if isinstance(v, dict):
            d = total.setdefault(key, {})
            for reason, n in v.items():
                d[reason] = d.get(reason, 0) + n
        else:
            total[key] = total.get(key, 0) + v
    return total


class PartStore:
    """Reads and writes one store directory (see the module docstring for the layout)."""

    RUN = "run.json"
    MANIFEST = "manifest.json"
    SHARDS = "shards"
    SUMMARIES = "summaries"
    STREAM_INDEX = "stream_index"

    def __init__(self, output_dir):
        if not output_dir:
            raise ValueError("the part store needs an output directory (MINING.OUTPUT_DIR or OUTPUT_DIR)")
        self.root = os.path.abspath(output_dir)

    # ------------------------------------------------------------ paths
    @staticmethod
    def shard_name(chunk):
        return f"shard_{chunk:05d}.json"

    def shard_path(self, chunk):
        return os.path.join(self.root, self.SHARDS, self.shard_name(chunk))

    def has_shard(self, chunk):
        return os.path.isfile(self.shard_path(chunk))

    def existing_shards(self):
        d = os.path.join(self.root, self.SHARDS)
        if not os.path.isdir(d):
            return []
        return sorted(f for f in os.listdir(d) if f.startswith("shard_") and f.endswith(".json"))

    # ------------------------------------------------------------ run stamp
    def read_run(self):
        try:
            return read_json(os.path.join(self.root, self.RUN), "the store's run stamp")
        except FileNotFoundError:
            return None

    def check_run(self, run_info, overwrite=False):
        """Raise :class:`ConfigMismatchError` unless shards on disk were mined with ``run_info``.

        Read-only, so every rank can call it before rank 0 changes anything.
        """
        if overwrite:
            return
        try:
            existing = self.read_run()
        except DamagedFileError as e:
            # Each shard carries its config hash: start_run checks those and re-makes the stamp.
            logger.warning("%s: it will be written again", e)
            return
        if existing is None:
            if self.existing_shards():
                raise ConfigMismatchError(
                    f"{self.root} holds shards but no {self.RUN}, so their configuration is unknown; "
                    "use a new MINING.OUTPUT_DIR or pass --overwrite")
            return
        if existing.get("config_hash") != run_info["config_hash"]:
            from ..data.fingerprint import check_same_inputs

            check_same_inputs(existing, run_info, self.root)  # names both fingerprints when the data changed
            old, new = existing.get("config", {}), run_info["config"]
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise ConfigMismatchError(
                f"{self.root} holds parts mined with another configuration (hash "
                f"{existing.get('config_hash')} vs {run_info['config_hash']}; differing: {diff[:10]}). "
                "Refusing to mix shards: use a new MINING.OUTPUT_DIR or pass --overwrite")

    def start_run(self, run_info, overwrite=False):
        """Main process only: clear the store if ``overwrite``, then stamp it with ``run_info``."""
        if overwrite:
            shutil.rmtree(os.path.join(self.root, self.SHARDS), ignore_errors=True)
            # The old shards' summaries and readers' caches (data/store_dataset.py).
            for d in (self.SUMMARIES, self.STREAM_INDEX):
                shutil.rmtree(os.path.join(self.root, d), ignore_errors=True)
            for name in (self.RUN, self.MANIFEST):
                if os.path.exists(os.path.join(self.root, name)):
                    os.unlink(os.path.join(self.root, name))
        os.makedirs(os.path.join(self.root, self.SHARDS), exist_ok=True)
        for d in ("", self.SHARDS, self.SUMMARIES):
            remove_stale_temps(os.path.join(self.root, d))
        self.remove_damaged_shards(run_info)
        try:
            stamped = self.read_run() is not None
        except DamagedFileError:
            stamped = False
        if not stamped:
            atomic_write_json(os.path.join(self.root, self.RUN), run_info, indent=1, sort_keys=True)

    def remove_damaged_shards(self, run_info):
        """Delete (and name) the shards that do not parse or hold another chunk, so they are re-made, and
        write the summary a complete shard lacks; returns the deleted names. A complete shard of another configuration raises ConfigMismatchError."""
        removed = []
        for name in self.existing_shards():
            path = os.path.join(self.root, self.SHARDS, name)
            try:
                shard = self.read_shard(name)
                info = shard["info"]
                ok = info["chunk"] == int(name[len("shard_"):-len(".json")]) and "counts" in shard
            except (DamagedFileError, KeyError, TypeError, ValueError) as e:
                ok, info = False, {}
                logger.warning("Shard %s is damaged (%s): deleted, it will be made again", path, e)
            else:
                if not ok:
                    logger.warning("Shard %s does not hold chunk %s: deleted, it will be made again", path, name)
            if ok and info.get("config_hash") != run_info["config_hash"]:
                raise ConfigMismatchError(f"{path} was made with another configuration (hash "
                                          f"{info.get('config_hash')} vs {run_info['config_hash']}); "
                                          "use a new output directory or pass --overwrite")
            if ok and not os.path.isfile(os.path.join(self.root, self.SUMMARIES, name)):
                # Killed between the shard and its summary: the rerun skips the shard, so write it here.
                atomic_write_json(os.path.join(self.root, self.SUMMARIES, name), shard_summary(shard), **_JSON)
            if not ok:
                os.unlink(path)
                with contextlib.suppress(FileNotFoundError):  # its summary describes the lost shard
                    os.unlink(os.path.join(self.root, self.SUMMARIES, name))
                removed.append(name)
        return removed

    # ------------------------------------------------------------ shards
    def summary_path(self, chunk):
        return os.path.join(self.root, self.SUMMARIES, self.shard_name(chunk))

    def write_shard(self, chunk, shard):
        atomic_write_json(self.shard_path(chunk), shard, **_JSON)
        # What the manifest needs of the shard, so writing it never re-reads the shards (terabytes at
        # ImageNet scale). Written second: a shard without one (killed in between, older stores) is read.
        atomic_write_json(self.summary_path(chunk), shard_summary(shard), **_JSON)

    def read_summary(self, chunk):
        """:func:`shard_summary` of a shard on disk, from its summary file (or the shard when it has none)."""
        try:
            with open(self.summary_path(chunk)) as f:
                return json.load(f)
        except (FileNotFoundError, ValueError):  # none yet, or damaged: the shard itself is the truth
            return shard_summary(self.read_shard(chunk))

    def read_shard(self, chunk_or_name):
        name = chunk_or_name if isinstance(chunk_or_name, str) else self.shard_name(chunk_or_name)
        return read_json(os.path.join(self.root, self.SHARDS, name),
                         "shard (delete it and rerun the job that wrote it to make it again)")

    def write_manifest(self, run_info, num_chunks, empty_hint=None):
        """Sum the counts of all ``num_chunks`` shards into manifest.json (main process, last).

        With ``empty_hint``, a store whose shards hold no part raises :class:`EmptyStoreError` (with the
        counts and the hint) and gets no manifest, so no later stage reads it as finished.
        """
        missing = [c for c in range(num_chunks) if not self.has_shard(c)]
        if missing:
            raise RuntimeError(f"cannot write the manifest of {self.root}: shards {missing[:10]} are missing")
        counts, shards = empty_counts(), []
        for c in range(num_chunks):
            summary = self.read_summary(c)
            if summary["config_hash"] != run_info["config_hash"]:
                raise ConfigMismatchError(f"{self.shard_path(c)} was mined with another configuration")
            add_counts(counts, summary["counts"])
            shards.append({"file": os.path.join(self.SHARDS, self.shard_name(c)),
                           "images": summary["images"], "parts": summary["parts"]})
        if empty_hint is not None and counts["parts"] == 0:
            raise EmptyStoreError(f"{self.root}: 0 parts in {num_chunks} shard(s) (counts {counts}); {empty_hint}. "
                                  "No manifest was written.")
        manifest = dict(run_info, format_version=FORMAT_VERSION, code_version=code_version(),
                        shards=shards, counts=counts)
        atomic_write_json(os.path.join(self.root, self.MANIFEST), manifest, indent=1, sort_keys=True)
        return manifest


def shard_summary(shard):
    """The part of a shard its manifest entry needs: config hash, image and part numbers, counts."""
    return {"config_hash": shard["info"]["config_hash"], "images": len(shard["images"]),
            "parts": len(shard["annotations"]), "counts": shard["counts"]}


def finish_store(store, run_info, num_chunks, what="Part store", empty_hint="check the inputs and the config"):
    """Collective end of a sharded store write: barrier, rank 0 writes the manifest, barrier.

    Returns the manifest on rank 0 and None elsewhere. A store with 0 parts raises
    :class:`EmptyStoreError` on every rank (``empty_hint`` says what to check; None allows it).
    """
    from detectron2.utils import comm

    comm.synchronize()
    manifest, error = None, None
    if comm.is_main_process():
        try:
            manifest = store.write_manifest(run_info, num_chunks, empty_hint=empty_hint)
            logger.info("%s in %s: %s", what, store.root, manifest["counts"])
        except EmptyStoreError as e:
            error = f"{what}: {e}"
    # The gather is the closing barrier and tells every rank to fail alike.
    error = comm.all_gather(error)[0] if comm.get_world_size() > 1 else error
    if error is not None:
        raise EmptyStoreError(error)
    return manifest


def read_manifest(path):
    """Load a manifest.json; ``path`` may be the file or its store directory."""
    if os.path.isdir(path):
        path = os.path.join(path, PartStore.MANIFEST)
    try:
        return read_json(path, "manifest (rerun the job that wrote it: finished shards are kept)")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no mined-parts manifest at {path}: run tools/mine_parts.py to completion first "
            "(the manifest is written after the last shard)") from None


# ---------------------------------------------------------------- reading shards by byte span
_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()
# Top-level lists of a shard whose elements scan_shard locates (one element = one image / part / object).
SPANNED_LISTS = ("images", "annotations", "objects")


def scan_shard(path):
    """Parse a shard once, also returning where each element of its SPANNED_LISTS lies in the file.

    Returns ``(shard, spans)``: ``shard`` is what ``json.load`` gives, ``spans[key]`` an int64 array
    [n, 2] of the byte (start, end) of element i of ``shard[key]``, so a reader can later decode one
    image's records alone (:func:`read_span`) instead of the whole shard.
    """
    with open(path, "rb") as f:
        data = f.read()
    # Stores are written ASCII-only (json's ensure_ascii); latin-1 keeps char offsets = byte offsets
    # otherwise, and the elements holding text are then decoded again from their bytes.
    ascii_only = data.isascii()
    text = data.decode("ascii" if ascii_only else "latin-1")
    shard, spans = {}, {}
    try:
        i = _WS.match(text, _expect(text, _WS.match(text, 0).end(), "{")).end()
        while text[i] != "}":
            key, i = _DECODER.raw_decode(text, i)
            i = _WS.match(text, _expect(text, _WS.match(text, i).end(), ":")).end()
            if key in SPANNED_LISTS and text[i] == "[":
                shard[key], spans[key], i = _scan_list(text, i)
                if not ascii_only:
                    shard[key] = [json.loads(data[s:e]) for s, e in spans[key]]
            else:
                start = i
                value, i = _DECODER.raw_decode(text, i)
                shard[key] = value if ascii_only else json.loads(data[start:i])
            i = _WS.match(text, i).end()
            if text[i] == ",":
                i = _WS.match(text, i + 1).end()
    except (IndexError, ValueError) as e:
        raise ValueError(f"{path} is not a valid store shard (JSON object expected): {e}") from None
    for key in SPANNED_LISTS:
        spans.setdefault(key, np.zeros((0, 2), np.int64))
        shard.setdefault(key, [])
    return shard, spans


def _expect(text, i, char):
    if text[i] != char:
        raise ValueError(f"{char!r} expected at byte {i}, found {text[i]!r}")
    return i + 1


def _scan_list(text, i):
    items, spans = [], []
    i = _WS.match(text, i + 1).end()
    while text[i] != "]":
        obj, end = _DECODER.raw_decode(text, i)
        items.append(obj)
        spans.append((i, end))
        i = _WS.match(text, end).end()
        if text[i] == ",":
            i = _WS.match(text, i + 1).end()
        elif text[i] != "]":
            raise ValueError(f"',' or ']' expected at byte {i}")
    return items, np.asarray(spans, np.int64).reshape(-1, 2), i + 1


def read_span(f, start, end):
    """The list of the consecutive elements in bytes [start, end) of an open shard file (see scan_shard)."""
    if end <= start:
        return []
    f.seek(start)
    return json.loads(b"[" + f.read(end - start) + b"]")
