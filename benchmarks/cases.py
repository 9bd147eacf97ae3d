"""The benchmark cases (docs/design.md section 6): every bench, in run order.

A ``Case`` (``benchmarks.common``) is one group of result rows, ``(bench, mode, shape,
dtype)``; ``case.build(ctx, provider)`` returns a zero-argument callable that runs one timed
unit of work for ``eager`` (plain PyTorch), ``compile`` (``torch.compile`` of it),
``fastgan`` or ``ext`` (fastgan's ops with the backend forced to the compiled extension; op
cases only). The cases live in one module per family:

* ``overhead_cases``  ``overhead``: host time to enqueue one op call or one conv block;
* ``op_cases``        ``bias_act``, ``grad_sq_norm``, ``conv2d_act``, ``upfirdn2d`` (fwd, bwd,
                      fwd+bwd), with the bytes and FLOPs each must move (the formulas of
                      benchmarks/NOTES.md);
* ``step_cases``      ``r1_step``, ``r1r2_step``, ``train_iter``: whole D steps and training
                      iterations, graphed or not.
"""
from __future__ import annotations

from benchmarks.common import (DTYPES, PROVIDERS, SIZES, BuildContext, Case, Unsupported,
                               reset_compiled)
from benchmarks.op_cases import (bias_act_cases, conv2d_act_cases, grad_sq_norm_cases,
                                 upfirdn2d_cases)
from benchmarks.overhead_cases import overhead_cases
from benchmarks.step_cases import r1_step_cases, r1r2_step_cases, train_iter_cases

CASE_FACTORIES = {  # run order
    "overhead": overhead_cases,
    "bias_act": bias_act_cases,
    "grad_sq_norm": grad_sq_norm_cases,
    "conv2d_act": conv2d_act_cases,
    "upfirdn2d": upfirdn2d_cases,
    "r1_step": r1_step_cases,
    "r1r2_step": r1r2_step_cases,
    "train_iter": train_iter_cases,
}
BENCHES = tuple(CASE_FACTORIES)
MODEL_BENCHES = ("r1_step", "r1r2_step", "train_iter")  # whole models; compiled ones are reset
OP_BENCHES = ("bias_act", "grad_sq_norm", "conv2d_act", "upfirdn2d")  # the cpu size's only

__all__ = ["BENCHES", "BuildContext", "CASE_FACTORIES", "Case", "DTYPES", "MODEL_BENCHES",
           "OP_BENCHES", "PROVIDERS", "SIZES", "Unsupported", "all_cases", "flops_by_key",
           "reset_compiled"]


def all_cases(size: str = "full", benches=BENCHES) -> list[Case]:
    """Every case of ``benches`` at ``size`` (``full``, ``quick``, ``cpu`` or ``smoke``; the
    ``cpu`` size has cases of ``OP_BENCHES`` only), in run order: bench by bench in
    ``BENCHES`` order, bf16 before fp32 (a run cut short by its time budget has the bf16
    numbers first)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    if size == "cpu":
        benches = [b for b in benches if b in OP_BENCHES]
    selected = [c for bench in BENCHES if bench in benches for c in CASE_FACTORIES[bench](size)]
    dtype_order = list(DTYPES.values())
    return sorted(selected, key=lambda c: (BENCHES.index(c.bench), dtype_order.index(c.dtype)))


def flops_by_key() -> dict[tuple[str, str, str, str], float]:
    """FLOPs of every case at every size, by ``(bench, mode, shape, dtype)`` (for the table)."""
    return {c.key: c.flops for size in SIZES for c in all_cases(size) if c.flops}
