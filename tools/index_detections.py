#!/usr/bin/env python
"""Index COCO-results files (Detic's output) once, before a multi-node job reads them (docs/clusters.md):

    python tools/index_detections.py "$DETECTRON2_DATASETS/imagenet/detic/train_results_*.json"

Writes ``<file>.index.npz`` beside each file (atomically); a current index is left as it is. Without
this, the first process that loads the image collection builds it (every process of a cold start does).
"""
import argparse
import logging

from part_distill.data.datasets.detection_results import expand_result_files, load_results_index

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="results files or globs (shards)")
    logging.basicConfig(level=logging.INFO)
    for path in expand_result_files(parser.parse_args().results, what="results"):
        index = load_results_index(path)
        print(f"{path}: {len(index['offset'])} rows, {len(index['names'])} file names")
