"""Entry of tools/probe_backbone.py: one config, one or more labelled weight files, one table."""
import argparse
import logging
import os

from ..data.datasets.parts_world import register_parts_world_from_config
from ..engine.setup import build_cfg
from .report import load_rows, merge_rows, write_report
from .runner import default_label, probe_backbone

__all__ = ["build_parser", "parse_weights", "probe_main"]

logger = logging.getLogger(__name__)


def build_parser(epilog=None):
    p = argparse.ArgumentParser(description="Part-awareness probes of a frozen backbone.", epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default="", metavar="FILE", help="config (backbone, MINING.*, PROBE.*)")
    p.add_argument("--output", default="", help="directory of the table, JSON and per-row stores (default OUTPUT_DIR)")
    p.add_argument("--label", default="", help="row label of the single run (default: from the weights file)")
    p.add_argument("--weights", action="append", default=[], metavar="[LABEL=]PATH",
                   help="probe the backbone with these weights (MODEL.WEIGHTS); repeat for several rows; the label "
                        "ends at the first '='; "
                        "an empty PATH ('LABEL=') keeps the backbone's own initialisation")
    p.add_argument("--fresh", action="store_true",
                   help="start a new table instead of adding rows to --output's probe_results.json")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return p


def parse_weights(specs):
    """``[LABEL=]PATH`` strings -> ``[(label or None, path)]``; a missing local file is an error.

    The label ends at the first "="; a spec that is itself an existing file is an unlabelled path.
    """
    runs = []
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep or os.path.isfile(spec):
            label, path = None, spec
        if path and "://" not in path and not os.path.isfile(path):
            raise FileNotFoundError(f"--weights {spec!r}: no checkpoint at {os.path.abspath(path)}")
        runs.append((label or None, path))
    return runs


def probe_main(args):
    """Probe every requested run, merge the rows into ``args.output``'s table; returns the markdown table."""
    base = build_cfg(args.config_file, args.opts)
    register_parts_world_from_config(base)
    if base.MODEL.WEIGHTS and "://" not in base.MODEL.WEIGHTS and not os.path.isfile(base.MODEL.WEIGHTS):
        raise FileNotFoundError(f"MODEL.WEIGHTS: no checkpoint at {os.path.abspath(base.MODEL.WEIGHTS)}")
    output = args.output or base.OUTPUT_DIR
    runs = parse_weights(args.weights)
    if args.label and len(runs) > 1:
        raise ValueError("--label names a single run; label several --weights as LABEL=PATH")
    if not runs:
        runs = [(None, base.MODEL.WEIGHTS)]
    rows = []
    for label, weights in runs:
        cfg = base.clone()
        cfg.defrost()
        cfg.MODEL.WEIGHTS = weights
        cfg.freeze()
        label = label or args.label or default_label(cfg)
        logger.info("Probing %r (backbone %s, weights %r)", label, cfg.MODEL.BACKBONE.NAME, weights)
        rows.append(probe_backbone(cfg, label, output))
        # Written after every row, so a long multi-run invocation keeps what it finished.
        table = write_report(output, merge_rows([] if args.fresh else load_rows(output), rows))
    return table
