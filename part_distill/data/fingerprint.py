"""Dataset fingerprints: which version of a dataset a store, label round, ranking or checkpoint came from.

A fingerprint is a short string that changes whenever the data behind a registered name changes:

    world:<key>/<split>            a generated parts world; <key> hashes its settings and is its folder name
    files:<hash>                   a real dataset: hash of its annotation files' relative paths, sizes
                                   and SHA-256 (cached by path + size + mtime, so cheap after the first time)
    store:<config hash>            pseudo-labels read from a part store (the store's manifest records the
                                   fingerprints of the datasets it was made from, so this hash covers them)
    <source>|fewshot:<pct>,<seed>[,balanced]   a few-shot subset of <source>
    dicts:<hash>                   any other registered dataset: hash of its dicts (file names reduced to
                                   base names and nested ``parts`` left out, so ``X`` and ``X_parts`` agree)

The instance and part views of one split (``parts_world_val`` / ``parts_world_val_parts``, the
real ``*_parts`` names) read the same files and share a fingerprint; different splits do not.

Writers record them (store manifests' ``inputs.datasets[].fingerprint``, round.json, ranking_report.json,
every checkpoint's ``data_fingerprints``); evaluation, resume and the next stage call the
``check_*`` functions, which raise :class:`FingerprintMismatchError` naming both fingerprints.
Records made before fingerprints existed are accepted with a warning.
"""
import json
import logging
import os

from detectron2.data import DatasetCatalog, MetadataCatalog

from ..utils.hashing import config_hash, file_sha256
from ..utils.io import atomic_write_json

__all__ = ["FingerprintMismatchError", "register_fingerprint_sources", "dataset_fingerprint", "dataset_summary",
           "source_fingerprints", "checkpoint_fingerprints", "files_fingerprint", "CHECKPOINT_KEY",
           "check_store_dataset", "check_store_sources", "check_same_inputs", "check_resume", "check_sources"]

logger = logging.getLogger(__name__)

# Key of the fingerprints in a checkpoint file (saved via Checkpointer.save(name, **extra)).
CHECKPOINT_KEY = "data_fingerprints"
# Where file hashes are cached across processes (a cache: losing it costs one re-hash).
CACHE_ENV = "PART_DISTILL_CACHE_DIR"

_SOURCES = {}  # dataset name -> callable returning the annotation files/folders it is read from
_file_hashes = None  # "abspath|size|mtime_ns" -> sha, loaded from the cache file on first use
_unsaved = False  # hashes computed since the cache file was last written


class FingerprintMismatchError(RuntimeError):
    """Work made from one version of a dataset met another version of it."""


def register_fingerprint_sources(name, paths_fn):
    """Fingerprint dataset ``name`` by the files ``paths_fn()`` returns (files or folders, resolved late)."""
    _SOURCES[name] = paths_fn


# ---------------------------------------------------------------- file hashes
def _cache_path():
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "part_distill")
    return os.path.join(root, "file_hashes.json")


def _cached_sha(path):
    global _file_hashes, _unsaved
    if _file_hashes is None:
        try:
            with open(_cache_path()) as f:
                _file_hashes = json.load(f)
        except (OSError, ValueError):
            _file_hashes = {}
    st = os.stat(path)
    key = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"
    sha = _file_hashes.get(key)
    if sha is None:
        sha = _file_hashes[key] = file_sha256(path)
        _unsaved = True
    return st.st_size, sha


def _save_cache():
    global _unsaved
    if _unsaved:
        _unsaved = False
        try:
            atomic_write_json(_cache_path(), _file_hashes)
        except OSError as e:  # read-only home: fingerprints stay correct, only slower next time
            logger.debug("could not write the fingerprint cache %s: %s", _cache_path(), e)


def files_fingerprint(paths):
    """``files:<hash>`` of files and folders (every file below, by relative path, size and SHA-256)."""
    entries = []
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(f"cannot fingerprint {path!r}: it does not exist")
        if os.path.isdir(path):
            files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
            entries.append([os.path.basename(path.rstrip(os.sep)),
                            [[os.path.relpath(f, path), *_cached_sha(f)] for f in files]])
        else:
            entries.append([os.path.basename(path), *_cached_sha(path)])
    _save_cache()
    return f"files:{config_hash(entries)}"


# ---------------------------------------------------------------- fingerprints of registered names
def _dicts_fingerprint(dicts):
    def plain(d):
        d = dict(d)
        if "file_name" in d:
            d["file_name"] = os.path.basename(d["file_name"])
        if "annotations" in d:
            d["annotations"] = [{k: v for k, v in a.items() if k != "parts"} for a in d["annotations"]]
        return d

    return "dicts:" + config_hash(json.loads(json.dumps([plain(d) for d in dicts], default=str)))


def dataset_fingerprint(name, dicts=None):
    """The fingerprint of registered dataset ``name`` (see the module docstring); ``dicts``: its
    already loaded dicts, used (instead of loading them again) when nothing cheaper identifies it."""
    meta = MetadataCatalog.get(name)
    few_shot = meta.get("few_shot")
    if few_shot:
        spec = f"{few_shot['percent']:g},{few_shot['seed']}" + (",balanced" if few_shot["balanced"] else "")
        return f"{dataset_fingerprint(few_shot['source'])}|fewshot:{spec}"
    if meta.get("part_targets_of"):
        return dataset_fingerprint(meta.part_targets_of)
    if meta.get("pseudo_label_manifest"):
        from ..mining.store import read_manifest

        return f"store:{read_manifest(meta.pseudo_label_manifest)['config_hash']}"
    if meta.get("world_key"):
        return f"world:{meta.world_key}/{meta.world_split}"
    if name in _SOURCES:
        return files_fingerprint(_SOURCES[name]())
    if meta.get("json_file"):  # detectron2's register_coco_instances
        return files_fingerprint([meta.json_file])
    return _dicts_fingerprint(DatasetCatalog.get(name) if dicts is None else dicts)


def dataset_summary(name, dicts):
    """What a store's manifest records of one input dataset: name, image count, fingerprint."""
    return {"name": name, "num_images": len(dicts), "fingerprint": dataset_fingerprint(name, dicts)}


def source_fingerprints(names):
    """``{dataset: fingerprint}`` of the datasets behind ``names``: a pseudo-label set is replaced by
    what its store's manifest records it was made from, so a chain of stages stays comparable."""
    out = {}
    for name in names:
        manifest_path = MetadataCatalog.get(name).get("pseudo_label_manifest")
        if manifest_path:
            from ..mining.store import read_manifest

            for d in read_manifest(manifest_path).get("inputs", {}).get("datasets", []):
                if d.get("fingerprint"):
                    out[d["name"]] = d["fingerprint"]
        else:
            out[name] = dataset_fingerprint(name)
    return out


def checkpoint_fingerprints(names):
    """The ``data_fingerprints`` entry of a checkpoint trained (or fitted) on datasets ``names``."""
    return {"datasets": {n: dataset_fingerprint(n) for n in names}, "sources": source_fingerprints(names)}


# ---------------------------------------------------------------- checks
def _recorded_inputs(manifest):
    return {d["name"]: d.get("fingerprint") for d in manifest.get("inputs", {}).get("datasets", [])}


def check_store_dataset(manifest, dataset_name, store):
    """Evaluation: the store at ``store`` must have been made from the version of ``dataset_name`` now registered."""
    recorded = _recorded_inputs(manifest)
    known = {n: fp for n, fp in recorded.items() if fp}
    if not known:
        logger.warning("%s records no dataset fingerprint (made before fingerprints existed): cannot check "
                       "that it was made from %s as registered now", store, dataset_name)
        return
    current = dataset_fingerprint(dataset_name)
    if current not in known.values():
        made = ", ".join(f"{n} (fingerprint {fp})" for n, fp in sorted(known.items()))
        raise FingerprintMismatchError(
            f"{store} was made from {made}, but {dataset_name} now has fingerprint {current}: its parts "
            "belong to other images or annotations. Evaluate it against the dataset it was made from "
            "(e.g. the PARTS_WORLD.* settings it was mined with) or make the store again")


def check_store_sources(manifest, store):
    """Next stage: every dataset a store was made from must still have the fingerprint recorded."""
    for name, recorded in sorted(_recorded_inputs(manifest).items()):
        if not recorded:
            logger.warning("%s records no fingerprint of %s (made before fingerprints existed)", store, name)
            continue
        current = dataset_fingerprint(name)
        if current != recorded:
            raise FingerprintMismatchError(
                f"{store} was made from {name} with fingerprint {recorded}, but {name} now has fingerprint "
                f"{current} (other PARTS_WORLD.* settings or changed annotation files?): refusing to train on "
                "it. Use the settings it was made with, or make the store again")


def check_same_inputs(existing, run_info, where):
    """Resume of a store: the datasets being read must be the versions its finished shards were made from."""
    old, new = _recorded_inputs(existing), _recorded_inputs(run_info)
    for name in sorted(set(old) & set(new)):
        if old[name] and new[name] and old[name] != new[name]:
            raise FingerprintMismatchError(
                f"{where} holds shards made from {name} with fingerprint {old[name]}, but {name} now has "
                f"fingerprint {new[name]}: refusing to mix them. Use a new output folder or pass --overwrite")


def check_sources(recorded, current, what):
    """``recorded`` / ``current``: ``{dataset: fingerprint}``; every dataset in both must agree."""
    for name in sorted(set(recorded or {}) & set(current)):
        if recorded[name] != current[name]:
            raise FingerprintMismatchError(
                f"{what} was made from {name} with fingerprint {recorded[name]}, but {name} now has "
                f"fingerprint {current[name]}: refusing to continue on other data")


def check_resume(recorded, current, checkpoint):
    """Resume of training: ``checkpoint``'s ``data_fingerprints`` must equal those of the data now configured."""
    if not recorded:
        logger.warning("%s records no dataset fingerprints (saved before they existed): resuming unchecked",
                       checkpoint)
        return
    old, new = recorded.get("datasets", {}), current.get("datasets", {})
    if old != new:
        diff = ", ".join(f"{n}: {old.get(n)} in the checkpoint, {new.get(n)} now"
                         for n in sorted(set(old) | set(new)) if old.get(n) != new.get(n))
        raise FingerprintMismatchError(
            f"cannot resume from {checkpoint}: it was trained on other data ({diff}). Use a new OUTPUT_DIR "
            "or the datasets it was trained on")
