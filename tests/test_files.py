"""fastgan/files.py: atomic_write's contents and file modes, the umask it reads, and the modes
of every file a training run writes."""
import os
import stat
import sys
import threading

import pytest
from test_train import tiny_config

from fastgan import files
from fastgan.files import atomic_write, current_umask
from fastgan.train import train


@pytest.fixture(params=[0o022, 0o077], ids=lambda mask: f"umask={mask:03o}")
def umask(request):
    """Run the test under this process umask; the previous one is restored afterwards."""
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_new_file_gets_the_mode_open_gives(tmp_path, umask):
    path = tmp_path / "sub" / "new.bin"
    atomic_write(path, lambda f: f.write(b"abc"))
    with open(tmp_path / "plain.bin", "wb"):
        pass
    assert path.read_bytes() == b"abc"
    assert mode(path) == mode(tmp_path / "plain.bin") == 0o666 & ~umask
    assert sorted(p.name for p in path.parent.iterdir()) == ["new.bin"]


def test_existing_file_keeps_its_mode(tmp_path, umask):
    path = tmp_path / "kept.txt"
    path.write_bytes(b"old")
    os.chmod(path, 0o640)
    atomic_write(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new" and mode(path) == 0o640


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "data.bin"
    atomic_write(path, lambda f: f.write(b"complete"))

    def write_half(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, write_half)
    assert path.read_bytes() == b"complete"
    assert [p.name for p in tmp_path.iterdir()] == ["data.bin"]


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="no /proc")
def test_umask_is_read_from_proc(umask):
    assert files._proc_umask() == umask
    assert current_umask() == umask
    assert os.umask(umask) == umask  # unchanged


@pytest.mark.parametrize("umask", [0o022], indirect=True)  # not the fallback's own 0o077
def test_umask_fallback_is_safe_across_threads(umask, monkeypatch):
    """Without ``/proc``, ``os.umask`` is set and restored; threads doing it at once must
    neither see each other's temporary mask nor leave it behind (a thread switch every
    microsecond makes an unlocked version fail)."""
    monkeypatch.setattr(files, "_proc_umask", lambda: None)
    seen = []
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)

    def read_many():
        seen.extend(current_umask() for _ in range(300))

    threads = [threading.Thread(target=read_many) for _ in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(switch_interval)
    assert seen == [umask] * 2400
    assert os.umask(umask) == umask


def test_a_run_writes_files_with_the_modes_open_gives(tmp_path, umask):
    """config.json, log.txt, metrics.jsonl, samples, curves and checkpoints of a tiny run."""
    out = tmp_path / "run"
    train(tiny_config(out, steps=2))
    found = {p.relative_to(out).as_posix(): mode(p) for p in out.rglob("*")}
    assert found == {
        "config.json": 0o666 & ~umask, "log.txt": 0o666 & ~umask,
        "metrics.jsonl": 0o666 & ~umask, "curves.png": 0o666 & ~umask,
        "samples": 0o777 & ~umask, "samples/step-000002.png": 0o666 & ~umask,
        "checkpoints": 0o777 & ~umask, "checkpoints/ckpt-00000002.pt": 0o666 & ~umask}
