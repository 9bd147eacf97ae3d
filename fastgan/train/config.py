"""A training run's settings (``TrainConfig``), their defaults and their checks.

Defaults train the built-in digits on a CPU in about five minutes. Each field is a
command-line flag (``--r1-gamma`` for ``r1_gamma``); error messages name the flag.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from fastgan.models import BACKENDS, DISCRIMINATORS
from fastgan.models.layers import check_resolution
from fastgan.train.losses import LOSSES

# channel_base / channel_max of G and D per --arch when not given: small for dcgan (a CPU
# run on digits), StyleGAN2's config F for resnet.
ARCH_CHANNELS = {"dcgan": (512, 64), "resnet": (32768, 512)}

# Fields a resumed run may change; every other field must match the run's.
RESUMABLE = ("steps", "device", "sample_every", "ckpt_every", "metrics_every", "ckpt_keep",
             "dist_timeout", "threads", "progress", "cuda_graphs")
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
    z_dim: int = 64
    batch: int = 32
    steps: int = 3000
    lr: float = 0.002
    betas: tuple = (0.0, 0.99)
    loss: str = "logistic"
    r1_gamma: float = 0.05
    r1_interval: int = 16
    ema: float = 10.0
    ema_rampup: float = 0.05
    mbstd_group: int = 4
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    amp: bool | None = None
    cuda_graphs: str = "auto"
    out: str | None = None
    sample_every: int = 500
    ckpt_every: int = 500
    metrics_every: int = 500
    ckpt_keep: int = 3
    dist_timeout: float = 600.0
    threads: int | None = None
    progress: bool = True

    def graphs_on(self, device) -> bool:
        """Whether the steps run as CUDA graphs on ``device``: ``on``, or ``auto`` on CUDA."""
        return self.cuda_graphs == "on" or (self.cuda_graphs == "auto" and device.type == "cuda")

    def resolved_channels(self) -> tuple[int, int]:
        """``(channel_base, channel_max)`` with the ``--arch`` defaults filled in."""
        base, cmax = ARCH_CHANNELS[self.arch]
        return (self.channel_base or base, self.channel_max or cmax)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)

    def check(self, world_size: int = 1) -> "TrainConfig":
        """Raise ``ValueError`` naming the flag of the first bad setting; return self."""
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
        need(self.arch in DISCRIMINATORS, "arch", f"must be one of {sorted(DISCRIMINATORS)}")
        need(self.backend in BACKENDS, "backend", f"must be one of {list(BACKENDS)}")
        need(self.loss in LOSSES, "loss", f"must be one of {list(LOSSES)}")
        need(self.dtype in DTYPES, "dtype", f"must be one of {list(DTYPES)}")
        need(self.cuda_graphs in CUDA_GRAPHS, "cuda_graphs", f"must be one of {list(CUDA_GRAPHS)}")
        for flag in ("channel_base", "channel_max", "threads"):
            if getattr(self, flag) is not None:
                positive_int(flag)
        for flag in ("z_dim", "batch", "steps", "sample_every", "ckpt_every", "mbstd_group"):
            positive_int(flag)
        need(isinstance(self.metrics_every, int) and self.metrics_every >= 0, "metrics_every",
             "must be an integer >= 0 (0: off)")
        need(isinstance(self.r1_interval, int) and self.r1_interval >= 0, "r1_interval",
             "must be an integer >= 0 (0 or 1: R1 every step)")
        need(isinstance(self.ckpt_keep, int) and self.ckpt_keep >= 0, "ckpt_keep",
             "must be an integer >= 0 (0 keeps all)")
        for flag in ("r1_gamma", "ema", "ema_rampup"):
            finite(flag)
        need(isinstance(self.dist_timeout, (int, float)) and self.dist_timeout > 0,
             "dist_timeout", "must be a number of seconds > 0")
        need(isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0,
             "lr", "must be a finite number > 0")
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas",
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
        return self
