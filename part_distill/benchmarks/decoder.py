"""Training-speed benchmark of the part decoder D^p against Hugging Face's Mask2Former (issue #4).

Both models train the same parts on the same synthetic batch: a frozen R50 backbone and frozen
multi-scale deformable-attention pixel decoder, and a trainable masked-attention decoder with its
class/mask heads and set criterion (Hungarian matching, point-sampled mask/dice losses). Ours is
PartDistillationModel with its instance decoder frozen (it does not run in a training step);
Hugging Face's is ``Mask2FormerForUniversalSegmentation`` built from config objects (random init,
nothing is downloaded). ``transformers`` is optional: without it only our column is measured.

Entry point: ``tools/benchmark_decoder.py`` (see its docstring for the GPU command).
"""
import dataclasses
import gc
import importlib.util
import os
import time
import warnings
from collections import Counter

import torch
from detectron2.structures import Instances

__all__ = [
    "BenchSizes", "ModelResult", "synthetic_batch", "part_distill_inputs", "hf_inputs",
    "build_ours", "build_hf", "make_step", "time_training", "count_host_syncs", "summarize_sync_warnings",
    "format_report", "run_benchmark",
]

R50_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "mask2former_compat",
                          "maskformer2_R50_coco_instance.yaml")
NOT_INSTALLED = "not installed"
HF_NAME = "HF Mask2FormerForUniversalSegmentation"


@dataclasses.dataclass(frozen=True)
class BenchSizes:
    size: int = 640
    batch: int = 16
    queries: int = 200
    # Prediction rounds incl. the raw queries (MASK_FORMER.DEC_LAYERS = HF decoder_layers): 9 layers for 10.
    layers: int = 10
    hidden: int = 256
    targets: int = 10
    points: int = 12544
    classes: int = 1


@dataclasses.dataclass
class ModelResult:
    name: str
    # Seconds per timed iteration; empty when the model could not run (see ``status``).
    times: list = dataclasses.field(default_factory=list)
    peak_mem_bytes: int = None
    trainable_params: int = 0
    status: str = "ok"

    @property
    def median(self):
        return sorted(self.times)[len(self.times) // 2] if self.times else None


# ---------------------------------------------------------------------------- synthetic data
def synthetic_batch(sizes, device="cpu", seed=0):
    """Random images (0-255, RGB) and ``sizes.targets`` random rectangle masks with labels per image.

    Returns ``{"images": (B,3,S,S) float, "masks": (B,T,S,S) bool, "labels": (B,T) long}``. Every
    mask is non-empty (a rectangle of side >= 1), so both criteria see exactly T targets per image.
    """
    if sizes.targets < 1:
        raise ValueError(f"--targets must be >= 1, got {sizes.targets}")
    g = torch.Generator().manual_seed(seed)
    b, t, s = sizes.batch, sizes.targets, sizes.size
    images = torch.randint(0, 256, (b, 3, s, s), generator=g).float()
    corners = torch.randint(0, s, (b, t, 2, 2), generator=g).sort(dim=2).values  # [..., {lo, hi}, {y, x}]
    ys = torch.arange(s).view(1, 1, s, 1)
    xs = torch.arange(s).view(1, 1, 1, s)
    masks = ((ys >= corners[:, :, 0, 0, None, None]) & (ys <= corners[:, :, 1, 0, None, None])
             & (xs >= corners[:, :, 0, 1, None, None]) & (xs <= corners[:, :, 1, 1, None, None]))
    labels = torch.randint(0, sizes.classes, (b, t), generator=g)
    return {k: v.to(device) for k, v in {"images": images, "masks": masks, "labels": labels}.items()}


def part_distill_inputs(batch):
    """PartDistillationModel training inputs: ``[{"image", "parts": Instances(gt_masks, gt_classes)}]``."""
    inputs = []
    for image, masks, labels in zip(batch["images"], batch["masks"], batch["labels"]):
        parts = Instances(tuple(image.shape[-2:]), gt_masks=masks, gt_classes=labels)
        inputs.append({"image": image, "parts": parts})
    return inputs


def hf_inputs(batch, pixel_mean, pixel_std):
    """Mask2FormerForUniversalSegmentation kwargs: normalised ``pixel_values`` and per-image label lists."""
    mean = torch.as_tensor(pixel_mean, device=batch["images"].device).view(1, -1, 1, 1)
    std = torch.as_tensor(pixel_std, device=batch["images"].device).view(1, -1, 1, 1)
    return {
        "pixel_values": (batch["images"] - mean) / std,
        "mask_labels": [m.float() for m in batch["masks"]],
        "class_labels": list(batch["labels"]),
    }


# ---------------------------------------------------------------------------- models
def ours_opts(sizes, device):
    """Config overrides that turn the Mask2Former R50 COCO config into the benchmarked part model."""
    return [
        "MODEL.META_ARCHITECTURE", "PartDistillationModel", "MODEL.DEVICE", str(device), "MODEL.WEIGHTS", "",
        "MODEL.PART_DISTILL.NUM_PART_QUERIES", str(sizes.queries),
        "MODEL.PART_DISTILL.PART_DEC_LAYERS", str(sizes.layers),
        "MODEL.PART_DISTILL.NUM_PART_CLASSES", str(sizes.classes),
        "MODEL.PART_DISTILL.FREEZE", "encoder", "MODEL.PART_DISTILL.FREEZE_INSTANCE_DECODER", "True",
        "MODEL.MASK_FORMER.HIDDEN_DIM", str(sizes.hidden), "MODEL.SEM_SEG_HEAD.CONVS_DIM", str(sizes.hidden),
        "MODEL.SEM_SEG_HEAD.MASK_DIM", str(sizes.hidden),
        "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", str(sizes.points),
    ]


def build_ours(sizes, device, config_file=R50_CONFIG):
    """(model, forward->loss, cfg) of our PartDistillationModel at ``sizes``, in training mode."""
    from detectron2.modeling import build_model

    from ..engine.setup import build_cfg

    cfg = build_cfg(config_file, ours_opts(sizes, device))
    model = build_model(cfg)
    model.train()

    def loss_fn(inputs):
        return sum(model(inputs).values())

    return model, loss_fn, cfg


def hf_config_kwargs(sizes, field_names):
    """Mask2FormerConfig kwargs for ``sizes``, restricted to the fields this transformers version has."""
    wanted = {
        "hidden_dim": sizes.hidden, "feature_size": sizes.hidden, "mask_feature_size": sizes.hidden,
        "num_queries": sizes.queries, "decoder_layers": sizes.layers, "num_labels": sizes.classes,
        "encoder_layers": 6, "encoder_feedforward_dim": 1024, "dim_feedforward": 2048,
        "num_attention_heads": 8, "dropout": 0.0, "common_stride": 4,
        "train_num_points": sizes.points, "oversample_ratio": 3.0, "importance_sample_ratio": 0.75,
        "use_auxiliary_loss": True, "no_object_weight": 0.1, "class_weight": 2.0, "mask_weight": 5.0,
        "dice_weight": 5.0, "use_pretrained_backbone": False,
    }
    # num_labels is a PreTrainedConfig argument, not a Mask2FormerConfig field, in every version.
    return {k: v for k, v in wanted.items() if k in field_names or k == "num_labels"}


def build_hf(sizes, device):
    """(model, forward->loss) of transformers' Mask2Former with a random R50, backbone + pixel decoder frozen.

    Raises ImportError when transformers (or its Mask2Former, transformers >= 4.26) is missing.
    """
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, ResNetConfig
    from transformers.utils import logging as hf_logging

    backbone = ResNetConfig(depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048], embedding_size=64,
                            layer_type="bottleneck", out_features=["stage1", "stage2", "stage3", "stage4"])
    fields = set(vars(Mask2FormerConfig()).keys()) | set(getattr(Mask2FormerConfig, "__annotations__", {}))
    # Quiet "resnet is not a supported backbone": Mask2Former loads any backbone through load_backbone.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        config = Mask2FormerConfig(backbone_config=backbone, **hf_config_kwargs(sizes, fields))
        model = Mask2FormerForUniversalSegmentation(config)
    finally:
        hf_logging.set_verbosity(verbosity)
    frozen = model.model.pixel_level_module  # backbone ("encoder") + pixel decoder ("decoder")
    frozen.requires_grad_(False)
    model.to(device).train()
    frozen.eval()

    def loss_fn(inputs):
        return model(**inputs).loss

    return model, loss_fn


# ---------------------------------------------------------------------------- measurement
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(model, loss_fn, inputs, lr=1e-4, weight_decay=0.05, bf16=False):
    """One AdamW training step over the trainable parameters (closure), and their count."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    device_type = next(model.parameters()).device.type

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(inputs)
        loss.backward()
        opt.step()
        return loss

    return step, sum(p.numel() for p in params)


def time_training(step, device, iters, warmup):
    """Seconds per iteration of ``iters`` steps after ``warmup`` untimed ones (synchronised on CUDA)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def count_host_syncs(step, device, iters=1):
    """(count, Counter of "file:line") of CUDA sync warnings raised in ``iters`` steps."""
    if device.type != "cuda":
        raise RuntimeError("host-sync check needs a CUDA device")
    _sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(iters):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return summarize_sync_warnings(caught)


def summarize_sync_warnings(caught):
    """(count, Counter of "file:line") of the sync-debug warnings among recorded ``warnings``."""
    syncs = [w for w in caught if "synchronizing CUDA operation" in str(w.message)]
    return len(syncs), Counter(f"{_short_path(w.filename)}:{w.lineno}" for w in syncs)


def _short_path(filename):
    # Repository files relative to the repository, library files from their site-packages package.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    filename = os.path.abspath(filename)
    if filename.startswith(root + os.sep):
        return os.path.relpath(filename, root)
    marker = os.sep + "site-packages" + os.sep
    return filename.split(marker, 1)[1] if marker in filename else filename


def measure(name, build, device, iters, warmup, bf16):
    """Build one model, time its training step and free it again (so each peak memory is its own)."""
    result = ModelResult(name)
    model, loss_fn, inputs = build()
    step, result.trainable_params = make_step(model, loss_fn, inputs, bf16=bf16)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result.times = time_training(step, device, iters, warmup)
    if device.type == "cuda":
        result.peak_mem_bytes = torch.cuda.max_memory_allocated(device)
    return result, step


def release(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def format_report(results, header="", syncs=None):
    """Table of time/iter, it/s, peak memory per model and the ratio ours/HF (goal <= 0.8)."""
    lines = [header] if header else []
    lines.append(f"{'model':<40} {'ms/iter (median)':>17} {'ms/iter (mean)':>15} {'it/s':>7} "
                 f"{'peak GPU mem':>13} {'trainable':>11}")
    for r in results:
        if not r.times:
            lines.append(f"{r.name:<40} {r.status}")
            continue
        mean = sum(r.times) / len(r.times)
        mem = f"{r.peak_mem_bytes / 2**30:.2f} GiB" if r.peak_mem_bytes is not None else "n/a (cpu)"
        lines.append(f"{r.name:<40} {r.median * 1e3:>17.1f} {mean * 1e3:>15.1f} {1 / r.median:>7.2f} "
                     f"{mem:>13} {r.trainable_params / 1e6:>10.2f}M")
    ours, hf = results[0], results[1] if len(results) > 1 else None
    if hf is not None and ours.times and hf.times:
        ratio = ours.median / hf.median
        verdict = "meets" if ratio <= 0.8 else "misses"
        lines.append(f"time/iter ratio ours/HF = {ratio:.3f} ({verdict} the goal <= 0.8)")
        if ours.peak_mem_bytes is not None and hf.peak_mem_bytes:
            lines.append(f"peak memory ratio ours/HF = {ours.peak_mem_bytes / hf.peak_mem_bytes:.3f}")
    else:
        lines.append(f"time/iter ratio ours/HF = n/a (HF: {hf.status if hf is not None else 'not run'})")
    if syncs is not None:
        lines.append(syncs)
    return "\n".join(lines)


def format_syncs(count, where, top=10):
    lines = [f"host syncs in our training step: {count}"]
    lines += [f"  {n:>4}x {loc}" for loc, n in where.most_common(top)]
    return "\n".join(lines)


def run_benchmark(sizes, device="cpu", iters=10, warmup=3, bf16=False, check_host_syncs=False,
                  skip_hf=False, seed=0, config_file=R50_CONFIG):
    """Measure ours then HF's (same batch, optimizer, autocast) and return the formatted report."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device} requested but torch.cuda.is_available() is False")
    batch = synthetic_batch(sizes, device, seed)

    norm = {}

    def build_ours_step():
        model, loss_fn, cfg = build_ours(sizes, device, config_file)
        norm.update(mean=list(cfg.MODEL.PIXEL_MEAN), std=list(cfg.MODEL.PIXEL_STD))
        return model, loss_fn, part_distill_inputs(batch)

    torch.manual_seed(seed)
    ours, step = measure("ours (PartDistillationModel)", build_ours_step, device, iters, warmup, bf16)
    syncs = None
    if check_host_syncs:
        if device.type == "cuda":
            syncs = format_syncs(*count_host_syncs(step, device))
        else:
            syncs = "host syncs in our training step: skipped (needs --device cuda)"
    del step
    release(device)

    if skip_hf:
        hf = ModelResult(HF_NAME, status="skipped (--skip-hf)")
    elif importlib.util.find_spec("transformers") is None:
        hf = ModelResult(HF_NAME, status=f"{NOT_INSTALLED} (pip install transformers)")
    else:
        def build_hf_step():
            model, loss_fn = build_hf(sizes, device)
            # HF takes normalised pixels; ours normalises inside the model with the same mean/std.
            return model, loss_fn, hf_inputs(batch, norm["mean"], norm["std"])

        torch.manual_seed(seed)
        try:
            hf = measure(HF_NAME, build_hf_step, device, iters, warmup, bf16)[0]
        except ImportError as e:  # e.g. a transformers without Mask2Former or ResNet backbones
            hf = ModelResult(HF_NAME, status=f"not importable: {e}")
        release(device)
    header = _header(sizes, device, iters, warmup, bf16)
    return format_report([ours, hf], header, syncs)


def _header(sizes, device, iters, warmup, bf16):
    try:
        import transformers
        hf_version = transformers.__version__
    except ImportError:
        hf_version = NOT_INSTALLED
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    return (f"part-decoder training step | {name} | torch {torch.__version__} | transformers {hf_version}\n"
            f"input {sizes.size}x{sizes.size}, batch {sizes.batch}, {sizes.queries} queries, {sizes.layers} "
            f"decoder rounds ({sizes.layers - 1} layers), hidden {sizes.hidden}, {sizes.targets} targets/image, "
            f"{sizes.points} points/mask, {sizes.classes} class(es) | AdamW | "
            f"{'bf16 autocast' if bf16 else 'fp32'} | {warmup} warm-up + {iters} timed iterations")
