"""Where fastgan caches things, and writing files so that a crash never leaves half a file.

Imports nothing from fastgan, so every layer (ops, train, benchmarks) can use it.
"""
from __future__ import annotations

import os
import stat
import tempfile
import threading
from pathlib import Path

_UMASK_LOCK = threading.Lock()


def cache_dir() -> Path:
    """``$FASTGAN_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastgan``, else ``~/.cache/fastgan``."""
    if os.environ.get("FASTGAN_CACHE_DIR"):
        return Path(os.environ["FASTGAN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fastgan"


def _proc_umask() -> int | None:
    """The umask from ``/proc/self/status`` (Linux 4.7 and later), else ``None``."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def current_umask() -> int:
    """The process's file-creation mask. Read from ``/proc`` where possible; else set (to the
    stricter 0o077) and restored at once, under a lock, since ``os.umask`` can only be read by
    changing it."""
    mask = _proc_umask()
    if mask is not None:
        return mask
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def atomic_write(path, write) -> None:
    """Call ``write(file_object)`` on a temporary file in ``path``'s directory (named
    ``.<name>.*.tmp``), flush it to disk, then rename it to ``path``: readers see the old
    file or the complete new one, never a partial one. The file gets the mode a plain
    ``open(path, "wb")`` would leave: an existing file's, else 0o666 less the umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~current_umask()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.chmod(tmp, mode)  # mkstemp creates it 0o600
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
