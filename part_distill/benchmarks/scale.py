"""Scale benchmark of the whole-dataset steps on synthetic data (``tools/benchmark_scale.py``).

A step is one function ``step(case: dict, work_dir: str) -> dict`` plus one :func:`register_step`
entry naming its cases. Every case runs in its own subprocess, so the peak RSS reported (the child's
``ru_maxrss``) is that case's alone; the harness adds the child's wall time and CPU time (user + sys)
to whatever the step returns (phase timings, sizes, checks).
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

__all__ = ["STEPS", "register_step", "run_case", "main"]

# name -> {"fn": step function, "cases": {case name: case dict}, "default": [case names]}
STEPS = {}


def register_step(name, cases, default=None):
    """Decorator: ``cases`` {name: dict}; ``default`` the case names run when none is asked for."""
    def wrap(fn):
        STEPS[name] = {"fn": fn, "cases": dict(cases), "default": list(default or cases)}
        return fn
    return wrap


# ---------------------------------------------------------------- step: ranking
def _synthetic_chunk(c, rows, num_classes, dim, seed, k=8):
    """Chunk c of a synthetic candidate set: normalised 256-d features around k blobs per class.

    Class sizes follow a log-normal popularity (some classes far above the mean, as in ImageNet);
    blob centres come from a small pool of random directions indexed by a hash of (class, blob), so
    the generator holds no per-class table at 21K classes.
    """
    import numpy as np

    rng = np.random.default_rng([seed, c])
    pop = np.random.default_rng([seed, 10**9]).lognormal(0.0, 1.0, num_classes)
    pool = np.random.default_rng([seed, 10**9 + 1]).standard_normal((4096, dim)).astype(np.float32)
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    cls = rng.choice(num_classes, size=rows, p=pop / pop.sum())
    blob = rng.integers(0, k, rows)
    base = pool[(cls * 2654435761) % 4096]
    off = pool[((cls * k + blob) * 40503 + 17) % 4096]
    x = base + 0.6 * off + 0.15 * rng.standard_normal((rows, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    start = c * rows
    idx = np.arange(start, start + rows)
    keys = np.stack([idx // 8, np.zeros(rows, np.int64), idx % 8], 1)
    weights = rng.uniform(0.05, 1.0, rows).astype(np.float32)
    return x, cls, weights, keys


def _write_synthetic_store(root, candidates, num_classes, dim, chunk_rows, num_buckets, feature_dtype, seed):
    import math

    from ..mining.store import config_hash
    from ..engine.candidate_store import CandidateStore, write_candidate_chunks

    store = CandidateStore(root, min(num_buckets, num_classes), feature_dtype)
    num_chunks = int(math.ceil(candidates / chunk_rows))
    info = {"config": {"synthetic": [candidates, num_classes, dim, chunk_rows, seed], "dtype": feature_dtype}}
    info["config_hash"] = config_hash(info)

    def produce(c):
        rows = min(chunk_rows, candidates - c * chunk_rows)
        return _synthetic_chunk(c, rows, num_classes, dim, seed)

    write_candidate_chunks(store, info, num_chunks, produce, num_classes)
    return store, num_chunks


def _fit(store, num_chunks, num_classes, out, case, seed=0):
    from ..engine.ranking import fit_store_prototypes

    return fit_store_prototypes(store, num_chunks, num_classes, case.get("k", 8), out, seed=seed,
                                min_candidates=case.get("min_candidates", 8), max_iter=case.get("max_iter", 100),
                                max_samples=case.get("max_samples", 4096))


def _timed(fn, *args):
    t, c = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, round(time.perf_counter() - t, 2), round(time.process_time() - c, 2)


@register_step("ranking", cases={
    "tiny": {"candidates": 3000, "classes": 40, "chunk_rows": 500},
    "50k_x_50": {"candidates": 50_000, "classes": 50},
    "50k_x_200": {"candidates": 50_000, "classes": 200},
    "50k_x_800": {"candidates": 50_000, "classes": 800},
    "400k_x_50": {"candidates": 400_000, "classes": 50},
    "100k_x_21k": {"candidates": 100_000, "classes": 21_000},
    "1M_x_21k": {"candidates": 1_000_000, "classes": 21_000},
}, default=["50k_x_50", "50k_x_200", "50k_x_800", "400k_x_50", "100k_x_21k", "1M_x_21k"])
def ranking_step(case, work_dir):
    """Class-specific ranking: synthetic candidates written to a CandidateStore, then the prototype fit
    (one process, world size 1). ``fit_s`` is the ranking itself; ``generate_s`` writes the store."""
    dim, chunk = case.get("dim", 256), case.get("chunk_rows", 10_000)
    (store, n), gen_s, gen_cpu = _timed(
        _write_synthetic_store, os.path.join(work_dir, "candidates"), case["candidates"], case["classes"], dim,
        chunk, case.get("num_buckets", 32), case.get("feature_dtype", "float16"), 0)
    (protos, report), fit_s, fit_cpu = _timed(_fit, store, n, case["classes"], work_dir, case)
    return {"generate_s": gen_s, "fit_s": fit_s, "fit_cpu_s": fit_cpu, "classes_fitted": len(protos),
            "classes_fitted_on_a_sample": report["classes_fitted_on_a_sample"], "chunks": n}


@register_step("ranking_fp16", cases={
    "tiny": {"candidates": 3000, "classes": 10, "chunk_rows": 1000},
    "50k_x_200": {"candidates": 50_000, "classes": 200},
}, default=["50k_x_200"])
def ranking_fp16_step(case, work_dir):
    """Prototype difference between float16 and float32 candidate storage (same candidates, same seeds)."""
    import numpy as np
    import torch

    dim, chunk = case.get("dim", 256), case.get("chunk_rows", 10_000)
    out, stores = {}, {}
    for dt in ("float32", "float16"):
        d = os.path.join(work_dir, dt)
        stores[dt] = _write_synthetic_store(os.path.join(d, "candidates"), case["candidates"], case["classes"], dim,
                                            chunk, 32, dt, 0)
        out[dt] = _fit(*stores[dt], case["classes"], d, case)[0]
    # The yardstick: the same fp32 candidates fitted with another k-means seed.
    out["seed1"] = _fit(*stores["float32"], case["classes"], os.path.join(work_dir, "seed1"), case, seed=1)[0]
    a, b, s1 = out["float32"], out["float16"], out["seed1"]
    same_k = [c for c in sorted(set(a) & set(b)) if a[c].shape == b[c].shape == s1[c].shape]
    diff = np.concatenate([(a[c] - b[c]).abs().flatten().numpy() for c in same_k])
    norm = float(np.mean([a[c].norm(dim=1).mean() for c in same_k]))
    # What labelling sees: the prototype each fp32 candidate is nearest to, under either fit.
    store, n = stores["float32"]
    agree = agree_seed = total = 0
    for c in range(n):
        rows = store.read_rows(c, 0, store.read_index(c)["rows"])
        keep = np.isin(rows["cls"], same_k)
        x, cls = torch.from_numpy(rows["feature"][keep]), rows["cls"][keep]
        for cl in np.unique(cls):
            xs = x[cls == cl]
            near = torch.cdist(xs, a[cl]).argmin(1)
            agree += int((near == torch.cdist(xs, b[cl]).argmin(1)).sum())
            # seeds permute cluster ids: compare co-membership through the best one-to-one matching
            agree_seed += _matched_agreement(near.numpy(), torch.cdist(xs, s1[cl]).argmin(1).numpy(), len(a[cl]))
            total += len(xs)
    return {"classes_compared": len(same_k), "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "mean_center_norm": round(norm, 4), "same_nearest_prototype": round(agree / max(total, 1), 5),
            "same_nearest_prototype_other_seed": round(agree_seed / max(total, 1), 5)}


# ---------------------------------------------------------------- step: train_loader
_LOADER_CASES = {
    "tiny": {"images": 300, "batches": 10},
    "1e3": {"images": 1_000, "batches": 100},
    "1e4": {"images": 10_000, "batches": 100},
    "1e5": {"images": 100_000, "batches": 100},
}


@register_step("train_loader", _LOADER_CASES, default=["1e3", "1e4", "1e5"])
def train_loader_step(case, work_dir):
    """Training from a part store: a synthetic N-image store in the real format, then a fresh process
    builds the trainer's loader (streaming, DATALOADER.NUM_WORKERS 0) and draws the batches twice:
    once scanning the shards, once from the cached index. The loader's own peak RSS is reported
    (``loader_*``); the harness's peak RSS here is the store generation's."""
    from ..data.store_simulation import measure_train_loader, write_synthetic_store

    t0 = time.perf_counter()
    manifest = write_synthetic_store(os.path.join(work_dir, "store"), case["images"])
    out = {"generate_s": round(time.perf_counter() - t0, 1)}
    for label in ("scan", "cached"):
        r = measure_train_loader(manifest, case["batches"])
        out[f"loader_{label}_peak_rss_mb"] = r["peak_rss_mb"]
        out[f"loader_{label}_growth_mb"] = round(r["peak_rss_mb"] - r["rss_before_build_mb"], 1)
        out[f"loader_{label}_build_s"] = r["build_s"]
    out["draw_s"] = r["draw_s"]
    return out


def _matched_agreement(u, v, k):
    """Points labelled alike by u and v once v's ids are matched one-to-one to u's (Hungarian)."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    m = np.zeros((k, k), np.int64)
    np.add.at(m, (u, v), 1)
    r, c = linear_sum_assignment(-m)
    return int(m[r, c].sum())


# ---------------------------------------------------------------- harness
def run_case(step, case_name, work_root, keep=False):
    """Run one case of one step in a subprocess; returns its row (step metrics + wall, CPU, peak RSS)."""
    case = STEPS[step]["cases"][case_name]
    work = tempfile.mkdtemp(prefix=f"{step}_{case_name}_", dir=work_root)
    cmd = [sys.executable, "-m", "part_distill.benchmarks.scale", "--child", step, "--case-json",
           json.dumps(case), "--work-dir", work]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    # Peak RSS and CPU come from the child itself (its RUSAGE_SELF at the end): per case, not cumulative.
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"step {step} case {case_name} failed (exit {proc.returncode}):\n{err[-4000:]}")
    res = json.loads(out.strip().splitlines()[-1])
    return {"step": step, "case": case_name, **case, **res, "wall_s": round(wall, 2)}


def _child(step, case, work_dir):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import logging

    logging.basicConfig(level=logging.WARNING)
    res = STEPS[step]["fn"](case, work_dir)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    res.update(cpu_s=round(ru.ru_utime + ru.ru_stime, 2), peak_rss_mb=round(ru.ru_maxrss / 1024, 1))
    print(json.dumps(res), flush=True)


def format_table(rows):
    """Markdown table of result rows (columns: the union of their keys, in first-seen order)."""
    cols = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", default="ranking", help=f"comma-separated steps of {sorted(STEPS)}")
    p.add_argument("--cases", default="", help="comma-separated case names (default: each step's defaults)")
    p.add_argument("--work-dir", default="", help="scratch directory (default: a new temp directory)")
    p.add_argument("--output", default="", help="also write the rows as JSON here")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    p.add_argument("--case-json", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return _child(args.child, json.loads(args.case_json), args.work_dir)
    steps = [s for s in args.steps.split(",") if s]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        p.error(f"unknown --steps {unknown}; known: {sorted(STEPS)}")
    root = args.work_dir or tempfile.mkdtemp(prefix="part_distill_scale_")
    os.makedirs(root, exist_ok=True)
    rows = []
    for step in steps:
        names = [c for c in args.cases.split(",") if c] or STEPS[step]["default"]
        bad = [c for c in names if c not in STEPS[step]["cases"]]
        if bad:
            p.error(f"step {step} has no cases {bad}; known: {sorted(STEPS[step]['cases'])}")
        for name in names:
            rows.append(run_case(step, name, root))
            print(json.dumps(rows[-1]), flush=True)
    load = os.getloadavg()
    print(f"\nload average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs\n")
    print(format_table(rows))
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"rows": rows, "loadavg": load, "cpus": os.cpu_count()}, f, indent=1)
    if not args.work_dir:
        shutil.rmtree(root, ignore_errors=True)
    return rows


if __name__ == "__main__":
    main()
