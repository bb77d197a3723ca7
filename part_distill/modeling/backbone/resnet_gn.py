"""detectron2's ResNet, switched to GroupNorm when it is trained from scratch.

FrozenBN only makes sense on top of pretrained statistics: with random weights its identity
"statistics" never adapt and training diverges. This builder keeps detectron2's ResNet (so
R50 checkpoints of Mask2Former/detectron2 load unchanged) and only swaps the norm layer when
``MODEL.WEIGHTS`` is empty.
"""
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.resnet import build_resnet_backbone

__all__ = ["build_resnet_gn_backbone", "resnet_norm_for"]


def resnet_norm_for(cfg) -> str:
    """The norm the ResNet should use: RESNETS.NORM, unless it is FrozenBN without weights."""
    norm = cfg.MODEL.RESNETS.NORM
    if not cfg.MODEL.WEIGHTS and norm == "FrozenBN":
        return cfg.MODEL.RESNETS.NORM_WITHOUT_WEIGHTS
    return norm


@BACKBONE_REGISTRY.register()
def build_resnet_gn_backbone(cfg, input_shape: ShapeSpec):
    """``build_resnet_backbone`` with RESNETS.NORM replaced as described in :func:`resnet_norm_for`."""
    norm = resnet_norm_for(cfg)
    if norm != cfg.MODEL.RESNETS.NORM:
        cfg = cfg.clone()
        cfg.defrost()
        cfg.MODEL.RESNETS.NORM = norm
    return build_resnet_backbone(cfg, input_shape)
