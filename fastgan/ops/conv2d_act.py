"""Fused conv2d + bias + activation, differentiable to any order.

``conv2d_act(x, w, b, stride, padding, groups, act, alpha, gain, clamp, weight_gain)`` is
exactly ``bias_act(F.conv2d(x, w * weight_gain, None, stride, padding, 1, groups), b, 1, act,
alpha, gain, clamp)`` (docs/design.md section 3); ``weight_gain`` carries an equalized learning
rate as a scalar, so the weight is never scaled or copied.

Forward, two implementations with identical results (up to rounding):

* ``triton``: an implicit-GEMM Triton kernel (no im2col buffer) that reads ``x`` and the weight
  with any strides, and whose epilogue applies weight gain, bias, activation, gain and clamp
  before its single store;
* ``cudnn``: ``F.conv2d`` without bias (cuDNN on CUDA), then the fused ``bias_act`` kernel
  (which applies the weight gain).

Both epilogues compute the piecewise-linear activations (linear, relu, lrelu). With a curved
activation (tanh ... swish, whose gradient reads the pre-activation) ``conv2d_act()`` is
composed from the public ops, ``bias_act(F.conv2d(x, w), b, ..., scale=weight_gain)``, so
that ``bias_act`` saves what its second derivative needs (docs/design.md section 4).

For those, ``conv2d_act()`` picks one of the two, or ``plain`` -- eager PyTorch,
``reference.conv2d_act`` with autograd's own backward -- where that is what a training step
pays least for, per problem and per process (``fastgan.ops.conv_choice``, docs/design.md
section 8); under ``torch.use_deterministic_algorithms(True)`` nothing is timed and ``cudnn``
runs (a forced ``triton`` then launches one fixed tile config instead of autotuning). Where the
backend rule runs the compiled extension on CPU tensors, and while torch.compile traces,
nothing is timed either: ``cudnn`` runs, with the extension's ``bias_act``
(``FASTGAN_CONV=plain`` forces the reference).

Autograd (docs/design.md section 4): ``Conv2dAct`` saves ``x``, ``w`` and, where the
activation's gradient reads it (``bias_act.saves_output``), the output ``y`` -- never the
pre-activation; the output of a linear layer without clamp may be modified in place. Its
backward is ``BiasActGrad`` (``dz = weight_gain * dy * slope(y)`` and
the bias gradient), then ``grad_input`` as a transposed convolution and ``grad_weight`` by
``aten.convolution_backward``, both differentiable torch ops, so every order works. Weight and
bias gradients are computed only when the engine will use them (not in R1's inner pass), and
a backward that receives no gradient (R1's outer pass reaching a layer's output) does nothing.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastgan import reference
from fastgan.backend import implementation, interpreter_enabled, record_launch
from fastgan.grad_control import (engine_will_use_grad, route_through_node,
                                  weight_gradients_disabled)
from fastgan.ops.activation import act_params, activate, load_act_params
from fastgan.ops.bias_act import (BiasActGrad, bias_act, bias_act_forward, grad_input_output,
                                  saves_output)
from fastgan.ops.conv_choice import (FIXED_PATH, Problem, cached_path, decide, environment,
                                     forced_path, timing_allowed)
from fastgan.ops.launch import KernelLauncher
from fastgan.ops.layout import (INT32_MAX, check_float_tensor, check_same_device_dtype, check_scale,
                                max_offset, memory_format, next_pow2)
from fastgan.triton_support import tl, triton


# --------------------------------------------------------------------------------------------
# Forward kernel
# --------------------------------------------------------------------------------------------

def _config(block_m, block_n, block_k, num_warps, num_stages):
    return triton.Config(dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k),
                         num_warps=num_warps, num_stages=num_stages)


# GPU candidates; ``_prune_configs`` keeps those whose BLOCK_N / BLOCK_K fit the channels per
# group (so R3GAN's 16 channels per group run 16-wide tiles, wide convs 64- to 256-wide ones).
_GPU_CONFIGS = [
    _config(128, 256, 64, 8, 3),
    _config(256, 128, 64, 8, 3),
    _config(128, 128, 32, 8, 3),
    _config(128, 128, 64, 8, 3),
    _config(128, 64, 32, 4, 4),
    _config(64, 128, 32, 4, 4),
    _config(64, 64, 64, 4, 3),
    _config(128, 32, 32, 4, 4),
    _config(64, 32, 32, 4, 4),
    _config(128, 16, 16, 4, 4),
    _config(256, 16, 16, 4, 3),
    _config(64, 16, 16, 2, 4),
]
# The interpreter cannot autotune several configs without a GPU (docs/design.md section 5).
_INTERPRETER_CONFIGS = [_config(64, 16, 16, 4, 1)]


def _prune_configs(configs, named_args, **kwargs):
    """Keep configs with ``BLOCK_N`` in ``[min(64, P_n), P_n]`` and ``BLOCK_K`` in
    ``[min(32, P_k), P_k]``, where ``P`` is the channel count per group rounded up to a power
    of two (at least 16, the smallest tensor-core tile)."""
    p_n = max(16, next_pow2(named_args["OC_g"]))
    p_k = max(16, next_pow2(named_args["C_g"]))
    kept = [c for c in configs
            if min(64, p_n) <= c.kwargs["BLOCK_N"] <= p_n
            and min(32, p_k) <= c.kwargs["BLOCK_K"] <= p_k]
    return kept or configs[-1:]


@triton.autotune(
    configs=_INTERPRETER_CONFIGS if interpreter_enabled() else _GPU_CONFIGS,
    key=["M", "C_g", "OC_g", "groups", "H", "W", "KH", "KW", "stride_h", "stride_w", "sxc"],
    prune_configs_by=None if interpreter_enabled() else {"early_config_prune": _prune_configs},
)
@triton.jit
def _conv2d_act_fwd_kernel(
        x_ptr, w_ptr, b_ptr, y_ptr, params_ptr,
        M, H, W, OH, OW, C_g, OC_g, groups,
        sxn, sxc, sxh, sxw,
        swo, swi, swh, sww,
        syn, syc, syh, syw, sb,
        stride_h, stride_w, pad_h, pad_w,
        KH: tl.constexpr, KW: tl.constexpr,
        HAS_BIAS: tl.constexpr, ACT: tl.constexpr, USE_CLAMP: tl.constexpr,
        INPUT_PRECISION: tl.constexpr, INT64: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One ``[BLOCK_M pixels, BLOCK_N out channels]`` tile of ``y`` for one group.

    Implicit GEMM: rows ``m = (n, oh, ow)``, columns the ``OC_g`` output channels of group
    ``g``, reduction over ``k = (kh, kw, c)`` with ``c`` the ``C_g`` input channels of ``g``;
    the ``x`` tile for ``k`` is gathered straight from ``x`` (zero outside the padded image).
    Programs run channel blocks fastest, then groups, then pixel blocks, so neighbouring
    programs share the input pixels they read. With INT64 every index is widened before it
    is multiplied: no 32-bit product feeds an address.
    """
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    n_blocks_n = tl.cdiv(OC_g, BLOCK_N)
    pid_n = pid % n_blocks_n
    g = (pid // n_blocks_n) % groups
    pid_m = pid // n_blocks_n // groups

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < OC_g
    ow = offs_m % OW
    oh = (offs_m // OW) % OH
    img = offs_m // OW // OH
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    x_rows = x_ptr + img * sxn + (g * C_g) * sxc           # [BLOCK_M] pointers
    oc = g * OC_g + offs_n                                 # output channels of this tile
    w_cols = w_ptr + oc * swo                              # [BLOCK_N] pointers

    alpha, gain, clamp, weight_gain = load_act_params(params_ptr)  # accumulation dtype
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=gain.dtype)
    k_blocks = tl.cdiv(C_g, BLOCK_K)
    for step in range(KH * KW * k_blocks):
        if INT64:
            it = tl.cast(step, tl.int64)
        else:
            it = step
        tap = it // k_blocks
        c = (it - tap * k_blocks) * BLOCK_K + offs_k
        kh = tap // KW
        kw = tap - kh * KW
        ih = ih0 + kh
        iw = iw0 + kw
        row_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        c_ok = c < C_g
        a = tl.load((x_rows + ih * sxh + iw * sxw)[:, None] + (c * sxc)[None, :],
                    mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        b = tl.load(w_cols[None, :] + (c * swi + kh * swh + kw * sww)[:, None],
                    mask=c_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=gain.dtype)

    acc = acc * weight_gain
    if HAS_BIAS:
        acc += tl.load(b_ptr + oc * sb, mask=n_ok, other=0.0).to(gain.dtype)[None, :]
    out = activate(acc, alpha, gain, clamp, ACT, USE_CLAMP)
    y_offs = (img * syn + oh * syh + ow * syw)[:, None] + (oc * syc)[None, :]
    tl.store(y_ptr + y_offs, out.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

_launch_fwd = KernelLauncher(_conv2d_act_fwd_kernel, "conv2d_act_fwd")
# The same kernel without the autotuner, for a fixed config (``_fixed_config``).
_launch_fwd_fixed = KernelLauncher(getattr(_conv2d_act_fwd_kernel, "fn", _conv2d_act_fwd_kernel),
                                   "conv2d_act_fwd")


def _fixed_config(c_g: int, oc_g: int) -> dict:
    """The tile config the kernel launches with under ``torch.use_deterministic_algorithms
    (True)``, instead of autotuning (whose timing-based pick could differ between runs and
    so sum in another order): the first candidate that fits the channels per group."""
    if interpreter_enabled():
        config = _INTERPRETER_CONFIGS[0]
    else:
        config = _prune_configs(_GPU_CONFIGS, {"C_g": c_g, "OC_g": oc_g})[0]
    return dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


@dataclass(frozen=True)
class ConvGeometry:
    """Normalized ``stride``, ``padding`` (pairs of ints) and ``groups`` of a convolution."""
    stride: tuple[int, int]
    padding: tuple[int, int]
    groups: int

    def output_hw(self, h: int, w: int, kh: int, kw: int) -> tuple[int, int]:
        return ((h + 2 * self.padding[0] - kh) // self.stride[0] + 1,
                (w + 2 * self.padding[1] - kw) // self.stride[1] + 1)


def _input_precision(dtype: torch.dtype) -> str:
    """tf32 for float32 only where the user allows it for cuDNN convs (torch's own switch)."""
    if dtype == torch.float32:
        return "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"
    return "ieee" if dtype == torch.float64 else "tf32"   # ignored for 16-bit inputs


def _empty_output(x, weight, geom):
    oh, ow = geom.output_hw(x.shape[2], x.shape[3], weight.shape[2], weight.shape[3])
    return torch.empty((x.shape[0], weight.shape[0], oh, ow), dtype=x.dtype, device=x.device,
                       memory_format=memory_format(x))


def conv2d_act_triton_forward(x, weight, bias, geom: ConvGeometry, spec,
                              weight_gain: float = 1.0) -> torch.Tensor:
    """Launch the fused kernel: ``y [N, OC, OH, OW]`` in the memory format of ``x``.

    ``x``, ``weight`` and ``bias`` are read in place with any strides (a channels_last weight
    loads contiguously along input channels, an NCHW one gathers: weights are small and stay in
    L2).
    """
    y = _empty_output(x, weight, geom)
    if y.numel() == 0:
        return y
    n, _, h, w = x.shape
    oc, c_g, kh, kw = weight.shape
    m = n * y.shape[2] * y.shape[3]
    oc_g = oc // geom.groups
    params = act_params(spec, x.dtype, x.device, weight_gain)
    sb = bias.stride(0) if bias is not None else 0
    int64 = max(max_offset(x), max_offset(y), max_offset(weight), (oc - 1) * sb,
                m + 256) > INT32_MAX  # 256: the largest BLOCK_M

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * geom.groups
                * triton.cdiv(oc_g, meta["BLOCK_N"]),)

    meta = dict(KH=kh, KW=kw, HAS_BIAS=bias is not None, ACT=spec.act.code,
                USE_CLAMP=spec.clamp is not None, INPUT_PRECISION=_input_precision(x.dtype),
                INT64=int64)
    launch = _launch_fwd
    if not timing_allowed():
        launch = _launch_fwd_fixed
        meta.update(_fixed_config(c_g, oc_g))
        grid = grid(meta)
    launch(grid, (x, weight, bias if bias is not None else x, y, params),
           (m, h, w, y.shape[2], y.shape[3], c_g, oc_g, geom.groups,
            *x.stride(), *weight.stride(), *y.stride(), sb, *geom.stride, *geom.padding), meta)
    return y


def conv2d_act_cudnn_forward(x, weight, bias, geom: ConvGeometry, spec,
                             weight_gain: float = 1.0) -> torch.Tensor:
    """``F.conv2d`` without bias (cuDNN on CUDA), then the fused ``bias_act`` kernel, which
    applies the weight gain; the result has the memory format of ``x``."""
    fmt = memory_format(x)
    if fmt == torch.contiguous_format and weight.is_contiguous(memory_format=torch.channels_last):
        weight = weight.contiguous()  # a channels_last weight would make the output so too
    record_launch("conv2d_act_cudnn")
    z = F.conv2d(x, weight, None, geom.stride, geom.padding, 1, geom.groups)
    if _identity_epilogue(bias, spec, weight_gain):
        return z  # a linear layer without bias, gain, clamp or weight gain: nothing to fuse
    return bias_act_forward(z, bias, 1, spec, weight_gain)


def _identity_epilogue(bias, spec, weight_gain: float) -> bool:
    """Whether bias, activation, gain, clamp and weight gain leave the convolution as it is."""
    return (bias is None and spec.act.name == "linear" and spec.gain == 1
            and spec.clamp is None and weight_gain == 1)


_FORWARDS = {"triton": conv2d_act_triton_forward, "cudnn": conv2d_act_cudnn_forward}
_NO_GRADS = (False, False, False)


def _choice_key(x, weight, bias, geom: ConvGeometry, spec, weight_gain: float) -> tuple:
    """What decides the fastest implementation of a call, as a tuple (cheap to build and
    hash): shapes and strides of ``x`` and ``weight``, dtype, device, geometry, the epilogue's
    work (activation, gain, clamp, bias, weight gain), which of ``x``, ``weight``, ``bias``
    will get gradients, and cuDNN's tf32, benchmark and deterministic switches. The GPU model
    and library versions are fixed per device and process: ``_problem`` adds them to the name
    the cache file uses."""
    if torch.is_grad_enabled():
        weights = not weight_gradients_disabled()
        grads = (x.requires_grad, weights and weight.requires_grad,
                 weights and bias is not None and bias.requires_grad)
    else:
        grads = _NO_GRADS
    return (x.shape, x.stride(), weight.shape, weight.stride(), x.dtype,
            x.get_device(), geom.stride, geom.padding, geom.groups, spec.act.name,
            spec.gain != 1, spec.clamp is not None, bias is not None, weight_gain != 1, grads,
            torch._C._get_cudnn_allow_tf32(), torch._C._get_cudnn_benchmark(),
            torch._C._get_cudnn_deterministic())


def _problem(key: tuple, x, weight, bias, geom: ConvGeometry, spec, weight_gain) -> Problem:
    """The problem ``key`` (from ``_choice_key``) names, with its three candidates."""
    (x_shape, x_strides, w_shape, w_strides, dtype, device, stride, padding, groups, act, gain,
     clamp, has_bias, scaled, grads, tf32, benchmark, deterministic) = key
    epilogue = "+".join([act] + [name for name, on in (("gain", gain), ("clamp", clamp),
                                                       ("bias", has_bias),
                                                       ("weight_gain", scaled)) if on])
    wanted = ",".join(name for name, on in zip(("x", "w", "b"), grads) if on) or "none"
    name = (f"x {_dims(x_shape)} strides {_dims(x_strides)} w {_dims(w_shape)} strides "
            f"{_dims(w_strides)} stride {_dims(stride)} padding {_dims(padding)} groups {groups} "
            f"{str(dtype)[6:]} {epilogue} grads {wanted} cudnn tf32={int(tf32)} "
            f"benchmark={int(benchmark)} deterministic={int(deterministic)} | "
            f"{environment(device)}")
    return Problem(name, x.device, functools.partial(
        _candidates, x, weight, bias, geom, spec, weight_gain, grads))


def _dims(values) -> str:
    return "x".join(map(str, values))


def _candidates(x, weight, bias, geom: ConvGeometry, spec, weight_gain, grads) -> dict:
    """``{path: one call}`` for ``triton``, ``cudnn`` and ``plain``, each as a training step
    makes it: the forward on detached inputs, then ``torch.autograd.grad`` to those of ``x``,
    ``weight``, ``bias`` flagged in ``grads``, with a fixed random upstream gradient."""
    x, weight, bias = (None if t is None else t.detach().requires_grad_(wanted)
                       for t, wanted in zip((x, weight, bias), grads))
    inputs = [t for t, wanted in zip((x, weight, bias), grads) if wanted]
    dy = _empty_output(x, weight, geom).normal_(
        generator=torch.Generator(x.device).manual_seed(0)) if inputs else None

    def fused(path):
        return lambda: Conv2dAct.apply(x, route_through_node(weight), route_through_node(bias),
                                       geom, spec, weight_gain, path)

    def plain():
        return reference.conv2d_act(x, weight, bias, geom.stride, geom.padding, geom.groups,
                                    spec.act.name, spec.alpha, spec.gain, spec.clamp,
                                    weight_gain)

    def with_backward(forward):
        return lambda: torch.autograd.grad(forward(), inputs, dy, allow_unused=True)

    forwards = {"triton": fused("triton"), "cudnn": fused("cudnn"), "plain": plain}
    if not inputs:
        return forwards
    return {path: with_backward(forward) for path, forward in forwards.items()}


def _untimed_ext_path() -> str:
    """The forward where the extension runs ``bias_act`` and nothing is timed (CPU tensors,
    and any tensor while torch.compile traces): ``FASTGAN_CONV``'s ``'cudnn'`` or ``'plain'``
    when forced, else ``'cudnn'`` (``F.conv2d``, then the extension's ``bias_act``; faster
    than the reference on CPU, docs/design.md section 8)."""
    forced = forced_path()
    return forced if forced in ("cudnn", "plain") else "cudnn"


def _choose_path(x, weight, bias, geom: ConvGeometry, spec, weight_gain: float) -> str:
    """``'triton'``, ``'cudnn'`` or ``'plain'`` for this call: forced by ``FASTGAN_CONV``,
    else on CUDA ``FIXED_PATH`` under deterministic algorithms and otherwise the answer for
    its problem (decided when first met, see ``fastgan.ops.conv_choice``), else (the
    interpreter on CPU) ``'triton'``."""
    forced = forced_path()
    if forced != "auto":
        return forced
    if not x.is_cuda:
        return "triton"
    if not timing_allowed():
        return FIXED_PATH
    key = _choice_key(x, weight, bias, geom, spec, weight_gain)
    return cached_path(key) or decide(key, _problem(key, x, weight, bias, geom, spec,
                                                    weight_gain))


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------

def conv2d_input_grad(dz, weight, input_hw, geom: ConvGeometry) -> torch.Tensor:
    """``d conv2d / d x`` applied to ``dz``: a transposed convolution (differentiable)."""
    output_padding = tuple(
        (size + 2 * p - k) % s
        for size, p, k, s in zip(input_hw, geom.padding, weight.shape[2:], geom.stride))
    return F.conv_transpose2d(dz, weight, None, geom.stride, geom.padding, output_padding,
                              geom.groups)


def conv2d_weight_grad(x, dz, weight, geom: ConvGeometry) -> torch.Tensor:
    """``d conv2d / d weight`` applied to ``dz`` (``weight`` gives the shape; differentiable:
    ``aten.convolution_backward`` has a double-backward formula)."""
    if weight.device.type == "cpu" and not weight.is_contiguous():
        # CPU's slow_conv2d refuses a channels_last weight here ("grad_weight must be
        # contiguous"); only the shape of ``weight`` matters for the weight gradient.
        weight = weight.detach().contiguous()
    return torch.ops.aten.convolution_backward(
        dz, x, weight, None, geom.stride, geom.padding, (1, 1), False, (0, 0), geom.groups,
        (False, True, False))[1]


class Conv2dAct(torch.autograd.Function):
    """``y = clamp(act(conv2d(x, w) * weight_gain + b) * gain)`` by the forward ``path``
    (``'triton'`` or ``'cudnn'``) for linear, relu and lrelu; saves ``x``, ``w`` and, where
    the activation's gradient reads it, ``y``."""

    @staticmethod
    def forward(ctx, x, weight, bias, geom, spec, weight_gain, path):
        ctx.set_materialize_grads(False)
        y = _FORWARDS[path](x, weight, bias, geom, spec, weight_gain)
        ctx.save_for_backward(x, weight, y if saves_output(spec) else None)
        ctx.geom, ctx.spec, ctx.weight_gain = geom, spec, weight_gain
        ctx.has_bias = bias is not None
        ctx.identity = _identity_epilogue(bias, spec, weight_gain)
        return y

    @staticmethod
    def backward(ctx, dy):
        need_x = ctx.needs_input_grad[0]
        need_w = engine_will_use_grad(ctx, 1)
        need_b = ctx.has_bias and engine_will_use_grad(ctx, 2)
        if dy is None or not (need_x or need_w or need_b):
            return None, None, None, None, None, None, None
        x, weight, y = ctx.saved_tensors
        if ctx.identity:
            dz, db = dy, None  # the epilogue is the identity: its gradient too
        else:
            dz, db = BiasActGrad.apply(dy, grad_input_output(y, ctx.spec), 1, ctx.spec, need_b,
                                       ctx.weight_gain)
        dx = conv2d_input_grad(dz, weight, x.shape[2:], ctx.geom) if need_x else None
        dw = conv2d_weight_grad(x, dz, weight, ctx.geom) if need_w else None
        return dx, dw, db, None, None, None, None


# --------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------

def int_pair(value, name: str, minimum: int) -> tuple[int, int]:
    """``value`` (an int or a pair of ints, each ``>= minimum``) as a pair."""
    pair = (value, value) if isinstance(value, int) else value
    if (not isinstance(pair, (tuple, list)) or len(pair) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return tuple(pair)


def check_conv2d_args(x, weight, bias, stride, padding, groups) -> ConvGeometry:
    """Validate the tensors and geometry of ``conv2d_act``; clear errors name the argument."""
    check_float_tensor(x, "x")
    check_float_tensor(weight, "weight")
    if x.ndim != 4:
        raise ValueError(f"x must be 4-d [N, C, H, W], got shape {tuple(x.shape)}")
    if weight.ndim != 4:
        raise ValueError(f"weight must be 4-d [out_channels, in_channels / groups, kh, kw], "
                         f"got shape {tuple(weight.shape)}")
    check_same_device_dtype(weight, "weight", x, "x")
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups must be an int >= 1, got {groups!r}")
    out_channels, c_g, kh, kw = weight.shape
    if out_channels % groups:
        raise ValueError(f"weight.shape[0] (out channels, {out_channels}) must be divisible "
                         f"by groups ({groups})")
    if x.shape[1] != c_g * groups:
        raise ValueError(f"x has {x.shape[1]} channels but weight expects weight.shape[1] * "
                         f"groups = {c_g} * {groups} = {c_g * groups}")
    if bias is not None:
        check_float_tensor(bias, "bias")
        if bias.ndim != 1 or bias.shape[0] != out_channels:
            raise ValueError(f"bias must be a 1-d tensor of length weight.shape[0] = "
                             f"{out_channels}, got shape {tuple(bias.shape)}")
        check_same_device_dtype(bias, "bias", x, "x")
    if isinstance(padding, str):
        raise TypeError(f"padding must be an int or a pair of ints; the string {padding!r} is "
                        "not supported (fastgan.convert translates nn.Conv2d's 'same'/'valid')")
    geom = ConvGeometry(int_pair(stride, "stride", 1), int_pair(padding, "padding", 0), groups)
    for size, pad, k, axis in ((x.shape[2], geom.padding[0], kh, "height"),
                               (x.shape[3], geom.padding[1], kw, "width")):
        if size + 2 * pad < k:
            raise ValueError(f"x {axis} {size} plus padding 2 * {pad} is smaller than the "
                             f"kernel {axis} {k} (weight shape {tuple(weight.shape)})")
    return geom


_AUTOCAST_DEVICE_TYPES = ("cuda", "cpu", "xpu", "mps")  # not meta: autocast has no meta


def _autocast(x, weight, bias):
    """Under ``torch.autocast``, autocast's own rule for ``F.conv2d``: each floating tensor on
    the autocast device type, except float64 ones, is cast to the autocast dtype (the casts
    are differentiable, so float32 parameters get float32 gradients)."""
    device_type = x.device.type if isinstance(x, torch.Tensor) else None
    if device_type not in _AUTOCAST_DEVICE_TYPES or not torch.is_autocast_enabled(device_type):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        eligible = (isinstance(t, torch.Tensor) and t.is_floating_point()
                    and t.dtype != torch.float64 and t.device.type == device_type)
        return t.to(dtype) if eligible else t

    return cast(x), cast(weight), cast(bias)


def conv2d_act(x, weight, bias=None, stride=1, padding=0, groups=1, act="linear", alpha=None,
               gain=None, clamp=None, weight_gain=1.0):
    """Fused ``clamp(act(conv2d(x, weight * weight_gain) + bias) * gain, -clamp, clamp)``.

    Args:
        x: ``[N, C, H, W]`` float tensor, any strides (contiguous, channels_last, a view).
        weight: ``[OC, C / groups, KH, KW]``, same dtype and device as ``x``, any strides.
        bias: optional ``[OC]``, any stride.
        stride, padding: int or pair of ints (stride >= 1, padding >= 0; zero padding).
        groups: number of channel groups.
        act, alpha, gain, clamp: as in ``fastgan.bias_act`` (StyleGAN2-ADA defaults).
        weight_gain: a scalar the weight is multiplied by (an equalized learning rate's
            ``lr_mul / sqrt(fan_in)``), applied to the convolution's result: the weight is
            neither scaled nor copied.

    Returns ``[N, OC, OH, OW]`` in the memory format of ``x``. Differentiable to any order.
    Under ``torch.autocast`` the inputs are cast as autocast casts them for ``F.conv2d``.
    With linear, relu or lrelu the convolution and its epilogue are one fused op (saving
    ``x``, ``weight`` and, for relu, lrelu or a clamp, the output); with a curved activation
    (tanh, sigmoid, elu, selu, softplus, swish) it is ``F.conv2d`` followed by
    ``fastgan.bias_act`` with ``scale=weight_gain``, which saves the convolution's result
    and the bias for the activation's second derivative.
    """
    spec = reference.resolve_activation(act, alpha, gain, clamp)
    weight_gain = check_scale(weight_gain, "weight_gain")
    x, weight, bias = _autocast(x, weight, bias)
    geom = check_conv2d_args(x, weight, bias, stride, padding, groups)
    if spec.act.curved:
        return bias_act(F.conv2d(x, weight, None, geom.stride, geom.padding, 1, groups), bias, 1,
                        act, alpha, gain, clamp, scale=weight_gain)
    chosen = implementation(x)
    if chosen == "torch":
        path = "plain"
    elif chosen == "ext" and (not x.is_cuda or torch.compiler.is_compiling()):
        path = _untimed_ext_path()
    else:
        path = _choose_path(x, weight, bias, geom, spec, weight_gain)
    if path == "plain":
        return reference.conv2d_act(x, weight, bias, geom.stride, geom.padding, groups, act,
                                    alpha, gain, clamp, weight_gain)
    return Conv2dAct.apply(x, route_through_node(weight), route_through_node(bias), geom, spec,
                           weight_gain, path)
