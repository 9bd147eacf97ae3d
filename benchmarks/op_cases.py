"""The op cases (docs/design.md section 6): ``bias_act``, ``grad_sq_norm``, ``conv2d_act`` and
``upfirdn2d``.

Each runs in three modes, always on inputs that require grad as in training: ``fwd`` (the
forward, saving what its backward needs), ``bwd`` (``autograd.grad`` through a retained
graph), ``fwd+bwd``. Inputs are random (never zeros) and rotate among several sets so that one
pass over them exceeds L2.

Each case states the bytes it must move (every input read once, every output written once)
and, for convolutions, its FLOPs; the formulas sit with the case factories below and are
repeated in benchmarks/NOTES.md.

The ``cpu`` size (``python -m benchmarks --device cpu``) times the ops on a CPU: ``bias_act``,
``grad_sq_norm`` and ``upfirdn2d`` at CPU-sized shapes beside full ones the CPU runs in well
under a second,
``conv2d_act`` at CPU-sized layers in float32 only (bf16 convolutions on a CPU without
bf16 instructions run emulated, seconds per call; benchmarks/NOTES.md).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

import fastgan
from benchmarks.common import (CHANNELS_LAST, DTYPES, SHAPE_SETS, Case, Unsupported, build_op,
                               dims, layout_label, op_modes, randn)
from fastgan import reference

# ---------------------------------------------------------------------------------------
# bias_act: bias + leaky ReLU + gain (StyleGAN2 defaults: alpha 0.2, gain sqrt(2))


def bias_act_eager(x, b):
    return reference.bias_act(x, b, 1, "lrelu")


def bias_act_fused(x, b):
    return fastgan.bias_act(x, b, 1, "lrelu")


def bias_act_inputs(shape, dtype, device, channels_last=False):
    """``x`` of ``shape`` and a bias of its channels (a contiguous vector, as a model's
    parameter cast to ``dtype`` is)."""
    return (randn(shape, dtype, device, channels_last=channels_last),
            randn(shape[1], dtype, device, scale=0.1))


def bias_act_bytes(shape, dtype, mode) -> int:
    """Bytes bias_act must move, with E = elements of x, C = channels, s = element size:
    fwd reads x, b and writes y: (2E + C) s; bwd reads dy and the saved y, writes dx and db:
    (3E + C) s; fwd+bwd is their sum: (5E + 2C) s."""
    e, c, s = math.prod(shape), shape[1], dtype.itemsize
    return {"fwd": 2 * e + c, "bwd": 3 * e + c, "fwd+bwd": 5 * e + 2 * c}[mode] * s


BIAS_ACT_SHAPES = {
    "full": [(32, 128, 256, 256), (32, 512, 16, 16), (64, 256, 64, 64)],
    "cpu": [(16, 128, 64, 64), (32, 512, 16, 16)],
    "smoke": [(2, 8, 16, 16), (2, 16, 4, 4), (3, 8, 8, 8)],
}


def _memory_bound_cases(bench, shapes, make_inputs, eager, fused, nbytes, size) -> list[Case]:
    """The cases of an op without FLOPs to speak of: every shape of ``shapes`` at ``size``,
    dtype and mode, with ``make_inputs(shape, dtype, device)`` and the bytes
    ``nbytes(shape, dtype, mode)``."""
    cases = []
    for shape in shapes[SHAPE_SETS[size]]:
        for dtype in DTYPES.values():
            make = functools.partial(make_inputs, shape, dtype)
            for mode in op_modes(size):
                build = functools.partial(build_op, eager, fused, make, mode)
                cases.append(Case(bench, mode, dims(shape), dtype, build,
                                  nbytes(shape, dtype, mode), None))
    return cases


def bias_act_cases(size: str) -> list[Case]:
    return _memory_bound_cases("bias_act", BIAS_ACT_SHAPES, bias_act_inputs, bias_act_eager,
                               bias_act_fused, bias_act_bytes, size)


# ---------------------------------------------------------------------------------------
# grad_sq_norm: per-sample sum of squares (the R1/R2 reduction), fp32 accumulation


def _grad_sq_norm_inputs(shape, dtype, device):
    return (randn(shape, dtype, device),)


def grad_sq_norm_bytes(shape, dtype, mode) -> int:
    """Bytes grad_sq_norm must move, with E = elements of g, N = batch, s = element size, fp32
    norms: fwd reads g, writes N norms: E s + 4N; bwd reads g and dout, writes dg:
    2E s + 4N; fwd+bwd: 3E s + 8N."""
    e, n, s = math.prod(shape), shape[0], dtype.itemsize
    return {"fwd": e * s + 4 * n, "bwd": 2 * e * s + 4 * n, "fwd+bwd": 3 * e * s + 8 * n}[mode]


GRAD_SQ_NORM_SHAPES = {
    "full": [(64, 3, 256, 256), (32, 512, 32, 32)],
    "cpu": [(64, 3, 64, 64), (64, 3, 256, 256), (32, 512, 32, 32)],
    "smoke": [(2, 3, 16, 16), (2, 16, 8, 8)],
}


def grad_sq_norm_cases(size: str) -> list[Case]:
    return _memory_bound_cases("grad_sq_norm", GRAD_SQ_NORM_SHAPES, _grad_sq_norm_inputs,
                               reference.grad_sq_norm, fastgan.grad_sq_norm, grad_sq_norm_bytes,
                               size)


# ---------------------------------------------------------------------------------------
# Convolutions: conv2d_act, an R3GAN grouped block, and the plain conv stack of r1_step


@dataclass(frozen=True)
class Conv:
    """One ``conv2d_act`` layer: square kernel, padding k // 2."""
    cin: int
    cout: int
    k: int = 3
    stride: int = 1
    groups: int = 1
    act: str = "lrelu"
    bias: bool = True

    def out_hw(self, h: int, w: int) -> tuple[int, int]:
        p = self.k // 2
        return (h + 2 * p - self.k) // self.stride + 1, (w + 2 * p - self.k) // self.stride + 1

    def label(self) -> str:
        text = f"->{self.cout} k{self.k}"
        text += f" s{self.stride}" if self.stride != 1 else ""
        text += f" g{self.groups}" if self.groups != 1 else ""
        text += "" if self.act == "lrelu" else f" {self.act}"
        return text + ("" if self.bias else " nobias")


def conv_stack(conv2d_act, layers: tuple[Conv, ...], x, *params):
    """``x`` through ``layers`` of ``conv2d_act``; ``params`` are each layer's weight, then its
    bias if it has one."""
    it = iter(params)
    for layer in layers:
        w = next(it)
        b = next(it) if layer.bias else None
        x = conv2d_act(x, w, b, layer.stride, layer.k // 2, layer.groups, layer.act)
    return x


def conv_params(layers, dtype, device):
    """Each layer's weight (NCHW-contiguous, the layout of a model's parameters) ~ N(0,
    1/fan_in), so activations keep their scale through the stack, then its bias ~ N(0, 0.1^2)."""
    params = []
    for layer in layers:
        fan_in = layer.cin // layer.groups * layer.k * layer.k
        params.append(randn((layer.cout, layer.cin // layer.groups, layer.k, layer.k), dtype,
                            device, scale=fan_in ** -0.5))
        if layer.bias:
            params.append(randn((layer.cout,), dtype, device, scale=0.1))
    return params


def conv_inputs(n, h, w, layers, dtype, device):
    """``(x, *params)`` of a conv stack: ``x`` channels_last in bf16 (``CHANNELS_LAST``)."""
    x = randn((n, layers[0].cin, h, w), dtype, device, channels_last=CHANNELS_LAST[dtype])
    return (x, *conv_params(layers, dtype, device))


def conv_costs(n, h, w, layers, dtype, mode) -> tuple[int, float]:
    """Bytes and FLOPs of a conv stack in ``mode``, summed over its layers.

    Per layer with X, W, B, Y the element counts of input, weight, bias and output and s the
    element size: fwd reads x, w, b and writes y: (X + W + B + Y) s; bwd reads dy, the saved
    y (activation slope), x (weight gradient) and w (input gradient), writes dx, dw, db:
    (2Y + 2X + 2W + B) s; fwd+bwd: the sum. FLOPs: F = 2 N Cout Ho Wo (Cin/groups) k^2 for the
    forward; bwd 2F (input and weight gradient); fwd+bwd 3F.
    """
    nbytes, flops = 0, 0.0
    for layer in layers:
        ho, wo = layer.out_hw(h, w)
        x_el, y_el = n * layer.cin * h * w, n * layer.cout * ho * wo
        w_el = layer.cout * layer.cin // layer.groups * layer.k ** 2
        b_el = layer.cout if layer.bias else 0
        fwd_bytes, bwd_bytes = x_el + w_el + b_el + y_el, 2 * y_el + 2 * x_el + 2 * w_el + b_el
        nbytes += {"fwd": fwd_bytes, "bwd": bwd_bytes, "fwd+bwd": fwd_bytes + bwd_bytes}[mode]
        f = 2.0 * n * layer.cout * ho * wo * (layer.cin // layer.groups) * layer.k ** 2
        flops += {"fwd": f, "bwd": 2 * f, "fwd+bwd": 3 * f}[mode]
        h, w = ho, wo
    return nbytes * dtype.itemsize, flops


def stack_label(n, h, w, layers, name=None) -> str:
    head = f"{n}x{layers[0].cin}x{h}x{w}"
    return f"{head} {name}" if name else head + " " + layers[0].label()


# (batch, height, width, layers, name); batch 32 shapes of a StyleGAN2-256 discriminator
R3GAN_BLOCK_256 = (Conv(256, 256, k=1), Conv(256, 256, k=3, groups=16),
                   Conv(256, 256, k=1, act="linear"))
R3GAN_BLOCK_64 = (Conv(64, 64, k=1), Conv(64, 64, k=3, groups=4), Conv(64, 64, k=1, act="linear"))
CONV_SHAPES = {
    "full": [
        (32, 256, 256, (Conv(128, 128),), None),
        (32, 128, 128, (Conv(256, 256),), None),
        (32, 32, 32, (Conv(512, 512),), None),
        (32, 8, 8, (Conv(512, 512),), None),
        (32, 256, 256, (Conv(128, 256, stride=2),), None),
        (32, 32, 32, (Conv(512, 512, stride=2),), None),
        (32, 256, 256, (Conv(3, 128, k=1),), None),  # fromrgb
        (32, 128, 128, (Conv(128, 256, k=1, act="linear", bias=False),), None),  # resnet skip
        (32, 64, 64, R3GAN_BLOCK_256, "r3gan-block 1x1>3x3 g16>1x1"),
    ],
    "cpu": [  # the same kinds of layer, 8-32 images; 32x512x8x8 is a full-size one
        (8, 64, 64, (Conv(64, 64),), None),
        (16, 32, 32, (Conv(128, 128),), None),
        (32, 8, 8, (Conv(512, 512),), None),
        (8, 64, 64, (Conv(64, 128, stride=2),), None),
        (8, 64, 64, (Conv(3, 64, k=1),), None),  # fromrgb
        (8, 32, 32, (Conv(64, 128, k=1, act="linear", bias=False),), None),  # resnet skip
        (8, 32, 32, R3GAN_BLOCK_64, "r3gan-block 1x1>3x3 g4>1x1"),  # 16 channels per group
    ],
    "smoke": [
        (2, 8, 8, (Conv(4, 4),), None),
        (2, 5, 5, (Conv(8, 8),), None),
        (2, 8, 8, (Conv(4, 8, stride=2),), None),
        (2, 8, 8, (Conv(3, 4, k=1),), None),
        (2, 4, 4, (Conv(4, 8, k=1, act="linear", bias=False),), None),
        (2, 6, 6, (Conv(8, 8, k=1), Conv(8, 8, k=3, groups=2), Conv(8, 8, k=1, act="linear")),
         "r3gan-block 1x1>3x3 g2>1x1"),
    ],
}


# The ext provider's conv2d_act: the extension has no convolution, so it is F.conv2d (cuDNN on
# CUDA) then the extension's bias_act, forward and gradient; FASTGAN_CONV=cudnn keeps the
# per-shape choice on CUDA from picking the Triton conv or eager instead.
EXT_CONV_PATH = "cudnn"
EXT_CONV_NOTE = ("ext", "F.conv2d, then the extension's bias_act (FASTGAN_CONV=cudnn with the "
                        "backend forced to 'ext')")


def conv2d_act_cases(size: str) -> list[Case]:
    """Every layer stack of ``CONV_SHAPES`` at ``size``, in both dtypes (float32 only at the
    ``cpu`` size), in every mode."""
    cases = []
    dtypes = [torch.float32] if size == "cpu" else list(DTYPES.values())
    for n, h, w, layers, name in CONV_SHAPES[SHAPE_SETS[size]]:
        eager = functools.partial(conv_stack, reference.conv2d_act, layers)
        fused = functools.partial(conv_stack, fastgan.conv2d_act, layers)
        for dtype in dtypes:
            label = stack_label(n, h, w, layers, name) + layout_label(dtype)
            make = functools.partial(conv_inputs, n, h, w, layers, dtype)
            for mode in op_modes(size):
                nbytes, flops = conv_costs(n, h, w, layers, dtype, mode)
                build = functools.partial(build_op, eager, fused, make, mode,
                                          conv_path=EXT_CONV_PATH)
                cases.append(Case("conv2d_act", mode, label, dtype, build, nbytes, flops,
                                  notes=(EXT_CONV_NOTE,)))
    return cases


# ---------------------------------------------------------------------------------------
# upfirdn2d: StyleGAN2-ADA's resampling filter, as its discriminator runs it


@dataclass(frozen=True)
class Resample:
    """One ``upfirdn2d`` call of a StyleGAN2 discriminator with its [1, 3, 3, 1] filter (4x4):
    ``blur`` is the filter before each stride-2 3x3 conv (padding 2, the size + 1: the conv
    then halves it), ``down2`` the skip branch's ``downsample2d`` (down 2, padding 1)."""
    kind: str

    @property
    def kwargs(self) -> dict:
        return {"blur": dict(padding=2), "down2": dict(down=2, padding=1)}[self.kind]

    def out_hw(self, h: int, w: int) -> tuple[int, int]:
        return {"blur": (h + 1, w + 1), "down2": (h // 2, w // 2)}[self.kind]


def upfirdn2d_inputs(shape, dtype, device):
    """``x`` (channels_last in bf16, ``CHANNELS_LAST``) and the filter as StyleGAN2-ADA's
    networks hold it (``setup_filter([1, 3, 3, 1])``, float32, no gradient)."""
    return (randn(shape, dtype, device, channels_last=CHANNELS_LAST[dtype]),
            fastgan.setup_filter([1, 3, 3, 1], device=device))


def upfirdn2d_bytes(shape, resample: Resample, dtype, mode) -> int:
    """Bytes upfirdn2d must move, with X and Y the elements of its input and output and s the
    element size (the 64-byte filter left out): fwd reads x, writes y: (X + Y) s; bwd reads
    dy, writes dx: (Y + X) s; fwd+bwd: 2 (X + Y) s."""
    n, c, h, w = shape
    x_el, y_el = n * c * h * w, n * c * math.prod(resample.out_hw(h, w))
    return {"fwd": 1, "bwd": 1, "fwd+bwd": 2}[mode] * (x_el + y_el) * dtype.itemsize


UPFIRDN2D_SHAPES = {  # batch 32 shapes of a StyleGAN2-256 discriminator (resnet)
    "full": [((32, 128, 256, 256), Resample("blur")), ((32, 512, 32, 32), Resample("blur")),
             ((32, 128, 256, 256), Resample("down2"))],
    "cpu": [((8, 128, 64, 64), Resample("blur")), ((32, 512, 16, 16), Resample("blur")),
            ((8, 128, 64, 64), Resample("down2"))],
    "smoke": [((2, 8, 16, 16), Resample("blur")), ((2, 8, 9, 9), Resample("down2"))],
}
EXT_UPFIRDN2D_CUDA = ("the extension has no CUDA upfirdn2d kernel (CPU only): CUDA tensors run "
                      "the Triton kernel, the fastgan rows")


def upfirdn2d_build(build, *args):
    """The case builder ``build(*args, ctx, provider)`` (``build_op``, ``build_overhead``),
    with the ext provider refused on CUDA, where the extension has no upfirdn2d kernel (forced
    to 'ext', the op runs the Triton kernel there)."""
    def checked(ctx, provider):
        if provider == "ext" and ctx.device.type == "cuda":
            raise Unsupported(EXT_UPFIRDN2D_CUDA)
        return build(*args, ctx, provider)
    return checked


def upfirdn2d_cases(size: str) -> list[Case]:
    cases = []
    for shape, resample in UPFIRDN2D_SHAPES[SHAPE_SETS[size]]:
        eager = functools.partial(reference.upfirdn2d, **resample.kwargs)
        fused = functools.partial(fastgan.upfirdn2d, **resample.kwargs)
        for dtype in DTYPES.values():
            label = f"{dims(shape)} {resample.kind}{layout_label(dtype, weights=False)}"
            make = functools.partial(upfirdn2d_inputs, shape, dtype)
            for mode in op_modes(size):
                build = upfirdn2d_build(build_op, eager, fused, make, mode)
                cases.append(Case("upfirdn2d", mode, label, dtype, build,
                                  upfirdn2d_bytes(shape, resample, dtype, mode), None))
    return cases
