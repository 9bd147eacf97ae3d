"""The results files: ``<gpu-slug>.json`` (docs/design.md section 7), ``<gpu-slug>.md`` and
``<gpu-slug>.png``.

A run merges its rows into the GPU's existing JSON: a row of the same (bench, mode, shape,
dtype, provider) is replaced, others are kept, so a partial rerun updates only its rows.
The header (versions, date, copy bandwidth) is the latest run's.
"""
from __future__ import annotations

import json
from pathlib import Path

from fastgan.files import atomic_write

HEADER_KEYS = ("device", "torch", "triton", "fastgan", "date", "copy_gbps")
ROW_KEYS = ("bench", "mode", "shape", "dtype", "provider", "median_ms", "p20_ms", "p80_ms",
            "peak_mem_mb", "gbps", "status", "note")
STATUSES = ("ok", "unsupported", "error")
TIMING_TEXT = {
    "cuda": "Times are medians in ms (`triton.testing.do_bench`, CUDA events, after warm-up, "
            "inputs rotated past L2).",
    "cpu": "CPU smoke run (tiny sizes, `time.perf_counter`): it tests the harness; its times "
           "say nothing about fastgan on a GPU.",
}

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


def speedups(providers: dict[str, dict]) -> dict[str, float | None]:
    """fastgan's speedup over eager and over compile: their median time / fastgan's."""
    fast = _ok_ms(providers.get("fastgan"))
    out = {}
    for base in ("eager", "compile"):
        other = _ok_ms(providers.get(base))
        out[base] = other / fast if fast and other else None
    return out


def _short(dtype: str) -> str:
    return {"bfloat16": "bf16", "float32": "fp32"}.get(dtype, dtype)


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "" if value is None else format(value, spec) + suffix


def markdown(doc: dict, flops: dict[tuple, float]) -> str:
    """The results as a markdown table; ``flops`` maps (bench, mode, shape, dtype) to FLOPs."""
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

    copy = doc.get("copy_gbps")
    lines = [
        f"# fastgan benchmarks: {doc['device']}",
        "",
        f"torch {doc['torch']}, triton {doc['triton']}, fastgan {doc['fastgan']}, "
        f"{doc['date']}; measured device-to-device copy: {_fmt(copy, '.0f', ' GB/s')}.",
        "",
        TIMING_TEXT["cpu" if doc["device"] == "cpu" else "cuda"] +
        " *vs eager* / *vs compile* = that provider's time / "
        "fastgan's. *fastgan rate*: GB/s of the bytes the op must move (% of the measured "
        "copy), or TFLOP/s for convolutions. *peak MiB*: memory one call allocates beyond its "
        "inputs, for eager / compile / fastgan. Formulas: benchmarks/NOTES.md.",
        "",
        MODES_TEXT,
        "",
        "| bench | mode | shape | dtype | eager ms | compile ms | fastgan ms | vs eager "
        "| vs compile | fastgan rate | peak MiB e / c / f |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, providers in _groups(doc["results"]).items():
        bench, mode, shape, dtype = key
        fast = providers.get("fastgan")
        rate = ""
        if fast and fast["status"] == "ok":
            if fast.get("gbps") and bench in ("bias_act", "grad_sq_norm"):
                rate = f"{fast['gbps']:.0f} GB/s"
                rate += f" ({100 * fast['gbps'] / copy:.0f}%)" if copy else ""
            elif flops.get(key):
                rate = f"{flops[key] / fast['median_ms'] / 1e9:.3g} TFLOP/s"
        up = speedups(providers)
        peaks = " / ".join(_fmt(providers.get(p, {}).get("peak_mem_mb"), ".0f") or "-"
                           for p in ("eager", "compile", "fastgan"))
        cells = [bench, mode, shape, _short(dtype),
                 time_cell(providers.get("eager")), time_cell(providers.get("compile")),
                 time_cell(fast), _fmt(up["eager"], ".2f", "x"), _fmt(up["compile"], ".2f", "x"),
                 rate, peaks]
        lines.append("| " + " | ".join(cells) + " |")
    if notes:
        lines += ["", "Notes:", ""]
        lines += [f"{number}. {' '.join(text.split())}" for text, number in notes.items()]
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    """One horizontal bar chart per bench: fastgan's speedup over eager and over compile."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    per_bench: dict[str, list] = {}
    for (bench, mode, shape, dtype), providers in _groups(doc["results"]).items():
        up = speedups(providers)
        if up["eager"] or up["compile"]:
            per_bench.setdefault(bench, []).append((f"{mode} {shape} {_short(dtype)}", up))
    heights = [0.22 * len(items) + 1.0 for items in per_bench.values()] or [1.0]
    fig, axes = plt.subplots(len(heights), 1, figsize=(11, sum(heights) + 0.5), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, (bench, items) in zip(axes[:, 0], per_bench.items()):
        ys = range(len(items))
        ratios = [1.0]
        for offset, base, color in ((-0.2, "eager", "tab:blue"), (0.2, "compile", "tab:orange")):
            values = [up[base] or 1.0 for _, up in items]  # no bar where there is no ratio
            ratios += values
            ax.barh([y + offset for y in ys], [v - 1.0 for v in values], left=1.0, height=0.4,
                    color=color, label=f"vs {base}")
        ax.set_xscale("log")
        ax.set_xlim(min(ratios) / 1.25, max(ratios) * 1.25)
        plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)
        ax.tick_params(axis="x", which="both", labelsize=7)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_yticks(list(ys), [label for label, _ in items], fontsize=6)
        ax.invert_yaxis()
        ax.set_title(f"{bench}: fastgan speedup (x, log scale; right of 1 = fastgan faster)",
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
