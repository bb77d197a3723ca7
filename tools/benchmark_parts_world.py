#!/usr/bin/env python
"""Parts-world generation speed on one core: rendering + PNG + RLE/JSON, written to a temp dir.

    python tools/benchmark_parts_world.py [--num-images 300] [--image-size 192]

Reports images/s over wall time and over this process's CPU time (the latter is what one
free core would deliver when other jobs share the machine).
"""
import argparse
import os
import tempfile
import time

# one core: no intra-op threads in OpenCV/BLAS
os.environ.setdefault("OMP_NUM_THREADS", "1")
import cv2  # noqa: E402

from part_distill.data.parts_world import PartsWorldGenerator, _texture_bank  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-images", type=int, default=300)
    p.add_argument("--image-size", type=int, default=192)
    p.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    args = p.parse_args()
    cv2.setNumThreads(1)
    gen = PartsWorldGenerator(image_size=args.image_size)
    start = time.perf_counter()
    _texture_bank(args.image_size)  # one-off photo loading, reported separately
    print(f"texture bank: {time.perf_counter() - start:.2f}s (once per process)")
    best_wall = best_cpu = 0.0
    for r in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            w0, c0 = time.perf_counter(), time.process_time()
            gen.write_split(tmp, "train", args.num_images, seed=r)
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        best_wall, best_cpu = max(best_wall, args.num_images / wall), max(best_cpu, args.num_images / cpu)
        print(f"run {r}: {args.num_images} images of {args.image_size}px in {wall:.2f}s wall, {cpu:.2f}s CPU")
    print(f"parts world generation: {best_wall:.1f} images/s (wall), {best_cpu:.1f} images/s (CPU time, 1 core)")


if __name__ == "__main__":
    main()
