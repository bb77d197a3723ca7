"""The decoder benchmark's inputs, model setup and report (part_distill/benchmarks/decoder.py)."""
import warnings

import pytest
import torch
from detectron2.structures import ImageList

from part_distill.benchmarks.decoder import (
    BenchSizes,
    ModelResult,
    build_hf,
    build_ours,
    format_report,
    hf_config_kwargs,
    hf_inputs,
    make_step,
    part_distill_inputs,
    summarize_sync_warnings,
    synthetic_batch,
)
from part_distill.modeling.meta_arch import InstanceSegmentor

TINY = BenchSizes(size=64, batch=2, queries=4, layers=2, hidden=32, targets=3, points=64)


def test_synthetic_batch_shapes_and_rectangles():
    sizes = BenchSizes(size=20, batch=3, targets=5, classes=4)
    batch = synthetic_batch(sizes, seed=1)
    assert batch["images"].shape == (3, 3, 20, 20) and batch["images"].dtype == torch.float32
    assert 0 <= batch["images"].min() and batch["images"].max() <= 255
    assert batch["masks"].shape == (3, 5, 20, 20) and batch["masks"].dtype == torch.bool
    assert batch["labels"].shape == (3, 5) and batch["labels"].dtype == torch.long
    assert 0 <= batch["labels"].min() and batch["labels"].max() < 4
    for mask in batch["masks"].reshape(-1, 20, 20):
        ys, xs = mask.nonzero(as_tuple=True)
        assert len(ys) > 0, "every target must be non-empty"
        box = torch.zeros_like(mask)
        box[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1] = True
        assert torch.equal(mask, box), "targets are filled rectangles"
    again, other = synthetic_batch(sizes, seed=1), synthetic_batch(sizes, seed=2)
    assert all(torch.equal(batch[k], again[k]) for k in batch)
    assert not torch.equal(batch["masks"], other["masks"])


def test_part_distill_inputs_become_our_criterion_targets():
    batch = synthetic_batch(TINY, seed=0)
    inputs = part_distill_inputs(batch)
    images = ImageList.from_tensors([x["image"] for x in inputs], 32)
    fake_model = type("M", (), {"device": torch.device("cpu")})()
    targets = InstanceSegmentor.prepare_targets(fake_model, inputs, images, key="parts")
    assert len(targets) == TINY.batch
    for b, t in enumerate(targets):
        assert torch.equal(t["masks"], batch["masks"][b]) and torch.equal(t["labels"], batch["labels"][b])


def test_hf_inputs_normalise_and_list_targets():
    batch = synthetic_batch(TINY, seed=0)
    mean, std = [10.0, 20.0, 30.0], [2.0, 4.0, 5.0]
    out = hf_inputs(batch, mean, std)
    for c in range(3):
        expected = (batch["images"][:, c] - mean[c]) / std[c]
        torch.testing.assert_close(out["pixel_values"][:, c], expected)
    assert len(out["mask_labels"]) == len(out["class_labels"]) == TINY.batch
    for b in range(TINY.batch):
        assert out["mask_labels"][b].dtype == torch.float32
        assert out["mask_labels"][b].shape == (TINY.targets, TINY.size, TINY.size)
        assert torch.equal(out["mask_labels"][b].bool(), batch["masks"][b])
        assert torch.equal(out["class_labels"][b], batch["labels"][b])


def test_hf_config_kwargs_keep_only_known_fields():
    known = {"hidden_dim", "num_queries", "decoder_layers", "train_num_points"}
    kwargs = hf_config_kwargs(TINY, known)
    assert kwargs == {"hidden_dim": 32, "num_queries": 4, "decoder_layers": 2, "train_num_points": 64,
                      "num_labels": 1}


def test_only_the_part_decoder_trains():
    model, loss_fn, _ = build_ours(TINY, "cpu")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    part = {n for n, _ in model.named_parameters() if n.startswith("part_predictor.")}
    assert trainable == part
    for module in (model.backbone, model.sem_seg_head.pixel_decoder, model.sem_seg_head.predictor):
        assert not module.training
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step, count = make_step(model, loss_fn, part_distill_inputs(synthetic_batch(TINY)))
    assert count == sum(p.numel() for n, p in model.named_parameters() if n in part)
    assert torch.isfinite(step())
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before if n not in part)
    assert any(not torch.equal(before[n], after[n]) for n in part)


def test_hf_trains_the_same_parameter_count_as_ours():
    pytest.importorskip("transformers")
    ours, _, _ = build_ours(TINY, "cpu")
    hf, _ = build_hf(TINY, "cpu")
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert count(hf) == count(ours) > 0
    assert len(hf.model.transformer_module.decoder.layers) == len(ours.part_predictor.transformer_ffn_layers)
    assert not hf.model.pixel_level_module.training


def test_report_ratio_uses_medians():
    ours = ModelResult("ours", times=[0.4, 0.1, 0.2], peak_mem_bytes=2**30, trainable_params=10**6)
    hf = ModelResult("hf", times=[9.0, 0.25, 0.2], peak_mem_bytes=2**31, trainable_params=10**6)
    report = format_report([ours, hf])
    assert "ratio ours/HF = 0.800 (meets the goal <= 0.8)" in report
    assert "peak memory ratio ours/HF = 0.500" in report
    assert "1.00 GiB" in report and "2.00 GiB" in report
    ours_line = next(line for line in report.splitlines() if line.startswith("ours"))
    assert ours_line.split()[1:4] == ["200.0", "233.3", "5.00"]
    slow = ModelResult("ours", times=[0.3])
    assert "misses the goal" in format_report([slow, hf])


def test_report_without_hf():
    ours = ModelResult("ours", times=[0.5])
    report = format_report([ours, ModelResult("hf", status="not installed (pip install transformers)")])
    assert "hf" in report and "not installed" in report and "n/a (cpu)" in report
    assert "ratio ours/HF = n/a (HF: not installed" in report


def test_sync_warning_summary_counts_only_sync_warnings():
    def fake(message, filename, lineno):
        return warnings.WarningMessage(UserWarning(message), UserWarning, filename, lineno)

    caught = [fake("called a synchronizing CUDA operation", "/x/site-packages/scipy/a.py", 3),
              fake("called a synchronizing CUDA operation", "/x/site-packages/scipy/a.py", 3),
              fake("called a synchronizing CUDA operation", "/y/b.py", 7),
              fake("some deprecation", "/y/b.py", 9)]
    count, where = summarize_sync_warnings(caught)
    assert count == 3
    assert where == {"scipy/a.py:3": 2, "/y/b.py:7": 1}
