"""Object-centric crops for the part decoder (MODEL.PART_DISTILL.OBJECT_CROP).

Why: the reference trains D^p on object-centric ImageNet images at 640 px, where one object fills
most of the frame. A cluttered multi-object image at a small size gives each part a few cells of
the mask grid, and D^p must also find the objects. Cropping a square around each object (with
context) and resizing it to a fixed side gives every part the same resolution at any object size
and makes a CPU iteration cheaper. Training crops each object of a (augmented) batch with a jittered
box; inference crops each owner object (ground truth or D^o's), runs D^p on the crops and pastes
the part masks back into the image, clipped to their object.

Boxes are ``x0, y0, x1, y1`` in the pixel coordinates of the tensor they are applied to (pixel
``i`` spans ``[i, i + 1)``); outside the image, crops read zeros (the normalised padding value).
"""
import torch
from torch.nn import functional as F

__all__ = ["mask_boxes", "square_boxes", "crop_regions", "paste_regions", "CropSettings", "OUTSIDE_LOGIT"]

# Mask logit of pixels outside a crop (or outside the owner when clipping): sigmoid ~ 0, never > 0.
OUTSIDE_LOGIT = -1e4


def mask_boxes(masks):
    """Tight boxes Float[N, 4] of Bool masks [N, H, W] (an empty mask gives a zero-size box at 0)."""
    if masks.numel() == 0:
        return masks.new_zeros((masks.shape[0], 4), dtype=torch.float32)
    rows, cols = masks.any(2), masks.any(1)
    h, w = masks.shape[-2:]
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    y0 = torch.where(rows, ar_h, h).min(1).values
    y1 = torch.where(rows, ar_h + 1, 0).max(1).values
    x0 = torch.where(cols, ar_w, w).min(1).values
    x1 = torch.where(cols, ar_w + 1, 0).max(1).values
    empty = ~rows.any(1)
    boxes = torch.stack([x0, y0, x1, y1], 1).float()
    boxes[empty] = 0.0
    return boxes


def square_boxes(boxes, context=1.3, scale=None, shift=None):
    """Squares around ``boxes`` [N, 4]: side = context x max(w, h) (x ``scale`` [N]), centre moved by
    ``shift`` [N, 2] x side. Degenerate boxes get a side of 1 pixel."""
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    side = torch.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]).clamp(min=1.0) * context
    if scale is not None:
        side = side * scale
    if shift is not None:
        cx = cx + shift[:, 0] * side
        cy = cy + shift[:, 1] * side
    half = side / 2
    return torch.stack([cx - half, cy - half, cx + half, cy + half], 1)


def _region_grid(boxes, out_h, out_w, in_h, in_w):
    """grid_sample grid [N, out_h, out_w, 2] reading ``boxes`` of an [in_h, in_w] map (align_corners=False)."""
    t = torch.arange(out_h, device=boxes.device, dtype=torch.float32)
    s = torch.arange(out_w, device=boxes.device, dtype=torch.float32)
    ys = boxes[:, 1, None] + (t[None] + 0.5) * ((boxes[:, 3] - boxes[:, 1]) / out_h)[:, None]
    xs = boxes[:, 0, None] + (s[None] + 0.5) * ((boxes[:, 2] - boxes[:, 0]) / out_w)[:, None]
    gy = (2 * ys / in_h - 1)[:, :, None].expand(-1, out_h, out_w)
    gx = (2 * xs / in_w - 1)[:, None, :].expand(-1, out_h, out_w)
    return torch.stack([gx, gy], -1)


def crop_regions(maps, boxes, size, batch_index=None, mode="bilinear"):
    """Crops [N, C, size, size] of ``maps`` [B, C, H, W] (or [N, C, H, W] with batch_index None) at ``boxes``."""
    if batch_index is not None:
        maps = maps[batch_index]
    if len(boxes) == 0:
        return maps.new_zeros((0, maps.shape[1], size, size))
    grid = _region_grid(boxes.float(), size, size, maps.shape[-2], maps.shape[-1]).to(maps.dtype)
    return F.grid_sample(maps, grid, mode=mode, padding_mode="zeros", align_corners=False)


def paste_regions(crop_maps, boxes, out_size):
    """Inverse of ``crop_regions``: [N, C, h, w] maps covering ``boxes`` (output pixel coordinates) ->
    [N, C, H, W] at ``out_size``, OUTSIDE_LOGIT outside each box."""
    n, c = crop_maps.shape[:2]
    H, W = int(out_size[0]), int(out_size[1])
    if n == 0:
        return crop_maps.new_full((0, c, H, W), OUTSIDE_LOGIT)
    # Where each output pixel centre falls inside its box, as a sampling grid over the crop.
    ys = (torch.arange(H, device=crop_maps.device, dtype=torch.float32) + 0.5)[None]
    xs = (torch.arange(W, device=crop_maps.device, dtype=torch.float32) + 0.5)[None]
    b = boxes.float()
    gy = 2 * (ys - b[:, 1, None]) / (b[:, 3] - b[:, 1]).clamp(min=1e-6)[:, None] - 1
    gx = 2 * (xs - b[:, 0, None]) / (b[:, 2] - b[:, 0]).clamp(min=1e-6)[:, None] - 1
    grid = torch.stack([gx[:, None, :].expand(-1, H, -1), gy[:, :, None].expand(-1, -1, W)], -1)
    out = F.grid_sample(crop_maps.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    inside = (gx.abs() <= 1)[:, None, :] & (gy.abs() <= 1)[:, :, None]
    return torch.where(inside[:, None], out, torch.full_like(out, OUTSIDE_LOGIT))


class CropSettings:
    """MODEL.PART_DISTILL.OBJECT_CROP as arguments (see config.py for each one)."""

    def __init__(self, size=128, context=1.3, scale_jitter=1.25, shift_jitter=0.1, max_per_image=0,
                 clip_to_object=True):
        if size <= 0 or context <= 0 or scale_jitter < 1 or shift_jitter < 0:
            raise ValueError(f"MODEL.PART_DISTILL.OBJECT_CROP: SIZE > 0, CONTEXT > 0, SCALE_JITTER >= 1 and "
                             f"SHIFT_JITTER >= 0 are required, got {size}, {context}, {scale_jitter}, {shift_jitter}")
        self.size = int(size)
        self.context = float(context)
        self.scale_jitter = float(scale_jitter)
        self.shift_jitter = float(shift_jitter)
        self.max_per_image = int(max_per_image)
        self.clip_to_object = bool(clip_to_object)

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.PART_DISTILL.OBJECT_CROP
        if not c.ENABLED:
            return None
        if c.SIZE % cfg.MODEL.MASK_FORMER.SIZE_DIVISIBILITY:
            raise ValueError(f"MODEL.PART_DISTILL.OBJECT_CROP.SIZE {c.SIZE} must be a multiple of "
                             f"MODEL.MASK_FORMER.SIZE_DIVISIBILITY {cfg.MODEL.MASK_FORMER.SIZE_DIVISIBILITY}")
        return cls(c.SIZE, c.CONTEXT, c.SCALE_JITTER, c.SHIFT_JITTER, c.MAX_PER_IMAGE, c.CLIP_TO_OBJECT)

    def boxes(self, object_boxes, train=False):
        """The square crop boxes of ``object_boxes`` [N, 4], jittered when ``train``."""
        if not train:
            return square_boxes(object_boxes, self.context)
        n = len(object_boxes)
        log_j = torch.log(torch.tensor(self.scale_jitter))
        scale = torch.exp((torch.rand(n) * 2 - 1) * log_j).to(object_boxes.device)
        shift = ((torch.rand(n, 2) * 2 - 1) * self.shift_jitter).to(object_boxes.device)
        return square_boxes(object_boxes, self.context, scale, shift)
