"""What a run leaves for people to read: ``metrics.jsonl``, sample grids and a loss curve."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from fastgan.files import atomic_write


class MetricsLog:
    """``metrics.jsonl``: one JSON object per training step, ``step`` 0-based.

    Opening it for a run that resumes at ``start_step`` drops the rows of later steps (they
    will be written again) and any partial last line.
    """

    def __init__(self, path, start_step: int = 0):
        self.path = Path(path)
        rows = [r for r in read_metrics(self.path) if r["step"] < start_step]
        atomic_write(self.path, lambda f: f.write("".join(json.dumps(r) + "\n"
                                                          for r in rows).encode()))
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path) -> list[dict]:
    """The rows of a ``metrics.jsonl`` (a missing file has none; a damaged line is skipped)."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def image_grid(images: torch.Tensor, columns: int, pad: int = 2) -> np.ndarray:
    """``[N, C, H, W]`` in ``[-1, 1]`` -> uint8 grid ``[rows * (h + pad) + pad, columns *
    (w + pad) + pad, C]`` with mid-gray lines of ``pad`` pixels between the images, each
    enlarged (nearest) to ``h, w`` of at least 64 pixels."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    n, c, h, w = x.shape
    scale = max(1, 64 // max(h, w))
    h, w = h * scale, w * scale
    x = x.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    rows = math.ceil(n / columns)
    grid = torch.full((c, rows * (h + pad) + pad, columns * (w + pad) + pad), 128,
                      dtype=torch.uint8)
    for i in range(n):
        top, left = pad + (i // columns) * (h + pad), pad + (i % columns) * (w + pad)
        grid[:, top:top + h, left:left + w] = x[i]
    return grid.permute(1, 2, 0).numpy()


def save_grid(images: torch.Tensor, path, columns: int = 8) -> None:
    """Save ``images`` (``[N, C, H, W]`` in ``[-1, 1]``, C 1 or 3) as one PNG grid."""
    from PIL import Image

    grid = image_grid(images, columns)
    picture = Image.fromarray(grid[:, :, 0] if grid.shape[2] == 1 else grid)
    atomic_write(path, lambda f: picture.save(f, format="PNG"))


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if len(values) < window or window < 2:
        return values
    return np.convolve(values, np.ones(window) / window, mode="valid")


def plot_curves(rows: list[dict], path) -> None:
    """A PNG with the G and D losses (moving average), R1's mean ``||grad||^2`` and, where
    logged, the digits' Frechet distance, FID and KID, against the step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("loss", ["loss_D", "loss_G"]), ("R1: mean ||grad_x D||^2", ["r1"]),
              ("Frechet distance (digits classifier)", ["fd"]), ("FID (Inception-v3)", ["fid"]),
              ("KID (Inception-v3)", ["kid"])]
    panels = [(t, keys) for t, keys in panels if any(k in r for r in rows for k in keys)]
    if not panels:
        return
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.6 * len(panels)), squeeze=False)
    for ax, (title, keys) in zip(axes[:, 0], panels):
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if not pts:
                continue
            steps, values = map(np.asarray, zip(*pts))
            window = max(1, len(values) // 50) if key.startswith("loss") else 1
            ax.plot(steps[window - 1:], _smooth(values, window), label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=90))
    plt.close(fig)
