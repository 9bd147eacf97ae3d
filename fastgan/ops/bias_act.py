"""Fused bias + activation + gain + clamp, differentiable to any order.

``bias_act(x, b, dim, act, alpha, gain, clamp) = clamp(act(x + b) * gain)`` with ``b``
broadcast along ``dim`` (StyleGAN2-ADA conventions; see ``fastgan.reference``).

Autograd structure (DESIGN.md section 4):

* ``BiasActFunction``: one forward kernel; saves only ``y``.
* ``BiasActGrad``: ``(dy, y) -> (dx, db)``, one kernel that writes ``dx = dy * slope(y)`` and
  per-tile partial sums of ``dx`` per channel; ``db`` is the deterministic sum of those
  partials. For the piecewise-linear activations the slope is constant almost everywhere,
  so its backward is ``BiasActGrad`` again (on ``d_dx + broadcast(d_db)``): any order works.

Every tensor is seen as ``[outer, chan, inner]`` in memory order (``layout.as_outer_chan_inner``),
so contiguous, channels_last and any other dense layout run without a copy.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastgan import reference
from fastgan.backend import record_launch, use_triton
from fastgan.grad_control import engine_will_use_grad, route_through_node
from fastgan.ops.activation import act_params, activate, activation_slope, compute_dtype, load_act_params
from fastgan.ops.layout import (as_outer_chan_inner, check_float_tensor, check_same_device_dtype,
                                like_layout, next_pow2, normalize_dim)

_TILE_ELEMENTS = 4096
_INT32_MAX = 2**31 - 1


@triton.jit
def _tile_offsets(pid, it, n_outer, n_chan, n_inner, n_blocks_c, n_blocks_i,
                  BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr,
                  O_ITERS: tl.constexpr, INT64: tl.constexpr):
    """Flat offsets, mask and channel indices of iteration ``it`` of program ``pid``."""
    pid_i = pid % n_blocks_i
    pid_c = (pid // n_blocks_i) % n_blocks_c
    pid_o = pid // (n_blocks_i * n_blocks_c)
    o = (pid_o * O_ITERS + it) * BLOCK_O + tl.arange(0, BLOCK_O)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    if INT64:
        o = o.to(tl.int64)
    offs = (o[:, None, None] * n_chan + c[None, :, None]) * n_inner + i[None, None, :]
    mask = ((o < n_outer)[:, None, None] & (c < n_chan)[None, :, None]
            & (i < n_inner)[None, None, :])
    return offs, mask, c


@triton.jit
def _bias_act_fwd_kernel(x_ptr, b_ptr, y_ptr, params_ptr, n_outer, n_chan, n_inner,
                         n_blocks_c, n_blocks_i,
                         HAS_BIAS: tl.constexpr, ACT: tl.constexpr, USE_CLAMP: tl.constexpr,
                         BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr,
                         O_ITERS: tl.constexpr, INT64: tl.constexpr):
    pid = tl.program_id(0)
    alpha, gain, clamp = load_act_params(params_ptr)
    for it in range(O_ITERS):
        offs, mask, c = _tile_offsets(pid, it, n_outer, n_chan, n_inner, n_blocks_c, n_blocks_i,
                                      BLOCK_O, BLOCK_C, BLOCK_I, O_ITERS, INT64)
        z = tl.load(x_ptr + offs, mask=mask).to(gain.dtype)
        if HAS_BIAS:
            b = tl.load(b_ptr + c, mask=c < n_chan).to(gain.dtype)
            z = z + b[None, :, None]
        y = activate(z, alpha, gain, clamp, ACT, USE_CLAMP)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_act_grad_kernel(dy_ptr, y_ptr, dx_ptr, partial_ptr, params_ptr,
                          n_outer, n_chan, n_inner, n_blocks_c, n_blocks_i,
                          ACT: tl.constexpr, USE_CLAMP: tl.constexpr, NEED_DB: tl.constexpr,
                          BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr,
                          O_ITERS: tl.constexpr, INT64: tl.constexpr):
    """``dx = dy * slope(y)``; with NEED_DB, also this program's per-channel sum of ``dx``
    into row ``(pid_o * n_blocks_i + pid_i)`` of ``partial [rows, n_chan]``."""
    pid = tl.program_id(0)
    alpha, gain, clamp = load_act_params(params_ptr)
    acc = tl.zeros([BLOCK_C], dtype=gain.dtype)
    for it in range(O_ITERS):
        offs, mask, c = _tile_offsets(pid, it, n_outer, n_chan, n_inner, n_blocks_c, n_blocks_i,
                                      BLOCK_O, BLOCK_C, BLOCK_I, O_ITERS, INT64)
        dy = tl.load(dy_ptr + offs, mask=mask).to(gain.dtype)
        y = tl.load(y_ptr + offs, mask=mask).to(gain.dtype)
        dx = dy * activation_slope(y, alpha, gain, clamp, ACT, USE_CLAMP)
        dx = tl.where(mask, dx, 0.0)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if NEED_DB:
            acc += tl.sum(tl.sum(dx, axis=2), axis=0)
    if NEED_DB:
        pid_i = pid % n_blocks_i
        pid_c = (pid // n_blocks_i) % n_blocks_c
        pid_o = pid // (n_blocks_i * n_blocks_c)
        c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        row = pid_o * n_blocks_i + pid_i
        tl.store(partial_ptr + row.to(tl.int64) * n_chan + c, acc, mask=c < n_chan)


def _tiling(n_outer: int, n_chan: int, n_inner: int) -> dict:
    """Block sizes for a ``[outer, chan, inner]`` tensor: ~4096 elements per tile, the
    innermost dimension first so that loads are contiguous, and several tiles per program
    along ``outer`` when the tensor is large (fewer bias partials)."""
    block_i = min(next_pow2(n_inner), 1024)
    block_c = min(next_pow2(n_chan), max(1, _TILE_ELEMENTS // block_i), 256)
    block_o = min(next_pow2(n_outer), max(1, _TILE_ELEMENTS // (block_i * block_c)))
    n_blocks_o = triton.cdiv(n_outer, block_o)
    n_blocks_c = triton.cdiv(n_chan, block_c)
    n_blocks_i = triton.cdiv(n_inner, block_i)
    n_tiles = n_blocks_o * n_blocks_c * n_blocks_i
    o_iters = 1
    while o_iters < 8 and n_blocks_o >= 2 * o_iters and n_tiles // (2 * o_iters) >= 4096:
        o_iters *= 2
    return dict(BLOCK_O=block_o, BLOCK_C=block_c, BLOCK_I=block_i, O_ITERS=o_iters,
                n_prog_o=triton.cdiv(n_outer, block_o * o_iters),
                n_blocks_c=n_blocks_c, n_blocks_i=n_blocks_i)


def _launch_config(n_outer, n_chan, n_inner, numel):
    t = _tiling(n_outer, n_chan, n_inner)
    grid = (t["n_prog_o"] * t["n_blocks_c"] * t["n_blocks_i"],)
    meta = dict(BLOCK_O=t["BLOCK_O"], BLOCK_C=t["BLOCK_C"], BLOCK_I=t["BLOCK_I"],
                O_ITERS=t["O_ITERS"], INT64=numel > _INT32_MAX, num_warps=4)
    return t, grid, meta


def bias_act_forward(x, b, dim, spec):
    """Launch the forward kernel; ``y`` has the layout of ``x`` when ``x`` is dense."""
    x, _, n_outer, n_chan, n_inner = as_outer_chan_inner(x, dim)
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    t, grid, meta = _launch_config(n_outer, n_chan, n_inner, x.numel())
    params = act_params(spec, x.dtype, x.device)
    record_launch("bias_act_fwd")
    _bias_act_fwd_kernel[grid](
        x, b if b is not None else x, y, params, n_outer, n_chan, n_inner,
        t["n_blocks_c"], t["n_blocks_i"], HAS_BIAS=b is not None, ACT=spec.act.code,
        USE_CLAMP=spec.clamp is not None, **meta)
    return y


def bias_act_grad(dy, y, dim, spec, need_db):
    """Launch the gradient kernel: ``(dx, db)`` with ``db`` None unless ``need_db``."""
    dy = like_layout(dy, y)
    _, _, n_outer, n_chan, n_inner = as_outer_chan_inner(y, dim)
    dx = torch.empty_like(y, dtype=dy.dtype)
    acc_dtype = compute_dtype(dy.dtype)
    if y.numel() == 0:
        return dx, (torch.zeros(n_chan, dtype=dy.dtype, device=dy.device) if need_db else None)
    t, grid, meta = _launch_config(n_outer, n_chan, n_inner, y.numel())
    rows = t["n_prog_o"] * t["n_blocks_i"]
    partial = torch.empty((rows, n_chan) if need_db else (1,), dtype=acc_dtype, device=dy.device)
    params = act_params(spec, dy.dtype, dy.device)
    record_launch("bias_act_grad")
    _bias_act_grad_kernel[grid](
        dy, y, dx, partial, params, n_outer, n_chan, n_inner, t["n_blocks_c"], t["n_blocks_i"],
        ACT=spec.act.code, USE_CLAMP=spec.clamp is not None, NEED_DB=need_db, **meta)
    db = partial.sum(dim=0).to(dy.dtype) if need_db else None
    return dx, db


class BiasActGrad(torch.autograd.Function):
    """``(dy, y) -> (dx, db)`` with ``dx = dy * slope(y)`` and ``db = sum of dx per channel``."""

    @staticmethod
    def forward(ctx, dy, y, dim, spec, need_db):
        ctx.save_for_backward(y)
        ctx.dim, ctx.spec = dim, spec
        return bias_act_grad(dy, y, dim, spec, need_db)

    @staticmethod
    def backward(ctx, d_dx, d_db):
        # dx and db are linear in dy with a slope that is constant almost everywhere in y, so
        # the gradient w.r.t. dy is the same map applied to (d_dx + d_db broadcast), and
        # the gradient w.r.t. y is zero.
        y, = ctx.saved_tensors
        if d_db is not None:
            shape = [1] * y.ndim
            shape[ctx.dim] = -1
            d_db = d_db.reshape(shape)
            d_dx = d_db.expand_as(y) if d_dx is None else d_dx + d_db
        if d_dx is None or not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        d_dy, _ = BiasActGrad.apply(d_dx, y, ctx.dim, ctx.spec, False)
        return d_dy, None, None, None, None


class BiasActFunction(torch.autograd.Function):
    """``y = clamp(act(x + b) * gain)``; saves ``y`` only."""

    @staticmethod
    def forward(ctx, x, b, dim, spec):
        y = bias_act_forward(x, b, dim, spec)
        ctx.save_for_backward(y)
        ctx.dim, ctx.spec, ctx.has_bias = dim, spec, b is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        y, = ctx.saved_tensors
        need_dx = ctx.needs_input_grad[0]
        need_db = ctx.has_bias and engine_will_use_grad(ctx, 1)
        if not (need_dx or need_db):
            return None, None, None, None
        dx, db = BiasActGrad.apply(dy, y, ctx.dim, ctx.spec, need_db)
        return (dx if need_dx else None), db, None, None


def check_bias_act_args(x, b, dim) -> int:
    """Validate ``bias_act`` tensors; return ``dim`` normalized to ``[0, x.ndim)``."""
    check_float_tensor(x, "x")
    if x.ndim < 1:
        raise ValueError("x must have at least one dimension, got a 0-d tensor")
    dim = normalize_dim(dim, x.ndim)
    if b is not None:
        check_float_tensor(b, "b")
        if b.ndim != 1 or b.shape[0] != x.shape[dim]:
            raise ValueError(f"b must be a 1-d tensor of length x.shape[{dim}] = "
                             f"{x.shape[dim]}, got shape {tuple(b.shape)}")
        check_same_device_dtype(b, "b", x, "x")
    return dim


def bias_act(x, b=None, dim=1, act="linear", alpha=None, gain=None, clamp=None):
    """Fused ``clamp(act(x + b broadcast along dim) * gain, -clamp, clamp)``.

    Args:
        x: float tensor of any rank >= 1 and any layout.
        b: optional 1-d bias of length ``x.shape[dim]``, same dtype and device as ``x``.
        dim: the dimension ``b`` runs along.
        act: ``'linear'``, ``'relu'`` or ``'lrelu'``.
        alpha, gain: slope of lrelu for negative inputs and output scale; ``None`` takes the
            StyleGAN2-ADA default of ``act`` (lrelu: 0.2 and sqrt(2)).
        clamp: ``None`` or a bound ``>= 0`` for ``|y|``; the gradient is zero where
            ``|y| >= clamp``.

    Returns a tensor of the shape, dtype and layout of ``x``. Differentiable to any order.
    """
    spec = reference.resolve_activation(act, alpha, gain, clamp)
    dim = check_bias_act_args(x, b, dim)
    if not use_triton(x):
        return reference.bias_act(x, b, dim, act, alpha, gain, clamp)
    return BiasActFunction.apply(x, route_through_node(b), dim, spec)
