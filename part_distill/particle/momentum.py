"""The momentum (target) encoder of PARTICLE/BYOL: an EMA of the online weights, never back-propagated."""
import copy

import torch

__all__ = ["make_target", "ema_update_"]


def make_target(online: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of ``online`` that starts equal to it (BYOL initialises xi = theta)."""
    target = copy.deepcopy(online)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update_(target: torch.nn.Module, online: torch.nn.Module, momentum: float) -> None:
    """w_t <- m * w_t + (1 - m) * w_s for every parameter; buffers are copied from ``online``.

    Buffers (BN statistics, frozen-BN affine terms, pixel means) are not learned by gradient
    descent, so averaging them would only lag; copying keeps the two encoders' normalisation equal.
    Parameters are matched by name: a structural difference raises instead of silently mixing.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"PARTICLE.MOMENTUM must lie in [0, 1], got {momentum}")
    t_params, s_params = dict(target.named_parameters()), dict(online.named_parameters())
    if t_params.keys() != s_params.keys():
        raise ValueError("target and online networks differ in their parameters: "
                         f"{sorted(t_params.keys() ^ s_params.keys())[:5]}")
    for name, t in t_params.items():
        t.mul_(momentum).add_(s_params[name].detach(), alpha=1.0 - momentum)
    t_bufs, s_bufs = dict(target.named_buffers()), dict(online.named_buffers())
    if t_bufs.keys() != s_bufs.keys():
        raise ValueError("target and online networks differ in their buffers: "
                         f"{sorted(t_bufs.keys() ^ s_bufs.keys())[:5]}")
    for name, t in t_bufs.items():
        t.copy_(s_bufs[name])
