"""What a training checkpoint needs beyond detectron2's so that a resumed run continues the
uninterrupted one: the position in the sample stream and the random-number generators.

detectron2 restarts the data stream at its first sample on a resume (the first iterations' images
are seen again) and does not save the RNGs. Here:

* :class:`~part_distill.data.samplers.ResumableTrainingSampler` is detectron2's ``TrainingSampler``
  that starts after the samples the finished iterations consumed (the trainer sets ``start``); exact
  when every batch takes IMS_PER_BATCH consecutive samples of the stream (one aspect-ratio group,
  e.g. square images), close otherwise;
* :class:`RNGState` saves the torch / numpy / python RNG states in each checkpoint and, on a
  single-process resume with ``DATALOADER.NUM_WORKERS 0`` (where the augmentations draw from these
  generators), restores them just before the first resumed step (:class:`RestoreRNGHook`); with a
  fixed SEED the loader has its own generator, so making its iterator (at the first step of the
  uninterrupted run, again after the resume) draws nothing from them. With several processes or
  loader workers the RNGs are not restored (each rank / worker has its own; the checkpoint holds
  rank 0's only), so augmentations then differ from the uninterrupted run.

So a single-process, NUM_WORKERS 0, fixed-SEED run killed anywhere and resumed ends with the
weights of the uninterrupted run (tests/test_kill_resume.py checks this bit for bit).
"""
import logging
import random

import numpy as np
import torch
from detectron2.engine import HookBase
from detectron2.utils import comm

__all__ = ["RNGState", "RestoreRNGHook"]

logger = logging.getLogger(__name__)


class RNGState:
    """Checkpointable RNG states; ``load_state_dict`` keeps them until :meth:`restore`."""

    def __init__(self):
        self.pending = None

    def state_dict(self):
        # Tensors and plain Python values only: checkpoints are read with torch.load(weights_only=True).
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        return {"torch": torch.get_rng_state(), "python": random.getstate(),
                "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                          "has_gauss": int(has_gauss), "gauss": float(gauss)}}

    def load_state_dict(self, state):
        self.pending = state

    def restore(self):
        """Apply the loaded states (once); returns whether there were any."""
        state, self.pending = self.pending, None
        if state is None:
            return False
        torch.set_rng_state(state["torch"])
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
        random.setstate(state["python"])
        return True


class RestoreRNGHook(HookBase):
    """Restores a resumed run's RNGs before its first step (see the module docstring)."""

    def __init__(self, rng_state, num_workers):
        self.rng_state = rng_state
        self.num_workers = num_workers

    def before_train(self):
        if self.rng_state.pending is None:
            return
        if comm.get_world_size() > 1 or self.num_workers > 0:
            self.rng_state.pending = None
            logger.info("Resumed without the saved RNG states (several processes or loader workers): "
                        "augmentations differ from an uninterrupted run")
            return
        self.rng_state.restore()
