"""``torch.use_deterministic_algorithms(True)``: no timing anywhere, one fixed path per op, and
two identical training runs give bitwise identical weights (docs/design.md section 8)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fastgan.ops import conv_choice
from fastgan.train.config import TrainConfig
from fastgan.train.trainer import train
from test_train import _assert_same_training_state

REPO = Path(__file__).resolve().parents[1]


def _run(out, **kw):
    """A short run of fused layers (the Triton kernels, in the interpreter on CPU)."""
    cfg = dict(out=str(out), res=8, backend="fastgan", channel_base=8, channel_max=2, z_dim=4,
               batch=4, steps=2, r1_interval=1, r1_gamma=1.0, sample_every=2, ckpt_every=2,
               metrics_every=0, progress=False, threads=1)
    cfg.update(kw)
    train(TrainConfig(**cfg))
    return torch.load(out / "checkpoints" / "ckpt-00000002.pt", weights_only=True)


def test_two_identical_runs_give_identical_weights(deterministic, tmp_path, monkeypatch,
                                                   launches):
    monkeypatch.setenv("FASTGAN_CACHE_DIR", str(tmp_path / "cache"))
    conv_choice.clear_choices()
    first, second = _run(tmp_path / "a"), _run(tmp_path / "b")
    _assert_same_training_state(first, second)
    assert launches()["conv2d_act_fwd"] > 0  # the fused kernels trained
    assert conv_choice._report()["choices"] == {}  # nothing decided by timing


# Two runs of the digits trainer on the GPU, each in a fresh process with deterministic
# algorithms (cuBLAS needs CUBLAS_WORKSPACE_CONFIG before it starts): prints the path of the
# final checkpoint.
GPU_RUN = textwrap.dedent("""
    import sys, torch
    torch.use_deterministic_algorithms(True)
    from fastgan.train.config import TrainConfig
    from fastgan.train.trainer import train
from test_train import _assert_same_training_state
    out = sys.argv[1]
    train(TrainConfig(out=out, res=16, steps=6, batch=16, r1_interval=2, sample_every=6,
                      ckpt_every=6, metrics_every=0, progress=False, device="cuda"))
    print(out + "/checkpoints/ckpt-00000006.pt")
""")


@pytest.mark.gpu
def test_two_identical_gpu_runs_give_identical_weights(tmp_path):
    """Fresh processes (nothing cached in memory), CUDA graphs and bf16 as the trainer's
    defaults on CUDA: the same bits."""
    env = dict(os.environ, PYTHONPATH=str(REPO), CUBLAS_WORKSPACE_CONFIG=":4096:8",
               FASTGAN_CACHE_DIR=str(tmp_path / "cache"))
    states = []
    for name in ("a", "b"):
        done = subprocess.run([sys.executable, "-c", GPU_RUN, str(tmp_path / name)], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        states.append(torch.load(done.stdout.strip().splitlines()[-1], weights_only=True))
    _assert_same_training_state(*states)
