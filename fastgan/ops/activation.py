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

from fastgan.reference import ActSpec
from fastgan.triton_support import tl, triton

LINEAR: tl.constexpr = tl.constexpr(0)
RELU: tl.constexpr = tl.constexpr(1)
LRELU: tl.constexpr = tl.constexpr(2)


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
def activate(z, alpha, gain, clamp, ACT: tl.constexpr, USE_CLAMP: tl.constexpr):
    """``clamp(act(z) * gain)``; NaN propagates as in torch (relu(NaN) is NaN)."""
    if ACT == RELU:
        z = tl.where(z < 0, 0.0, z)
    elif ACT == LRELU:
        z = tl.where(z < 0, z * alpha, z)
    y = z * gain
    if USE_CLAMP:
        y = tl.where(tl.abs(y) < clamp, y, tl.where(y < 0, -clamp, tl.where(y > 0, clamp, y)))
    return y


@triton.jit
def activation_grad(dy, y, alpha, gain, clamp, ACT: tl.constexpr, USE_CLAMP: tl.constexpr):
    """``d L / d z`` from ``dy = d L / d y`` and the output ``y``, the way torch's autograd
    computes it for ``fastgan.reference``: where the slope is zero (clamped, or relu off) the
    result is exactly 0 even for an infinite or NaN ``dy``."""
    g = dy
    if USE_CLAMP:
        g = tl.where(tl.abs(y) < clamp, g, 0.0)
    g = g * gain
    if ACT == RELU:
        g = tl.where(y != 0, g, 0.0)
    elif ACT == LRELU:
        g = tl.where(y * gain > 0, g, g * alpha)
    return g
