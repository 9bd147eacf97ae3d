"""The trainer (fastgan/train): steps, EMA, data, checkpoints, outputs, resume, CLI, quality.

Training logic runs on backend='torch' models (the interpreter would take minutes); one test
runs the steps on fastgan's layers through the Triton interpreter at a tiny size.
"""
import dataclasses
import errno
import json
import logging
import math
import os
import re
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fastgan
from fastgan.models import (DISCRIMINATORS, Generator, R3GANDiscriminator, R3GANGenerator,
                            build_discriminator, build_generator)
from fastgan.models.r3gan import R3GAN_CONFIGS
from fastgan.regularizers import LazyR1, r1_penalty, r2_penalty
from fastgan.train import TrainConfig, TrainSteps, train
from fastgan.train import checkpoints
from fastgan.train.cli import _config, build_parser, main
from fastgan.train.config import ARCH_DEFAULTS, R3GAN_FIELDS
from fastgan.train.data import load_dataset
from fastgan.train.distributed import finish_gradients
from fastgan.train.ema import EMA, ema_beta
from fastgan.train.quality import DigitQuality, frechet_distance
from fastgan.train.report import read_metrics
from fastgan.train.steps import Elapsed
from fastgan.train.trainer import Trainer, build_models, describe_device

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    """A cache folder shared by this module's tests (the digit classifier is trained once)."""
    monkeypatch.setenv("FASTGAN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


def tiny_config(out, **kw) -> TrainConfig:
    base = dict(out=str(out), res=8, backend="torch", channel_base=16, channel_max=4, z_dim=4,
                batch=4, steps=4, r1_interval=2, r1_gamma=1.0, sample_every=2, ckpt_every=2,
                metrics_every=0, progress=False, threads=1)
    base.update(kw)
    return TrainConfig(**base)


def _models(backend="torch", res=8, dtype=torch.float64):
    torch.manual_seed(0)
    G = build_generator(res, z_dim=3, img_channels=1, backend=backend, channel_base=16,
                        channel_max=2).to(dtype)
    D = build_discriminator("dcgan", res, img_channels=1, backend=backend, channel_base=16,
                            channel_max=2).to(dtype)
    return G, D


def _snapshot(module):
    return [p.detach().clone() for p in module.parameters()]


def _changed(module, before):
    return any(not torch.equal(p, b) for p, b in zip(module.parameters(), before))


# --- TrainSteps ---------------------------------------------------------------------------

def test_each_step_updates_only_its_model():
    G, D = _models()
    steps = TrainSteps(G, D, torch.optim.Adam(G.parameters(), 1e-2),
                       torch.optim.Adam(D.parameters(), 1e-2), LazyR1(1.0, 4), timing=True,
                       sample_z=lambda n: torch.randn(n, 3, dtype=torch.float64))
    reals = torch.rand(4, 1, 8, 8, dtype=torch.float64) * 2 - 1
    for method, arg, moves, keys in [
            (steps.g_step, 4, "G", {"loss_G", "time_G"}),
            (steps.d_step, reals, "D", {"loss_D", "time_D"}),
            (steps.r1_step, reals, "D", {"r1", "loss_r1", "time_R1"})]:
        g0, d0 = _snapshot(G), _snapshot(D)
        out = method(arg)
        assert set(out) == keys
        assert (_changed(G, g0), _changed(D, d0)) == (moves == "G", moves == "D")
        assert all(p.requires_grad for p in [*G.parameters(), *D.parameters()])
        assert all(math.isfinite(float(v)) for v in out.values())


def test_d_step_with_r1_takes_one_step_on_loss_plus_penalty():
    """SGD(lr=1): the parameter change is minus the gradient of the D loss plus R1."""
    G, D = _models()
    z = torch.randn(4, 3, dtype=torch.float64)
    reals = torch.rand(4, 1, 8, 8, dtype=torch.float64) * 2 - 1
    before = _snapshot(D)
    fakes = G(z).detach()
    loss = (torch.nn.functional.softplus(D(fakes)).mean()
            + torch.nn.functional.softplus(-D(reals)).mean())
    want = torch.autograd.grad(loss + r1_penalty(D, reals, 0.7).loss, list(D.parameters()))
    steps = TrainSteps(G, D, torch.optim.SGD(G.parameters(), 1.0),
                       torch.optim.SGD(D.parameters(), 1.0), LazyR1(0.7, 1),
                       sample_z=lambda n: z[:n])
    out = steps.d_step(reals, r1=True)
    torch.testing.assert_close(out["loss_D"], loss.detach())
    for p, b, g in zip(D.parameters(), before, want):
        torch.testing.assert_close(b - p.detach(), g, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("loss", ["logistic", "hinge"])
def test_losses(loss):
    G, D = _models()
    steps = TrainSteps(G, D, torch.optim.Adam(G.parameters()), torch.optim.Adam(D.parameters()),
                       loss=loss, sample_z=lambda n: torch.zeros(n, 3, dtype=torch.float64))
    out = steps.d_step(torch.zeros(2, 1, 8, 8, dtype=torch.float64))
    assert float(out["loss_D"]) > 0
    with pytest.raises(ValueError, match="loss"):
        TrainSteps(G, D, None, None, loss="wasserstein")


def test_steps_run_on_fused_layers_in_the_interpreter(launches):
    G, D = _models("fastgan", res=4, dtype=torch.float32)
    steps = TrainSteps(G, D, torch.optim.Adam(G.parameters()), torch.optim.Adam(D.parameters()),
                       LazyR1(1.0, 2))
    reals = torch.rand(2, 1, 4, 4) * 2 - 1
    out = {**steps.g_step(2), **steps.d_step(reals), **steps.r1_step(reals)}
    assert all(math.isfinite(float(v)) for v in out.values())
    assert launches().get("per_sample_dot", 0) > 0 and launches().get("bias_act_fwd", 0) > 0


def test_amp_computes_in_bf16_and_keeps_float32_weights():
    G, D = _models(dtype=torch.float32)
    seen = []
    D.register_forward_hook(lambda module, args, out: seen.append((args[0].dtype, out.dtype)))
    steps = TrainSteps(G, D, torch.optim.Adam(G.parameters()), torch.optim.Adam(D.parameters()),
                       LazyR1(1.0, 2), amp=True)
    reals = torch.rand(2, 1, 8, 8) * 2 - 1
    out = {**steps.g_step(2), **steps.d_step(reals), **steps.r1_step(reals)}
    assert all(math.isfinite(float(v)) for v in out.values())
    assert set(seen) == {(torch.bfloat16, torch.bfloat16)}
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32
               for p in D.parameters() if p.grad is not None)


def test_amp_run_needs_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ValueError, match="--amp .*needs a CUDA device"):
        train(tiny_config(tmp_path / "run", amp=True))


def test_finish_gradients_replaces_non_finite_values():
    layer = torch.nn.Linear(3, 1)
    layer.weight.grad = torch.tensor([[float("nan"), float("inf"), -float("inf")]])
    finish_gradients(layer)
    assert layer.weight.grad.tolist() == [[0.0, 1e5, -1e5]]
    assert layer.bias.grad is None


# --- EMA ----------------------------------------------------------------------------------

def test_ema_beta_has_stylegan2_rampup():
    assert ema_beta(32, 0) == 0.0  # the first step copies the weights
    assert ema_beta(32, 100_000) == pytest.approx(0.5 ** (32 / 5000))  # 5% of 100k images
    assert ema_beta(32, 10**9) == pytest.approx(0.5 ** (32 / 10_000))
    assert ema_beta(32, 0, rampup=None) == pytest.approx(0.5 ** (32 / 10_000))


def test_ema_update_blends_weights():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, ema_kimg=0.004, rampup=None)  # half-life 4 images
    before = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, batch_size=4, cur_nimg=1000)
    torch.testing.assert_close(ema.model.weight, before + 0.5)
    assert not any(p.requires_grad for p in ema.model.parameters())


# --- data ---------------------------------------------------------------------------------

def test_digits_are_scaled_and_replicated():
    ds = load_dataset("digits", 16)
    assert len(ds) == 1797 and ds.images.shape == (1797, 1, 16, 16)
    x = ds.batch(torch.arange(10))
    assert x.min() >= -1 and x.max() <= 1 and x.max() > 0.9 and x.min() == -1
    assert load_dataset("digits", 8, channels=3).images.shape == (1797, 3, 8, 8)


def _write_images(folder):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (12, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    Image.fromarray(rng.integers(0, 255, (9, 9, 3), dtype=np.uint8)).save(folder / "sub.JPG")
    (folder / "corrupt.png").write_bytes(b"not an image")
    good = (folder / "0.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "notes.txt").write_text("ignored")


def test_image_folder_skips_unreadable_files_and_is_cached(tmp_path, caplog):
    _write_images(tmp_path / "imgs")
    with caplog.at_level(logging.INFO, logger="fastgan.train"):
        ds = load_dataset(str(tmp_path / "imgs"), 8)
    assert ds.images.shape == (4, 3, 8, 8) and ds.images.dtype == torch.uint8
    assert "skipped 2 of 6 image files" in caplog.text and "corrupt.png" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fastgan.train"):
        again = load_dataset(str(tmp_path / "imgs"), 8)
    assert "cache" in caplog.text and "skipped 2 of 6" in caplog.text
    assert torch.equal(again.images, ds.images)
    assert load_dataset(str(tmp_path / "imgs"), 8, channels=1).images.shape == (4, 1, 8, 8)


def test_zip_of_images(tmp_path):
    _write_images(tmp_path / "imgs")
    with zipfile.ZipFile(tmp_path / "imgs.zip", "w") as zf:
        for f in sorted((tmp_path / "imgs").iterdir()):
            zf.write(f, f"data/{f.name}")
    ds = load_dataset(str(tmp_path / "imgs.zip"), 4)
    assert ds.images.shape == (4, 3, 4, 4)
    assert torch.equal(ds.images, load_dataset(str(tmp_path / "imgs"), 4).images)


def test_bad_data_gives_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data .*no such folder"):
        load_dataset(str(tmp_path / "missing"), 8)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "bad.png").write_bytes(b"junk")
    with pytest.raises(ValueError, match="no readable images.*1 unreadable"):
        load_dataset(str(tmp_path / "empty"), 8)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="not a folder or a .zip"):
        load_dataset(str(tmp_path / "file.txt"), 8)


# --- checkpoints --------------------------------------------------------------------------

def test_newest_good_checkpoint_is_used(tmp_path, caplog):
    for step in (2, 4):
        checkpoints.save_checkpoint(tmp_path, {"step": step, "w": torch.full((3,), step)},
                                    keep=0)
    path4 = checkpoints.checkpoint_dir(tmp_path) / "ckpt-00000004.pt"
    path4.write_bytes(path4.read_bytes()[:100])  # killed mid-write (without the rename)
    leftover = checkpoints.checkpoint_dir(tmp_path) / ".ckpt-00000006.pt.abc.tmp"
    leftover.write_bytes(b"partial")
    with caplog.at_level(logging.WARNING, logger="fastgan.train"):
        state, path = checkpoints.load_latest(tmp_path)
    assert state["step"] == 2 and torch.equal(state["w"], torch.full((3,), 2))
    assert "ignoring checkpoint" in caplog.text and not leftover.exists()
    assert checkpoints.load_latest(tmp_path / "nothing") is None


def test_old_checkpoints_are_pruned(tmp_path):
    for step in range(1, 6):
        checkpoints.save_checkpoint(tmp_path, {"step": step}, keep=2)
    names = sorted(p.name for p in checkpoints.checkpoint_dir(tmp_path).iterdir())
    assert names == ["ckpt-00000004.pt", "ckpt-00000005.pt"]


# --- whole runs ---------------------------------------------------------------------------

def test_run_writes_its_outputs(tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(out, steps=5)
    last = train(cfg)
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4] and last["step"] == 4
    assert all({"loss_D", "loss_G", "time_G", "time_D", "img_s"} <= set(r) for r in rows)
    assert [r["step"] for r in rows if "r1" in r] == [0, 2, 4]
    assert all("time_R1" in r for r in rows if "r1" in r)
    assert json.loads((out / "config.json").read_text()) == cfg.resolved().to_dict()
    assert sorted(p.name for p in (out / "samples").iterdir()) == [
        "step-000002.png", "step-000004.png", "step-000005.png"]
    assert Image.open(out / "samples" / "step-000005.png").size == (8 * 66 + 2, 8 * 66 + 2)
    assert (out / "curves.png").stat().st_size > 0 and (out / "log.txt").exists()
    state = torch.load(out / "checkpoints" / "ckpt-00000005.pt", weights_only=True)
    assert state["step"] == 5 and state["cur_nimg"] == 20
    assert set(state) >= {"G", "D", "G_ema", "opt_G", "opt_D", "rng", "config"}


def test_the_loop_waits_for_the_device_only_on_metrics_steps(tmp_path, monkeypatch):
    """A metrics step (``Trainer.metrics_step``): every --log-every steps, a step that saves
    samples or a checkpoint or measures the quality signal, and the last. On every other step
    fastgan's code turns no tensor into a Python value (float, int, bool, item, tolist,
    numpy: on a GPU each waits for it) and reads no ``Elapsed`` timer; each metrics step reads
    (one copy of the held rows at least), and every step gets its row."""
    fastgan_dir, current, reads = str(Path(fastgan.__file__).parent), [None], []

    def recording(name, method):
        def wrapper(*args, **kwargs):
            if sys._getframe(1).f_code.co_filename.startswith(fastgan_dir):
                reads.append((current[0], name))
            return method(*args, **kwargs)
        return wrapper

    for name in ("item", "tolist", "numpy", "__float__", "__int__", "__index__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, recording(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(Elapsed, "seconds", recording("Elapsed.seconds", Elapsed.seconds))
    real_step = Trainer._step

    def step(self, s):
        current[0] = s
        return real_step(self, s)

    monkeypatch.setattr(Trainer, "_step", step)
    out = tmp_path / "run"
    last = train(tiny_config(out, steps=12, log_every=5, sample_every=8, ckpt_every=12,
                             metrics_every=6))
    assert {s for s, _ in reads if s is not None} == {4, 5, 7, 9, 11}
    assert {s for s, name in reads if name == "tolist"} == {4, 5, 7, 9, 11}
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(12)) and rows[-1] == last
    assert [r["step"] for r in rows if "fd" in r] == [5, 11]
    assert all(r["img_s"] > 0 and r["time_G"] > 0 and r["time_D"] > 0 for r in rows)


def _final_state(out, step):
    return torch.load(out / "checkpoints" / f"ckpt-{step:08d}.pt", weights_only=True)


def _assert_same_training_state(a, b):
    for key in ("G", "D", "G_ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name}"
    for key in ("opt_G", "opt_D"):
        for i, s in a[key]["state"].items():
            for name, t in s.items():
                assert torch.equal(t, b[key]["state"][i][name]), f"{key} {i} {name}"


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    """6 steps straight == 4 steps, the newest checkpoint (4) damaged, resume from 2 to 6."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(tiny_config(straight, steps=6))
    train(tiny_config(resumed, steps=4))
    ckpt4 = resumed / "checkpoints" / "ckpt-00000004.pt"
    ckpt4.write_bytes(ckpt4.read_bytes()[:-200])
    train(tiny_config(resumed, steps=6), resume=True)
    _assert_same_training_state(_final_state(straight, 6), _final_state(resumed, 6))
    assert [r["step"] for r in read_metrics(resumed / "metrics.jsonl")] == list(range(6))
    rows = [read_metrics(p / "metrics.jsonl") for p in (straight, resumed)]
    assert [r["loss_D"] for r in rows[0]] == [r["loss_D"] for r in rows[1]]


def test_runs_are_not_overwritten_and_resume_checks_settings(tmp_path):
    out = tmp_path / "run"
    train(tiny_config(out, steps=2))
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny_config(out, steps=2))
    with pytest.raises(ValueError, match="--res 16 .*the run has 8"):
        train(tiny_config(out, steps=3, res=16), resume=True)
    with pytest.raises(FileNotFoundError, match="no usable checkpoint"):
        train(tiny_config(tmp_path / "other"), resume=True)


# --- command line -------------------------------------------------------------------------

TINY_FLAGS = ["--res", "8", "--backend", "torch", "--channel-base", "16", "--channel-max", "4",
              "--z-dim", "4", "--batch", "4", "--metrics-every", "0", "--no-progress",
              "--threads", "1"]


def test_cli_trains_and_resumes_with_more_steps(tmp_path, capsys):
    """The resumed folder may be spelled differently, and named by --out too; log.txt gets
    every line of both runs, from the data loading to the final summary."""
    out = tmp_path / "run"
    assert main(["train", *TINY_FLAGS, "--steps", "2", "--out", str(out)]) == 0
    assert main(["train", "--resume", f"{out}/", "--out", str(out), "--steps", "3",
                 "--no-progress"]) == 0
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [0, 1, 2]
    assert json.loads((out / "config.json").read_text())["steps"] == 3
    text = (out / "log.txt").read_text()
    assert text.count("INFO data digits: 1797 images") == 2
    assert text.count("INFO resuming from") == 1 and text.count("INFO done: loss_D") == 2
    capsys.readouterr()
    other = tmp_path / "other"
    assert main(["train", "--resume", str(out), "--out", str(other), "--steps", "4"]) == 2
    assert capsys.readouterr().err == (f"fastgan train: error: --out {other} and --resume {out} "
                                       "name different folders; a resumed run writes into its "
                                       "own folder\n")
    assert not other.exists() and len(read_metrics(out / "metrics.jsonl")) == 3


def test_the_first_log_lines_name_the_folder_the_data_and_what_runs(tmp_path, capsys):
    """Before anything else a run says where it writes, what it trains on and what computes;
    config.json ends with a newline."""
    out = tmp_path / "run"
    assert main(["train", *TINY_FLAGS, "--steps", "1", "--out", str(out)]) == 0
    first = [f"output folder {out} (a new run)", "data digits: 1797 images, 1 channel(s), 8x8",
             "device cpu (1 thread): layers in eager PyTorch (--backend torch); 1 process(es)"]
    assert capsys.readouterr().err.splitlines()[:3] == [f"INFO {line}" for line in first]
    logged = [line.split(" INFO ", 1)[1] for line in (out / "log.txt").read_text().splitlines()]
    assert logged[:3] == first
    assert (out / "config.json").read_text().endswith("}\n")
    assert main(["train", "--resume", str(out), "--steps", "2"]) == 0
    assert capsys.readouterr().err.startswith(f"INFO output folder {out} (resuming its run)\n")


def test_the_device_line_says_what_runs_fastgans_ops_and_why():
    """What fastgan.backend_info() says for the run's device type: here the Triton kernels in
    the interpreter (tests/conftest.py), or the reference with the backend forced to torch,
    and why the compiled extension is not used; for CUDA the compiled Triton kernels."""
    threads = torch.get_num_threads()
    for device, backend, runs in [("cpu", None, "Triton kernels in the interpreter"),
                                  ("cpu", "torch", "torch reference"),
                                  ("cuda", None, "Triton kernels, compiled")]:
        fastgan.set_backend(backend)
        info = fastgan.backend_info()
        dev = torch.device("cpu") if device == "cpu" else torch.device("cuda", 0)
        name = f"cpu ({threads} thread{'s' * (threads != 1)})" if device == "cpu" else "cuda:0"
        assert describe_device(dev, "fastgan").startswith(
            f"device {name}")  # with the GPU's name where there is one
        assert describe_device(dev, "fastgan").endswith(
            f": fastgan's ops run {info[f'{device}_tensors']}; the compiled extension: "
            f"{info[f'{device}_extension']}")
        assert info[f"{device}_tensors"].startswith(runs)
        assert info[f"{device}_extension"].startswith("not used: ")


def test_resuming_a_finished_run_draws_its_progress_bar_once(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY_FLAGS, "--steps", "2", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--progress"]) == 0
    err = capsys.readouterr().err
    assert "the run has completed 2 steps already (--steps 2): nothing to do" in err
    assert err.count("2/2") == 1


def _refuse_folders(monkeypatch, under, error):
    """Creating a folder inside ``under`` raises ``error``, as a read-only file system or a
    folder without write permission does (for root too, whom chmod does not stop)."""
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if under in self.parents and not self.exists():
            raise error
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)


@pytest.mark.parametrize("case", ["file-in-the-way", "permission-denied", "read-only-fs",
                                  "disk-full-after-the-folder"])
def test_an_unwritable_out_is_a_one_line_error(tmp_path, monkeypatch, capsys, request, case):
    """Exit code 2, the error on one line naming --out and the reason, no traceback, and
    nothing left on disk (also the folders and files made before the failure)."""
    (tmp_path / "file.txt").write_text("a file")
    (tmp_path / "ro").mkdir()
    reason = {"file-in-the-way": "Not a directory", "permission-denied": "Permission denied",
              "read-only-fs": "Read-only file system",
              "disk-full-after-the-folder": "No space left on device"}[case]
    out = {"file-in-the-way": tmp_path / "file.txt" / "run",
           "disk-full-after-the-folder": tmp_path / "new" / "deeper" / "run"}.get(
               case, tmp_path / "ro" / "new" / "run")
    if case == "permission-denied":
        (tmp_path / "ro").chmod(0o555)
        request.addfinalizer(lambda: (tmp_path / "ro").chmod(0o755))
        try:
            (tmp_path / "ro" / "probe").mkdir()  # root may write anyway
            (tmp_path / "ro" / "probe").rmdir()
            _refuse_folders(monkeypatch, tmp_path / "ro",
                            PermissionError(errno.EACCES, os.strerror(errno.EACCES)))
        except PermissionError:
            pass
    elif case == "read-only-fs":
        _refuse_folders(monkeypatch, tmp_path / "ro", OSError(errno.EROFS,
                                                             os.strerror(errno.EROFS)))
    elif case == "disk-full-after-the-folder":
        def full(*args):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr("fastgan.train.trainer.MetricsLog", full)
    before = sorted(tmp_path.rglob("*"))
    assert main(["train", *TINY_FLAGS, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (f"fastgan train: error: --out {out}: cannot write the "
                                    f"run's files there ({reason})")
    assert "Traceback" not in err and sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("flags, match", [
    (["--res", "12"], "--res must be a power of two"),
    (["--batch", "0"], "--batch must be an integer >= 1"),
    (["--r1-gamma", "-1"], "--r1-gamma must be a finite number"),
    (["--data", "/nonexistent/images"], "--data /nonexistent/images: no such folder"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"],
     "--device"),
    (["--r2-gamma", "-1"], "--r2-gamma must be a finite number"),
    (["--r2-gamma", "0.5", "--r1-gamma", "0"],
     "--r2-gamma is applied together with R1: it needs --r1-gamma > 0, got 0.5"),
    (["--arch", "r3gan", "--channel-base", "16", "--channel-max", "4"],
     "--channel-base 16 and --channel-max 4 give --arch r3gan 4 channels at 4x4, but "
     "--expansion 2 * 4 channels must be divisible by --group-channels 16\n"),
    (["--arch", "r3gan", "--channel-base", "64", "--channel-max", "16", "--group-channels",
      "32"], "--channel-base 64 and --channel-max 16 give --arch r3gan 8 channels at 8x8, but "
     "--expansion 2 * 8 channels must be divisible by --group-channels 32\n"),
    (["--arch", "r3gan", "--channel-base", "64", "--channel-max", "16", "--expansion", "0"],
     "--expansion must be an integer >= 1, got 0"),
    (["--blocks-per-stage", "2"], "--blocks-per-stage applies to --arch r3gan only, got 2"),
    (["--group-channels", "32"], "--group-channels applies to --arch r3gan only, got 32"),
    (["--log-every", "0"], "--log-every must be an integer >= 1, got 0"),
    (["--betas", "0", "1"], "--betas must be two numbers in [0, 1)"),
])
def test_cli_errors_name_the_flag(tmp_path, capsys, flags, match):
    assert main(["train", *TINY_FLAGS, "--out", str(tmp_path / "r"), *flags]) == 2
    assert match in capsys.readouterr().err


@pytest.mark.parametrize("flags, match", [
    (["--data", "{tmp}/missing"], "no such folder"),
    (["--data", "{tmp}/empty"], "no readable images"),
    (["--res", "12"], "--res must be a power of two"),
    (["--arch", "resnet", "--batch", "6"], "--mbstd-group must divide the per-process batch"),
    (["--amp", "--device", "cpu"], "--amp (bf16 mixed precision) needs a CUDA device"),
    (["--cuda-graphs", "on", "--device", "cpu"], "--cuda-graphs on needs a CUDA device"),
    (["--arch", "r3gan", "--channel-base", "16"], "--channel-base 16 and --channel-max 4 give "
     "--arch r3gan 4 channels"),
], ids=["missing-data", "empty-data", "bad-res", "bad-mbstd", "amp-on-cpu", "graphs-on-cpu",
        "r3gan-widths"])
def test_refused_run_creates_nothing(tmp_path, monkeypatch, capsys, flags, match):
    """A run refused before training (with the default --out runs/<name>-<stamp>) leaves no
    folder behind."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert main(["train", *TINY_FLAGS, *(f.format(tmp=tmp_path) for f in flags)]) == 2
    assert match in capsys.readouterr().err
    assert list((tmp_path / "work").iterdir()) == []


def test_cli_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ["--data", "--res", "--batch", "--steps", "--r1-gamma", "--r1-interval",
                 "--backend", "--arch", "--out", "--resume", "--seed", "--device", "--lr",
                 "--ema", "--sample-every", "--ckpt-every", "--metrics-every", "--cuda-graphs",
                 "--loss", "--r2-gamma", "--betas", "--channel-base", "--log-every"]:
        assert f"  {flag} " in text
    assert "(default: digits)" in text
    flat = " ".join(text.split())
    assert "rpgan (R3GAN's relativistic pairing loss" in flat
    assert "(default: logistic for dcgan and resnet, rpgan for r3gan)" in flat
    assert "(default: 16 for dcgan and resnet, 1 for r3gan)" in flat
    assert "(default: 0.0 for dcgan and resnet, --r1-gamma for r3gan)" in flat
    assert "(default: 3000 for dcgan and resnet, 1700 for r3gan)" in flat
    assert ("(default: 512 for dcgan, 32768 for resnet, 256 for r3gan, 24576 for r3gan from 64 "
            "px up)") in flat
    assert "--blocks-per-stage N r3gan only" in flat and "--group-channels C r3gan only" in flat
    assert "(default: 1 at 16 px, 1 at 32 px (the CPU-sized models), else 2)" in flat
    assert "--expansion E r3gan only" in flat


# --- quality signal -----------------------------------------------------------------------

def test_frechet_distance_of_gaussians():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4000, 3))
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-9)
    # N(0, I) vs N(1, 4I) in 3-d: |mu|^2 + tr(I + 4I - 2 * 2I) = 3 + 3 = 6.
    assert frechet_distance(a, 1 + 2 * rng.standard_normal((4000, 3))) == pytest.approx(6, rel=0.1)


def test_short_run_improves_the_digits_quality(tmp_path):
    cfg = tiny_config(tmp_path / "run", res=16, channel_base=256, channel_max=32, z_dim=32,
                      batch=32, steps=300, r1_interval=16, r1_gamma=0.05, sample_every=300,
                      ckpt_every=300, metrics_every=300)
    G, _ = build_models(cfg, 1, torch.device("cpu"))
    reals = load_dataset("digits", 16)
    quality = DigitQuality(reals.batch(torch.arange(len(reals))), cfg.z_dim, seed=cfg.seed + 3)
    untrained = quality(G)
    trained = train(cfg)
    assert trained["fd"] < 0.5 * untrained["fd"], (untrained, trained)


def test_r1_step_steps_every_parameter_alike_on_fused_and_eager_layers(launches):
    """The fused layers leave R1's bias gradients None (eager gives zeros, or None for the
    last bias); TrainSteps.r1_step gives every D parameter a gradient, zeros where R1 gives
    none, so Adam's state and the weights move identically on both backends."""
    results = []
    for backend in ("fastgan", "torch"):
        torch.manual_seed(0)
        G, D = _models(backend=backend, res=8)
        opt_D = torch.optim.Adam(D.parameters(), 1e-2, betas=(0.5, 0.99))
        steps = TrainSteps(G, D, torch.optim.Adam(G.parameters(), 1e-2), opt_D,
                           LazyR1(1.0, 4), sample_z=lambda n: torch.randn(n, 3,
                                                                          dtype=torch.float64))
        reals = torch.rand(2, 1, 8, 8, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(1)) * 2 - 1
        steps.r1_step(reals)
        assert all(p.grad is not None for p in D.parameters())
        results.append(([p.detach().clone() for p in D.parameters()],
                        [opt_D.state[p]["exp_avg_sq"].clone() for p in D.parameters()]))
    (w_fused, v_fused), (w_eager, v_eager) = results
    for a, b in zip(w_fused + v_fused, w_eager + v_eager):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert launches()["conv2d_act_fwd"] == 1  # D at 8x8: one conv, run once by the R1 step


def test_cuda_graphs_need_cuda_and_capturable_optimizers():
    G, D = _models()
    with pytest.raises(ValueError, match="cuda_graphs needs CUDA models"):
        TrainSteps(G, D, torch.optim.Adam(G.parameters()), torch.optim.Adam(D.parameters()),
                   cuda_graphs=True)
    assert TrainConfig(cuda_graphs="auto").graphs_on(torch.device("cuda", 0))
    assert not TrainConfig(cuda_graphs="auto").graphs_on(torch.device("cpu"))
    assert not TrainConfig(cuda_graphs="off").graphs_on(torch.device("cuda", 0))
    with pytest.raises(ValueError, match="--cuda-graphs must be one of"):
        TrainConfig(cuda_graphs="yes").check()


def test_rpgan_with_r2_steps():
    """rpgan's G step needs reals; with r2_gamma the D step with R1 and the lazy R1 step add
    R2 at fakes, through one joint penalty (the dcgan D mixes no samples)."""
    G, D = _models()
    steps = TrainSteps(G, D, torch.optim.Adam(G.parameters(), 1e-3),
                       torch.optim.Adam(D.parameters(), 1e-3), LazyR1(1.0, 2), "rpgan",
                       r2_gamma=0.5, sample_z=lambda n: torch.randn(n, 3, dtype=torch.float64))
    reals = torch.rand(4, 1, 8, 8, dtype=torch.float64) * 2 - 1
    with pytest.raises(ValueError, match="g_step needs reals"):
        steps.g_step(4)
    assert set(steps.g_step(4, reals)) == {"loss_G"}
    assert set(steps.d_step(reals, r1=True)) == {"loss_D", "r1", "r2", "loss_r1"}
    out = steps.r1_step(reals)
    assert set(out) == {"r1", "r2", "loss_r1"}
    assert all(math.isfinite(float(v)) for v in out.values())
    with pytest.raises(ValueError, match="r2_gamma must be"):
        TrainSteps(G, D, None, None, r2_gamma=-1.0)


def test_d_step_with_r1_and_r2_takes_one_step_on_rpgan_plus_penalties():
    """SGD(lr=1): the change of D is minus the gradient of rpgan + R1 + R2 (two separate
    penalties, computed independently)."""
    G, D = _models()
    z = torch.randn(4, 3, dtype=torch.float64)
    reals = torch.rand(4, 1, 8, 8, dtype=torch.float64) * 2 - 1
    before = _snapshot(D)
    fakes = G(z).detach()
    loss = torch.nn.functional.softplus(D(fakes) - D(reals)).mean()
    total = loss + r1_penalty(D, reals, 0.7).loss + r2_penalty(D, fakes, 0.3).loss
    want = torch.autograd.grad(total, list(D.parameters()))
    steps = TrainSteps(G, D, torch.optim.SGD(G.parameters(), 1.0),
                       torch.optim.SGD(D.parameters(), 1.0), LazyR1(0.7, 1), "rpgan",
                       r2_gamma=0.3, sample_z=lambda n: z[:n])
    out = steps.d_step(reals, r1=True)
    torch.testing.assert_close(out["loss_D"], loss.detach())
    for p, b, g in zip(D.parameters(), before, want):
        torch.testing.assert_close(b - p.detach(), g, rtol=1e-9, atol=1e-12)


# --- per-arch defaults; r3gan, rpgan and R2 in the trainer ---------------------------------

PER_ARCH_FIELDS = {"loss", "lr", "betas", "r1_interval", "r2_gamma", "steps", "channel_base",
                   "channel_max"}


def test_every_arch_has_a_default_for_each_field_left_none():
    """Every arch fills the shared fields; r3gan also its own (R3GAN_FIELDS), which stay None
    for the other archs; blocks_per_stage's r3gan default depends on --res."""
    assert set(ARCH_DEFAULTS) == set(DISCRIMINATORS)
    assert all(set(ARCH_DEFAULTS[a]) == PER_ARCH_FIELDS for a in ("dcgan", "resnet"))
    assert set(ARCH_DEFAULTS["r3gan"]) == PER_ARCH_FIELDS | set(R3GAN_FIELDS) - {
        "blocks_per_stage"}
    assert set(TrainConfig(arch="r3gan").arch_defaults()) == PER_ARCH_FIELDS | set(R3GAN_FIELDS)
    unset = {f.name for f in dataclasses.fields(TrainConfig) if f.default is None}
    assert PER_ARCH_FIELDS | set(R3GAN_FIELDS) <= unset
    # None: a choice, or (fid_every) a default that follows --data and --ckpt-every.
    assert unset - PER_ARCH_FIELDS - set(R3GAN_FIELDS) == {"channels", "amp", "out", "threads",
                                                           "inception", "fid_every"}
    assert all(getattr(TrainConfig(arch=a).check(), f) is None
               for a in ("dcgan", "resnet") for f in R3GAN_FIELDS)


def _recipe(cfg):
    return (cfg.loss, cfg.lr, cfg.betas, cfg.r1_interval, cfg.r2_gamma, cfg.steps,
            cfg.channel_base, cfg.channel_max)


def test_arch_defaults_fill_the_fields_left_none_and_explicit_values_win():
    assert _recipe(TrainConfig().check()) == ("logistic", 0.002, (0.0, 0.99), 16, 0.0, 3000,
                                              512, 64)
    assert _recipe(TrainConfig(arch="resnet").check())[-2:] == (32768, 512)
    r3gan = TrainConfig(arch="r3gan").check()
    assert _recipe(r3gan) == ("rpgan", 0.004, (0.0, 0.9), 1, r3gan.r1_gamma, 1700, 256, 32)
    assert r3gan.r2_gamma == TrainConfig().r1_gamma == 0.05
    explicit = TrainConfig(arch="r3gan", r1_gamma=0.3, loss="hinge", lr=1e-3, r1_interval=4,
                           betas=(0.5, 0.99), steps=7, channel_max=16).check()
    assert _recipe(explicit) == ("hinge", 1e-3, (0.5, 0.99), 4, 0.3, 7, 256, 16)
    assert TrainConfig(arch="r3gan", r2_gamma=0.0).check().r2_gamma == 0.0
    assert TrainConfig(r2_gamma=0.2).check().r2_gamma == 0.2
    unresolved = TrainConfig(arch="r3gan")
    assert unresolved.loss is None and r3gan.resolved() == r3gan == unresolved.resolved()
    with pytest.raises(ValueError, match=r"--arch must be one of \['dcgan', 'r3gan', 'resnet'\]"):
        TrainConfig(arch="vgg").check()


def test_r3gan_channel_defaults_give_the_model_configurations():
    """Up to 32 px the CPU-sized widths, from 64 px R3GAN's: R3GAN_CONFIGS at each res."""
    for res, (widths, _) in R3GAN_CONFIGS.items():
        assert TrainConfig(arch="r3gan", res=res).check().r3gan_widths() == widths
    with pytest.raises(ValueError, match=r"^--channel-base 24576 and --channel-max 768 give "
                       r"--arch r3gan 12 channels at 2048x2048, but --expansion 2 \* 12 "
                       r"channels must be divisible by --group-channels 16$"):
        TrainConfig(arch="r3gan", res=2048).check()


def test_trainer_builds_r3gan_models_from_the_channel_settings():
    cfg = tiny_config(None, arch="r3gan", channel_base=64, channel_max=16)
    G, D = build_models(cfg, 1, torch.device("cpu"))
    assert type(G) is R3GANGenerator and type(D) is R3GANDiscriminator
    assert G.widths == D.widths == (16, 8) and G.z_dim == 4 and D.img_channels == 1
    G, D = build_models(tiny_config(None), 1, torch.device("cpu"))
    assert type(G) is Generator and type(D) is DISCRIMINATORS["dcgan"]


def _with(flags, **values):
    """``flags`` with the values of some flags replaced (``channel_base=64``)."""
    flags = list(flags)
    for name, value in values.items():
        flags[flags.index("--" + name.replace("_", "-")) + 1] = str(value)
    return flags


R3GAN_FLAGS = ["--arch", "r3gan", *_with(TINY_FLAGS, channel_base=64, channel_max=16)]


def test_r3gan_run_trains_and_resumes_exactly(tmp_path, capsys):
    """``--arch r3gan`` alone selects R3GAN's G, D and recipe (R1 and R2 every step, in the D
    step), recorded resolved in config.json; 2 steps + resume to 4 == 4 steps, bitwise."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = [*R3GAN_FLAGS, "--ckpt-every", "2", "--sample-every", "2"]
    assert main(["train", *common, "--steps", "4", "--out", str(straight)]) == 0
    assert main(["train", *common, "--steps", "2", "--out", str(resumed)]) == 0
    assert main(["train", "--resume", str(resumed), "--steps", "4", "--no-progress"]) == 0
    saved = json.loads((straight / "config.json").read_text())
    assert saved == {**json.loads((resumed / "config.json").read_text()), "out": str(straight)}
    assert (saved["loss"], saved["r1_interval"], saved["r2_gamma"], saved["betas"]) == \
        ("rpgan", 1, saved["r1_gamma"], [0.0, 0.9])
    assert (saved["lr"], saved["steps"], saved["channel_base"]) == (0.004, 4, 64)
    rows = read_metrics(straight / "metrics.jsonl")
    assert [r["step"] for r in rows if {"r1", "r2", "loss_r1"} <= set(r)] == [0, 1, 2, 3]
    assert not any("time_R1" in r for r in rows)  # no separate R1 step
    state = _final_state(straight, 4)
    assert "stages.0.0.grouped.weight" in state["D"] and "basis" in state["G_ema"]
    _assert_same_training_state(state, _final_state(resumed, 4))
    assert [r["loss_G"] for r in rows] == [r["loss_G"] for r in
                                           read_metrics(resumed / "metrics.jsonl")]
    assert (straight / "samples" / "step-000004.png").exists()
    capsys.readouterr()
    assert main(["train", "--resume", str(resumed), "--steps", "5", "--loss", "logistic"]) == 2
    assert "--loss 'logistic' (the run has 'rpgan')" in capsys.readouterr().err


# R3GAN's train.py presets: stage widths (4x4 first), blocks per stage, channels per group
# (its WidthPerStage, BlocksPerStage, and 2 * width / CardinalityPerStage; ExpansionFactor 2).
R3GAN_PRESETS = {
    "CIFAR-10": ((768,) * 4, 2, 16),
    "FFHQ-64": ((768,) * 4 + (384,), 2, 16),
    "FFHQ-256": ((768,) * 4 + (384, 192, 96), 2, 16),
    "ImageNet-32": ((1536,) * 4, 2, 32),
    "ImageNet-64": ((1536,) * 5, 2, 32),
}


def test_readmes_flags_give_r3gans_presets():
    """Each preset row of README's R3GAN table, given to the command line, builds R3GAN's
    configuration (built on the meta device: no memory, no time)."""
    rows = dict(re.findall(r"^\| (\S+) \| `(--arch r3gan [^`]*)` \|", README.read_text(), re.M))
    assert set(rows) == set(R3GAN_PRESETS)
    for name, flags in rows.items():
        cfg = _config(build_parser().parse_args(["train", *flags.split()]))[0].check()
        widths, blocks, group_channels = R3GAN_PRESETS[name]
        assert (cfg.r3gan_widths(), cfg.blocks_per_stage, cfg.group_channels, cfg.expansion) == \
            (widths, blocks, group_channels, 2), name
        with torch.device("meta"):
            G, D = build_models(cfg, 3, torch.device("meta"))
        for model in (G, D):
            assert model.blocks == (blocks,) * len(widths)
            block = next(m for m in model.modules() if hasattr(m, "grouped"))
            assert block.grouped.in_channels // block.grouped.groups == group_channels
            assert block.expand.out_channels == 2 * block.expand.in_channels


def test_r3gan_block_group_and_expansion_flags_train_and_resume(tmp_path, capsys):
    """Recorded in config.json, built into G and D, fixed on --resume; the defaults are
    unchanged (1 block per stage at 16 and 32 px, else 2; 16 channels per group; expansion 2)."""
    assert [(c.blocks_per_stage, c.group_channels, c.expansion) for c in (
        TrainConfig(arch="r3gan", res=r).check() for r in (8, 16, 32, 64))] == [
        (2, 16, 2), (1, 16, 2), (1, 16, 2), (2, 16, 2)]
    out = tmp_path / "run"
    assert main(["train", *R3GAN_FLAGS, "--blocks-per-stage", "1", "--group-channels", "4",
                 "--expansion", "3", "--steps", "2", "--out", str(out)]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert (saved["blocks_per_stage"], saved["group_channels"], saved["expansion"]) == (1, 4, 3)
    for model in ("D", "G_ema"):
        state = _final_state(out, 2)[model]
        grouped = {k: tuple(v.shape) for k, v in state.items() if k.endswith("grouped.weight")}
        assert sorted(grouped.values()) == [(24, 4, 3, 3), (48, 4, 3, 3)]  # 8 and 16 channels
    assert main(["train", "--resume", str(out), "--steps", "3", "--no-progress"]) == 0
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [0, 1, 2]
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--steps", "4", "--group-channels", "8"]) == 2
    assert "--group-channels 8 (the run has 4)" in capsys.readouterr().err


def test_rpgan_and_lazy_r2_on_another_arch(tmp_path):
    """--loss rpgan and --r2-gamma for dcgan; with --r1-interval 2 R2 runs with lazy R1, in
    its own step every second step."""
    out = tmp_path / "run"
    train(tiny_config(out, loss="rpgan", r2_gamma=0.5, steps=4))
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows if "r2" in r] == [0, 2]
    assert all("time_R1" in r and "r1" in r for r in rows if "r2" in r)
    assert json.loads((out / "config.json").read_text())["loss"] == "rpgan"


def test_a_run_saved_before_the_arch_defaults_resumes(tmp_path):
    """Runs saved when channels were resolved at build time (None in config.json and the
    checkpoints) and before r2_gamma existed resume; the resumed config records values."""
    out = tmp_path / "run"
    train(tiny_config(out, steps=2, channel_base=None, channel_max=None))
    old = json.loads((out / "config.json").read_text())
    old.update(channel_base=None, channel_max=None)
    for key in ("r2_gamma", "log_every", *R3GAN_FIELDS):
        del old[key]
    (out / "config.json").write_text(json.dumps(old))
    path = out / "checkpoints" / "ckpt-00000002.pt"
    state = torch.load(path, weights_only=True)
    torch.save({**state, "config": old}, path)
    assert main(["train", "--resume", str(out), "--steps", "3", "--no-progress"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert (saved["channel_base"], saved["channel_max"], saved["r2_gamma"]) == (512, 64, 0.0)
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [0, 1, 2]
