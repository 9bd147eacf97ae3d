"""Fused bias + activation + gain + clamp, differentiable to any order.

``bias_act(x, b, dim, act, alpha, gain, clamp) = clamp(act(x + b) * gain)`` with ``b``
broadcast along ``dim`` (StyleGAN2-ADA conventions and activations; see
``fastgan.reference``).

Autograd structure (docs/design.md section 4):

* ``BiasActFunction``: one forward kernel; saves what the gradient reads and nothing else:
  the output ``y`` for relu and lrelu (the slope depends on it) and for a clamp of linear
  (its mask), nothing for linear without clamp (``saves_output``) -- so, as in eager PyTorch
  and StyleGAN2-ADA's CUDA op, the output of a linear ``bias_act`` may be modified in place
  (``y.add_(skip)``) before the backward -- and ``x`` and ``b`` for the curved activations
  (tanh, sigmoid, elu, selu, softplus, swish), whose output may then be modified in place
  too.
* ``BiasActGrad`` (linear, relu, lrelu): ``(dy, y) -> (dx, db)``, one kernel that writes
  ``dx = dy * slope(y)`` and per-tile partial sums of ``dx`` per channel; ``db`` is the
  deterministic sum of those partials. The slope is constant almost everywhere, so its
  backward is ``BiasActGrad`` again (on ``d_dx + broadcast(d_db)``): any order works.
  Its gradient w.r.t. ``y`` is zero, returned as None, and every Function here returns early
  when no gradient reaches it (``set_materialize_grads(False)``), so R1's outer pass never
  runs a layer's backward on zeros. ``y`` still enters it attached for relu and lrelu
  (``grad_input_output``), so that a gradient taken with ``create_graph=True`` requires grad
  wherever eager's does.
* ``BiasActGradFromInput`` (the curved activations): ``(dy, x, b) -> (dx, db)``, the same
  kernel reading ``x`` and ``b`` instead of ``y``. Its backward runs it again for the
  derivative w.r.t. ``dy``, and computes the curvature term (w.r.t. ``x`` and ``b``, from
  ``reference.second_derivative``) with torch ops, from which autograd takes every higher
  order. The forward, the first backward and R1's second order run the kernels.

The kernels also take a linear input ``scale`` (``act(x * scale + b)``, and ``dx = scale * dz``
in the gradient): ``conv2d_act`` applies an equalized-learning-rate weight gain there instead
of scaling the weight.

Every tensor is seen as ``[outer, chan, inner]`` in memory order (``layout.as_outer_chan_inner``),
so contiguous, channels_last and any other dense layout run without a copy.

The Functions are the one definition of the gradients for every implementation: their
forwards run the Triton kernels, or the compiled extension's ``torch.ops.fastgan.bias_act`` /
``bias_act_grad`` (same layouts, same results) where the backend rule picks it
(``fastgan.backend``, docs/design.md section 8). Those ops have fake kernels (registered
here, ``_register_fakes``), so under ``torch.compile`` the Functions trace into the graph.

Clamp in 16 bits: the kernels use the clamp as rounded to the tensor's dtype
(``activation.clamp_as_stored``), so that the gradient mask ``|y| < clamp`` taken on the
stored output agrees with the reference (docs/design.md section 3).
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from fastgan import ext, reference
from fastgan.backend import implementation, implementation_without_extension, record_launch
from fastgan.grad_control import engine_will_use_grad, route_through_node
from fastgan.ops.activation import (act_params, activate, activation_grad,
                                    activation_grad_from_input, clamp_as_stored, compute_dtype,
                                    load_act_params)
from fastgan.ops.launch import KernelLauncher
from fastgan.ops.layout import (INT32_MAX, as_outer_chan_inner, check_float_tensor, check_scale,
                                check_batched, check_same_device_dtype, check_same_shape,
                                empty_dense, like_layout, next_pow2, normalize_dim)
from fastgan.triton_support import tl, triton

_TILE_ELEMENTS = 4096


@triton.jit
def _tile(pid, it, n_rows, n_cols, n_chan, n_blocks_j, BLOCK_R: tl.constexpr,
          BLOCK_J: tl.constexpr, ITERS: tl.constexpr, CHAN_IS_COL: tl.constexpr,
          INT64: tl.constexpr):
    """Tile ``it`` of program ``pid`` in the ``[n_rows, n_cols]`` matrix: flat offsets, mask,
    row and column indices, and the channel of each column (CHAN_IS_COL) or row. With INT64
    every index is widened before it is multiplied (rows or columns alone may pass 2**31,
    e.g. rank 1, or dim=0 of [2, 2**31])."""
    if INT64:
        pid = pid.to(tl.int64)
    pid_j = pid % n_blocks_j
    pid_r = pid // n_blocks_j
    r = (pid_r * ITERS + it) * BLOCK_R + tl.arange(0, BLOCK_R)
    j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    offs = r[:, None] * n_cols + j[None, :]
    mask = (r < n_rows)[:, None] & (j < n_cols)[None, :]
    if CHAN_IS_COL:
        chan = j
    else:
        chan = r % n_chan
    return offs, mask, r, j, chan


@triton.jit
def _pre_activation(x_ptr, b_ptr, offs, mask, r, j, chan, b_stride, n_rows, n_cols, scale,
                    HAS_BIAS: tl.constexpr, CHAN_IS_COL: tl.constexpr):
    """``z = x * scale + b[chan]`` of one tile, in the dtype of ``scale``; ``b`` is read with
    stride ``b_stride``."""
    z = tl.load(x_ptr + offs, mask=mask).to(scale.dtype) * scale
    if HAS_BIAS:
        if CHAN_IS_COL:
            z = z + tl.load(b_ptr + chan * b_stride, mask=j < n_cols).to(scale.dtype)[None, :]
        else:
            z = z + tl.load(b_ptr + chan * b_stride, mask=r < n_rows).to(scale.dtype)[:, None]
    return z


@triton.jit
def _bias_act_fwd_kernel(x_ptr, b_ptr, y_ptr, params_ptr, b_stride, n_rows, n_cols, n_chan,
                         n_blocks_j, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                         USE_CLAMP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr,
                         ITERS: tl.constexpr, CHAN_IS_COL: tl.constexpr, INT64: tl.constexpr):
    """``y = activate(x * scale + b[chan])``."""
    pid = tl.program_id(0)
    alpha, gain, clamp, scale = load_act_params(params_ptr)
    for it in range(ITERS):
        offs, mask, r, j, chan = _tile(pid, it, n_rows, n_cols, n_chan, n_blocks_j, BLOCK_R,
                                       BLOCK_J, ITERS, CHAN_IS_COL, INT64)
        z = _pre_activation(x_ptr, b_ptr, offs, mask, r, j, chan, b_stride, n_rows, n_cols,
                            scale, HAS_BIAS, CHAN_IS_COL)
        y = activate(z, alpha, gain, clamp, ACT, USE_CLAMP)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_act_grad_kernel(dy_ptr, saved_ptr, b_ptr, dx_ptr, partial_ptr, params_ptr, b_stride,
                          n_rows, n_cols, n_chan, n_blocks_j, ACT: tl.constexpr,
                          USE_CLAMP: tl.constexpr, NEED_DB: tl.constexpr, READ_Y: tl.constexpr,
                          FROM_X: tl.constexpr, HAS_BIAS: tl.constexpr, SCALE_DX: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr, ITERS: tl.constexpr,
                          CHAN_IS_COL: tl.constexpr, INT64: tl.constexpr):
    """``dz = dy * slope``, stored as ``dx = dz * scale`` (SCALE_DX) or ``dz``. The slope
    comes from what the forward saved (``saved``): the output ``y`` (READ_Y; without it,
    linear without clamp, the slope is ``gain`` and nothing is read), or with FROM_X (the
    curved activations) the input ``x``, from which ``z = x * scale + b[chan]`` and, for the
    clamp mask, ``y`` as stored are recomputed. With NEED_DB, also sums of ``dz`` for the
    bias gradient: per column into ``partial[pid_r, n_cols]`` (CHAN_IS_COL), else per row
    into ``partial[pid_j, n_rows]``."""
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    alpha, gain, clamp, scale = load_act_params(params_ptr)
    col_sums = tl.zeros([BLOCK_J], dtype=gain.dtype)
    for it in range(ITERS):
        offs, mask, r, j, chan = _tile(pid, it, n_rows, n_cols, n_chan, n_blocks_j, BLOCK_R,
                                       BLOCK_J, ITERS, CHAN_IS_COL, INT64)
        dy = tl.load(dy_ptr + offs, mask=mask).to(gain.dtype)
        if FROM_X:
            z = _pre_activation(saved_ptr, b_ptr, offs, mask, r, j, chan, b_stride, n_rows,
                                n_cols, scale, HAS_BIAS, CHAN_IS_COL)
            y = z
            if USE_CLAMP:  # the output as the forward stored it: its mask is the forward's
                y = activate(z, alpha, gain, clamp, ACT, False)
                y = y.to(dx_ptr.dtype.element_ty).to(gain.dtype)
            dz = activation_grad_from_input(dy, z, y, gain, clamp, ACT, USE_CLAMP)
        else:
            if READ_Y:
                y = tl.load(saved_ptr + offs, mask=mask).to(gain.dtype)
            else:
                y = dy
            dz = activation_grad(dy, y, alpha, gain, clamp, ACT, USE_CLAMP)
        dx = dz
        if SCALE_DX:
            dx = dz * scale
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if NEED_DB:
            dz = tl.where(mask, dz, 0.0)
            if CHAN_IS_COL:
                col_sums += tl.sum(dz, axis=0)
            else:
                pid_j = pid % n_blocks_j
                tl.store(partial_ptr + pid_j * n_rows + r, tl.sum(dz, axis=1), mask=r < n_rows)
    if NEED_DB and CHAN_IS_COL:
        pid_r = pid // n_blocks_j
        j = (pid % n_blocks_j) * BLOCK_J + tl.arange(0, BLOCK_J)
        tl.store(partial_ptr + pid_r * n_cols + j, col_sums, mask=j < n_cols)


_launch_fwd = KernelLauncher(_bias_act_fwd_kernel, "bias_act_fwd")
_launch_grad = KernelLauncher(_bias_act_grad_kernel, "bias_act_grad")
_launch_grad_from_input = KernelLauncher(_bias_act_grad_kernel, "bias_act_grad_from_input")


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


def ext_act_args(spec, dtype: torch.dtype) -> tuple[int, float, float, float]:
    """``(act code, alpha, gain, clamp)`` as the extension's ops take them for tensors of
    ``dtype`` (the clamp as stored in ``dtype``; -1: none)."""
    return spec.act.code, spec.alpha, spec.gain, clamp_as_stored(spec.clamp, dtype)


def saves_output(spec) -> bool:
    """Whether the gradient of ``bias_act`` with ``spec`` reads the output ``y``: for relu
    and lrelu (the slope is decided by the sign of ``y``) and for a clamp of linear (its mask
    ``|y| < clamp``). Linear without clamp has the constant slope ``gain`` and saves nothing;
    the curved activations save their input instead (``spec.act.curved``; docs/design.md
    section 4)."""
    return not spec.act.curved and (spec.act.name != "linear" or spec.clamp is not None)


def grad_input_output(y, spec):
    """``y`` as ``BiasActGrad`` takes it: attached where the slope depends on ``y`` (relu,
    lrelu), so that, as in eager PyTorch, a gradient taken with ``create_graph=True`` depends
    on the layer's input (its derivative there is zero); detached where only the clamp mask
    reads it (eager's mask is a constant); None where nothing was saved."""
    if y is None or spec.act.name != "linear":
        return y
    return y.detach()


def _implementation(x, spec) -> str:
    """``implementation(x)`` for ``bias_act`` with ``spec``. The extension's CUDA kernels
    compute linear, relu and lrelu only: a curved activation on CUDA runs what the backend
    rule runs without the extension (Triton; the reference while torch.compile traces)."""
    chosen = implementation(x)
    if chosen == "ext" and spec.act.curved and x.device.type == "cuda":
        return implementation_without_extension(x)
    return chosen


def bias_act_forward(x, b, dim, spec, scale=1.0):
    """Run the forward kernel, the extension's or Triton's by the backend rule:
    ``y = clamp(act(x * scale + b) * gain)``. ``y`` has the layout of ``x`` when ``x`` is
    dense (else ``x`` is first copied contiguous); ``b`` may have any stride."""
    if _implementation(x, spec) == "ext":
        return _ext_forward(x, b, dim, spec, scale)
    return _triton_forward(x, b, dim, spec, scale)


def _ext_forward(x, b, dim, spec, scale):
    """``bias_act_forward`` by the extension's ``torch.ops.fastgan.bias_act``."""
    if x.numel():
        record_launch("ext_bias_act")
    return torch.ops.fastgan.bias_act(x, b, dim, *ext_act_args(spec, x.dtype), scale)


def _triton_forward(x, b, dim, spec, scale):
    """``bias_act_forward`` by the Triton kernel."""
    x, n_outer, n_chan, n_inner = as_outer_chan_inner(x, dim)
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    t = _tiling(n_outer, n_chan, n_inner)
    params = act_params(spec, x.dtype, x.device, scale)
    has_bias = b is not None
    _launch_fwd(t["grid"], (x, b if has_bias else x, y, params),
                (b.stride(0) if has_bias else 0, t["n_rows"], t["n_cols"], n_chan,
                 t["n_blocks_j"]),
                dict(HAS_BIAS=has_bias, ACT=spec.act.code, USE_CLAMP=spec.clamp is not None,
                     **t["meta"]))
    return y


def unit_slope(spec, scale: float) -> bool:
    """Whether the gradient of ``bias_act`` is ``dx = dy``: a plain bias add (linear, gain 1,
    no clamp, scale 1)."""
    return (spec.act.name == "linear" and spec.gain == 1 and spec.clamp is None
            and scale == 1)


def bias_act_grad(dy, y, dim, spec, need_db, scale=1.0):
    """Run the gradient kernel of linear, relu and lrelu, the extension's or Triton's by the
    backend rule: ``(dx, db)`` with ``dx = scale * dz`` and ``db = sum of dz per channel``
    (None unless ``need_db``), ``dz = dy * slope(y)``. ``y`` is None where the slope does not
    depend on it (``saves_output``). ``dx`` has the layout of ``y`` (else of ``dy``) when that
    is dense; ``dy`` of other strides is first copied into it. Where the slope is 1
    (``unit_slope``) no kernel runs, as for eager's add: ``dx`` is ``dy`` itself and ``db``
    torch's sum of it (accumulated in float32 for 16-bit ``dy``; deterministic)."""
    if unit_slope(spec, scale):
        return dy, (_sum_per_channel(dy, dim) if need_db else None)
    if _implementation(dy, spec) == "ext":
        return _ext_grad(dy, y, dim, spec, need_db, scale)
    return _triton_grad(dy, y, None, dim, spec, need_db, scale)


def bias_act_grad_from_input(dy, x, b, dim, spec, need_db, scale=1.0, scale_dx=True):
    """``bias_act_grad`` for the curved activations, whose slope is read from the input:
    ``dz = dy * slope(x * scale + b)`` (the clamp mask from the output as the forward stored
    it), ``dx = scale * dz`` (``dz`` unless ``scale_dx``), by the extension's kernel or
    Triton's. ``dx`` has the layout of ``x`` when it is dense."""
    if _implementation(x, spec) == "ext":
        if dy.numel():
            record_launch("ext_bias_act_grad_from_input")
        return torch.ops.fastgan.bias_act_grad_from_input(
            dy, x, b, dim, *ext_act_args(spec, dy.dtype), scale, scale_dx, need_db)
    return _triton_grad(dy, x, b, dim, spec, need_db, scale, scale_dx)


def _ext_grad(dy, y, dim, spec, need_db, scale):
    """``bias_act_grad`` by the extension's ``torch.ops.fastgan.bias_act_grad`` (which takes
    ``dy`` for ``y`` where the slope is the constant ``gain``)."""
    if dy.numel():
        record_launch("ext_bias_act_grad")
    return torch.ops.fastgan.bias_act_grad(dy, dy if y is None else y, dim,
                                           *ext_act_args(spec, dy.dtype), scale, need_db)


def _triton_grad(dy, saved, b, dim, spec, need_db, scale, scale_dx=True):
    """``bias_act_grad`` (``saved`` the output ``y`` or None) or, for a curved activation,
    ``bias_act_grad_from_input`` (``saved`` the input ``x``, ``b`` its bias) by the Triton
    kernel."""
    from_x = spec.act.curved
    read = saved is not None
    if read:
        ref, n_outer, n_chan, n_inner = as_outer_chan_inner(saved, dim)
        dy = like_layout(dy, ref)
    else:  # the layout is dy's (copied dense if it is not)
        dy, n_outer, n_chan, n_inner = as_outer_chan_inner(dy, dim)
        ref = dy
    dx = torch.empty_like(ref, dtype=dy.dtype)
    if ref.numel() == 0:
        return dx, (torch.zeros(n_chan, dtype=dy.dtype, device=dy.device) if need_db else None)
    t = _tiling(n_outer, n_chan, n_inner)
    chan_is_col = t["meta"]["CHAN_IS_COL"]
    rows = t["n_prog_r"] if chan_is_col else t["n_blocks_j"]
    partial = torch.empty((rows, t["n_cols" if chan_is_col else "n_rows"]) if need_db else (1,),
                          dtype=compute_dtype(dy.dtype), device=dy.device)
    params = act_params(spec, dy.dtype, dy.device, scale)
    has_bias = b is not None
    launch = _launch_grad_from_input if from_x else _launch_grad
    launch(t["grid"], (dy, ref, b if has_bias else dy, dx, partial, params),
           (b.stride(0) if has_bias else 0, t["n_rows"], t["n_cols"], n_chan, t["n_blocks_j"]),
           dict(ACT=spec.act.code, USE_CLAMP=spec.clamp is not None, NEED_DB=need_db,
                READ_Y=read and not from_x, FROM_X=from_x, HAS_BIAS=has_bias,
                SCALE_DX=scale_dx, **t["meta"]))
    if not need_db:
        return dx, None
    db = partial.sum(dim=0) if chan_is_col else partial.view(-1, n_chan).sum(dim=0)
    return dx, db.to(dy.dtype)


def _broadcast_along(v, dim, ndim):
    """A ``[C]`` tensor viewed to broadcast along ``dim`` of a rank-``ndim`` tensor."""
    shape = [1] * ndim
    shape[dim] = -1
    return v.reshape(shape)


def _sum_per_channel(t, dim):
    """``[C]``: ``t`` summed over every dim but ``dim`` (``t`` itself for rank 1), accumulated
    in the compute dtype (float32 for 16-bit ``t``), in ``t``'s dtype; differentiable."""
    others = [d for d in range(t.ndim) if d != dim]
    if not others:  # torch sums over every dim for an empty list
        return t
    return t.sum(others, dtype=compute_dtype(t.dtype)).to(t.dtype)


def _dz_gradient(d_dx, d_db, dx_scale, dim, shape):
    """``dx_scale * d_dx + d_db`` broadcast along ``dim``, of ``shape``: the gradient of
    ``<d_dx, dx> + <d_db, db>`` with respect to ``dz`` (``dx = dx_scale * dz``,
    ``db = sum of dz per channel``)."""
    if d_dx is not None and dx_scale != 1:
        d_dx = d_dx * dx_scale
    if d_db is not None:
        d_db = _broadcast_along(d_db, dim, len(shape))
        d_dx = d_db.expand(shape) if d_dx is None else d_dx + d_db
    return d_dx


class BiasActGrad(torch.autograd.Function):
    """``(dy, y) -> (dx, db)``: ``dx = scale * dz``, ``db = sum of dz per channel``, with
    ``dz = dy * slope(y)``, the gradient of ``bias_act`` (with input ``scale``) at output ``y``
    (None where the slope does not depend on it, ``saves_output``), for linear, relu and
    lrelu.
    """

    @staticmethod
    def forward(ctx, dy, y, dim, spec, need_db, scale=1.0):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(y)
        ctx.dim, ctx.spec, ctx.scale, ctx.shape = dim, spec, scale, dy.shape
        return bias_act_grad(dy, y, dim, spec, need_db, scale)

    @staticmethod
    def backward(ctx, d_dx, d_db):
        # dx and db are linear in dy with a slope that is constant almost everywhere in y, so
        # the gradient w.r.t. dy is the same map applied to (scale * d_dx + d_db broadcast),
        # and the gradient w.r.t. y is zero (None: nothing flows back into y's producer).
        if not ctx.needs_input_grad[0] or (d_dx is None and d_db is None):
            return None, None, None, None, None, None
        y, = ctx.saved_tensors
        g = _dz_gradient(d_dx, d_db, ctx.scale, ctx.dim, ctx.shape)
        d_dy, _ = BiasActGrad.apply(g, y, ctx.dim, ctx.spec, False)
        return d_dy, None, None, None, None, None


def _curvature(g, dy, x, b, dim, spec, scale):
    """``g * dy * gain * f''(z)`` where ``|y| < clamp``, exactly 0 elsewhere, with
    ``z = x * scale + b``: the derivative with respect to ``z`` of ``<g, dz>``, where
    ``dz = dy * gain * f'(z)`` (masked) is the gradient ``bias_act_grad_from_input``
    computes. Plain torch ops in the compute dtype (float32 for 16-bit tensors), so that
    autograd differentiates it to any order; the mask compares the output as the forward
    stored it, as the kernels do."""
    dtype = compute_dtype(x.dtype)
    z = x.to(dtype)
    if scale != 1:
        z = z * scale
    if b is not None:
        z = z + _broadcast_along(b.to(dtype), dim, x.ndim)
    d_z = g.to(dtype) * dy.to(dtype) * spec.gain * reference.second_derivative(z, spec.act.name)
    if spec.clamp is not None:
        y = reference.apply_activation(z.detach(), dataclasses.replace(spec, clamp=None))
        d_z = torch.where(y.to(x.dtype).abs() < clamp_as_stored(spec.clamp, x.dtype), d_z, 0.0)
    return d_z.to(x.dtype)


class BiasActGradFromInput(torch.autograd.Function):
    """``(dy, x, b) -> (dx, db)``: ``dx = scale * dz``, ``db = sum of dz per channel``, with
    ``dz = dy * slope(x * scale + b)``, the gradient of ``bias_act`` for a curved activation
    (``spec.act.curved``: tanh, sigmoid, elu, selu, softplus, swish), read from its input;
    ``dx = dz`` when not ``scale_dx`` (how the backward applies it to a gradient of ``dz``).

    Its backward: the derivative w.r.t. ``dy`` is this Function again (``dz`` is linear in
    ``dy``), the one w.r.t. ``x`` and ``b`` the curvature term (``_curvature``, torch ops), so
    any order follows.
    """

    @staticmethod
    def forward(ctx, dy, x, b, dim, spec, need_db, scale=1.0, scale_dx=True):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(dy, x, b)
        ctx.dim, ctx.spec, ctx.scale, ctx.shape = dim, spec, scale, dy.shape
        ctx.dx_scale = scale if scale_dx else 1.0
        return bias_act_grad_from_input(dy, x, b, dim, spec, need_db, scale, scale_dx)

    @staticmethod
    def backward(ctx, d_dx, d_db):
        need_dy, need_x = ctx.needs_input_grad[:2]
        need_b = engine_will_use_grad(ctx, 2)
        if (d_dx is None and d_db is None) or not (need_dy or need_x or need_b):
            return None, None, None, None, None, None, None, None
        dy, x, b = ctx.saved_tensors
        g = _dz_gradient(d_dx, d_db, ctx.dx_scale, ctx.dim, ctx.shape)
        d_dy = d_x = d_b = None
        if need_dy:
            d_dy, _ = BiasActGradFromInput.apply(g, x, b, ctx.dim, ctx.spec, False, ctx.scale,
                                                 False)
        if need_x or need_b:
            d_z = _curvature(g, dy, x, b, ctx.dim, ctx.spec, ctx.scale)
            if need_x:
                d_x = d_z * ctx.scale if ctx.scale != 1 else d_z
            if need_b:
                d_b = _sum_per_channel(d_z, ctx.dim)
        return d_dy, d_x, d_b, None, None, None, None, None


class BiasActFunction(torch.autograd.Function):
    """``y = clamp(act(x * scale + b) * gain)``; saves ``x`` and ``b`` for a curved
    activation (its gradient and curvature read ``z = x * scale + b``), else ``y`` where the
    gradient reads it (``saves_output``), else nothing."""

    @staticmethod
    def forward(ctx, x, b, dim, spec, scale):
        ctx.set_materialize_grads(False)
        y = bias_act_forward(x, b, dim, spec, scale)
        if spec.act.curved:
            ctx.save_for_backward(x, b)
        else:
            ctx.save_for_backward(y if saves_output(spec) else None)
        ctx.dim, ctx.spec, ctx.scale, ctx.has_bias = dim, spec, scale, b is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        need_dx = ctx.needs_input_grad[0]
        need_db = ctx.has_bias and engine_will_use_grad(ctx, 1)
        if dy is None or not (need_dx or need_db):
            return None, None, None, None, None
        if ctx.spec.act.curved:
            x, b = ctx.saved_tensors
            dx, db = BiasActGradFromInput.apply(dy, x, b, ctx.dim, ctx.spec, need_db, ctx.scale)
        else:
            y, = ctx.saved_tensors
            dx, db = BiasActGrad.apply(dy, grad_input_output(y, ctx.spec), ctx.dim, ctx.spec,
                                       need_db, ctx.scale)
        return (dx if need_dx else None), db, None, None, None


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


def bias_act(x, b=None, dim=1, act="linear", alpha=None, gain=None, clamp=None, impl=None, *,
             scale=1.0):
    """Fused ``clamp(act(x * scale + b broadcast along dim) * gain, -clamp, clamp)``.

    Args:
        x: float tensor of any rank >= 1 and any strides.
        b: optional 1-d bias of length ``x.shape[dim]``, same dtype and device as ``x``, any
            stride.
        dim: the dimension ``b`` runs along.
        act: ``'linear'``, ``'relu'``, ``'lrelu'``, ``'tanh'``, ``'sigmoid'``, ``'elu'``,
            ``'selu'``, ``'softplus'`` or ``'swish'`` (StyleGAN2-ADA's activations;
            ``fastgan.reference.ACTIVATIONS``).
        alpha, gain: slope of lrelu for negative inputs (the others ignore it) and output
            scale; ``None`` takes the StyleGAN2-ADA default of ``act`` (lrelu: 0.2 and
            sqrt(2); relu and swish: gain sqrt(2); the others gain 1).
        clamp: ``None`` or a bound ``>= 0`` for ``|y|``; the gradient is zero where
            ``|y| >= clamp``. For 16-bit ``x``, the bound as rounded to that dtype (as torch
            compares such a tensor with a Python number).
        impl: StyleGAN2-ADA's argument: ``'ref'`` runs ``fastgan.reference``; any other value
            (``None``, ``'cuda'``) the fused kernels chosen by the backend rule
            (``fastgan.backend``). The extension's CUDA kernels compute linear, relu and lrelu
            only: with the backend forced to ``ext``, the other activations run the Triton
            kernels on CUDA tensors.
        scale: a factor applied to ``x`` before the bias (e.g. the equalized-learning-rate
            weight gain of the linear layer that produced ``x``), at no extra pass.

    Returns a tensor of the shape and dtype of ``x``, in its layout when ``x`` is dense.
    Differentiable to any order. For backward it saves nothing with ``act='linear'`` and no
    clamp, so the result may be modified in place (``y.add_(skip)``) as eager's may; ``x``
    and ``b`` for the curved activations (tanh ... swish), whose result may be modified in
    place too; the result otherwise (docs/design.md section 4).
    """
    spec = reference.resolve_activation(act, alpha, gain, clamp)
    dim = check_bias_act_args(x, b, dim)
    scale = check_scale(scale, "scale")
    if impl == "ref" or _implementation(x, spec) == "torch":
        return reference.bias_act(x, b, dim, act, alpha, gain, clamp, scale=scale)
    return BiasActFunction.apply(x, route_through_node(b), dim, spec, scale)


def _register_fakes() -> None:
    """Fake kernels of the extension's ``bias_act``, ``bias_act_grad`` and
    ``bias_act_grad_from_input``: the outputs' shapes, dtypes and strides as the C++ ops make
    them, after the same checks, so that FakeTensorMode, meta tensors and torch.compile can
    trace them."""

    @torch.library.register_fake("fastgan::bias_act")
    def _bias_act(x, b, dim, act, alpha, gain, clamp, scale):
        dim = check_bias_act_args(x, b, dim)
        return empty_dense(as_outer_chan_inner(x, dim)[0], x.dtype)

    @torch.library.register_fake("fastgan::bias_act_grad")
    def _bias_act_grad(dy, y, dim, act, alpha, gain, clamp, scale, need_db):
        check_batched(y, "y")
        check_same_shape(dy, "dy", y, "y")
        dim = normalize_dim(dim, y.ndim)
        dx = empty_dense(as_outer_chan_inner(y, dim)[0], dy.dtype)
        return dx, (dy.new_empty(y.shape[dim]) if need_db else None)

    @torch.library.register_fake("fastgan::bias_act_grad_from_input")
    def _bias_act_grad_from_input(dy, x, b, dim, act, alpha, gain, clamp, scale, scale_dx,
                                  need_db):
        dim = check_bias_act_args(x, b, dim)
        check_same_shape(dy, "dy", x, "x")
        dx = empty_dense(as_outer_chan_inner(x, dim)[0], dy.dtype)
        return dx, (dy.new_empty(x.shape[dim]) if need_db else None)


ext.register_fakes(_register_fakes)
