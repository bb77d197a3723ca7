"""Subprocess of tests/test_ranking.py's SIGKILL test: write a synthetic candidate store and fit it.

Prints "ready" once imported (the parent times its kill from there) and, at the end, the seconds
the work took. Everything it writes is under argv[1].
"""
import os
import sys
import time

import numpy as np

from part_distill.engine.candidate_store import CandidateStore, write_candidate_chunks
from part_distill.engine.ranking import fit_store_prototypes
from part_distill.mining.store import config_hash
from part_distill.utils.io import atomic_write_json

NUM_CLASSES, DIM, ROWS, CHUNKS, K = 24, 32, 150, 30, 4


def produce(c):
    rng = np.random.default_rng([7, c])
    cls = rng.integers(0, NUM_CLASSES, ROWS)
    x = rng.standard_normal((ROWS, DIM)).astype(np.float32) + cls[:, None] % 5
    idx = np.arange(c * ROWS, (c + 1) * ROWS)
    keys = np.stack([idx // 4, np.zeros(ROWS, np.int64), idx % 4], 1)
    return x, cls, rng.uniform(0.1, 1.0, ROWS), keys


def main(out):
    print("ready", flush=True)
    t0 = time.perf_counter()
    store = CandidateStore(os.path.join(out, "candidates"), 12, "float16")
    info = {"config": {"driver": 1}}
    info["config_hash"] = config_hash(info)
    write_candidate_chunks(store, info, CHUNKS, produce, NUM_CLASSES)
    protos, report = fit_store_prototypes(store, CHUNKS, NUM_CLASSES, K, out, seed=5, min_candidates=2,
                                          max_samples=100)
    atomic_write_json(os.path.join(out, "report.json"), dict(
        report, prototypes={str(c): v.tolist() for c, v in sorted(protos.items())}), sort_keys=True)
    print(f"work_s {time.perf_counter() - t0:.3f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
