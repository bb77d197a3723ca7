"""Subprocess of tests/test_ranking.py's SIGKILL test: write a synthetic candidate store and fit it.

Prints "ready" once imported and "progress" after every chunk and bucket it writes (the parent
kills it a random moment after one of them). Everything it writes is under argv[1].
"""
import os
import sys
import types

import numpy as np

# The package __init__ registers every model and dataset (seconds of imports per launch, and the
# test launches this 7 times); the modules used here need none of it.
_root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "part_distill")
for _name in ("part_distill", "part_distill.engine", "part_distill.mining"):
    _path = os.path.join(_root, *_name.split(".")[1:])
    sys.modules[_name] = types.ModuleType(_name)
    sys.modules[_name].__path__ = [_path]

from part_distill.engine import candidate_store, ranking  # noqa: E402
from part_distill.engine.candidate_store import CandidateStore, write_candidate_chunks  # noqa: E402
from part_distill.engine.ranking import fit_store_prototypes  # noqa: E402
from part_distill.mining.store import config_hash  # noqa: E402
from part_distill.utils.io import atomic_write_json, remove_stale_temps  # noqa: E402

NUM_CLASSES, DIM, ROWS, CHUNKS, K = 24, 32, 300, 10, 4


def produce(c):
    rng = np.random.default_rng([7, c])
    cls = rng.integers(0, NUM_CLASSES, ROWS)
    x = rng.standard_normal((ROWS, DIM)).astype(np.float32) + cls[:, None] % 5
    idx = np.arange(c * ROWS, (c + 1) * ROWS)
    keys = np.stack([idx // 4, np.zeros(ROWS, np.int64), idx % 4], 1)
    return x, cls, rng.uniform(0.1, 1.0, ROWS), keys


def _progress(n):
    print("progress", flush=True)


def main(out):
    candidate_store._after_chunk_hook = ranking._after_bucket_hook = _progress
    print("ready", flush=True)
    remove_stale_temps(out)  # a kill during report.json (run_ranking does the same for OUTPUT_DIR)
    store = CandidateStore(os.path.join(out, "candidates"), 12, "float16")
    info = {"config": {"driver": 1}}
    info["config_hash"] = config_hash(info)
    write_candidate_chunks(store, info, CHUNKS, produce, NUM_CLASSES)
    protos, report = fit_store_prototypes(store, CHUNKS, NUM_CLASSES, K, out, seed=5, min_candidates=2,
                                          max_samples=100)
    atomic_write_json(os.path.join(out, "report.json"), dict(
        report, prototypes={str(c): v.tolist() for c, v in sorted(protos.items())}), sort_keys=True)
    print("done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
