"""Gradient penalties for any training loop: R1, R2 and lazy R1 (DESIGN.md sections 1, 4, 8).

R1 (Mescheder et al. 2018) penalizes the discriminator's input gradient on real images,
R2 the same on generated images:

    penalty = gamma / 2 * mean over the batch of ||grad_x D(x)||^2

The input gradient comes from ``autograd.grad(D(x).sum(), x, create_graph=True)`` (a double
backward when the penalty is minimized); its per-sample squared norm from
``fastgan.grad_sq_norm``. The inner pass computes no weight or bias gradients
(``fastgan.no_weight_gradients()``, and the autograd engine skips them too).

``LazyR1`` applies R1 every ``interval`` minibatches, as StyleGAN2 does: gamma is multiplied
by the interval and Adam's learning rate and betas are adjusted so the regularized optimizer
behaves as if it stepped every minibatch.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from fastgan.grad_control import no_weight_gradients
from fastgan.ops.grad_sq_norm import grad_sq_norm


class GradPenalty(NamedTuple):
    """What a gradient penalty computed.

    ``loss``: the scalar ``gamma / 2 * grad_sq_norm.mean()`` to minimize.
    ``grad_sq_norm``: ``[N]``, ``||grad_x D(x)[n]||^2`` per sample (float32 or float64).
    ``outputs``: ``D(x)``. Under ``DistributedDataParallel``, whose gradient hooks do not see
    a loss built only from ``autograd.grad``, add ``0 * outputs.sum()`` to the loss.
    """
    loss: torch.Tensor
    grad_sq_norm: torch.Tensor
    outputs: torch.Tensor


def _check_gamma(gamma) -> float:
    gamma = float(gamma)
    if not (math.isfinite(gamma) and gamma >= 0):
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma}")
    return gamma


def grad_penalty(outputs: torch.Tensor, inputs: torch.Tensor, gamma: float) -> GradPenalty:
    """The penalty on ``grad_inputs outputs.sum()`` for ``outputs`` already computed from
    ``inputs`` (which must require grad); lets a loop reuse the forward pass of its main loss.

    ``inputs``: ``[N, ...]``; ``outputs``: ``D(inputs)``, any shape with batch dim ``N``.
    """
    gamma = _check_gamma(gamma)
    if not inputs.requires_grad:
        raise ValueError("inputs must require grad (x.detach().requires_grad_()) before D(x)")
    with no_weight_gradients():
        grad, = torch.autograd.grad(outputs.sum(), inputs, create_graph=True)
    sq_norm = grad_sq_norm(grad)
    return GradPenalty(sq_norm.mean() * (gamma / 2), sq_norm, outputs)


def _penalty_at(D, x: torch.Tensor, gamma: float, args, kwargs) -> GradPenalty:
    x = x.detach().requires_grad_(True)
    return grad_penalty(D(x, *args, **kwargs), x, gamma)


def r1_penalty(D, reals: torch.Tensor, gamma: float, *args, **kwargs) -> GradPenalty:
    """R1: ``gamma / 2 * mean ||grad_x D(x)||^2`` at the real images ``reals`` ``[N, C, H, W]``.

    ``D`` is any callable module; ``args``/``kwargs`` (e.g. class labels) are passed to it.
    Returns a ``GradPenalty``; minimize its ``loss``.
    """
    return _penalty_at(D, reals, gamma, args, kwargs)


def r2_penalty(D, fakes: torch.Tensor, gamma: float, *args, **kwargs) -> GradPenalty:
    """R2: the same penalty at generated images ``fakes`` (detached here, so the generator
    receives no gradient from it)."""
    return _penalty_at(D, fakes, gamma, args, kwargs)


class LazyR1:
    """R1 every ``interval`` minibatches with StyleGAN2's compensations.

    ``interval`` of ``None``, 0 or 1 means every minibatch (not lazy). ``gamma == 0`` disables
    R1: ``due()`` is always False and no Adam adjustment is made.
    """

    def __init__(self, gamma: float, interval: int | None = 16):
        self.gamma = _check_gamma(gamma)
        if interval is None:
            interval = 1
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 0:
            raise ValueError(f"interval must be None or an integer >= 0, got {interval!r}")
        self.interval = max(interval, 1)

    @property
    def enabled(self) -> bool:
        return self.gamma > 0

    @property
    def lazy(self) -> bool:
        """True when R1 runs as its own optimizer step every ``interval > 1`` minibatches."""
        return self.enabled and self.interval > 1

    def due(self, step: int) -> bool:
        """Whether R1 runs at minibatch ``step`` (0-based): ``step % interval == 0``."""
        return self.enabled and step % self.interval == 0

    @property
    def effective_gamma(self) -> float:
        """The gamma to apply when R1 runs: ``gamma * interval``."""
        return self.gamma * self.interval

    @property
    def ratio(self) -> float:
        """``r = k / (k + 1)`` for a lazy interval ``k``, else 1: the fraction of the
        discriminator's optimizer steps that are main-loss steps."""
        return self.interval / (self.interval + 1) if self.lazy else 1.0

    def adam_params(self, lr: float, betas=(0.0, 0.99)) -> tuple[float, tuple[float, float]]:
        """``(lr * r, (beta1 ** r, beta2 ** r))``, the discriminator's Adam settings."""
        r = self.ratio
        return lr * r, (betas[0] ** r, betas[1] ** r)

    def penalty(self, D, reals: torch.Tensor, *args, **kwargs) -> GradPenalty:
        """``r1_penalty`` with the effective gamma, for the minibatches where it is due."""
        return r1_penalty(D, reals, self.effective_gamma, *args, **kwargs)

    def __repr__(self):
        return f"LazyR1(gamma={self.gamma}, interval={self.interval})"
