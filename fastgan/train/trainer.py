"""The training loop: data, models, optimizers, lazy R1, EMA, outputs, checkpoints, resume.

``train(config)`` runs one process's part of a run (all of it without ``torchrun``). Each
step draws the global batch of image indices and latents from generators seeded by
``config.seed`` and shared by all ranks; rank ``r`` of ``W`` uses rows ``r*B/W ..
(r+1)*B/W``. So the N-process run computes the same global batch, and (its gradients
being averaged) takes the same steps, as a single process with the same ``--batch``.

Outputs of rank 0 in ``config.out``: ``config.json``, ``log.txt``, ``metrics.jsonl`` (one row
per step), ``samples/step-NNNNNN.png`` (EMA generator, fixed latents), ``curves.png`` and
``checkpoints/`` (with ``best.json``, the lowest FID's). Logged losses are rank 0's share of the
batch.

The loop waits for the device only at *metrics steps* (``Trainer.metrics_step``): every
``log_every`` steps, the steps that save samples or a checkpoint or measure the quality
signal or FID (which read the device anyway), and the last step. Until then each step's
losses and timings stay on the device (``TrainSteps`` returns tensors and ``Elapsed``
timers); a metrics step reads all of them with one copy and writes their rows, so
``metrics.jsonl`` holds every step up to the last metrics step. Batches and latents are drawn
on the CPU and copied without waiting (pinned memory, ``non_blocking``).
"""
from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import os
import random
import signal
import sys
import threading
from pathlib import Path

import numpy as np
import torch

from fastgan import backend_info
from fastgan.models import build_discriminator, build_generator
from fastgan.regularizers import LazyR1
from fastgan.train import checkpoints
from fastgan.train.config import RESUMABLE, TrainConfig
from fastgan.train.data import load_dataset
from fastgan.train.distributed import (Context, agree_setup, broadcast_module, check_in_sync,
                                       init_from_env, shutdown)
from fastgan.train.ema import EMA
from fastgan.train.fid import DetectorUnavailable, open_evaluator
from fastgan.files import atomic_write
from fastgan.train.quality import DigitQuality
from fastgan.train.report import MetricsLog, plot_curves, read_metrics, save_grid
from fastgan.train.steps import Elapsed, TrainSteps

log = logging.getLogger("fastgan.train")

GRID_SIZE = 64  # samples in each grid (8 x 8)


def build_models(cfg: TrainConfig, img_channels: int, device: torch.device):
    """G and D of ``cfg.arch``, initialized from ``cfg.seed`` (same on every rank). Their
    channels follow ``channel_base`` and ``channel_max``; for r3gan, as its stage widths
    (``TrainConfig.r3gan_widths``), with ``blocks_per_stage``, ``group_channels`` and
    ``expansion``."""
    cfg = cfg.resolved()
    dtype = getattr(torch, cfg.dtype)
    if cfg.arch == "r3gan":
        g_kwargs = d_kwargs = {"widths": cfg.r3gan_widths(), "blocks": cfg.blocks_per_stage,
                               "group_channels": cfg.group_channels,
                               "expansion": cfg.expansion}
    else:
        g_kwargs = {"channel_base": cfg.channel_base, "channel_max": cfg.channel_max}
        d_kwargs = {**g_kwargs, **({"mbstd_group": cfg.mbstd_group}
                                   if cfg.arch == "resnet" else {})}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        G = build_generator(cfg.res, z_dim=cfg.z_dim, img_channels=img_channels,
                            backend=cfg.backend, arch=cfg.arch, **g_kwargs)
        D = build_discriminator(cfg.arch, cfg.res, img_channels=img_channels,
                                backend=cfg.backend, **d_kwargs)
    return G.to(device, dtype), D.to(device, dtype)


def cpu_threads(requested: int | None, device: torch.device) -> int:
    """CPU threads for this process: ``requested`` if given; else, training on the CPU, half
    the cores (at least 1) and no more than PyTorch's default, since OpenMP slows down many
    times over when its threads outnumber the cores that are free; else PyTorch's default."""
    if requested:
        return requested
    if device.type == "cpu":
        return max(1, min(torch.get_num_threads(), (os.cpu_count() or 2) // 2))
    return torch.get_num_threads()


def describe_device(device: torch.device, backend: str) -> str:
    """A line saying what computes the run on ``device``: eager PyTorch for ``--backend
    torch``; else fastgan's ops as ``fastgan.backend_info()`` reports them for the device's
    type (Triton kernels, the compiled extension or the torch reference), and whether the
    extension is used or why not."""
    name = str(device)
    if device.type == "cuda" and torch.cuda.is_available():
        name += f" ({torch.cuda.get_device_name(device)})"
    elif device.type == "cpu":
        threads = torch.get_num_threads()
        name += f" ({threads} thread{'s' * (threads != 1)})"
    if backend == "torch":
        return f"device {name}: layers in eager PyTorch (--backend torch)"
    info = backend_info()
    return (f"device {name}: fastgan's ops run {info[f'{device.type}_tensors']}; the compiled "
            f"extension: {info[f'{device.type}_extension']}")


class _StopRequest:
    """The first Ctrl-C asks the loop to stop after the current step and save a checkpoint; a
    second one interrupts at once. Only for a single process run from the main thread (ranks
    of a torchrun job could stop at different steps; torchrun handles Ctrl-C for them)."""

    def __init__(self, active: bool):
        self.requested = False
        self._previous = None
        if active and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stopping after this step (Ctrl-C again to stop at once)")

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class Trainer:
    """One process's state of a run; ``run()`` trains up to ``cfg.steps`` steps."""

    def __init__(self, cfg: TrainConfig, ctx: Context, resume: bool):
        self.cfg, self.ctx, self.device = cfg, ctx, ctx.device
        self.out = Path(cfg.out)
        self.dtype = getattr(torch, cfg.dtype)
        self.local_batch = cfg.batch // ctx.world_size
        self.start_step, self.cur_nimg = 0, 0
        self.best_fid = float("inf")
        self.metrics = None
        self._held_rows = []  # rows of the steps since the last metrics step (on the device)
        error = None
        try:
            self._setup(resume)
        except Exception as e:  # reported to every rank by agree_setup
            error = e
        try:
            agree_setup(error)
            for module in (self.G, self.D, self.ema.model):
                broadcast_module(module)
            self.fid = self._fid_evaluator() if self.cfg.fid_every else None
        except BaseException:
            self.close()
            raise

    def _setup(self, resume: bool) -> None:
        """Check the settings, load the data, build everything; only then create the run's
        folder (a refused run leaves nothing on disk) and write its first outputs. The log
        lines of the checks reach ``log.txt`` too: they are held until it exists. From here
        on ``self.cfg`` is the resolved config (``--arch`` defaults filled in)."""
        ctx = self.ctx
        if ctx.is_main:
            self._held_log = logging.handlers.MemoryHandler(
                capacity=1 << 20, flushLevel=logging.CRITICAL + 1)
            log.addHandler(self._held_log)
        cfg = self.cfg = self.cfg.check(ctx.world_size)
        if cfg.amp and self.device.type != "cuda":
            raise ValueError(f"--amp (bf16 mixed precision) needs a CUDA device, not {self.device}")
        graphs = cfg.graphs_on(self.device)
        if graphs and self.device.type != "cuda":
            raise ValueError(f"--cuda-graphs on needs a CUDA device, not {self.device}")
        if not resume and checkpoints.has_checkpoints(self.out):
            raise FileExistsError(f"--out {self.out} already holds a run with checkpoints; "
                                  f"continue it with --resume {self.out} or choose another --out")
        checkpoint = self._find_checkpoint() if resume else None
        log.info("output folder %s (%s)", self.out, "resuming its run" if resume else "a new run")
        self._threads_before = torch.get_num_threads()
        torch.set_num_threads(cpu_threads(cfg.threads, self.device))
        torch.manual_seed(cfg.seed + ctx.rank)
        np.random.seed((cfg.seed + ctx.rank) % 2**32)
        random.seed(cfg.seed + ctx.rank)

        self.data = load_dataset(cfg.data, cfg.res, cfg.channels).to(self.device)
        if ctx.is_main:
            log.info("%s; %d process(es)", describe_device(self.device, cfg.backend),
                     ctx.world_size)
        self.G, self.D = build_models(cfg, self.data.channels, self.device)
        self.lazy_r1 = LazyR1(cfg.r1_gamma, cfg.r1_interval)
        betas = tuple(float(b) for b in cfg.betas)
        self.opt_G = torch.optim.Adam(self.G.parameters(), lr=cfg.lr, betas=betas, eps=1e-8,
                                      capturable=graphs)
        d_lr, d_betas = self.lazy_r1.adam_params(cfg.lr, betas)
        self.opt_D = torch.optim.Adam(self.D.parameters(), lr=d_lr, betas=d_betas, eps=1e-8,
                                      capturable=graphs)
        self.ema = EMA(self.G, cfg.ema, cfg.ema_rampup)
        self.data_gen = torch.Generator().manual_seed(cfg.seed)
        self.latent_gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.steps = TrainSteps(self.G, self.D, self.opt_G, self.opt_D, self.lazy_r1, cfg.loss,
                                r2_gamma=cfg.r2_gamma, sample_z=self._latents, amp=cfg.amp,
                                timing=True, cuda_graphs=graphs)
        self.grid_latents = torch.randn(GRID_SIZE, cfg.z_dim,
                                        generator=torch.Generator().manual_seed(cfg.seed + 2))
        self.quality = None
        if cfg.data == "digits" and cfg.metrics_every and ctx.is_main:
            self.quality = DigitQuality(self.data.batch(torch.arange(len(self.data))),
                                        cfg.z_dim, seed=cfg.seed + 3)
        if checkpoint is not None:
            self._restore(*checkpoint)
        if ctx.is_main:
            self._open_outputs()
            log.info("%s: G %.2fM params, D (%s) %.2fM params, loss %s, %s, R2 gamma %g",
                     "resuming" if resume else "starting",
                     sum(p.numel() for p in self.G.parameters()) / 1e6, cfg.arch,
                     sum(p.numel() for p in self.D.parameters()) / 1e6, cfg.loss,
                     self.lazy_r1, cfg.r2_gamma)

    def _fid_evaluator(self):
        """(Collective) FID and KID of the EMA generator, or ``None`` (said in one log line)
        when the detector cannot be had."""
        cfg = self.cfg
        try:
            return open_evaluator(cfg.inception, self.device, self.data.images, cfg.fid_samples,
                                  cfg.z_dim, cfg.seed, cfg.progress and self.ctx.is_main)
        except DetectorUnavailable as e:
            log.warning("FID and KID are off: %s", e)
            return None

    def _open_outputs(self) -> None:
        """Create the run's folder, ``log.txt`` (starting with the held log lines),
        ``config.json`` and ``metrics.jsonl``. Where ``--out`` cannot be written (permission
        denied, a read-only file system, a file in the way, a full disk), remove what this
        call created and raise ``ValueError`` naming ``--out`` and the reason."""
        folders, files, handler = [], [], None
        try:
            # What does not exist yet, so a failure can remove exactly that (deepest first).
            folders = [p for p in (self.out, *self.out.parents) if not p.exists()]
            files = [f for f in (self.out / n for n in ("log.txt", "config.json",
                                                        "metrics.jsonl")) if not f.exists()]
            self.out.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(self.out / "log.txt", encoding="utf-8")
            text = json.dumps(self.cfg.to_dict(), indent=2) + "\n"
            atomic_write(self.out / "config.json", lambda f: f.write(text.encode()))
            self.metrics = MetricsLog(self.out / "metrics.jsonl", self.start_step)
        except OSError as e:
            if handler is not None:
                handler.close()
            for path in files:
                with contextlib.suppress(OSError):
                    path.unlink()
            for folder in folders:
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise ValueError(f"--out {self.out}: cannot write the run's files there "
                             f"({e.strerror or e})") from None
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self._held_log.setTarget(handler)
        self._held_log.flush()
        log.addHandler(handler)
        self._log_handler = handler
        self._drop_held_log()

    def _drop_held_log(self) -> None:
        held = getattr(self, "_held_log", None)
        if held is not None:
            log.removeHandler(held)
            held.setTarget(None)
            held.close()
            self._held_log = None

    def _latents(self, n: int) -> torch.Tensor:
        """This rank's ``n`` rows of the global batch of latents (drawn on the CPU: the same
        latents on every device, and a checkpoint resumes on any device)."""
        z = torch.randn(n * self.ctx.world_size, self.cfg.z_dim, generator=self.latent_gen,
                        dtype=self.dtype)
        return self._to_device(z[self.ctx.rank * n:(self.ctx.rank + 1) * n])

    def _reals(self) -> torch.Tensor:
        """This rank's rows of the global batch of training images."""
        idx = torch.randint(len(self.data), (self.cfg.batch,), generator=self.data_gen)
        b, r = self.local_batch, self.ctx.rank
        return self.data.batch(self._to_device(idx[r * b:(r + 1) * b]), self.dtype)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """CPU tensor ``t`` on the run's device, copied without waiting for the device (a
        plain copy to CUDA synchronizes the stream; one from pinned memory need not)."""
        if self.device.type != "cuda":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

    def _state(self, step: int) -> dict:
        return {"step": step, "cur_nimg": self.cur_nimg, "config": self.cfg.to_dict(),
                "G": self.G.state_dict(), "D": self.D.state_dict(),
                "G_ema": self.ema.model.state_dict(), "opt_G": self.opt_G.state_dict(),
                "opt_D": self.opt_D.state_dict(), "rng": checkpoints.rng_state(self.device),
                "data_gen": self.data_gen.get_state(),
                "latent_gen": self.latent_gen.get_state(), "best_fid": self.best_fid}

    def _find_checkpoint(self) -> tuple[dict, Path]:
        """The run's newest good checkpoint and its path; the settings must match it."""
        found = checkpoints.load_latest(self.out, required=("G", "D", "G_ema", "opt_G",
                                                            "opt_D", "config"))
        if found is None:
            raise FileNotFoundError(f"--resume {self.out}: no usable checkpoint in "
                                    f"{checkpoints.checkpoint_dir(self.out)}")
        # Resolved: runs saved before a field had --arch defaults hold None for it. The
        # folder may be named differently now (moved, a trailing slash, absolute).
        saved = TrainConfig.from_dict(found[0]["config"]).resolved().to_dict()
        changed = [f"--{k.replace('_', '-')} {v!r} (the run has {saved[k]!r})"
                   for k, v in self.cfg.to_dict().items()
                   if k not in (*RESUMABLE, "out") and v != saved[k]]
        if changed:
            raise ValueError(f"--resume {self.out}: these settings differ from the run's: "
                             + ", ".join(changed))
        return found

    def _restore(self, state: dict, path: Path) -> None:
        """Continue from checkpoint ``state``: weights, optimizers, RNGs, step."""
        self.G.load_state_dict(state["G"])
        self.D.load_state_dict(state["D"])
        self.ema.model.load_state_dict(state["G_ema"])
        self.opt_G.load_state_dict(state["opt_G"])
        self.opt_D.load_state_dict(state["opt_D"])
        checkpoints.set_rng_state(state["rng"], self.device)
        self.data_gen.set_state(state["data_gen"])
        self.latent_gen.set_state(state["latent_gen"])
        self.start_step, self.cur_nimg = state["step"], state["cur_nimg"]
        self.best_fid = state.get("best_fid", float("inf"))
        log.info("resuming from %s (step %d of %d)", path, self.start_step, self.cfg.steps)

    def _step(self, step: int) -> tuple[dict, Elapsed]:
        """One training step, without waiting for the device; returns what ``TrainSteps``
        returned (tensors and ``Elapsed`` timers) and the time of the whole step."""
        elapsed = Elapsed(self.device)
        reals = self._reals()
        lazy, due = self.lazy_r1.lazy, self.lazy_r1.due(step)
        row = self.steps.g_step(self.local_batch, reals)  # reals: for the rpgan loss
        row.update(self.steps.d_step(reals, r1=due and not lazy))
        if lazy and due:
            row.update(self.steps.r1_step(reals))
        self.ema.update(self.G, self.cfg.batch, self.cur_nimg)
        self.cur_nimg += self.cfg.batch
        return row, elapsed.stop()

    def _hold_row(self, step: int, row: dict, elapsed: Elapsed) -> None:
        """Keep step ``step``'s row until the next metrics step: its tensors stacked into one
        new tensor (under CUDA graphs the returned ones are overwritten by the next replay),
        and the row with None in their place."""
        values = torch.stack([v.detach() for v in row.values() if isinstance(v, torch.Tensor)])
        row = {k: None if isinstance(v, torch.Tensor) else v for k, v in row.items()}
        self._held_rows.append((step, row, values, elapsed))

    def _read_rows(self) -> list[dict]:
        """The held rows as metrics rows of Python numbers (``step``, the losses and
        penalties, the phases' times in seconds, ``img_s``), oldest first. Waits for the
        device: all their tensors come back in one copy."""
        held, self._held_rows = self._held_rows, []
        flat = iter(torch.cat([values for _, _, values, _ in held]).tolist())
        return [{"step": step,
                 **{k: next(flat) if v is None else v.seconds() for k, v in row.items()},
                 "img_s": self.cfg.batch / elapsed.seconds()}
                for step, row, _, elapsed in held]

    def _every(self, step: int, interval: int) -> bool:
        return (step + 1) % interval == 0 or step + 1 == self.cfg.steps

    def _fid_step(self, step: int) -> bool:
        return self.fid is not None and self._every(step, self.cfg.fid_every)

    def metrics_step(self, step: int) -> bool:
        """Whether the loop reads the device after ``step`` (the only steps that wait for
        it): every ``log_every`` steps, the steps that save samples or a checkpoint or
        measure FID or (rank 0, digits) the quality signal, and the last step."""
        cfg = self.cfg
        return (self._every(step, cfg.log_every) or self._every(step, cfg.sample_every)
                or self._every(step, cfg.ckpt_every) or self._fid_step(step)
                or (self.quality is not None and self._every(step, cfg.metrics_every)))

    @torch.no_grad()
    def _save_samples(self, completed: int) -> None:
        images = self.ema.model(self.grid_latents.to(self.device, self.dtype))
        save_grid(images, self.out / "samples" / f"step-{completed:06d}.png")
        plot_curves(read_metrics(self.out / "metrics.jsonl"), self.out / "curves.png")

    def _save_checkpoint(self, completed: int, best: dict | None = None) -> None:
        """(Collective) check that all ranks agree, then rank 0 writes the checkpoint (with
        ``best``, the row of a new lowest FID, recorded as the run's best)."""
        check_in_sync({"G": self.G, "D": self.D, "G_ema": self.ema.model})
        if self.ctx.is_main:
            path = checkpoints.save_checkpoint(self.out, self._state(completed),
                                               self.cfg.ckpt_keep, best)
            log.info("checkpoint %s", path)

    def run(self) -> dict:
        """Train from the current step to ``cfg.steps``; returns the last metrics row (rank
        0; ``{}`` on the other ranks and when there was nothing to do)."""
        from tqdm import tqdm

        cfg, main = self.cfg, self.ctx.is_main
        finished = self.start_step >= cfg.steps
        if finished:
            log.info("the run has completed %d steps already (--steps %d): nothing to do",
                     self.start_step, cfg.steps)
            if main and cfg.progress:  # once: a tqdm bar draws when made and when closed
                tqdm.write(tqdm.format_meter(self.start_step, cfg.steps, 0, unit="step"),
                           file=sys.stderr)
        bar = tqdm(total=cfg.steps, initial=self.start_step, unit="step", dynamic_ncols=True,
                   disable=finished or not (main and cfg.progress))
        stop = _StopRequest(self.ctx.world_size == 1)
        row, step = {}, self.start_step
        try:
            for step in range(self.start_step, cfg.steps):
                values, elapsed = self._step(step)
                bar.update(1)
                if main:
                    self._hold_row(step, values, elapsed)
                scores = {}
                if self._fid_step(step):
                    scores = self.fid(self.ema.model)  # collective; every rank gets them
                    log.info("step %d: fid %.3f, kid %.5f", step, scores["fid"], scores["kid"])
                best = bool(scores) and scores["fid"] < self.best_fid
                if best:
                    self.best_fid = scores["fid"]
                if not (self.metrics_step(step) or stop.requested):
                    continue
                if main:
                    row = self._write_rows(step, bar, scores)
                    if self._every(step, cfg.sample_every):
                        self._save_samples(step + 1)
                if self._every(step, cfg.ckpt_every) or stop.requested or best:
                    self._save_checkpoint(step + 1, best=row if best else None)
                if stop.requested:
                    log.warning("stopped at step %d of %d; continue with --resume %s",
                                step + 1, cfg.steps, self.out)
                    break
        except BaseException as e:
            if self.ctx.world_size > 1 and not isinstance(e, KeyboardInterrupt):
                log.error("rank %d stopped at step %d: %s: %s (a failed collective usually "
                          "means another rank stopped first: see its log)", self.ctx.rank,
                          step, type(e).__name__, e)
            raise
        finally:
            stop.restore()
            bar.close()
            if self.metrics is not None:
                self.metrics.close()
        if main and row and row["step"] + 1 == cfg.steps:
            summary = ", ".join(f"{k} {row[k]:.3f}" for k in ("loss_D", "loss_G", "fd", "coverage",
                                                               "fid") if k in row)
            log.info("done: %s; outputs in %s", summary, self.out)
        return row

    def _write_rows(self, step: int, bar, scores: dict) -> dict:
        """At metrics step ``step`` (rank 0): read the held rows, add ``scores`` (FID and KID,
        when measured) and the quality signal to this step's when due, append them to
        ``metrics.jsonl`` and show this step's losses on the progress bar; returns this step's
        row."""
        rows = self._read_rows()
        row = rows[-1]
        row.update(scores)
        if self.quality is not None and self._every(step, self.cfg.metrics_every):
            row.update(self.quality(self.ema.model))
            log.info("step %d: fd %.2f, coverage %.2f", step, row["fd"], row["coverage"])
        for r in rows:
            self.metrics.write(r)
        bar.set_postfix({"img/s": f"{row['img_s']:.0f}", "D": f"{row['loss_D']:.3f}",
                         "G": f"{row['loss_G']:.3f}"})
        return row

    def close(self) -> None:
        """Detach the run's log file (or drop the held lines of a refused run) and restore
        the thread count."""
        if hasattr(self, "_threads_before"):
            torch.set_num_threads(self._threads_before)
        self._drop_held_log()
        handler = getattr(self, "_log_handler", None)
        if handler is not None:
            log.removeHandler(handler)
            handler.close()


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Run (or, with ``resume``, continue) the training run ``cfg`` in ``cfg.out``; joins the
    ``torchrun`` process group if there is one. Returns rank 0's last metrics row."""
    if not cfg.out:
        raise ValueError("--out must name the run's output folder")
    ctx = init_from_env(cfg.device, cfg.dist_timeout)
    trainer = None
    try:
        trainer = Trainer(cfg, ctx, resume)
        return trainer.run()
    finally:
        if trainer is not None:
            trainer.close()
        shutdown()
