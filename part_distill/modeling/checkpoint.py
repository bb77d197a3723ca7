"""Loading Mask2Former checkpoints (``model_final_*.pkl`` / ``.pth``) into part_distill models.

Our modules already use Mask2Former's names for the ResNet backbone, ``sem_seg_head.pixel_decoder``,
``sem_seg_head.predictor`` and ``criterion``; what differs is the Swin backbone, built from timm:

* patch merging sits at the start of the next stage: official ``layers.{i}.downsample.*`` is our
  ``layers.{i+1}.downsample.*``;
* ``attn.relative_position_index`` (and ``attn_mask`` in some Swin releases) are derived buffers,
  not saved by timm: they are checked against the model's window size, then dropped.

``PartDistillCheckpointer`` applies these renames before detectron2's loading (its shape check
would otherwise discard the shifted patch-merging weights), for detectron2 model-zoo pickles
(``{"model": ..., "__author__": ...}``), plain ``torch.save`` state dicts and the name-matched
ImageNet Swin pickles (``matching_heuristics``) alike, and for Hugging Face ``transformers``
Mask2Former weights (a ``save_pretrained`` folder, ``.safetensors``, ``.bin``), renamed to the
original names first by ``hf_import.convert_hf_mask2former_state_dict``. It keeps the last load's
missing/unexpected/incorrect-shape keys in ``last_incompatible``.

It also makes training resumable after a kill anywhere: checkpoints and ``last_checkpoint`` are
written atomically; a resume deletes the temp files a killed save left and loads the newest
*intact* ``model_{iter}.pth`` / ``model_final.pth`` (a damaged one is named in a warning and
skipped, so its iterations are trained, and it is saved, again); ``resumed_from`` names the file,
None when training starts from ``MODEL.WEIGHTS``. A damaged file given to :meth:`load` raises
:class:`~part_distill.utils.io.DamagedFileError` naming it.
"""
import logging
import os
import re
from typing import Dict, Iterable, List, Optional

import torch
from detectron2.checkpoint import DetectionCheckpointer
from fvcore.common.checkpoint import _IncompatibleKeys
from timm.models.swin_transformer import get_relative_position_index

from ..data.fingerprint import CHECKPOINT_KEY
from ..utils.io import DamagedFileError, atomic_open, atomic_write_bytes, remove_stale_temps
from .backbone.swin import D2SwinTransformer
from .hf_import import (convert_hf_mask2former_state_dict, hf_weights_file, is_hf_mask2former_state_dict,
                        read_hf_state_dict)

__all__ = ["PartDistillCheckpointer", "convert_mask2former_state_dict", "convert_swin_state_dict",
           "fill_from_sources", "swin_prefixes"]

logger = logging.getLogger(__name__)

_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.(.+)$")
# Files a training run saves with its full state (the resume candidates).
_TRAINING_CHECKPOINT = re.compile(r"^model_(\d+|final)\.pth$")
_DERIVED_BUFFER = re.compile(r"^layers\.\d+\.blocks\.\d+\.(attn\.relative_position_index|attn_mask)$")


def swin_prefixes(model: torch.nn.Module) -> List[str]:
    """State-dict prefixes (e.g. ``"backbone."``) of every D2SwinTransformer inside ``model``."""
    return [f"{name}." if name else "" for name, m in model.named_modules() if isinstance(m, D2SwinTransformer)]


def _check_relative_position_index(key: str, value: torch.Tensor, model_state: Dict[str, torch.Tensor],
                                   bias_key: str) -> None:
    """An official index must equal the one our window size implies, or the bias table is misread."""
    table = model_state.get(bias_key)
    if table is None:
        return
    window = int(round((value.shape[0]) ** 0.5))
    expected_table_rows = (2 * window - 1) ** 2
    if window * window != value.shape[0] or table.shape[0] != expected_table_rows:
        raise ValueError(f"checkpoint {key} has shape {tuple(value.shape)}, which does not fit the model's "
                         f"window size (bias table {tuple(table.shape)}); check MODEL.SWIN.WINDOW_SIZE")
    if not torch.equal(torch.as_tensor(value).long(), get_relative_position_index(window, window)):
        raise ValueError(f"checkpoint {key} is not the standard Swin relative position index")


def convert_swin_state_dict(state_dict: Dict[str, torch.Tensor], prefix: str = "",
                            model_state: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """Rename the Swin keys under ``prefix`` from Mask2Former's layout to ours; other keys pass through.

    A state dict already in our layout (no patch merging in stage 0) is returned unchanged, so
    our own checkpoints and official ones go through the same loader.
    """
    if f"{prefix}layers.0.downsample.reduction.weight" not in state_dict:
        return dict(state_dict)
    converted = {}
    dropped = 0
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            converted[key] = value
            continue
        rel = key[len(prefix):]
        if _DERIVED_BUFFER.match(rel):
            if rel.endswith("relative_position_index") and model_state is not None:
                bias_key = key.replace("relative_position_index", "relative_position_bias_table")
                _check_relative_position_index(key, value, model_state, bias_key)
            dropped += 1
            continue
        m = _DOWNSAMPLE.match(rel)
        if m:
            rel = f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}"
        converted[prefix + rel] = value
    logger.info(f"Converted Mask2Former Swin keys under '{prefix}' to the timm layout "
                f"({dropped} derived buffers dropped)")
    return converted


def convert_mask2former_state_dict(state_dict: Dict[str, torch.Tensor], model: torch.nn.Module,
                                   extra_prefixes: Iterable[str] = ()) -> Dict[str, torch.Tensor]:
    """Official Mask2Former state dict -> the names of ``model`` (all renames this module knows)."""
    model_state = model.state_dict()
    out = dict(state_dict)
    # Mask2Former's own legacy rename (decoder checkpoints of version < 2).
    for key in [k for k in out if ".static_query." in k]:
        out[key.replace(".static_query.", ".query_feat.")] = out.pop(key)
    for prefix in list(swin_prefixes(model)) + list(extra_prefixes):
        out = convert_swin_state_dict(out, prefix, model_state)
    return out


def fill_from_sources(state_dict: Dict[str, torch.Tensor], model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Initialise the modules a checkpoint lacks from the ones ``model.checkpoint_key_sources()`` names.

    E.g. a part pixel decoder starts as a copy of the teacher's pixel decoder when MODEL.WEIGHTS is the
    instance teacher, and loads its own trained weights from a part model's checkpoint.
    """
    sources = getattr(model, "checkpoint_key_sources", dict)()
    out = dict(state_dict)
    for target, source in sources.items():
        if any(k.startswith(target) for k in out):
            continue
        copied = {target + k[len(source):]: v.clone() for k, v in state_dict.items() if k.startswith(source)}
        if copied:
            logger.info(f"'{target}*' is not in the checkpoint: initialised from '{source}*' ({len(copied)} keys)")
        out.update(copied)
    return out


class PartDistillCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer that also loads Mask2Former's official checkpoints (R50 and Swin).

    ``MODEL.WEIGHTS`` may be a detectron2 model-zoo ``.pkl``, a ``.pth`` saved by Mask2Former or by
    us, an ImageNet Swin ``.pkl`` converted for detectron2 (keys without ``backbone.``), or Hugging
    Face Mask2Former weights (``save_pretrained`` folder, ``.safetensors``, ``.bin``).
    """

    last_incompatible: Optional[_IncompatibleKeys] = None
    resumed_from: Optional[str] = None
    # Saved into every checkpoint this checkpointer writes (e.g. the trainer's dataset fingerprints),
    # beside what the hooks pass to save(); a load keeps the file's own entries in ``last_metadata``.
    metadata: Optional[Dict] = None
    last_metadata: Dict = {}
    METADATA_KEYS = (CHECKPOINT_KEY,)

    def save(self, name, **kwargs):
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(self.metadata or {})
        data.update(kwargs)
        path = os.path.join(self.save_dir, f"{name}.pth")
        self.logger.info(f"Saving checkpoint to {path}")
        with atomic_open(path, "wb") as f:
            torch.save(data, f)
        self.tag_last_checkpoint(os.path.basename(path))

    def tag_last_checkpoint(self, last_filename_basename):
        atomic_write_bytes(os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename.encode())

    def load(self, path, checkpointables=None):
        # fvcore only opens files: a save_pretrained folder stands for its weights file.
        if path and os.path.isdir(path):
            path = hf_weights_file(path)
        try:
            extra = super().load(path, checkpointables)
        finally:
            # detectron2 resets it only when a load succeeds; a failed one would block the next.
            self._parsed_url_during_load = None
        self.last_metadata = {k: extra[k] for k in self.METADATA_KEYS if k in (extra or {})}
        return extra

    def _load_file(self, filename):
        if filename.endswith((".safetensors", ".index.json")):
            return {"model": read_hf_state_dict(filename), "__author__": "huggingface"}
        try:
            return super()._load_file(filename)
        except OSError:
            raise
        except Exception as e:  # torch / pickle name no file when a checkpoint is cut short
            raise DamagedFileError(f"checkpoint {filename} is damaged or not a checkpoint "
                                   f"({type(e).__name__}: {e})") from e

    def resume_candidates(self) -> List[str]:
        """Full-state checkpoints in ``save_dir``, newest first."""
        if not self.save_dir or not os.path.isdir(self.save_dir):
            return []
        found = [m.group(1) for m in map(_TRAINING_CHECKPOINT.match, os.listdir(self.save_dir)) if m]
        # "final" is saved after the last numbered one.
        found.sort(key=lambda it: (it == "final", int(it) if it != "final" else 0), reverse=True)
        paths = [os.path.join(self.save_dir, f"model_{it}.pth") for it in found]
        # A kill between a save and its tag leaves last_checkpoint one behind: the newest file wins,
        # and the tag only adds a checkpoint of another name.
        last = self.get_checkpoint_file() if self.has_checkpoint() else ""
        if os.path.isfile(last) and last not in paths:
            paths = [last] + paths
        return paths

    def resume_or_load(self, path, *, resume=True):
        """Resume from the newest intact training checkpoint, else load ``path`` (weights only)."""
        from detectron2.utils import comm

        self.resumed_from = None
        if resume and self.save_dir:
            if comm.is_main_process():
                # Every rank is here, before any save: no atomic write is in progress.
                remove_stale_temps(self.save_dir)
            for candidate in self.resume_candidates():
                try:
                    out = self.load(candidate)
                except DamagedFileError as e:
                    logger.warning(f"{e}: not resuming from it")
                    continue
                self.resumed_from = candidate
                return out
        return self.load(path, checkpointables=[])

    def _load_model(self, checkpoint) -> _IncompatibleKeys:
        self._convert_ndarray_to_tensor(checkpoint["model"])
        if is_hf_mask2former_state_dict(checkpoint["model"]):
            logger.info("Converting a Hugging Face Mask2Former state dict to the original names")
            checkpoint["model"] = convert_hf_mask2former_state_dict(checkpoint["model"])
        # Name-matched checkpoints hold keys relative to the backbone ("layers.0...").
        extra = [""] if checkpoint.get("matching_heuristics", False) else []
        checkpoint["model"] = convert_mask2former_state_dict(checkpoint["model"], self.model, extra)
        checkpoint["model"] = fill_from_sources(checkpoint["model"], self.model)
        incompatible = super()._load_model(checkpoint)
        self.last_incompatible = incompatible
        return incompatible
