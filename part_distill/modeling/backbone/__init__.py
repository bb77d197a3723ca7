"""Backbones; importing this package registers them in detectron2's BACKBONE_REGISTRY."""
from .efficientnet_lite import (  # noqa: F401
    EfficientNetLiteBackbone,
    build_efficientnet_lite_backbone,
    efficientnet_lite_pretrained_path,
    load_efficientnet_lite,
)
from .resnet_gn import build_resnet_gn_backbone, resnet_norm_for  # noqa: F401
from .swin import D2SwinTransformer  # noqa: F401
# Registers detectron2's build_resnet_deeplab_backbone (MODEL.RESNETS.STEM_TYPE "basic" | "deeplab").
from detectron2.projects.deeplab import resnet as _deeplab_resnet  # noqa: F401,E402
