#!/usr/bin/env python
"""Training iterations/s of the part decoder vs Hugging Face's Mask2Former, side by side (issue #4).

Both models: random-init R50 + MSDeformAttn pixel decoder (frozen), trainable masked-attention
decoder + set criterion, same synthetic batch, AdamW, warm-up iterations excluded. Goal: our
time/iter <= 0.8x HF's. Without ``transformers`` the HF column reads "not installed".

GPU (the issue's sizes are the defaults: 640x640, batch 16, 200 queries, 10 decoder rounds):
  python tools/benchmark_decoder.py --device cuda --bf16 --iters 20 --warmup 5 \
      --check-host-syncs

CPU smoke run at tiny sizes:
  OMP_NUM_THREADS=1 python tools/benchmark_decoder.py --device cpu --size 64 --batch 2 --queries 8 \
      --layers 3 --points 256 --targets 3 --iters 3 --warmup 1
"""
import argparse

import torch

from part_distill.benchmarks.decoder import R50_CONFIG, BenchSizes, run_benchmark


def main():
    d = BenchSizes()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=d.size, help="square input side (pixels)")
    ap.add_argument("--batch", type=int, default=d.batch)
    ap.add_argument("--queries", type=int, default=d.queries, help="part queries")
    ap.add_argument("--layers", type=int, default=d.layers,
                    help="decoder prediction rounds incl. the raw queries "
                         "(= MASK_FORMER.DEC_LAYERS = HF decoder_layers; 10 rounds = 9 layers)")
    ap.add_argument("--hidden", type=int, default=d.hidden, help="decoder / pixel-decoder width")
    ap.add_argument("--targets", type=int, default=d.targets, help="ground-truth masks per image")
    ap.add_argument("--points", type=int, default=d.points, help="sampled points per mask in matcher and losses")
    ap.add_argument("--iters", type=int, default=20, help="timed iterations")
    ap.add_argument("--warmup", type=int, default=5, help="untimed iterations before timing")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast around forward + loss (both models)")
    ap.add_argument("--check-host-syncs", action="store_true",
                    help="count CUDA sync warnings of one of our training steps (set_sync_debug_mode)")
    ap.add_argument("--skip-hf", action="store_true", help="measure ours only")
    ap.add_argument("--config-file", default=R50_CONFIG, help="our base config (R50 Mask2Former COCO)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    sizes = BenchSizes(size=args.size, batch=args.batch, queries=args.queries, layers=args.layers,
                       hidden=args.hidden, targets=args.targets, points=args.points)
    print(run_benchmark(sizes, device=args.device, iters=args.iters, warmup=args.warmup, bf16=args.bf16,
                        check_host_syncs=args.check_host_syncs, skip_hf=args.skip_hf, seed=args.seed,
                        config_file=args.config_file))


if __name__ == "__main__":
    main()
