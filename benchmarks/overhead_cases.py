"""The host-overhead case ``overhead`` (docs/design.md sections 6 and 8): how long the Python
call of an op takes to enqueue its work, for eager, fastgan and (on CUDA) ext.

Units of work on a small layer, where launch cost is what a training step feels:

* ``fwd``: one ``bias_act`` forward, and one ``upfirdn2d`` (StyleGAN2's blur before a stride-2
  conv) forward (inputs require grad, as in training);
* ``fwd+bwd``: one ``conv2d_act`` + leaky ReLU block, forward then ``autograd.grad``.

On CUDA a row is the host time of one call (``timing.host_ms``): blocks of ``HOST_CALLS``
calls timed with ``perf_counter`` and no synchronization inside, after warm-up (compilation,
autotuning, fastgan's per-shape choice and cached kernels); fastgan's calls run with the
backend forced to ``ctx.fastgan_backend`` (the Triton kernels on CUDA), the ``ext`` rows' to
the compiled extension (a dispatcher call per op instead of a direct Triton launch). Without
a GPU the same calls run on ``meta`` tensors, fastgan's kernel launches recorded instead of
run (``fastgan.ops.launch.recording()``, under which meta tensors take fastgan's Triton
path), so the Python part of every call is still measured; the extension has no such
stand-in (``ext`` is unsupported there).
"""
from __future__ import annotations

import functools

import torch

import fastgan
from benchmarks.common import (CHANNELS_LAST, DTYPES, BuildContext, Case, Unsupported,
                               check_ext, dims, forced, layout_label, op_call)
from benchmarks.op_cases import (EXT_CONV_NOTE, EXT_CONV_PATH, Conv, Resample, bias_act_eager,
                                 bias_act_fused, bias_act_inputs, conv_inputs, conv_stack,
                                 stack_label, upfirdn2d_build, upfirdn2d_inputs)
from fastgan import reference
from fastgan.backend import use_triton
from fastgan.ops import launch

HOST_CALLS = 20  # calls per timed block: at most ~300 launches, far below a full launch queue
OVERHEAD_SHAPE = (32, 512, 8, 8)  # a StyleGAN2-256 D's last 3x3 layer, batch 32
OVERHEAD_LAYER = Conv(512, 512)  # 3x3, bias, lrelu
STUBBED_NOTE = (
    "no GPU: meta tensors, fastgan's launches recorded instead of run; aten ops on meta run "
    "Python meta kernels (torch._refs), far slower than CUDA dispatch (eager most): these rows "
    "track the Python code, they are not CUDA host times")
META_RULE_NOTE = (
    "fastgan's backend rule runs the torch reference on meta tensors; the host-overhead rows "
    "need fastgan.backend.use_triton to take meta tensors while fastgan.ops.launch.recording() "
    "records launches")
EXT_OFF_CUDA_NOTE = (
    "no GPU: these rows run on meta tensors with launches recorded, and the extension has no "
    "such stand-in (its CPU kernels do the work in the call: no host-only time to measure)")


def _recorded(call):
    """``call()`` with fastgan's launches recorded instead of run."""
    def run():
        with launch.recording():
            return call()
    return run


def build_overhead(eager, fused, make_inputs, mode: str, ctx: BuildContext, provider: str,
                   conv_path: str | None = None):
    """One call of ``eager`` or ``fused`` in ``mode`` on inputs from ``make_inputs(device)``:
    on CUDA as is, ``fused`` with the backend forced (``forced``: ``ctx.fastgan_backend`` for
    fastgan, the extension and ``FASTGAN_CONV=conv_path`` for ext); without a GPU on meta
    tensors, fastgan's under ``recording()``."""
    if provider == "compile":
        raise Unsupported("host overhead is measured for eager, fastgan and ext; "
                          "torch.compile's (guards, graph launch) is not")
    if provider not in ("eager", "fastgan", "ext"):
        raise ValueError(f"provider must be one of 'eager', 'compile', 'fastgan', 'ext', got "
                         f"{provider!r}")
    if provider == "ext":
        if ctx.device.type != "cuda":
            raise Unsupported(EXT_OFF_CUDA_NOTE)
        check_ext(ctx.device)
        return forced("ext", lambda: op_call(fused, make_inputs(ctx.device), mode), conv_path)
    fn = eager if provider == "eager" else fused
    if ctx.device.type == "cuda":
        if provider == "fastgan" and ctx.fastgan_backend:
            return forced(ctx.fastgan_backend, lambda: op_call(fn, make_inputs(ctx.device), mode))
        return op_call(fn, make_inputs(ctx.device), mode)
    meta = torch.device("meta")
    if provider == "eager":
        return op_call(fn, make_inputs(meta), mode)
    with launch.recording():
        if not use_triton(torch.empty(0, device=meta)):
            raise Unsupported(META_RULE_NOTE)
        return _recorded(op_call(fn, make_inputs(meta), mode))


OVERHEAD_NOTES = (
    ("all", f"host time of one call (blocks of {HOST_CALLS} calls, no synchronization inside), "
            "not GPU time"),
)


def overhead_cases(size: str) -> list[Case]:
    """The same shapes at every size: without a GPU they run on meta tensors, which hold no
    data."""
    del size
    n, _, h, w = OVERHEAD_SHAPE
    layers = (OVERHEAD_LAYER,)
    conv_eager = functools.partial(conv_stack, reference.conv2d_act, layers)
    conv_fused = functools.partial(conv_stack, fastgan.conv2d_act, layers)
    cases = []
    for dtype in DTYPES.values():
        common = dict(bytes_moved=None, flops=None, host_calls=HOST_CALLS,
                      off_cuda_note=STUBBED_NOTE)
        make = functools.partial(bias_act_inputs, OVERHEAD_SHAPE, dtype,
                                 channels_last=CHANNELS_LAST[dtype])
        label = f"bias_act {dims(OVERHEAD_SHAPE)}{layout_label(dtype, weights=False)}"
        build = functools.partial(build_overhead, bias_act_eager, bias_act_fused, make, "fwd")
        cases.append(Case("overhead", "fwd", label, dtype, build, notes=OVERHEAD_NOTES, **common))
        make = functools.partial(conv_inputs, n, h, w, layers, dtype)
        label = f"conv2d_act {stack_label(n, h, w, layers)}{layout_label(dtype)}"
        build = functools.partial(build_overhead, conv_eager, conv_fused, make, "fwd+bwd",
                                  conv_path=EXT_CONV_PATH)
        cases.append(Case("overhead", "fwd+bwd", label, dtype, build,
                          notes=OVERHEAD_NOTES + (EXT_CONV_NOTE,), **common))
        blur = Resample("blur")
        make = functools.partial(upfirdn2d_inputs, OVERHEAD_SHAPE, dtype)
        label = (f"upfirdn2d {dims(OVERHEAD_SHAPE)} {blur.kind}"
                 f"{layout_label(dtype, weights=False)}")
        build = upfirdn2d_build(build_overhead, functools.partial(reference.upfirdn2d,
                                                                  **blur.kwargs),
                                functools.partial(fastgan.upfirdn2d, **blur.kwargs), make, "fwd")
        cases.append(Case("overhead", "fwd", label, dtype, build, notes=OVERHEAD_NOTES,
                          **common))
    return cases
