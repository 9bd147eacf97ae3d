"""Launching Triton kernels at the cost of a direct call (docs/design.md section 8).

``kernel[grid](*args)`` goes through Triton's JIT each time: argument binding, a
specialization key, and for ``@triton.autotune`` kernels the Autotuner's wrapper -- tens to
hundreds of microseconds of host time, more than a small layer's GPU time. A
``KernelLauncher`` takes that route once per problem (the values of the integer arguments,
the dtypes and 16-byte alignment of the pointers, the constexprs and the device), keeps the
``CompiledKernel`` it returns, the grid and the autotuner's chosen config, and from then on
calls the compiled kernel directly. Everything the JIT would specialize on is in that key,
so the cached kernel is exactly the one the JIT would pick.

Kernels take their pointer arguments first, then their integer arguments, then constexprs.

Two other modes:

* in the CPU interpreter (``TRITON_INTERPRET=1``) every call goes through ``kernel[grid]``;
* ``recording()`` replaces every launch by a record of it (for tests, the compile check
  without a GPU, and the host-overhead benchmark, which runs the launchers on ``meta``
  tensors).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from triton.runtime.autotuner import Autotuner

from fastgan.backend import interpreter_enabled, record_launch, set_meta_runs_triton


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


class KernelLauncher:
    """Launches ``kernel`` (a ``@triton.jit`` function, optionally ``@triton.autotune``d)
    under the name ``name`` (see ``fastgan.launch_counts()``)."""

    def __init__(self, kernel, name: str):
        self.kernel, self.name = kernel, name
        self.autotuned = isinstance(kernel, Autotuner)
        self.arg_names = (kernel.fn if self.autotuned else kernel).arg_names
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
        key = (ints, tuple(meta.values()), device,
               tuple((p.dtype, p.data_ptr() % 16 == 0) for p in pointers))
        cached = self._cache.get(key)
        if cached is None:
            self._cache[key] = self._first_launch(grid, pointers, ints, meta)
            return
        gx, gy, gz = cached.grid
        compiled = cached.compiled
        compiled.run(gx, gy, gz, self._stream(device), compiled.function,
                     compiled.packed_metadata, None, None, None,
                     *pointers, *ints, *cached.constexprs)

    def _first_launch(self, grid, pointers, ints, meta) -> _Cached:
        """Launch through Triton's JIT (compiling and autotuning as needed) and keep what the
        next launches of this problem need."""
        compiled = self.kernel[grid](*pointers, *ints, **meta)
        full_meta = dict(meta)
        if self.autotuned:
            full_meta.update(self.kernel.best_config.kwargs)
        if callable(grid):
            grid = grid(full_meta)
        grid = tuple(grid) + (1,) * (3 - len(grid))
        n_runtime = len(pointers) + len(ints)
        constexprs = tuple(full_meta[name] for name in self.arg_names[n_runtime:])
        return _Cached(compiled, grid, constexprs)

    def clear(self) -> None:
        """Forget the compiled kernels (the next launch of each problem goes through the JIT)."""
        self._cache.clear()
