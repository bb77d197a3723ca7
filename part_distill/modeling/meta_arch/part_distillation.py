"""PartDistillation (paper Sec 4.1): frozen encoder E + instance decoder D^o + part decoder D^p.

D^p turns N^p learned part queries into part masks M^p, scores s^p and features f^p from the same
pixel-decoder features that D^o reads. At inference every part is assigned to the object of
maximal IoU (Eq. 1), either D^o's predictions or the ground-truth objects of the input
(``MODEL.PART_DISTILL.OBJECTS``). Training targets are the ``"parts"`` of each input
(PartTargetLSJMapper); when D^o is not frozen it also trains on the inputs' ``"instances"``.
"""
import contextlib

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from torch.nn import functional as F

from ..criterion import SetCriterion
from ..part_mask_adapter import build_part_mask_adapter
from ..ranked_inference import rerank_parts
from ..ranker import PartRanker
from ..slot_criterion import SlotSetCriterion
from ..transformer_decoder import build_transformer_decoder
from .instance_segmentor import InstanceSegmentor
from .postprocess import masks_to_output, part_inference

__all__ = ["PartDistillationModel"]

OBJECT_SOURCES = ("predicted", "gt")


@META_ARCH_REGISTRY.register()
class PartDistillationModel(InstanceSegmentor):
    @configurable
    def __init__(self, *, part_predictor, part_criterion, freeze_encoder=True,
                 freeze_instance_decoder=True, objects="predicted", clusters_per_class=8,
                 part_score_thresh=0.0, parts_per_image=0, return_features=True, ranker=None,
                 part_mask_adapter=None, **kwargs):
        """
        Args:
            part_predictor: the part decoder D^p (a masked-attention decoder returning query_features).
            part_criterion: SetCriterion over the part classes.
            freeze_encoder / freeze_instance_decoder: keep E / D^o fixed (no grads, eval mode).
            objects: "predicted" (D^o) or "gt" (``inputs[i]["instances"]``) owners for Eq. 1.
            clusters_per_class, part_score_thresh, parts_per_image, return_features: see
                ``part_inference`` and MODEL.PART_DISTILL.TEST.
            ranker: optional PartRanker (stage 3); once fitted it re-scores class-agnostic parts (Eq. 2).
            part_mask_adapter: optional trainable module (mask_features, backbone_features) -> the
                mask features D^p reads (part_mask_adapter.py); None: D^p reads E's mask features.
            kwargs: InstanceSegmentor arguments (backbone, sem_seg_head, criterion, ...).
        """
        super().__init__(**kwargs)
        if objects not in OBJECT_SOURCES:
            raise ValueError(f"MODEL.PART_DISTILL.OBJECTS must be one of {OBJECT_SOURCES}, got {objects!r}")
        self.part_predictor = part_predictor
        self.part_criterion = part_criterion
        self.objects = objects
        self.clusters_per_class = clusters_per_class
        self.part_score_thresh = part_score_thresh
        self.parts_per_image = parts_per_image
        self.return_features = return_features
        self.ranker = ranker
        self.part_mask_adapter = part_mask_adapter
        self.freeze_encoder = freeze_encoder
        self.freeze_instance_decoder = freeze_instance_decoder
        for module in self.frozen_modules():
            module.requires_grad_(False)
        self.train(self.training)

    @classmethod
    def from_config(cls, cfg):
        ret = InstanceSegmentor.from_config(cfg)
        pd = cfg.MODEL.PART_DISTILL
        rounds = pd.PART_DEC_LAYERS or cfg.MODEL.MASK_FORMER.DEC_LAYERS
        ret["part_predictor"] = build_transformer_decoder(
            cfg, cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM, True,
            num_classes=pd.NUM_PART_CLASSES, num_queries=pd.NUM_PART_QUERIES, dec_layers=rounds - 1,
        )
        criterion_args = SetCriterion.from_config(cfg, num_classes=pd.NUM_PART_CLASSES)
        criterion_args["num_aux_outputs"] = rounds - 1
        if pd.NUM_PART_CLASSES > 1:
            # Stage 4: matched queries are classified among their object class's slots (slot_criterion.py).
            ret["part_criterion"] = SlotSetCriterion(**criterion_args, clusters_per_class=pd.CLUSTERS_PER_CLASS)
        else:
            ret["part_criterion"] = SetCriterion(**criterion_args)
        # Prototypes are buffers: zero until stage 3 fits them, then saved with every checkpoint.
        ret["part_mask_adapter"] = build_part_mask_adapter(cfg, ret["backbone"].output_shape())
        ret["ranker"] = PartRanker(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, pd.CLUSTERS_PER_CLASS,
                                   cfg.MODEL.MASK_FORMER.HIDDEN_DIM)
        ret.update(
            freeze_encoder=pd.FREEZE_ENCODER,
            freeze_instance_decoder=pd.FREEZE_INSTANCE_DECODER,
            objects=pd.OBJECTS,
            clusters_per_class=pd.CLUSTERS_PER_CLASS,
            part_score_thresh=pd.TEST.PART_SCORE_THRESH,
            parts_per_image=pd.TEST.PARTS_PER_IMAGE,
            return_features=pd.TEST.RETURN_FEATURES,
        )
        return ret

    def frozen_modules(self):
        modules = []
        if self.freeze_encoder:
            modules += [self.backbone, self.sem_seg_head.pixel_decoder]
        if self.freeze_instance_decoder:
            modules.append(self.sem_seg_head.predictor)
        return modules

    def train(self, mode=True):
        # Frozen parts stay in eval mode: their norm statistics and dropout must not change.
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self

    def forward(self, batched_inputs):
        """Training: weighted losses (``part_*``, plus ``obj_*`` when D^o trains).
        Inference: ``[{"instances": objects, "parts": part proposals}]`` (docs/formats.md)."""
        images = self.preprocess_image(batched_inputs)
        mask_features, multi_scale, part_mask_features = self.encode_for_parts(images.tensor)
        part_out = self.part_predictor(multi_scale, part_mask_features)
        if self.training:
            return self.losses(batched_inputs, images, mask_features, multi_scale, part_out)
        obj_out = self.sem_seg_head.predictor(multi_scale, mask_features)
        return [self.inference_one(b, x, images, obj_out, part_out) for b, x in enumerate(batched_inputs)]

    def encode_for_parts(self, image_tensor):
        """Normalised padded images -> (mask_features, multi_scale, the mask features D^p reads)."""
        with torch.no_grad() if self.freeze_encoder else contextlib.nullcontext():
            features = self.backbone(image_tensor)
            mask_features, multi_scale = self.sem_seg_head.encode(features)
        if self.part_mask_adapter is None:
            return mask_features, multi_scale, mask_features
        return mask_features, multi_scale, self.part_mask_adapter(mask_features, features)

    def losses(self, batched_inputs, images, mask_features, multi_scale, part_out):
        targets = self.prepare_targets(batched_inputs, images, key="parts")
        c = self.part_criterion
        losses = {f"part_{k}": v for k, v in c.weighted(c(part_out, targets)).items()}
        if not self.freeze_instance_decoder and all("instances" in x for x in batched_inputs):
            obj_out = self.sem_seg_head.predictor(multi_scale, mask_features)
            c = self.criterion
            obj_targets = self.prepare_targets(batched_inputs, images)
            losses.update({f"obj_{k}": v for k, v in c.weighted(c(obj_out, obj_targets)).items()})
        return losses

    def gt_objects(self, x, output_size):
        """Ground-truth object masks (resized to the output resolution) and classes of one input."""
        if "instances" not in x:
            raise KeyError("MODEL.PART_DISTILL.OBJECTS='gt' needs inputs with 'instances' (gt_masks, "
                           "gt_classes): build the test mapper with keep_annotations=True")
        inst = x["instances"].to(self.device)
        masks = getattr(inst.gt_masks, "tensor", inst.gt_masks)
        if tuple(masks.shape[-2:]) != tuple(output_size):
            masks = F.interpolate(masks[None].float(), size=tuple(output_size), mode="nearest")[0] > 0.5
        return masks.bool(), inst.gt_classes

    def owners_and_part_masks(self, b, x, images, obj_out, part_out):
        """(D^o's objects, owner masks, owner classes, part mask logits at output size) of image b."""
        objects = self.objects_of(obj_out, b, images, x)
        image_size = images.image_sizes[b]
        output_size = self.output_size(x, image_size)
        if self.objects == "gt":
            owner_masks, owner_classes = self.gt_objects(x, output_size)
        else:
            owner_masks, owner_classes = objects.pred_masks, objects.pred_classes
        part_masks = masks_to_output(part_out["pred_masks"][b], images.tensor.shape[-2:], image_size,
                                     output_size)
        return objects, owner_masks, owner_classes, part_masks

    def inference_one(self, b, x, images, obj_out, part_out):
        objects, owner_masks, owner_classes, part_masks = self.owners_and_part_masks(b, x, images, obj_out, part_out)
        rerank = self.uses_ranker(part_out["pred_logits"].shape[-1] - 1)
        parts = part_inference(
            part_out["pred_logits"][b], part_masks, owner_masks, owner_classes,
            features=part_out["query_features"][b] if self.return_features or rerank else None,
            clusters_per_class=self.clusters_per_class, score_thresh=self.part_score_thresh,
            top_k=self.parts_per_image,
        )
        if rerank:
            parts = rerank_parts(parts, self.ranker)
            if not self.return_features:
                parts.remove("pred_features")
        return {"instances": objects, "parts": parts}

    def uses_ranker(self, num_part_classes):
        """Stage-3 models (class-agnostic head, fitted ranker) score parts by r; slot heads by themselves."""
        return self.ranker is not None and num_part_classes == 1 and bool(self.ranker.fitted_classes.any())
