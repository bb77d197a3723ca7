"""The networks of PARTICLE's training step: online encoder f_theta + projector g_theta + predictor
q_theta, momentum encoder f_xi + projector g_xi (Eq. 2), and optionally SelfPatch's heads.

The encoders are :class:`~part_distill.mining.features.BackboneFeatures` hypercolumns over
``PARTICLE.CONTRAST_LEVELS``: the levels that mining reads are the ones that get adapted (the paper
pools the last ResNet stage; on 128 px views that grid is 4 x 4 and most parts vanish from it).
``forward`` of the extractor (not its no-grad ``__call__``) keeps the graph for training.
"""
import torch
from torch import nn

from .discovery import build_hypercolumn_extractor
from .losses import (MLPHead, PatchAggregation, PrototypeHead, SelfPatchCenter, mask_pool, neighbor_positives,
                     part_contrastive_loss, selfpatch_loss)
from .momentum import ema_update_, make_target

__all__ = ["ParticleModel"]


class _Tap:
    """Keeps the last output dict of a backbone (SelfPatch reads a raw level beside the hypercolumn)."""

    def __init__(self, module):
        self.out = None
        module.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        self.out = output


class ParticleModel(nn.Module):
    def __init__(self, backbone, *, contrast_levels, num_parts, pixel_mean, pixel_std, input_format="RGB",
                 proj_hidden_dim=512, proj_dim=128, pred_hidden_dim=512, temperature=0.1, contrast_weight=1.0,
                 selfpatch=None):
        """``selfpatch``: None, or a dict with level, num_neighbors, out_dim, student_temp, teacher_temp,
        num_heads, weight."""
        super().__init__()
        self.encoder = build_hypercolumn_extractor(backbone, contrast_levels, pixel_mean, pixel_std, input_format)
        self.encoder.backbone.train()
        shapes = backbone.output_shape()
        dim = sum(shapes[lv].channels for lv in contrast_levels)
        self.num_parts = int(num_parts)
        self.temperature = float(temperature)
        self.contrast_weight = float(contrast_weight)
        self.projector = MLPHead(dim, proj_hidden_dim, proj_dim)
        self.predictor = MLPHead(proj_dim, pred_hidden_dim, proj_dim)
        self.selfpatch = dict(selfpatch) if selfpatch else None
        if self.selfpatch:
            lv = self.selfpatch["level"]
            if lv not in shapes:
                raise ValueError(f"PARTICLE.SELFPATCH.LEVEL {lv!r} is not an output of the backbone ({sorted(shapes)})")
            sdim = shapes[lv].channels
            self.sp_aggregate = PatchAggregation(sdim, self.selfpatch["num_heads"])
            self.sp_head = PrototypeHead(sdim, 2 * sdim, self.selfpatch["out_dim"])
            self.sp_center = SelfPatchCenter(self.selfpatch["out_dim"])
        # The momentum branch copies exactly the modules it averages (ema_update_ matches by name).
        self.target = make_target(self._ema_sources())
        self._tap = _Tap(self.encoder.backbone)
        self._target_tap = _Tap(self.target["encoder"].backbone)

    def _ema_sources(self):
        mods = {"encoder": self.encoder, "projector": self.projector}
        if self.selfpatch:
            mods["sp_head"] = self.sp_head
        return nn.ModuleDict(mods)

    def backbone_state_dict(self):
        """The online backbone under detectron2 model names ("backbone.*"), what mining loads."""
        return {f"backbone.{k}": v.detach().cpu().clone() for k, v in self.encoder.backbone.state_dict().items()}

    @torch.no_grad()
    def momentum_update(self, momentum):
        ema_update_(self.target, self._ema_sources(), momentum)

    def forward(self, images, labels):
        """images: [2B, 3, S, S] (views x of B images then views x' of the same images, RGB 0..255),
        labels: [2B, S, S]. Returns a dict of weighted losses plus "num_parts" (positives contrasted)."""
        b2 = images.shape[0]
        if b2 % 2:
            raise ValueError("ParticleModel expects the two views of each image stacked: an even batch")
        b = b2 // 2
        online = self.encoder.forward(images)
        online_levels = self._tap.out
        with torch.no_grad():
            target = self.target["encoder"].forward(images)
            target_levels = self._target_tap.out
        pooled, counts = mask_pool(online, labels, self.num_parts)
        with torch.no_grad():
            t_pooled, _ = mask_pool(target, labels, self.num_parts)
        # A part is contrasted when it is visible in both views of its image.
        valid = (counts[:b] > 0) & (counts[b:] > 0)  # [B, K]
        losses = {}
        n = int(valid.sum())
        if n >= 2:
            both = torch.cat([valid, valid])
            p = self.predictor(self.projector(pooled[both]))
            with torch.no_grad():
                z = self.target["projector"](t_pooled[both])
            # Symmetrised (BYOL/DetCon): x predicts x' and x' predicts x.
            loss = 0.5 * (part_contrastive_loss(p[:n], z[n:], self.temperature)
                          + part_contrastive_loss(p[n:], z[:n], self.temperature))
        else:
            # Nothing to contrast (all parts cropped away); keep the graph so DDP ranks stay in step.
            loss = online.sum() * 0.0 + sum(q.sum() for q in self.parameters() if q.requires_grad) * 0.0
        losses["loss_part_contrast"] = self.contrast_weight * loss
        if self.selfpatch:
            losses["loss_selfpatch"] = self.selfpatch["weight"] * self._selfpatch(online_levels, target_levels)
        return losses, n

    def _selfpatch(self, online_levels, target_levels):
        sp = self.selfpatch
        s = online_levels[sp["level"]]
        t = target_levels[sp["level"]].detach()
        index, valid = neighbor_positives(t, sp["num_neighbors"])
        s_tok, t_tok = s.flatten(2).transpose(1, 2), t.flatten(2).transpose(1, 2)
        student = self.sp_head(self.sp_aggregate(s_tok, index, valid))
        with torch.no_grad():
            teacher = self.target["sp_head"](t_tok)
        loss = selfpatch_loss(student, teacher, index, valid, sp["student_temp"], sp["teacher_temp"],
                              self.sp_center.center)
        self.sp_center.update(teacher)
        return loss
