"""Without CUDA, run the Triton kernels in the CPU interpreter (docs/design.md section 5).

TRITON_INTERPRET must be set before triton is imported, so this runs before any test module
imports fastgan.
"""
import os
import subprocess
import sys

import pytest


def _cuda_present() -> bool:
    # Asking torch would import it (and possibly triton) before the variable is set.
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


if "TRITON_INTERPRET" not in os.environ and not _cuda_present():
    os.environ["TRITON_INTERPRET"] = "1"
# cuBLAS is deterministic (tests/test_determinism.py) only with this set before it starts.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
assert "triton" not in sys.modules or os.environ.get("TRITON_INTERPRET") != "1", \
    "triton was imported before TRITON_INTERPRET was set"

import torch  # noqa: E402

import fastgan  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (compiled Triton kernels); none present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def launches():
    """Reset the kernel launch counter; the test asserts on ``launches()`` afterwards."""
    fastgan.reset_launch_counts()
    return fastgan.launch_counts


@pytest.fixture(autouse=True)
def _default_backend():
    fastgan.set_backend(None)
    yield
    fastgan.set_backend(None)


@pytest.fixture
def deterministic():
    """``torch.use_deterministic_algorithms(True)`` for the test."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


@pytest.fixture
def measured_choices(tmp_path, monkeypatch):
    """Fresh per-problem choices kept in ``tmp_path / 'choices.json'`` (FASTGAN_CONV_CACHE);
    returns ``(cache_path, measured)`` where ``measured`` gets one entry per candidate timed."""
    from fastgan.ops import conv_choice as choice

    cache = tmp_path / "choices.json"
    monkeypatch.setenv("FASTGAN_CONV_CACHE", str(cache))
    choice.clear_choices()
    measured = []
    real_measure = choice._measure
    monkeypatch.setattr(choice, "_measure",
                        lambda run, device: measured.append(1) or real_measure(run, device))
    yield cache, measured
    choice.clear_choices()
