"""The benchmark cases under pytest-benchmark, on a CUDA GPU.

    python -m pytest benchmarks/test_bench.py -k "bias_act and bfloat16" --benchmark-sort=name

Not part of the default ``pytest`` run (``testpaths = ["tests"]``); skipped without CUDA.
The cases are ``benchmarks.cases`` at the size ``FASTGAN_BENCH_SIZE`` (default ``quick``).
pytest-benchmark does not synchronize CUDA, so the timed callable does -- except for the
host-time cases (``overhead``), whose rounds start synchronized and time the call alone. The
results files come from ``python -m benchmarks``, not from here.
"""
from __future__ import annotations

import os

import pytest
import torch

from benchmarks import cases
from benchmarks.common import classify_failure
from benchmarks.runner import build_context, configure_torch, release_memory

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="benchmarks need a CUDA GPU (python -m benchmarks --smoke runs the cases on the CPU)")

SIZE = os.environ.get("FASTGAN_BENCH_SIZE", "quick")
CASES = cases.all_cases(SIZE)


def _case_id(case: cases.Case) -> str:
    return "-".join((case.bench, case.mode, case.shape.replace(" ", "_"), case.dtype_name))


@pytest.mark.parametrize("provider", cases.PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_bench(benchmark, case, provider):
    device = torch.device("cuda")
    configure_torch(device)
    fn = None
    try:
        fn = case.build(build_context(device), provider)
        fn()  # warm-up: compilation, autotuning, per-shape choices
    except Exception as exc:  # noqa: BLE001
        status, note = classify_failure(provider, exc)
        if status == "unsupported":
            pytest.skip(note)
        raise

    def timed():
        fn()
        torch.cuda.synchronize()

    benchmark.group = " ".join(case.key)
    benchmark.extra_info.update(bytes_moved=case.bytes_moved, flops=case.flops,
                                calls_per_unit=case.calls_per_unit, host_time=bool(case.host_calls))
    rounds = 20 if case.calls_per_unit == 1 else 3
    try:
        if case.host_calls:  # host time: each round one call, the queue empty before it
            benchmark.pedantic(fn, setup=torch.cuda.synchronize, warmup_rounds=1, rounds=rounds,
                               iterations=1)
        else:
            benchmark.pedantic(timed, warmup_rounds=1, rounds=rounds, iterations=1)
    finally:
        fn = None
        release_memory(case, [provider], device)
