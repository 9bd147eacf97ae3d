"""StyleGAN2-ADA's ``upfirdn2d`` (upsample, pad, FIR filter, downsample) and its helpers,
differentiable to any order.

``upfirdn2d(x, f, up, down, padding, flip_filter, gain)`` on ``x [N, C, H, W]``: insert
``up - 1`` zeros after each pixel, pad by ``padding`` in that grid (negative crops), correlate
each channel with the filter (flipped unless ``flip_filter``, times ``gain``; a 1-d filter is
separable), keep every ``down``-th pixel (docs/design.md section 3; ``fastgan.reference``).
``setup_filter``, ``filter2d``, ``upsample2d`` and ``downsample2d`` are StyleGAN2-ADA's
helpers with its signatures and padding rules, so code written for its ``torch_utils.ops``
runs unchanged.

One Triton kernel computes the op in a single pass. Each program computes a tile of output
pixels of one image for a block of channels (up to 128 channels innermost for channels_last;
one channel for NCHW, or several where an image is smaller than a tile) and one polyphase
class: the output pixels ``(oy, ox)`` with ``oy % up_y`` and ``ox % up_x`` fixed, for which
the same filter taps land on input pixels and the others on inserted zeros. So it loops over
``taps / up`` taps per axis and never reads (or multiplies) an inserted zero. ``x`` is read
with its strides; the output has ``x``'s memory format (contiguous or channels_last,
``layout.memory_format``).

Autograd (docs/design.md section 4): the op is linear in ``x``, and its gradient is
``upfirdn2d`` of the upstream gradient with the same filter, ``flip_filter`` negated, ``up``
and ``down`` swapped and the padding of ``reference.Resampling.transposed`` (so ``dx`` has the
memory format of ``dy``). ``Upfirdn2d``'s backward calls ``Upfirdn2d`` itself, so every order
runs the kernel. The filter gets no gradient (StyleGAN2-ADA refuses a filter that requires
one, and so does this op).

Backends (``fastgan.backend``, docs/design.md section 8): the Triton kernel; the compiled
extension's ``torch.ops.fastgan.upfirdn2d``, which has a CPU kernel only, so CUDA tensors run
the Triton kernel where the rule says ``'ext'`` (the reference while ``torch.compile``
traces); the reference for ``'torch'`` and for ``impl='ref'``. The op's fake kernel is
registered here (``_register_fakes``).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from fastgan import ext, reference
from fastgan.backend import implementation, implementation_without_extension, record_launch
from fastgan.ops.activation import act_params, load_act_params
from fastgan.ops.launch import KernelLauncher
from fastgan.ops.layout import (INT32_MAX, check_float_tensor, check_scale, max_offset,
                                memory_format, next_pow2)
from fastgan.reference import Resampling, filter_taps, resampling
from fastgan.triton_support import tl, triton

IDENTITY, SEPARABLE, FULL = 0, 1, 2  # the filter kinds (FILTER): None, 1-d, 2-d
_SEPARABLE: tl.constexpr = tl.constexpr(SEPARABLE)
_FULL: tl.constexpr = tl.constexpr(FULL)
_TILE_ELEMENTS = 1024
_MAX_BLOCK_C = 128


@triton.jit
def _upfirdn2d_kernel(x_ptr, f_ptr, y_ptr, params_ptr,
                      C, H, W, OH, OW, sxn, sxc, sxh, sxw, syn, syc, syh, syw, sf0, sf1,
                      up_x, up_y, down_x, down_y, pad_x0, pad_y0, KH, KW,
                      n_tiles_s, n_tiles_r, n_blocks_c,
                      FILTER: tl.constexpr, FLIP: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    """One tile of ``y``: output pixels ``(py + up_y * r, px + up_x * s)`` for ``BLOCK_R``
    values of ``r`` and ``BLOCK_S`` of ``s``, ``BLOCK_C`` channels, one image.

    Programs run the ``up_x * up_y`` phases ``(py, px)`` fastest, then column tiles, row
    tiles, channel blocks and images. For phase ``py`` the taps ``ky = ky0 + up_y * t`` land
    on input rows ``iy = by + r * down_y + t`` (``ky0`` is ``pad_y0 - py * down_y`` modulo
    ``up_y``, and ``by * up_y = py * down_y + ky0 - pad_y0`` exactly); the other taps land on
    inserted zeros and are skipped. The same holds along x. Tap ``(ky, kx)`` has weight
    ``f[ky, kx]`` with FLIP (correlation), else ``f[KH - 1 - ky, KW - 1 - kx]``; a SEPARABLE
    ``f`` gives ``f[ky] * f[kx]``. Sums run in the dtype of ``params`` (``[alpha, gain,
    clamp, scale]``, of which the gain is used); with INT64 every index is widened before it
    is multiplied.
    """
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    n_phases = up_x * up_y
    phase = pid % n_phases
    rest = pid // n_phases
    tile_s = rest % n_tiles_s
    rest = rest // n_tiles_s
    tile_r = rest % n_tiles_r
    rest = rest // n_tiles_r
    block_c = rest % n_blocks_c
    n = rest // n_blocks_c
    py = phase // up_x
    px = phase % up_x

    p = tl.arange(0, BLOCK_R * BLOCK_S)
    r = tile_r * BLOCK_R + p // BLOCK_S
    s = tile_s * BLOCK_S + p % BLOCK_S
    oy = py + up_y * r
    ox = px + up_x * s
    pix_ok = (oy < OH) & (ox < OW)
    c = block_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    x_nc = x_ptr + n * sxn + (c * sxc)[None, :]

    # first tap of this phase per axis (a modulo that is >= 0 for either sign convention)
    ky0 = ((pad_y0 - py * down_y) % up_y + up_y) % up_y
    kx0 = ((pad_x0 - px * down_x) % up_x + up_x) % up_x
    by = (py * down_y + ky0 - pad_y0) // up_y  # exact
    bx = (px * down_x + kx0 - pad_x0) // up_x
    taps_y = (KH - ky0 + up_y - 1) // up_y
    taps_x = (KW - kx0 + up_x - 1) // up_x

    _, gain, _, _ = load_act_params(params_ptr)
    acc = tl.zeros([BLOCK_R * BLOCK_S, BLOCK_C], dtype=gain.dtype)
    iy0 = by + r * down_y
    ix0 = bx + s * down_x
    for ty in range(0, taps_y):
        iy = iy0 + ty
        row_ok = (pix_ok & (iy >= 0) & (iy < H))[:, None] & c_ok[None, :]
        x_row = x_nc + (iy * sxh)[:, None]
        ky = ky0 + up_y * ty
        f_row = f_ptr + (ky if FLIP else KH - 1 - ky) * sf0
        if FILTER == _SEPARABLE:
            wy = tl.load(f_row).to(gain.dtype)
        for tx in range(0, taps_x):
            ix = ix0 + tx
            kx = kx0 + up_x * tx
            fx = kx if FLIP else KW - 1 - kx
            if FILTER == _FULL:
                weight = tl.load(f_row + fx * sf1).to(gain.dtype)
            elif FILTER == _SEPARABLE:
                weight = wy * tl.load(f_ptr + fx * sf0).to(gain.dtype)
            else:
                weight = 1.0
            v = tl.load(x_row + (ix * sxw)[:, None], mask=row_ok & ((ix >= 0) & (ix < W))[:, None],
                        other=0.0)
            acc += v.to(gain.dtype) * weight
    y_offs = n * syn + (oy * syh + ox * syw)[:, None] + (c * syc)[None, :]
    tl.store(y_ptr + y_offs, (acc * gain).to(y_ptr.dtype.element_ty),
             mask=pix_ok[:, None] & c_ok[None, :])


_launch = KernelLauncher(_upfirdn2d_kernel, "upfirdn2d")


@functools.lru_cache(maxsize=4096)
def _tiling(channels_last: bool, c: int, rows: int, cols: int) -> dict:
    """Blocks for ``rows x cols`` output pixels per phase (``cdiv(OH, up_y)`` by
    ``cdiv(OW, up_x)``) of ``c`` channels, ~1024 outputs per program. channels_last: up to
    128 channels innermost (loads and stores run along contiguous channels), pixels fill the
    rest. Otherwise up to 128 pixels along a row, then rows, then, for small images,
    channels. Cached: it runs on every launch; callers must not modify the returned dict."""
    if channels_last:
        block_c = min(next_pow2(c), _MAX_BLOCK_C)
        block_s = min(next_pow2(cols), _TILE_ELEMENTS // block_c, 128)
        block_r = min(next_pow2(rows), max(1, _TILE_ELEMENTS // (block_c * block_s)))
    else:
        block_s = min(next_pow2(cols), 128)
        block_r = min(next_pow2(rows), _TILE_ELEMENTS // block_s)
        block_c = min(next_pow2(c), max(1, _TILE_ELEMENTS // (block_r * block_s)))
    return dict(n_tiles_s=triton.cdiv(cols, block_s), n_tiles_r=triton.cdiv(rows, block_r),
                n_blocks_c=triton.cdiv(c, block_c),
                meta=dict(BLOCK_R=block_r, BLOCK_S=block_s, BLOCK_C=block_c, num_warps=4))


@dataclass(frozen=True)
class Upfirdn2dArgs:
    """What the op does besides its tensors: the geometry, ``flip_filter`` and ``gain``."""
    geom: Resampling
    flip_filter: bool
    gain: float

    def output_hw(self, x: torch.Tensor, f) -> tuple[int, int]:
        fh, fw = filter_taps(f)
        return (self.geom.output_size(x.shape[2], fh, 1),
                self.geom.output_size(x.shape[3], fw, 0))

    def gradient(self, x_hw, y_hw, f) -> Upfirdn2dArgs:
        """The arguments of the gradient (docs/design.md section 3): the transposed geometry
        and the filter flipped the other way."""
        return Upfirdn2dArgs(self.geom.transposed(x_hw, y_hw, filter_taps(f)),
                             not self.flip_filter, self.gain)


def _triton_forward(x, f, args: Upfirdn2dArgs) -> torch.Tensor:
    """``upfirdn2d`` by the Triton kernel: ``y`` in the memory format of ``x``."""
    n, c, h, w = x.shape
    oh, ow = args.output_hw(x, f)
    fmt = memory_format(x)
    y = torch.empty((n, c, oh, ow), dtype=x.dtype, device=x.device, memory_format=fmt)
    if y.numel() == 0:
        return y
    (up_x, up_y), (down_x, down_y), (pad_x0, _, pad_y0, _) = (args.geom.up, args.geom.down,
                                                              args.geom.padding)
    t = _tiling(fmt == torch.channels_last, c, triton.cdiv(oh, up_y), triton.cdiv(ow, up_x))
    kind = IDENTITY if f is None else SEPARABLE if f.ndim == 1 else FULL
    kh, kw = filter_taps(f)
    strides = (0, 0) if f is None else (f.stride(0), f.stride(-1))
    # the gain travels as a linear activation's, in the compute dtype, cached per value
    params = act_params(reference.resolve_activation("linear", gain=args.gain), x.dtype,
                        x.device)
    grid = (n * t["n_blocks_c"] * t["n_tiles_r"] * t["n_tiles_s"] * up_x * up_y,)
    _launch(grid, (x, x if f is None else f, y, params),
            (c, h, w, oh, ow, *x.stride(), *y.stride(), *strides, up_x, up_y, down_x, down_y,
             pad_x0, pad_y0, kh, kw, t["n_tiles_s"], t["n_tiles_r"], t["n_blocks_c"]),
            dict(FILTER=kind, FLIP=args.flip_filter,
                 INT64=max(max_offset(x), max_offset(y)) > INT32_MAX, **t["meta"]))
    return y


def _ext_forward(x, f, args: Upfirdn2dArgs) -> torch.Tensor:
    """``upfirdn2d`` by the extension's ``torch.ops.fastgan.upfirdn2d`` (CPU)."""
    y = torch.ops.fastgan.upfirdn2d(x, f, *args.geom.up, *args.geom.down, *args.geom.padding,
                                    args.flip_filter, args.gain)
    if y.numel():
        record_launch("ext_upfirdn2d")
    return y


def _path(x: torch.Tensor) -> str:
    """``'triton'``, ``'ext'`` or ``'torch'`` for ``x`` by the backend rule. The extension's
    op has a CPU kernel only: where the rule says ``'ext'`` for another device, the Triton
    kernel runs (the reference while torch.compile traces, which cannot trace Triton
    launches)."""
    chosen = implementation(x)
    if chosen == "ext" and x.device.type != "cpu":
        return implementation_without_extension(x)
    return chosen


class Upfirdn2d(torch.autograd.Function):
    """``y = upfirdn2d(x, f, args)``; saves ``f`` (which gets no gradient)."""

    @staticmethod
    def forward(ctx, x, f, args):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(f)
        ctx.args, ctx.x_hw = args, x.shape[2:]
        return (_ext_forward if _path(x) == "ext" else _triton_forward)(x, f, args)

    @staticmethod
    def backward(ctx, dy):
        if dy is None or not ctx.needs_input_grad[0]:
            return None, None, None
        f, = ctx.saved_tensors
        return Upfirdn2d.apply(dy, f, ctx.args.gradient(ctx.x_hw, dy.shape[2:], f)), None, None


def check_filter(f) -> tuple[int, int]:
    """Raise a clear error unless ``f`` is None or a filter ``upfirdn2d`` takes: float32,
    1-d or 2-d, not empty, not requiring grad; return its ``(height, width)`` in taps."""
    if f is not None:
        if not isinstance(f, torch.Tensor):
            raise TypeError(f"f must be None or a torch.Tensor, got {type(f).__name__}")
        if f.dtype != torch.float32:
            raise TypeError(f"f must be float32 (as setup_filter makes it), got {f.dtype}")
        if f.ndim not in (1, 2) or f.numel() == 0:
            raise ValueError(f"f must be a non-empty 1-d (separable) or 2-d filter, got shape "
                             f"{tuple(f.shape)}")
        if f.requires_grad:
            raise ValueError("f must not require grad: upfirdn2d has no gradient for the "
                             "filter (as in StyleGAN2-ADA); pass f.detach()")
    return filter_taps(f)


def check_upfirdn2d_args(x, f, up, down, padding, flip_filter, gain) -> Upfirdn2dArgs:
    """Validate ``upfirdn2d``'s arguments (clear errors naming them) and normalize them."""
    check_float_tensor(x, "x")
    if x.ndim != 4:
        raise ValueError(f"x must be 4-d [N, C, H, W], got shape {tuple(x.shape)}")
    taps = check_filter(f)
    if f is not None and f.device != x.device:
        raise ValueError(f"f is on {f.device} but x is on {x.device}; expected the same device")
    if not isinstance(flip_filter, bool):
        raise TypeError(f"flip_filter must be a bool, got {flip_filter!r}")
    args = Upfirdn2dArgs(resampling(up, down, padding), flip_filter, check_scale(gain, "gain"))
    oh, ow = args.output_hw(x, f)
    if oh < 1 or ow < 1:
        raise ValueError(f"padding {padding!r} with up {up!r} leaves fewer pixels than the "
                         f"{taps[0]}x{taps[1]} filter has taps for x of shape "
                         f"{tuple(x.shape)}: the output would be {oh}x{ow}")
    return args


def upfirdn2d(x, f, up=1, down=1, padding=0, flip_filter=False, gain=1, impl="cuda"):
    """Pad, upsample, FIR-filter and downsample ``x`` (StyleGAN2-ADA's ``upfirdn2d``).

    Args:
        x: ``[N, C, H, W]`` float tensor (fp16, bf16, fp32, fp64), any strides.
        f: float32 filter on ``x``'s device that does not require grad: ``[fh, fw]``,
            ``[taps]`` (separable: along x, then y), or None (identity).
        up, down: int or ``(x, y)``, each >= 1.
        padding: int, ``(x, y)`` or ``(x0, x1, y0, y1)`` in the upsampled grid; negative
            crops.
        flip_filter: False convolves with ``f``, True correlates.
        gain: the output scale (the filter times ``gain``).
        impl: ``'ref'`` runs ``fastgan.reference.upfirdn2d``; anything else (StyleGAN2-ADA's
            ``'cuda'``) the backend rule's implementation.

    Returns ``[N, C, (H * up_y + y0 + y1 - fh) // down_y + 1, (W * up_x + x0 + x1 - fw) //
    down_x + 1]`` in ``x``'s dtype and memory format, computed in float32 (float64 for
    float64). Differentiable in ``x`` to any order.
    """
    args = check_upfirdn2d_args(x, f, up, down, padding, flip_filter, gain)
    if impl == "ref" or _path(x) == "torch":
        return reference.upfirdn2d(x, f, args.geom.up, args.geom.down, args.geom.padding,
                                   flip_filter, args.gain)
    return Upfirdn2d.apply(x, f, args)


# --------------------------------------------------------------------------------------------
# StyleGAN2-ADA's helpers
# --------------------------------------------------------------------------------------------

def setup_filter(f, device=torch.device("cpu"), normalize=True, flip_filter=False, gain=1,
                 separable=None):
    """A float32 FIR filter for ``upfirdn2d`` from ``f`` (a tensor, array or list of shape
    ``[fh, fw]``, ``[taps]`` or ``[]``; None: identity): divided by its sum (``normalize``),
    flipped (``flip_filter``), times ``gain ** (ndim / 2)``, on ``device``. It is 1-d
    (separable) when ``separable``, or by default when ``f`` is 1-d with at least 8 taps;
    otherwise 2-d (a 1-d ``f`` becomes its outer product). ``f`` itself is not modified."""
    f = torch.as_tensor(1.0 if f is None else f, dtype=torch.float32)
    if f.ndim > 2 or f.numel() == 0:
        raise ValueError(f"f must be a scalar, a non-empty 1-d or 2-d filter, or None, got "
                         f"shape {tuple(f.shape)}")
    f = f.reshape(1) if f.ndim == 0 else f
    if separable is None:
        separable = f.ndim == 1 and f.numel() >= 8
    if f.ndim == 1 and not separable:
        f = torch.outer(f, f)
    if f.ndim != (1 if separable else 2):
        raise ValueError(f"separable=True needs a 1-d f, got shape {tuple(f.shape)}")
    if normalize:
        f = f / f.sum()
    if flip_filter:
        f = f.flip(list(range(f.ndim)))
    scale = check_scale(gain, "gain")
    if f.ndim == 1 and scale < 0:
        raise ValueError(f"gain must be >= 0 for a separable filter (each axis takes "
                         f"gain ** 0.5), got {gain}")
    return (f * scale ** (f.ndim / 2)).to(device=device)


def filter2d(x, f, padding=0, flip_filter=False, gain=1, impl="cuda"):
    """Filter ``x`` with ``f`` (``upfirdn2d`` with ``up = down = 1``), padded so that the
    output has ``x``'s size; ``padding`` (int, ``(x, y)`` or ``(x0, x1, y0, y1)``) is
    added to that."""
    fh, fw = check_filter(f)
    px0, px1, py0, py1 = resampling(padding=padding).padding
    padding = (px0 + fw // 2, px1 + (fw - 1) // 2, py0 + fh // 2, py1 + (fh - 1) // 2)
    return upfirdn2d(x, f, padding=padding, flip_filter=flip_filter, gain=gain, impl=impl)


def upsample2d(x, f, up=2, padding=0, flip_filter=False, gain=1, impl="cuda"):
    """Upsample ``x`` by ``up`` (int or ``(x, y)``) with the filter ``f``, padded so that
    the output is ``up`` times ``x``'s size, with ``gain * up_x * up_y`` (which keeps the
    mean); ``padding`` is added to that."""
    fh, fw = check_filter(f)
    geom = resampling(up=up, padding=padding)
    (up_x, up_y), (px0, px1, py0, py1) = geom.up, geom.padding
    padding = (px0 + (fw + up_x - 1) // 2, px1 + (fw - up_x) // 2,
               py0 + (fh + up_y - 1) // 2, py1 + (fh - up_y) // 2)
    return upfirdn2d(x, f, up=up, padding=padding, flip_filter=flip_filter,
                     gain=check_scale(gain, "gain") * up_x * up_y, impl=impl)


def downsample2d(x, f, down=2, padding=0, flip_filter=False, gain=1, impl="cuda"):
    """Downsample ``x`` by ``down`` (int or ``(x, y)``) with the filter ``f``, padded so
    that the output is ``x``'s size divided by ``down``; ``padding`` is added to that."""
    fh, fw = check_filter(f)
    geom = resampling(down=down, padding=padding)
    (down_x, down_y), (px0, px1, py0, py1) = geom.down, geom.padding
    padding = (px0 + (fw - down_x + 1) // 2, px1 + (fw - down_x) // 2,
               py0 + (fh - down_y + 1) // 2, py1 + (fh - down_y) // 2)
    return upfirdn2d(x, f, down=down, padding=padding, flip_filter=flip_filter, gain=gain,
                     impl=impl)



def _register_fakes() -> None:
    """The fake kernel of the extension's ``upfirdn2d``: the output's shape, dtype and memory
    format as the C++ op makes them, after the same checks."""

    @torch.library.register_fake("fastgan::upfirdn2d")
    def _upfirdn2d(x, f, up_x, up_y, down_x, down_y, pad_x0, pad_x1, pad_y0, pad_y1,
                   flip_filter, gain):
        args = check_upfirdn2d_args(x, f, (up_x, up_y), (down_x, down_y),
                                    (pad_x0, pad_x1, pad_y0, pad_y1), flip_filter, gain)
        return torch.empty((*x.shape[:2], *args.output_hw(x, f)), dtype=x.dtype,
                           device=x.device, memory_format=memory_format(x))


ext.register_fakes(_register_fakes)
