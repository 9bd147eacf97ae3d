"""The results files: ``<gpu-slug>.json`` (docs/design.md section 7), ``<gpu-slug>.md`` and
``<gpu-slug>.png``; a ``--device cpu`` run's are named by the CPU (``cpu-amd-epyc-2-cores``).

A run merges its rows into the device's existing JSON: a row of the same (bench, mode, shape,
dtype, provider) is replaced, others are kept, so a partial rerun updates only its rows.
The header (versions, date, copy bandwidth) is the latest run's.
"""
from __future__ import annotations

import json
from pathlib import Path

from benchmarks.common import PROVIDERS
from fastgan.files import atomic_write

HEADER_KEYS = ("device", "torch", "triton", "fastgan", "date", "copy_gbps")
ROW_KEYS = ("bench", "mode", "shape", "dtype", "provider", "median_ms", "p20_ms", "p80_ms",
            "peak_mem_mb", "gbps", "status", "note")
STATUSES = ("ok", "unsupported", "error")
TIMING_TEXT = {
    "cuda": "Times are medians in ms (`triton.testing.do_bench`, CUDA events, after warm-up, "
            "inputs rotated past L2).",
    "cpu": "CPU run (`python -m benchmarks --device cpu`): times are medians in ms of calls "
           "timed one by one with `time.perf_counter` after warm-up, inputs rotated past twice "
           "the last-level cache; each row's note says the threads and the malloc setting. "
           "fastgan's Triton kernels run on a CPU only in the interpreter, so there `ext` is "
           "fastgan; the copy is a 256 MiB CPU copy.",
    "smoke": "CPU smoke run (tiny sizes, `time.perf_counter`): it tests the harness; its times "
             "say nothing about fastgan on a GPU.",
}
# (A, B) pairs whose speedup (B's time / A's) the table and plot show, where they have one.
COMPARISONS = (("fastgan", "eager"), ("fastgan", "compile"), ("ext", "eager"),
               ("ext", "fastgan"))
COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:purple")  # one per comparison

MODES_TEXT = (
    "Modes: `fwd`, `bwd`, `fwd+bwd` (ops); `overhead` rows are host time per call, not GPU "
    "time. `step`: the R1 step; `dstep`: the plain D step on the same D (no penalty); "
    "`joint` / `split`: R3GAN's RpGAN + R1 + R2 through one combined batch / R1 then R2; "
    "`iter`: a training iteration; `+graph`: the same, replayed as CUDA graphs.")


def row_key(row: dict) -> tuple:
    return row["bench"], row["mode"], row["shape"], row["dtype"], row["provider"]


def load(path: Path) -> dict | None:
    """The results document at ``path``, or ``None`` if there is none."""
    if not path.exists():
        return None
    with open(path) as f:
        return json.load(f)


def merge(old: dict | None, header: dict, rows: list[dict]) -> dict:
    """``header`` with ``old``'s rows (if from the same device), updated by ``rows``."""
    kept = list(old["results"]) if old and old.get("device") == header["device"] else []
    index = {row_key(r): i for i, r in enumerate(kept)}
    for row in rows:
        if row_key(row) in index:
            kept[index[row_key(row)]] = row
        else:
            index[row_key(row)] = len(kept)
            kept.append(row)
    return {**{k: header[k] for k in HEADER_KEYS}, "results": kept}


def write_json(path: Path, doc: dict) -> None:
    """Write ``doc`` atomically (temp file + rename): an interrupted run leaves the old file."""
    text = json.dumps(doc, indent=1) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def _groups(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    """Rows grouped by (bench, mode, shape, dtype), in first-seen order, then by provider."""
    groups: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        groups.setdefault(row_key(row)[:4], {})[row["provider"]] = row
    return groups


def _ok_ms(row: dict | None) -> float | None:
    return row["median_ms"] if row and row["status"] == "ok" else None


def speedup(providers: dict[str, dict], fast: str, base: str) -> float | None:
    """``base``'s median time / ``fast``'s (``fast`` is faster when > 1), where both are
    ``ok``."""
    fast_ms, base_ms = _ok_ms(providers.get(fast)), _ok_ms(providers.get(base))
    return base_ms / fast_ms if fast_ms and base_ms else None


def _short(dtype: str) -> str:
    return {"bfloat16": "bf16", "float32": "fp32"}.get(dtype, dtype)


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "" if value is None else format(value, spec) + suffix


def timing_text(device: str) -> str:
    """How the rows of a results file for ``device`` were timed: the smoke run's device is
    ``cpu``, a ``--device cpu`` run's ``CPU <model> (<n> cores)``, else a GPU."""
    if device == "cpu":
        return TIMING_TEXT["smoke"]
    return TIMING_TEXT["cpu" if device.startswith("CPU ") else "cuda"]


def _present(groups: dict) -> tuple[list[str], list[tuple[str, str]]]:
    """The providers with rows, in ``PROVIDERS`` order, and the ``COMPARISONS`` that have at
    least one ratio."""
    providers = [p for p in PROVIDERS if any(p in g for g in groups.values())]
    comparisons = [(fast, base) for fast, base in COMPARISONS
                   if any(speedup(g, fast, base) for g in groups.values())]
    return providers, comparisons


def markdown(doc: dict, flops: dict[tuple, float]) -> str:
    """The results as a markdown table; ``flops`` maps (bench, mode, shape, dtype) to FLOPs.
    Columns: each provider's time, each comparison's speedup, the rate of fastgan and ext,
    peak memory; those without a value in any row are left out."""
    notes: dict[str, int] = {}

    def marked(text: str, row: dict | None) -> str:
        if row and row.get("note"):
            number = notes.setdefault(row["note"], len(notes) + 1)
            text = f"{text} [{number}]".strip()
        return text

    def time_cell(row: dict | None) -> str:
        if row is None:
            return ""
        if row["status"] != "ok":
            return marked(row["status"], row)
        return marked(_fmt(row["median_ms"], ".4g"), row)

    def rate_cell(key: tuple, row: dict | None) -> str:
        if not row or row["status"] != "ok":
            return ""
        if row.get("gbps") and key[0] in ("bias_act", "grad_sq_norm", "upfirdn2d"):
            return f"{row['gbps']:.3g} GB/s" + (f" ({100 * row['gbps'] / copy:.0f}%)"
                                                if copy else "")
        return f"{flops[key] / row['median_ms'] / 1e9:.3g} TFLOP/s" if flops.get(key) else ""

    copy = doc.get("copy_gbps")
    groups = _groups(doc["results"])
    providers, comparisons = _present(groups)
    rated = [p for p in ("fastgan", "ext")
             if any(rate_cell(k, g.get(p)) for k, g in groups.items())]
    peaks = [p for p in providers if any(g.get(p, {}).get("peak_mem_mb") is not None
                                         for g in groups.values())]
    head = (["bench", "mode", "shape", "dtype"] + [f"{p} ms" for p in providers]
            + [f"{fast} vs {base}" for fast, base in comparisons]
            + [f"{p} rate" for p in rated]
            + ([f"peak MiB {' / '.join(p[0] if p != 'ext' else 'x' for p in peaks)}"]
               if peaks else []))
    lines = [
        f"# fastgan benchmarks: {doc['device']}",
        "",
        f"torch {doc['torch']}, triton {doc['triton']}, fastgan {doc['fastgan']}, "
        f"{doc['date']}; measured copy: {_fmt(copy, '.0f', ' GB/s')}.",
        "",
        timing_text(doc["device"]) + " *A vs B* = B's time / A's (A faster when > 1). "
        "*rate*: GB/s of the bytes the op must move (% of the measured copy), or TFLOP/s for "
        "convolutions. *peak MiB*: memory one call allocates beyond its inputs, for eager / "
        "compile / fastgan / ext (e / c / f / x). Providers: `fastgan` is the Triton kernels "
        "(on CUDA), `ext` the same ops with the backend forced to the compiled extension. "
        "Formulas: benchmarks/NOTES.md.",
        "",
        MODES_TEXT,
        "",
        "| " + " | ".join(head) + " |",
        "| " + " | ".join(["---"] * 4 + ["---:"] * (len(head) - 4)) + " |",
    ]
    for key, group in groups.items():
        bench, mode, shape, dtype = key
        cells = [bench, mode, shape, _short(dtype)]
        cells += [time_cell(group.get(p)) for p in providers]
        cells += [_fmt(speedup(group, fast, base), ".2f", "x") for fast, base in comparisons]
        cells += [rate_cell(key, group.get(p)) for p in rated]
        if peaks:
            cells.append(" / ".join(_fmt(group.get(p, {}).get("peak_mem_mb"), ".0f") or "-"
                                    for p in peaks))
        lines.append("| " + " | ".join(cells) + " |")
    if notes:
        lines += ["", "Notes:", ""]
        lines += [f"{number}. {' '.join(text.split())}" for text, number in notes.items()]
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    """One horizontal bar chart per bench: the speedup of every comparison that has a ratio
    (fastgan over eager and compile, ext over eager and fastgan)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    groups = _groups(doc["results"])
    _, comparisons = _present(groups)
    per_bench: dict[str, list] = {}
    for (bench, mode, shape, dtype), group in groups.items():
        ups = {pair: speedup(group, *pair) for pair in comparisons}
        if any(ups.values()):
            per_bench.setdefault(bench, []).append((f"{mode} {shape} {_short(dtype)}", ups))
    bar = 0.8 / max(len(comparisons), 1)
    heights = [(0.11 + 0.11 * len(comparisons)) * len(items) + 1.0
               for items in per_bench.values()] or [1.0]
    fig, axes = plt.subplots(len(heights), 1, figsize=(11, sum(heights) + 0.5), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, (bench, items) in zip(axes[:, 0], per_bench.items()):
        ys = range(len(items))
        ratios = [1.0]
        for i, (pair, color) in enumerate(zip(comparisons, COLORS)):
            values = [ups[pair] or 1.0 for _, ups in items]  # no bar where there is no ratio
            ratios += values
            offset = (i - (len(comparisons) - 1) / 2) * bar
            ax.barh([y + offset for y in ys], [v - 1.0 for v in values], left=1.0, height=bar,
                    color=color, label=f"{pair[0]} vs {pair[1]}")
        ax.set_xscale("log")
        ax.set_xlim(min(ratios) / 1.25, max(ratios) * 1.25)
        plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)
        ax.tick_params(axis="x", which="both", labelsize=7)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_yticks(list(ys), [label for label, _ in items], fontsize=6)
        ax.invert_yaxis()
        ax.set_title(f"{bench}: speedup of A vs B (x, log scale; right of 1 = A faster)",
                     fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    if not per_bench:
        axes[0, 0].text(0.5, 0.5, "no comparable results", ha="center", va="center")
        axes[0, 0].set_axis_off()
    fig.suptitle(f"{doc['device']}  (torch {doc['torch']}, {doc['date']})", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reports(json_path: Path, flops: dict[tuple, float]) -> list[Path]:
    """Write ``<slug>.md`` and ``<slug>.png`` beside ``json_path`` from its contents."""
    doc = load(json_path)
    md_path, png_path = json_path.with_suffix(".md"), json_path.with_suffix(".png")
    md_path.write_text(markdown(doc, flops))
    plot(doc, png_path)
    return [md_path, png_path]
