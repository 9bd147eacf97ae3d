"""Gradient penalties for any training loop: R1, R2 and lazy R1 (docs/design.md sections 1, 4, 8).

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

``r1_r2_penalty`` applies R1 and R2 together, as R3GAN does at every step (docs/design.md
section 8). Where no layer of D mixes samples, reals and fakes go through D as one batch with
one double backward.
"""
from __future__ import annotations

import math
import warnings
import weakref
from typing import NamedTuple

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from fastgan.grad_control import no_weight_gradients
from fastgan.models.layers import MinibatchStd
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
    sq_norm = _input_grad_sq_norm(outputs, inputs)
    return GradPenalty(sq_norm.mean() * (gamma / 2), sq_norm, outputs)


def _input_grad_sq_norm(outputs: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """``[N]``: ``||grad_inputs outputs.sum()||^2`` per sample, differentiable (the inner pass
    computes no weight gradients)."""
    with no_weight_gradients():
        grad, = torch.autograd.grad(outputs.sum(), inputs, create_graph=True)
    return grad_sq_norm(grad)


def _penalty_at(D, x: torch.Tensor, gamma: float, args, kwargs) -> GradPenalty:
    x = x.detach().requires_grad_(True)
    return grad_penalty(D(x, *args, **kwargs), x, gamma)


def r1_penalty(D, reals: torch.Tensor, gamma: float, *args, **kwargs) -> GradPenalty:
    """R1: ``gamma / 2 * mean ||grad_x D(x)||^2`` at the real images ``reals`` ``[N, C, H, W]``.

    ``D`` is any callable module; ``args``/``kwargs`` (e.g. class labels) are passed to it.
    Returns a ``GradPenalty``; minimize its ``loss``.

    The bias of a fused layer (``fastgan.nn``, ``conv2d_act``, ``bias_act``) gets a gradient
    from the penalty alone exactly when the layer comes before, in D's forward, a layer whose
    input gradient depends on the values of its input: in fastgan's models only
    ``MinibatchStd`` (a standard deviation), elsewhere e.g. normalizations or smooth
    activations in plain torch. That gradient is the true one (in general nonzero; eager gives
    the same). Every other fused bias -- all of them in a D without such a layer, those after
    the minibatch-stddev layer in one with it -- gets **no gradient (None)**: through linear,
    ReLU/leaky-ReLU, clamp, pooling and resampling layers the penalty depends on a bias only
    via the piecewise-constant slopes, whose derivative the fused ops return as None (zero
    almost everywhere), so the double backward never runs their backward on zeros. Eager autograd gives zeros
    there (None for a bias no activation follows, e.g. the last layer's). Adam skips a
    parameter whose gradient is None; StyleGAN2-ADA's ``0 * logits`` term gives every
    parameter a zero gradient instead, so that Adam still decays its moments.
    ``fastgan.train.TrainSteps.r1_step`` does the latter (zeros for every parameter without a
    gradient), for fused and eager layers alike.
    """
    return _penalty_at(D, reals, gamma, args, kwargs)


def r2_penalty(D, fakes: torch.Tensor, gamma: float, *args, **kwargs) -> GradPenalty:
    """R2: the same penalty at generated images ``fakes`` (detached here, so the generator
    receives no gradient from it)."""
    return _penalty_at(D, fakes, gamma, args, kwargs)


class R1R2Penalty(NamedTuple):
    """What ``r1_r2_penalty`` computed.

    ``loss``: ``r1_gamma / 2 * r1_grad_sq_norm.mean() + r2_gamma / 2 * r2_grad_sq_norm.mean()``.
    ``r1_grad_sq_norm``: ``[N_real]``, ``||grad_x D(x)||^2`` at each real image.
    ``r2_grad_sq_norm``: ``[N_fake]``, the same at each generated image.
    ``real_outputs``, ``fake_outputs``: ``D(reals)``, ``D(fakes)``, differentiable with respect to
    D's parameters, for the main loss (e.g. RpGAN's ``softplus(D(fake) - D(real))``).
    ``joint``: True when reals and fakes went through D as one batch with one double backward;
    False when they went separately (two forwards, two double backwards).
    ``coupled``: the layers that made the joint pass invalid, ``'name (Type)'``; empty when
    ``joint`` or when the caller asked for separate passes.
    """
    loss: torch.Tensor
    r1_grad_sq_norm: torch.Tensor
    r2_grad_sq_norm: torch.Tensor
    real_outputs: torch.Tensor
    fake_outputs: torch.Tensor
    joint: bool
    coupled: tuple[str, ...]


def batch_coupled_layers(D) -> tuple[str, ...]:
    """The layers of ``D`` through which one sample's output depends on other samples, as
    ``'name (Type)'``: ``MinibatchStd`` and batch norms that use batch statistics (training,
    or no running statistics). Only known layer types are seen: a module whose own forward
    mixes samples (e.g. ``x - x.mean(0)``) is not. A ``D`` that is not an ``nn.Module`` cannot
    be inspected and is reported as ``('<D is not an nn.Module> (Type)',)``."""
    if not isinstance(D, torch.nn.Module):
        return (f"<D is not an nn.Module> ({type(D).__name__})",)
    return tuple(f"{name or '<root>'} ({type(m).__name__})" for name, m in D.named_modules()
                 if isinstance(m, MinibatchStd)
                 or (isinstance(m, _BatchNorm) and (m.training or m.running_mean is None)))


_warned_fallback = weakref.WeakSet()  # discriminators already warned about


def _first_fallback(D) -> bool:
    """True the first time ``D`` falls back to separate penalties (always, for a ``D`` that
    cannot be weakly referenced)."""
    try:
        if D in _warned_fallback:
            return False
        _warned_fallback.add(D)
    except TypeError:
        pass
    return True


def _check_batch(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a tensor [N, ...] with N >= 1, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")


def r1_r2_penalty(D, reals: torch.Tensor, fakes: torch.Tensor, r1_gamma: float,
                  r2_gamma: float | None = None, joint: bool | None = None) -> R1R2Penalty:
    """R1 at ``reals`` plus R2 at ``fakes`` (R3GAN's regularization), sharing the forward pass
    with the main loss through ``real_outputs``/``fake_outputs``.

    ``reals`` ``[N_real, ...]`` and ``fakes`` ``[N_fake, ...]`` (same per-sample shape, dtype
    and device) are detached: neither the data nor the generator receives a gradient.
    ``r2_gamma=None`` uses ``r1_gamma`` (R3GAN uses one gamma). ``D`` is called with the images
    only.

    Joint pass (``joint=None`` and ``batch_coupled_layers(D)`` empty, or ``joint=True``): one
    forward of ``cat([reals, fakes])`` and one ``autograd.grad(..., create_graph=True)`` (inner
    pass under ``no_weight_gradients()``, docs/design.md section 4). Because no layer mixes
    samples, the gradient of ``D(x).sum()`` at sample ``i`` is ``grad_x D(x_i)``, so one
    ``grad_sq_norm`` of the joint gradient, split into its real and fake halves, gives both
    penalties. Otherwise (batch-coupled layers found, or ``joint=False``) reals and fakes are
    penalized separately, as ``r1_penalty`` plus ``r2_penalty``; with ``joint=None`` the first
    such call per ``D`` warns and names the layers found. ``joint=True`` raises on a module
    with such layers; on a ``D`` that is not a module (which cannot be inspected) it is the
    caller's word that ``D`` treats samples independently.
    """
    r1_gamma = _check_gamma(r1_gamma)
    r2_gamma = r1_gamma if r2_gamma is None else _check_gamma(r2_gamma)
    _check_batch(reals, "reals")
    _check_batch(fakes, "fakes")
    if (reals.shape[1:], reals.dtype, reals.device) != (fakes.shape[1:], fakes.dtype,
                                                         fakes.device):
        raise ValueError(f"reals and fakes must have the same per-sample shape, dtype and "
                         f"device, got {tuple(reals.shape)} {reals.dtype} {reals.device} and "
                         f"{tuple(fakes.shape)} {fakes.dtype} {fakes.device}")
    if joint not in (None, True, False):
        raise ValueError(f"joint must be None (detect), True or False, got {joint!r}")
    coupled = ()
    if joint is None:
        coupled = batch_coupled_layers(D)
        joint = not coupled
    elif joint and isinstance(D, torch.nn.Module) and batch_coupled_layers(D):
        raise ValueError(f"joint=True, but D has layers that mix samples: "
                         f"{', '.join(batch_coupled_layers(D))}")
    if not joint:
        if coupled and _first_fallback(D):
            warnings.warn(f"r1_r2_penalty: D may mix samples ({', '.join(coupled)}); computing "
                          "R1 and R2 separately (two double backwards)", stacklevel=2)
        r1 = r1_penalty(D, reals, r1_gamma)
        r2 = r2_penalty(D, fakes, r2_gamma)
        return R1R2Penalty(r1.loss + r2.loss, r1.grad_sq_norm, r2.grad_sq_norm, r1.outputs,
                           r2.outputs, False, coupled)
    n_real = reals.shape[0]
    x = torch.cat([reals.detach(), fakes.detach()]).requires_grad_(True)
    outputs = D(x)
    sq_norm = _input_grad_sq_norm(outputs, x)
    r1_sq, r2_sq = sq_norm[:n_real], sq_norm[n_real:]
    loss = r1_sq.mean() * (r1_gamma / 2) + r2_sq.mean() * (r2_gamma / 2)
    return R1R2Penalty(loss, r1_sq, r2_sq, outputs[:n_real], outputs[n_real:], True, ())


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
