"""The one DefaultTrainer subclass that serves every stage; the stage is ``cfg.PART_DISTILL.STAGE``."""
import itertools
import weakref
import logging
import os

import torch
from detectron2.data import MetadataCatalog, build_detection_test_loader
from detectron2.engine import DefaultTrainer
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

from ..data.mappers import InstanceLSJMapper
from ..data.train_loader import build_train_loader

logger = logging.getLogger(__name__)

__all__ = ["PartDistillTrainer", "build_optimizer", "full_model_clip_optimizer"]

OPTIMIZERS = {"ADAMW": torch.optim.AdamW, "SGD": torch.optim.SGD}


def full_model_clip_optimizer(optimizer_cls, max_norm, norm_type=2.0):
    """``optimizer_cls`` whose ``step`` first clips the global gradient norm of all its params
    (Mask2Former's "full_model" clipping; detectron2 only clips per parameter)."""

    class FullModelClipOptimizer(optimizer_cls):
        def step(self, closure=None):
            params = itertools.chain(*(g["params"] for g in self.param_groups))
            torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type)
            return super().step(closure=closure)

    FullModelClipOptimizer.__name__ = f"FullModelClip{optimizer_cls.__name__}"
    return FullModelClipOptimizer


def build_optimizer(cfg, model):
    """AdamW/SGD over trainable params; backbone LR x SOLVER.BACKBONE_MULTIPLIER; gradient clipping."""
    s = cfg.SOLVER
    if s.OPTIMIZER not in OPTIMIZERS:
        raise ValueError(f"SOLVER.OPTIMIZER must be one of {sorted(OPTIMIZERS)}, got {s.OPTIMIZER!r}")
    params = get_default_optimizer_params(
        model,
        base_lr=s.BASE_LR,
        weight_decay=s.WEIGHT_DECAY,
        weight_decay_norm=s.WEIGHT_DECAY_NORM,
        lr_factor_func=lambda name: s.BACKBONE_MULTIPLIER if name.startswith("backbone.") else 1.0,
    )
    cls = OPTIMIZERS[s.OPTIMIZER]
    clip = s.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        cls = full_model_clip_optimizer(cls, clip.CLIP_VALUE, clip.NORM_TYPE)
    else:
        cls = maybe_add_gradient_clipping(cfg, cls)
    kwargs = {"momentum": s.MOMENTUM, "nesterov": s.NESTEROV} if s.OPTIMIZER == "SGD" else {}
    return cls(params, lr=s.BASE_LR, **kwargs)


class PartDistillTrainer(DefaultTrainer):
    """detectron2's DefaultTrainer with part_distill's mappers, optimiser and evaluators."""

    def __init__(self, cfg):
        super().__init__(cfg)
        # MODEL.WEIGHTS may be an official Mask2Former checkpoint (Swin key layout, .pkl): load
        # through the converting checkpointer. Saving is unchanged (same format either way).
        from ..modeling.checkpoint import PartDistillCheckpointer

        self.checkpointer = PartDistillCheckpointer(
            self.checkpointer.model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))

    @classmethod
    def build_train_loader(cls, cfg):
        return build_train_loader(cfg)

    def _stream_sampler(self):
        return getattr(self._trainer.data_loader, "stream_sampler", None)

    def resume_or_load(self, resume=True):
        """detectron2's resume, then the data stream continues after the batches already trained on.

        Exact when DATALOADER.ASPECT_RATIO_GROUPING is off; with it, images waiting in the aspect
        buckets at the checkpoint may be skipped or seen twice (at most batch - 1 per bucket and
        worker). Augmentation draws are not checkpointed: they restart from the process seed.
        """
        super().resume_or_load(resume=resume)
        sampler = self._stream_sampler()
        if sampler is not None:
            if self._trainer._data_loader_iter_obj is not None:
                logger.warning("the train loader is already iterating: its stream cannot move to iteration %d",
                               self.start_iter)
            sampler.start = self.start_iter * self.cfg.SOLVER.IMS_PER_BATCH

    def state_dict(self):
        ret = super().state_dict()
        sampler = self._stream_sampler()
        if sampler is not None:
            # The seed a resumed run needs to continue the same shuffle (it may be a random draw).
            ret["data_stream"] = {"seed": sampler.seed}
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        sampler = self._stream_sampler()
        if sampler is None:
            return
        if "data_stream" in state_dict:
            sampler.seed = state_dict["data_stream"]["seed"]
        else:
            logger.warning("checkpoint without a data-stream seed (older part_distill): the resumed run "
                           "draws a new shuffle")

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=InstanceLSJMapper(cfg, False))

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """COCO mask AP for instance datasets; the part evaluators for ``*_parts`` datasets."""
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        evaluator_type = getattr(MetadataCatalog.get(dataset_name), "evaluator_type", "coco")
        if evaluator_type == "parts":
            from .. import evaluation  # local: the evaluation package may register lazily

            builder = getattr(evaluation, "build_evaluators", None) or evaluation.build_part_evaluators
            evaluators = builder(cfg, dataset_name, output_folder)
            if isinstance(evaluators, (list, tuple)):
                evaluators = evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)
            return evaluators
        # detectron2 here has no _C extension: the fast COCO eval is unavailable.
        return COCOEvaluator(dataset_name, tasks=("segm",), distributed=True,
                             output_dir=output_folder, use_fast_impl=False)
