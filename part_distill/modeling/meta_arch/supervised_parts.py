"""The part decoder as a supervised part segmenter (few-shot fine-tuning, paper Sec 5.3 / Table 4).

Same encoder, D^o and D^p as PartDistillationModel; only the part head's meaning changes: its
NUM_PART_CLASSES outputs (+ no-object) are the target dataset's part categories, trained with the
plain set criterion (no per-object slots), and each predicted part's ``pred_clusters`` is its
predicted part category, so the mIoU evaluator compares it with the GT part class directly
(``TEST.PARTS.ASSOCIATION identity``).
"""
from detectron2.modeling import META_ARCH_REGISTRY

from ..criterion import SetCriterion
from .part_distillation import PartDistillationModel
from .postprocess import assign_parts_to_objects, mask_quality, owner_classes, ranked_parts

__all__ = ["SupervisedPartModel", "category_part_inference"]


def category_part_inference(class_logits, mask_logits, object_masks, object_classes, *, features=None,
                            score_thresh=0.0, top_k=0):
    """Part predictions of one image from a part-category head, assigned to objects by Eq. 1.

    Args:
        class_logits: [N, P + 1] over P part categories + no-object; mask_logits: [N, H, W].
        object_masks: Bool[M, H, W]; object_classes: Long[M].
    Returns:
        Instances (pred_masks, scores = max category prob x mask quality, pred_clusters = argmax part
        category, object_index, object_classes [, pred_features]) sorted by score.
    """
    binary = mask_logits > 0
    owner, _ = assign_parts_to_objects(binary, object_masks)
    owner_class = owner_classes(owner, object_classes)
    part_prob, category = class_logits.float().softmax(-1)[:, :-1].max(1)
    return ranked_parts(binary, part_prob * mask_quality(mask_logits, binary), category, owner, owner_class,
                        features=features, score_thresh=score_thresh, top_k=top_k)


@META_ARCH_REGISTRY.register()
class SupervisedPartModel(PartDistillationModel):
    """PartDistillationModel whose part head classifies part categories (``pred_clusters`` = category)."""

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        pd = cfg.MODEL.PART_DISTILL
        # The parent picks the stage-4 slot criterion for NUM_PART_CLASSES > 1; categories need the plain one.
        args = SetCriterion.from_config(cfg, num_classes=pd.NUM_PART_CLASSES)
        args["num_aux_outputs"] = (pd.PART_DEC_LAYERS or cfg.MODEL.MASK_FORMER.DEC_LAYERS) - 1
        ret["part_criterion"] = SetCriterion(**args)
        return ret

    def inference_one(self, objects, owner_masks, owner_classes, part_outputs):
        logits, part_masks, features = part_outputs
        parts = category_part_inference(
            logits, part_masks, owner_masks, owner_classes,
            features=features if self.return_features else None,
            score_thresh=self.part_score_thresh, top_k=self.parts_per_image,
        )
        return {"instances": objects, "parts": parts}
