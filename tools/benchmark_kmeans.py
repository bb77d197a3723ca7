#!/usr/bin/env python
"""Our batched k-means against per-instance scikit-learn KMeans, both against this machine's roofline.

The reference implementation mined parts with ``sklearn.cluster.KMeans`` one instance at a time.
Each case (feature width x metric) clusters the same clustered random features with both (k=4,
n_init=1, same iteration cap and tolerance) and prints, from one run:

  * the machine's limits measured in the same run: stream read bandwidth (1 GiB buffer), fp32
    matmul peak, and the time to read this case's features once; the load average before/after;
  * ours and scikit-learn: wall and CPU seconds, instances/s, mean inertia on the same instances;
  * the speedup (wall and CPU time) and each one's roofline fraction = limit / time, where the
    limit is max(bandwidth term, compute term):
      - bandwidth term: one read of the features per Lloyd iteration plus one for the seeding
        (``(mean iterations + 1) x read time``), the one-pass-per-iteration design;
      - compute term: the flops k-means must do (greedy k-means++: (1 + (k-1) t) point-center
        products; per Lloyd iteration k products + the center sums) at the fp32 matmul peak.
    The 1-pass floor (features read once, as when they stay in cache) is printed beside it.

  python tools/benchmark_kmeans.py                       # CPU: 200 x 1024 px, 256 and 1152 d, l2
  python tools/benchmark_kmeans.py --metrics l2,cosine --json out.json
  python tools/benchmark_kmeans.py --backend torch        # the torch path instead of part_distill._C
  python tools/benchmark_kmeans.py --device cuda --instances 2000 --dims 1152 --sklearn-instances 100
"""
import argparse
import time

import numpy as np
import torch

from part_distill.mining.kmeans import batched_kmeans, kmeans_flops
from part_distill.utils.native import native_status
from part_distill.utils.roofline import MachineLimits, load_average, roofline, write_report, stream_read_time, sync


def _features(n, pixels, dims, device, seed=0):
    """Clustered features (6 prototypes + noise per instance), like part features, not pure noise."""
    g = torch.Generator(device=device).manual_seed(seed)
    protos = torch.randn(n, 6, dims, generator=g, device=device)
    which = torch.randint(0, 6, (n, pixels), generator=g, device=device)
    feats = protos.gather(1, which[:, :, None].expand(-1, -1, dims))
    return feats.add_(torch.randn(feats.shape, generator=g, device=device), alpha=0.5)


def _run_ours(feats, args, metric):
    kw = dict(k=args.k, metric=metric, max_iter=args.iters, tol=args.tol, seed=0,
              distance_dtype=args.distance_dtype or None, backend=args.backend)
    sync(feats.device)
    t0, c0 = time.perf_counter(), time.process_time()
    res = batched_kmeans(feats, **kw)
    sync(feats.device)
    return time.perf_counter() - t0, time.process_time() - c0, res


def _run_sklearn(feats_np, args, metric):
    from sklearn.cluster import KMeans

    inertias = []
    t0, c0 = time.perf_counter(), time.process_time()
    for x in feats_np:
        if metric == "cosine":
            # The reference fitted on raw features; normalise so both optimise the same objective.
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        km = KMeans(args.k, n_init=1, max_iter=args.iters, tol=args.tol, random_state=0).fit(x)
        inertias.append(km.inertia_)
    return time.perf_counter() - t0, time.process_time() - c0, float(np.mean(inertias))


def run_case(dims, metric, args, device, limits):
    load0 = load_average()
    feats = _features(args.instances, args.pixels, dims, device)
    t_read = stream_read_time(feats)
    n_sk = min(args.sklearn_instances or args.instances, args.instances)
    feats_np = None if args.skip_sklearn else feats[:n_sk].cpu().numpy()
    _run_ours(feats[: min(8, args.instances)], args, metric)  # warm-up (allocator, kernels)
    ours, sk = [], []
    # Interleaved so a change of load hits both; the minimum of each is kept.
    for r in range(args.repeats):
        # The read time is re-measured beside each run (minimum kept): the limit tracks the load too.
        t_read = min(t_read, stream_read_time(feats, repeats=1))
        ours.append(_run_ours(feats, args, metric))
        if feats_np is not None and r < args.sklearn_repeats:
            sk.append(_run_sklearn(feats_np, args, metric))
    wall, cpu, res = min(ours, key=lambda v: v[0])
    n_iter = res.n_iter.float().mean().item()
    nbytes = feats.numel() * feats.element_size()
    flops = kmeans_flops(args.instances * args.pixels, dims, args.k, n_iter)
    design = roofline(wall, flops=flops, peak=limits.peak, read_seconds=(n_iter + 1) * t_read)
    case = {
        "instances": args.instances, "pixels": args.pixels, "dims": dims, "k": args.k, "metric": metric,
        "max_iter": args.iters, "distance_dtype": args.distance_dtype or "float32",
        "feature_bytes": nbytes, "read_once_s": t_read, "read_GBps": nbytes / t_read / 1e9, "flops": flops,
        "ours": {"wall_s": wall, "cpu_s": cpu, "inst_per_s": args.instances / wall,
                 "mean_inertia": res.inertia[:n_sk].mean().item(), "mean_iterations": n_iter,
                 "feature_passes": wall / t_read, "roofline": design,
                 "one_pass_floor_fraction": max(t_read, design["compute_s"]) / wall},
    }
    if sk:
        sk_wall, sk_cpu, sk_inertia = min(sk, key=lambda v: v[0])
        per = args.instances / n_sk  # extrapolated to all instances
        case["sklearn"] = {"wall_s": sk_wall * per, "cpu_s": sk_cpu * per, "inst_per_s": n_sk / sk_wall,
                           "timed_instances": n_sk, "mean_inertia": sk_inertia,
                           "roofline_fraction": design["limit_s"] / (sk_wall * per)}
        case["speedup_wall"] = case["sklearn"]["wall_s"] / wall
        case["speedup_cpu"] = case["sklearn"]["cpu_s"] / cpu
        if metric == "l2":  # cosine: sklearn's l2 on unit vectors is a different objective
            case["inertia_ratio"] = case["ours"]["mean_inertia"] / sk_inertia
    case["load_average"] = {"before": load0, "after": load_average()}
    return case


def _print_case(c):
    o = c["ours"]
    rf = o["roofline"]
    print(f"\n{c['instances']} instances x {c['pixels']} px x {c['dims']} d, k={c['k']}, metric {c['metric']}, "
          f"max {c['max_iter']} iterations, distances {c['distance_dtype']}; load {c['load_average']['before']}"
          f" -> {c['load_average']['after']}")
    print(f"  features {c['feature_bytes'] / 1e6:.0f} MB, read once in {1e3 * c['read_once_s']:.1f} ms "
          f"({c['read_GBps']:.1f} GB/s); {c['flops'] / 1e9:.1f} GFLOP")
    print(f"  ours    {o['wall_s']:.3f} s wall ({o['cpu_s']:.3f} s CPU), {o['inst_per_s']:,.0f} inst/s, "
          f"mean inertia {o['mean_inertia']:.4f}, {o['mean_iterations']:.1f} iterations, "
          f"= {o['feature_passes']:.1f} feature reads")
    print(f"          roofline: limit {1e3 * rf['limit_s']:.1f} ms ({rf['bound']}-bound: "
          f"{o['mean_iterations'] + 1:.1f} reads {1e3 * rf['bandwidth_s']:.1f} ms, compute {1e3 * rf['compute_s']:.1f} ms)"
          f" -> {100 * rf['fraction']:.0f} % of the limit; {100 * o['one_pass_floor_fraction']:.0f} % of the "
          f"1-read floor")
    if "sklearn" in c:
        s = c["sklearn"]
        print(f"  sklearn {s['wall_s']:.3f} s wall ({s['cpu_s']:.3f} s CPU) for {c['instances']} (timed on "
              f"{s['timed_instances']}), {s['inst_per_s']:,.0f} inst/s, mean inertia {s['mean_inertia']:.4f}, "
              f"{100 * s['roofline_fraction']:.1f} % of the limit")
        ratio = f"; inertia ours/sklearn {c['inertia_ratio']:.6f}" if "inertia_ratio" in c else ""
        print(f"  speedup {c['speedup_wall']:.1f}x wall, {c['speedup_cpu']:.1f}x CPU time{ratio}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--instances", type=int, default=200)
    p.add_argument("--pixels", type=int, default=1024)
    p.add_argument("--dims", default="256,1152", help="comma-separated feature widths, one case each")
    p.add_argument("--metrics", "--metric", default="l2",
                   help="comma-separated: l2 compares like for like with sklearn; cosine is the mining default")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--distance-dtype", default="", help="e.g. float16 / bfloat16 (GPU only)")
    p.add_argument("--backend", default="auto", choices=["auto", "native", "torch"],
                   help="ours: the compiled CPU kernel (auto on CPU float32) or the torch path")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of ours (minimum kept)")
    p.add_argument("--sklearn-repeats", type=int, default=1, help="timed runs of sklearn (minimum kept)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for both torch and sklearn (0 = library defaults)")
    p.add_argument("--skip-sklearn", action="store_true")
    p.add_argument("--sklearn-instances", type=int, default=0,
                   help="time sklearn on this many instances only (0 = all) and extrapolate per instance")
    p.add_argument("--json", default="", help="also write all figures to this JSON file ('-' = stdout)")
    args = p.parse_args()

    device = torch.device(args.device)
    limiter = None
    if args.threads:
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(args.threads)
        limiter = threadpool_limits(args.threads)  # sklearn's OpenMP/BLAS pools
    limits = MachineLimits(device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, "
          f"k-means backend {args.backend}; {native_status()}")
    print(limits)
    cases = []
    for dims in (int(d) for d in args.dims.split(",")):
        for metric in args.metrics.split(","):
            cases.append(run_case(dims, metric, args, device, limits))
            _print_case(cases[-1])
    if limiter is not None:
        limiter.restore_original_limits()
    if args.json:
        out = {"tool": "benchmark_kmeans", "torch": torch.__version__, "machine": limits.as_dict(),
               "backend": args.backend, "native": native_status(),
               "load_average_end": load_average(), "cases": cases}
        write_report(out, args.json)


if __name__ == "__main__":
    main()
