"""``results/counts.md`` and ``counts.png`` from ``counts.json`` (docs/design.md section 7).

The markdown has one table for the op benches and one for whole steps: per case and provider
(eager / fastgan-triton / fastgan-cudnn, ``e / t / c``) the kernels, bytes and FLOPs, the
floor on the first GPU of ``counts.GPUS``, the bound on fastgan's speed-up on every GPU, and
the launches' host time. For each GPU results file beside it (``<gpu-slug>.json``, section 7)
whose GPU has data-sheet figures, a table puts the predicted floors next to the measured
medians. The chart shows the bytes and kernels of every whole step.
"""
from __future__ import annotations

from pathlib import Path

from benchmarks import report
from benchmarks.cases import MODEL_BENCHES
from benchmarks.counts import COUNT_PROVIDERS, GPUS, gpu_for

SHORT = {"eager": "e", "fastgan-triton": "t", "fastgan-cudnn": "c"}
FASTGAN = ("fastgan-triton", "fastgan-cudnn")
LEGEND = " / ".join(SHORT.values())
CHART_ROW_IN = 0.32  # three bars per row


def _ok(row: dict | None) -> bool:
    return bool(row) and row["status"] == "ok"


def _bytes(row: dict) -> float:
    return row["bytes_read"] + row["bytes_written"]


def _count(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def bound(group: dict, gpu: str, fastgan: str | None = None) -> float | None:
    """Eager's floor on ``gpu`` over ``fastgan``'s (default: the lower of the two fastgan
    providers'): the largest speed-up the counts allow."""
    eager = group.get("eager")
    rows = [group.get(p) for p in ([fastgan] if fastgan else FASTGAN)]
    floors = [r["floor_ms"][gpu] for r in rows if _ok(r)]
    if not _ok(eager) or not floors or not min(floors):
        return None
    return eager["floor_ms"][gpu] / min(floors)


def _cells(group: dict, notes: report.Notes, launch_us: float) -> list[str]:
    """The counted columns of one case (see ``markdown``)."""
    def per_provider(value) -> str:
        cells = []
        for provider in COUNT_PROVIDERS:
            row = group.get(provider)
            if row is None:
                cells.append("-")
            elif row["status"] != "ok":
                cells.append(notes.mark(row["status"], row["note"]))
            else:
                cells.append(value(row))
        return " / ".join(cells)

    def bounds(gpu: str) -> str:
        return " / ".join(report.fmt(bound(group, gpu, p), ".2f", "x") or "-" for p in FASTGAN)

    first = GPUS[0].name
    return ([per_provider(lambda r: _count(r["launches"])),
             per_provider(lambda r: report.si(_bytes(r)) + "B"),
             per_provider(lambda r: report.si(r["flops"]).strip()),
             per_provider(lambda r: f"{r['floor_ms'][first]:.3g}")]
            + [bounds(g.name) for g in GPUS]
            + [per_provider(lambda r: f"{r['launches'] * launch_us / 1e3:.3g}")])


def _case_table(groups: dict, notes: report.Notes, launch_us: float) -> list[str]:
    head = (["bench", "mode", "shape", "dtype", f"kernels {LEGEND}", f"bytes {LEGEND}",
             f"FLOP {LEGEND}", f"{GPUS[0].name} floor ms {LEGEND}"]
            + [f"bound {g.name} t / c" for g in GPUS] + [f"launch ms {LEGEND}"])
    rows = [[bench, mode, shape, report.short_dtype(dtype), *_cells(group, notes, launch_us)]
            for (bench, mode, shape, dtype), group in groups.items()]
    return report.table(head, rows)


def measured_table(counts: dict, results: dict) -> list[str]:
    """Predicted floors beside measured medians for the GPU of ``results`` (a results
    document, docs/design.md section 7), for every case both have; [] when the GPU has no
    ``GPUS`` entry or no case matches."""
    gpu = gpu_for(results["device"])
    if gpu is None:
        return []
    measured = report.group_rows(results["results"])
    rows = []
    for key, group in report.group_rows(counts["results"]).items():
        timed = measured.get(key, {})
        eager, fastgan = timed.get("eager"), timed.get("fastgan")
        if not (_ok(eager) or _ok(fastgan)) or not _ok(group.get("eager")):
            continue
        fastgan_floors = [group[p]["floor_ms"][gpu.name] for p in FASTGAN if _ok(group.get(p))]
        ms = [r["median_ms"] if _ok(r) else None for r in (eager, fastgan)]
        rows.append([*key[:3], report.short_dtype(key[3]),
                     f"{group['eager']['floor_ms'][gpu.name]:.3g}", report.fmt(ms[0], ".4g"),
                     " / ".join(f"{f:.3g}" for f in fastgan_floors), report.fmt(ms[1], ".4g"),
                     report.fmt(bound(group, gpu.name), ".2f", "x"),
                     report.fmt(report.speedup(timed, "fastgan", "eager"), ".2f", "x")])
    if not rows:
        return []
    head = ["bench", "mode", "shape", "dtype", "eager floor ms", "eager ms",
            "fastgan floor ms t / c", "fastgan ms", "bound", "measured speedup"]
    return [f"## Predicted and measured: {results['device']} ({gpu.name} figures)", "",
            f"Measured: `{results['date']}`, torch {results['torch']}, fastgan "
            f"{results['fastgan']}. *bound*: eager's floor / the lower fastgan floor; "
            "*measured speedup*: eager ms / fastgan ms (fastgan as the timing run ran it: the "
            "per-shape conv choice on CUDA).", "", *report.table(head, rows), ""]


def markdown(doc: dict, results_docs: list[dict]) -> str:
    """The counts document as markdown, with a predicted-and-measured table for each of
    ``results_docs`` (results documents of GPUs)."""
    notes = report.Notes()
    groups = report.group_rows(doc["results"])
    steps = {k: g for k, g in groups.items() if k[0] in MODEL_BENCHES}
    ops = {k: g for k, g in groups.items() if k[0] not in MODEL_BENCHES}
    gpus = [[g["name"], g["source"], f"{g['bandwidth_tbps']:g}", f"{g['bf16_tflops']:g}",
             f"{g['tf32_tflops']:g}"] for g in doc["gpus"]]
    lines = [
        "# fastgan counts: kernels, bytes and FLOPs, and the floors they give",
        "",
        f"torch {doc['torch']}, triton {doc['triton']}, fastgan {doc['fastgan']}, "
        f"{doc['date']}. Counted on meta tensors at the benchmark shapes "
        "(`python -m benchmarks --count`); nothing here was timed.",
        "",
        f"Providers ({LEGEND}): eager PyTorch; fastgan with every `conv2d_act` forward the "
        "Triton kernel (`fastgan-triton`) or `F.conv2d` then `bias_act` (`fastgan-cudnn`); on "
        "a GPU the per-shape choice takes one of them per layer. *kernels*: launches per call "
        "(per iteration for `train_iter`). *bytes*: read and written by those kernels, each "
        "tensor once per kernel, as if nothing stayed in cache. *FLOP*: convolutions and "
        "matmuls, 2 x multiply-adds. *floor*: max(bytes / HBM bandwidth, FLOP / dense "
        "tensor-core peak of the dtype, TF32 for fp32). *bound*: eager's floor / fastgan's, "
        "the largest speed-up these counts allow. *launch ms*: kernels x "
        f"{doc['launch_us']:g} us, the host time to enqueue them (a CUDA graph removes it). "
        "What counts as a kernel and its bytes: `benchmarks/counts.py`.",
        "",
        *report.table(["GPU", "data sheet", "HBM TB/s", "dense bf16 TFLOP/s",
                       "dense TF32 TFLOP/s"], gpus, 2),
        "",
    ]
    for title, part in (("Whole steps", steps), ("Ops", ops)):
        if part:
            lines += [f"## {title}", "", *_case_table(part, notes, doc["launch_us"]), ""]
    for results in results_docs:
        lines += measured_table(doc, results)
    return "\n".join(lines + notes.lines()).rstrip("\n") + "\n"


def plot(doc: dict, path: Path) -> None:
    """The bytes and the kernels of every whole step (``MODEL_BENCHES``), per provider, on
    log scales."""
    import matplotlib.pyplot as plt

    steps = [(f"{bench} {mode} {shape} {report.short_dtype(dtype)}", group)
             for (bench, mode, shape, dtype), group in report.group_rows(doc["results"]).items()
             if bench in MODEL_BENCHES]
    height = min(len(steps) * CHART_ROW_IN + report.PANEL_IN + report.TITLE_IN,
                 report.MAX_FIGURE_IN)
    fig, axes = plt.subplots(1, 2, sharey=True, figsize=(2 * report.COLUMN_IN, height),
                             dpi=report.DPI, layout="constrained")
    fig.suptitle(f"fastgan counts per step, per iteration for train_iter (torch {doc['torch']}, "
                 f"{doc['date']})", fontsize=10)
    measures = (("bytes read + written", _bytes, lambda v: report.si(v) + "B"),
                ("kernels launched", lambda r: r["launches"], lambda v: report.si(v).strip()))
    bar = 0.8 / len(COUNT_PROVIDERS)
    for ax, (title, value, label) in zip(axes, measures):
        values = []
        for i, (provider, color) in enumerate(zip(COUNT_PROVIDERS, report.COLORS)):
            bars = [(value(g[provider]), y) for y, (_, g) in enumerate(steps)
                    if _ok(g.get(provider))]
            offset = (i - (len(COUNT_PROVIDERS) - 1) / 2) * bar
            ax.barh([y + offset for _, y in bars], [v for v, _ in bars], height=bar,
                    color=color, label=provider)
            values += [v for v, _ in bars if v > 0]
        if values:
            report.log_axis(ax, min(values) / 1.5, max(values) * 1.5, label)
        ax.set_title(f"{title} (log scale)", fontsize=9)
    axes[0].set_yticks(range(len(steps)), [text for text, _ in steps], fontsize=6.5)
    axes[0].set_ylim(len(steps) - 0.5, -0.5)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.savefig(path, dpi=report.DPI)
    plt.close(fig)


def write_reports(json_path: Path) -> list[Path]:
    """Write ``counts.md`` and ``counts.png`` beside ``json_path``, with the GPU results
    files found there."""
    doc = report.load(json_path)
    results = [report.load(p) for p in report.results_files(json_path.parent)]
    md_path, png_path = json_path.with_suffix(".md"), json_path.with_suffix(".png")
    md_path.write_text(markdown(doc, [r for r in results if gpu_for(r["device"])]))
    plot(doc, png_path)
    return [md_path, png_path]
