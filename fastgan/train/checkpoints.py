"""Checkpoints that survive crashes: written atomically, loadable with
``torch.load(path, weights_only=True)`` (only tensors and plain Python types inside), and on
resume the newest one that loads is used, skipping any that are damaged.

Files: ``<run>/checkpoints/ckpt-<step:08d>.pt`` where ``step`` counts completed training
steps. A checkpoint is a dict with ``format``, ``step`` and whatever the trainer stores.
``<run>/checkpoints/best.json`` names the run's best checkpoint (lowest FID), which pruning
keeps.
"""
from __future__ import annotations

import json
import logging
import random
import re
from pathlib import Path

import numpy as np
import torch

from fastgan.files import atomic_write

log = logging.getLogger("fastgan.train")

FORMAT = 1
BEST_FILE = "best.json"
_NAME = re.compile(r"^ckpt-(\d{8})\.pt$")


def checkpoint_dir(run_dir) -> Path:
    return Path(run_dir) / "checkpoints"


def _checkpoints(run_dir) -> list[tuple[int, Path]]:
    """``(step, path)`` of the checkpoint files, newest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found, reverse=True)


def has_checkpoints(run_dir) -> bool:
    return bool(_checkpoints(run_dir))


def save_checkpoint(run_dir, state: dict, keep: int = 3, best: dict | None = None) -> Path:
    """Write ``state`` (which must hold ``step``) atomically; with ``best`` (``{'fid', 'kid'}``)
    record it as the run's best checkpoint; then delete all but the newest ``keep`` checkpoints
    (``keep <= 0`` keeps all) and the best one."""
    path = checkpoint_dir(run_dir) / f"ckpt-{state['step']:08d}.pt"
    atomic_write(path, lambda f: torch.save({"format": FORMAT, **state}, f))
    if best is not None:
        record = {"step": state["step"], "checkpoint": path.name, "fid": best["fid"],
                  "kid": best["kid"]}
        atomic_write(checkpoint_dir(run_dir) / BEST_FILE,
                     lambda f: f.write(json.dumps(record, indent=2).encode()))
    if keep > 0:
        best_step = (best_checkpoint(run_dir) or {}).get("step")
        for step, old in _checkpoints(run_dir)[keep:]:
            if step != best_step:
                old.unlink(missing_ok=True)
    return path


def best_checkpoint(run_dir) -> dict | None:
    """The record of the run's best checkpoint, ``{'step', 'checkpoint', 'fid', 'kid'}``
    (``checkpoint``: its file name), or ``None`` if none was recorded (or it is unreadable)."""
    try:
        record = json.loads((checkpoint_dir(run_dir) / BEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def load_latest(run_dir, required=("step",)) -> tuple[dict, Path] | None:
    """The newest checkpoint that loads and holds the ``required`` keys, with its path, or
    ``None`` when there is none. Damaged ones are skipped with a warning; temporary files left
    by a write that never finished are removed."""
    folder = checkpoint_dir(run_dir)
    for tmp in folder.glob(".ckpt-*.tmp") if folder.is_dir() else []:
        log.warning("removing %s, left by a checkpoint write that did not finish", tmp)
        tmp.unlink(missing_ok=True)
    for step, path in _checkpoints(run_dir):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated zip, bad pickle, I/O error: all mean "not usable"
            log.warning("ignoring checkpoint %s: it cannot be loaded (%s: %s)", path,
                        type(e).__name__, e)
            continue
        missing = [k for k in ("format", *required) if k not in state]
        if missing or state["format"] != FORMAT or state["step"] != step:
            log.warning("ignoring checkpoint %s: not a complete fastgan checkpoint of format "
                        "%d (missing %s)", path, FORMAT, missing)
            continue
        return state, path
    return None


def rng_state(device: torch.device) -> dict:
    """The global RNG states (torch CPU, CUDA of ``device``, numpy, Python) as tensors and
    plain types."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
        "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore what ``rng_state`` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
