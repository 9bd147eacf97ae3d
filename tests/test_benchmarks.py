"""The benchmark harness, run as CI runs it: ``python -m benchmarks --smoke`` (every case at
tiny sizes on the CPU) and ``python -m benchmarks --device cpu --smoke`` (the CPU run at those
sizes), then the results files are checked against docs/design.md section 7. The compiled
extension is built first where it can be (``test_ext.require_ext``), so the ``ext`` rows run.
In-process tests check what the rows rest on: the host timer, the host-overhead case's stubbed
launches, the ``ext`` provider's forced backend, and that the eager and fastgan steps compute
the same losses."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastgan
from benchmarks import cases, report, runner, step_cases, timing
from benchmarks.common import EXT_OPS_ONLY, Unsupported, n_sets
from benchmarks.op_cases import bias_act_inputs
from benchmarks.runner import build_context
from benchmarks.timing import cpu_name, host_ms, slug
from fastgan import ext
from fastgan.backend import get_backend, implementation
from test_ext import require_ext

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
def ext_reason() -> str | None:
    """Why the extension cannot run CPU tensors after building it where it can be built
    (None: it can, and the runs below load the same build from the cache folder)."""
    if not ext.available("cpu") and not ext.build_blockers():
        ext.build(verbose=False)
    return ext.reason("cpu")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, ext_reason) -> Path:
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
    from PIL import Image
    assert max(Image.open(smoke / "cpu.png").size) <= 2000  # every case, at a sane size


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
    # Without a GPU, everything but CUDA graphs, whole-model compiles and ext runs.
    for row in rows:
        if row["bench"] in ("overhead", "r1_step", "r1r2_step") and \
                row["provider"] not in ("compile", "ext") and not row["mode"].endswith("+graph"):
            assert row["status"] == "ok", row


def test_graphed_rows_say_they_need_cuda(smoke):
    _, rows = load_rows(smoke)
    graphed = [r for r in rows if r["mode"].endswith("+graph")]
    assert {r["bench"] for r in graphed} == {"r1_step", "train_iter"}
    assert {r["provider"] for r in graphed} == set(cases.PROVIDERS)
    assert all(r["status"] == "unsupported" and "CUDA graphs need CUDA" in r["note"]
               for r in graphed if r["provider"] != "ext")


def test_overhead_rows_run_stubbed_on_meta_tensors(smoke):
    _, rows = load_rows(smoke)
    overhead = [r for r in rows if r["bench"] == "overhead"]
    assert len(overhead) == 6 * len(cases.PROVIDERS)  # bias_act, conv2d_act, upfirdn2d x 2 dtypes
    for row in overhead:
        if row["provider"] == "compile":
            assert row["status"] == "unsupported" and "eager, fastgan and ext" in row["note"]
        elif row["provider"] == "ext":
            assert row["status"] == "unsupported" and row["note"].startswith("no GPU: ")
        else:
            assert row["status"] == "ok" and "meta tensors" in row["note"], row
            assert "host time of one call" in row["note"]


def test_smoke_ext_rows_run_the_op_benches_or_say_why_not(smoke, ext_reason):
    """ext rows: ok for every op case when the extension runs CPU tensors (else unsupported
    with fastgan.ext's reason); the step benches refuse ext with one note."""
    _, rows = load_rows(smoke)
    ext_rows = [r for r in rows if r["provider"] == "ext"]
    op_rows = [r for r in ext_rows if r["bench"] in cases.OP_BENCHES]
    assert len(op_rows) == len(cases.all_cases("smoke", cases.OP_BENCHES))
    for row in op_rows:
        if ext_reason is None:
            assert row["status"] == "ok" and row["gbps"] > 0, row
        else:
            assert row["status"] == "unsupported", row
            assert row["note"] == f"the compiled extension cannot run cpu tensors: {ext_reason}"
    steps = [r for r in ext_rows if r["bench"] in cases.MODEL_BENCHES]
    assert steps and all(r["status"] == "unsupported" and r["note"] == EXT_OPS_ONLY
                         for r in steps)
    conv = [r for r in op_rows if r["bench"] == "conv2d_act" and r["status"] == "ok"]
    assert all("the extension's bias_act" in r["note"] for r in conv)


def _smoke_case(bench: str, mode: str, dtype=torch.float32) -> cases.Case:
    """The first smoke case of ``bench`` in ``mode`` and ``dtype``."""
    return next(c for c in cases.all_cases("smoke", [bench])
                if c.mode == mode and c.dtype == dtype)


# (bench, mode) -> the extension ops one timed call launches, per call.
EXT_LAUNCHES = {
    ("bias_act", "fwd"): {"ext_bias_act": 1},
    ("bias_act", "bwd"): {"ext_bias_act_grad": 1},
    ("bias_act", "fwd+bwd"): {"ext_bias_act": 1, "ext_bias_act_grad": 1},
    ("grad_sq_norm", "fwd"): {"ext_per_sample_dot": 1},
    ("grad_sq_norm", "fwd+bwd"): {"ext_per_sample_dot": 1, "ext_scale_per_sample": 1},
    ("conv2d_act", "fwd"): {"conv2d_act_cudnn": 1, "ext_bias_act": 1},
    ("conv2d_act", "fwd+bwd"): {"conv2d_act_cudnn": 1, "ext_bias_act": 1,
                                "ext_bias_act_grad": 1},
    ("upfirdn2d", "fwd"): {"ext_upfirdn2d": 1},
    ("upfirdn2d", "fwd+bwd"): {"ext_upfirdn2d": 2},
}


@pytest.mark.parametrize("bench, mode", list(EXT_LAUNCHES))
def test_ext_provider_forces_the_extension_for_the_call_only(bench, mode, launches,
                                                             monkeypatch):
    """Here TRITON_INTERPRET=1 makes auto run the Triton kernels; the ext provider's calls
    launch the extension's ops alone, exactly once each per call, and leave the backend (and
    FASTGAN_CONV) as they were."""
    require_ext()
    monkeypatch.delenv("FASTGAN_CONV", raising=False)
    ctx = build_context(torch.device("cpu"))
    fn = _smoke_case(bench, mode).build(ctx, "ext")
    assert get_backend() == ("auto", "default") and "FASTGAN_CONV" not in os.environ
    fastgan.reset_launch_counts()
    for _ in range(3):
        fn()
    assert launches() == {name: 3 * n for name, n in EXT_LAUNCHES[bench, mode].items()}
    assert get_backend() == ("auto", "default") and "FASTGAN_CONV" not in os.environ
    assert implementation(torch.empty(1)) == "triton"
    fastgan.set_backend("torch")  # a setting of the user's own survives the calls too
    fn()
    assert get_backend() == ("torch", "set_backend()")


@pytest.mark.parametrize("bench, expected", [
    ("bias_act", {"bias_act_fwd": 1, "bias_act_grad": 1}),
    ("conv2d_act", {"conv2d_act_fwd": 1, "bias_act_grad": 1}),
    ("upfirdn2d", {"upfirdn2d": 2}),
])
def test_fastgan_provider_forces_the_contexts_backend(bench, expected, launches):
    """On CUDA the context says 'triton', so fastgan's op rows are the Triton kernels whatever
    the user's backend: here (the interpreter) they stay Triton with the user's backend set to
    'ext', which is restored after each call."""
    require_ext()  # else a forced 'ext' would fall back to Triton and prove nothing
    ctx = dataclasses.replace(build_context(torch.device("cpu")), fastgan_backend="triton")
    fastgan.set_backend("ext")
    fn = _smoke_case(bench, "fwd+bwd").build(ctx, "fastgan")
    fastgan.reset_launch_counts()
    for _ in range(3):
        fn()
    assert launches() == {name: 3 * n for name, n in expected.items()}
    assert get_backend() == ("ext", "set_backend()")


def test_ext_provider_builds_bwd_graphs_on_the_extension(launches):
    """bwd mode runs each input set's forward while building: on the extension too."""
    require_ext()
    ctx = build_context(torch.device("cpu"))
    case = _smoke_case("bias_act", "bwd")
    shape = tuple(int(d) for d in case.shape.split("x"))
    sets = n_sets(sum(t.nbytes for t in bias_act_inputs(shape, torch.float32, ctx.device)), ctx)
    fastgan.reset_launch_counts()
    case.build(ctx, "ext")
    assert launches() == {"ext_bias_act": sets}


@pytest.mark.parametrize("bench", cases.OP_BENCHES)
def test_ext_provider_computes_what_eager_computes(bench):
    """Same seed, same inputs: the ext provider's fwd+bwd gradients equal eager's (float32)."""
    require_ext()
    ctx = build_context(torch.device("cpu"))
    case = _smoke_case(bench, "fwd+bwd")
    results = {}
    for provider in ("eager", "ext"):
        torch.manual_seed(0)
        results[provider] = case.build(ctx, provider)()
    assert len(results["ext"]) == len(results["eager"]) >= 1
    for got, want in zip(results["ext"], results["eager"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_ext_upfirdn2d_is_unsupported_on_cuda():
    """The extension has no CUDA upfirdn2d kernel: on CUDA its ext rows say so instead of
    timing the Triton kernel (which a forced 'ext' runs there) under the ext name."""
    cuda = dataclasses.replace(build_context(torch.device("cpu")), device=torch.device("cuda"))
    for mode in ("fwd", "fwd+bwd"):
        with pytest.raises(Unsupported, match="^the extension has no CUDA upfirdn2d kernel"):
            _smoke_case("upfirdn2d", mode).build(cuda, "ext")


def test_ext_provider_is_unsupported_with_the_extensions_reason(monkeypatch):
    """Where the extension cannot run the device's tensors, the row says fastgan.ext's reason:
    meta tensors (no kernels), and a CPU whose extension is not built."""
    meta = build_context(torch.device("meta"))
    with pytest.raises(Unsupported, match="^the compiled extension cannot run meta tensors: "
                                          "no kernels for meta tensors"):
        _smoke_case("bias_act", "fwd").build(meta, "ext")
    not_built = "not built; build it with `python -m fastgan build-ext`"
    monkeypatch.setattr(ext, "reason", lambda device_type: not_built)
    cpu = build_context(torch.device("cpu"))
    for bench in cases.OP_BENCHES:
        with pytest.raises(Unsupported) as info:
            _smoke_case(bench, "fwd").build(cpu, "ext")
        assert str(info.value) == f"the compiled extension cannot run cpu tensors: {not_built}"


def test_cpu_size_has_the_op_benches_at_cpu_shapes():
    cpu = cases.all_cases("cpu")
    assert {c.bench for c in cpu} == set(cases.OP_BENCHES)
    assert {c.dtype for c in cpu if c.bench == "conv2d_act"} == {torch.float32}
    keys = {c.key for c in cpu}
    assert ("bias_act", "fwd+bwd", "16x128x64x64", "float32") in keys
    assert ("grad_sq_norm", "fwd+bwd", "64x3x64x64", "float32") in keys
    assert cases.all_cases("cpu", ["r1_step", "overhead"]) == []


def test_cpu_run_writes_its_results_file(tmp_path, ext_reason):
    """``--device cpu`` (at the smoke sizes): the op benches for eager, fastgan (Triton:
    unsupported, the interpreter) and ext, into cpu-<model>-<n>-cores.json|md|png."""
    run_benchmarks("--device", "cpu", "--smoke", "--threads", "1", "--out", str(tmp_path))
    name = slug(cpu_name())
    assert name.startswith("cpu-") and name.endswith(f"-{os.cpu_count()}-cores")
    doc = json.loads((tmp_path / f"{name}.json").read_text())
    assert set(doc) == HEADER_KEYS and doc["device"] == cpu_name()
    rows = doc["results"]
    expected = {(*c.key, p) for c in cases.all_cases("smoke", cases.OP_BENCHES)
                for p in ("eager", "fastgan", "ext")}
    assert {report.row_key(r) for r in rows} == expected and len(rows) == len(expected)
    for row in rows:
        assert set(row) == ROW_KEYS
        if row["provider"] == "fastgan":
            assert row["status"] == "unsupported" and row["note"] == runner.TRITON_ON_CPU
        elif row["provider"] == "eager" or ext_reason is None:
            assert row["status"] == "ok", row
            assert row["note"].startswith("perf_counter, 1 thread, freed memory reused")
            assert 0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
        else:
            assert row["status"] == "unsupported" and ext_reason in row["note"]
    md = (tmp_path / f"{name}.md").read_text()
    assert md.startswith(f"# fastgan benchmarks: {cpu_name()}")
    assert "CPU run (`python -m benchmarks --device cpu`)" in md
    header = "| bench | mode | shape | dtype | eager ms | fastgan ms | ext ms |"
    assert header in md and "compile ms" not in md
    assert ("| ext vs eager | ext rate |" in md) == (ext_reason is None)
    assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, message", [
    (["--device", "cpu", "--bench", "bias_act", "r1_step"],
     "--device cpu times the op benches only (bias_act, grad_sq_norm, conv2d_act, upfirdn2d), "
     "not "
     "r1_step: those need a GPU"),
    (["--device", "cpu", "--quick"], "--quick is for GPU runs"),
    (["--smoke", "--quick"], "--quick is for GPU runs; --smoke has its own tiny shapes"),
    (["--count", "--device", "cpu", "--budget-s", "0"],
     "--count times nothing and counts its own providers (eager, fastgan-triton, "
     "fastgan-cudnn) on meta tensors: leave out --device, --budget-s"),
    (["--device", "cuda", "--smoke"], "--smoke runs on the CPU"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
])
def test_bad_command_lines_are_refused_with_a_reason(args, message, capsys):
    with pytest.raises(SystemExit) as info:
        runner.parse_args(args)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc (Linux)")
def test_cpu_run_reuses_freed_memory():
    """glibc maps a 64 MiB block afresh on every allocation (16384 page faults of 4 KiB each
    time); after ``reuse_freed_memory()`` freed blocks are handed out again: once the heap has
    grown to hold the loop's blocks (small allocations split freed blocks, so it grows a few
    times first), the calls fault nothing in. In a subprocess: the setting lasts for the
    process."""
    code = ("import json, resource, torch\n"
            "from benchmarks.timing import reuse_freed_memory\n"
            "def faults():\n"
            "    f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "    torch.empty(64 << 20, dtype=torch.uint8).fill_(1)\n"
            "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f\n"
            "before = [faults() for _ in range(2)]\n"
            "why_not = reuse_freed_memory()\n"
            "print(json.dumps([before, why_not, [faults() for _ in range(16)]]))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    before, why_not, after = json.loads(proc.stdout)
    assert why_not is None
    assert min(before) >= 16384  # every call faults the whole block in
    assert max(after[-4:]) < 64, after  # freed blocks are reused


def test_host_timer_calls_blocks_of_calls_and_reports_per_call():
    calls = []
    times = host_ms(lambda: calls.append(1), torch.device("cpu"), calls=7, blocks=4)
    assert len(calls) == 7 * 5  # one untimed block, then four timed ones
    assert 0 < times[1] <= times[0] <= times[2]
    with pytest.raises(ValueError, match="calls and blocks must be >= 1"):
        host_ms(lambda: None, torch.device("cpu"), calls=0, blocks=1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("mode, expected", [
    ("fwd", {"bias_act_fwd": 1}),
    ("fwd+bwd", {"conv2d_act_fwd": 1, "bias_act_grad": 1}),
])
def test_overhead_case_runs_fastgans_launchers_on_meta(mode, expected, dtype, launches):
    """Without a GPU, fastgan's rows take the Triton path on meta tensors and record each
    launch instead of running it: n calls, n launches of each kernel, no other."""
    ctx = build_context(torch.device("cpu"))
    case = _smoke_case("overhead", mode, dtype)
    fn = case.build(ctx, "fastgan")
    fastgan.reset_launch_counts()
    for _ in range(5):
        out = fn()
    assert launches() == {name: 5 * n for name, n in expected.items()}
    outputs = out if isinstance(out, tuple) else (out,)
    assert all(t.is_meta for t in outputs)
    assert not fastgan.ops.launch.is_recording()
    eager = case.build(ctx, "eager")
    fastgan.reset_launch_counts()
    eager_out = eager()
    assert launches() == {}
    eager_out = eager_out if isinstance(eager_out, tuple) else (eager_out,)
    assert [t.shape for t in eager_out] == [t.shape for t in outputs]
    assert all(t.is_meta for t in eager_out)
    with pytest.raises(Unsupported, match="eager, fastgan and ext"):
        case.build(ctx, "compile")
    with pytest.raises(Unsupported, match="^no GPU: these rows run on meta tensors"):
        case.build(ctx, "ext")


def test_cpu_timer_times_at_least_reps_calls_and_at_least_min_total_ms(monkeypatch):
    """On the CPU, ``time_calls`` times ``reps`` calls, then more until they add up to
    ``min_total_ms``: calls of 2 ms (a fake clock), 3 reps, 15 ms -> 8 timed calls."""
    clock = [0.0]
    calls = []

    def call():
        calls.append(1)
        clock[0] += 0.002

    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    median, p20, p80 = timing.time_calls(call, torch.device("cpu"), warmup_calls=1, reps=3,
                                         min_total_ms=15)
    assert len(calls) == 1 + 8
    assert median == pytest.approx(2.0) and p20 == pytest.approx(2.0) == p80
    calls.clear()
    timing.time_calls(call, torch.device("cpu"), warmup_calls=2, reps=5)
    assert len(calls) == 2 + 5


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
        for provider in ("eager", "compile", "fastgan"):
            with pytest.raises(Unsupported, match="CUDA graphs need CUDA"):
                case.build(ctx, provider)
        with pytest.raises(Unsupported) as info:
            case.build(ctx, "ext")
        assert str(info.value) == EXT_OPS_ONLY


def test_quick_help_says_it_is_for_gpu_runs(capsys):
    with pytest.raises(SystemExit):
        runner.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--quick GPU runs only: the fwd and fwd+bwd op modes" in text


def test_console_notes_are_wrapped_at_word_boundaries(capsys):
    """A row's note is printed whole under it, wrapped between words, never cut."""
    note = " ".join(f"word{i}" for i in range(80)) + " " + "/a/path/longer/than/a/line" * 5
    row = {"bench": "bias_act", "mode": "fwd", "dtype": "float32", "provider": "ext",
           "shape": "2x8x16x16", "status": "unsupported", "median_ms": None,
           "peak_mem_mb": None, "gbps": None, "note": note}
    runner._print_row(row, 0.5)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) > 2 and "word0" not in lines[0]
    assert " ".join(" ".join(lines[1:]).split()) == note
    assert all(len(line) <= runner.NOTE_WIDTH for line in lines[1:-1])


def _ratios_doc(ratios: dict[str, list[float]]) -> dict:
    """A results document with eager and fastgan rows whose speedups are ``ratios``."""
    rows = []
    for bench, values in ratios.items():
        for i, ratio in enumerate(values):
            for provider, ms in (("eager", ratio), ("fastgan", 1.0)):
                rows.append({"bench": bench, "mode": "fwd", "shape": f"{i}x8", "dtype":
                             "float32", "provider": provider, "median_ms": ms, "p20_ms": ms,
                             "p80_ms": ms, "peak_mem_mb": None, "gbps": None,
                             "status": "ok", "note": ""})
    return {"device": "cpu", "torch": "x", "date": "2030-01-01", "results": rows}


def test_every_chart_axis_labels_ticks_above_1x():
    """Speedups within one decade (0.62x-1.3x) or across several still get labelled ticks
    on both sides of 1x (matplotlib's default log axis labels only powers of ten)."""
    fig = report.speedup_figure(_ratios_doc({"bias_act": [0.62, 0.9, 1.3],
                                             "conv2d_act": [0.2, 1.05, 7.0]}))
    fig.canvas.draw()
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 2
    for ax in axes:
        lo, hi = ax.get_xlim()
        labels = [float(t.get_text().rstrip("x")) for t in ax.get_xticklabels()
                  if t.get_text() and lo <= t.get_position()[0] <= hi]
        assert any(v > 1 for v in labels) and any(v < 1 for v in labels), labels
        assert len(labels) >= 4
    assert max(report.log_ticks(0.5, 1.35)) > 1


def test_runs_from_any_folder(tmp_path):
    """``python <repo>/benchmarks`` works from another folder, without PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks"), "--list", "--bench",
                           "bias_act"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[0].split()[:2] == ["bias_act", "fwd"]
