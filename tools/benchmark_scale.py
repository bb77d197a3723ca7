#!/usr/bin/env python
"""Scale benchmark: simulate whole-dataset steps on synthetic data; wall time, CPU time, peak RSS per case.

Each case runs in its own subprocess (peak RSS per case). Steps and cases live in
part_distill/benchmarks/scale.py (a step is one function + one register_step entry).

  OMP_NUM_THREADS=1 python tools/benchmark_scale.py --steps ranking                 # docs/scale.md table
  OMP_NUM_THREADS=1 python tools/benchmark_scale.py --steps ranking --cases 1M_x_21k
  OMP_NUM_THREADS=1 python tools/benchmark_scale.py --steps ranking_fp16            # fp16 vs fp32 prototypes
  OMP_NUM_THREADS=1 python tools/benchmark_scale.py --steps train_loader            # loader RSS at 1e3..1e5 images

The old list path, per-step audits (evaluation, manifests of 10^5 shards, the dataset-level k-means
sample, collages, ratings): tools/benchmark_train_loader.py --list / --audit (docs/scale.md).
"""
from part_distill.benchmarks.scale import main

if __name__ == "__main__":
    main()
