"""Compile, for sm_90 (H100/H200), every Triton kernel that fastgan's launchers launch for a
set of realistic problems, without a GPU.

The launchers run on ``meta`` tensors under ``fastgan.ops.launch.recording()``; each recorded
launch (every config of an autotuned kernel that its pruning keeps) is then compiled with
``triton.compile`` for ``GPUTarget('cuda', 90, 32)``. This catches compile errors of the real
(non-interpreted) code path and of older Triton releases (run it with triton 3.6, what CUDA
builds of torch 2.11 ship), and reports what the PTX does: vector widths of global loads and
stores, shared memory.

It also reads the TTIR of every variant compiled with ``INT64=True`` (tensors past 2**31
elements) and fails if a 32-bit integer multiply feeds an address there: such a product wraps
before it is widened.

Run with TRITON_INTERPRET unset: ``python tests/sm90_compile.py [--verbose]``.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402

from fastgan.ops.launch import recording  # noqa: E402



def expanded_launches(launches):
    """``(jit_kernel, args, kwargs)`` for each recorded ``Launch``; an autotuned kernel gives
    one per config that its pruning keeps."""
    for launch in launches:
        args, kwargs = (*launch.pointers, *launch.ints), dict(launch.meta)
        kernel = launch.kernel
        if not isinstance(kernel, Autotuner):
            yield kernel, args, kwargs
            continue
        configs = kernel.configs
        if kernel.early_config_prune:
            configs = kernel.early_config_prune(configs, dict(zip(kernel.arg_names, args)),
                                                **kwargs)
        for config in configs:
            yield kernel.fn, args, {**kwargs, **config.all_kwargs()}


_DEF = re.compile(r"^\s*(%[\w.]+)(?::\d+)?\s*=\s*([\w.]+)\s*(.*)$")
_VALUE = re.compile(r"%[\w.]+")


def narrow_products_in_addresses(ttir: str) -> list[str]:
    """The TTIR lines of 32-bit integer multiplies (``arith.muli`` on ``i32`` or a tensor of
    ``i32``) from which a ``tt.addptr`` offset or base is computed."""
    defs = {}
    for line in ttir.splitlines():
        m = _DEF.match(line)
        if m:
            name, op, rest = m.groups()
            rest = rest.split(" loc(")[0]
            operands = [v.split("#")[0] for v in _VALUE.findall(rest)]
            defs[name] = (op, operands, rest, line.strip())
    found, seen = [], set()
    stack = [v for op, operands, _, _ in defs.values() if op == "tt.addptr" for v in operands]
    while stack:
        name = stack.pop()
        if name in seen or name not in defs:
            continue  # kernel arguments and loop variables are where the search stops
        seen.add(name)
        op, operands, rest, line = defs[name]
        if op == "arith.muli" and re.search(r":\s*(tensor<[^>]*xi32>|i32)\s*$", rest):
            found.append(line)
        stack.extend(operands)
    return found


def compile_launch(kernel, args, kwargs):
    """Compile one recorded launch for sm_90, specializing each argument as the JIT does
    (``native_specialize_impl``: 16-divisible integers and pointers, integers equal to 1
    become constants); meta tensors count as 16-byte aligned."""
    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    for k in ("num_ctas", "maxnreg", "enable_fp_fusion", "pre_hook"):
        kwargs.pop(k, None)
    values = dict(zip(kernel.arg_names, args)) | kwargs
    signature, constexprs, attrs = {}, {}, {}
    constexpr_indices = set(kernel.constexprs)
    for i, name in enumerate(kernel.arg_names):
        value = values[name]
        if i in constexpr_indices:
            signature[name], constexprs[(i,)] = "constexpr", value
            continue
        kind, key = native_specialize_impl(BaseBackend, value, False, True, True)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[(i,)] = key
        elif key == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def _problems():
    """``(label, thunk)``: each thunk calls launchers on meta tensors."""
    from fastgan.ops import bias_act as ba
    from fastgan.ops import conv2d_act as conv
    from fastgan.ops import grad_sq_norm as gsn
    from fastgan.ops import upfirdn2d as upf
    from fastgan.reference import ACTIVATIONS, resolve_activation

    meta = torch.device("meta")
    lrelu = resolve_activation("lrelu", clamp=256)
    problems = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        for shape, channels_last in (((32, 128, 256, 256), False), ((32, 128, 256, 256), True),
                                     ((32, 512, 8, 8), False), ((32, 512, 8, 8), True),
                                     ((7, 3, 5), False)):
            def run(shape=shape, channels_last=channels_last, dtype=dtype):
                x = torch.empty(shape, dtype=dtype, device=meta)
                if channels_last:
                    x = x.to(memory_format=torch.channels_last)
                b = torch.empty(shape[1], dtype=dtype, device=meta)
                y = ba.bias_act_forward(x, b, 1, lrelu)
                ba.bias_act_grad(torch.empty_like(y), y, 1, lrelu, True)
                ba.bias_act_grad(torch.empty_like(y), y, 1, lrelu, False)
            problems.append((f"bias_act {dtype} {shape} cl={channels_last}", run))

        def run_norm(dtype=dtype):
            g = torch.empty((64, 3, 256, 256), dtype=dtype, device=meta)
            gsn.per_sample_dot_forward(g, g)
            gsn.per_sample_dot_forward(g, torch.empty_like(g))
            gsn.scale_per_sample_forward(g, torch.empty(64, device=meta))
        problems.append((f"grad_sq_norm {dtype}", run_norm))

    # The curved activations: each one's forward and gradient from the input in bf16
    # channels_last; swish with channels as rows, also the double backward's unscaled gradient
    # without the bias reduction; selu in float64 (its constants made in float64).
    curved = [name for name, act in ACTIVATIONS.items() if act.curved]
    for name, dtype, channels_last in ([(n, torch.bfloat16, True) for n in curved]
                                       + [("swish", torch.bfloat16, False),
                                          ("selu", torch.float64, False)]):
        def run_curved(name=name, dtype=dtype, channels_last=channels_last):
            spec = resolve_activation(name, clamp=256)
            x = torch.empty((32, 128, 64, 64), dtype=dtype, device=meta)
            if channels_last:
                x = x.to(memory_format=torch.channels_last)
            b = torch.empty(128, dtype=dtype, device=meta)
            dy = torch.empty_like(ba.bias_act_forward(x, b, 1, spec, 0.5))
            ba.bias_act_grad_from_input(dy, x, b, 1, spec, True, 0.5)
            if name == "swish" and not channels_last:
                ba.bias_act_grad_from_input(dy, x, b, 1, spec, False, 0.5, False)
        problems.append((f"bias_act {name} {dtype} cl={channels_last}", run_curved))

    # conv2d_act: StyleGAN2 3x3 in bf16 channels_last (weights channels_last, and NCHW as the
    # models' parameters are), R3GAN's 16 channels per group, a stride-2 4x4 in fp16, a 1x1 in
    # fp32 NCHW (tf32), float64, and 64-bit offsets.
    for x_shape, w_shape, stride, groups, dtype, x_cl, w_cl in (
            ((32, 512, 32, 32), (512, 512, 3, 3), 1, 1, torch.bfloat16, True, True),
            ((32, 512, 32, 32), (512, 512, 3, 3), 1, 1, torch.bfloat16, True, False),
            ((32, 512, 32, 32), (512, 16, 3, 3), 1, 32, torch.bfloat16, True, True),
            ((32, 512, 32, 32), (512, 16, 3, 3), 1, 32, torch.bfloat16, True, False),
            ((32, 256, 64, 64), (512, 256, 4, 4), 2, 1, torch.float16, True, True),
            ((32, 128, 64, 64), (256, 128, 1, 1), 1, 1, torch.float32, False, False),
            ((2, 5, 9, 7), (6, 5, 3, 2), 1, 1, torch.float64, False, False),
            ((1, 64, 8192, 4200), (16, 64, 1, 1), 1, 1, torch.bfloat16, True, True)):
        def run_conv(x_shape=x_shape, w_shape=w_shape, stride=stride, groups=groups,
                     dtype=dtype, x_cl=x_cl, w_cl=w_cl):
            x = torch.empty(x_shape, dtype=dtype, device=meta)
            if x_cl:
                x = x.to(memory_format=torch.channels_last)
            w = torch.empty(w_shape, dtype=dtype, device=meta)
            if w_cl:
                w = w.to(memory_format=torch.channels_last)
            b = torch.empty(w_shape[0], dtype=dtype, device=meta)
            geom = conv.ConvGeometry((stride, stride), (1, 1), groups)
            conv.conv2d_act_triton_forward(x, w, b, geom, lrelu)
        problems.append((f"conv2d_act {dtype} x={x_shape} w={w_shape} s={stride} g={groups} "
                         f"x_cl={x_cl} w_cl={w_cl}", run_conv))

    # upfirdn2d: StyleGAN2's blur before a stride-2 conv and its skip branch's downsample (a
    # 4x4 filter) in bf16 channels_last and fp32 NCHW, its upsample with a separable filter,
    # fp16 and fp64 with flipped and identity filters, and 64-bit offsets.
    for x_shape, dtype, cl, f_shape, up, down, padding, flip in (
            ((32, 128, 256, 256), torch.bfloat16, True, (4, 4), 1, 1, 2, False),
            ((32, 128, 256, 256), torch.bfloat16, True, (4, 4), 1, 2, 1, False),
            ((32, 128, 256, 256), torch.float32, False, (4, 4), 1, 1, 2, False),
            ((32, 512, 8, 8), torch.float32, False, (4, 4), 1, 2, 1, False),
            ((32, 512, 32, 32), torch.float16, True, (8,), 2, 1, (4, 3), True),
            ((2, 5, 9, 7), torch.float64, False, None, (2, 1), (1, 3), (1, 0, -1, 2), True),
            ((1, 64, 8192, 4200), torch.bfloat16, True, (4, 4), 1, 2, 1, False),
            ((1, 1, 2**16, 2**15 + 1), torch.float32, False, (4,), 1, 1, 2, False)):
        def run_upfirdn2d(x_shape=x_shape, dtype=dtype, cl=cl, f_shape=f_shape, up=up,
                          down=down, padding=padding, flip=flip):
            x = torch.empty(x_shape, dtype=dtype, device=meta)
            if cl:
                x = x.to(memory_format=torch.channels_last)
            f = None if f_shape is None else torch.empty(f_shape, device=meta)
            upf.upfirdn2d(x, f, up, down, padding, flip)
        problems.append((f"upfirdn2d {dtype} x={x_shape} cl={cl} f={f_shape} up={up} "
                         f"down={down} padding={padding}", run_upfirdn2d))

    # 64-bit offsets of the memory-bound kernels: one row / one sample over 2**31 elements.
    def run_int64():
        x = torch.empty((2, 2**30 + 7), dtype=torch.bfloat16, device=meta)
        y = ba.bias_act_forward(x, None, 0, lrelu)
        ba.bias_act_grad(torch.empty_like(y), y, 0, lrelu, True)
        rows = torch.empty((2**25 + 3, 64), dtype=torch.bfloat16, device=meta)  # channels as columns
        b = torch.empty(64, dtype=torch.bfloat16, device=meta)
        y = ba.bias_act_forward(rows, b, 1, lrelu)
        ba.bias_act_grad(torch.empty_like(y), y, 1, lrelu, True)
        gsn.per_sample_dot_forward(x, x)
        gsn.scale_per_sample_forward(x, torch.empty(2, device=meta))
        swish = resolve_activation("swish", clamp=256)
        ba.bias_act_grad_from_input(torch.empty_like(rows), rows, b, 1, swish, True)
        ba.bias_act_grad_from_input(torch.empty_like(x), x, None, 0, swish, True)
    problems.append(("int64 offsets", run_int64))
    return problems


_MEMOPS = re.compile(r"\b(ld\.global[.\w]*|st\.global[.\w]*|cp\.async[.\w]*|wgmma[.\w]*|mma[.\w]*)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", action="store_true", help="print PTX memory/matrix ops")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter does not compile", file=sys.stderr)
        return 2
    failures, compiled, int64_checked = 0, 0, 0
    seen = set()
    for label, thunk in _problems():
        with recording() as launches:
            thunk()
        for kernel, kargs, kwargs in expanded_launches(launches):
            key = (kernel.fn.__name__, tuple(
                (str(a.dtype), a.is_contiguous()) if isinstance(a, torch.Tensor) else
                (a % 16 == 0 if isinstance(a, int) and not isinstance(a, bool) else a)
                for a in kargs), tuple(sorted(kwargs.items())))
            if key in seen:
                continue
            seen.add(key)
            try:
                binary = compile_launch(kernel, kargs, kwargs)
            except Exception as exc:  # report every failure, then fail
                failures += 1
                print(f"FAIL {label}: {kernel.fn.__name__} {kwargs}: {type(exc).__name__}: "
                      f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}")
                continue
            compiled += 1
            if kwargs.get("INT64"):
                int64_checked += 1
                narrow = narrow_products_in_addresses(binary.asm["ttir"])
                if narrow:
                    failures += 1
                    print(f"FAIL {label}: {kernel.fn.__name__} {kwargs}: 32-bit multiplies "
                          f"feed addresses in the INT64 variant:\n  " + "\n  ".join(narrow))
            if args.verbose:
                ops = sorted(set(_MEMOPS.findall(binary.asm["ptx"])))
                print(f"ok {label}: {kernel.fn.__name__} {kwargs} shared={binary.metadata.shared} "
                      f"{' '.join(ops)}")
    print(f"triton {triton.__version__}: compiled {compiled} kernel variants for sm_90 "
          f"({int64_checked} INT64 variants checked for 32-bit address products), "
          f"{failures} failed")
    return 1 if failures or not compiled or not int64_checked else 0


if __name__ == "__main__":
    sys.exit(main())
