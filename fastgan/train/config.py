"""A training run's settings (``TrainConfig``), their defaults and their checks.

Defaults train the built-in digits on a CPU in about five minutes. Each field is a
command-line flag (``--r1-gamma`` for ``r1_gamma``); error messages name the flag. Fields
whose default depends on ``--arch`` are ``None`` until ``resolved()`` fills them from
``ARCH_DEFAULTS``; a value given explicitly always wins.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from fastgan.models import BACKENDS, DISCRIMINATORS
from fastgan.models.layers import check_resolution
from fastgan.models.r3gan import (EXPANSION, GROUP_CHANNELS, default_blocks,
                                  widths_from_channels)
from fastgan.train.losses import LOSSES

# The default of r2_gamma that means "the value of r1_gamma" (r3gan).
SAME_AS_R1_GAMMA = "--r1-gamma"
# StyleGAN2's recipe (docs/design.md section 8): logistic loss, lazy R1 every 16 steps, no R2.
STYLEGAN2_RECIPE = {"loss": "logistic", "lr": 0.002, "betas": (0.0, 0.99), "r1_interval": 16,
                    "r2_gamma": 0.0, "steps": 3000}
# Defaults of the fields left None, per --arch. Channels (channel_base, channel_max): small for
# dcgan (a CPU run on digits), StyleGAN2's config F for resnet, R3GAN_CONFIGS' widths for
# r3gan (up to 32 px; R3GAN_PAPER_CHANNELS from R3GAN_PAPER_RES up). r3gan trains with
# R3GAN's recipe (docs/design.md section 8): rpgan loss, R1 and R2 of equal gamma at every
# step, Adam betas (0, 0.9) (R3GAN's beta2 at the start of its schedule); its lr and steps
# are tuned for the digits-sized model (R3GAN: lr 2e-4 at batch 512 with 768-wide stages),
# so that its default run takes about as long as dcgan's on a CPU (README "R3GAN").
ARCH_DEFAULTS = {
    "dcgan": {**STYLEGAN2_RECIPE, "channel_base": 512, "channel_max": 64},
    "resnet": {**STYLEGAN2_RECIPE, "channel_base": 32768, "channel_max": 512},
    "r3gan": {"loss": "rpgan", "lr": 0.004, "betas": (0.0, 0.9), "r1_interval": 1,
              "r2_gamma": SAME_AS_R1_GAMMA, "steps": 1700, "channel_base": 256,
              "channel_max": 32, "group_channels": GROUP_CHANNELS, "expansion": EXPANSION},
}
R3GAN_PAPER_RES, R3GAN_PAPER_CHANNELS = 64, (24576, 768)  # R3GAN's FFHQ-64/256 widths
# Fields of --arch r3gan alone (None for the other archs): residual blocks per stage (its
# default depends on --res: fastgan.models.r3gan.default_blocks), channels per group of the
# grouped 3x3 convs and the width factor of the residual branch (R3GAN's presets: 16 channels
# per group for CIFAR-10 and FFHQ, 32 for ImageNet; expansion 2 for all).
R3GAN_FIELDS = ("blocks_per_stage", "group_channels", "expansion")

# Fields a resumed run may change; every other field must match the run's.
RESUMABLE = ("steps", "device", "log_every", "sample_every", "ckpt_every", "metrics_every",
             "ckpt_keep", "dist_timeout", "threads", "progress", "cuda_graphs", "fid_every",
             "fid_samples", "inception")
DTYPES = ("float32", "float64")
CUDA_GRAPHS = ("auto", "on", "off")


@dataclass
class TrainConfig:
    data: str = "digits"
    res: int = 16
    channels: int | None = None
    arch: str = "dcgan"
    backend: str = "fastgan"
    channel_base: int | None = None
    channel_max: int | None = None
    blocks_per_stage: int | None = None
    group_channels: int | None = None
    expansion: int | None = None
    z_dim: int = 64
    batch: int = 32
    steps: int | None = None
    lr: float | None = None
    betas: tuple | None = None
    loss: str | None = None
    r1_gamma: float = 0.05
    r1_interval: int | None = None
    r2_gamma: float | None = None
    ema: float = 10.0
    ema_rampup: float = 0.05
    mbstd_group: int = 4
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    amp: bool | None = None
    cuda_graphs: str = "auto"
    out: str | None = None
    log_every: int = 50
    sample_every: int = 500
    ckpt_every: int = 500
    metrics_every: int = 500
    fid_every: int | None = None
    fid_samples: int = 10000
    inception: str | None = None
    ckpt_keep: int = 3
    dist_timeout: float = 600.0
    threads: int | None = None
    progress: bool = True

    def graphs_on(self, device) -> bool:
        """Whether the steps run as CUDA graphs on ``device``: ``on``, or ``auto`` on CUDA."""
        return self.cuda_graphs == "on" or (self.cuda_graphs == "auto" and device.type == "cuda")

    def arch_defaults(self) -> dict:
        """The defaults of ``--arch`` at ``--res`` for the fields left ``None``."""
        if self.arch not in DISCRIMINATORS:
            raise ValueError(f"--arch must be one of {sorted(DISCRIMINATORS)}, got {self.arch!r}")
        defaults = dict(ARCH_DEFAULTS[self.arch])
        if self.arch == "r3gan":
            defaults["blocks_per_stage"] = default_blocks(self.res)
            if isinstance(self.res, int) and self.res >= R3GAN_PAPER_RES:
                defaults["channel_base"], defaults["channel_max"] = R3GAN_PAPER_CHANNELS
        return defaults

    def resolved(self) -> "TrainConfig":
        """A copy with every field left ``None`` set to its ``--arch`` default (what a run
        saves in ``config.json`` and checkpoints, so that ``--resume`` continues exactly), and
        ``fid_every`` to ``ckpt_every`` for image files, 0 for digits."""
        filled = {name: value for name, value in self.arch_defaults().items()
                  if getattr(self, name) is None}
        if filled.get("r2_gamma") == SAME_AS_R1_GAMMA:
            filled["r2_gamma"] = self.r1_gamma
        if self.fid_every is None:
            filled["fid_every"] = 0 if self.data == "digits" else self.ckpt_every
        return dataclasses.replace(self, **filled)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if self.betas is not None:
            d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}")
        d = dict(d)
        if d.get("betas") is not None:
            d["betas"] = tuple(d["betas"])
        return cls(**d)

    def check(self, world_size: int = 1) -> "TrainConfig":
        """Raise ``ValueError`` naming the flag of the first bad setting; return the
        ``resolved()`` config, the one to run."""
        return self.resolved()._check_resolved(world_size)

    def _check_resolved(self, world_size: int) -> "TrainConfig":
        def need(ok, flag, what):
            if not ok:
                raise ValueError(f"--{flag.replace('_', '-')} {what}, got "
                                 f"{getattr(self, flag)!r}")

        def positive_int(flag):
            v = getattr(self, flag)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, flag,
                 "must be an integer >= 1")

        def finite(flag, low=0.0):
            v = getattr(self, flag)
            need(isinstance(v, (int, float)) and math.isfinite(v) and v >= low, flag,
                 f"must be a finite number >= {low}")

        try:
            check_resolution(self.res)
        except ValueError:
            need(False, "res", "must be a power of two >= 4")
        need(self.channels in (None, 1, 3), "channels", "must be 1 or 3")
        need(self.backend in BACKENDS, "backend", f"must be one of {list(BACKENDS)}")
        need(self.loss in LOSSES, "loss", f"must be one of {list(LOSSES)}")
        need(self.dtype in DTYPES, "dtype", f"must be one of {list(DTYPES)}")
        need(self.cuda_graphs in CUDA_GRAPHS, "cuda_graphs", f"must be one of {list(CUDA_GRAPHS)}")
        for flag in ("channel_base", "channel_max", "threads"):
            if getattr(self, flag) is not None:
                positive_int(flag)
        for flag in ("z_dim", "batch", "steps", "log_every", "sample_every", "ckpt_every",
                     "mbstd_group"):
            positive_int(flag)
        for flag in ("metrics_every", "fid_every"):
            need(isinstance(getattr(self, flag), int) and getattr(self, flag) >= 0, flag,
                 "must be an integer >= 0 (0: off)")
        need(isinstance(self.fid_samples, int) and self.fid_samples >= 2, "fid_samples",
             "must be an integer >= 2")
        need(isinstance(self.r1_interval, int) and self.r1_interval >= 0, "r1_interval",
             "must be an integer >= 0 (0 or 1: R1 every step)")
        need(isinstance(self.ckpt_keep, int) and self.ckpt_keep >= 0, "ckpt_keep",
             "must be an integer >= 0 (0 keeps all)")
        for flag in ("r1_gamma", "r2_gamma", "ema", "ema_rampup"):
            finite(flag)
        need(self.r2_gamma == 0 or self.r1_gamma > 0, "r2_gamma",
             "is applied together with R1: it needs --r1-gamma > 0")
        need(isinstance(self.dist_timeout, (int, float)) and self.dist_timeout > 0,
             "dist_timeout", "must be a number of seconds > 0")
        need(isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0,
             "lr", "must be a finite number > 0")
        need(len(self.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1
                                          for b in self.betas), "betas",
             "must be two numbers in [0, 1)")
        need(self.batch % world_size == 0, "batch",
             f"(the global batch) must be divisible by the number of processes ({world_size})")
        need(not (self.amp and self.dtype == "float64"), "amp",
             "(bf16 mixed precision) cannot be combined with --dtype float64")
        if self.arch == "resnet":
            local = self.batch // world_size
            group = min(self.mbstd_group, local)
            need(local % group == 0, "mbstd_group",
                 f"must divide the per-process batch ({local}) for --arch resnet")
        if self.arch != "r3gan":
            for flag in R3GAN_FIELDS:
                need(getattr(self, flag) is None, flag, "applies to --arch r3gan only")
            return self
        for flag in R3GAN_FIELDS:
            positive_int(flag)
        for i, width in enumerate(self.r3gan_widths()):
            if width * self.expansion % self.group_channels:
                raise ValueError(
                    f"--channel-base {self.channel_base} and --channel-max {self.channel_max} "
                    f"give --arch r3gan {width} channels at {4 << i}x{4 << i}, but --expansion "
                    f"{self.expansion} * {width} channels must be divisible by --group-channels "
                    f"{self.group_channels}")
        return self

    def r3gan_widths(self) -> tuple[int, ...]:
        """The stage widths of ``--arch r3gan`` (4x4 first) from ``channel_base`` and
        ``channel_max`` (``fastgan.models.r3gan.widths_from_channels``)."""
        cfg = self.resolved()
        return widths_from_channels(cfg.res, cfg.channel_base, cfg.channel_max)
