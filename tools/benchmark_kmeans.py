#!/usr/bin/env python
"""Time our batched k-means against per-instance scikit-learn KMeans on identical features.

The reference implementation mined parts with ``sklearn.cluster.KMeans`` one instance at a time;
this benchmark runs both on the same random features (k=4, n_init=1, same iteration cap) and
prints instances/s and the speedup, plus the mean inertia of both as a sanity check.

  python tools/benchmark_kmeans.py                                  # CPU: 200 x 1024 px x 256 dims
  python tools/benchmark_kmeans.py --device cuda --instances 2000 --dims 1152 --skip-sklearn
"""
import argparse
import time

import numpy as np
import torch

from part_distill.mining.kmeans import batched_kmeans


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ours(feats, args, device):
    kw = dict(k=args.k, metric=args.metric, max_iter=args.iters, tol=args.tol, seed=0,
              distance_dtype=args.distance_dtype or None)
    batched_kmeans(feats[: min(8, len(feats))], **kw)  # warm-up (allocator, kernels)
    times, cpu = [], []
    for _ in range(args.repeats):
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        res = batched_kmeans(feats, **kw)
        _sync(device)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return min(times), min(cpu), res


def _time_sklearn(feats_np, args):
    from sklearn.cluster import KMeans

    n = min(args.sklearn_instances or len(feats_np), len(feats_np))
    inertias = []
    t0, c0 = time.perf_counter(), time.process_time()
    for x in feats_np[:n]:
        if args.metric == "cosine":
            # The reference fitted on raw features; normalise so both optimise the same objective.
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        km = KMeans(args.k, n_init=1, max_iter=args.iters, tol=args.tol, random_state=0).fit(x)
        inertias.append(km.inertia_)
    return (time.perf_counter() - t0) / n, (time.process_time() - c0) / n, float(np.mean(inertias)), n


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--instances", type=int, default=200)
    p.add_argument("--pixels", type=int, default=1024)
    p.add_argument("--dims", type=int, default=256)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--metric", default="l2", choices=["l2", "cosine"],
                   help="l2 compares like for like with sklearn; cosine times the mining default")
    p.add_argument("--distance-dtype", default="", help="e.g. float16 / bfloat16 (GPU only)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for both torch and sklearn (0 = library defaults)")
    p.add_argument("--skip-sklearn", action="store_true")
    p.add_argument("--sklearn-instances", type=int, default=0,
                   help="time sklearn on this many instances only (0 = all) and extrapolate per instance")
    args = p.parse_args()

    device = torch.device(args.device)
    limiter = None
    if args.threads:
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(args.threads)
        limiter = threadpool_limits(args.threads)  # sklearn's OpenMP/BLAS pools
    g = torch.Generator().manual_seed(0)
    # Clustered features (a few prototypes + noise), like real part features, not pure noise.
    protos = torch.randn(args.instances, 6, args.dims, generator=g)
    which = torch.randint(0, 6, (args.instances, args.pixels), generator=g)
    feats = protos.gather(1, which[:, :, None].expand(-1, -1, args.dims))
    feats = feats + 0.5 * torch.randn(feats.shape, generator=g)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}; "
          f"{args.instances} instances x {args.pixels} px x {args.dims} dims, k={args.k}, "
          f"max {args.iters} iterations, metric {args.metric}")
    # CPU time (all threads) is reported beside wall time: on a shared machine it is the stabler one.
    t_ours, cpu_ours, res = _time_ours(feats.to(device), args, device)
    ours_ips = args.instances / t_ours
    print(f"ours (batched torch): {t_ours:.3f} s wall ({cpu_ours:.3f} s CPU), {ours_ips:,.0f} instances/s, "
          f"mean inertia {res.inertia.mean().item():.4f}, mean iterations {res.n_iter.float().mean().item():.1f}")
    if args.skip_sklearn:
        return
    per_inst, cpu_inst, sk_inertia, n = _time_sklearn(feats.numpy(), args)
    sk_ips = 1.0 / per_inst
    print(f"sklearn KMeans per instance (n_init=1, timed on {n}): {per_inst * args.instances:.3f} s wall "
          f"({cpu_inst * args.instances:.3f} s CPU) for {args.instances}, {sk_ips:,.0f} instances/s, "
          f"mean inertia {sk_inertia:.4f}")
    print(f"speedup: {ours_ips / sk_ips:.1f}x wall, {cpu_inst * args.instances / cpu_ours:.1f}x CPU time")
    if limiter is not None:
        limiter.restore_original_limits()


if __name__ == "__main__":
    main()
