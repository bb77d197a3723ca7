"""BYOL-style views of PARTICLE's appendix A, applied alike to an image and its part-label map.

Per view (x for the online encoder, x' for the momentum encoder):

    random resized crop  area 0.08-1.0, aspect 3/4-4/3      p = 1.0 / 1.0
    horizontal flip                                          p = 0.5 / 0.5
    colour jitter        brightness, contrast 0.6-1.4,       p = 0.8 / 0.8
                         saturation 0.8-1.2, hue -0.1-0.1 (random order, as BYOL)
    Gaussian blur        kernel 23, sigma 0.1-2.0            p = 1.0 / 0.1
    solarisation         threshold 0.5                       p = 0.0 / 0.2

Geometric ops (crop, flip) move the label map with the image (nearest neighbour, so labels stay
part ids); photometric ops touch the image only. Kernel size and sigma are given for 224 px views
and are scaled with the view size, so a 128 px view is blurred alike relative to its content.
All randomness comes from the ``numpy.random.Generator`` passed in: a seed gives the same views.
"""
import dataclasses
import math
from typing import Optional, Tuple

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

__all__ = ["ViewParams", "ParticleAugment", "sample_view", "apply_view"]

# (p_online, p_target) of appendix A.
_P_FLIP = (0.5, 0.5)
_P_JITTER = (0.8, 0.8)
_P_BLUR = (1.0, 0.1)
_P_SOLARIZE = (0.0, 0.2)
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = (0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)
_BLUR_KERNEL_224, _BLUR_SIGMA = 23, (0.1, 2.0)
_SOLARIZE_THRESHOLD = 0.5


@dataclasses.dataclass
class ViewParams:
    """Everything random about one view; ``apply_view`` is deterministic given it."""

    crop: Tuple[int, int, int, int]  # top, left, height, width in source pixels
    flip: bool = False
    jitter: Optional[Tuple[Tuple[int, ...], Tuple[float, float, float, float]]] = None  # order, factors
    blur_sigma: Optional[float] = None
    solarize: bool = False


def _crop_box(rng, h, w, scale, ratio):
    """torchvision's RandomResizedCrop box rule (10 tries, then the central crop), on ``rng``."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def sample_view(rng, height, width, view, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """Random parameters of view 0 (online, x) or 1 (momentum, x')."""
    if view not in (0, 1):
        raise ValueError(f"view must be 0 (online) or 1 (momentum), got {view}")
    crop = _crop_box(rng, height, width, scale, ratio)
    flip = bool(rng.random() < _P_FLIP[view])
    jitter = None
    if rng.random() < _P_JITTER[view]:
        factors = (rng.uniform(*_BRIGHTNESS), rng.uniform(*_CONTRAST), rng.uniform(*_SATURATION), rng.uniform(*_HUE))
        jitter = (tuple(int(v) for v in rng.permutation(4)), tuple(float(f) for f in factors))
    blur = float(rng.uniform(*_BLUR_SIGMA)) if rng.random() < _P_BLUR[view] else None
    solarize = bool(rng.random() < _P_SOLARIZE[view])
    return ViewParams(crop=crop, flip=flip, jitter=jitter, blur_sigma=blur, solarize=solarize)


_JITTER_OPS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def apply_view(image, labels, params, size):
    """image float [3, H, W] in [0, 1], labels int64 [H, W] -> ([3, size, size], [size, size])."""
    top, left, h, w = params.crop
    image = TF.resized_crop(image, top, left, h, w, [size, size], interpolation=InterpolationMode.BILINEAR,
                            antialias=True).clamp_(0.0, 1.0)
    labels = TF.resized_crop(labels[None], top, left, h, w, [size, size], interpolation=InterpolationMode.NEAREST,
                             antialias=False)[0]
    if params.flip:
        image, labels = TF.horizontal_flip(image), TF.horizontal_flip(labels)
    if params.jitter is not None:
        order, factors = params.jitter
        for j in order:
            image = _JITTER_OPS[j](image, factors[j])
    if params.blur_sigma is not None:
        kernel = max(3, int(round(_BLUR_KERNEL_224 * size / 224)) | 1)
        sigma = params.blur_sigma * size / 224
        image = TF.gaussian_blur(image, [kernel, kernel], [sigma, sigma])
    if params.solarize:
        image = TF.solarize(image, _SOLARIZE_THRESHOLD)
    return image, labels


class ParticleAugment:
    """Two views (online, momentum) of an image and its labels, from a seeded numpy generator."""

    def __init__(self, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        self.size = int(size)
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)

    def __call__(self, image, labels, rng):
        """image uint8 [H, W, 3] (RGB) or float [3, H, W] in [0, 1]; labels [H, W] (or a coarser grid,
        upsampled with nearest neighbour). Returns two (image float [3, S, S] in 0..255, labels [S, S])."""
        if isinstance(image, np.ndarray):
            image = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float().div_(255.0)
        labels = torch.as_tensor(labels, dtype=torch.int64)
        h, w = image.shape[-2:]
        if tuple(labels.shape) != (h, w):
            labels = TF.resize(labels[None], [h, w], interpolation=InterpolationMode.NEAREST, antialias=False)[0]
        views = []
        for v in (0, 1):
            p = sample_view(rng, h, w, v, self.scale, self.ratio)
            im, lab = apply_view(image, labels, p, self.size)
            views.append((im * 255.0, lab))
        return views
