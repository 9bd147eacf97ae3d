"""How the harness measures (docs/design.md section 6).

* On CUDA, ``triton.testing.do_bench`` times a callable with CUDA events after warm-up (it also
  flushes L2 before each call) and gives the median and the 20th/80th percentiles.
  Callables too slow for do_bench's fixed 5-call estimate (a block of training iterations)
  use ``time_calls``: a given number of calls, each timed with CUDA events.
* On the CPU (``--device cpu`` and the ``--smoke`` run) the same callables are timed call by
  call with ``time.perf_counter`` (``time_calls``).
* A ``--device cpu`` run makes glibc's malloc keep freed memory (``reuse_freed_memory``), as
  CUDA's caching allocator does, so that CPU rows time the ops and not the kernel's page
  faults (by default glibc maps every block of 32 MiB or more afresh: ~20 ms per 32 MiB).
* Host time (the ``overhead`` case) is ``host_ms``: ``perf_counter`` around blocks of calls
  that never synchronize, the device synchronized between blocks.
* Peak memory is what one call allocates beyond what was allocated before it, read with
  ``torch.cuda.reset_peak_memory_stats`` and ``max_memory_allocated``.
* ``copy_gbps`` is a measured device-to-device copy: bytes read + bytes written / time.

Units: milliseconds, MiB (2**20 bytes) for memory, GB/s (1e9 bytes per second).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

QUANTILES = (0.5, 0.2, 0.8)  # median, p20, p80, in the order the results list them


@dataclass(frozen=True)
class Timing:
    """How long to warm up and measure.

    ``warmup_ms``/``rep_ms`` go to do_bench on CUDA; ``warmup_calls``/``reps`` count calls
    where calls are timed one by one (CPU, and the block-timed cases on CUDA); on the CPU
    the calls go on past ``reps`` until the timed ones add up to ``cpu_min_ms``;
    ``host_blocks`` counts the timed blocks of ``host_ms``.
    """
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    warmup_calls: int = 1
    reps: int = 3
    host_blocks: int = 10
    cpu_min_ms: float = 0.0


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantiles(times_ms: list[float]) -> tuple[float, float, float]:
    times = torch.tensor(times_ms, dtype=torch.float64)
    q = times.quantile(torch.tensor(QUANTILES, dtype=torch.float64))
    return tuple(float(v) for v in q)


def time_calls(fn, device: torch.device, warmup_calls: int, reps: int,
               min_total_ms: float = 0.0) -> tuple[float, float, float]:
    """Median, p20, p80 in ms of at least ``reps`` calls of ``fn``, each timed on its own
    (CUDA events on a GPU, ``perf_counter`` on the CPU), after ``warmup_calls`` untimed calls;
    more calls until the timed ones add up to ``min_total_ms``."""
    for _ in range(warmup_calls):
        fn()
    synchronize(device)
    times = []
    while len(times) < reps or sum(times) < min_total_ms:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(times)


def host_ms(fn, device: torch.device, calls: int, blocks: int) -> tuple[float, float, float]:
    """Median, p20, p80 in ms of the host time of one call of ``fn``: ``blocks`` timed blocks
    of ``calls`` calls each, after one untimed block; a block is timed with ``perf_counter``
    and never synchronizes, and the device is synchronized after it, outside the timed span,
    so every block starts with an empty launch queue. ``fn`` must already be warm."""
    if calls < 1 or blocks < 1:
        raise ValueError(f"calls and blocks must be >= 1, got {calls} and {blocks}")
    times = []
    for block in range(blocks + 1):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        elapsed = time.perf_counter() - start
        synchronize(device)
        if block:
            times.append(elapsed * 1e3 / calls)
    return _quantiles(times)


def time_ms(fn, device: torch.device, timing: Timing) -> tuple[float, float, float]:
    """Median, p20, p80 in ms of one call of ``fn``: do_bench on CUDA, ``time_calls`` on
    the CPU. ``fn`` must already be warm (compiled, autotuned)."""
    if device.type != "cuda":
        return time_calls(fn, device, timing.warmup_calls, timing.reps, timing.cpu_min_ms)
    import triton.testing

    result = triton.testing.do_bench(fn, warmup=timing.warmup_ms, rep=timing.rep_ms,
                                     quantiles=list(QUANTILES))
    return tuple(float(v) for v in result)


def peak_memory_mb(fn, device: torch.device) -> float | None:
    """MiB that one call of ``fn`` allocates at its peak beyond what was allocated before it
    (its inputs, weights and the saved graphs of other input sets are not counted); ``None``
    off CUDA, where torch keeps no such statistic."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return (peak - before) / 2**20


def copy_gbps(device: torch.device, timing: Timing, nbytes: int) -> float:
    """Measured copy bandwidth in GB/s: a ``nbytes`` float32 tensor copied into another,
    counting the bytes read and the bytes written."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    fn = lambda: dst.copy_(src)  # noqa: E731
    fn()
    median_ms, _, _ = time_ms(fn, device, timing)
    return 2 * src.numel() * 4 / (median_ms * 1e-3) / 1e9


def device_name(device: torch.device) -> str:
    """The GPU's name as torch reports it, or ``'cpu'``."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def cpu_name() -> str:
    """``'CPU <model> (<n> cores)'``: the first ``model name`` of /proc/cpuinfo (elsewhere
    ``platform.processor()``) and ``os.cpu_count()`` (logical CPUs), e.g. ``'CPU AMD EPYC
    (2 cores)'``, whose slug ``cpu-amd-epyc-2-cores`` names a ``--device cpu`` results file."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    model = " ".join((model or platform.processor() or platform.machine() or "unknown").split())
    return f"CPU {model} ({os.cpu_count() or 1} cores)"


def last_level_cache_bytes(default: int = 32 << 20) -> int:
    """The size of the CPU's largest cache (Linux sysfs, cpu0), or ``default`` where it
    cannot be read."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            match = re.fullmatch(r"(\d+)([KMG]?)", path.read_text().strip())
        except OSError:
            continue
        if match:
            sizes.append(int(match[1]) << {"": 0, "K": 10, "M": 20, "G": 30}[match[2]])
    return max(sizes, default=default)


def slug(name: str) -> str:
    """``'NVIDIA H100 80GB HBM3'`` -> ``'nvidia-h100-80gb-hbm3'`` (the results file's name)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters (glibc's malloc.h)


def reuse_freed_memory() -> str | None:
    """Make glibc's malloc keep what is freed for the next allocation, for the rest of the
    process: no block is mmap'd (``M_MMAP_MAX`` 0) and the heap is never trimmed
    (``M_TRIM_THRESHOLD`` 2**31 - 1 bytes). Otherwise every block of 32 MiB or more is mapped
    afresh and faults in page by page on each call, and smaller ones do or do not depending
    on what ran before. Returns None, or why it could not (no glibc)."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return f"no glibc mallopt in {name or 'this C library'}"
    if not (mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, 2**31 - 1)):
        return "mallopt refused M_MMAP_MAX or M_TRIM_THRESHOLD"
    return None
