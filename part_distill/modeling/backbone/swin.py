"""Swin Transformer backbone (``D2SwinTransformer``, the name Mask2Former's YAMLs use), built from timm.

The blocks, window attention, patch embedding and patch merging are timm's; this module only
assembles them into a detectron2 ``Backbone`` that returns res2..res5 with one LayerNorm per
output (``norm0``..``norm3``), as Mask2Former's Swin does.

Two deliberate differences from timm's own ``SwinTransformer`` keep the numerics of Mask2Former's
checkpoints:

* windowing: the feature map is padded to a multiple of the window *before* the cyclic shift and
  the shift mask is built on the padded grid; the window is never shrunk to the feature size
  (timm shifts before padding and shrinks small windows, which changes results whenever a stage's
  size is not a multiple of the window, e.g. every stage of Swin-L/window 12 at 1024 px).
* layout: timm puts patch merging at the *start* of stage i+1, Mask2Former at the *end* of stage i.
  The parameters are identical; ``part_distill.modeling.checkpoint`` renames them
  (``layers.{i}.downsample`` <-> ``layers.{i+1}.downsample``) when an official checkpoint loads.
"""
from typing import Dict, Optional, Sequence

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from timm.layers import PatchEmbed, trunc_normal_
from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock, window_partition, window_reverse
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["D2SwinTransformer", "PaddedShiftWindowBlock", "SwinStage"]

_STAGE_NAMES = ("res2", "res3", "res4", "res5")


class PaddedShiftWindowBlock(SwinTransformerBlock):
    """timm's Swin block with Mask2Former's windowing: pad, then shift; mask on the padded grid."""

    def __init__(self, *args, **kwargs):
        # Full windows at every size (no shrinking) and a mask computed per input size.
        super().__init__(*args, always_partition=True, dynamic_mask=True, **kwargs)
        self._mask_cache = None

    def _shift_mask(self, padded: torch.Tensor) -> Optional[torch.Tensor]:
        """(num_windows, area, area) additive mask for this padded size, cached for repeated sizes."""
        key = (padded.shape[1], padded.shape[2], padded.device, padded.dtype)
        if self._mask_cache is None or self._mask_cache[0] != key:
            # timm's builder assigns region ids from the shape of the tensor it is given.
            self._mask_cache = (key, self.get_attn_mask(padded))
        return self._mask_cache[1]

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        _, height, width, channels = x.shape
        win_h, win_w = self.window_size
        x = F.pad(x, (0, 0, 0, (-width) % win_w, 0, (-height) % win_h))
        padded_h, padded_w = x.shape[1:3]
        shifted = any(self.shift_size)
        mask = None
        if shifted:
            x = torch.roll(x, shifts=(-self.shift_size[0], -self.shift_size[1]), dims=(1, 2))
            mask = self._shift_mask(x)
        windows = window_partition(x, self.window_size).view(-1, self.window_area, channels)
        windows = self.attn(windows, mask=mask).view(-1, win_h, win_w, channels)
        x = window_reverse(windows, self.window_size, padded_h, padded_w)
        if shifted:
            x = torch.roll(x, shifts=self.shift_size, dims=(1, 2))
        return x[:, :height, :width].contiguous()


class SwinStage(nn.Module):
    """Optional 2x patch merging (timm layout: at the stage start) followed by Swin blocks (NHWC)."""

    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, window_size: int,
                 mlp_ratio: float, qkv_bias: bool, drop: float, attn_drop: float,
                 drop_path: Sequence[float], downsample: bool, use_checkpoint: bool):
        super().__init__()
        self.downsample = PatchMerging(in_dim, dim) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[
            PaddedShiftWindowBlock(
                dim=dim,
                # Unused with always_partition + dynamic_mask; timm requires a value.
                input_resolution=(window_size, window_size),
                num_heads=num_heads,
                window_size=window_size,
                shift_size=0 if i % 2 == 0 else window_size // 2,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_drop=drop,
                attn_drop=attn_drop,
                drop_path=drop_path[i],
            )
            for i in range(depth)
        ])
        self.use_checkpoint = use_checkpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        for block in self.blocks:
            if self.use_checkpoint and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


@BACKBONE_REGISTRY.register()
class D2SwinTransformer(Backbone):
    """Swin Transformer returning res2..res5 (strides patch_size * 2**i), any input size.

    Inputs whose size is not a multiple of the patch are padded bottom/right (as Mask2Former);
    the model pads to ``size_divisibility`` = 32 anyway.
    """

    @configurable
    def __init__(
        self,
        *,
        pretrain_img_size: int = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        ape: bool = False,
        patch_norm: bool = True,
        out_features: Sequence[str] = _STAGE_NAMES,
        use_checkpoint: bool = False,
    ):
        """
        Args:
            pretrain_img_size: image size of the absolute position embedding (only with ``ape``).
            depths, num_heads: blocks and attention heads of each of the (up to 4) stages.
            drop_path_rate: stochastic depth, increased linearly over all blocks.
            ape: add a learned absolute position embedding (interpolated to the input size).
            out_features: subset of res2..res5 to return.
            use_checkpoint: recompute block activations in backward (saves memory when training).
        """
        super().__init__()
        if len(depths) != len(num_heads) or not 1 <= len(depths) <= len(_STAGE_NAMES):
            raise ValueError(f"Swin needs 1-4 stages with one head count each; got depths={list(depths)}, "
                             f"num_heads={list(num_heads)}")
        names = _STAGE_NAMES[: len(depths)]
        unknown = [f for f in out_features if f not in names]
        if unknown:
            raise ValueError(f"MODEL.SWIN.OUT_FEATURES {unknown} not among this Swin's stages {list(names)}")
        self.patch_embed = PatchEmbed(
            img_size=None, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
            norm_layer=nn.LayerNorm if patch_norm else None, output_fmt="NHWC",
            strict_img_size=False, dynamic_img_pad=True,
        )
        self.ape = ape
        if ape:
            grid = pretrain_img_size // patch_size
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, embed_dim, grid, grid))
            trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(drop_rate)

        dims = [embed_dim * 2 ** i for i in range(len(depths))]
        # Python floats, not torch.linspace().tolist(): construction must also work on the meta device.
        total = sum(depths)
        rates = [drop_path_rate * k / max(total - 1, 1) for k in range(total)]
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            start = sum(depths[:i])
            self.layers.append(SwinStage(
                in_dim=dims[max(i - 1, 0)], dim=dims[i], depth=depth, num_heads=num_heads[i],
                window_size=window_size, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate,
                attn_drop=attn_drop_rate, drop_path=rates[start: start + depth], downsample=i > 0,
                use_checkpoint=use_checkpoint,
            ))
        # One output norm per stage, also for stages not returned: official checkpoints hold all four.
        for i, dim in enumerate(dims):
            self.add_module(f"norm{i}", nn.LayerNorm(dim))

        self._out_features = list(out_features)
        self._out_feature_channels = {n: d for n, d in zip(names, dims)}
        self._out_feature_strides = {n: patch_size * 2 ** i for i, n in enumerate(names)}
        self._num_stages_run = max(names.index(f) for f in out_features) + 1
        self.apply(self._init_linear_and_norm)

    @staticmethod
    def _init_linear_and_norm(m: nn.Module):
        # The Swin recipe (truncated normal Linear weights); only matters when training from scratch.
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @classmethod
    def from_config(cls, cfg, input_shape: Optional[ShapeSpec] = None):
        s = cfg.MODEL.SWIN
        if s.QK_SCALE is not None:
            raise ValueError(f"MODEL.SWIN.QK_SCALE={s.QK_SCALE} is not supported: timm's window attention "
                             "always scales by head_dim ** -0.5 (set QK_SCALE to null/None)")
        return {
            "pretrain_img_size": s.PRETRAIN_IMG_SIZE,
            "patch_size": s.PATCH_SIZE,
            "in_chans": input_shape.channels if input_shape is not None and input_shape.channels else 3,
            "embed_dim": s.EMBED_DIM,
            "depths": list(s.DEPTHS),
            "num_heads": list(s.NUM_HEADS),
            "window_size": s.WINDOW_SIZE,
            "mlp_ratio": s.MLP_RATIO,
            "qkv_bias": s.QKV_BIAS,
            "drop_rate": s.DROP_RATE,
            "attn_drop_rate": s.ATTN_DROP_RATE,
            "drop_path_rate": s.DROP_PATH_RATE,
            "ape": s.APE,
            "patch_norm": s.PATCH_NORM,
            "out_features": list(s.OUT_FEATURES),
            "use_checkpoint": s.USE_CHECKPOINT,
        }

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        if x.dim() != 4:
            raise ValueError(f"D2SwinTransformer takes (N, C, H, W) images, got shape {tuple(x.shape)}")
        x = self.patch_embed(x)  # N, H/p, W/p, C
        if self.ape:
            pos = F.interpolate(self.absolute_pos_embed, size=x.shape[1:3], mode="bicubic")
            x = x + pos.permute(0, 2, 3, 1)
        x = self.pos_drop(x)
        outputs = {}
        for i in range(self._num_stages_run):
            x = self.layers[i](x)
            name = _STAGE_NAMES[i]
            if name in self._out_features:
                outputs[name] = getattr(self, f"norm{i}")(x).permute(0, 3, 1, 2).contiguous()
        return outputs

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
            for name in self._out_features
        }

    @property
    def size_divisibility(self) -> int:
        return 32
