"""The benchmark harness, run as CI runs it: ``python -m benchmarks --smoke`` (every case at
tiny sizes on the CPU), then the results files are checked against docs/design.md section 7.
In-process tests check what the rows rest on: the host timer, the host-overhead case's stubbed
launches, and that the eager and fastgan steps compute the same losses."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastgan
from benchmarks import cases, report, step_cases
from benchmarks.common import Unsupported
from benchmarks.runner import build_context
from benchmarks.timing import host_ms

REPO = Path(__file__).resolve().parent.parent
ROW_KEYS = {"bench", "mode", "shape", "dtype", "provider", "median_ms", "p20_ms", "p80_ms",
            "peak_mem_mb", "gbps", "status", "note"}
HEADER_KEYS = {"device", "torch", "triton", "fastgan", "date", "copy_gbps", "results"}


def run_benchmarks(*args: str) -> subprocess.CompletedProcess:
    """``python -m benchmarks ARGS`` in a fresh process. TRITON_INTERPRET is dropped: the smoke
    run times the torch reference on the CPU (the interpreter would take minutes)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "benchmarks", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench-smoke")
    run_benchmarks("--smoke", "--out", str(out))
    return out


def load_rows(out: Path) -> tuple[dict, list[dict]]:
    doc = json.loads((out / "cpu.json").read_text())
    return doc, doc["results"]


def test_json_has_the_documented_format(smoke):
    doc, rows = load_rows(smoke)
    assert set(doc) == HEADER_KEYS
    assert doc["device"] == "cpu"
    assert isinstance(doc["torch"], str) and isinstance(doc["fastgan"], str) and doc["fastgan"]
    assert doc["triton"] is None or isinstance(doc["triton"], str)
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", doc["date"])
    assert isinstance(doc["copy_gbps"], float) and doc["copy_gbps"] > 0
    for row in rows:
        assert set(row) == ROW_KEYS, row
        assert row["bench"] in cases.BENCHES and row["provider"] in cases.PROVIDERS
        assert row["dtype"] in cases.DTYPES
        assert isinstance(row["note"], str)
        assert row["peak_mem_mb"] is None  # no allocator statistics on the CPU


def test_every_case_and_provider_ran_once(smoke):
    _, rows = load_rows(smoke)
    keys = [report.row_key(r) for r in rows]
    expected = {(*c.key, p) for c in cases.all_cases("smoke") for p in cases.PROVIDERS}
    assert len(keys) == len(set(keys))
    assert set(keys) == expected
    assert {r["bench"] for r in rows} == set(cases.BENCHES)


def test_rows_are_ok_or_unsupported_with_a_reason(smoke):
    _, rows = load_rows(smoke)
    errors = [r for r in rows if r["status"] not in ("ok", "unsupported")]
    assert not errors, errors
    for row in rows:
        if row["status"] == "unsupported":
            assert row["note"] and row["median_ms"] is None
        else:
            assert 0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"], row
            assert row["gbps"] is None or row["gbps"] > 0
    # The op benches state their bytes, so their rows carry GB/s; the R1 step cannot compile.
    assert all(r["gbps"] for r in rows if r["bench"] == "bias_act" and r["status"] == "ok")
    stack_r1_compile = [r for r in rows if r["bench"] == "r1_step" and r["mode"] == "step" and
                        r["provider"] == "compile" and r["shape"].startswith("conv-stack")]
    assert stack_r1_compile and all(r["status"] == "unsupported" and "double backward" in
                                    r["note"] for r in stack_r1_compile)


def test_markdown_table_and_plot_are_written(smoke):
    md = (smoke / "cpu.md").read_text()
    assert md.startswith("# fastgan benchmarks: cpu")
    assert "| bench | mode | shape | dtype | eager ms | compile ms | fastgan ms |" in md
    for bench in cases.BENCHES:
        assert f"| {bench} |" in md
    png = (smoke / "cpu.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_a_partial_rerun_replaces_only_its_rows(smoke, tmp_path):
    for name in ("cpu.json", "cpu.md", "cpu.png"):
        (tmp_path / name).write_bytes((smoke / name).read_bytes())
    before = {report.row_key(r): r for r in load_rows(tmp_path)[1]}
    run_benchmarks("--smoke", "--out", str(tmp_path), "--bench", "grad_sq_norm",
                   "--provider", "eager", "--dtype", "fp32")
    after = {report.row_key(r): r for r in load_rows(tmp_path)[1]}
    assert after.keys() == before.keys()
    changed = {k for k in after if after[k] != before[k]}
    assert changed and all(k[0] == "grad_sq_norm" and k[3] == "float32" and k[4] == "eager"
                           for k in changed)


def test_rows_past_the_time_budget_are_recorded_not_invented(tmp_path):
    run_benchmarks("--smoke", "--out", str(tmp_path), "--bench", "bias_act", "--budget-s", "0")
    _, rows = load_rows(tmp_path)
    assert rows and all(r["status"] == "error" and "budget" in r["note"] and
                        r["median_ms"] is None for r in rows)


def test_new_benches_have_their_modes_and_rows(smoke):
    _, rows = load_rows(smoke)
    modes = {bench: {r["mode"] for r in rows if r["bench"] == bench} for bench in cases.BENCHES}
    assert modes["overhead"] == {"fwd", "fwd+bwd"}
    assert modes["r1_step"] == {"step", "step+graph", "dstep"}
    assert modes["r1r2_step"] == {"joint", "split", "dstep"}
    assert modes["train_iter"] == {"iter", "iter+graph"}
    # Without a GPU, everything but CUDA graphs and whole-model compiles runs.
    for row in rows:
        if row["bench"] in ("overhead", "r1_step", "r1r2_step") and \
                row["provider"] != "compile" and not row["mode"].endswith("+graph"):
            assert row["status"] == "ok", row


def test_graphed_rows_say_they_need_cuda(smoke):
    _, rows = load_rows(smoke)
    graphed = [r for r in rows if r["mode"].endswith("+graph")]
    assert {r["bench"] for r in graphed} == {"r1_step", "train_iter"}
    assert {r["provider"] for r in graphed} == set(cases.PROVIDERS)
    assert all(r["status"] == "unsupported" and "CUDA graphs need CUDA" in r["note"]
               for r in graphed)


def test_overhead_rows_run_stubbed_on_meta_tensors(smoke):
    _, rows = load_rows(smoke)
    overhead = [r for r in rows if r["bench"] == "overhead"]
    assert len(overhead) == 4 * len(cases.PROVIDERS)
    for row in overhead:
        if row["provider"] == "compile":
            assert row["status"] == "unsupported" and "eager and fastgan" in row["note"]
        else:
            assert row["status"] == "ok" and "meta tensors" in row["note"], row
            assert "host time of one call" in row["note"]


def test_host_timer_calls_blocks_of_calls_and_reports_per_call():
    calls = []
    times = host_ms(lambda: calls.append(1), torch.device("cpu"), calls=7, blocks=4)
    assert len(calls) == 7 * 5  # one untimed block, then four timed ones
    assert 0 < times[1] <= times[0] <= times[2]
    with pytest.raises(ValueError, match="calls and blocks must be >= 1"):
        host_ms(lambda: None, torch.device("cpu"), calls=0, blocks=1)


def _overhead_case(mode: str, dtype: torch.dtype) -> cases.Case:
    matches = [c for c in cases.all_cases("smoke", ["overhead"]) if c.mode == mode
               and c.dtype == dtype]
    assert len(matches) == 1
    return matches[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("mode, expected", [
    ("fwd", {"bias_act_fwd": 1}),
    ("fwd+bwd", {"conv2d_act_fwd": 1, "bias_act_grad": 1}),
])
def test_overhead_case_runs_fastgans_launchers_on_meta(mode, expected, dtype, launches):
    """Without a GPU, fastgan's rows take the Triton path on meta tensors and record each
    launch instead of running it: n calls, n launches of each kernel, no other."""
    ctx = build_context(torch.device("cpu"))
    fn = _overhead_case(mode, dtype).build(ctx, "fastgan")
    fastgan.reset_launch_counts()
    for _ in range(5):
        out = fn()
    assert launches() == {name: 5 * n for name, n in expected.items()}
    outputs = out if isinstance(out, tuple) else (out,)
    assert all(t.is_meta for t in outputs)
    assert not fastgan.ops.launch.is_recording()
    eager = _overhead_case(mode, dtype).build(ctx, "eager")
    fastgan.reset_launch_counts()
    eager_out = eager()
    assert launches() == {}
    eager_out = eager_out if isinstance(eager_out, tuple) else (eager_out,)
    assert [t.shape for t in eager_out] == [t.shape for t in outputs]
    assert all(t.is_meta for t in eager_out)
    with pytest.raises(Unsupported, match="eager and fastgan"):
        _overhead_case(mode, dtype).build(ctx, "compile")


def _tiny_r3gan() -> torch.nn.Module:
    """A small R3GAN D in float64, every parameter random (so no residual branch is zero)."""
    from fastgan.models import build_discriminator

    torch.manual_seed(0)
    D = build_discriminator("r3gan", 8, backend="torch", widths=(4, 8), blocks=(1, 1),
                            group_channels=4).double()
    with torch.no_grad():
        for p in D.parameters():
            p.normal_(0, 0.5)
    return D


def _loss_and_grads(loss_fn, D, *images):
    D.zero_grad(set_to_none=True)
    loss = loss_fn(D, *images)
    loss.backward()
    return loss.detach(), [torch.zeros_like(p) if p.grad is None else p.grad
                           for p in D.parameters()]


def test_r1r2_step_variants_compute_the_same_loss_and_gradients():
    """What the r1r2_step modes time is one loss: eager split (R1 then R2), eager joint (one
    combined batch) and the fastgan provider's r1_r2_penalty, joint and split, all give RpGAN +
    R1 + R2 and the same weight gradients in float64 (on one D: that fused layers equal torch
    layers is the ops' and models' tests' business)."""
    D = _tiny_r3gan()
    reals = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    fakes = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    gamma = 3.0
    expected_loss, expected_grads = _loss_and_grads(
        lambda D, r, f: step_cases.eager_r1_r2_split_loss(D, r, f, gamma), D, reals, fakes)
    variants = [
        lambda D, r, f: step_cases.eager_r1_r2_joint_loss(D, r, f, gamma),
        lambda D, r, f: step_cases.fastgan_r1_r2_loss(D, r, f, gamma, joint=True),
        lambda D, r, f: step_cases.fastgan_r1_r2_loss(D, r, f, gamma, joint=False),
    ]
    for loss_fn in variants:
        loss, grads = _loss_and_grads(loss_fn, D, reals, fakes)
        torch.testing.assert_close(loss, expected_loss, rtol=1e-10, atol=1e-10)
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # The penalties are really there: without them the loss is RpGAN alone.
    rpgan = step_cases.plain_d_loss("rpgan", D, reals, fakes)
    assert (expected_loss - rpgan).item() > 1e-3


def test_eager_r1_penalty_is_fastgans_r1_penalty():
    D = _tiny_r3gan()
    reals = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    eager = step_cases.eager_r1_penalty(D, reals, 10.0)
    torch.testing.assert_close(eager, fastgan.r1_penalty(D, reals, 10.0).loss, rtol=1e-10,
                               atol=1e-10)
    assert eager.item() > 0


def test_step_refuses_a_step_that_leaves_a_weight_without_gradient():
    used, unused = torch.randn(2, 2, requires_grad=True), torch.randn(2, 2, requires_grad=True)
    step = step_cases.step_fn(lambda x: (x @ used).sum(), [used, unused])
    with pytest.raises(RuntimeError, match="left 1 of 2 weight tensors without a gradient"):
        step(torch.randn(3, 2))
    ok = step_cases.step_fn(lambda x: (x @ used @ unused).sum(), [used, unused])
    loss = ok(torch.randn(3, 2))
    assert not loss.requires_grad and used.grad is not None and unused.grad is not None


def test_graphed_steps_are_unsupported_without_cuda():
    ctx = build_context(torch.device("cpu"))
    graphed = [c for c in cases.all_cases("smoke", ["r1_step", "train_iter"])
               if c.mode.endswith("+graph")]
    assert len(graphed) == 6
    for case in graphed:
        for provider in cases.PROVIDERS:
            with pytest.raises(Unsupported, match="CUDA graphs need CUDA"):
                case.build(ctx, provider)
