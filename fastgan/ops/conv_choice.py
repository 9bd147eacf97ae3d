"""Per-problem choice between the implementations of ``conv2d_act``'s forward.

On CUDA the first call for a new problem times every candidate and keeps the fastest;
``FASTGAN_CONV`` forces one (``auto``, the default, chooses), and ``FASTGAN_CONV_CACHE`` names a
JSON file that keeps the choices across processes. In the CPU interpreter and during CUDA-graph
capture nothing is timed. ``fastgan.backend_info()['conv2d_act_choices']`` lists the choices.
"""
from __future__ import annotations

import json
import os
import threading
from typing import Callable

import torch
from triton.testing import do_bench

from fastgan.backend import register_choice_reporter
from fastgan.files import atomic_write

PATHS = ("triton", "cudnn")

_choices: dict[str, dict] = {}
_choices_lock = threading.Lock()
_disk_loaded: set[str] = set()


def forced_path() -> str:
    """``FASTGAN_CONV``: ``auto`` (default), ``triton`` or ``cudnn``."""
    value = os.environ.get("FASTGAN_CONV", "auto").strip().lower() or "auto"
    if value not in ("auto", *PATHS):
        raise ValueError(f"FASTGAN_CONV must be 'auto', 'triton' or 'cudnn', got {value!r}")
    return value


def _cache_file() -> str | None:
    return os.environ.get("FASTGAN_CONV_CACHE") or None


def read_cache_file(path: str) -> dict:
    """The choices saved in ``path`` (an empty dict if it is missing or unreadable)."""
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def write_cache_file(path: str, key: str, entry: dict) -> None:
    """Merge ``entry`` under ``key`` into the JSON file ``path`` atomically."""
    data = read_cache_file(path)
    data[key] = entry
    text = json.dumps(data, indent=1, sort_keys=True)
    atomic_write(path, lambda f: f.write(text.encode()))


def _time_ms(fn) -> float:
    fn()  # compiles and autotunes outside the timed runs
    return float(do_bench(fn, warmup=10, rep=40, return_mode="median"))


def choose(key: str, candidates: dict[str, Callable[[], object]], timeable: bool) -> str:
    """The path for the problem ``key``: forced by ``FASTGAN_CONV``, else cached, else (when
    ``timeable``) the fastest of ``candidates`` (name -> a call running that path once),
    else ``'triton'``."""
    forced = forced_path()
    if forced != "auto":
        return forced
    path = _cache_file()
    with _choices_lock:
        if path and path not in _disk_loaded:
            _disk_loaded.add(path)
            for k, entry in read_cache_file(path).items():
                if isinstance(entry, dict) and entry.get("path") in PATHS:
                    _choices.setdefault(k, dict(entry, source="file"))
        if key in _choices:
            return _choices[key]["path"]
    if not timeable or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
        return "triton"
    times = {name: _time_ms(run) for name, run in candidates.items()}
    entry = {"path": min(times, key=times.get), **{f"{n}_ms": t for n, t in times.items()}}
    with _choices_lock:
        _choices[key] = dict(entry, source="timed")
        if path:
            write_cache_file(path, key, entry)
    return entry["path"]


def clear_choices() -> None:
    """Forget every choice held in memory (the cache file is left as it is)."""
    with _choices_lock:
        _choices.clear()
        _disk_loaded.clear()


def _report_choices() -> dict:
    with _choices_lock:
        return {"mode": forced_path(), "cache_file": _cache_file(),
                "choices": {k: dict(v) for k, v in _choices.items()}}


register_choice_reporter("conv2d_act", _report_choices)
