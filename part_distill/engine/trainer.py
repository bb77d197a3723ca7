"""The one DefaultTrainer subclass that serves every stage; the stage is ``cfg.PART_DISTILL.STAGE``.

Two guards a long run needs: a non-finite loss stops training with the iteration and the loss's
name, before the optimizer step can spread it into the weights (the last checkpoint stays good);
training images the mapper had to skip are counted in the metrics (``data/skipped_images``) and in a
summary when training ends.
"""
import itertools
import weakref
import logging
import os

import torch
from detectron2.data import MetadataCatalog, build_detection_test_loader
from detectron2.engine import AMPTrainer, DefaultTrainer, HookBase, SimpleTrainer, TrainerBase, create_ddp_model, hooks
from detectron2.engine.hooks import PeriodicCheckpointer
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

from ..data.fingerprint import CHECKPOINT_KEY, check_resume, checkpoint_fingerprints
from ..data.mappers import InstanceLSJMapper, build_dataset_mapper
from ..data.train_loader import build_train_loader
from .resume_state import RestoreRNGHook, RNGState

logger = logging.getLogger(__name__)

__all__ = ["PartDistillTrainer", "build_optimizer", "full_model_clip_optimizer", "check_finite_losses",
           "SkippedImagesHook", "wrap_ddp"]

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


def check_finite_losses(loss_dict, iteration):
    """Raise ``FloatingPointError`` naming ``iteration`` and every loss of ``loss_dict`` that is NaN/inf."""
    bad = {k: v for k, v in loss_dict.items() if not bool(torch.isfinite(v.detach()).all())}
    if bad:
        values = ", ".join(f"{k}={v.detach().float().sum().item()}" for k, v in sorted(bad.items()))
        raise FloatingPointError(
            f"Non-finite loss at iteration {iteration}: {values}. Training stopped before the optimizer "
            "step, so the last checkpoint is intact; lower SOLVER.BASE_LR, check the inputs "
            "(MODEL.PIXEL_STD, the labels) or resume from the checkpoint.")


class _FiniteLossCheck:
    """Mixin for detectron2's SimpleTrainer / AMPTrainer: their ``run_step`` hands the loss dict to
    ``_write_metrics`` after backward and before ``optimizer.step``, the one place to see it in time."""

    def _write_metrics(self, loss_dict, data_time, prefix="", iter=None):
        check_finite_losses(loss_dict, self.iter if iter is None else iter)
        super()._write_metrics(loss_dict, data_time, prefix=prefix, iter=iter)


_CHECKED_TRAINERS = {}


def _finite_loss_checked(trainer_cls):
    if trainer_cls not in _CHECKED_TRAINERS:
        _CHECKED_TRAINERS[trainer_cls] = type(f"FiniteLoss{trainer_cls.__name__}", (_FiniteLossCheck, trainer_cls), {})
    return _CHECKED_TRAINERS[trainer_cls]


class SkippedImagesHook(HookBase):
    """Puts the mapper's count of skipped (unreadable) training images into the storage each step and
    logs the total when training ends; the count covers every DataLoader worker of this process."""

    def __init__(self, counter):
        self.counter = counter

    def after_step(self):
        self.trainer.storage.put_scalar("data/skipped_images", self.counter.skipped, smoothing_hint=False)

    def after_train(self):
        if self.counter.skipped:
            logger.warning("Training skipped %d unreadable image read(s) (each logged above with its file name; "
                           "an image is skipped each time it is drawn)", self.counter.skipped)


def wrap_ddp(model):
    """``model`` in DistributedDataParallel when there are several processes (gradients all-reduced);
    device_ids only for a CUDA model (a CPU model under gloo takes none)."""
    if comm.get_world_size() == 1:
        return model
    on_cuda = next(model.parameters()).device.type == "cuda"
    return create_ddp_model(model, broadcast_buffers=False, device_ids=[comm.get_local_rank()] if on_cuda else None)


def _counting_skips(loader, mapper):
    # Read by build_hooks: the SkippedImagesHook reports what the mapper skipped.
    loader.skipped_images = getattr(mapper, "skipped_images", None)
    return loader


class PartDistillTrainer(DefaultTrainer):
    """detectron2's DefaultTrainer with part_distill's mappers, optimiser, evaluators and guards."""

    def __init__(self, cfg):
        # DefaultTrainer.__init__'s steps, with two changes: the DDP wrapper also works for CPU
        # (gloo) processes, and the checkpointer is ours from the start, so the periodic-checkpoint
        # hook saves through it (atomic files, and checkpointables added later such as the EMA).
        from ..modeling.checkpoint import PartDistillCheckpointer

        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        if cfg.SEED >= 0:
            # A fixed SEED makes the stage reproducible whatever ran before it in this process.
            seed_all_rng(cfg.SEED + comm.get_rank())
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = wrap_ddp(model)
        # The loss check sits in the inner trainer's run_step, after backward and before the optimizer step.
        self._trainer = _finite_loss_checked(AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(
            model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        # MODEL.WEIGHTS may be an official Mask2Former checkpoint (Swin key layout, .pkl): load
        # through the converting checkpointer. Saving is unchanged (same format either way).
        self.checkpointer = PartDistillCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        # Every checkpoint (periodic, final) records the data it was trained on; resume checks it.
        self.checkpointer.metadata = {CHECKPOINT_KEY: checkpoint_fingerprints(cfg.DATASETS.TRAIN)}
        # Exact resumes (engine/resume_state.py): the sample-stream position and the RNGs.
        self.sampler = getattr(data_loader, "stream_sampler", None)
        self.rng_state = RNGState()
        self.checkpointer.add_checkpointable("rng", self.rng_state)
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks() + [RestoreRNGHook(self.rng_state, cfg.DATALOADER.NUM_WORKERS)])

    def register_hooks_before_checkpoint(self, hooks):
        """Register ``hooks`` before the periodic checkpointer, so a checkpoint saved after step i
        holds their state after step i too (e.g. an EMA updated in after_step)."""
        at = next((i for i, h in enumerate(self._hooks) if isinstance(h, PeriodicCheckpointer)), len(self._hooks))
        for h in hooks:
            h.trainer = weakref.proxy(self)
        self._hooks[at:at] = hooks

    def resume_or_load(self, resume=True):
        """detectron2's, except that resuming means loading an intact checkpoint (see
        PartDistillCheckpointer.resume_or_load): with none, training starts at iteration 0."""
        self.checkpointer.resume_or_load(self.cfg.MODEL.WEIGHTS, resume=resume)
        if self.checkpointer.resumed_from is None:
            return
        # A checkpoint trained on other data must not be continued on this data.
        check_resume(self.checkpointer.last_metadata.get(CHECKPOINT_KEY),
                     self.checkpointer.metadata[CHECKPOINT_KEY], self.checkpointer.resumed_from)
        # A checkpoint stores the iteration that had finished.
        self.start_iter = self.iter + 1
        if self.sampler is not None:
            if self._trainer._data_loader_iter_obj is not None:
                logger.warning("the train loader is already iterating: its stream cannot move to iteration %d",
                               self.start_iter)
            # The global stream position after the samples the finished iterations consumed.
            self.sampler.start = self.start_iter * self.cfg.SOLVER.IMS_PER_BATCH
        final = os.path.join(self.cfg.OUTPUT_DIR, "model_final.pth")
        if self.start_iter >= self.max_iter and not os.path.isfile(final) and comm.is_main_process():
            # Killed between the last periodic save and the final one: train() will not run to write it.
            self.checkpointer.save("model_final", iteration=self.iter)
        comm.synchronize()

    @classmethod
    def build_train_loader(cls, cfg):
        mapper = build_dataset_mapper(cfg, is_train=True)
        return _counting_skips(build_train_loader(cfg, mapper), mapper)

    def build_hooks(self):
        ret = super().build_hooks()
        counter = getattr(self._trainer.data_loader, "skipped_images", None)
        if counter is not None:
            # Before the writers, so each step's count is in the metrics they write.
            at = next((i for i, h in enumerate(ret) if isinstance(h, hooks.PeriodicWriter)), len(ret))
            ret.insert(at, SkippedImagesHook(counter))
        return ret

    def state_dict(self):
        ret = super().state_dict()
        if self.sampler is not None:
            # The seed a resumed run needs to continue the same shuffle (it may be a random draw).
            ret["data_stream"] = {"seed": self.sampler.seed}
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if self.sampler is None:
            return
        if "data_stream" in state_dict:
            self.sampler.seed = state_dict["data_stream"]["seed"]
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
