"""fastgan's optional compiled extension: find it, load it, say why it is not usable; build it.

The extension (sources in ``kernels/``; docs/design.md) registers six operators with
PyTorch's dispatcher, with CPU kernels and, when built with CUDA, CUDA kernels (all but
``upfirdn2d`` and ``bias_act_grad_from_input``, which have CPU kernels only; the CUDA kernels
of ``bias_act`` run linear, relu and lrelu only):

* ``torch.ops.fastgan.bias_act(x, b, dim, act, alpha, gain, clamp, scale)``:
  ``clamp(act(x * scale + b) * gain)``, the layout of ``x``;
* ``torch.ops.fastgan.bias_act_grad(dy, y, dim, act, alpha, gain, clamp, scale, need_db)``:
  ``(dx, db)`` from the output ``y`` (linear, relu, lrelu); ``db`` is None unless ``need_db``;
* ``torch.ops.fastgan.bias_act_grad_from_input(dy, x, b, dim, act, alpha, gain, clamp, scale,
  scale_dx, need_db)``: the same from the input (the curved activations);
* ``torch.ops.fastgan.per_sample_dot(a, b)``: ``[N]``, ``sum(a[n] * b[n])`` in float32
  (float64 for float64);
* ``torch.ops.fastgan.scale_per_sample(x, s)``: ``x[n] * s[n]``;
* ``torch.ops.fastgan.upfirdn2d(x, f, up_x, up_y, down_x, down_y, pad_x0, pad_x1, pad_y0,
  pad_y1, flip_filter, gain)``: StyleGAN2-ADA's ``upfirdn2d`` (``f`` None: identity), in the
  memory format of ``x``.

It is found, in this order, as the module ``fastgan._C_<cpu>`` that
``FASTGAN_BUILD_EXT=1 pip install --no-build-isolation -e .`` compiles, or in the cache folder
that ``python -m fastgan build-ext`` (``build()``) compiles into. ``<cpu>`` is the CPU
capability the build was compiled for (``cpu_capability()`` of the building machine:
``avx2`` or ``base``); an ``avx2`` build is refused, unloaded, on a CPU without AVX2, where
its code would crash. Importing this module loads nothing; the first ``available()``,
``reason()``, ``ops()`` or ``status()`` call loads the extension (it never builds it), runs
the fake-kernel registrars the op modules gave ``register_fakes()`` and caches the outcome.
Nothing here raises except ``build()``. This module imports nothing from fastgan but
``fastgan.files`` (docs/design.md section 2).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import shutil
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

# setup.py runs this file on its own (before fastgan's dependencies may be installed) for
# sources(), build_flags() and build_with_cuda(): fastgan modules are imported where used.

KERNELS_DIR = Path(__file__).resolve().parent.parent / "kernels"
LIBRARY_NAME = "fastgan_ext"
BUILD_COMMAND = "python -m fastgan build-ext"


@dataclass(frozen=True)
class _State:
    library: str | None  # the loaded shared library
    cpu: str | None  # why the CPU kernels are not usable; None when they are
    cuda: str | None


_state: _State | None = None
_lock = threading.RLock()
_fake_registrars: list[Callable[[], None]] = []


def sources(with_cuda: bool) -> list[Path]:
    """The extension's sources: ``kernels/*.cpp`` and ``kernels/*.cu``, less the CUDA-only
    ``cuda_*`` files (the ``.cu`` kernels and their ATen glue) unless ``with_cuda``."""
    files = sorted(KERNELS_DIR.glob("*.cpp")) + sorted(KERNELS_DIR.glob("*.cu"))
    return [f for f in files if with_cuda or not f.name.startswith("cuda_")]


def _cpu_has_avx2() -> bool:
    """Whether this machine is x86-64 Linux with AVX2, FMA and F16C."""
    if platform.machine() != "x86_64":
        return False
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return {"avx2", "fma", "f16c"} <= flags


def cpu_capability() -> str:
    """What a build on this machine compiles for, and what this CPU can run: ``'avx2'``
    (x86-64 Linux with AVX2, FMA and F16C) or ``'base'`` (at::vec's portable code)."""
    return "avx2" if _cpu_has_avx2() else "base"


def aot_module(capability: str) -> str:
    """The module name of an ahead-of-time build for ``capability``: ``fastgan._C_avx2`` or
    ``fastgan._C_base`` (the name records what the build needs of the CPU)."""
    return f"fastgan._C_{capability}"


def build_flags(with_cuda: bool) -> dict[str, list[str]]:
    """Compiler (``cxx``, ``nvcc``) and linker (``ld``) flags. at::vec gets its AVX2 code
    (``CPU_CAPABILITY_AVX2``, as ATen's own AVX2 kernels) when the compiling machine has AVX2,
    and its portable code otherwise; an AVX2 build runs only on AVX2 CPUs. ``with_cuda``
    defines FASTGAN_WITH_CUDA, which registers the CUDA kernels."""
    openmp = ["-fopenmp"] if sys.platform == "linux" else []  # at::parallel_for's OpenMP
    avx2 = ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    cxx = ["-O3"] + openmp + (avx2 if cpu_capability() == "avx2" else [])
    return {"cxx": cxx + (["-DFASTGAN_WITH_CUDA"] if with_cuda else []), "nvcc": ["-O3"],
            "ld": openmp}


def build_with_cuda() -> bool:
    """Whether a build compiles the CUDA kernels: torch has CUDA and nvcc is found."""
    if torch.version.cuda is None:
        return False
    from torch.utils.cpp_extension import CUDA_HOME
    return CUDA_HOME is not None


def sources_digest() -> str:
    """12 hex digits of the SHA-256 of the kernels/ sources and the build flags: what a build
    is made from."""
    flags = build_flags(with_cuda=False)  # with CUDA, the same plus the CUDA files
    digest = hashlib.sha256(repr(flags).encode())
    for path in sorted(KERNELS_DIR.glob("*")):
        if path.suffix in (".cpp", ".cu", ".h", ".cuh"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def cache_key() -> str:
    """``torch<version>-<cu<version>|cpu>-py<XY>-cxx11abi<0|1>-<avx2|base>-<sources_digest>``:
    a build is loaded only by the torch, Python, CPU kind and sources it was built for."""
    cuda = f"cu{torch.version.cuda}" if torch.version.cuda else "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    abi = f"cxx11abi{int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    return (f"torch{torch.__version__}-{cuda}-{python}-{abi}-{cpu_capability()}-"
            f"{sources_digest()}")


def aot_sources_record(module_path: Path, capability: str) -> Path:
    """The file beside an ahead-of-time build (``_C_<capability>.sources``) in which setup.py
    records its ``sources_digest()``."""
    return module_path.parent / f"_C_{capability}.sources"


# Written by setup.py beside the package's modules when an ahead-of-time build failed.
AOT_BUILD_ERROR = "_C_build_error.txt"


def build_dir() -> Path:
    """Where ``build()`` compiles to: ``fastgan.files.cache_dir() / "ext" / cache_key()``."""
    from fastgan.files import cache_dir
    return cache_dir() / "ext" / cache_key()


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _ninja() -> str | None:
    """The ninja executable: on PATH, or next to this Python (``pip install ninja`` in a venv
    that is not activated)."""
    return shutil.which("ninja") or shutil.which("ninja", path=sysconfig.get_path("scripts"))


def build_blockers() -> list[str]:
    """What a build here lacks: the sources, a C++ compiler, ninja."""
    if not KERNELS_DIR.is_dir():
        return [f"this installation has no kernels/ sources ({KERNELS_DIR}); install fastgan "
                "from a source checkout"]
    compiler = os.environ.get("CXX", "c++")
    missing = []
    if shutil.which(compiler) is None:
        missing.append(f"no C++ compiler ({compiler} is not on PATH; install g++ or set CXX)")
    if _ninja() is None:
        missing.append("no ninja (pip install ninja)")
    return missing


def _not_built_reason() -> str:
    failed = Path(__file__).resolve().parent / AOT_BUILD_ERROR
    try:
        aot = f"the ahead-of-time build failed ({failed.read_text().strip()}); "
    except OSError:
        aot = ""
    blockers = build_blockers()
    if blockers:
        return f"{aot}not built, and it cannot be built here: " + "; ".join(blockers)
    return f"{aot}not built; build it with `{BUILD_COMMAND}`"


def _cuda_reason() -> str | None:
    """Why the loaded library has no CUDA kernels, or None when it has them."""
    if torch._C._dispatch_has_kernel_for_dispatch_key("fastgan::bias_act", "CUDA"):
        return None
    if torch.version.cuda is None:
        return f"torch {torch.__version__} has no CUDA (CPU kernels only)"
    if not build_with_cuda():
        return "no CUDA toolkit (nvcc) to build the CUDA kernels with (CPU kernels only)"
    return f"built without CUDA kernels; rebuild with `{BUILD_COMMAND}`"


def register_fakes(registrar: Callable[[], None]) -> None:
    """Have ``registrar()`` register fake kernels (``torch.library.register_fake``) of some of
    the library's operators once the library is loaded, or now if it is. Each op module
    registers its own, so this module imports nothing from them (docs/design.md section 2)."""
    with _lock:
        _fake_registrars.append(registrar)
        loaded = _state is not None and _state.library is not None
    if loaded:
        registrar()


def _loaded(library: str) -> _State:
    """The state once ``library`` is loaded: fake kernels registered, CUDA checked."""
    try:
        for registrar in _fake_registrars:
            registrar()
    except Exception as e:  # a bug, but callers are promised no exception
        reason = f"its fake kernels failed to register: {_one_line(e)}"
        return _State(library, reason, reason)
    return _State(library, None, _cuda_reason())


def _module_path(name: str) -> Path | None:
    """The file of the installed module ``name`` (found, not imported), or None."""
    spec = importlib.util.find_spec(name)
    return Path(spec.origin) if spec is not None and spec.origin else None


def _candidates() -> tuple[list[tuple[str, Path]], list[str]]:
    """The libraries to try, in order, as ``(origin, path)``: the ahead-of-time builds this
    CPU can run (``avx2`` first), then the just-in-time build; and why others were refused."""
    found, refused = [], []
    here = cpu_capability()
    for capability in ("avx2", "base"):
        name = aot_module(capability)
        path = _module_path(name)
        if path is None:
            continue
        if capability == "avx2" and here != "avx2":
            refused.append(f"{path} ({name}) was built for CPUs with AVX2, FMA and F16C, and "
                           f"this CPU lacks them: not loaded; build for this CPU with "
                           f"`{BUILD_COMMAND}`")
            continue
        stale = _stale_aot_build(path, capability)
        if stale:
            refused.append(f"{path} ({name}) {stale}: not loaded; rebuild it with "
                           f"`FASTGAN_BUILD_EXT=1 pip install --no-build-isolation -e .` or "
                           f"build with `{BUILD_COMMAND}`")
            continue
        found.append((name, path))
    jit = build_dir() / f"{LIBRARY_NAME}.so"
    if jit.is_file():
        found.append((BUILD_COMMAND, jit))
    return found, refused


def _stale_aot_build(path: Path, capability: str) -> str | None:
    """Why the ahead-of-time build at ``path`` was not made from the kernels/ sources of this
    checkout, or None when it was (or when there is no checkout to compare with: an installed
    wheel carries no kernels/)."""
    if not KERNELS_DIR.is_dir():
        return None
    try:
        built_from = aot_sources_record(path, capability).read_text().strip()
    except OSError:
        return "has no record of the sources it was built from (an older fastgan built it)"
    here = sources_digest()
    if built_from != here:
        return (f"was built from other kernels/ sources ({built_from}) than this checkout's "
                f"({here})")
    return None


def _load() -> _State:
    found, errors = _candidates()
    for origin, path in found:
        try:
            torch.ops.load_library(str(path))
        except Exception as e:
            errors.append(f"ABI mismatch: {path} (from {origin}) does not load with torch "
                          f"{torch.__version__}; rebuild it: {_one_line(e)}")
            continue
        return _loaded(str(path))
    reason = errors[0] if errors else _not_built_reason()
    return _State(None, reason, reason)


def _current() -> _State:
    global _state
    state = _state  # set once: read without the lock, as every op call may ask
    if state is not None:
        return state
    with _lock:
        if _state is None:
            try:
                _state = _load()
            except Exception as e:  # e.g. an unreadable cache folder
                reason = f"cannot be loaded: {_one_line(e)}"
                _state = _State(None, reason, reason)
        return _state


def reason(device_type: str) -> str | None:
    """Why the extension's kernels cannot run tensors of ``device_type`` (``'cpu'``,
    ``'cuda'``), in one line; None when they can."""
    state = _current()
    if device_type == "cpu":
        return state.cpu
    if device_type == "cuda":
        return state.cuda
    return f"no kernels for {device_type} tensors (only cpu and cuda)"


def available(device_type: str) -> bool:
    """Whether ``torch.ops.fastgan`` has kernels for ``device_type`` tensors (cheap after the
    first call)."""
    return reason(device_type) is None


def ops():
    """``torch.ops.fastgan`` when the extension is loaded, else None."""
    return torch.ops.fastgan if _current().library is not None else None


def status() -> dict:
    """The loaded library (or None) and, for cpu and cuda, ``'usable'`` or the reason not."""
    state = _current()
    return {"library": state.library, "cpu": state.cpu or "usable",
            "cuda": state.cuda or "usable"}


def build(verbose: bool = True) -> Path:
    """Compile the extension just in time with ninja into ``build_dir()`` (CPU kernels, plus
    CUDA ones when torch has CUDA and the CUDA toolkit is found) and load it; returns the
    library's path. Unchanged sources are not recompiled. Raises RuntimeError saying why when
    it cannot build."""
    global _state
    with _lock:
        blockers = build_blockers()
        if blockers:
            raise RuntimeError("cannot build fastgan's extension: " + "; ".join(blockers))
        target = build_dir()
        if _state is not None and _state.library is not None:
            if Path(_state.library).parent == target:
                return Path(_state.library)
            raise RuntimeError(f"fastgan's extension is already loaded in this process from "
                               f"{_state.library}; run `{BUILD_COMMAND}` in a new process")
        ninja_dir = str(Path(_ninja()).parent)
        if shutil.which("ninja") is None:  # torch runs `ninja` from PATH
            os.environ["PATH"] = ninja_dir + os.pathsep + os.environ.get("PATH", "")
        from torch.utils import cpp_extension
        with_cuda = build_with_cuda()
        flags = build_flags(with_cuda)
        target.mkdir(parents=True, exist_ok=True)
        library = cpp_extension.load(
            name=LIBRARY_NAME, sources=[str(s) for s in sources(with_cuda)],
            extra_cflags=flags["cxx"],
            extra_cuda_cflags=flags["nvcc"], extra_ldflags=flags["ld"],
            build_directory=str(target), verbose=verbose, with_cuda=with_cuda,
            is_python_module=False)
        _state = _loaded(library)
        return Path(library)


def build_command() -> int:
    """``python -m fastgan build-ext``: build, then say where, how long it took and what runs."""
    start = time.perf_counter()
    try:
        library = build(verbose=True)
    except RuntimeError as e:
        print(f"fastgan build-ext: error: {e}", file=sys.stderr)
        return 1
    state = status()
    print(f"fastgan build-ext: {library} ({time.perf_counter() - start:.1f} s); "
          f"cpu kernels: {state['cpu']}; cuda kernels: {state['cuda']}")
    return 0
