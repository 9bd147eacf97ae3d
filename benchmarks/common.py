"""What every family of benchmark cases shares (docs/design.md section 6): the ``Case`` record,
the build context, the providers, input making and rotation, and the op-mode wrappers.

A ``Case`` is one group of result rows, ``(bench, mode, shape, dtype)``.
``case.build(ctx, provider)`` returns a zero-argument callable that runs one timed unit of
work for that provider:

* ``eager``   plain PyTorch, the math of ``fastgan.reference``;
* ``compile`` ``torch.compile`` of the eager function (what it cannot run is recorded as
  ``unsupported`` by the runner);
* ``fastgan`` the fused ops and layers; the op cases force the backend to ``ctx.fastgan_backend``
  (``'triton'`` on CUDA, so ``fastgan`` rows are the Triton kernels whatever
  ``FASTGAN_BACKEND`` says); whole steps run the backend rule;
* ``ext``     the same public fastgan ops with the backend forced to the compiled extension
  (``fastgan.set_backend('ext')``, for the call and its backward); op cases only, and
  ``unsupported`` with ``fastgan.ext``'s one-line reason where the extension cannot run the
  device's tensors.

Sizes: ``full`` (GPU shapes), ``quick`` (the same shapes, fewer modes), ``cpu`` (the op cases
at CPU-sized shapes, ``python -m benchmarks --device cpu``), ``smoke`` (tiny shapes).
"""
from __future__ import annotations

import contextlib
import itertools
import math
import os
from dataclasses import dataclass
from typing import Callable

import torch

from fastgan import ext
from fastgan.backend import get_backend, set_backend

PROVIDERS = ("eager", "compile", "fastgan", "ext")
OP_MODES = ("fwd", "bwd", "fwd+bwd")
QUICK_MODES = ("fwd", "fwd+bwd")  # --quick: the modes the targets are stated for
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
SIZES = ("full", "quick", "cpu", "smoke")
SHAPE_SETS = {"full": "full", "quick": "full", "cpu": "cpu", "smoke": "smoke"}  # size -> shapes
EXT_OPS_ONLY = ("the ext provider times the op benches (bias_act, grad_sq_norm, conv2d_act, "
                "upfirdn2d) with the backend forced to 'ext'; whole steps run fastgan's backend "
                "rule (the fastgan rows)")
# Layouts: bf16 activations run channels_last (as mixed-precision GAN training does), fp32
# NCHW. Weights are always NCHW: the models keep contiguous float32 parameters and cast them
# to the activations' dtype per step (docs/design.md section 6).
CHANNELS_LAST = {torch.bfloat16: True, torch.float32: False}


class Unsupported(Exception):
    """A provider cannot run a case; the message says why (recorded as 'unsupported')."""


# torch.compile failures that are known limitations, not harness or library bugs.
KNOWN_COMPILE_LIMITS = ("does not currently support double backward",)


def classify_failure(provider: str, exc: BaseException) -> tuple[str, str]:
    """``('unsupported', why)`` for ``Unsupported`` and known torch.compile limitations,
    else ``('error', the exception's text)``."""
    if isinstance(exc, Unsupported):
        return "unsupported", str(exc)
    text = f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:600]
    if provider == "compile" and any(k in text for k in KNOWN_COMPILE_LIMITS):
        return "unsupported", "torch.compile cannot run this: " + text
    return "error", text


@dataclass(frozen=True)
class BuildContext:
    """What a case needs to know to build its callables."""
    device: torch.device
    rotate_bytes: int  # input sets rotate until one pass over them reaches this many bytes
    max_sets: int
    compile_backend: str  # 'inductor' on a GPU; a cheaper one for the CPU smoke run
    compile_models: bool = True  # False: whole-model cases skip torch.compile (CPU smoke run)
    triton_unsupported: str = ""  # why the fastgan provider cannot run here ('' where it can)
    fastgan_backend: str | None = None  # what the fastgan op calls force (None: the rule)


@dataclass(frozen=True)
class Case:
    """One group of result rows and how to build its timed callable per provider.

    ``bytes_moved`` (the bytes the work must move at least) gives the row's GB/s; ``flops``
    its TFLOP/s in the markdown table; either is ``None`` where it means nothing.
    ``calls_per_unit`` > 1 means one timed call runs that many units (training iterations)
    and is timed call by call (``time_calls``) rather than by do_bench; the rows give the
    time per unit. ``host_calls`` > 0 means the rows give host time, not device time: blocks
    of that many calls timed without synchronizing (``timing.host_ms``).
    ``off_cuda_note``: the note of every row when there is no GPU, in place of the
    provider's (for a case that then runs its own way, like the host-overhead case).
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
    host_calls: int = 0
    off_cuda_note: str = ""

    def note_for(self, provider: str) -> str:
        return "; ".join(text for who, text in self.notes if who in ("all", provider))

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def key(self) -> tuple[str, str, str, str]:
        return self.bench, self.mode, self.shape, self.dtype_name


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


def pick(provider: str, eager, fused, ctx: BuildContext):
    """The function a provider runs: eager, compiled eager, or fastgan's. ``ext`` is refused
    here (``Unsupported``): it runs through ``build_op``, which forces the backend."""
    if provider == "eager":
        return eager
    if provider == "compile":
        return compiled(eager, ctx.compile_backend)
    if provider == "fastgan":
        if ctx.triton_unsupported:
            raise Unsupported(ctx.triton_unsupported)
        return fused
    if provider == "ext":
        raise Unsupported(EXT_OPS_ONLY)
    raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")


def check_ext(device: torch.device) -> None:
    """Raise ``Unsupported`` with ``fastgan.ext``'s one-line reason when the compiled
    extension cannot run ``device``'s tensors."""
    reason = ext.reason(device.type)
    if reason is not None:
        raise Unsupported(f"the compiled extension cannot run {device.type} tensors: {reason}")


@contextlib.contextmanager
def conv_path_forced(conv_path: str | None):
    """Within this context ``FASTGAN_CONV=conv_path`` (nothing changes for ``None``); the
    previous value is restored after."""
    conv = os.environ.get("FASTGAN_CONV")
    if conv_path is not None:
        os.environ["FASTGAN_CONV"] = conv_path
    try:
        yield
    finally:
        if conv_path is not None:
            if conv is None:
                del os.environ["FASTGAN_CONV"]
            else:
                os.environ["FASTGAN_CONV"] = conv


def on_backend(name: str, call: Callable[[], object],
               conv_path: str | None = None) -> Callable[[], object]:
    """``call`` run with fastgan's backend forced to ``name`` (``set_backend``), and with
    ``FASTGAN_CONV=conv_path`` when given; the previous settings are restored after each call,
    so other providers' rows are untouched."""
    def run():
        backend, source = get_backend()
        set_backend(name)
        try:
            with conv_path_forced(conv_path):
                return call()
        finally:
            set_backend(backend if source == "set_backend()" else None)
    return run


def forced(name: str, build: Callable[[], Callable[[], object]],
           conv_path: str | None = None) -> Callable[[], object]:
    """The timed callable ``build()`` returns, built and then run on every call with the
    backend forced to ``name`` (``on_backend``; a ``bwd`` graph's forward runs while
    building)."""
    return on_backend(name, on_backend(name, build, conv_path)(), conv_path)


def rotate(calls: list) -> Callable[[], object]:
    """One callable that runs the next of ``calls`` each time (input rotation)."""
    if len(calls) == 1:
        return calls[0]
    cycle = itertools.cycle(calls)
    return lambda: next(cycle)()


def n_sets(one_set_bytes: int, ctx: BuildContext) -> int:
    """How many input sets make one pass over them reach ``ctx.rotate_bytes`` (>= 1)."""
    return max(1, min(ctx.max_sets, math.ceil(ctx.rotate_bytes / max(one_set_bytes, 1))))


def randn(shape, dtype, device, scale=1.0, channels_last=False, requires_grad=True):
    """A random leaf tensor (never zeros), optionally channels_last."""
    t = torch.randn(shape, device=device, dtype=torch.float32) * scale
    layout = torch.channels_last if channels_last else torch.preserve_format
    t = t.to(dtype=dtype, memory_format=layout)
    return t.requires_grad_(requires_grad)


def op_call(fn, args: tuple, mode: str) -> Callable[[], object]:
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


def rotated_calls(fn, make_inputs, mode: str, ctx: BuildContext) -> Callable[[], object]:
    """``fn`` in ``mode`` on input sets from ``make_inputs(device)``, rotated (``n_sets``)."""
    sets = [make_inputs(ctx.device)]
    n = n_sets(sum(a.nbytes for a in sets[0] if isinstance(a, torch.Tensor)), ctx)
    sets += [make_inputs(ctx.device) for _ in range(n - 1)]
    return rotate([op_call(fn, args, mode) for args in sets])


def build_op(eager, fused, make_inputs, mode: str, ctx: BuildContext, provider: str,
             conv_path: str | None = None):
    """Builder shared by the op cases: rotated input sets, each wrapped for ``mode``. ``ext``
    runs ``fused`` with the backend forced to the extension (and ``FASTGAN_CONV=conv_path``),
    ``fastgan`` with it forced to ``ctx.fastgan_backend`` where that is set (``forced``)."""
    if provider == "ext":
        check_ext(ctx.device)
        return forced("ext", lambda: rotated_calls(fused, make_inputs, mode, ctx), conv_path)
    fn = pick(provider, eager, fused, ctx)
    if provider == "fastgan" and ctx.fastgan_backend:
        return forced(ctx.fastgan_backend, lambda: rotated_calls(fn, make_inputs, mode, ctx))
    return rotated_calls(fn, make_inputs, mode, ctx)


def op_modes(size: str) -> tuple[str, ...]:
    return QUICK_MODES if size == "quick" else OP_MODES


def dims(shape) -> str:
    return "x".join(str(s) for s in shape)


def layout_label(dtype: torch.dtype, weights: bool = True) -> str:
    """The shape label's layout suffix for ``dtype``: bf16 activations are channels_last
    (``NHWC``), weights NCHW (said where the case has ``weights``); fp32 all NCHW (none)."""
    if not CHANNELS_LAST[dtype]:
        return ""
    return " NHWC (w NCHW)" if weights else " NHWC"
