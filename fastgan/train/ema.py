"""Exponential moving average of the generator's weights, with StyleGAN2-ADA's ramp-up."""
from __future__ import annotations

import copy

import torch


def ema_beta(batch_size: int, cur_nimg: int, ema_kimg: float = 10.0,
             rampup: float | None = 0.05) -> float:
    """The decay for one step of ``batch_size`` images: ``0.5 ** (batch_size / ema_nimg)``,
    i.e. the average's half-life is ``ema_nimg`` images, where ``ema_nimg = ema_kimg * 1000``,
    capped at ``cur_nimg * rampup`` (images seen before this step) while training is young."""
    ema_nimg = ema_kimg * 1000
    if rampup:
        ema_nimg = min(ema_nimg, cur_nimg * rampup)
    return 0.5 ** (batch_size / max(ema_nimg, 1e-8))


class EMA:
    """A frozen copy of ``model`` (``.model``) tracking its weights; buffers are copied."""

    def __init__(self, model: torch.nn.Module, ema_kimg: float = 10.0,
                 rampup: float | None = 0.05):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.ema_kimg, self.rampup = ema_kimg, rampup

    @torch.no_grad()
    def update(self, model: torch.nn.Module, batch_size: int, cur_nimg: int) -> None:
        """Blend in ``model`` after a step on ``batch_size`` images, ``cur_nimg`` seen before."""
        beta = ema_beta(batch_size, cur_nimg, self.ema_kimg, self.rampup)
        for p_ema, p in zip(self.model.parameters(), model.parameters()):
            p_ema.lerp_(p, 1 - beta)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)
