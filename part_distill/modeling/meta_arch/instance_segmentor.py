"""The instance segmentation model (encoder E + instance decoder D^o), trained on instance labels.

It is the teacher of PartDistillation: its encoder features are mined for parts and its object
predictions own the parts at inference (Eq. 1). Module names follow Mask2Former
(``backbone``, ``sem_seg_head.pixel_decoder``, ``sem_seg_head.predictor``, ``criterion``) so its
COCO instance checkpoints load unchanged.
"""
import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.structures import ImageList
from torch import nn

from ..criterion import SetCriterion
from .mask_head import MaskDecoderHead
from .postprocess import instance_inference, masks_to_output

__all__ = ["InstanceSegmentor"]


@META_ARCH_REGISTRY.register()
class InstanceSegmentor(nn.Module):
    @configurable
    def __init__(self, *, backbone, sem_seg_head, criterion, pixel_mean, pixel_std,
                 size_divisibility, detections_per_image=100, object_score_thresh=0.0):
        """
        Args:
            backbone: detectron2 Backbone; sem_seg_head: a MaskDecoderHead.
            criterion: SetCriterion of the instance decoder.
            pixel_mean, pixel_std: per-channel normalisation of the input images.
            size_divisibility: inputs are padded to a multiple of this.
            detections_per_image: (query, class) pairs kept per image at inference.
            object_score_thresh: predicted objects below this score are dropped at inference.
        """
        super().__init__()
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head
        self.criterion = criterion
        self.size_divisibility = size_divisibility
        self.detections_per_image = detections_per_image
        self.object_score_thresh = object_score_thresh
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        return {
            "backbone": backbone,
            "sem_seg_head": MaskDecoderHead(cfg, backbone.output_shape()),
            "criterion": SetCriterion(cfg),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "size_divisibility": max(cfg.MODEL.MASK_FORMER.SIZE_DIVISIBILITY,
                                     backbone.size_divisibility),
            "detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "object_score_thresh": cfg.MODEL.PART_DISTILL.TEST.OBJECT_SCORE_THRESH,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    # ------------------------------------------------------------------ shared steps
    def preprocess_image(self, batched_inputs):
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        return ImageList.from_tensors(images, self.size_divisibility)

    def encode(self, images):
        """Encoder E: images -> (mask_features, multi_scale_features)."""
        return self.sem_seg_head.encode(self.backbone(images.tensor))

    def prepare_targets(self, batched_inputs, images, key="instances"):
        """Criterion targets from ``batched_inputs[i][key]``: masks zero-padded to the padded batch."""
        height, width = images.tensor.shape[-2:]
        targets = []
        for x in batched_inputs:
            if key not in x:
                raise KeyError(f"training input {x.get('file_name', '')!r} has no {key!r} targets; "
                               "check INPUT.DATASET_MAPPER_NAME")
            inst = x[key].to(self.device)
            masks = getattr(inst.gt_masks, "tensor", inst.gt_masks)
            padded = masks.new_zeros((masks.shape[0], height, width), dtype=torch.bool)
            padded[:, : masks.shape[1], : masks.shape[2]] = masks
            targets.append({"labels": inst.gt_classes, "masks": padded})
        return targets

    @staticmethod
    def output_size(x, image_size):
        return x.get("height", image_size[0]), x.get("width", image_size[1])

    def objects_of(self, outputs, b, images, x):
        """Instances of image ``b`` of a decoder output, at the input's output resolution."""
        image_size = images.image_sizes[b]
        masks = masks_to_output(outputs["pred_masks"][b], images.tensor.shape[-2:], image_size,
                                self.output_size(x, image_size))
        return instance_inference(outputs["pred_logits"][b], masks, top_k=self.detections_per_image,
                                  score_thresh=self.object_score_thresh)

    # ------------------------------------------------------------------ forward
    def forward(self, batched_inputs):
        """Training: dict of weighted losses. Inference: ``[{"instances": Instances}]`` per image."""
        images = self.preprocess_image(batched_inputs)
        mask_features, multi_scale = self.encode(images)
        outputs = self.sem_seg_head.predictor(multi_scale, mask_features)
        if self.training:
            targets = self.prepare_targets(batched_inputs, images)
            return self.criterion.weighted(self.criterion(outputs, targets))
        return [{"instances": self.objects_of(outputs, b, images, x)}
                for b, x in enumerate(batched_inputs)]
