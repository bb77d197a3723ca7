"""Export a part model to TorchScript and/or ONNX, check it against PyTorch, time it on CPU.

``export_model`` traces ``TraceablePartModel`` at one fixed input size, reloads every exported
file (``torch.jit.load``; onnxruntime for ONNX), compares each output with the eager model on the
same input and records the median CPU latency of eager PyTorch and of each format in
``<output>/export_report.json``. An output passes when ``max|exported - eager| <= atol + rtol *
max|eager|``; for mask logits the fraction of pixels whose sign (= the binary mask) differs is
reported too.
"""
import logging
import os
import statistics
import time

import numpy as np
import torch

from ..utils.io import atomic_write_json
from .traceable import TraceablePartModel

__all__ = ["FORMATS", "build_export_model", "example_input", "compare_outputs", "median_latency",
           "export_torchscript", "export_onnx", "export_model", "export_main"]

logger = logging.getLogger(__name__)

FORMATS = ("torchscript", "onnx")
ONNX_OPSET = 17  # GridSample (MSDeformAttn) needs >= 16


def build_export_model(cfg):
    """The eval-mode model of ``cfg`` with MODEL.WEIGHTS loaded (random weights when empty)."""
    from detectron2.modeling import build_model

    from ..modeling.checkpoint import PartDistillCheckpointer

    model = build_model(cfg).eval()
    if cfg.MODEL.WEIGHTS:
        PartDistillCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    else:
        logger.warning("MODEL.WEIGHTS is empty: exporting a randomly initialised model")
    return model


def example_input(wrapper, height, width, seed=0):
    """A normalised [1, 3, H, W] input from a seeded random uint8 image."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (1, 3, height, width), generator=g, dtype=torch.uint8)
    with torch.no_grad():
        return wrapper.normalize(image.to(wrapper.model.device)).contiguous()


def compare_outputs(reference, exported, names, atol, rtol):
    """Per output: max abs difference, its bound and pass flag (and mask-sign disagreement)."""
    result = {}
    for name, ref, got in zip(names, reference, exported):
        ref = np.asarray(ref, np.float64)
        got = np.asarray(got, np.float64)
        if ref.shape != got.shape:
            result[name] = {"shape": list(ref.shape), "exported_shape": list(got.shape), "ok": False}
            continue
        diff = float(np.abs(ref - got).max()) if ref.size else 0.0
        bound = atol + rtol * (float(np.abs(ref).max()) if ref.size else 0.0)
        entry = {"shape": list(ref.shape), "max_abs_diff": diff, "bound": bound, "ok": diff <= bound}
        if name.endswith("_masks"):
            entry["mask_pixels_differing"] = float(((ref > 0) != (got > 0)).mean())
        result[name] = entry
    return result


def median_latency(fn, runs, warmup=2):
    """Median wall time (ms) of ``fn()`` over ``runs`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000.0)
    return statistics.median(times)


def _numpy_outputs(outputs):
    return [o.detach().cpu().numpy() for o in outputs]


def export_torchscript(wrapper, example, path):
    """Trace ``wrapper`` at ``example``'s shape and save it to ``path`` (atomically)."""
    with torch.no_grad():
        traced = torch.jit.trace(wrapper, (example,), check_trace=False)
    tmp = f"{path}.tmp"
    traced.save(tmp)
    os.replace(tmp, path)
    return path


def export_onnx(wrapper, example, path, opset=ONNX_OPSET):
    """Export ``wrapper`` with the TorchScript-based exporter (fixed input shape) to ``path``."""
    tmp = f"{path}.tmp"
    with torch.no_grad():
        torch.onnx.export(wrapper, (example,), tmp, input_names=["image"],
                          output_names=list(wrapper.output_names), opset_version=opset, dynamo=False)
    os.replace(tmp, path)
    return path


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError("ONNX verification needs onnxruntime (pip install onnx onnxruntime)") from e
    return onnxruntime


def export_model(cfg, output_dir, formats=FORMATS, *, height=None, width=None, runs=10, atol=1e-3,
                 rtol=1e-4, model=None):
    """Export, verify and time; returns the report written to ``<output_dir>/export_report.json``.

    Args:
        height, width: traced input size (default INPUT.MIN_SIZE_TEST, square), rounded up to the
            model's size_divisibility.
        runs: timed calls per runtime (median reported).
        atol, rtol: the stated tolerance of the numerical check.
        model: an already built eval-mode model (default: built from ``cfg``).
    """
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown export format(s) {sorted(unknown)}; choose from {FORMATS}")
    model = model if model is not None else build_export_model(cfg)
    model.eval()
    wrapper = TraceablePartModel(model).eval()
    div = max(1, int(getattr(model, "size_divisibility", 1) or 1))
    h = int(height or cfg.INPUT.MIN_SIZE_TEST)
    w = int(width or h)
    h, w = -(-h // div) * div, -(-w // div) * div
    example = example_input(wrapper, h, w)
    names = wrapper.output_names
    with torch.no_grad():
        reference = _numpy_outputs(wrapper(example))
        eager_ms = median_latency(lambda: wrapper(example), runs)
    os.makedirs(output_dir, exist_ok=True)
    report = {"input_shape": [1, 3, h, w], "outputs": list(names), "tolerance": {"atol": atol, "rtol": rtol},
              "runs": runs, "torch_threads": torch.get_num_threads(),
              "latency_ms": {"pytorch": eager_ms}, "formats": {}}
    if "torchscript" in formats:
        path = export_torchscript(wrapper, example, os.path.join(output_dir, "part_model.ts"))
        loaded = torch.jit.load(path, map_location="cpu").eval()
        with torch.no_grad():
            got = _numpy_outputs(loaded(example))
            report["latency_ms"]["torchscript"] = median_latency(lambda: loaded(example), runs)
        report["formats"]["torchscript"] = {"file": path, "outputs": compare_outputs(reference, got, names, atol, rtol)}
    if "onnx" in formats:
        path = export_onnx(wrapper, example, os.path.join(output_dir, "part_model.onnx"))
        ort = _onnxruntime()
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        feed = {"image": example.cpu().numpy()}
        got = session.run(list(names), feed)
        report["latency_ms"]["onnxruntime"] = median_latency(lambda: session.run(list(names), feed), runs)
        report["formats"]["onnx"] = {"file": path, "opset": ONNX_OPSET,
                                     "outputs": compare_outputs(reference, got, names, atol, rtol)}
    report["ok"] = all(o["ok"] for f in report["formats"].values() for o in f["outputs"].values())
    atomic_write_json(os.path.join(output_dir, "export_report.json"), report, indent=2)
    return report


def export_main(argv=None):
    """``tools/export.py``: returns the report; exit status 1 when an output misses the tolerance."""
    import argparse

    from ..engine.setup import build_cfg

    p = argparse.ArgumentParser(description="Export a part model to ONNX / TorchScript and verify it on CPU.")
    p.add_argument("--config-file", default="", metavar="FILE")
    p.add_argument("--format", choices=("onnx", "torchscript", "both"), default="both")
    p.add_argument("--output", required=True, help="directory for the exported files + export_report.json")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="traced input size (default MIN_SIZE_TEST)")
    p.add_argument("--runs", type=int, default=10, help="timed runs per runtime (median reported)")
    p.add_argument("--atol", type=float, default=1e-3)
    p.add_argument("--rtol", type=float, default=1e-4)
    p.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ...")
    args = p.parse_args(argv)
    cfg = build_cfg(args.config_file, args.opts)
    formats = FORMATS if args.format == "both" else (args.format,)
    h, w = args.size or (None, None)
    report = export_model(cfg, args.output, formats, height=h, width=w, runs=args.runs,
                          atol=args.atol, rtol=args.rtol)
    for fmt, entry in report["formats"].items():
        worst = max(o.get("max_abs_diff", float("inf")) for o in entry["outputs"].values())
        print(f"{fmt}: max abs diff {worst:.3g} (bound atol {args.atol} + rtol {args.rtol} x max|ref|), "
              f"{'OK' if all(o['ok'] for o in entry['outputs'].values()) else 'MISMATCH'}")
    print("median CPU latency (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in report["latency_ms"].items()))
    return report
