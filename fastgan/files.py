"""Where fastgan caches things, and writing files so that a crash never leaves half a file.

Imports nothing from fastgan, so every layer (ops, train, benchmarks) can use it.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    """``$FASTGAN_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastgan``, else ``~/.cache/fastgan``."""
    if os.environ.get("FASTGAN_CACHE_DIR"):
        return Path(os.environ["FASTGAN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fastgan"


def atomic_write(path, write) -> None:
    """Call ``write(file_object)`` on a temporary file in ``path``'s directory (named
    ``.<name>.*.tmp``), flush it to disk, then rename it to ``path``: readers see the old
    file or the complete new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
