"""Dense per-pixel features the miner clusters, selected by ``cfg.MINING.FEATURES``.

An extractor maps a padded batch ``images`` [B, 3, H, W] (RGB, float 0..255, H and W multiples of
``extractor.size_divisibility``) to features [B, D, H / stride, W / stride] on one grid of stride
``extractor.stride``. The miner resizes and pads the images and crops the valid part of the grid.

Registered names (``MINING_FEATURE_REGISTRY``):
  * ``res3_res4``  - backbone levels ``MINING.FEATURE_LEVELS`` (default res3, res4), every level
    bilinearly resized to the grid of the first one and concatenated (the paper's mining features);
  * ``single``     - the first level of ``MINING.FEATURE_LEVELS`` only;
  * ``hypercolumn``- all levels of ``MINING.FEATURE_LEVELS`` on the finest level's grid (PARTICLE
    Sec 3.1, which interpolates to the input size; the finest grid keeps k-means affordable and
    the miner's full-resolution assignment is a bilinear interpolation anyway);
  * ``mask_features`` - the pixel decoder's per-pixel mask features of a built model;
  * ``rgbxy``      - the baseline: mean RGB (0..1) and normalised x, y of each grid cell.
With ``MINING.NORMALIZE`` every level is L2-normalised per pixel before concatenation, so levels of
different widths and magnitudes weigh the same (PARTICLE normalises each hypercolumn level).
"""
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.utils.registry import Registry

__all__ = [
    "MINING_FEATURE_REGISTRY",
    "BackboneFeatures",
    "MaskFeatures",
    "RGBXYFeatures",
    "build_feature_extractor",
]

MINING_FEATURE_REGISTRY = Registry("MINING_FEATURES")
MINING_FEATURE_REGISTRY.__doc__ = "Dense feature extractors of the part miner (cfg.MINING.FEATURES)."


def _l2n(x):
    return F.normalize(x, dim=1, eps=1e-12)


def _to_model_input(images, input_format, pixel_mean, pixel_std):
    """RGB 0..255 -> the channel order and normalisation the model was trained with."""
    if input_format == "BGR":
        images = images.flip(1)
    return (images - pixel_mean.view(1, -1, 1, 1)) / pixel_std.view(1, -1, 1, 1)


class _Extractor(torch.nn.Module):
    stride = 8
    size_divisibility = 8

    def __call__(self, images):
        with torch.no_grad():
            return super().__call__(images)


class BackboneFeatures(_Extractor):
    """Concatenation of backbone levels resized to the grid of ``grid_level``."""

    @configurable
    def __init__(self, *, backbone, levels, grid_level, normalize=True, pixel_mean=(127.5,) * 3,
                 pixel_std=(127.5,) * 3, input_format="RGB"):
        super().__init__()
        shapes = backbone.output_shape()
        missing = [lv for lv in levels if lv not in shapes]
        if missing:
            raise ValueError(f"MINING.FEATURE_LEVELS {missing} are not outputs of the backbone "
                             f"(it returns {sorted(shapes)}; see its OUT_FEATURES)")
        self.backbone = backbone.eval()
        self.levels = list(levels)
        self.grid_level = grid_level
        self.normalize = normalize
        self.input_format = input_format
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32), False)
        self.stride = shapes[grid_level].stride
        self.size_divisibility = max(getattr(backbone, "size_divisibility", 0) or 0,
                                     max(shapes[lv].stride for lv in levels))

    @classmethod
    def from_config(cls, cfg, kind="res3_res4"):
        from ..modeling.checkpoint import PartDistillCheckpointer
        from detectron2.layers import ShapeSpec
        from detectron2.modeling import build_backbone

        levels = list(cfg.MINING.FEATURE_LEVELS)
        if not levels:
            raise ValueError("MINING.FEATURE_LEVELS is empty")
        backbone = build_backbone(cfg, ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN)))
        if cfg.MODEL.WEIGHTS:
            # A full-model checkpoint names the backbone's weights "backbone.*".
            holder = torch.nn.Module()
            holder.backbone = backbone
            PartDistillCheckpointer(holder).load(cfg.MODEL.WEIGHTS)
        shapes = backbone.output_shape()
        if kind == "single":
            levels = levels[:1]
        if kind == "hypercolumn":
            grid = min(levels, key=lambda lv: shapes[lv].stride if lv in shapes else 1 << 30)
        else:
            grid = levels[0]
        return {"backbone": backbone, "levels": levels, "grid_level": grid,
                "normalize": cfg.MINING.NORMALIZE, "pixel_mean": tuple(cfg.MODEL.PIXEL_MEAN),
                "pixel_std": tuple(cfg.MODEL.PIXEL_STD), "input_format": cfg.INPUT.FORMAT}

    def forward(self, images):
        feats = self.backbone(_to_model_input(images, self.input_format, self.pixel_mean, self.pixel_std))
        size = feats[self.grid_level].shape[-2:]
        out = []
        for lv in self.levels:
            f = feats[lv].float()
            if f.shape[-2:] != size:
                f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
            out.append(_l2n(f) if self.normalize else f)
        return torch.cat(out, 1)


class MaskFeatures(_Extractor):
    """Per-pixel mask features of a pixel decoder; ``fn(model_input) -> [B, D, h, w]`` is pluggable."""

    @configurable
    def __init__(self, *, fn, stride, size_divisibility=32, normalize=True, pixel_mean=(127.5,) * 3,
                 pixel_std=(127.5,) * 3, input_format="RGB"):
        super().__init__()
        self.fn = fn
        self.stride = stride
        self.size_divisibility = size_divisibility
        self.normalize = normalize
        self.input_format = input_format
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32), False)

    @classmethod
    def from_config(cls, cfg):
        from ..modeling.checkpoint import PartDistillCheckpointer
        from detectron2.modeling import build_model

        model = build_model(cfg.clone()).eval()
        PartDistillCheckpointer(model).load(cfg.MODEL.WEIGHTS)
        if not hasattr(model, "backbone") or not hasattr(getattr(model, "sem_seg_head", None), "pixel_decoder"):
            raise ValueError(f"MINING.FEATURES 'mask_features' needs a model with .backbone and "
                             f".sem_seg_head.pixel_decoder; {cfg.MODEL.META_ARCHITECTURE} has none")

        def fn(x):
            return model.sem_seg_head.pixel_decoder.forward_features(model.backbone(x))[0]

        return {"fn": fn, "stride": cfg.MODEL.SEM_SEG_HEAD.COMMON_STRIDE,
                "size_divisibility": max(model.backbone.size_divisibility, 32),
                "normalize": cfg.MINING.NORMALIZE, "pixel_mean": tuple(cfg.MODEL.PIXEL_MEAN),
                "pixel_std": tuple(cfg.MODEL.PIXEL_STD), "input_format": cfg.INPUT.FORMAT}

    def forward(self, images):
        f = self.fn(_to_model_input(images, self.input_format, self.pixel_mean, self.pixel_std)).float()
        return _l2n(f) if self.normalize else f


class RGBXYFeatures(_Extractor):
    """Baseline: per grid cell the mean RGB in [0, 1] and its centre's x, y in [0, 1] of the long side.

    Coordinates are divided by the padded long side so x and y keep the image's aspect ratio.
    ``normalize`` is ignored: unit-norm RGBXY would discard brightness and position.
    """

    @configurable
    def __init__(self, *, stride=8, xy_weight=1.0):
        super().__init__()
        self.stride = stride
        self.size_divisibility = stride
        self.xy_weight = xy_weight

    @classmethod
    def from_config(cls, cfg):
        return {"stride": cfg.MINING.RGBXY_STRIDE}

    def forward(self, images):
        rgb = F.avg_pool2d(images.float() / 255.0, self.stride)
        b, _, h, w = rgb.shape
        side = float(max(h, w))
        ys = (torch.arange(h, dtype=rgb.dtype, device=rgb.device) + 0.5) / side
        xs = (torch.arange(w, dtype=rgb.dtype, device=rgb.device) + 0.5) / side
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        xy = torch.stack([xx, yy])[None].expand(b, 2, h, w) * self.xy_weight
        return torch.cat([rgb, xy], 1)


for _kind in ("res3_res4", "single", "hypercolumn"):
    MINING_FEATURE_REGISTRY._do_register(
        _kind, (lambda kind: lambda cfg: BackboneFeatures(cfg, kind=kind))(_kind))
MINING_FEATURE_REGISTRY._do_register("mask_features", lambda cfg: MaskFeatures(cfg))
MINING_FEATURE_REGISTRY._do_register("rgbxy", lambda cfg: RGBXYFeatures(cfg))


def build_feature_extractor(cfg):
    """The extractor named by ``cfg.MINING.FEATURES``, in eval mode on ``cfg.MODEL.DEVICE``."""
    name = cfg.MINING.FEATURES
    if name not in MINING_FEATURE_REGISTRY:
        raise ValueError(f"MINING.FEATURES must be one of {sorted(k for k, _ in MINING_FEATURE_REGISTRY)}, "
                         f"got {name!r}")
    return MINING_FEATURE_REGISTRY.get(name)(cfg).to(cfg.MODEL.DEVICE).eval()
