#!/usr/bin/env python
"""Forward time of backbone + pixel decoder (inference, no grad).

  python tools/benchmark_backbone.py --backbone build_efficientnet_lite_backbone \
      --decoder MSDeformAttnPixelDecoder --batch 4 --size 192
"""
import argparse
import time

import torch
from detectron2.modeling import build_backbone

from part_distill.engine.setup import build_cfg
from part_distill.modeling.pixel_decoder import build_pixel_decoder


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="build_efficientnet_lite_backbone")
    ap.add_argument("--decoder", default="MSDeformAttnPixelDecoder")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=192)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="extra KEY VALUE config overrides")
    args = ap.parse_args()

    cfg = build_cfg("", ["MODEL.BACKBONE.NAME", args.backbone,
                         "MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME", args.decoder, *args.opts], freeze=False)
    dev = torch.device(args.device)
    backbone = build_backbone(cfg).to(dev).eval()
    decoder = build_pixel_decoder(cfg, backbone.output_shape()).to(dev).eval()
    x = torch.randn(args.batch, 3, args.size, args.size, device=dev)

    def timed(fn, arg):
        times = []
        for i in range(args.iters + 2):  # the first 2 are warm-up
            t0 = time.perf_counter()
            with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.bf16):
                out = fn(arg)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - t0)
        times.sort()
        # min and median: on a shared machine the min is the least disturbed figure
        return out, times[0] * 1000, times[len(times) // 2] * 1000

    feats, bb_min, bb_med = timed(backbone, x)
    _, pd_min, pd_med = timed(decoder.forward_features, feats)
    print(f"{args.backbone} + {args.decoder} | batch {args.batch} | {args.size}x{args.size} | {args.device}"
          f"{' bf16' if args.bf16 else ''} | threads {torch.get_num_threads()} | ms/forward min (median): "
          f"backbone {bb_min:.0f} ({bb_med:.0f}), pixel decoder {pd_min:.0f} ({pd_med:.0f}), "
          f"total {bb_min + pd_min:.0f} ({bb_med + pd_med:.0f})")

if __name__ == "__main__":
    main()
