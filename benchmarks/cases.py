"""The benchmark cases (docs/design.md section 6).

A ``Case`` is one group of result rows, ``(bench, mode, shape, dtype)``.
``case.build(ctx, provider)`` returns a zero-argument callable that runs one timed unit of
work for that provider:

* ``eager``   plain PyTorch, the math of ``fastgan.reference``;
* ``compile`` ``torch.compile`` of the eager function (what it cannot run is recorded as
  ``unsupported`` by the runner);
* ``fastgan`` the fused ops and layers.

Op cases (``bias_act``, ``grad_sq_norm``, ``conv2d_act``) run in three modes, always on inputs
that require grad as in training: ``fwd`` (the forward, saving what its backward needs),
``bwd`` (``autograd.grad`` through a retained graph), ``fwd+bwd``. Inputs are random (never
zeros) and rotate among several sets so that one pass over them exceeds L2.

Each case states the bytes it must move (every input read once, every output written once)
and, for convolutions, its FLOPs; the formulas sit with the case factories below and are
repeated in benchmarks/NOTES.md.
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Callable

import torch

import fastgan
from fastgan import reference

BENCHES = ("bias_act", "grad_sq_norm", "conv2d_act", "r1_step", "train_iter")  # run order
PROVIDERS = ("eager", "compile", "fastgan")
OP_MODES = ("fwd", "bwd", "fwd+bwd")
QUICK_MODES = ("fwd", "fwd+bwd")  # --quick: the modes the targets are stated for
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
SIZES = ("full", "quick", "smoke")
MODEL_BENCHES = ("r1_step", "train_iter")  # build whole models; compiled ones are reset after
R1_GAMMA = 10.0
LAZY_R1_INTERVAL = 16


class Unsupported(Exception):
    """A provider cannot run a case; the message says why (recorded as 'unsupported')."""


@dataclass(frozen=True)
class BuildContext:
    """What a case needs to know to build its callables."""
    device: torch.device
    rotate_bytes: int  # input sets rotate until one pass over them reaches this many bytes
    max_sets: int
    compile_backend: str  # 'inductor' on a GPU; a cheaper one for the CPU smoke run
    compile_models: bool = True  # False: whole-model cases skip torch.compile (CPU smoke run)


@dataclass(frozen=True)
class Case:
    """One group of result rows and how to build its timed callable per provider.

    ``bytes_moved`` (the bytes the work must move at least) gives the row's GB/s; ``flops``
    its TFLOP/s in the markdown table; either is ``None`` where it means nothing.
    ``calls_per_unit`` > 1 means one timed call runs that many units (training iterations)
    and is timed call by call (``time_calls``) rather than by do_bench; the rows give the
    time per unit.
    """
    bench: str
    mode: str
    shape: str
    dtype: torch.dtype
    build: Callable[[BuildContext, str], Callable[[], object]]
    bytes_moved: int | None
    flops: float | None
    calls_per_unit: int = 1
    notes: tuple[tuple[str, str], ...] = ()  # (provider or "all", text) for the rows' notes

    def note_for(self, provider: str) -> str:
        return "; ".join(text for who, text in self.notes if who in ("all", provider))

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def key(self) -> tuple[str, str, str, str]:
        return self.bench, self.mode, self.shape, self.dtype_name


# ---------------------------------------------------------------------------------------
# Shared building blocks


_COMPILED: dict = {}


def compiled(fn, backend: str, cache: bool = True):
    """``torch.compile(fn)`` with static shapes; with ``cache``, one wrapper per function and
    backend (modules are compiled afresh: a cached one would keep its weights alive).

    Every shape and dtype is its own graph: the recompile limits are raised so that dynamo
    never silently falls back to eager after its default 8 recompiles.
    """
    import torch._dynamo

    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 1024))
    if hasattr(cfg, "accumulated_recompile_limit"):
        cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 8192)
    if not cache:
        return torch.compile(fn, backend=backend, dynamic=False)
    key = (fn, backend)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, backend=backend, dynamic=False)
    return _COMPILED[key]


def reset_compiled() -> None:
    """Forget every compiled graph (frees what compiled models held on to)."""
    import torch._dynamo

    _COMPILED.clear()
    torch._dynamo.reset()


def _pick(provider: str, eager, fused, ctx: BuildContext):
    """The function a provider runs: eager, compiled eager, or fastgan's."""
    if provider == "eager":
        return eager
    if provider == "compile":
        return compiled(eager, ctx.compile_backend)
    if provider == "fastgan":
        return fused
    raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")


def _rotate(calls: list) -> Callable[[], object]:
    """One callable that runs the next of ``calls`` each time (input rotation)."""
    if len(calls) == 1:
        return calls[0]
    cycle = itertools.cycle(calls)
    return lambda: next(cycle)()


def _n_sets(one_set_bytes: int, ctx: BuildContext) -> int:
    """How many input sets make one pass over them reach ``ctx.rotate_bytes`` (>= 1)."""
    return max(1, min(ctx.max_sets, math.ceil(ctx.rotate_bytes / max(one_set_bytes, 1))))


def _randn(shape, dtype, device, scale=1.0, channels_last=False, requires_grad=True):
    """A random leaf tensor (never zeros), optionally channels_last."""
    t = torch.randn(shape, device=device, dtype=torch.float32) * scale
    layout = torch.channels_last if channels_last else torch.preserve_format
    t = t.to(dtype=dtype, memory_format=layout)
    return t.requires_grad_(requires_grad)


def _op_call(fn, args: tuple, mode: str) -> Callable[[], object]:
    """The timed callable of one input set in ``mode`` (fwd, bwd or fwd+bwd)."""
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    if mode == "fwd":
        return lambda: fn(*args)
    y = fn(*args)
    dy = torch.randn_like(y)
    if mode == "bwd":
        return lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True)
    if mode == "fwd+bwd":
        del y
        return lambda: torch.autograd.grad(fn(*args), leaves, dy)
    raise ValueError(f"mode must be one of {OP_MODES}, got {mode!r}")


def _build_op(eager, fused, make_inputs, mode: str, ctx: BuildContext, provider: str):
    """Builder shared by the op cases: rotated input sets, each wrapped for ``mode``."""
    fn = _pick(provider, eager, fused, ctx)
    sets = [make_inputs(ctx.device)]
    n = _n_sets(sum(a.nbytes for a in sets[0] if isinstance(a, torch.Tensor)), ctx)
    sets += [make_inputs(ctx.device) for _ in range(n - 1)]
    return _rotate([_op_call(fn, args, mode) for args in sets])


def _modes(size: str) -> tuple[str, ...]:
    return QUICK_MODES if size == "quick" else OP_MODES


def _dims(shape) -> str:
    return "x".join(str(s) for s in shape)


# ---------------------------------------------------------------------------------------
# bias_act: bias + leaky ReLU + gain (StyleGAN2 defaults: alpha 0.2, gain sqrt(2))


def _bias_act_eager(x, b):
    return reference.bias_act(x, b, 1, "lrelu")


def _bias_act_fused(x, b):
    return fastgan.bias_act(x, b, 1, "lrelu")


def _bias_act_inputs(shape, dtype, device):
    return _randn(shape, dtype, device), _randn(shape[1], dtype, device, scale=0.1)


def bias_act_bytes(shape, dtype, mode) -> int:
    """Bytes bias_act must move, with E = elements of x, C = channels, s = element size:
    fwd reads x, b and writes y: (2E + C) s; bwd reads dy and the saved y, writes dx and db:
    (3E + C) s; fwd+bwd is their sum: (5E + 2C) s."""
    e, c, s = math.prod(shape), shape[1], dtype.itemsize
    return {"fwd": 2 * e + c, "bwd": 3 * e + c, "fwd+bwd": 5 * e + 2 * c}[mode] * s


BIAS_ACT_SHAPES = {
    "full": [(32, 128, 256, 256), (32, 512, 16, 16), (64, 256, 64, 64)],
    "smoke": [(2, 8, 16, 16), (2, 16, 4, 4), (3, 8, 8, 8)],
}


def bias_act_cases(size: str) -> list[Case]:
    cases = []
    for shape in BIAS_ACT_SHAPES["smoke" if size == "smoke" else "full"]:
        for dtype in DTYPES.values():
            make = functools.partial(_bias_act_inputs, shape, dtype)
            for mode in _modes(size):
                build = functools.partial(_build_op, _bias_act_eager, _bias_act_fused, make, mode)
                cases.append(Case("bias_act", mode, _dims(shape), dtype, build,
                                  bias_act_bytes(shape, dtype, mode), None))
    return cases


# ---------------------------------------------------------------------------------------
# grad_sq_norm: per-sample sum of squares (the R1/R2 reduction), fp32 accumulation


def _grad_sq_norm_inputs(shape, dtype, device):
    return (_randn(shape, dtype, device),)


def grad_sq_norm_bytes(shape, dtype, mode) -> int:
    """Bytes grad_sq_norm must move, with E = elements of g, N = batch, s = element size, fp32
    norms: fwd reads g, writes N norms: E s + 4N; bwd reads g and dout, writes dg:
    2E s + 4N; fwd+bwd: 3E s + 8N."""
    e, n, s = math.prod(shape), shape[0], dtype.itemsize
    return {"fwd": e * s + 4 * n, "bwd": 2 * e * s + 4 * n, "fwd+bwd": 3 * e * s + 8 * n}[mode]


GRAD_SQ_NORM_SHAPES = {
    "full": [(64, 3, 256, 256), (32, 512, 32, 32)],
    "smoke": [(2, 3, 16, 16), (2, 16, 8, 8)],
}


def grad_sq_norm_cases(size: str) -> list[Case]:
    cases = []
    for shape in GRAD_SQ_NORM_SHAPES["smoke" if size == "smoke" else "full"]:
        for dtype in DTYPES.values():
            make = functools.partial(_grad_sq_norm_inputs, shape, dtype)
            for mode in _modes(size):
                build = functools.partial(_build_op, reference.grad_sq_norm, fastgan.grad_sq_norm,
                                          make, mode)
                cases.append(Case("grad_sq_norm", mode, _dims(shape), dtype, build,
                                  grad_sq_norm_bytes(shape, dtype, mode), None))
    return cases


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


def _conv_params(layers, dtype, device, channels_last):
    """Weights ~ N(0, 1/fan_in) (activations keep their scale through the stack), biases
    ~ N(0, 0.1^2)."""
    params = []
    for layer in layers:
        fan_in = layer.cin // layer.groups * layer.k * layer.k
        params.append(_randn((layer.cout, layer.cin // layer.groups, layer.k, layer.k), dtype,
                             device, scale=fan_in ** -0.5, channels_last=channels_last))
        if layer.bias:
            params.append(_randn((layer.cout,), dtype, device, scale=0.1))
    return params


def _conv_inputs(n, h, w, layers, dtype, channels_last, device):
    x = _randn((n, layers[0].cin, h, w), dtype, device, channels_last=channels_last)
    return (x, *_conv_params(layers, dtype, device, channels_last))


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


def _stack_label(n, h, w, layers, name=None) -> str:
    head = f"{n}x{layers[0].cin}x{h}x{w}"
    return f"{head} {name}" if name else head + " " + layers[0].label()


# (batch, height, width, layers, name); batch 32 shapes of a StyleGAN2-256 discriminator
R3GAN_BLOCK_256 = (Conv(256, 256, k=1), Conv(256, 256, k=3, groups=16),
                   Conv(256, 256, k=1, act="linear"))
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
# Layouts: bf16 runs channels_last (as mixed-precision GAN training does), fp32 NCHW.
CHANNELS_LAST = {torch.bfloat16: True, torch.float32: False}


def conv2d_act_cases(size: str) -> list[Case]:
    cases = []
    for n, h, w, layers, name in CONV_SHAPES["smoke" if size == "smoke" else "full"]:
        eager = functools.partial(conv_stack, reference.conv2d_act, layers)
        fused = functools.partial(conv_stack, fastgan.conv2d_act, layers)
        for dtype in DTYPES.values():
            cl = CHANNELS_LAST[dtype]
            label = _stack_label(n, h, w, layers, name) + (" NHWC" if cl else "")
            make = functools.partial(_conv_inputs, n, h, w, layers, dtype, cl)
            for mode in _modes(size):
                nbytes, flops = conv_costs(n, h, w, layers, dtype, mode)
                build = functools.partial(_build_op, eager, fused, make, mode)
                cases.append(Case("conv2d_act", mode, label, dtype, build, nbytes, flops))
    return cases


# ---------------------------------------------------------------------------------------
# r1_step: forward on reals, input gradient with create_graph, grad_sq_norm, backward


def eager_r1_penalty(D, reals, gamma):
    """R1 in plain torch: ``gamma / 2 * mean_n ||grad_x sum(D(x))[n]||^2``, the value of
    ``fastgan.regularizers.r1_penalty(D, reals, gamma).loss``."""
    x = reals.detach().requires_grad_(True)
    g, = torch.autograd.grad(D(x).sum(), x, create_graph=True)
    return reference.grad_sq_norm(g).mean() * (gamma / 2)


def _r1_callable(D, params, reals, provider: str, amp: bool):
    """One R1 step as a training loop runs it: the penalty (under bf16 autocast if ``amp``,
    as ``TrainSteps`` does), then ``penalty.backward()`` into freshly cleared ``.grad``s.
    fastgan's penalty is ``fastgan.regularizers.r1_penalty``; eager's and compile's
    ``eager_r1_penalty``.

    The first call checks that every weight got a gradient: a double backward that silently
    leaves the weights out (seen with ``torch.compile`` of a whole module under
    ``autograd.grad(penalty, weights)``) must not pass for a fast one.
    """
    from fastgan.regularizers import r1_penalty

    weights = [p for p in params if p.ndim >= 2]
    checked = []

    def step():
        for p in params:
            p.grad = None
        with torch.autocast(reals.device.type, torch.bfloat16, enabled=amp):
            if provider == "fastgan":
                penalty = r1_penalty(D, reals, R1_GAMMA).loss
            else:
                penalty = eager_r1_penalty(D, reals, R1_GAMMA)
        penalty.backward()
        if not checked:
            missing = sum(w.grad is None for w in weights)
            if missing:
                raise RuntimeError(f"the R1 double backward left {missing} of {len(weights)} "
                                   "weight tensors without a gradient")
            checked.append(True)
    return step


# A plain conv stack in StyleGAN2-256 widths: fromrgb, then conv / stride-2 conv pairs.
R1_STACK = {
    "full": (32, 256, (Conv(3, 128, k=1), Conv(128, 128), Conv(128, 256, stride=2),
                       Conv(256, 256), Conv(256, 512, stride=2), Conv(512, 512),
                       Conv(512, 512, stride=2), Conv(512, 1, k=1, act="linear"))),
    "smoke": (2, 16, (Conv(3, 4, k=1), Conv(4, 4), Conv(4, 8, stride=2), Conv(8, 8),
                      Conv(8, 1, k=1, act="linear"))),
}


def _build_r1_stack(n, res, layers, dtype, ctx: BuildContext, provider: str):
    """The conv stack in ``dtype`` (bf16 weights and inputs, channels_last; no autocast)."""
    cl = CHANNELS_LAST[dtype]
    params = _conv_params(layers, dtype, ctx.device, cl)
    eager = functools.partial(conv_stack, reference.conv2d_act, layers)
    fused = functools.partial(conv_stack, fastgan.conv2d_act, layers)
    fn = _pick(provider, eager, fused, ctx)
    reals = _randn((n, 3, res, res), dtype, ctx.device, channels_last=cl, requires_grad=False)
    return _r1_callable(lambda x: fn(x, *params), params, reals, provider, amp=False)


def r1_step_flops(n, res, layers) -> float:
    """At least 4F with F the forward FLOPs: the forward, the input gradient (no weight
    gradient), then the gradient of that input-gradient chain (one conv and one
    weight-gradient conv per layer)."""
    return 4 * conv_costs(n, res, res, layers, torch.float32, "fwd")[1]


# The models of fastgan.models (StyleGAN2 widths by default): (res, batch, model kwargs).
MODEL_SIZES = {
    "full": (256, 32, {}),
    "smoke": (8, 4, {"channel_base": 64, "channel_max": 8}),
}
AMP = {torch.bfloat16: True, torch.float32: False}  # bf16 = TrainSteps' autocast, fp32 params


def _check_amp(dtype, ctx: BuildContext) -> bool:
    if AMP[dtype] and ctx.device.type != "cuda":
        raise Unsupported("bf16 here means TrainSteps' bf16 autocast, which needs CUDA")
    return AMP[dtype]


def _check_model_compile(provider: str, ctx: BuildContext) -> None:
    if provider == "compile" and not ctx.compile_models:
        raise Unsupported("CPU smoke run: torch.compile of whole models is skipped (its CPU "
                          "compile time would dominate the run); GPU runs compile them")


def _model_backend(provider: str) -> str:
    """fastgan runs the fused layers; eager and compile the same models in plain torch."""
    return "fastgan" if provider == "fastgan" else "torch"


def _build_r1_resnet(res, n, kwargs, dtype, ctx: BuildContext, provider: str):
    """R1 on ``fastgan.models``' resnet D; reals are given in the compute dtype (bf16 reals
    under autocast, as a bf16 data pipeline would give them)."""
    from fastgan.models import build_discriminator

    _check_model_compile(provider, ctx)
    amp = AMP[dtype]  # on the CPU (smoke run) this is CPU autocast
    D = build_discriminator("resnet", res, backend=_model_backend(provider), **kwargs)
    D = D.to(ctx.device)
    params = list(D.parameters())
    if provider == "compile":
        D = compiled(D, ctx.compile_backend, cache=False)
    reals = _randn((n, 3, res, res), dtype, ctx.device, requires_grad=False)
    return _r1_callable(D, params, reals, provider, amp)


def r1_step_cases(size: str) -> list[Case]:
    key = "smoke" if size == "smoke" else "full"
    n, res, layers = R1_STACK[key]
    widths = ">".join(str(layer.cout) for layer in layers[:-1])
    model_res, model_n, kwargs = MODEL_SIZES[key]
    cases = []
    for dtype in DTYPES.values():
        label = f"conv-stack {n}x3x{res}x{res} {widths}" + (" NHWC" if CHANNELS_LAST[dtype] else "")
        build = functools.partial(_build_r1_stack, n, res, layers, dtype)
        cases.append(Case("r1_step", "step", label, dtype, build, None,
                          r1_step_flops(n, res, layers)))
    for dtype in DTYPES.values():
        label = f"resnet-D {model_n}x3x{model_res}x{model_res}" + (" amp" if AMP[dtype] else "")
        build = functools.partial(_build_r1_resnet, model_res, model_n, kwargs, dtype)
        cases.append(Case("r1_step", "step", label, dtype, build, None, None))
    return cases


# ---------------------------------------------------------------------------------------
# train_iter: G step + D step per iteration, lazy R1 every LAZY_R1_INTERVAL iterations


def _build_train_iter(res, n, kwargs, dtype, ctx: BuildContext, provider: str):
    """``fastgan.train.steps.TrainSteps`` on the generator and resnet D of ``fastgan.models``;
    one call runs LAZY_R1_INTERVAL iterations (G step, D step) and one R1 step. For compile,
    G and D are compiled for the G and D steps and the R1 step runs the uncompiled D (same
    parameters and optimizer): torch.compile cannot run R1's double backward."""
    from fastgan.models import build_discriminator, build_generator
    from fastgan.regularizers import LazyR1
    from fastgan.train.steps import TrainSteps

    amp = _check_amp(dtype, ctx)
    _check_model_compile(provider, ctx)
    backend = _model_backend(provider)
    G = build_generator(res, backend=backend, **kwargs).to(ctx.device)
    D = build_discriminator("resnet", res, backend=backend, **kwargs).to(ctx.device)
    lazy_r1 = LazyR1(R1_GAMMA, LAZY_R1_INTERVAL)
    opt_G = torch.optim.Adam(G.parameters(), lr=0.0025, betas=(0.0, 0.99))
    lr_D, betas_D = lazy_r1.adam_params(0.0025, (0.0, 0.99))
    opt_D = torch.optim.Adam(D.parameters(), lr=lr_D, betas=betas_D)
    r1_steps = TrainSteps(G, D, opt_G, opt_D, lazy_r1, amp=amp)
    steps = r1_steps
    if provider == "compile":
        steps = TrainSteps(compiled(G, ctx.compile_backend, cache=False),
                           compiled(D, ctx.compile_backend, cache=False), opt_G, opt_D,
                           lazy_r1, amp=amp)
    sets = [_randn((n, 3, res, res), dtype, ctx.device, requires_grad=False)
            for _ in range(2)]

    def block():
        for i in range(LAZY_R1_INTERVAL):
            reals = sets[i % len(sets)]
            steps.g_step(n)
            steps.d_step(reals)
            if lazy_r1.due(i):
                r1_steps.r1_step(reals)
    return block


TRAIN_ITER_NOTES = (
    ("all", f"time per iteration of a {LAZY_R1_INTERVAL}-iteration block (G step + D step each, "
            "one R1 step), timed block by block"),
    ("eager", "TrainSteps' R1 reduces with fastgan.grad_sq_norm for every backend"),
    ("compile", "G and D compiled for the G and D steps; R1 runs the uncompiled D (no double "
                "backward in torch.compile); TrainSteps' R1 reduces with fastgan.grad_sq_norm"),
)


def train_iter_cases(size: str) -> list[Case]:
    res, n, kwargs = MODEL_SIZES["smoke" if size == "smoke" else "full"]
    dtypes = [torch.bfloat16] if size == "quick" else list(DTYPES.values())
    cases = []
    for dtype in dtypes:
        label = f"G+resnet-D {n}x3x{res}x{res} r1/{LAZY_R1_INTERVAL}"
        label += " amp" if AMP[dtype] else ""
        build = functools.partial(_build_train_iter, res, n, kwargs, dtype)
        cases.append(Case("train_iter", "iter", label, dtype, build, None, None,
                          calls_per_unit=LAZY_R1_INTERVAL, notes=TRAIN_ITER_NOTES))
    return cases


# ---------------------------------------------------------------------------------------


CASE_FACTORIES = {
    "bias_act": bias_act_cases,
    "grad_sq_norm": grad_sq_norm_cases,
    "conv2d_act": conv2d_act_cases,
    "r1_step": r1_step_cases,
    "train_iter": train_iter_cases,
}


def all_cases(size: str = "full", benches=BENCHES) -> list[Case]:
    """Every case of ``benches`` at ``size`` (``full``, ``quick`` or ``smoke``), in run order:
    bench by bench in ``BENCHES`` order, bf16 before fp32 (a run cut short by its time budget
    has the bf16 numbers first)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    selected = [c for bench in BENCHES if bench in benches for c in CASE_FACTORIES[bench](size)]
    dtype_order = list(DTYPES.values())
    return sorted(selected, key=lambda c: (BENCHES.index(c.bench), dtype_order.index(c.dtype)))


def flops_by_key() -> dict[tuple[str, str, str, str], float]:
    """FLOPs of every case at every size, by ``(bench, mode, shape, dtype)`` (for the table)."""
    return {c.key: c.flops for size in SIZES for c in all_cases(size) if c.flops}
