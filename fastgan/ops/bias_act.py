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

import functools

import torch
import triton
import triton.language as tl

from fastgan import reference
from fastgan.backend import record_launch, use_triton
from fastgan.grad_control import engine_will_use_grad, route_through_node
from fastgan.ops.activation import act_params, activate, activation_grad, compute_dtype, load_act_params
from fastgan.ops.layout import (INT32_MAX, as_outer_chan_inner, check_float_tensor,
                                check_same_device_dtype, like_layout, next_pow2, normalize_dim)

_TILE_ELEMENTS = 4096


@triton.jit
def _tile(pid, it, n_rows, n_cols, n_chan, n_blocks_j, BLOCK_R: tl.constexpr,
          BLOCK_J: tl.constexpr, ITERS: tl.constexpr, CHAN_IS_COL: tl.constexpr,
          INT64: tl.constexpr):
    """Tile ``it`` of program ``pid`` in the ``[n_rows, n_cols]`` matrix: flat offsets, mask,
    row and column indices, and the channel of each column (CHAN_IS_COL) or row."""
    pid_j = pid % n_blocks_j
    pid_r = pid // n_blocks_j
    r = (pid_r * ITERS + it) * BLOCK_R + tl.arange(0, BLOCK_R)
    j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    if INT64:  # rows or columns alone may pass 2**31 (e.g. rank 1, or dim=0 of [2, 2**31])
        r = r.to(tl.int64)
        j = j.to(tl.int64)
    offs = r[:, None] * n_cols + j[None, :]
    mask = (r < n_rows)[:, None] & (j < n_cols)[None, :]
    if CHAN_IS_COL:
        chan = j
    else:
        chan = r % n_chan
    return offs, mask, r, j, chan


@triton.jit
def _bias_act_fwd_kernel(x_ptr, b_ptr, y_ptr, params_ptr, n_rows, n_cols, n_chan, n_blocks_j,
                         HAS_BIAS: tl.constexpr, ACT: tl.constexpr, USE_CLAMP: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr, ITERS: tl.constexpr,
                         CHAN_IS_COL: tl.constexpr, INT64: tl.constexpr):
    pid = tl.program_id(0)
    alpha, gain, clamp = load_act_params(params_ptr)
    for it in range(ITERS):
        offs, mask, r, j, chan = _tile(pid, it, n_rows, n_cols, n_chan, n_blocks_j, BLOCK_R,
                                       BLOCK_J, ITERS, CHAN_IS_COL, INT64)
        z = tl.load(x_ptr + offs, mask=mask).to(gain.dtype)
        if HAS_BIAS:
            if CHAN_IS_COL:
                z = z + tl.load(b_ptr + chan, mask=j < n_cols).to(gain.dtype)[None, :]
            else:
                z = z + tl.load(b_ptr + chan, mask=r < n_rows).to(gain.dtype)[:, None]
        y = activate(z, alpha, gain, clamp, ACT, USE_CLAMP)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_act_grad_kernel(dy_ptr, y_ptr, dx_ptr, partial_ptr, params_ptr, n_rows, n_cols, n_chan,
                          n_blocks_j, ACT: tl.constexpr, USE_CLAMP: tl.constexpr,
                          NEED_DB: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr,
                          ITERS: tl.constexpr, CHAN_IS_COL: tl.constexpr, INT64: tl.constexpr):
    """``dx = dy * slope(y)``. With NEED_DB, also sums of ``dx`` for the bias gradient: per
    column into ``partial[pid_r, n_cols]`` (CHAN_IS_COL), else per row into
    ``partial[pid_j, n_rows]``."""
    pid = tl.program_id(0)
    alpha, gain, clamp = load_act_params(params_ptr)
    col_sums = tl.zeros([BLOCK_J], dtype=gain.dtype)
    for it in range(ITERS):
        offs, mask, r, j, chan = _tile(pid, it, n_rows, n_cols, n_chan, n_blocks_j, BLOCK_R,
                                       BLOCK_J, ITERS, CHAN_IS_COL, INT64)
        dy = tl.load(dy_ptr + offs, mask=mask).to(gain.dtype)
        y = tl.load(y_ptr + offs, mask=mask).to(gain.dtype)
        dx = activation_grad(dy, y, alpha, gain, clamp, ACT, USE_CLAMP)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if NEED_DB:
            dx = tl.where(mask, dx, 0.0)
            if CHAN_IS_COL:
                col_sums += tl.sum(dx, axis=0)
            else:
                pid_j = pid % n_blocks_j
                tl.store(partial_ptr + pid_j * n_rows + r, tl.sum(dx, axis=1), mask=r < n_rows)
    if NEED_DB and CHAN_IS_COL:
        pid_r = (pid // n_blocks_j).to(tl.int64)
        j = (pid % n_blocks_j) * BLOCK_J + tl.arange(0, BLOCK_J)
        tl.store(partial_ptr + pid_r * n_cols + j, col_sums, mask=j < n_cols)


@functools.lru_cache(maxsize=4096)
def _tiling(n_outer: int, n_chan: int, n_inner: int) -> dict:
    """How the kernels see a ``[outer, chan, inner]`` tensor: as a row-major matrix whose
    columns are the contiguous axis. With ``inner == 1`` (channels_last) the matrix is
    ``[outer, chan]`` and channels are columns; otherwise it is ``[outer * chan, inner]``
    and channels are rows. Tiles hold ~4096 elements; large tensors give each program up to
    8 tiles along the rows (fewer bias partials, less launch overhead). Cached: it runs on
    every launch; callers must not modify the returned dict."""
    chan_is_col = n_inner == 1
    n_rows, n_cols = (n_outer, n_chan) if chan_is_col else (n_outer * n_chan, n_inner)
    block_j = min(next_pow2(n_cols), 256 if chan_is_col else 1024)
    block_r = min(next_pow2(n_rows), max(1, _TILE_ELEMENTS // block_j))
    n_blocks_r, n_blocks_j = triton.cdiv(n_rows, block_r), triton.cdiv(n_cols, block_j)
    iters = 1
    while iters < 8 and n_blocks_r >= 2 * iters and n_blocks_r * n_blocks_j // (2 * iters) >= 4096:
        iters *= 2
    n_prog_r = triton.cdiv(n_rows, block_r * iters)
    return dict(n_rows=n_rows, n_cols=n_cols, n_blocks_j=n_blocks_j, n_prog_r=n_prog_r,
                grid=(n_prog_r * n_blocks_j,),
                meta=dict(BLOCK_R=block_r, BLOCK_J=block_j, ITERS=iters,
                          CHAN_IS_COL=chan_is_col, INT64=n_rows * n_cols > INT32_MAX,
                          num_warps=4))


def bias_act_forward(x, b, dim, spec):
    """Launch the forward kernel; ``y`` has the layout of ``x`` when ``x`` is dense."""
    x, n_outer, n_chan, n_inner = as_outer_chan_inner(x, dim)
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    t = _tiling(n_outer, n_chan, n_inner)
    params = act_params(spec, x.dtype, x.device)
    record_launch("bias_act_fwd")
    _bias_act_fwd_kernel[t["grid"]](
        x, b if b is not None else x, y, params, t["n_rows"], t["n_cols"], n_chan,
        t["n_blocks_j"], HAS_BIAS=b is not None, ACT=spec.act.code,
        USE_CLAMP=spec.clamp is not None, **t["meta"])
    return y


def bias_act_grad(dy, y, dim, spec, need_db):
    """Launch the gradient kernel: ``(dx, db)`` with ``db`` None unless ``need_db``."""
    dy = like_layout(dy, y)
    _, n_outer, n_chan, n_inner = as_outer_chan_inner(y, dim)
    dx = torch.empty_like(y, dtype=dy.dtype)
    if y.numel() == 0:
        return dx, (torch.zeros(n_chan, dtype=dy.dtype, device=dy.device) if need_db else None)
    t = _tiling(n_outer, n_chan, n_inner)
    chan_is_col = t["meta"]["CHAN_IS_COL"]
    rows = t["n_prog_r"] if chan_is_col else t["n_blocks_j"]
    partial = torch.empty((rows, t["n_cols" if chan_is_col else "n_rows"]) if need_db else (1,),
                          dtype=compute_dtype(dy.dtype), device=dy.device)
    params = act_params(spec, dy.dtype, dy.device)
    record_launch("bias_act_grad")
    _bias_act_grad_kernel[t["grid"]](
        dy, y, dx, partial, params, t["n_rows"], t["n_cols"], n_chan, t["n_blocks_j"],
        ACT=spec.act.code, USE_CLAMP=spec.clamp is not None, NEED_DB=need_db, **t["meta"])
    if not need_db:
        return dx, None
    db = partial.sum(dim=0) if chan_is_col else partial.view(-1, n_chan).sum(dim=0)
    return dx, db.to(dy.dtype)


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
