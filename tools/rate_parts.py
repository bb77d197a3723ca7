#!/usr/bin/env python
"""Purity rating of part-cluster collages (paper Sec 5.2, Fig 4).

  python tools/rate_parts.py serve --collages output/collages/gt --db ratings.sqlite [--port 8000]
  python tools/rate_parts.py export --db ratings.sqlite --csv ratings.csv
  python tools/rate_parts.py curve --db ratings.sqlite --png precision_vs_rating.png
"""
import sys

from part_distill.rating.cli import main

if __name__ == "__main__":
    sys.exit(main())
