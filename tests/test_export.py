"""Exported part model (TorchScript, ONNX via onnxruntime) equals eager PyTorch on CPU."""
import importlib.util
import json

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model

from part_distill.export import TraceablePartModel, export_model
from part_distill.export.exporter import example_input
from part_distill.modeling.ranker import PartRanker

from _tiny_part_model import tiny_part_cfg

HAS_ORT = importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None
MSDEFORM = ["MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME", "MSDeformAttnPixelDecoder",
            "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", "1", "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_NHEADS", "2",
            "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_DIM_FEEDFORWARD", "64"]


def _model_with_ranker(*opts):
    torch.manual_seed(0)
    cfg = tiny_part_cfg(*opts)
    model = build_model(cfg).eval()
    # A fitted ranker (class 1 with 2 of 3 slots, class 0 with all) so the ranker output is exported.
    model.ranker = PartRanker(3, 3, cfg.MODEL.MASK_FORMER.HIDDEN_DIM)
    model.ranker.set_class_prototypes(0, torch.randn(3, 32))
    model.ranker.set_class_prototypes(1, torch.randn(2, 32))
    return cfg, model


def test_ranker_output_equals_ranker_per_class():
    _, model = _model_with_ranker()
    wrapper = TraceablePartModel(model).eval()
    x = example_input(wrapper, 64, 64)
    with torch.no_grad():
        out = dict(zip(wrapper.output_names, wrapper(x)))
        feats = out["part_features"][0]
        for c in range(3):
            probs, _, _ = model.ranker(feats, torch.full((feats.shape[0],), c))
            torch.testing.assert_close(out["ranker_probs"][0, :, c], probs)
    assert torch.all(out["ranker_probs"][0, :, 2] == 0)  # class 2 has no prototypes


def test_exports_match_pytorch(tmp_path):
    # The MSDeformAttn pixel decoder (grid_sample) is the hardest graph; FPN is a subset of its ops.
    cfg, model = _model_with_ranker(*MSDEFORM)
    formats = ("torchscript", "onnx") if HAS_ORT else ("torchscript",)
    report = export_model(cfg, str(tmp_path), formats, height=64, width=64, runs=1, atol=1e-4, rtol=1e-5,
                          model=model)
    assert json.loads((tmp_path / "export_report.json").read_text())["ok"] is report["ok"] is True
    wrapper = TraceablePartModel(model).eval()
    # Independent check on a different input than the traced one: the graphs are not input-specific.
    x = example_input(wrapper, 64, 64, seed=7)
    with torch.no_grad():
        ref = [t.numpy() for t in wrapper(x)]
        ts = [t.numpy() for t in torch.jit.load(str(tmp_path / "part_model.ts"))(x)]
    assert len(ref) == 6  # 5 network outputs + ranker probabilities
    for r, t in zip(ref, ts):
        np.testing.assert_allclose(t, r, atol=1e-4, rtol=1e-5)
    if not HAS_ORT:
        pytest.skip("onnxruntime/onnx not installed: ONNX part skipped")
    import onnxruntime
    sess = onnxruntime.InferenceSession(str(tmp_path / "part_model.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = sess.run(list(wrapper.output_names), {"image": x.numpy()})
    for r, o in zip(ref, onnx_out):
        np.testing.assert_allclose(o, r, atol=1e-4, rtol=1e-5)


def test_mismatch_is_reported(tmp_path):
    from part_distill.export.exporter import compare_outputs
    ref = [np.zeros((2, 3)), np.ones((1, 4, 4))]
    got = [np.full((2, 3), 1e-3), -np.ones((1, 4, 4))]
    res = compare_outputs(ref, got, ["a_logits", "b_masks"], atol=1e-4, rtol=0.0)
    assert not res["a_logits"]["ok"] and res["a_logits"]["max_abs_diff"] == pytest.approx(1e-3)
    assert res["b_masks"]["mask_pixels_differing"] == 1.0
