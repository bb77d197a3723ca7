"""Meta-architectures; importing this package registers them in detectron2's META_ARCH_REGISTRY."""
from .instance_segmentor import InstanceSegmentor  # noqa: F401
from .part_distillation import PartDistillationModel  # noqa: F401
from .supervised_parts import SupervisedPartModel  # noqa: F401
from .postprocess import (  # noqa: F401
    assign_parts_to_objects,
    instance_inference,
    masks_to_output,
    pairwise_mask_iou,
    part_inference,
)
