"""benchmarks/gpu_check.sh on a machine whose torch cannot use a GPU: one line saying why, a
non-zero exit, nothing else run, from any directory and without PYTHONPATH set."""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.sh"


def _nvidia_smi_lists_a_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0


def _run_script(cwd, path_prefix=None):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OUT")}
    env["PYTHON"] = sys.executable
    if path_prefix is not None:
        env["PATH"] = f"{path_prefix}{os.pathsep}{env['PATH']}"
    start = time.perf_counter()
    done = subprocess.run(["bash", str(SCRIPT)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)
    return done, time.perf_counter() - start


@pytest.mark.skipif(_nvidia_smi_lists_a_gpu(), reason="nvidia-smi lists a GPU here")
def test_without_nvidia_gpu_says_so_in_one_line(tmp_path):
    done, seconds = _run_script(tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert output.count("\n") == 1 and "no NVIDIA GPU found" in output, output
    assert "Traceback" not in output and seconds < 5
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch can use a GPU here")
def test_gpu_that_torch_cannot_use_says_so_in_one_line(tmp_path):
    """nvidia-smi (a stand-in here) lists a GPU, but this torch has no CUDA."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: Stand-in (UUID: GPU-0)'\n")
    (fake_bin / "nvidia-smi").chmod(0o755)
    (tmp_path / "work").mkdir()
    done, seconds = _run_script(tmp_path / "work", path_prefix=fake_bin)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert output.count("\n") == 1, output
    assert "a GPU is present, but torch.cuda.is_available() is False" in output
    assert "Traceback" not in output and seconds < 30
    assert list((tmp_path / "work").iterdir()) == []
