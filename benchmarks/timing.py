"""How the harness measures (docs/design.md section 6).

* On CUDA, ``triton.testing.do_bench`` times a callable with CUDA events after warm-up (it also
  flushes L2 before each call) and gives the median and the 20th/80th percentiles.
  Callables too slow for do_bench's fixed 5-call estimate (a block of training iterations)
  use ``time_calls``: a given number of calls, each timed with CUDA events.
* On the CPU (the ``--smoke`` run) the same callables are timed with ``time.perf_counter``.
* Host time (the ``overhead`` case) is ``host_ms``: ``perf_counter`` around blocks of calls
  that never synchronize, the device synchronized between blocks.
* Peak memory is what one call allocates beyond what was allocated before it, read with
  ``torch.cuda.reset_peak_memory_stats`` and ``max_memory_allocated``.
* ``copy_gbps`` is a measured device-to-device copy: bytes read + bytes written / time.

Units: milliseconds, MiB (2**20 bytes) for memory, GB/s (1e9 bytes per second).
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass

import torch

QUANTILES = (0.5, 0.2, 0.8)  # median, p20, p80, in the order the results list them


@dataclass(frozen=True)
class Timing:
    """How long to warm up and measure.

    ``warmup_ms``/``rep_ms`` go to do_bench on CUDA; ``warmup_calls``/``reps`` count calls
    where calls are timed one by one (CPU, and the block-timed cases on CUDA);
    ``host_blocks`` counts the timed blocks of ``host_ms``.
    """
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    warmup_calls: int = 1
    reps: int = 3
    host_blocks: int = 10


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantiles(times_ms: list[float]) -> tuple[float, float, float]:
    times = torch.tensor(times_ms, dtype=torch.float64)
    q = times.quantile(torch.tensor(QUANTILES, dtype=torch.float64))
    return tuple(float(v) for v in q)


def time_calls(fn, device: torch.device, warmup_calls: int,
               reps: int) -> tuple[float, float, float]:
    """Median, p20, p80 in ms of ``reps`` calls of ``fn``, each timed on its own (CUDA events
    on a GPU, ``perf_counter`` on the CPU), after ``warmup_calls`` untimed calls."""
    for _ in range(warmup_calls):
        fn()
    synchronize(device)
    times = []
    for _ in range(reps):
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
        return time_calls(fn, device, timing.warmup_calls, timing.reps)
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


def slug(name: str) -> str:
    """``'NVIDIA H100 80GB HBM3'`` -> ``'nvidia-h100-80gb-hbm3'`` (the results file's name)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"
