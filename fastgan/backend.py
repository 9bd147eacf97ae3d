"""Which implementation runs for a tensor, and why.

Rules (``auto``, the default):

* CUDA tensors run the Triton kernels.
* CPU tensors run the plain-PyTorch reference (``fastgan.reference``), unless
  ``TRITON_INTERPRET=1`` was set before triton was imported: then the Triton kernels run in
  the interpreter (this is how the test suite exercises them without a GPU).

``FASTGAN_BACKEND=auto|triton|torch`` in the environment, or ``set_backend()`` at run time,
overrides the rule: ``torch`` always runs the reference, ``triton`` always runs the kernels
(and fails with a clear error for a CPU tensor when the interpreter is off).

``meta`` tensors take the Triton path while ``fastgan.ops.launch.recording()`` records
launches instead of running them (how the compile check and the host-overhead benchmark drive
the launchers without a GPU). The rule runs on every op call, so what it reads is cached: the
parse of each ``FASTGAN_BACKEND`` value, and whether triton is installed.

Every kernel launcher calls ``record_launch(name)``, so tests (and curious users) can see
which kernels actually ran: ``launch_counts()``.
"""
from __future__ import annotations

import collections
import functools
import importlib.util
import os
import threading

import torch

BACKENDS = ("auto", "triton", "torch")

_override: str | None = None
_parsed_env: dict[str, str] = {}
_meta_runs_triton = False
_launches: collections.Counter = collections.Counter()
_launch_lock = threading.Lock()
_choice_reporters: dict = {}


def _check_backend_name(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{where} must be one of {BACKENDS}, got {name!r}")
    return name


def set_backend(name: str | None) -> None:
    """Force ``'triton'`` or ``'torch'`` for every op, or ``'auto'``; ``None`` returns to the
    environment's ``FASTGAN_BACKEND`` (default ``auto``)."""
    global _override
    _override = None if name is None else _check_backend_name(name, "set_backend(name)")


def get_backend() -> tuple[str, str]:
    """The backend setting in force and where it came from."""
    if _override is not None:
        return _override, "set_backend()"
    env = os.environ.get("FASTGAN_BACKEND")
    if not env:
        return "auto", "default"
    name = _parsed_env.get(env)
    if name is None:
        name = _parsed_env[env] = _check_backend_name(env.strip().lower(), "FASTGAN_BACKEND")
    return name, "FASTGAN_BACKEND"


def interpreter_enabled() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def set_meta_runs_triton(enabled: bool) -> bool:
    """Let ``meta`` tensors take the Triton path (while launches are recorded); returns the
    previous setting."""
    global _meta_runs_triton
    previous, _meta_runs_triton = _meta_runs_triton, enabled
    return previous


def use_triton(x: torch.Tensor) -> bool:
    """Whether the Triton kernels (compiled or interpreted) run for tensor ``x``."""
    name, source = get_backend()
    if name == "torch":
        return False
    runnable = (x.is_cuda or (x.device.type == "cpu" and interpreter_enabled())
                or (_meta_runs_triton and x.is_meta))
    if name == "triton":
        if not triton_available():
            raise RuntimeError(f"backend 'triton' (from {source}) needs the triton package")
        if not runnable:
            raise RuntimeError(
                f"backend 'triton' (from {source}) cannot run a {x.device.type} tensor: Triton "
                "kernels need a CUDA tensor, or TRITON_INTERPRET=1 set before triton is "
                "imported for CPU tensors")
        return True
    return runnable and triton_available()


def record_launch(kernel: str) -> None:
    """Count one launch of ``kernel`` (called by every launcher)."""
    with _launch_lock:
        _launches[kernel] += 1


def launch_counts() -> dict[str, int]:
    """Launches per kernel name since the last ``reset_launch_counts()``."""
    with _launch_lock:
        return dict(_launches)


def reset_launch_counts() -> None:
    with _launch_lock:
        _launches.clear()


def register_choice_reporter(name: str, report) -> None:
    """Ops that choose an implementation per shape register a callable returning their
    choices; ``backend_info()`` includes them."""
    _choice_reporters[name] = report


def _describe(device_type: str) -> str:
    name, _ = get_backend()
    if name == "torch":
        return "torch reference (backend forced to 'torch')"
    if device_type == "cuda":
        return "Triton kernels, compiled" if triton_available() else "unavailable: no triton"
    if interpreter_enabled() and triton_available():
        return "Triton kernels in the interpreter (TRITON_INTERPRET=1)"
    if name == "triton":
        return "error: backend 'triton' needs CUDA tensors or TRITON_INTERPRET=1"
    return "torch reference (no GPU kernels for CPU tensors; set TRITON_INTERPRET=1 to interpret)"


def backend_info() -> dict:
    """What runs for CUDA and CPU tensors, and why."""
    name, source = get_backend()
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {
        "backend": name,
        "backend_source": source,
        "torch": torch.__version__,
        "triton": triton_version,
        "triton_interpreter": interpreter_enabled(),
        "cuda_available": torch.cuda.is_available(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cuda_tensors": _describe("cuda"),
        "cpu_tensors": _describe("cpu"),
    }
    for op, report in sorted(_choice_reporters.items()):
        info[f"{op}_choices"] = report()
    return info
