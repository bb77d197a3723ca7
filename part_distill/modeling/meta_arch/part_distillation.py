"""PartDistillation (paper Sec 4.1): frozen encoder E + instance decoder D^o + part decoder D^p.

D^p turns N^p learned part queries into part masks M^p, scores s^p and features f^p from the same
pixel-decoder features that D^o reads. At inference every part is assigned to the object of
maximal IoU (Eq. 1), either D^o's predictions or the ground-truth objects of the input
(``MODEL.PART_DISTILL.OBJECTS``). Training targets are the ``"parts"`` of each input
(PartTargetLSJMapper); when D^o is not frozen it also trains on the inputs' ``"instances"``.
"""
import contextlib
import logging
from typing import NamedTuple

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from torch.nn import functional as F

from ...config import num_object_classes
from ..criterion import SetCriterion
from ..object_crops import OUTSIDE_LOGIT, CropSettings, crop_regions, mask_boxes, paste_regions
from ..part_mask_adapter import build_part_mask_adapter
from ..pixel_decoder import build_pixel_decoder
from ..ranked_inference import rerank_parts
from ..ranker import PartRanker
from ..slot_criterion import SlotSetCriterion
from ..transformer_decoder import build_transformer_decoder
from .gt_class_map import build_gt_class_lookup
from .instance_segmentor import InstanceSegmentor
from .postprocess import masks_to_output, part_inference

logger = logging.getLogger(__name__)

__all__ = ["PartDistillationModel", "FREEZE_MODES", "PartFeatures"]

OBJECT_SOURCES = ("predicted", "gt")
# What D^p training may change (MODEL.PART_DISTILL.FREEZE, docs/learning.md):
#   encoder      backbone + whole pixel decoder fixed; D^p reads the teacher's features as they are
#   reference    the reference's FREEZE_KEYS: backbone + the pixel decoder's deformable encoder fixed; the
#                rest of the pixel decoder (input projections, FPN convs, mask features) trains and D^o reads
#                the same, drifting features
#   part_branch  ours: D^o reads the frozen teacher features; D^p reads a part pixel decoder of its own,
#                initialised from the teacher's, that trains except for its deformable encoder
#   none         everything trains (the backbone within MODEL.BACKBONE.FREEZE_AT)
FREEZE_MODES = ("encoder", "reference", "part_branch", "none")
# Pixel-decoder modules whose qualified name contains one of these stay frozen in "reference" and
# "part_branch" (the reference's FREEZE_KEYS minus "backbone", which is frozen as a whole).
ENCODER_KEYS = ("encoder",)


class PartFeatures(NamedTuple):
    """What the decoders read: D^o the teacher's (mask_features, multi_scale), D^p its own pair."""
    mask_features: torch.Tensor
    multi_scale: list
    part_mask_features: torch.Tensor
    part_multi_scale: list


def _encoder_submodules(pixel_decoder):
    """The outermost submodules of a pixel decoder whose names contain an ENCODER_KEYS entry."""
    found = []
    for name, module in pixel_decoder.named_modules():
        if name and any(k in name for k in ENCODER_KEYS) and not any(name.startswith(f + ".") for f, _ in found):
            found.append((name, module))
    return [m for _, m in found]


@META_ARCH_REGISTRY.register()
class PartDistillationModel(InstanceSegmentor):
    @configurable
    def __init__(self, *, part_predictor, part_criterion, freeze="encoder",
                 freeze_instance_decoder=True, objects="predicted", clusters_per_class=8,
                 part_score_thresh=0.0, parts_per_image=0, return_features=True, ranker=None,
                 part_mask_adapter=None, part_pixel_decoder=None, object_crop=None, gt_class_lookup=None,
                 **kwargs):
        """
        Args:
            part_predictor: the part decoder D^p (a masked-attention decoder returning query_features).
            part_criterion: SetCriterion over the part classes.
            freeze: one of FREEZE_MODES, what of E stays fixed (no grads, eval mode) while D^p trains.
            freeze_instance_decoder: keep D^o fixed.
            objects: "predicted" (D^o) or "gt" (``inputs[i]["instances"]``) owners for Eq. 1.
            clusters_per_class, part_score_thresh, parts_per_image, return_features: see
                ``part_inference`` and MODEL.PART_DISTILL.TEST.
            ranker: optional PartRanker (stage 3); once fitted it re-scores class-agnostic parts (Eq. 2).
            part_mask_adapter: optional trainable module (mask_features, backbone_features) -> the
                mask features D^p reads (part_mask_adapter.py); None: D^p reads E's mask features.
            part_pixel_decoder: D^p's own pixel decoder (required by, and only used with, freeze
                "part_branch"); checkpoints without its keys initialise it from the teacher's.
            object_crop: CropSettings: D^p reads object-centric crops (object_crops.py); None: whole images.
            gt_class_lookup: optional LongTensor, GT class id -> the model's class id (-1: none), for GT
                objects of another vocabulary (gt_class_map.py); None keeps the ids.
            kwargs: InstanceSegmentor arguments (backbone, sem_seg_head, criterion, ...).
        """
        super().__init__(**kwargs)
        if objects not in OBJECT_SOURCES:
            raise ValueError(f"MODEL.PART_DISTILL.OBJECTS must be one of {OBJECT_SOURCES}, got {objects!r}")
        if freeze not in FREEZE_MODES:
            raise ValueError(f"MODEL.PART_DISTILL.FREEZE must be one of {FREEZE_MODES}, got {freeze!r}")
        if object_crop is not None and not freeze_instance_decoder:
            # Crop batches hold objects, not images: D^o has no targets there.
            raise ValueError("MODEL.PART_DISTILL.OBJECT_CROP trains the part decoder only: set "
                             "MODEL.PART_DISTILL.FREEZE_INSTANCE_DECODER True")
        if (freeze == "part_branch") != (part_pixel_decoder is not None):
            raise ValueError("a part pixel decoder is built for, and only for, MODEL.PART_DISTILL.FREEZE 'part_branch'")
        self.part_predictor = part_predictor
        self.part_criterion = part_criterion
        self.objects = objects
        self.clusters_per_class = clusters_per_class
        self.part_score_thresh = part_score_thresh
        self.parts_per_image = parts_per_image
        self.return_features = return_features
        self.ranker = ranker
        self.part_mask_adapter = part_mask_adapter
        self.part_pixel_decoder = part_pixel_decoder
        self.object_crop = object_crop
        # Not a buffer: it describes the test data, not the model, and stays out of checkpoints.
        self.gt_class_lookup = gt_class_lookup
        self.freeze = freeze
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
        if pd.FREEZE == "part_branch":
            ret["part_pixel_decoder"] = build_pixel_decoder(cfg, ret["backbone"].output_shape())
        if pd.OBJECTS == "predicted" and num_object_classes(cfg) != cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES:
            # D^o's class ids would index a ranker fitted on another vocabulary (docs/configs.md).
            logger.warning("MODEL.PART_DISTILL.OBJECTS 'predicted' with NUM_OBJECT_CLASSES %d != the instance "
                           "decoder's %d classes: ranked scores and slots use D^o's ids as vocabulary ids",
                           num_object_classes(cfg), cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
        ret["ranker"] = PartRanker(num_object_classes(cfg), pd.CLUSTERS_PER_CLASS,
                                   cfg.MODEL.MASK_FORMER.HIDDEN_DIM)
        ret.update(
            freeze=pd.FREEZE,
            object_crop=CropSettings.from_config(cfg),
            freeze_instance_decoder=pd.FREEZE_INSTANCE_DECODER,
            objects=pd.OBJECTS,
            clusters_per_class=pd.CLUSTERS_PER_CLASS,
            part_score_thresh=pd.TEST.PART_SCORE_THRESH,
            parts_per_image=pd.TEST.PARTS_PER_IMAGE,
            return_features=pd.TEST.RETURN_FEATURES,
            gt_class_lookup=build_gt_class_lookup(cfg),
        )
        return ret

    def frozen_modules(self):
        modules = []
        if self.freeze != "none":
            modules.append(self.backbone)
        if self.freeze in ("encoder", "part_branch"):
            modules.append(self.sem_seg_head.pixel_decoder)
        elif self.freeze == "reference":
            modules += _encoder_submodules(self.sem_seg_head.pixel_decoder)
        if self.part_pixel_decoder is not None:
            modules += _encoder_submodules(self.part_pixel_decoder)
        if self.freeze_instance_decoder:
            modules.append(self.sem_seg_head.predictor)
        return modules

    def checkpoint_key_sources(self):
        """{prefix: prefix it is initialised from when a checkpoint has no key under it} (checkpoint.py)."""
        if self.part_pixel_decoder is None:
            return {}
        return {"part_pixel_decoder.": "sem_seg_head.pixel_decoder."}

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
        if self.training:
            if self.object_crop is not None:
                return self.crop_losses(batched_inputs, images)
            # Training a frozen D^o computes no object outputs, so it needs no teacher features either.
            feats = self.encode_for_parts(images.tensor, with_objects=not self.freeze_instance_decoder)
            return self.losses(batched_inputs, images, feats, self.predict_parts(feats))
        feats = self.encode_for_parts(images.tensor, with_parts=self.object_crop is None)
        obj_out = self.predict_objects(feats)
        part_out = None if self.object_crop is not None else self.predict_parts(feats)
        return [self.inference_one(*r) for r in self.infer(batched_inputs, images, obj_out, part_out)]

    def encode_for_parts(self, image_tensor, with_objects=True, with_parts=True):
        """Normalised padded images -> PartFeatures (what D^o and what D^p read).

        ``with_objects=False`` may leave D^o's pair None (with a part pixel decoder, nothing else reads it);
        ``with_parts=False`` leaves D^p's pair None (object crops: D^p reads the crops instead).
        """
        with torch.no_grad() if self.freeze != "none" else contextlib.nullcontext():
            features = self.backbone(image_tensor)
        mask_features = multi_scale = None
        if with_objects or (with_parts and self.part_pixel_decoder is None):
            # The teacher's pixel decoder needs no graph when nothing of it trains.
            with torch.no_grad() if self.freeze in ("encoder", "part_branch") else contextlib.nullcontext():
                mask_features, multi_scale = self.sem_seg_head.encode(features)
        if not with_parts:
            return PartFeatures(mask_features, multi_scale, None, None)
        part_mask_features, part_multi_scale = mask_features, multi_scale
        if self.part_pixel_decoder is not None:
            part_mask_features, _, part_multi_scale = self.part_pixel_decoder.forward_features(features)
        if self.part_mask_adapter is not None:
            part_mask_features = self.part_mask_adapter(part_mask_features, features)
        return PartFeatures(mask_features, multi_scale, part_mask_features, part_multi_scale)

    def predict_parts(self, feats):
        return self.part_predictor(feats.part_multi_scale, feats.part_mask_features)

    def predict_objects(self, feats):
        return self.sem_seg_head.predictor(feats.multi_scale, feats.mask_features)

    def losses(self, batched_inputs, images, feats, part_out):
        targets = self.prepare_targets(batched_inputs, images, key="parts")
        c = self.part_criterion
        losses = {f"part_{k}": v for k, v in c.weighted(c(part_out, targets)).items()}
        if not self.freeze_instance_decoder and all("instances" in x for x in batched_inputs):
            obj_out = self.predict_objects(feats)
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
        classes = inst.gt_classes
        if self.gt_class_lookup is not None:
            classes = self.gt_class_lookup.to(classes.device)[classes]
        if not len(masks):  # an image without GT objects (interpolate rejects an empty batch)
            return masks.new_zeros((0, *output_size), dtype=torch.bool), classes
        if tuple(masks.shape[-2:]) != tuple(output_size):
            masks = F.interpolate(masks[None].float(), size=tuple(output_size), mode="nearest")[0] > 0.5
        return masks.bool(), classes

    def crop_losses(self, batched_inputs, images):
        """Part losses on object-centric crops: every object of the batch that owns parts (at most
        OBJECT_CROP.MAX_PER_IMAGE random ones per image), cropped with a jittered box; the targets are
        that object's parts, cropped alike."""
        crop = self.object_crop
        index, object_masks, part_masks, labels = [], [], [], []
        for b, x in enumerate(batched_inputs):
            if "part_objects" not in x:
                raise KeyError(f"MODEL.PART_DISTILL.OBJECT_CROP needs each training input's objects ('part_objects'): "
                               f"{x.get('file_name', '')!r} has none; train on a part store or a *_parts dataset")
            parts, objs = x["parts"].to(self.device), x["part_objects"].to(self.device)
            pmasks = getattr(parts.gt_masks, "tensor", parts.gt_masks)
            omasks = getattr(objs.gt_masks, "tensor", objs.gt_masks)
            owners = [j for j in torch.randperm(len(objs)).tolist()
                      if omasks[j].any() and bool((parts.object_ids == objs.object_ids[j]).any())]
            if crop.max_per_image > 0:
                owners = owners[:crop.max_per_image]
            for j in owners:
                sel = parts.object_ids == objs.object_ids[j]
                index.append(b)
                object_masks.append(omasks[j])
                part_masks.append(pmasks[sel])
                labels.append(parts.gt_classes[sel])
        if not index:
            # No object with parts in the batch: one whole-image crop without targets keeps every
            # parameter in the graph (DDP) and teaches "no part" on it.
            h, w = images.tensor.shape[-2:]
            boxes = torch.tensor([[0.0, 0.0, float(w), float(h)]], device=self.device)
            index, targets = [0], [{"labels": torch.zeros(0, dtype=torch.int64, device=self.device),
                                    "masks": torch.zeros((0, crop.size, crop.size), dtype=torch.bool, device=self.device)}]
        else:
            boxes = crop.boxes(mask_boxes(torch.stack(object_masks)), train=True)
            targets = []
            for box, pm, lab in zip(boxes, part_masks, labels):
                cm = crop_regions(pm[:, None].float(), box.expand(len(pm), 4), crop.size)[:, 0] > 0.5
                keep = cm.flatten(1).any(1)
                targets.append({"labels": lab[keep], "masks": cm[keep]})
        crops = crop_regions(images.tensor, boxes, crop.size, batch_index=torch.tensor(index, device=self.device))
        part_out = self.predict_parts(self.encode_for_parts(crops, with_objects=False))
        c = self.part_criterion
        return {f"part_{k}": v for k, v in c.weighted(c(part_out, targets)).items()}

    def crop_part_outputs(self, images, owner_masks, output_sizes):
        """D^p on a crop of each owner object of every image: per image (class logits [M*Q, C+1], mask
        logits [M*Q, H, W] at its output size, query features [M*Q, D]); crop m's queries are rows m*Q..."""
        crop = self.object_crop
        boxes, index = [], []
        for b, (masks, size) in enumerate(zip(owner_masks, output_sizes)):
            out_boxes = crop.boxes(mask_boxes(masks.bool()))
            image_size = images.image_sizes[b]
            to_input = torch.tensor([image_size[1] / size[1], image_size[0] / size[0]] * 2, device=out_boxes.device)
            boxes.append((out_boxes, out_boxes * to_input))
            index += [b] * len(masks)
        head = self.part_predictor.class_embed
        if not index:
            return [(torch.zeros((0, head.out_features), device=self.device), torch.zeros((0, *size), device=self.device),
                     torch.zeros((0, head.in_features), device=self.device)) for size in output_sizes]
        crops = crop_regions(images.tensor, torch.cat([bi for _, bi in boxes]), crop.size,
                             batch_index=torch.tensor(index, device=self.device))
        # All crops of the batch in one pass of the part branch.
        part_out = self.predict_parts(self.encode_for_parts(crops, with_objects=False))
        results, start = [], 0
        for (out_boxes, _), masks, size in zip(boxes, owner_masks, output_sizes):
            sl = slice(start, start + len(masks))
            start += len(masks)
            logits = F.interpolate(part_out["pred_masks"][sl].float(), size=(crop.size, crop.size), mode="bilinear",
                                   align_corners=False)
            pasted = paste_regions(logits, out_boxes, size)
            if crop.clip_to_object:
                pasted = torch.where(masks.bool()[:, None], pasted, torch.full_like(pasted, OUTSIDE_LOGIT))
            results.append((part_out["pred_logits"][sl].flatten(0, 1), pasted.flatten(0, 1),
                            part_out["query_features"][sl].flatten(0, 1)))
        return results

    def owner_objects(self, x, objects, output_size):
        """(owner masks Bool[M, H, W], owner classes [M]) of one input: GT or D^o's ``objects``."""
        if self.objects == "gt":
            return self.gt_objects(x, output_size)
        return objects.pred_masks, objects.pred_classes

    def part_outputs(self, images, part_out, owner_masks, output_sizes):
        """Per image (class logits, mask logits at its output size, query features) of its part queries:
        of ``part_out`` (whole images) or of crops of ``owner_masks`` (OBJECT_CROP)."""
        if self.object_crop is not None:
            return self.crop_part_outputs(images, owner_masks, output_sizes)
        return [(part_out["pred_logits"][b],
                 masks_to_output(part_out["pred_masks"][b], images.tensor.shape[-2:], images.image_sizes[b], size),
                 part_out["query_features"][b]) for b, size in enumerate(output_sizes)]

    def infer(self, batched_inputs, images, obj_out, part_out):
        """Per input (D^o's objects, owner masks, owner classes, part outputs as ``part_outputs``)."""
        sizes = [self.output_size(x, images.image_sizes[b]) for b, x in enumerate(batched_inputs)]
        objects = [self.objects_of(obj_out, b, images, x) for b, x in enumerate(batched_inputs)]
        owners = [self.owner_objects(x, o, s) for x, o, s in zip(batched_inputs, objects, sizes)]
        parts = self.part_outputs(images, part_out, [m for m, _ in owners], sizes)
        return [(o, m, c, p) for o, (m, c), p in zip(objects, owners, parts)]

    def inference_one(self, objects, owner_masks, owner_classes, part_outputs):
        logits, part_masks, features = part_outputs
        rerank = self.uses_ranker(logits.shape[-1] - 1)
        parts = part_inference(
            logits, part_masks, owner_masks, owner_classes,
            features=features if self.return_features or rerank else None,
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
