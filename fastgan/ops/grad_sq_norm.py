"""Per-sample squared gradient norm, the R1/R2 reduction, differentiable to any order.

``grad_sq_norm(g)[n] = sum of g[n, ...] ** 2`` over all non-batch dims, accumulated in float32
(float64 for float64 input) and returned in that dtype.

Autograd structure (docs/design.md section 4), built from two kernels:

* ``per_sample_dot(a, b)[n] = sum(a[n] * b[n])``: one pass, fp32 partial sums per chunk, then
  a deterministic sum of the partials (no atomics).
* ``scale_per_sample(x, s)[n] = x[n] * s[n]``.

``GradSqNorm``'s backward is ``scale_per_sample(g, 2 * dout)``, whose backward is again made
of these two, so every order of derivative runs on the kernels: the Triton kernels, or the
compiled extension's ``torch.ops.fastgan.per_sample_dot`` / ``scale_per_sample`` where the
backend rule picks it (``fastgan.backend``, docs/design.md section 8), which trace into
``torch.compile`` graphs (their fake kernels are registered here, ``_register_fakes``).
"""
from __future__ import annotations

import math

import torch

from fastgan import ext, reference
from fastgan.backend import implementation, record_launch
from fastgan.ops.activation import compute_dtype
from fastgan.ops.launch import KernelLauncher
from fastgan.ops.layout import (INT32_MAX, as_outer_chan_inner, check_batched, check_float_tensor,
                                check_same_shape, empty_dense, like_layout)
from fastgan.triton_support import tl, triton

_BLOCK = 1024
_TARGET_PROGRAMS = 2048


@triton.jit
def _per_sample_dot_kernel(a_ptr, b_ptr, partial_ptr, per_sample, n_chunks,
                           SAME: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK: tl.constexpr,
                           ITERS: tl.constexpr, INT64: tl.constexpr):
    """Program ``(n, k)`` sums ``a * b`` over chunk ``k`` of sample ``n`` into
    ``partial[n, k]``; with SAME, ``b`` is ``a`` and is read once."""
    pid = tl.program_id(0)
    n = pid // n_chunks
    k = pid % n_chunks
    if INT64:  # one sample alone may pass 2**31 elements
        n = n.to(tl.int64)
        k = k.to(tl.int64)
    base = n * per_sample
    acc = tl.zeros([BLOCK], dtype=tl.float64 if ACC_FP64 else tl.float32)
    for it in range(ITERS):
        j = (k * ITERS + it) * BLOCK + tl.arange(0, BLOCK)
        mask = j < per_sample
        a = tl.load(a_ptr + base + j, mask=mask, other=0.0).to(acc.dtype)
        if SAME:
            acc += a * a
        else:
            acc += a * tl.load(b_ptr + base + j, mask=mask, other=0.0).to(acc.dtype)
    tl.store(partial_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def _scale_per_sample_kernel(x_ptr, s_ptr, y_ptr, per_sample, n_chunks, BLOCK: tl.constexpr,
                             ITERS: tl.constexpr, INT64: tl.constexpr):
    """``y[n, j] = x[n, j] * s[n]``, program ``(n, k)`` covering chunk ``k`` of sample ``n``."""
    pid = tl.program_id(0)
    n = pid // n_chunks
    k = pid % n_chunks
    s = tl.load(s_ptr + n)
    if INT64:
        n = n.to(tl.int64)
        k = k.to(tl.int64)
    base = n * per_sample
    for it in range(ITERS):
        j = (k * ITERS + it) * BLOCK + tl.arange(0, BLOCK)
        mask = j < per_sample
        x = tl.load(x_ptr + base + j, mask=mask)
        y = x.to(s.dtype) * s
        tl.store(y_ptr + base + j, y.to(y_ptr.dtype.element_ty), mask=mask)


_launch_dot = KernelLauncher(_per_sample_dot_kernel, "per_sample_dot")
_launch_scale = KernelLauncher(_scale_per_sample_kernel, "scale_per_sample")


def _per_sample_view(x: torch.Tensor):
    """``x`` dense with each sample one contiguous chunk; returns ``(x, n, per_sample)``."""
    x, outer, n, per_sample = as_outer_chan_inner(x, 0)
    if outer != 1:
        x = x.contiguous()
    return x, x.shape[0], math.prod(x.shape[1:])


def _chunking(n: int, per_sample: int) -> tuple[int, int]:
    """``(n_chunks, iters)``: enough programs to fill the GPU, ``iters * BLOCK`` elements each."""
    max_chunks = triton.cdiv(per_sample, _BLOCK)
    n_chunks = max(1, min(triton.cdiv(_TARGET_PROGRAMS, n), max_chunks))
    iters = triton.cdiv(max_chunks, n_chunks)
    return triton.cdiv(max_chunks, iters), iters


def per_sample_dot_forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[N]``: ``sum(a[n] * b[n])`` in float32 (float64 for float64), by the extension or
    the Triton kernel (the backend rule); ``b is a`` reads ``a`` once."""
    if implementation(a) == "ext":
        return _ext_dot(a, b)
    return _triton_dot(a, b)


def _ext_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``per_sample_dot_forward`` by the extension's ``torch.ops.fastgan.per_sample_dot``."""
    if a.numel():
        record_launch("ext_per_sample_dot")
    return torch.ops.fastgan.per_sample_dot(a, b)


def _triton_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``per_sample_dot_forward`` by the Triton kernel."""
    same = b is a  # before the view: a non-dense ``a`` is copied once and read once
    a, n, per_sample = _per_sample_view(a)
    if not same:
        b = like_layout(b, a)
    acc = compute_dtype(a.dtype)
    if a.numel() == 0:
        return torch.zeros(n, dtype=acc, device=a.device)
    n_chunks, iters = _chunking(n, per_sample)
    partial = torch.empty((n, n_chunks), dtype=acc, device=a.device)
    _launch_dot((n * n_chunks,), (a, b, partial), (per_sample, n_chunks),
                dict(SAME=same, ACC_FP64=acc == torch.float64, BLOCK=_BLOCK, ITERS=iters,
                     INT64=a.numel() > INT32_MAX, num_warps=4))
    return partial.sum(dim=1)


def scale_per_sample_forward(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``x[n] * s[n]`` (``s`` of shape ``[N]``) in the dtype of ``x``, by the extension or the
    Triton kernel (the backend rule)."""
    if implementation(x) == "ext":
        return _ext_scale(x, s)
    return _triton_scale(x, s)


def _ext_scale(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``scale_per_sample_forward`` by the extension's ``torch.ops.fastgan.scale_per_sample``."""
    if x.numel():
        record_launch("ext_scale_per_sample")
    return torch.ops.fastgan.scale_per_sample(x, s)


def _triton_scale(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``scale_per_sample_forward`` by the Triton kernel."""
    x, n, per_sample = _per_sample_view(x)
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    s = s.to(compute_dtype(x.dtype)).contiguous()
    n_chunks, iters = _chunking(n, per_sample)
    _launch_scale((n * n_chunks,), (x, s, y), (per_sample, n_chunks),
                  dict(BLOCK=_BLOCK, ITERS=iters, INT64=x.numel() > INT32_MAX, num_warps=4))
    return y


class PerSampleDot(torch.autograd.Function):
    """``[N]``: ``sum(a[n] * b[n])`` over the non-batch dims."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return per_sample_dot_forward(a, b)

    @staticmethod
    def backward(ctx, dout):
        a, b = ctx.saved_tensors
        da = ScalePerSample.apply(b, dout) if ctx.needs_input_grad[0] else None
        db = ScalePerSample.apply(a, dout) if ctx.needs_input_grad[1] else None
        return da, db


class ScalePerSample(torch.autograd.Function):
    """``x[n] * s[n]`` with ``s`` of shape ``[N]``; the result has the dtype of ``x``."""

    @staticmethod
    def forward(ctx, x, s):
        ctx.save_for_backward(x, s)
        return scale_per_sample_forward(x, s)

    @staticmethod
    def backward(ctx, dy):
        x, s = ctx.saved_tensors
        dx = ScalePerSample.apply(dy, s) if ctx.needs_input_grad[0] else None
        ds = PerSampleDot.apply(dy, x).to(s.dtype) if ctx.needs_input_grad[1] else None
        return dx, ds


class GradSqNorm(torch.autograd.Function):
    """``[N]``: ``sum(g[n] ** 2)``; reads ``g`` once."""

    @staticmethod
    def forward(ctx, g):
        ctx.save_for_backward(g)
        return per_sample_dot_forward(g, g)

    @staticmethod
    def backward(ctx, dout):
        g, = ctx.saved_tensors
        return ScalePerSample.apply(g, 2 * dout)


def grad_sq_norm(g: torch.Tensor) -> torch.Tensor:
    """Per-sample sum of squares of ``g`` (shape ``[N, ...]``) over all non-batch dims.

    Returns shape ``[N]`` in float32 (float64 for float64 ``g``), accumulated in that dtype,
    deterministic run to run. Any layout; differentiable to any order.
    """
    check_float_tensor(g, "g")
    if g.ndim < 1:
        raise ValueError("g must have a batch dimension, got a 0-d tensor")
    if implementation(g) == "torch":
        return reference.grad_sq_norm(g)
    return GradSqNorm.apply(g)


def _register_fakes() -> None:
    """Fake kernels of the extension's ``per_sample_dot`` and ``scale_per_sample``: the
    outputs' shapes, dtypes and strides as the C++ ops make them, after the same checks."""

    @torch.library.register_fake("fastgan::per_sample_dot")
    def _per_sample_dot(a, b):
        check_batched(a, "a")
        check_same_shape(b, "b", a, "a")
        return a.new_empty(a.shape[0], dtype=compute_dtype(a.dtype))

    @torch.library.register_fake("fastgan::scale_per_sample")
    def _scale_per_sample(x, s):
        check_batched(x, "x")
        if s.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"s must be float32 or float64, got {s.dtype}")
        if s.shape != (x.shape[0],):
            raise ValueError(f"s must be a 1-d tensor of length x.shape[0] = {x.shape[0]}, "
                             f"got shape {list(s.shape)}")
        if s.device != x.device:
            raise ValueError(f"s is on {s.device} but x is on {x.device}; expected the same "
                             "device")
        return empty_dense(_per_sample_view(x)[0], x.dtype)


ext.register_fakes(_register_fakes)
