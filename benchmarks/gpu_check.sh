#!/usr/bin/env bash
# The one-shot GPU check (docs/design.md sections 5 and 6), under 7 minutes on one H100/H200
# with no network:
#   1. nvidia-smi, torch/triton versions; the compiled extension built just in time with this
#      machine's nvcc (time-boxed; without it the ext rows and tests say why); backend_info();
#   2. the gpu-marked tests with compiled kernels (time-boxed);
#   3. every benchmark, bench by bench, each with its own time budget, then the table and plot.
#
#   bash benchmarks/gpu_check.sh      # from any directory; it sets PYTHONPATH itself
#
# PYTHON names the interpreter (default: python, else python3). Without a GPU that this torch
# can use, it prints one line saying so and exits with status 1 before anything else runs.
#
# Results: benchmarks/results/<gpu>.json|md|png, merged with what is there. With OUT set, the
# three results files, counts.md (predicted floors beside the measured times), three logs and
# the per-problem choices (FASTGAN_CONV_CACHE, the measured gpu/host times behind every conv
# choice) are also copied to "$OUT" (8 files). Set FASTGAN_GIT_SHA
# where the tree has no .git, so the results name the commit measured.
#
# Time bounds, in seconds from the start: versions ~15; extension build: timeout 150;
# tests: timeout 180; benchmarks: each
# bench has a budget (--budget-s: no new row starts after it; rows not run are recorded as
# 'error' with a note unless an earlier run measured them) and a hard timeout 45 s past it
# (one row, e.g. a torch.compile of a whole model, can outlast the budget), and no benchmark
# runs past BENCH_DEADLINE (390): budgets and timeouts shrink to fit, a bench with under 20 s
# left is not started. The JSON is rewritten after every row, so a hard stop loses one row.
# Expected: about 15 + tests + 8 x 8 (start-up) + 189 (budgets) s, i.e. 6-6.5 minutes; at
# most about 390 + 15 (report) s = 6.75 minutes.
set -uo pipefail
absolute() { case $1 in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
PY=${PYTHON:-$(command -v python || command -v python3)}  # the interpreter that has torch
# Relative paths in PYTHON and OUT name places from the caller's folder, not the repository's.
case $PY in */*) PY=$(absolute "$PY") ;; esac
[ -z "${OUT:-}" ] || OUT=$(absolute "$OUT")
CDPATH='' cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

no_gpu() { echo "gpu_check.sh: not run: $*" >&2; exit 1; }
nvidia-smi -L >/dev/null 2>&1 || no_gpu "no NVIDIA GPU found ('nvidia-smi -L' failed or is missing)"
[ -n "$PY" ] || no_gpu "no python or python3 on PATH (set PYTHON)"
cuda=$("$PY" -c 'import torch; print(torch.cuda.is_available())' 2>/dev/null) \
  || no_gpu "$PY cannot import torch"
[ "$cuda" = True ] || no_gpu "a GPU is present, but torch.cuda.is_available() is False for" \
  "$PY (a CPU build of torch?)"

LOGS=$(mktemp -d)
export FASTGAN_CONV_CACHE="$LOGS/choices.json"  # every measured choice of this run, kept
START=$SECONDS
failed=()

section() { echo; echo "=== $* (at $((SECONDS - START)) s)"; }

section "versions"
{
  nvidia-smi
  "$PY" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda, "| triton", triton.__version__)'
  timeout 150 "$PY" -m fastgan build-ext || echo "build-ext failed or timed out (exit $?)"
  "$PY" -c 'import fastgan; print(fastgan.backend_info())'
} 2>&1 | tee "$LOGS/env.log"

section "gpu tests"
timeout 180 "$PY" -m pytest -m gpu tests -x -q -p no:cacheprovider 2>&1 | tee "$LOGS/tests.log"
rc=${PIPESTATUS[0]}
case $rc in
  0) ;;
  5) echo "(no gpu-marked tests were collected)" ;;
  124) echo "gpu tests: stopped by the 180 s timeout"; failed+=("tests (timeout)") ;;
  *) failed+=("tests (exit $rc)") ;;
esac

BENCH_DEADLINE=${BENCH_DEADLINE:-390}  # seconds from the start; the environment may lower it
run_bench() {  # run_bench NAME BUDGET_S [more python -m benchmarks arguments]
  local name=$1 budget=$2 left=$((BENCH_DEADLINE - (SECONDS - START)))
  shift 2
  if [ "$left" -lt 20 ]; then
    section "benchmark $name: not started, ${left} s left before the deadline"
    failed+=("benchmark $name (no time left)")
    return
  fi
  local hard=$((budget + 45 < left ? budget + 45 : left))
  budget=$((budget < hard - 10 ? budget : hard - 10))
  section "benchmark $name (budget $budget s, hard stop $hard s)"
  timeout "$hard" "$PY" -m benchmarks --bench "$name" --budget-s "$budget" "$@" 2>&1 \
    | tee -a "$LOGS/bench.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || failed+=("benchmark $name (exit $rc)")
}

# Most important first, --quick (modes fwd and fwd+bwd, shorter timing; the full set is
# `python -m benchmarks` with no budget): the host cost per call (direct launches), the R1
# step against the plain D step and as a CUDA graph, R3GAN's R1 + R2, the training iteration
# with and without graphs, then the ops, upfirdn2d last (its budgets were taken from the
# others: the total is what it was). Within a bench every case runs eager and fastgan
# before any compile row, and bf16 before fp32, so a budget cuts compile rows first, then
# fp32. r1_step tries torch.compile (it records that the double backward cannot run);
# r1r2_step and train_iter leave compile out: compiling R3GAN's D, or G and D, takes minutes
# (`python -m benchmarks --bench r1r2_step train_iter` runs it).
run_bench overhead 10 --quick
run_bench r1_step 34 --quick
run_bench r1r2_step 33 --quick --provider eager fastgan
run_bench train_iter 28 --quick --provider eager fastgan
run_bench conv2d_act 42 --quick
run_bench bias_act 16 --quick
run_bench grad_sq_norm 12 --quick
run_bench upfirdn2d 14 --quick

section "report"
"$PY" -m benchmarks --report-only 2>&1 | tee -a "$LOGS/bench.log"
slug=$("$PY" -c 'import torch; from benchmarks.timing import device_name, slug; print(slug(device_name(torch.device("cuda"))))')

section "done in $((SECONDS - START)) s"
if [ ${#failed[@]} -gt 0 ]; then
  printf 'FAILED: %s\n' "${failed[@]}"
fi
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  cp "benchmarks/results/$slug.json" "benchmarks/results/$slug.md" "benchmarks/results/$slug.png" \
     benchmarks/results/counts.md "$LOGS/env.log" "$LOGS/tests.log" "$LOGS/bench.log" \
     "$LOGS/choices.json" "$OUT/" 2>/dev/null
  echo "copied results and logs to $OUT"
fi
[ ${#failed[@]} -eq 0 ]
