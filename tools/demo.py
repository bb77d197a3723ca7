#!/usr/bin/env python
"""Part overlays of a part model on your images (detectron2's demo convention).

  python tools/demo.py --config-file configs/parts_world/distill.yaml --input 'photos/*.jpg' \
      --output output/demo_overlays --objects whole-image MODEL.DEVICE cpu

--input takes image files, globs and folders (a folder: the image files directly inside, sorted
by name). --objects predicted (the model's own objects) | whole-image (the image is one object) |
gt (--dataset NAME or --gt-json COCO.json). Writes <stem>.png per image (also for an image with no
part above --confidence-threshold, which its legend says) and predictions.json
(part_distill/visualization/records.py format); unreadable files, missing paths and folders without
images are reported and skipped; inputs that name no image at all are an error (exit 2).
"""
import logging

import part_distill  # noqa: F401  (registers models and datasets)
from part_distill.visualization.demo import demo_main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    demo_main()
