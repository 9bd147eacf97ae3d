"""``torch.use_deterministic_algorithms(True)``: no timing anywhere, one fixed path per op, and
two identical training runs give bitwise identical weights (docs/design.md section 8)."""
import pytest
import torch

from fastgan.ops import conv_choice
from fastgan.train.config import TrainConfig
from fastgan.train.trainer import train
from test_train import _assert_same_training_state


def _run(out, **kw):
    """A short run of fused layers (the Triton kernels, in the interpreter on CPU)."""
    cfg = dict(out=str(out), res=8, backend="fastgan", channel_base=8, channel_max=2, z_dim=4,
               batch=4, steps=2, r1_interval=1, r1_gamma=1.0, sample_every=2, ckpt_every=2,
               metrics_every=0, progress=False, threads=1)
    cfg.update(kw)
    train(TrainConfig(**cfg))
    return torch.load(out / "checkpoints" / f"ckpt-{cfg['steps']:08d}.pt", weights_only=True,
                      map_location="cpu")


def test_two_identical_runs_give_identical_weights(deterministic, tmp_path, monkeypatch,
                                                   launches):
    monkeypatch.setenv("FASTGAN_CACHE_DIR", str(tmp_path / "cache"))
    conv_choice.clear_choices()
    first, second = _run(tmp_path / "a"), _run(tmp_path / "b")
    _assert_same_training_state(first, second)
    assert launches()["conv2d_act_fwd"] > 0  # the fused kernels trained
    assert conv_choice._report()["choices"] == {}  # nothing decided by timing


@pytest.mark.gpu
def test_two_identical_gpu_runs_give_identical_weights(deterministic, tmp_path, monkeypatch):
    """On the GPU with the trainer's CUDA defaults (CUDA graphs, cuDNN convs): the same bits.
    cuBLAS is deterministic only with CUBLAS_WORKSPACE_CONFIG set before it starts, which
    tests/conftest.py does."""
    monkeypatch.setenv("FASTGAN_CACHE_DIR", str(tmp_path / "cache"))
    conv_choice.clear_choices()
    runs = [_run(tmp_path / name, device="cuda", res=16, channel_base=64, channel_max=32,
                 batch=8, steps=4, r1_interval=2, sample_every=4, ckpt_every=4)
            for name in ("a", "b")]
    _assert_same_training_state(*runs)
    assert conv_choice._report()["choices"] == {}
