"""Which ``conv2d_act`` forward runs, per problem, by measurement in this process
(docs/design.md section 8).

The candidates (``PATHS``): ``triton`` (the fused implicit-GEMM kernel), ``cudnn``
(``F.conv2d`` without bias, then the fused ``bias_act``) and ``plain`` (eager PyTorch,
``fastgan.reference.conv2d_act``: cuDNN's conv with its bias, the activation as torch ops,
autograd's own backward). On CUDA the first call of a new problem runs each candidate as a
training step will (its forward, then the backward to every input that wants a gradient) and
measures the median per call of

* GPU time: CUDA events around each call, with the stream held back (``torch.cuda._sleep``)
  until every call is enqueued, so the events see the GPU's work and none of the host's;
* host time: wall-clock of enqueuing the call, with no synchronization.

An eager step pays the larger of the two, a step replayed as a CUDA graph only the GPU time, so
each problem keeps two answers: the smallest ``max(gpu, host)`` for eager calls and the
smallest GPU time for calls inside ``graph_mode()`` (which ``fastgan.cuda_graphs.GraphedStep``
enters for its warm-up and capture). Ties go to the earlier path of ``PATHS``.

Rules:

* **Local to the process**, as ``torch.backends.cudnn.benchmark`` is: no collective, no file
  or message shared with other ranks decides anything. Ranks of one run may choose different
  paths for the same problem; data-parallel training stays consistent because every rank
  applies the same all-reduced gradient (the paths agree up to rounding).
* **Fixed path, nothing timed** (``FIXED_PATH``, ``cudnn``: cuDNN's convolution, which
  follows torch's determinism settings, and the fused ``bias_act``) under
  ``torch.use_deterministic_algorithms(True)`` -- two identical runs then give identical
  bits -- and for a problem first met during CUDA graph capture, where nothing can be timed.
* **Never a crash**: a candidate that raises while it is timed (out of memory, a compile
  error) is dropped, with one warning per path; if every candidate fails, the problem takes
  ``FIXED_PATH`` untimed.
* ``FASTGAN_CONV=auto|triton|cudnn|plain`` forces one path everywhere (``auto``, the
  default, chooses). Each raw value is parsed once.
* ``FASTGAN_CONV_CACHE=file.json`` keeps the measurements across processes, keyed by the
  problem's name (which holds the GPU model and the torch, cuDNN and triton versions), each
  entry with a hash of fastgan's kernel sources: an entry timed with other kernels is timed
  again. Writers merge under a lock file and replace the file atomically, so concurrent
  processes lose no entry and never leave a torn file; a file that cannot be written is
  warned about once and the run goes on.

``backend_info()['conv2d_act_choices']`` lists every problem with its measurements, or why it
was not timed.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import math
import os
import statistics
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from fastgan.backend import register_choice_reporter
from fastgan.files import atomic_write
from fastgan.triton_support import VERSION as TRITON_VERSION

try:
    import fcntl
except ImportError:  # Windows: writers are not serialized (each write is still atomic)
    fcntl = None

PATHS = ("triton", "cudnn", "plain")
FIXED_PATH = "cudnn"
WARMUP_CALLS = 3   # after one first call that compiles, autotunes and lets cuDNN benchmark
TIMED_CALLS = 15

_lock = threading.Lock()                    # held while any problem is decided
_paths: dict[tuple, tuple[str, str]] = {}   # key -> (eager answer, graph answer)
_entries: dict[str, dict] = {}              # problem name -> its report entry
_file_entries: dict[str, dict] = {}         # cache file -> its raw entries, read once
_forced: dict[str, str] = {}                # raw FASTGAN_CONV -> its parse
_cache_files: dict[str, str | None] = {}    # raw FASTGAN_CONV_CACHE -> its parse
_warned: set[str] = set()                   # warnings given once
_graph_depth = 0
_graph_lock = threading.Lock()


@dataclass(frozen=True)
class Problem:
    """A problem to decide. ``name`` identifies it in the cache file and ``backend_info()``;
    ``candidates()`` returns ``{path: a call running that implementation once}`` for every
    path of ``PATHS``, on the CUDA ``device``."""
    name: str
    device: torch.device
    candidates: Callable[[], dict[str, Callable[[], object]]]


def forced_path() -> str:
    """``FASTGAN_CONV``: ``auto`` (default), or a path of ``PATHS`` forced everywhere."""
    raw = os.environ.get("FASTGAN_CONV", "")
    value = _forced.get(raw)
    if value is None:
        value = raw.strip().lower() or "auto"
        if value not in ("auto", *PATHS):
            raise ValueError(f"FASTGAN_CONV must be 'auto', 'triton', 'cudnn' or 'plain', got "
                             f"{raw!r}")
        _forced[raw] = value
    return value


def cache_file() -> str | None:
    """``FASTGAN_CONV_CACHE``: the JSON file keeping the measurements, or None."""
    raw = os.environ.get("FASTGAN_CONV_CACHE", "")
    if raw not in _cache_files:
        _cache_files[raw] = os.path.expanduser(raw.strip()) or None
    return _cache_files[raw]


@contextlib.contextmanager
def graph_mode():
    """Within this context calls run as part of a CUDA graph (its warm-up or capture), which
    pays GPU time only: choices are the fastest on the GPU. Process-wide (a count, so it nests
    and holds in every thread)."""
    global _graph_depth
    with _graph_lock:
        _graph_depth += 1
    try:
        yield
    finally:
        with _graph_lock:
            _graph_depth -= 1


def timing_allowed() -> bool:
    """Whether problems may be timed: not under ``torch.use_deterministic_algorithms(True)``."""
    return not torch.are_deterministic_algorithms_enabled()


def cached_path(key: tuple) -> str | None:
    """The path decided for the problem ``key`` in the current mode (eager or
    ``graph_mode()``), or None when the problem has not been decided yet."""
    paths = _paths.get(key)
    return None if paths is None else paths[_graph_depth > 0]


def decide(key: tuple, problem: Problem) -> str:
    """Decide the problem ``key`` (see the module docstring), remember the answer and return
    the path for the current mode."""
    with _lock:
        if key not in _paths:  # another thread may have decided it meanwhile
            entry = _resolve(problem)
            _entries[problem.name] = entry
            _paths[key] = (entry["eager"], entry["graph"])
    return cached_path(key)


def clear_choices() -> None:
    """Forget every decision held in memory and every cache file read (files stay as they
    are)."""
    with _lock:
        _paths.clear()
        _entries.clear()
        _file_entries.clear()


def _report() -> dict:
    with _lock:
        return {"mode": forced_path(), "timing": "on" if timing_allowed() else
                "off (torch.use_deterministic_algorithms): every problem runs " + FIXED_PATH,
                "cache_file": cache_file(), "graph_mode": _graph_depth > 0,
                "fixed_path": FIXED_PATH, "choices": copy.deepcopy(_entries)}


register_choice_reporter("conv2d_act", _report)


def _resolve(problem: Problem) -> dict:
    """The entry for a new problem: untimed, read from the cache file or timed."""
    if _capturing():
        return _untimed("first met during CUDA graph capture, where nothing can be timed")
    path = cache_file()
    if path is not None:
        if path not in _file_entries:
            _file_entries[path] = read_cache_file(path)
        known = _entry_from_file(_file_entries[path].get(problem.name))
        if known is not None:
            return dict(known, source="file")
    entry = _timed(problem)
    if path is not None and "gpu_ms" in entry:  # not a problem every candidate failed on
        _file_entries[path][problem.name] = entry
        write_cache_file(path, problem.name, entry)
    return {"source": "timed", **entry}


def _timed(problem: Problem) -> dict:
    """Measure every candidate of ``problem``; its entry without a source. A candidate that
    raises is dropped (one warning per path), as is its memory."""
    gpu_ms, host_ms, failed = {}, {}, {}
    for name, run in problem.candidates().items():
        try:
            gpu_ms[name], host_ms[name] = _measure(run, problem.device)
        except Exception as e:  # out of memory, a compile error: never the op's crash
            failed[name] = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            _warn_once(f"path {name}", f"fastgan: conv2d_act's {name} path failed while it was "
                       f"timed for {problem.name} and is not used there: {failed[name]}")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    if not gpu_ms:
        return dict(_untimed("every candidate failed while it was timed"), failed=failed)
    return dict(_entry(gpu_ms, host_ms), **({"failed": failed} if failed else {}))


def _entry(gpu_ms: dict[str, float], host_ms: dict[str, float]) -> dict:
    """Both answers from per-call medians (milliseconds) of the paths measured, and the
    hash of the kernel sources they were measured with."""
    paths = [p for p in PATHS if p in gpu_ms]
    return {"eager": min(paths, key=lambda p: max(gpu_ms[p], host_ms[p])),
            "graph": min(paths, key=lambda p: gpu_ms[p]),
            "gpu_ms": {p: gpu_ms[p] for p in paths}, "host_ms": {p: host_ms[p] for p in paths},
            "sources": kernel_sources_hash()}


def _entry_from_file(raw) -> dict | None:
    """The entry for ``raw`` read from a cache file (answers recomputed from the
    measurements), or None unless it was measured with these kernel sources and has a finite
    ``gpu_ms`` and ``host_ms`` >= 0 for each of the paths it lists."""
    try:
        if raw["sources"] != kernel_sources_hash():
            return None
        paths = [p for p in PATHS if p in raw["gpu_ms"]]
        gpu_ms = {p: float(raw["gpu_ms"][p]) for p in paths}
        host_ms = {p: float(raw["host_ms"][p]) for p in paths}
    except (TypeError, KeyError, ValueError):
        return None
    values = (*gpu_ms.values(), *host_ms.values())
    if not paths or not all(math.isfinite(v) and v >= 0 for v in values):
        return None
    return _entry(gpu_ms, host_ms)


@functools.cache
def kernel_sources_hash() -> str:
    """12 hex digits of the SHA-256 of fastgan's op sources (``fastgan/ops/*.py``): what the
    measurements in a cache file were taken with."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


@functools.lru_cache(maxsize=None)
def environment(device_index: int) -> str:
    """The GPU model of ``cuda:device_index`` and the library versions that decide which
    implementation is fastest: part of every problem's name."""
    return (f"{torch.cuda.get_device_name(device_index)} | torch {torch.__version__} "
            f"cudnn {torch.backends.cudnn.version()} triton {TRITON_VERSION}")


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _untimed(reason: str) -> dict:
    return {"eager": FIXED_PATH, "graph": FIXED_PATH, "source": "untimed", "reason": reason}


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _measure(run: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """Median GPU and host milliseconds per call of ``run`` on ``device``'s current stream."""
    with torch.cuda.device(device):
        run()  # compiles, autotunes, lets cuDNN benchmark: outside the measured calls
        host = []
        for _ in range(WARMUP_CALLS):
            start = time.perf_counter()
            run()
            host.append(time.perf_counter() - start)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(TIMED_CALLS)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(TIMED_CALLS)]
        torch.cuda.synchronize()
        # Hold the stream for twice the expected enqueuing time (at least 1 ms), so the GPU
        # runs the calls back to back after the host has queued them all.
        hold_ms = max(1.0, 2e3 * TIMED_CALLS * statistics.median(host))
        torch.cuda._sleep(int(hold_ms * _sleep_cycles_per_ms(torch.cuda.current_device())))
        host.clear()
        for start_event, end_event in zip(starts, ends):
            start_event.record()
            start = time.perf_counter()
            run()
            host.append(time.perf_counter() - start)
            end_event.record()
        torch.cuda.synchronize()
    gpu = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    return statistics.median(gpu), 1e3 * statistics.median(host)


@functools.lru_cache(maxsize=None)
def _sleep_cycles_per_ms(device_index: int) -> float:
    """Cycles of ``torch.cuda._sleep`` per millisecond on the current device (measured once)."""
    cycles = 10_000_000
    start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
    torch.cuda._sleep(1000)
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / start.elapsed_time(end)


def read_cache_file(path: str) -> dict:
    """The entries saved in ``path`` (an empty dict if it is missing or unreadable)."""
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def _file_lock(path: str):
    """Hold an exclusive lock on ``path + '.lock'`` (where ``fcntl`` exists) while writers
    read, merge and replace ``path``."""
    if fcntl is None:
        yield
        return
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def write_cache_file(path: str, name: str, entry: dict) -> None:
    """Merge ``entry`` under ``name`` into the JSON file ``path``: under the lock, read the
    file as it is now, add the entry, replace the file atomically. A file that cannot be
    written is warned about once; nothing is raised."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(path):
            data = read_cache_file(path)
            data[name] = entry
            text = json.dumps(data, indent=1, sort_keys=True)
            atomic_write(path, lambda f: f.write(text.encode()))
    except OSError as e:
        _warn_once(f"file {path}", f"fastgan: FASTGAN_CONV_CACHE={path} cannot be written "
                   f"({e}); measurements are kept in memory for this process only")
