"""``python -m benchmarks``: run the cases, one result row per provider, and write the results.

Three kinds of run: on the GPU (default; every bench, every provider), on the CPU
(``--device cpu``: the op benches at CPU-sized shapes for eager, fastgan and ext, where
fastgan's Triton kernels are ``unsupported``: on a CPU they run only in the interpreter), and
the ``--smoke`` harness test (every case at tiny sizes on the CPU).

Each (case, provider) is built, called once untimed (compilation, autotuning, per-shape
choices happen there), called once more for its peak memory, then timed. A failure becomes a
row with status ``error`` (or ``unsupported`` for what torch.compile is known not to run) and
the exception's text in ``note``; the run goes on. The JSON is rewritten after every row, so
a run that is stopped keeps what it measured.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

from benchmarks import cases as cases_mod
from benchmarks import count_report, counts, report
from benchmarks.common import classify_failure
from benchmarks.timing import Timing, copy_gbps, device_name, peak_memory_mb, slug, synchronize
from benchmarks.timing import (cpu_name, host_ms, last_level_cache_bytes, reuse_freed_memory,
                               time_calls, time_ms)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
DTYPE_ALIASES = {"bf16": "bfloat16", "bfloat16": "bfloat16",
                 "fp32": "float32", "float32": "float32"}

TIMINGS = {  # size -> how long each row warms up and is measured
    "full": Timing(warmup_ms=25, rep_ms=100, warmup_calls=1, reps=5, host_blocks=20),
    "quick": Timing(warmup_ms=10, rep_ms=40, warmup_calls=1, reps=3, host_blocks=10),
    "cpu": Timing(warmup_calls=2, reps=11, cpu_min_ms=300),
    "smoke": Timing(warmup_calls=1, reps=2, host_blocks=3),
}
CPU_PROVIDERS = ("eager", "fastgan", "ext")  # --device cpu's default providers
NOTE_WIDTH = 100  # console columns of a row's note
TRITON_ON_CPU = ("fastgan's Triton kernels run on a CPU only in the interpreter "
                 "(TRITON_INTERPRET=1), far too slow for these shapes: not timed; the ext rows "
                 "are fastgan on the CPU")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Time fastgan's fused ops and training steps against eager PyTorch and "
                    "torch.compile; write results/<gpu>.json, .md and .png.")
    p.add_argument("--bench", nargs="+", choices=cases_mod.BENCHES, default=None,
                   help="benchmarks to run (default: all, in the order listed; the op benches "
                        "with --device cpu)")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPE_ALIASES), default=None,
                   help="dtypes to run (default: bf16 and fp32)")
    p.add_argument("--provider", nargs="+", choices=cases_mod.PROVIDERS, default=None,
                   help="providers to run (default: all; with --device cpu: "
                        f"{' '.join(CPU_PROVIDERS)})")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="cuda (default): the GPU run. cpu: the op benches on this CPU at "
                        "CPU-sized shapes (--smoke: the tiny ones), timed with perf_counter, "
                        "into results/cpu-<model>-<n>-cores.json")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads torch may use (torch.set_num_threads; default: torch's "
                        "own, 1 for --smoke); each --device cpu row's note says how many ran")
    p.add_argument("--cpu-malloc", choices=("reuse", "system"), default="reuse",
                   help="--device cpu: reuse (default) makes glibc keep freed memory, so rows "
                        "time the ops, not page faults; system keeps glibc's defaults")
    p.add_argument("--smoke", action="store_true",
                   help="every case at tiny sizes on the CPU in seconds (tests the harness; "
                        "writes to a temporary folder unless --out is given)")
    p.add_argument("--quick", action="store_true",
                   help="GPU runs only: the fwd and fwd+bwd op modes, with shorter warm-up and "
                        "timing (--device cpu and --smoke have their own shapes)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"results folder (default: {RESULTS_DIR}; a temporary one for --smoke)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting new rows after this many seconds; rows not run are "
                        "recorded as status 'error' with a note (earlier results are kept)")
    p.add_argument("--count", action="store_true",
                   help="time nothing: count the kernels, bytes and FLOPs of every case (but "
                        "overhead and +graph modes) for eager, fastgan-triton and "
                        "fastgan-cudnn on meta tensors, on any machine, and the floors they "
                        "give on an H100 and an H200; into results/counts.json|md|png "
                        "(--smoke: the tiny shapes)")
    p.add_argument("--list", action="store_true", help="print the selected cases and exit")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the .md and .png of every results .json in the folder, and exit")
    args = p.parse_args(argv)
    if args.device == "cuda" and args.smoke:
        p.error("--smoke runs on the CPU: leave out --device cuda (or use --device cpu)")
    if args.device == "cpu" and args.quick:
        p.error("--quick is for GPU runs; --device cpu has its own CPU-sized shapes")
    if args.smoke and args.quick:
        p.error("--quick is for GPU runs; --smoke has its own tiny shapes")
    if args.count:
        given = [name for name, set_ in (("--device", args.device is not None),
                                         ("--quick", args.quick),
                                         ("--provider", args.provider is not None),
                                         ("--budget-s", args.budget_s is not None)) if set_]
        if given:
            p.error(f"--count times nothing and counts its own providers (eager, "
                    f"fastgan-triton, fastgan-cudnn) on meta tensors: leave out "
                    f"{', '.join(given)}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if args.device == "cpu":
        others = [b for b in args.bench or () if b not in cases_mod.OP_BENCHES]
        if others:
            p.error(f"--device cpu times the op benches only ({', '.join(cases_mod.OP_BENCHES)}"
                    f"), not {', '.join(others)}: those need a GPU (--smoke runs them at tiny "
                    "sizes)")
    args.bench = args.bench or list(cases_mod.OP_BENCHES if args.device == "cpu"
                                    else cases_mod.BENCHES)
    args.provider = args.provider or list(CPU_PROVIDERS if args.device == "cpu"
                                          else cases_mod.PROVIDERS)
    return args


def git_sha() -> str:
    """The commit fastgan was measured at (``+dirty`` if fastgan/ has uncommitted changes);
    ``FASTGAN_GIT_SHA`` overrides it (a copy of the tree without .git)."""
    if os.environ.get("FASTGAN_GIT_SHA"):
        return os.environ["FASTGAN_GIT_SHA"]
    try:
        sha = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "diff", "--quiet", "HEAD", "--",
                                "fastgan"], timeout=10).returncode != 0
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def triton_version() -> str | None:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return None


def configure_torch(device: torch.device) -> None:
    """Process-wide settings of every run: cuDNN autotuning on (what GAN training code sets,
    so eager's convolutions are at their best); TF32 convolutions stay at torch's default
    (on), matmuls at theirs (off)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def build_context(device: torch.device, cpu_run: bool = False) -> cases_mod.BuildContext:
    """How cases build on ``device``. On CUDA fastgan's op rows force the Triton kernels.
    ``cpu_run`` (``--device cpu``): inputs rotate past twice the last-level cache, inductor
    compiles, and the fastgan provider (Triton) is refused."""
    if cpu_run:
        return cases_mod.BuildContext(device, rotate_bytes=2 * last_level_cache_bytes(),
                                      max_sets=32, compile_backend="inductor",
                                      compile_models=False, triton_unsupported=TRITON_ON_CPU)
    if device.type != "cuda":  # smoke: two sets exercise the rotation; aot_eager skips codegen
        return cases_mod.BuildContext(device, rotate_bytes=1 << 14, max_sets=2,
                                      compile_backend="aot_eager", compile_models=False)
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 60 << 20
    return cases_mod.BuildContext(device, rotate_bytes=2 * l2, max_sets=32,
                                  compile_backend="inductor", fastgan_backend="triton")


def provider_note(provider: str, ctx: cases_mod.BuildContext, case: cases_mod.Case) -> str:
    """What a row should say about how its provider ran here, if it is not the real thing
    (the case's ``off_cuda_note`` off CUDA, where it has one), or what the backend rule ran
    for fastgan where it is not the Triton kernels (whole steps, which force no backend)."""
    import fastgan
    from fastgan.backend import use_triton

    if case.off_cuda_note and ctx.device.type != "cuda":
        return case.off_cuda_note
    forced = ctx.fastgan_backend and case.bench not in cases_mod.MODEL_BENCHES
    if provider == "fastgan" and not forced and not use_triton(torch.empty(0, device=ctx.device)):
        return "fastgan ran: " + fastgan.backend_info()[f"{ctx.device.type}_tensors"]
    if provider == "compile" and ctx.compile_backend != "inductor":
        return f"torch.compile(backend='{ctx.compile_backend}'), not inductor: CPU smoke run"
    return ""


def prepare_cpu_run(malloc: str) -> str:
    """Apply a ``--device cpu`` run's ``--cpu-malloc`` (``'reuse'``:
    ``timing.reuse_freed_memory()``; ``'system'``: glibc's defaults) and return the note of
    its rows: the timer, the threads, and whether freed memory is reused."""
    threads = torch.get_num_threads()
    note = f"perf_counter, {threads} thread{'s' if threads > 1 else ''}, "
    if malloc == "system":
        return note + "glibc malloc defaults (fresh pages for blocks >= 32 MiB)"
    why_not = reuse_freed_memory()
    return note + ("freed memory reused (mallopt)" if why_not is None
                   else f"malloc defaults: {why_not}")


def provider_passes(providers) -> list[list[str]]:
    """eager and fastgan for every case first, then compile (slow to warm up): a run cut
    short by its time budget loses compile rows first."""
    first = [p for p in providers if p != "compile"]
    return [ps for ps in (first, [p for p in providers if p == "compile"]) if ps]


def empty_row(case: cases_mod.Case, provider: str, status: str, note: str) -> dict:
    """A result row with no measurement yet."""
    return {"bench": case.bench, "mode": case.mode, "shape": case.shape,
            "dtype": case.dtype_name, "provider": provider, "median_ms": None, "p20_ms": None,
            "p80_ms": None, "peak_mem_mb": None, "gbps": None, "status": status, "note": note}


def run_row(case: cases_mod.Case, provider: str, ctx: cases_mod.BuildContext,
            timing: Timing, run_note: str = "") -> dict:
    """Build, warm up, measure peak memory and time one (case, provider); never raises.
    ``run_note`` (how the whole run was taken) leads the note of an ``ok`` row."""
    row = empty_row(case, provider, status="ok", note="; ".join(filter(None, [
        run_note, provider_note(provider, ctx, case), case.note_for(provider)])))
    fn = None
    try:
        fn = case.build(ctx, provider)
        fn()
        synchronize(ctx.device)
        peak = peak_memory_mb(fn, ctx.device)
        if case.host_calls:
            times = host_ms(fn, ctx.device, case.host_calls, timing.host_blocks)
        elif case.calls_per_unit > 1:
            times = time_calls(fn, ctx.device, timing.warmup_calls, timing.reps)
        else:
            times = time_ms(fn, ctx.device, timing)
        median, p20, p80 = (t / case.calls_per_unit for t in times)
        row.update(median_ms=round(median, 5), p20_ms=round(p20, 5), p80_ms=round(p80, 5),
                   peak_mem_mb=None if peak is None else round(peak, 1))
        if case.bytes_moved:
            row["gbps"] = float(f"{case.bytes_moved / (median * 1e-3) / 1e9:.4g}")
    except Exception as exc:  # noqa: BLE001 - every failure becomes a row, the run goes on
        status, note = classify_failure(provider, exc)
        row.update(status=status, note=note)
    finally:
        del fn
    return row


def release_memory(case: cases_mod.Case, providers, device: torch.device) -> None:
    """Free what the last case left (compiled models, reference cycles, cached blocks)."""
    if case.bench in cases_mod.MODEL_BENCHES and "compile" in providers:
        cases_mod.reset_compiled()
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def print_note(note: str) -> None:
    """Print a row's note under it, indented and wrapped at word boundaries (never cut)."""
    print(textwrap.fill(note, NOTE_WIDTH, initial_indent="    ", subsequent_indent="    ",
                        break_long_words=False, break_on_hyphens=False), flush=True)


def _print_row(row: dict, seconds: float) -> None:
    ms = "" if row["median_ms"] is None else f"{row['median_ms']:10.4f} ms"
    mem = "" if row["peak_mem_mb"] is None else f"{row['peak_mem_mb']:9.1f} MiB"
    gbps = "" if row["gbps"] is None else f"{row['gbps']:8.1f} GB/s"
    print(f"{row['bench']:12} {row['mode']:10} {row['dtype']:8} {row['provider']:7} "
          f"{row['shape'][:44]:44} {row['status']:11} {ms:13} {gbps:13} {mem:13} "
          f"[{seconds:5.1f} s]", flush=True)
    if row["status"] != "ok" and row["note"]:
        print_note(row["note"])


def write_all_reports(out_dir: Path) -> list[Path]:
    """Rewrite the .md and .png of every results file in ``out_dir``, and of its counts."""
    paths = [path for json_path in report.results_files(out_dir)
             for path in report.write_reports(json_path, cases_mod.flops_by_key())]
    if (out_dir / report.COUNTS_FILE).exists():
        paths += count_report.write_reports(out_dir / report.COUNTS_FILE)
    return paths


def run_counts(args: argparse.Namespace, selected: list[cases_mod.Case]) -> int:
    """``--count``: count ``selected`` (``benchmarks.counts``) into ``counts.json`` in the
    results folder (a temporary one for ``--smoke`` unless ``--out``), then its .md and .png;
    with ``--report-only``, only the .md and .png."""
    out_dir = args.out or (Path(tempfile.mkdtemp(prefix="fastgan-count-smoke-")) if args.smoke
                           else RESULTS_DIR)
    json_path = out_dir / report.COUNTS_FILE
    if not args.report_only:
        print(f"counting {len(selected)} cases x {len(counts.COUNT_PROVIDERS)} providers on "
              "meta tensors", flush=True)
        counts.run(selected, out_dir, counts.header(git_sha(), triton_version()))
        print(json_path)
    for path in count_report.write_reports(json_path):
        print(path)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    cpu_run = args.device == "cpu"
    size = "smoke" if args.smoke else "quick" if args.quick else "cpu" if cpu_run else "full"
    dtypes = {DTYPE_ALIASES[d] for d in args.dtype} if args.dtype else set(cases_mod.DTYPES)
    all_cases = counts.count_cases if args.count else cases_mod.all_cases
    selected = [c for c in all_cases(size, args.bench) if c.dtype_name in dtypes]
    if args.list:
        for c in selected:
            print(f"{c.bench:12} {c.mode:10} {c.dtype_name:8} {c.shape}")
        return 0
    if args.count:
        return run_counts(args, selected)
    device = torch.device("cpu" if args.smoke or cpu_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available() and not args.report_only:
        print("python -m benchmarks needs a CUDA GPU; --device cpu times the op benches on this "
              "CPU, --smoke runs the tiny cases", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif args.smoke:
        torch.set_num_threads(1)  # tiny ops: threads only add overhead (and contention in CI)
    out_dir = args.out or (Path(tempfile.mkdtemp(prefix="fastgan-bench-smoke-")) if args.smoke
                           else RESULTS_DIR)
    if args.report_only:
        for path in write_all_reports(out_dir):
            print(path)
        return 0
    name = cpu_name() if cpu_run else device_name(device)
    json_path = out_dir / f"{slug(name)}.json"
    start = time.monotonic()
    timing = TIMINGS[size]
    configure_torch(device)
    ctx = build_context(device, cpu_run)
    run_note = prepare_cpu_run(args.cpu_malloc) if cpu_run else ""
    copy_bytes = 1 << 30 if device.type == "cuda" else 256 << 20 if cpu_run else 64 << 20
    header = {"device": name, "torch": torch.__version__,
              "triton": triton_version(), "fastgan": git_sha(),
              "date": datetime.date.today().isoformat(),
              "copy_gbps": round(copy_gbps(device, timing, copy_bytes), 1)}
    print(f"{header['device']}: torch {header['torch']}, triton {header['triton']}, fastgan "
          f"{header['fastgan']}, copy {header['copy_gbps']} GB/s; {len(selected)} cases x "
          f"{len(args.provider)} providers ({size})", flush=True)
    old = report.load(json_path)
    old_keys = {report.row_key(r) for r in old["results"]} if old and \
        old.get("device") == header["device"] else set()
    rows: list[dict] = []
    for providers in provider_passes(args.provider):
        for case in selected:
            for provider in providers:
                elapsed = time.monotonic() - start
                if args.budget_s is not None and elapsed > args.budget_s:
                    row = empty_row(case, provider, status="error",
                                    note=f"not run: time budget --budget-s {args.budget_s:g} spent")
                    if report.row_key(row) in old_keys:
                        continue  # keep the earlier measurement
                else:
                    row = run_row(case, provider, ctx, timing, run_note)
                rows.append(row)
                _print_row(row, time.monotonic() - start - elapsed)
                report.write_json(json_path, report.merge(old, header, rows))
            release_memory(case, providers, device)
    if not rows and old is None:
        report.write_json(json_path, report.merge(None, header, []))
    paths = [json_path, *report.write_reports(json_path, cases_mod.flops_by_key())]
    if (out_dir / report.COUNTS_FILE).exists():  # its predicted vs measured tables
        paths += count_report.write_reports(out_dir / report.COUNTS_FILE)
    statuses = {s: sum(r["status"] == s for r in rows) for s in report.STATUSES}
    print(f"{len(rows)} rows in {time.monotonic() - start:.1f} s: {statuses}", flush=True)
    for path in paths:
        print(path)
    return 0
