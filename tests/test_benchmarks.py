"""The benchmark harness, run as CI runs it: ``python -m benchmarks --smoke`` (every case at
tiny sizes on the CPU), then the results files are checked against docs/design.md section 7."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import cases, report

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
    stack_r1_compile = [r for r in rows if r["bench"] == "r1_step" and
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
