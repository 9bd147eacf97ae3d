"""The results files: ``<gpu-slug>.json`` (docs/design.md section 7), ``<gpu-slug>.md`` and
``<gpu-slug>.png``; a ``--device cpu`` run's are named by the CPU (``cpu-amd-epyc-2-cores``).

A run merges its rows into the device's existing JSON: a row of the same (bench, mode, shape,
dtype, provider) is replaced, others are kept, so a partial rerun updates only its rows.
The header (versions, date, copy bandwidth) is the latest run's.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from benchmarks.common import PROVIDERS
from fastgan.files import atomic_write

HEADER_KEYS = ("device", "torch", "triton", "fastgan", "date", "copy_gbps")
ROW_KEYS = ("bench", "mode", "shape", "dtype", "provider", "median_ms", "p20_ms", "p80_ms",
            "peak_mem_mb", "gbps", "status", "note")
STATUSES = ("ok", "unsupported", "error")
COUNTS_FILE = "counts.json"  # python -m benchmarks --count (benchmarks/counts.py), not timings
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
MARKERS = ("o", "s", "^", "D")
# Charts: a row of a panel is ROW_IN inches; a figure at most MAX_FIGURE_IN * DPI pixels.
DPI = 110
MAX_FIGURE_IN = 18.0
ROW_IN, PANEL_IN, TITLE_IN, COLUMN_IN = 0.17, 0.8, 0.5, 8.5
ONE_COLUMN_ROWS = 40
NICE_MANTISSAS = ((1,), (1, 2, 5), (1, 1.5, 2, 3, 5, 7), (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 9))
MAX_TICKS = 12
SI_PREFIXES = ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))

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


def merge(old: dict | None, header: dict, rows: list[dict], keys=HEADER_KEYS) -> dict:
    """``header``'s ``keys`` with ``old``'s rows (if from the same device), updated by
    ``rows``."""
    kept = list(old["results"]) if old and old.get("device") == header["device"] else []
    index = {row_key(r): i for i, r in enumerate(kept)}
    for row in rows:
        if row_key(row) in index:
            kept[index[row_key(row)]] = row
        else:
            index[row_key(row)] = len(kept)
            kept.append(row)
    return {**{k: header[k] for k in keys}, "results": kept}


def write_json(path: Path, doc: dict) -> None:
    """Write ``doc`` atomically (temp file + rename): an interrupted run leaves the old file."""
    text = json.dumps(doc, indent=1) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def group_rows(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
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


def short_dtype(dtype: str) -> str:
    return {"bfloat16": "bf16", "float32": "fp32"}.get(dtype, dtype)


def fmt(value, spec: str, suffix: str = "") -> str:
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


class Notes:
    """The numbered notes under a table: ``mark(text, note)`` gives ``text [n]``, ``n`` the
    number of ``note`` (in the order first marked); ``lines()`` lists them."""

    def __init__(self):
        self._numbers: dict[str, int] = {}

    def mark(self, text: str, note: str | None) -> str:
        if not note:
            return text
        number = self._numbers.setdefault(note, len(self._numbers) + 1)
        return f"{text} [{number}]".strip()

    def lines(self) -> list[str]:
        if not self._numbers:
            return []
        return ["", "Notes:", ""] + [f"{number}. {' '.join(text.split())}"
                                     for text, number in self._numbers.items()]


def table(head: list[str], rows: list[list[str]], left: int = 4) -> list[str]:
    """The lines of a markdown table: ``left`` left-aligned columns, the others right."""
    rule = ["---"] * left + ["---:"] * (len(head) - left)
    return ["| " + " | ".join(cells) + " |" for cells in [head, rule, *rows]]


def markdown(doc: dict, flops: dict[tuple, float]) -> str:
    """The results as a markdown table; ``flops`` maps (bench, mode, shape, dtype) to FLOPs.
    Columns: each provider's time, each comparison's speedup, the rate of fastgan and ext,
    peak memory; those without a value in any row are left out."""
    notes = Notes()

    def time_cell(row: dict | None) -> str:
        if row is None:
            return ""
        if row["status"] != "ok":
            return notes.mark(row["status"], row["note"])
        return notes.mark(fmt(row["median_ms"], ".4g"), row.get("note"))

    def rate_cell(key: tuple, row: dict | None) -> str:
        if not row or row["status"] != "ok":
            return ""
        if row.get("gbps") and key[0] in ("bias_act", "grad_sq_norm", "upfirdn2d"):
            return f"{row['gbps']:.3g} GB/s" + (f" ({100 * row['gbps'] / copy:.0f}%)"
                                                if copy else "")
        return f"{flops[key] / row['median_ms'] / 1e9:.3g} TFLOP/s" if flops.get(key) else ""

    copy = doc.get("copy_gbps")
    groups = group_rows(doc["results"])
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
    rows = []
    for key, group in groups.items():
        bench, mode, shape, dtype = key
        cells = [bench, mode, shape, short_dtype(dtype)]
        cells += [time_cell(group.get(p)) for p in providers]
        cells += [fmt(speedup(group, fast, base), ".2f", "x") for fast, base in comparisons]
        cells += [rate_cell(key, group.get(p)) for p in rated]
        if peaks:
            cells.append(" / ".join(fmt(group.get(p, {}).get("peak_mem_mb"), ".0f") or "-"
                                    for p in peaks))
        rows.append(cells)
    lines = [
        f"# fastgan benchmarks: {doc['device']}",
        "",
        f"torch {doc['torch']}, triton {doc['triton']}, fastgan {doc['fastgan']}, "
        f"{doc['date']}; measured copy: {fmt(copy, '.0f', ' GB/s')}.",
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
        *table(head, rows),
        *notes.lines(),
    ]
    return "\n".join(lines) + "\n"


def si(value: float) -> str:
    """``value`` to 3 significant digits with an SI prefix and a space: ``1.5e9`` ->
    ``'1.5 G'``, ``12`` -> ``'12 '`` (append the unit)."""
    for scale, prefix in SI_PREFIXES:
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}"
    return f"{value:.3g} "


def log_ticks(lo: float, hi: float, min_ticks: int = 4) -> list[float]:
    """Tick values for a log axis from ``lo`` to ``hi`` (``0 < lo < hi``): the coarsest series
    of ``NICE_MANTISSAS`` that puts ``min_ticks`` ticks in the range (else the finest), at most
    ``MAX_TICKS`` of them (a wide range keeps every k-th)."""
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    ticks: list[float] = []
    for mantissas in NICE_MANTISSAS:
        ticks = [v for d in decades for m in mantissas if lo <= (v := float(f"{m}e{d}")) <= hi]
        if len(ticks) >= min_ticks:
            break
    return ticks[::math.ceil(len(ticks) / MAX_TICKS) or 1]


def log_axis(ax, lo: float, hi: float, label) -> None:
    """``ax``'s x axis on a log scale from ``lo`` to ``hi``, with a tick labelled
    ``label(value)`` at each of ``log_ticks(lo, hi)`` and none between."""
    import matplotlib.ticker as ticker

    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ax.xaxis.set_major_locator(ticker.FixedLocator(log_ticks(lo, hi)))
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: label(v)))
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(axis="x", linewidth=0.4, alpha=0.5)


def columns_of(panels: list[tuple[str, list]], columns: int) -> list[list[tuple[str, list]]]:
    """``panels`` (name, rows) in order, split into up to ``columns`` columns of about the
    same number of rows (a panel is never split)."""
    total = sum(len(rows) for _, rows in panels)
    out: list[list] = [[]]
    filled = 0
    for panel in panels:
        if out[-1] and len(out) < columns and filled >= total * len(out) / columns:
            out.append([])
        out[-1].append(panel)
        filled += len(panel[1])
    return out


def panel_figure(panels: list[tuple[str, list]], title: str):
    """A figure with one axes per panel ``(name, rows)``, its height proportional to its
    rows: one column, or two when there are more than ``ONE_COLUMN_ROWS`` rows; at most
    ``MAX_FIGURE_IN`` inches on each side (rows shrink to fit). Returns ``(fig, axes,
    row_fontsize)``, ``axes`` in the order of ``panels``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows = sum(len(rows) for _, rows in panels)
    columns = columns_of(panels, 2 if n_rows > ONE_COLUMN_ROWS else 1)
    heights = [sum(ROW_IN * len(rows) + PANEL_IN for _, rows in col) for col in columns]
    height = min(max(heights) + TITLE_IN, MAX_FIGURE_IN)
    shrink = (height - TITLE_IN) / max(heights)
    fig = plt.figure(figsize=(COLUMN_IN * len(columns), height), dpi=DPI, layout="constrained")
    fig.suptitle(title, fontsize=10)
    axes = []
    for subfig, col in zip(fig.subfigures(1, len(columns), squeeze=False)[0], columns):
        ratios = [ROW_IN * len(rows) + PANEL_IN for _, rows in col]
        axes += list(subfig.subplots(len(col), 1, squeeze=False,
                                     gridspec_kw={"height_ratios": ratios})[:, 0])
    return fig, axes, max(5.0, 6.5 * min(1.0, shrink))


def speedup_figure(doc: dict):
    """The chart of a results document: a panel per bench, a row per case with one marker
    per comparison that has a ratio (fastgan over eager and compile, ext over eager and
    fastgan) on a log scale, 1x marked."""
    groups = group_rows(doc["results"])
    _, comparisons = _present(groups)
    per_bench: dict[str, list] = {}
    for (bench, mode, shape, dtype), group in groups.items():
        ups = {pair: speedup(group, *pair) for pair in comparisons}
        if any(ups.values()):
            per_bench.setdefault(bench, []).append((f"{mode} {shape} {short_dtype(dtype)}", ups))
    title = f"{doc['device']}  (torch {doc['torch']}, {doc['date']})"
    fig, axes, fontsize = panel_figure(list(per_bench.items()) or [("", [])], title)
    if not per_bench:
        axes[0].text(0.5, 0.5, "no comparable results", ha="center", va="center")
        axes[0].set_axis_off()
        return fig
    offsets = [0.5 * (i / max(len(comparisons) - 1, 1) - 0.5) if len(comparisons) > 1 else 0.0
               for i in range(len(comparisons))]
    for ax, (bench, items) in zip(axes, per_bench.items()):
        ratios = [1.0]
        for pair, color, marker, offset in zip(comparisons, COLORS, MARKERS, offsets):
            points = [(ups[pair], y + offset) for y, (_, ups) in enumerate(items) if ups[pair]]
            xs, ys = [x for x, _ in points], [y for _, y in points]
            ax.hlines(ys, 1.0, xs, color=color, linewidth=1.0)
            ax.scatter(xs, ys, color=color, marker=marker, s=16, zorder=3,
                       label=f"{pair[0]} vs {pair[1]}")
            ratios += xs
        log_axis(ax, min(ratios) / 1.25, max(ratios) * 1.25, lambda v: f"{v:g}x")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(items)), [label for label, _ in items], fontsize=fontsize)
        ax.set_ylim(len(items) - 0.5, -0.5)
        ax.set_title(f"{bench}: speedup of A vs B (log scale; right of 1x: A faster)",
                     fontsize=9)
        ax.legend(fontsize=7, loc="best")
    return fig


def plot(doc: dict, path: Path) -> None:
    """Write ``speedup_figure(doc)`` to ``path`` (PNG)."""
    import matplotlib.pyplot as plt

    fig = speedup_figure(doc)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def results_files(folder: Path) -> list[Path]:
    """The timing results files in ``folder``: every ``*.json`` but ``COUNTS_FILE``."""
    return sorted(p for p in folder.glob("*.json") if p.name != COUNTS_FILE)


def write_reports(json_path: Path, flops: dict[tuple, float]) -> list[Path]:
    """Write ``<slug>.md`` and ``<slug>.png`` beside ``json_path`` from its contents."""
    doc = load(json_path)
    md_path, png_path = json_path.with_suffix(".md"), json_path.with_suffix(".png")
    md_path.write_text(markdown(doc, flops))
    plot(doc, png_path)
    return [md_path, png_path]
