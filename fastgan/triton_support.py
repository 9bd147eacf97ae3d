"""triton, imported once, or stand-ins where it cannot be imported (docs/design.md section 8).

The op modules define their Triton kernels when they are imported. Where triton is not
installed (macOS, Windows) or fails to import (a broken installation), they get the stand-ins
below instead, so that ``import fastgan`` still works: CPU tensors then run the compiled
extension or the reference (``fastgan.backend``), and ``backend_info()`` says why Triton is not
used (``IMPORT_ERROR``). A stand-in kernel is never launched: without triton the backend rule
sends no tensor to the Triton kernels.

Imports nothing from fastgan. ``TRITON_INTERPRET`` must be set before this module is first
imported (docs/design.md section 5).
"""
from __future__ import annotations

try:
    import triton
    import triton.language as tl
    from triton.runtime.autotuner import Autotuner
    IMPORT_ERROR: str | None = None
    VERSION: str | None = triton.__version__
except Exception as error:  # not installed, or any error raised by a broken installation
    IMPORT_ERROR = " ".join(f"{type(error).__name__}: {error}".split())[:300]
    VERSION = None

    class _StandIn:
        """What the op modules use of ``triton`` and ``triton.language`` while they are
        imported: decorators that keep the function, configs and constants kept as given."""

        @staticmethod
        def jit(fn):
            return fn

        @staticmethod
        def autotune(*args, **kwargs):
            return lambda fn: fn

        @staticmethod
        def Config(*args, **kwargs):  # noqa: N802 (triton's name)
            return args, kwargs

        @staticmethod
        def constexpr(value):
            return value

    triton = tl = _StandIn()

    class Autotuner:  # what a kernel is never an instance of without triton
        pass
