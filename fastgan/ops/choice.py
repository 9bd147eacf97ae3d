"""Per-problem choice among implementations by measurement (docs/design.md section 8).

One mechanism serves two kinds of choice, each a ``Choices`` with its own candidate paths:

* ``conv2d_act`` (this module's functions ``decide``, ``cached_path``, ``clear_choices``):
  ``triton`` (the fused implicit-GEMM kernel), ``cudnn`` (``F.conv2d`` without bias, then
  the fused ``bias_act``) and ``plain`` (eager PyTorch, ``fastgan.reference.conv2d_act``:
  cuDNN's conv with its bias, the activation as torch ops, autograd's own backward);
* the memory-bound ops on CUDA with backend ``auto`` and the compiled extension usable
  (``OP_CHOICES``, one ``OpChoices`` per op): ``triton`` (the Triton kernel) or ``ext``
  (``torch.ops.fastgan``), per kernel, dtype, layout class and size bucket (``op_key``).

On CUDA the first call of a new problem runs each candidate as a training step will (a conv:
its forward, then the backward to every input that wants a gradient; an op: the kernel call)
and measures the median per call of

* GPU time: CUDA events around each call, with the stream held back (``torch.cuda._sleep``)
  until every call is enqueued, so the events see the GPU's work and none of the host's;
* host time: wall-clock of enqueuing the call, with no synchronization.

An eager step pays the larger of the two, a step replayed as a CUDA graph only the GPU time, so
each problem keeps two answers: the smallest ``max(gpu, host)`` for eager calls and the
smallest GPU time for calls inside ``graph_mode()`` (which ``fastgan.cuda_graphs.GraphedStep``
enters for its warm-up and capture). Timing allocates nothing beyond the candidates' own work
(no cache-flush buffer). Ties go to the earlier path (``PATHS``, ``OP_PATHS``).

* ``FASTGAN_CONV=auto|triton|cudnn|plain`` forces one conv implementation everywhere
  (``auto``, the default, chooses); ``FASTGAN_BACKEND`` (``fastgan.backend``) forces the ops'.
  Each raw value is parsed once.
* ``FASTGAN_CONV_CACHE=file.json`` keeps the measurements of both kinds across processes,
  keyed by the problem's name, which includes the GPU model and the torch, cuDNN and triton
  versions: a file from another machine or version matches nothing.
* With ``torch.distributed`` initialized and several ranks, rank 0 decides (from its file or
  by timing) and broadcasts its answer, so every rank runs the same implementation. A call
  that not every rank may make (one without gradients: sampling on rank 0 alone, say) is not
  timed there: it runs the untimed path (``triton``).
* Nothing is timed during CUDA graph capture: a problem first met there runs ``triton``.
* A call made by a candidate being timed (the ``cudnn`` candidate's ``bias_act``) runs
  ``triton`` and decides nothing: its problem is decided when a real call meets it, so every
  rank meets the same problems in the same order.

Untimed problems keep ``triton`` for the rest of the process; ``backend_info()`` lists every
problem with its measurements, or why it was not timed (``conv2d_act_choices``,
``bias_act_choices``, ``grad_sq_norm_choices``).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import os
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import triton

from fastgan.backend import get_backend, implementation, register_choice_reporter
from fastgan.files import atomic_write

PATHS = ("triton", "cudnn", "plain")  # conv2d_act's candidates
OP_PATHS = ("triton", "ext")          # the memory-bound ops' candidates
UNTIMED_PATH = "triton"
WARMUP_CALLS = 3   # after one first call that compiles, autotunes and lets cuDNN benchmark
TIMED_CALLS = 15

_lock = threading.Lock()                   # held while any problem is decided
_file_entries: dict[str, dict] = {}        # cache file -> its raw entries, read once
_forced: dict[str, str] = {}               # raw FASTGAN_CONV -> its parse
_cache_files: dict[str, str | None] = {}   # raw FASTGAN_CONV_CACHE -> its parse
_all_choices: list[Choices] = []
_graph_depth = 0
_graph_lock = threading.Lock()
_timing = False                            # candidates are being timed (under _lock)


@dataclass(frozen=True)
class Problem:
    """A problem to decide. ``name`` identifies it in the cache file and ``backend_info()``;
    ``candidates()`` returns ``{path: a call running that implementation once}`` for every
    candidate path, on the CUDA ``device``; ``shared``: every rank of a distributed run
    makes this call at the same point (a call with gradients, in a training step)."""
    name: str
    device: torch.device
    candidates: Callable[[], dict[str, Callable[[], object]]]
    shared: bool


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


class Choices:
    """The decisions of one op among its candidate ``paths`` (see the module docstring):
    ``(eager answer, graph answer)`` per key, and per problem name the entry that
    ``backend_info()[f'{op}_choices']`` lists. ``mode()``: the setting in force (``auto`` or
    the forced path), for that report."""

    def __init__(self, op: str, paths: tuple[str, ...], mode: Callable[[], str]):
        self.op, self.paths, self.mode = op, paths, mode
        self._paths: dict[tuple, tuple[str, str]] = {}
        self._entries: dict[str, dict] = {}
        _all_choices.append(self)
        register_choice_reporter(op, self.report)

    def cached_path(self, key: tuple) -> str | None:
        """The path decided for the problem ``key`` in the current mode (eager or
        ``graph_mode()``), or None when the problem has not been decided yet."""
        paths = self._paths.get(key)
        return None if paths is None else paths[_graph_depth > 0]

    def decide(self, key: tuple, problem: Problem) -> str:
        """Decide the problem ``key`` (see the module docstring), remember the answer and
        return the path for the current mode; a call made while candidates are timed gets
        ``UNTIMED_PATH`` and decides nothing."""
        if _timing:
            return UNTIMED_PATH
        with _lock:
            if key not in self._paths:  # another thread may have decided it meanwhile
                entry = self._resolve(problem)
                self._entries[problem.name] = entry
                self._paths[key] = (entry["eager"], entry["graph"])
        return self.cached_path(key)

    def clear(self) -> None:
        with _lock:
            self._paths.clear()
            self._entries.clear()

    def report(self) -> dict:
        with _lock:
            return {"mode": self.mode(), "cache_file": cache_file(),
                    "graph_mode": _graph_depth > 0, "untimed_path": UNTIMED_PATH,
                    "choices": copy.deepcopy(self._entries)}

    def _resolve(self, problem: Problem) -> dict:
        """The entry for a new problem: untimed, received from rank 0, read from the cache
        file or timed."""
        if _capturing():
            return _untimed("first met during CUDA graph capture, where nothing can be timed")
        world_size = _world_size()
        if world_size > 1 and not problem.shared:
            return _untimed(f"{world_size} ranks and a call not known to be made by every "
                            "rank (no gradients), so rank 0 cannot decide for all")
        if world_size > 1 and dist.get_rank() != 0:
            box = [None]
            dist.broadcast_object_list(box, src=0)
            if box[0] is None:
                raise RuntimeError(f"rank 0 failed to decide {self.op}'s path for "
                                   f"{problem.name} (its log has the error)")
            return dict(box[0], source="rank 0")
        try:
            entry = self._read_or_time(problem)
        except BaseException:
            if world_size > 1:
                dist.broadcast_object_list([None], src=0)  # the other ranks wait for an answer
            raise
        if world_size > 1:
            dist.broadcast_object_list([entry], src=0)
        return entry

    def _read_or_time(self, problem: Problem) -> dict:
        """The entry the cache file holds for ``problem``, else a new measurement (added to
        the file)."""
        path = cache_file()
        if path is None:
            return dict(self._timed(problem), source="timed")
        if path not in _file_entries:
            _file_entries[path] = read_cache_file(path)
        known = self._entry_from_file(_file_entries[path].get(problem.name))
        if known is not None:
            return dict(known, source="file")
        entry = _file_entries[path][problem.name] = self._timed(problem)
        write_cache_file(path, problem.name, entry)
        return dict(entry, source="timed")

    def _timed(self, problem: Problem) -> dict:
        """Measure every candidate of ``problem``; its entry without a source."""
        global _timing
        gpu_ms, host_ms = {}, {}
        _timing = True
        try:
            for name, run in problem.candidates().items():
                gpu_ms[name], host_ms[name] = _measure(run, problem.device)
        finally:
            _timing = False
        return self._entry(gpu_ms, host_ms)

    def _entry(self, gpu_ms: dict[str, float], host_ms: dict[str, float]) -> dict:
        """Both answers from per-call medians (milliseconds) of every path."""
        paths = self.paths
        return {"eager": min(paths, key=lambda p: max(gpu_ms[p], host_ms[p])),
                "graph": min(paths, key=lambda p: gpu_ms[p]),
                "gpu_ms": {p: gpu_ms[p] for p in paths}, "host_ms": {p: host_ms[p] for p in paths}}

    def _entry_from_file(self, raw) -> dict | None:
        """The entry for ``raw`` read from a cache file (answers recomputed from the
        measurements), or None unless it has a finite ``gpu_ms`` and ``host_ms`` >= 0 for
        every path."""
        try:
            gpu_ms = {p: float(raw["gpu_ms"][p]) for p in self.paths}
            host_ms = {p: float(raw["host_ms"][p]) for p in self.paths}
        except (TypeError, KeyError, ValueError):
            return None
        if not all(math.isfinite(v) and v >= 0 for v in (*gpu_ms.values(), *host_ms.values())):
            return None
        return self._entry(gpu_ms, host_ms)


class OpChoices(Choices):
    """``triton`` or ``ext`` for the kernels of one memory-bound op, per ``op_key``."""

    def __init__(self, op: str):
        super().__init__(op, OP_PATHS, lambda: get_backend()[0])

    def call(self, kernel: str, x: torch.Tensor, layout: str, variant: str, shared: bool,
             implementations: dict[str, Callable], args: tuple):
        """Run ``kernel`` on ``args`` (``x`` among them): ``implementations['ext']`` where
        the backend rule picks the extension for ``x``, and where it says ``'timed'`` the
        path decided for the call's ``op_key`` (decided now if it is new); else
        ``implementations['triton']``. Once decided: a tuple and one dict lookup."""
        chosen = implementation(x)
        if chosen == "timed" and x.numel():
            key = op_key(kernel, x, layout, variant, shared)
            chosen = self.cached_path(key) or self.decide_op(key, x.device, implementations,
                                                             args)
        return implementations["ext" if chosen == "ext" else "triton"](*args)

    def decide_op(self, key: tuple, device: torch.device,
                  implementations: dict[str, Callable], args: tuple) -> str:
        """``decide`` for the ``op_key`` ``key`` of a call on ``device``: its candidates are
        ``implementations[path](*args)`` for ``path`` in ``OP_PATHS``."""
        kernel, device_index, dtype, layout, bucket, variant, shared = key
        name = " ".join(
            [kernel, str(dtype)[6:], layout, f"numel 2^{bucket - 1}..2^{bucket}"]
            + ([variant] if variant else [])
            + ["every rank" if shared else "maybe one rank", "|", environment(device_index)])

        def candidates():
            return {path: functools.partial(implementations[path], *args) for path in OP_PATHS}

        return self.decide(key, Problem(name, device, candidates, shared))


def shared_call(*tensors) -> bool:
    """Whether a call on ``tensors`` (None allowed) is one every rank makes: grad mode is on
    and one of them requires a gradient (a training step's; see ``Problem``)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def op_key(kernel: str, x: torch.Tensor, layout: str, variant: str, shared: bool) -> tuple:
    """The problem of a call of ``kernel`` on ``x``, as a tuple (cheap to build and hash):
    the kernel, ``x``'s device index and dtype, the layout class ``layout``, the size bucket
    ``x.numel().bit_length()`` (``b``: ``2**(b-1) <= numel < 2**b``), what else changes
    the work (``variant``, e.g. whether a bias gradient is summed) and ``shared`` (see
    ``Problem``). The GPU model and library versions are in the problem's name."""
    return (kernel, x.get_device(), x.dtype, layout, x.numel().bit_length(), variant, shared)


OP_CHOICES = {op: OpChoices(op) for op in ("bias_act", "grad_sq_norm")}


_CONV_CHOICES = Choices("conv2d_act", PATHS, forced_path)
cached_path = _CONV_CHOICES.cached_path
decide = _CONV_CHOICES.decide
_report_choices = _CONV_CHOICES.report


@functools.lru_cache(maxsize=None)
def environment(device_index: int) -> str:
    """The GPU model of ``cuda:device_index`` and the library versions that decide which
    implementation is fastest: part of every problem's name."""
    return (f"{torch.cuda.get_device_name(device_index)} | torch {torch.__version__} "
            f"cudnn {torch.backends.cudnn.version()} triton {triton.__version__}")


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _untimed(reason: str) -> dict:
    return {"eager": UNTIMED_PATH, "graph": UNTIMED_PATH, "source": "untimed", "reason": reason}


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


def write_cache_file(path: str, name: str, entry: dict) -> None:
    """Merge ``entry`` under ``name`` into the JSON file ``path`` atomically."""
    data = read_cache_file(path)
    data[name] = entry
    text = json.dumps(data, indent=1, sort_keys=True)
    atomic_write(path, lambda f: f.write(text.encode()))


def clear_choices() -> None:
    """Forget every decision held in memory, of every op, and every cache file read (files
    stay as they are)."""
    for choices in _all_choices:
        choices.clear()
    with _lock:
        _file_entries.clear()
