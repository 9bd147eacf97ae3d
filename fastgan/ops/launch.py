"""Launching Triton kernels at the cost of a direct call (docs/design.md section 8).

``kernel[grid](*args)`` goes through Triton's JIT each time: argument binding, a
specialization key, and for ``@triton.autotune`` kernels the Autotuner's wrapper -- tens to
hundreds of microseconds of host time, more than a small layer's GPU time. A
``KernelLauncher`` takes that route once per problem (the values of the integer arguments,
the dtypes and 16-byte alignment of the pointers, the constexprs and the device), keeps the
``CompiledKernel`` it returns, the grid and the autotuner's chosen config, and from then on
calls the compiled kernel directly. Everything the JIT would specialize on is in that key,
so the cached kernel is exactly the one the JIT would pick.

A direct call passes ``CompiledKernel.run`` the argument list the JIT passes it. Once per
process (``direct_launch_problem``) that list is checked against the installed triton: the
call ``JITFunction.run`` makes, and the parameters of the compiled kernel's launcher. Where
either differs, or a direct call raises, every launch goes through the JIT, with one warning.
Launches run under a device guard for tensors on another device than the current one.

Kernels take their pointer arguments first, then their integer arguments, then constexprs.

Two other modes:

* in the CPU interpreter (``TRITON_INTERPRET=1``) every call goes through ``kernel[grid]``;
* ``recording()`` replaces every launch by a record of it (for tests, the compile check
  without a GPU, and the host-overhead benchmark, which runs the launchers on ``meta``
  tensors).
"""
from __future__ import annotations

import ast
import contextlib
import functools
import inspect
import textwrap
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from fastgan.backend import interpreter_enabled, record_launch, set_meta_runs_triton
from fastgan.triton_support import VERSION, Autotuner


@dataclass(frozen=True)
class Launch:
    """One launch seen by ``recording()``: the kernel (a JITFunction or an Autotuner), its
    pointer and integer arguments, constexprs (``meta``) and the grid (a tuple, or a function
    of the meta-parameters for autotuned kernels)."""
    name: str
    kernel: object
    pointers: tuple
    ints: tuple
    meta: dict
    grid: object


_recording: list[Launch] | None = None


@contextlib.contextmanager
def recording():
    """Within this context launchers record their launches instead of running them, and
    ``meta`` tensors take the Triton path; yields the list the launches are appended to.
    Launch counts are still recorded."""
    global _recording
    previous, _recording = _recording, []
    previous_meta = set_meta_runs_triton(True)
    try:
        yield _recording
    finally:
        _recording = previous
        set_meta_runs_triton(previous_meta)


def is_recording() -> bool:
    return _recording is not None


@dataclass
class _Cached:
    """A compiled kernel ready to run: ``run(gx, gy, gz, stream, function, packed, ...)``."""
    compiled: object
    grid: tuple
    constexprs: tuple  # values of the constexpr parameters, in signature order


def _current_stream() -> Callable[[int], int]:
    try:
        return torch._C._cuda_getCurrentRawStream
    except AttributeError:  # a CPU build of torch: never called
        return lambda index: 0


# What JITFunction.run passes to ``kernel.run``, by its source text: the grid, the stream, the
# kernel's handle and metadata, launch metadata, the two launch hooks (None: no hooks, as
# launch_metadata is None then), then every argument of the kernel, constexprs included.
_JIT_CALL_HEAD = ["grid_0", "grid_1", "grid_2", "stream", "kernel.function",
                  "kernel.packed_metadata", "launch_metadata"]
_JIT_CALL_ARGS = "*bound_args.values()"
_LAUNCHER_POSITIONAL = 9  # the launcher's parameters before the kernel's arguments


@functools.cache
def direct_launch_problem() -> str | None:
    """Why compiled kernels cannot be called directly with the installed triton, in one line,
    or None when they can: ``JITFunction.run`` must call ``kernel.run`` with the argument list
    ``KernelLauncher`` builds (checked once per process, on its source)."""
    try:
        from triton.runtime.jit import JITFunction
        tree = ast.parse(textwrap.dedent(inspect.getsource(JITFunction.run)))
    except Exception as e:  # no source (a frozen install), or none of the expected names
        return f"cannot read triton {VERSION}'s JITFunction.run: {type(e).__name__}: {e}"
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
             and ast.unparse(node.func) == "kernel.run"]
    if len(calls) != 1:
        return f"triton {VERSION}'s JITFunction.run calls kernel.run {len(calls)} times, not once"
    args = [ast.unparse(a) for a in calls[0].args]
    if (args[:len(_JIT_CALL_HEAD)] != _JIT_CALL_HEAD or len(args) != _LAUNCHER_POSITIONAL + 1
            or args[-1] != _JIT_CALL_ARGS or calls[0].keywords):
        return (f"triton {VERSION}'s JITFunction.run calls kernel.run({', '.join(args)}), not "
                f"the argument list fastgan builds")
    return None


def launcher_problem(compiled) -> str | None:
    """Why ``compiled.run`` (a compiled kernel's launcher) does not take the argument list
    ``KernelLauncher`` builds, or None: ``_LAUNCHER_POSITIONAL`` positional parameters, then
    the kernel's arguments (``*args``)."""
    try:
        params = list(inspect.signature(compiled.run).parameters.values())
    except (TypeError, ValueError) as e:
        return f"cannot read the signature of triton {VERSION}'s kernel launcher: {e}"
    kinds = [p.kind for p in params]
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if (len(params) != _LAUNCHER_POSITIONAL + 1 or kinds[-1] != inspect.Parameter.VAR_POSITIONAL
            or any(k not in positional for k in kinds[:-1])):
        return (f"triton {VERSION}'s kernel launcher takes ({', '.join(map(str, params))}), "
                f"not {_LAUNCHER_POSITIONAL} arguments then the kernel's")
    return None


_jit_only_reason: str | None = None  # set once a check or a direct call failed


def _use_jit_from_now_on(reason: str) -> None:
    """Send every later launch through the JIT, warning once."""
    global _jit_only_reason
    if _jit_only_reason is None:
        _jit_only_reason = reason
        warnings.warn(f"fastgan: Triton kernels launch through the JIT from now on (slower on "
                      f"the host): {reason}", RuntimeWarning, stacklevel=3)


def jit_only_reason() -> str | None:
    """Why launches go through the JIT (None while they call compiled kernels directly)."""
    return _jit_only_reason


class KernelLauncher:
    """Launches ``kernel`` (a ``@triton.jit`` function, optionally ``@triton.autotune``d)
    under the name ``name`` (see ``fastgan.launch_counts()``)."""

    def __init__(self, kernel, name: str):
        self.kernel, self.name = kernel, name
        self.autotuned = isinstance(kernel, Autotuner)
        self._cache: dict[tuple, _Cached] = {}
        self._stream = _current_stream()
        self._interpreted = interpreter_enabled()  # fixed once triton is imported

    def __call__(self, grid, pointers: tuple, ints: tuple, meta: dict) -> None:
        """Launch on ``grid`` (a tuple, or for autotuned kernels a function of the full
        meta-parameters) with ``pointers`` (tensors), ``ints`` and constexprs ``meta``."""
        record_launch(self.name)
        if _recording is not None:
            _recording.append(Launch(self.name, self.kernel, pointers, ints, meta, grid))
            return
        if self._interpreted:
            self.kernel[grid](*pointers, *ints, **meta)
            return
        device = pointers[0].device.index
        if device is not None and device != torch.cuda.current_device():
            with torch.cuda.device(device):
                self._launch(device, grid, pointers, ints, meta)
        else:
            self._launch(device, grid, pointers, ints, meta)

    def _launch(self, device: int, grid, pointers: tuple, ints: tuple, meta: dict) -> None:
        """Launch on the current device, ``device``: the compiled kernel of this problem
        directly, or through the JIT."""
        if _jit_only_reason is not None:
            self.kernel[grid](*pointers, *ints, **meta)
            return
        key = (ints, tuple(meta.values()), device,
               tuple((p.dtype, p.data_ptr() % 16 == 0) for p in pointers))
        cached = self._cache.get(key)
        if cached is None:
            cached = self._first_launch(grid, pointers, ints, meta)
            if cached is not None:
                self._cache[key] = cached
            return
        gx, gy, gz = cached.grid
        compiled = cached.compiled
        try:
            compiled.run(gx, gy, gz, self._stream(device), compiled.function,
                         compiled.packed_metadata, None, None, None,
                         *pointers, *ints, *cached.constexprs)
        except Exception as e:  # a launcher that takes other arguments after all
            _use_jit_from_now_on(f"a direct launch of {self.name} raised {type(e).__name__}: {e}")
            self.kernel[grid](*pointers, *ints, **meta)

    def _first_launch(self, grid, pointers, ints, meta) -> _Cached | None:
        """Launch through Triton's JIT (compiling and autotuning as needed) and keep what the
        next launches of this problem need; check, the first time, that the compiled kernel
        can be called directly."""
        compiled = self.kernel[grid](*pointers, *ints, **meta)
        problem = direct_launch_problem() or launcher_problem(compiled)
        if problem is not None:
            _use_jit_from_now_on(problem)
            return None
        full_meta = dict(meta)
        if self.autotuned:
            full_meta.update(self.kernel.best_config.kwargs)
        if callable(grid):
            grid = grid(full_meta)
        grid = tuple(grid) + (1,) * (3 - len(grid))
        n_runtime = len(pointers) + len(ints)
        arg_names = (self.kernel.fn if self.autotuned else self.kernel).arg_names
        constexprs = tuple(full_meta[name] for name in arg_names[n_runtime:])
        return _Cached(compiled, grid, constexprs)

    def clear(self) -> None:
        """Forget the compiled kernels (the next launch of each problem goes through the JIT)."""
        self._cache.clear()
