"""Activation code shared by the kernels of every fused op (bias_act, conv2d_act epilogues).

Activations are identified by ``fastgan.reference.ACTIVATIONS[name].code``. Scalars
(alpha, gain, clamp and a linear ``scale``) travel to kernels as a small device tensor in the
compute dtype, so that float64 kernels see them in full precision (Triton types Python floats
as float32). The tensors are cached per value: made once, before any CUDA-graph capture that
replays them (creating one inside a capture is refused with a clear error).
"""
from __future__ import annotations

import functools

import torch

from fastgan.reference import SELU_ALPHA, SELU_SCALE, SOFTPLUS_THRESHOLD, ActSpec
from fastgan.triton_support import tl, triton

LINEAR: tl.constexpr = tl.constexpr(0)
RELU: tl.constexpr = tl.constexpr(1)
LRELU: tl.constexpr = tl.constexpr(2)
TANH: tl.constexpr = tl.constexpr(3)
SIGMOID: tl.constexpr = tl.constexpr(4)
ELU: tl.constexpr = tl.constexpr(5)
SELU: tl.constexpr = tl.constexpr(6)
SOFTPLUS: tl.constexpr = tl.constexpr(7)
SWISH: tl.constexpr = tl.constexpr(8)
# Python floats in a kernel are float32 constants: these are made in the compute dtype
# (``_constant``) so that float64 kernels see them in full.
_SELU_SCALE: tl.constexpr = tl.constexpr(SELU_SCALE)
_SELU_NEG: tl.constexpr = tl.constexpr(SELU_ALPHA * SELU_SCALE)
_SOFTPLUS_THRESHOLD: tl.constexpr = tl.constexpr(SOFTPLUS_THRESHOLD)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Kernels compute in float64 for float64 tensors and in float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=256)
def clamp_as_stored(clamp: float | None, dtype: torch.dtype) -> float:
    """The clamp bound the kernels use for tensors of ``dtype`` (-1 for none): ``clamp``
    rounded to ``dtype``, as torch rounds a Python number it compares with such a tensor
    (``256 * sqrt(0.5) = 181.019`` is 181.0 in float16 and bfloat16). The gradient's mask
    ``|y| < clamp`` is taken on the stored output, which a clamped element holds as the
    rounded bound; with the exact bound every such element would pass (docs/design.md
    section 3)."""
    return -1.0 if clamp is None else torch.tensor(clamp, dtype=dtype).item()


_params: dict[tuple, torch.Tensor] = {}


def act_params(spec: ActSpec, dtype: torch.dtype, device: torch.device,
               scale: float = 1.0) -> torch.Tensor:
    """``[alpha, gain, clamp, scale]`` on ``device`` in the compute dtype of ``dtype``
    (``clamp`` as stored in ``dtype``, -1 for none), cached per value."""
    key = (spec.alpha, spec.gain, clamp_as_stored(spec.clamp, dtype), scale,
           compute_dtype(dtype), device)
    params = _params.get(key)
    if params is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("fastgan: an activation-parameter tensor would be created "
                               "during CUDA-graph capture; run the step once before capturing "
                               "it (fastgan.cuda_graph_step does)")
        params = torch.tensor(key[:4], dtype=key[4], device=device)
        _params[key] = params
    return params


@triton.jit
def load_act_params(params_ptr):
    """Read ``alpha, gain, clamp, scale`` from the tensor built by ``act_params``."""
    return (tl.load(params_ptr), tl.load(params_ptr + 1), tl.load(params_ptr + 2),
            tl.load(params_ptr + 3))


@triton.jit
def _constant(value, like):
    """``value`` as a block of the shape and dtype of ``like`` (exact in float64)."""
    return tl.full(like.shape, value, like.dtype)


@triton.jit
def _nonpositive(z):
    """``z`` where ``z <= 0`` or NaN, else 0: the argument of ``exp`` in a branch taken only
    there (no overflow in the branch that is discarded)."""
    return tl.where(z > 0, 0.0, z)


@triton.jit
def _expm1(z):
    """``exp(z) - 1`` for ``z <= 0`` (or NaN), accurate also near 0: Kahan's
    ``(u - 1) * z / log(u)`` with ``u = exp(z)``, exact where ``u`` rounds to 1 or 0."""
    u = tl.exp(z)
    um1 = u - 1
    exact = (um1 == 0) | (u == 0)
    log_u = tl.log(tl.where(exact, 0.5, u))  # 0.5: any value whose log is finite and nonzero
    return tl.where(um1 == 0, z, tl.where(u == 0, -1.0, um1 * (z / log_u)))


@triton.jit
def _log1p(u):
    """``log(1 + u)`` for ``u >= 0`` (or NaN), accurate also for tiny ``u``:
    ``log(w) * u / (w - 1)`` with ``w = 1 + u``, and ``u`` itself where ``w`` rounds to 1."""
    w = 1 + u
    one = w == 1
    return tl.where(one, u, tl.log(w) * u / tl.where(one, 1.0, w - 1))


@triton.jit
def _sigmoid(z):
    """``1 / (1 + exp(-z))`` without overflow (``exp(-|z|)`` only)."""
    e = tl.exp(-tl.abs(z))
    r = 1 / (1 + e)
    return tl.where(z >= 0, r, e * r)


@triton.jit
def _tanh(z):
    """``tanh(z) = -t / (t + 2)`` with ``t = expm1(-2|z|)``, the sign of ``z``; NaN stays."""
    t = _expm1(-2 * tl.abs(z))
    a = -t / (t + 2)
    return tl.where(z < 0, -a, a)


@triton.jit
def _act(z, alpha, ACT: tl.constexpr):
    """The activation ``ACT`` of ``z``, as torch computes it for ``fastgan.reference`` (F.elu
    and F.selu with torch's constants, F.softplus with beta 1 and threshold 20)."""
    if ACT == RELU:
        z = tl.where(z < 0, 0.0, z)
    elif ACT == LRELU:
        z = tl.where(z < 0, z * alpha, z)
    elif ACT == TANH:
        z = _tanh(z)
    elif ACT == SIGMOID:
        z = _sigmoid(z)
    elif ACT == ELU:
        z = tl.where(z > 0, z, _expm1(_nonpositive(z)))
    elif ACT == SELU:
        z = tl.where(z > 0, z * _constant(_SELU_SCALE, z),
                     _expm1(_nonpositive(z)) * _constant(_SELU_NEG, z))
    elif ACT == SOFTPLUS:
        large = z > _SOFTPLUS_THRESHOLD
        z = tl.where(large, z, _log1p(tl.exp(tl.where(large, 0.0, z))))
    elif ACT == SWISH:
        z = _sigmoid(z) * z
    return z


@triton.jit
def activate(z, alpha, gain, clamp, ACT: tl.constexpr, USE_CLAMP: tl.constexpr):
    """``clamp(act(z) * gain)``; NaN propagates as in torch (relu(NaN) is NaN)."""
    y = _act(z, alpha, ACT) * gain
    if USE_CLAMP:
        y = tl.where(tl.abs(y) < clamp, y, tl.where(y < 0, -clamp, tl.where(y > 0, clamp, y)))
    return y


@triton.jit
def _masked_gain(dy, y, gain, clamp, USE_CLAMP: tl.constexpr):
    """``dy * gain`` where ``|y| < clamp``, exactly 0 elsewhere (also for inf or NaN ``dy``):
    the gradient reaching ``act(z)``."""
    g = dy
    if USE_CLAMP:
        g = tl.where(tl.abs(y) < clamp, g, 0.0)
    return g * gain


@triton.jit
def activation_grad(dy, y, alpha, gain, clamp, ACT: tl.constexpr, USE_CLAMP: tl.constexpr):
    """``d L / d z`` from ``dy = d L / d y`` and the output ``y`` for linear, relu and lrelu,
    the way torch's autograd computes it for ``fastgan.reference``: where the slope is zero
    (clamped, or relu off) the result is exactly 0 even for an infinite or NaN ``dy``."""
    g = _masked_gain(dy, y, gain, clamp, USE_CLAMP)
    if ACT == RELU:
        g = tl.where(y != 0, g, 0.0)
    elif ACT == LRELU:
        g = tl.where(y * gain > 0, g, g * alpha)
    return g


@triton.jit
def activation_grad_from_input(dy, z, y, gain, clamp, ACT: tl.constexpr,
                               USE_CLAMP: tl.constexpr):
    """``d L / d z`` from ``dy`` and the pre-activation ``z`` for the curved activations
    (tanh ... swish), in the order torch's autograd computes it for ``fastgan.reference`` (so
    inf and NaN land where its do); ``y``, the output as stored, is read for the clamp mask
    only."""
    g = _masked_gain(dy, y, gain, clamp, USE_CLAMP)
    if ACT == TANH:
        t = _tanh(z)
        g = g * (1 - t * t)
    elif ACT == SIGMOID:
        s = _sigmoid(z)
        g = g * (1 - s) * s
    elif ACT == ELU:  # NaN takes the exp branch, as in torch's vectorized CPU kernel
        g = tl.where(z > 0, g, g * tl.exp(_nonpositive(z)))
    elif ACT == SELU:
        g = tl.where(z > 0, g * _constant(_SELU_SCALE, z),
                     g * _constant(_SELU_NEG, z) * tl.exp(_nonpositive(z)))
    elif ACT == SOFTPLUS:
        large = z > _SOFTPLUS_THRESHOLD
        e = tl.exp(tl.where(large, 0.0, z))
        g = tl.where(large, g, g * e / (e + 1))
    elif ACT == SWISH:
        s = _sigmoid(z)
        g = g * s + g * z * (1 - s) * s
    return g
