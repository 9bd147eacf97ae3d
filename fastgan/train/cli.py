"""``fastgan train``: the command line of the trainer (``python -m fastgan train --help``)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from fastgan.models import BACKENDS, DISCRIMINATORS
from fastgan.train.config import (ARCH_DEFAULTS, DTYPES, R3GAN_PAPER_CHANNELS, R3GAN_PAPER_RES,
                                  RESUMABLE, TrainConfig)
from fastgan.models.r3gan import DEFAULT_BLOCKS, R3GAN_CONFIGS
from fastgan.train.fid import INCEPTION_ENV, INCEPTION_FILE
from fastgan.train.losses import LOSSES

_D = TrainConfig()


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _arch_default(field: str, r3gan_paper: int | None = None) -> str:
    """``(default: V for A and B, W for C)``: the ``--arch`` defaults of ``field``; with
    ``r3gan_paper``, r3gan's value from ``R3GAN_PAPER_RES`` up too."""
    archs_of: dict[str, list[str]] = {}
    for arch, defaults in ARCH_DEFAULTS.items():
        value = defaults[field]
        text = " ".join(map(str, value)) if isinstance(value, tuple) else str(value)
        archs_of.setdefault(text, []).append(arch)
    if len(archs_of) == 1 and r3gan_paper is None:
        return f"(default: {next(iter(archs_of))})"
    parts = [f"{value} for {', '.join(archs[:-1])}{' and ' * (len(archs) > 1)}{archs[-1]}"
             for value, archs in archs_of.items()]
    if r3gan_paper is not None:
        parts.append(f"{r3gan_paper} for r3gan from {R3GAN_PAPER_RES} px up")
    return "(default: " + ", ".join(parts) + ")"


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Every ``TrainConfig`` field as a flag. Defaults are not set here (``SUPPRESS``), so
    that the flags given explicitly can be told apart on ``--resume``."""
    arg = p.add_argument
    d = _D
    arg("--data", help=f"'digits' (scikit-learn's bundled 8x8 digits, no download) or a folder "
        f"or .zip of PNG/JPEG images (default: {d.data})")
    arg("--res", type=int, help=f"image resolution, a power of two >= 4 (default: {d.res})")
    arg("--channels", type=int, choices=(1, 3),
        help="image channels (default: 1 for digits, 3 for image files)")
    arg("--arch", choices=sorted(DISCRIMINATORS),
        help="G and D: dcgan (small D of stride-2 convs), resnet (StyleGAN2's residual D with "
        "minibatch-stddev), both with a progressive-GAN-style G and StyleGAN2's recipe; or "
        "r3gan (R3GAN's G and D, ResNets of grouped convs, with its recipe: --loss rpgan, R1 "
        "and R2 every step); --steps, --lr, --betas, --loss, --r1-interval, --r2-gamma and "
        f"the channels default per arch (default: {d.arch})")
    arg("--backend", choices=BACKENDS,
        help="layers of G and D: fastgan (fused ops) or torch (the same math in eager "
        f"PyTorch, same checkpoints) (default: {d.backend})")
    arg("--channel-base", type=int, help="feature maps at resolution r are min(channel_base / "
        "r, channel_max), for G and D (r3gan: the width of each stage; --expansion times it "
        "must be divisible by --group-channels) " +
        _arch_default("channel_base", R3GAN_PAPER_CHANNELS[0]))
    arg("--channel-max", type=int, help="the cap of feature maps per layer " +
        _arch_default("channel_max", R3GAN_PAPER_CHANNELS[1]))
    arg("--blocks-per-stage", type=int, metavar="N", help="r3gan only: residual blocks at each "
        "resolution of G and D (R3GAN's presets: 2) (default: " +
        ", ".join(f"{blocks} at {res} px" for res, (_, blocks) in sorted(R3GAN_CONFIGS.items())
                  if blocks != DEFAULT_BLOCKS) + f" (the CPU-sized models), else {DEFAULT_BLOCKS})")
    arg("--group-channels", type=int, metavar="C", help="r3gan only: channels per group of the "
        "grouped 3x3 convs (R3GAN's presets: 16 for CIFAR-10 and FFHQ, 32 for ImageNet) "
        f"(default: {ARCH_DEFAULTS['r3gan']['group_channels']})")
    arg("--expansion", type=int, metavar="E", help="r3gan only: a residual block widens C "
        "channels to E * C for its grouped 3x3 conv (R3GAN's presets: 2) "
        f"(default: {ARCH_DEFAULTS['r3gan']['expansion']})")
    arg("--z-dim", type=int, help=f"latent size (default: {d.z_dim})")
    arg("--batch", type=int, help="global batch size, split evenly over the processes "
        f"(default: {d.batch})")
    arg("--steps", type=int, help="total training steps (one G, one D and, when due, one R1 "
        "optimizer step each); with --resume, a larger value extends the run " +
        _arch_default("steps"))
    arg("--lr", type=float, help="Adam learning rate of G and D " + _arch_default("lr"))
    arg("--betas", type=float, nargs=2, metavar=("B1", "B2"),
        help="Adam betas " + _arch_default("betas"))
    arg("--loss", choices=LOSSES, help="logistic (non-saturating), hinge, or rpgan (R3GAN's "
        "relativistic pairing loss softplus(D(fake) - D(real)); its G step sees reals too) " +
        _arch_default("loss"))
    arg("--r1-gamma", type=float, help="R1 weight gamma in gamma/2 * E||grad_x D(x)||^2 on "
        f"real images; 0 disables R1 (default: {d.r1_gamma})")
    arg("--r1-interval", type=int, help="lazy R1: apply it (and R2) every k steps with gamma "
        "* k and Adam lr and betas of D adjusted by k/(k+1); 0 or 1: every step, in the D step "
        + _arch_default("r1_interval"))
    arg("--r2-gamma", type=float, help="R2 weight: the same penalty at generated images, "
        "applied with R1 (same schedule; needs --r1-gamma > 0); 0 disables R2 " +
        _arch_default("r2_gamma"))
    arg("--ema", type=float, metavar="KIMG", help="half-life of the generator's weight "
        f"average in thousands of images; 0: no averaging (default: {d.ema})")
    arg("--ema-rampup", type=float, help="while young, the EMA half-life is at most this "
        f"fraction of the images seen; 0: no ramp-up (default: {d.ema_rampup})")
    arg("--mbstd-group", type=int, help="minibatch-stddev group size of --arch resnet; must "
        f"divide the per-process batch (default: {d.mbstd_group})")
    arg("--seed", type=int, help=f"seed of initialization, data order and latents (default: "
        f"{d.seed})")
    arg("--device", help="auto (CUDA if available), cpu, cuda or cuda:N; under torchrun a "
        f"bare cuda means GPU LOCAL_RANK (default: {d.device})")
    arg("--dtype", choices=DTYPES, help="parameter and data type; float64 for exact "
        f"comparisons (default: {d.dtype})")
    arg("--amp", action=argparse.BooleanOptionalAction,
        help="mixed precision: G and D compute in bfloat16 (float32 weights and optimizer), "
        "CUDA only (default: on for CUDA)")
    arg("--cuda-graphs", choices=("auto", "on", "off"),
        help="run the G step, the D step and the R1 step each as a captured CUDA graph (after "
        "3 eager warm-up steps each); auto: on for CUDA (default: auto)")
    arg("--out", help="output folder (default: runs/<data>-<res>-<date-time>)")
    arg("--log-every", type=int, help="every N steps (and at samples, checkpoints, quality "
        "signals and the end) wait for the device, write the rows of the steps since to "
        "metrics.jsonl and show the losses; other steps never wait for a GPU "
        f"(default: {d.log_every})")
    arg("--sample-every", type=int, help="save an EMA sample grid and the curves every N "
        f"steps, and at the end (default: {d.sample_every})")
    arg("--ckpt-every", type=int, help="save a checkpoint every N steps, and at the end "
        f"(default: {d.ckpt_every})")
    arg("--metrics-every", type=int, help="log the digits quality signal (fd, coverage) "
        f"every N steps, and at the end; digits data only; 0: off (default: {d.metrics_every})")
    arg("--fid-every", type=int, help="compute FID and KID of the EMA generator (Inception-v3 "
        "features, as StyleGAN2-ADA does) every N steps, and at the end; 0: off (default: with "
        "every checkpoint for image folders and zips, off for digits)")
    arg("--fid-samples", type=int, help="generated images per FID and KID, against the whole "
        "dataset; 50000 gives the number StyleGAN papers report "
        f"(default: {d.fid_samples})")
    _add_inception_argument(p)
    arg("--ckpt-keep", type=int, help="keep the newest N checkpoints and the best (lowest FID) "
        f"one; 0 keeps all (default: {d.ckpt_keep})")
    arg("--dist-timeout", type=float, metavar="SECONDS", help="under torchrun, how long a "
        f"rank waits for the others before giving up (default: {d.dist_timeout})")
    arg("--threads", type=int, help="CPU threads of this process (default: training on the "
        "CPU, half the cores, since OpenMP threads competing for busy cores slow down many "
        "times over; on a GPU, PyTorch's choice; torchrun sets 1 per process)")
    arg("--progress", action=argparse.BooleanOptionalAction,
        help="show a progress bar (default: on)")


def _add_inception_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inception", metavar="PATH", help=f"the Inception detector "
                   f"{INCEPTION_FILE} for FID and KID (default: ${INCEPTION_ENV}, else fastgan's "
                   "cached copy, downloaded once from StyleGAN2-ADA's address)")


def _add_metrics_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN_DIR_OR_CHECKPOINT", help="a run's folder (its newest good "
                   "checkpoint) or a checkpoint file")
    p.add_argument("--data", help="the real images, as for train (default: the run's --data)")
    p.add_argument("--fid-samples", type=int, help="generated images; 50000 gives the number "
                   "StyleGAN papers report (default: the run's --fid-samples)")
    _add_inception_argument(p)
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or "
                   "cuda:N (default: auto)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="show progress bars (default: on)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastgan", description="fastgan: fused Triton kernels for GAN discriminators "
        "with R1, and a trainer built on them.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = commands.add_parser(
        "train", argument_default=argparse.SUPPRESS,
        help="train a GAN with (lazy) R1",
        description="Train a GAN (non-saturating logistic, hinge or R3GAN's rpgan loss, lazy "
        "R1, optional R2, EMA generator) on the built-in digits or your images. With no "
        "arguments: digits at "
        f"{_D.res}x{_D.res} on a CPU in about five minutes. Under torchrun "
        "(torchrun --nproc_per_node N -m fastgan train ...) it trains data-parallel.")
    _add_train_arguments(train)
    train.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its "
                       "newest good checkpoint; only " + ", ".join(map(_flag, RESUMABLE)) +
                       " may differ from the run's settings")
    metrics = commands.add_parser(
        "metrics", help="FID and KID of a run's checkpoint",
        description="FID and KID of a checkpoint's EMA generator against the real images, as "
        "the trainer computes them (the same latents, so the same numbers as its metrics.jsonl "
        "rows for the same data and --fid-samples). Prints one JSON line.")
    _add_metrics_arguments(metrics)
    commands.add_parser(
        "build-ext", help="compile fastgan's optional C++/CUDA extension just in time",
        description="Compile the kernels/ extension with ninja into fastgan's per-user cache "
        "folder, then say where it went and how long it took (fastgan/ext.py).")
    return parser


def _config(args: argparse.Namespace) -> tuple[TrainConfig, bool]:
    """The run's config from the explicitly given flags; with ``--resume``, from the run's
    ``config.json`` updated by them; resolved (``--arch`` defaults filled in)."""
    given = {k: v for k, v in vars(args).items() if k not in ("command", "resume", "out")}
    out = getattr(args, "out", None)
    if "betas" in given:
        given["betas"] = tuple(given["betas"])
    resume = getattr(args, "resume", None)
    if resume is None:
        if out is None:
            name = Path(given.get("data", _D.data)).stem or "data"
            stamp = time.strftime("%Y%m%d-%H%M%S")
            out = f"runs/{name}-{given.get('res', _D.res)}-{stamp}"
        return TrainConfig(**given, out=out).resolved(), False
    if out is not None and Path(out).resolve() != Path(resume).resolve():
        raise ValueError(f"--out {out} and --resume {resume} name different folders; "
                         "a resumed run writes into its own folder")
    path = Path(resume) / "config.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"--resume {resume}: cannot read {path} ({e})") from None
    resumed = dataclasses.replace(TrainConfig.from_dict(saved), **given, out=str(resume))
    return resumed.resolved(), True


def _load_checkpoint(run: str) -> tuple[dict, Path]:
    """A run folder's newest good checkpoint, or the checkpoint file ``run``, and its path."""
    from fastgan.train import checkpoints

    path, required = Path(run), ("step", "G_ema", "config")
    if path.is_dir():
        found = checkpoints.load_latest(path, required=required)
        if found is None:
            raise FileNotFoundError(f"{run}: no usable checkpoint in "
                                    f"{checkpoints.checkpoint_dir(path)}")
        return found
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{run}: no such run folder or checkpoint file") from None
    except Exception as e:  # truncated zip, bad pickle: not a usable checkpoint
        raise ValueError(f"{run}: cannot load this checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or any(k not in state for k in required):
        raise ValueError(f"{run}: not a fastgan checkpoint (it needs {', '.join(required)})")
    return state, path


def _metrics(args: argparse.Namespace) -> int:
    """``fastgan metrics``: the trainer's FID and KID of a checkpoint; one JSON line on rank
    0's stdout."""
    from fastgan.train.data import load_dataset, natural_channels
    from fastgan.train.distributed import init_from_env, shutdown
    from fastgan.train.fid import DetectorUnavailable, open_evaluator
    from fastgan.train.trainer import build_models

    try:
        ctx = init_from_env(args.device)
        state, path = _load_checkpoint(args.run)
        cfg = TrainConfig.from_dict(state["config"]).resolved()
        data = load_dataset(args.data or cfg.data, cfg.res,
                            cfg.channels or natural_channels(cfg.data)).to(ctx.device)
        G, _ = build_models(cfg, data.channels, ctx.device)
        G.load_state_dict(state["G_ema"])
        samples = args.fid_samples or cfg.fid_samples
        evaluator = open_evaluator(args.inception or cfg.inception, ctx.device, data.images,
                                   samples, cfg.z_dim, cfg.seed, args.progress and ctx.is_main)
        row = {"checkpoint": str(path), "step": state["step"], **evaluator(G),
               "fid_samples": samples}
    except (ValueError, FileNotFoundError, DetectorUnavailable) as e:
        print(f"fastgan metrics: error: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    if ctx.is_main:
        print(json.dumps(row))
    return 0


class _TqdmHandler(logging.Handler):
    """Log lines printed above the progress bar instead of through it."""

    def emit(self, record):
        from tqdm import tqdm
        tqdm.write(self.format(record), file=sys.stderr)


def _setup_logging() -> None:
    """Log to stderr (INFO on rank 0, WARNING and worse on the others), once per process."""
    rank = int(os.environ.get("RANK", "0"))
    logger = logging.getLogger("fastgan.train")
    if any(isinstance(h, _TqdmHandler) for h in logger.handlers):
        return
    handler = _TqdmHandler()
    prefix = f"[rank {rank}] " if "RANK" in os.environ else ""
    handler.setFormatter(logging.Formatter(prefix + "%(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "build-ext":
        from fastgan.ext import build_command
        return build_command()
    _setup_logging()
    if args.command == "metrics":
        return _metrics(args)
    from fastgan.train.trainer import train

    try:
        cfg, resume = _config(args)
        row = train(cfg, resume=resume)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"fastgan train: error: {e}", file=sys.stderr)
        return 2
    if row and row["step"] + 1 < cfg.steps:
        return 130  # stopped by Ctrl-C after saving a checkpoint; the trainer said so
    return 0  # the trainer logged the summary
