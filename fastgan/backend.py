"""Which implementation runs for a tensor, and why (docs/design.md sections 5 and 8).

Every op has three implementations with the same results: the Triton kernels (``triton``),
the compiled extension's ``torch.ops.fastgan`` operators (``ext``, see ``fastgan.ext``) and the
plain-PyTorch reference (``torch``, ``fastgan.reference``).

Rules (``auto``, the default), the first of these that can run:

* CPU tensors: the Triton kernels in the interpreter when ``TRITON_INTERPRET=1`` was set
  before triton was imported (the user asked for them; the test suite runs on them), then the
  extension, then the reference.
* CUDA tensors: the Triton kernels, then the extension (without triton), then the reference.
  The extension's CUDA kernels sum in another order than the Triton kernels, so ``auto``
  never mixes the two by measurement: results stay the same from run to run. They run when
  forced (``ext``), and the benchmarks weigh them against the Triton kernels.
* While ``torch.compile`` traces: the extension, then the reference. Dispatcher ops with
  fake kernels are traced into the graph; the Triton launchers (and the interpreter) would
  break it. This choice is made when a call is traced and kept by the compiled code.
* ``meta`` tensors take the Triton path while ``fastgan.ops.launch.recording()`` records
  launches instead of running them (how the compile check and the host-overhead benchmark
  drive the launchers without a GPU); other devices run the reference.

``FASTGAN_BACKEND=auto|triton|ext|torch`` in the environment, or ``set_backend()`` at run
time, overrides the rule: ``torch`` always runs the reference; ``triton`` always runs the
kernels (and fails with a clear error where they cannot run); ``ext`` runs the extension
wherever it can, and elsewhere what ``auto`` would run without it, with a warning, once per
device type, that says why. The rule runs on every op call, so what it reads is cached: the
parse of each ``FASTGAN_BACKEND`` value, and the extension's state (``fastgan.ext`` loads it
once). Nothing here times anything or talks to other processes.

Every launcher calls ``record_launch(name)`` (Triton kernels by their names, extension ops as
``ext_<op>``), so tests (and curious users) can see which kernels actually ran:
``launch_counts()``. Calls inside compiled graphs run without Python and are not counted.

Layers: ``fastgan.ext`` (finding and loading the extension) and ``fastgan.triton_support``
(importing triton) sit below this module; the ops sit above it.
"""
from __future__ import annotations

import collections
import os
import threading
import warnings

import torch

from fastgan import ext, triton_support

BACKENDS = ("auto", "triton", "ext", "torch")

_override: str | None = None
_parsed_env: dict[str, str] = {}
_meta_runs_triton = False
_launches: collections.Counter = collections.Counter()
_launch_lock = threading.Lock()
_choice_reporters: dict = {}
_ext_warned: set[str] = set()  # device types the 'ext cannot run here' warning was given for


def _check_backend_name(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{where} must be one of {BACKENDS}, got {name!r}")
    return name


def set_backend(name: str | None) -> None:
    """Force ``'triton'``, ``'ext'`` or ``'torch'`` for every op, or ``'auto'``; ``None``
    returns to the environment's ``FASTGAN_BACKEND`` (default ``auto``). Code that
    ``torch.compile`` already traced keeps the implementation it traced."""
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


def triton_available() -> bool:
    """Whether triton imported (``fastgan.triton_support``)."""
    return triton_support.IMPORT_ERROR is None


def set_meta_runs_triton(enabled: bool) -> bool:
    """Let ``meta`` tensors take the Triton path (while launches are recorded); returns the
    previous setting."""
    global _meta_runs_triton
    previous, _meta_runs_triton = _meta_runs_triton, enabled
    return previous


def _triton_runs(device_type: str) -> bool:
    return triton_available() and (
        device_type == "cuda" or (device_type == "cpu" and interpreter_enabled())
        or (device_type == "meta" and _meta_runs_triton))


def _without_extension(device_type: str, compiling: bool) -> str:
    """What ``auto`` runs where the extension cannot: the Triton kernels where they run
    (never while torch.compile traces), else the reference."""
    return "triton" if not compiling and _triton_runs(device_type) else "torch"


def _check_triton_can_run(device_type: str, source: str) -> None:
    """Raise the clear error of a forced ``triton`` backend that cannot run here."""
    if not triton_available():
        raise RuntimeError(f"backend 'triton' (from {source}) needs the triton package, which "
                           f"could not be imported: {triton_support.IMPORT_ERROR}")
    if not _triton_runs(device_type):
        raise RuntimeError(
            f"backend 'triton' (from {source}) cannot run a {device_type} tensor: Triton "
            "kernels need a CUDA tensor, or TRITON_INTERPRET=1 set before triton is "
            "imported for CPU tensors")


_FALLBACK_NAMES = {"triton": "the Triton kernels", "torch": "the torch reference"}


def _choose(device_type: str, compiling: bool, warn: bool) -> str:
    """The implementation for a tensor of ``device_type`` under the backend in force."""
    name, source = get_backend()
    if name == "torch":
        return "torch"
    if name == "triton":
        _check_triton_can_run(device_type, source)
        return "triton"
    if name == "auto" and not compiling and _triton_runs(device_type):
        return "triton"
    if ext.available(device_type):
        return "ext"
    fallback = _without_extension(device_type, compiling)
    if name == "ext" and warn and device_type not in _ext_warned:
        _ext_warned.add(device_type)
        warnings.warn(f"fastgan: backend 'ext' (from {source}) cannot run {device_type} "
                      f"tensors: {ext.reason(device_type)}; running {_FALLBACK_NAMES[fallback]} "
                      "instead", RuntimeWarning)
    return fallback


def _traced_choice(device_type: str) -> str:
    """The choice while torch.compile traces: made once, when traced, and kept as a constant
    of the compiled code (the rule's caches and warning stay out of the graph)."""
    return _choose(device_type, compiling=True, warn=True)


# What ``torch.compiler.assume_constant_result`` does to a function, without importing
# torch._dynamo first as the decorator does (a second of start-up for every process);
# tests/test_compile.py checks that fastgan layers still compile into one graph.
_traced_choice._dynamo_marked_constant = True


def implementation(x: torch.Tensor) -> str:
    """``'triton'``, ``'ext'`` or ``'torch'``: which implementation runs for tensor ``x``.
    Raises for a forced ``triton`` backend that cannot run ``x``; never for ``ext``."""
    if torch.compiler.is_compiling():
        return _traced_choice(x.device.type)
    return _choose(x.device.type, compiling=False, warn=True)


def implementation_without_extension(x: torch.Tensor) -> str:
    """``'triton'`` or ``'torch'``: what the rule runs for tensor ``x`` where the extension
    cannot (for an op its kernels lack), as for a device the extension does not support."""
    return _without_extension(x.device.type, torch.compiler.is_compiling())


def use_triton(x: torch.Tensor) -> bool:
    """Whether the Triton kernels (compiled or interpreted) run for tensor ``x``."""
    return implementation(x) == "triton"


def record_launch(kernel: str) -> None:
    """Count one launch of ``kernel`` (called by every launcher; nothing while torch.compile
    traces, as compiled graphs launch without Python)."""
    if torch.compiler.is_compiling():
        return
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


def _describe(device_type: str) -> tuple[str, str]:
    """What runs for ``device_type`` tensors, and ``'in use'`` or why the extension is not."""
    name, source = get_backend()
    try:
        chosen = _choose(device_type, compiling=False, warn=False)
    except RuntimeError:
        return ("error: backend 'triton' needs CUDA tensors or TRITON_INTERPRET=1",
                f"not used: backend forced to 'triton' (from {source})")
    if chosen == "ext":
        return "compiled extension (torch.ops.fastgan)", "in use"
    reason = ext.reason(device_type)
    if reason is None:
        if name in ("torch", "triton"):
            reason = f"backend forced to '{name}' (from {source})"
        elif device_type == "cuda":
            reason = ("auto runs the Triton kernels on CUDA (the extension's CUDA kernels run "
                      "when forced: FASTGAN_BACKEND=ext)")
        else:
            reason = "TRITON_INTERPRET=1 asks for the Triton kernels"
    if chosen == "torch":
        if name == "torch":
            what = "torch reference (backend forced to 'torch')"
        elif not triton_available():
            what = f"torch reference (triton cannot be imported: {triton_support.IMPORT_ERROR})"
        else:
            what = ("torch reference (no kernels can run these tensors here; "
                    "TRITON_INTERPRET=1 runs the Triton kernels on CPU)")
    elif device_type == "cuda":
        what = ("Triton kernels, compiled" if torch.cuda.is_available()
                else "Triton kernels, compiled (would run; no CUDA device here)")
    else:
        what = "Triton kernels in the interpreter (TRITON_INTERPRET=1)"
    return what, f"not used: {reason}"


def backend_info() -> dict:
    """What runs for CUDA and CPU tensors (``cuda_tensors``, ``cpu_tensors``) and why, and
    for each whether the compiled extension is used or why not (``cuda_extension``,
    ``cpu_extension``: ``'in use'`` or ``'not used: <one line>'``), the triton version (or
    None, and ``triton_error``: why it could not be imported), and ``<op>_choices`` for every
    op that chooses per problem by measurement (``conv2d_act_choices``,
    ``fastgan.ops.conv_choice``)."""
    name, source = get_backend()
    cuda_tensors, cuda_extension = _describe("cuda")
    cpu_tensors, cpu_extension = _describe("cpu")
    info = {
        "backend": name,
        "backend_source": source,
        "torch": torch.__version__,
        "triton": triton_support.VERSION,
        "triton_error": triton_support.IMPORT_ERROR,
        "triton_interpreter": interpreter_enabled(),
        "extension": ext.status()["library"],
        "cuda_available": torch.cuda.is_available(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cuda_tensors": cuda_tensors,
        "cuda_extension": cuda_extension,
        "cpu_tensors": cpu_tensors,
        "cpu_extension": cpu_extension,
    }
    for op, report in sorted(_choice_reporters.items()):
        info[f"{op}_choices"] = report()
    return info
