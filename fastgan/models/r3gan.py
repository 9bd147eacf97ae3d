"""R3GAN's generator and discriminator (Huang et al., "The GAN is dead; long live the GAN!",
NeurIPS 2024; docs/design.md section 8): plain ResNets of grouped convolutions with no
normalization.

Every stage holds residual blocks ``x + project(grouped(expand(x)))`` at one resolution:
``expand`` a 1x1 conv ``C -> expansion * C``, ``grouped`` a 3x3 conv of ``group_channels``
channels per group, ``project`` a 1x1 conv back to ``C``; bias and leaky ReLU (slope 0.2, gain
1) follow ``expand`` and ``grouped``, fused into the conv with ``backend='fastgan'``. Stages are
joined by anti-aliased factor-2 resampling (``Downsample2d`` / ``Upsample2d`` with the low-pass
filter of ``(1, 2, 1)``) and a 1x1 conv where the width changes. Initialization is R3GAN's
fix-up style, variance preserving: weights ``N(0, gain^2 / fan_in)``, biases zero; in a
residual branch ``gain = sqrt(2 / (1 + 0.2^2)) * L^(-1/4)`` with ``L`` the number of residual
blocks of the network (``L^(-1/(2m - 2))`` for ``m = 3`` layers per branch) and the branch's
last layer zero, so every block starts as the identity; ``gain = 1`` for the other layers.
No equalized learning rate (R3GAN trains with Adam, lr 2e-4).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from fastgan.models.layers import (Downsample2d, Upsample2d, channels_at, check_backend,
                                   check_resolution, conv2d, linear)

LRELU_ALPHA = 0.2
LRELU_INIT_GAIN = math.sqrt(2 / (1 + LRELU_ALPHA ** 2))  # keeps E[x^2] through lrelu(0.2)

# Per resolution: the widths of the stages from 4x4 up to res, and residual blocks per stage.
# 64 and 256 are R3GAN's FFHQ-64 and FFHQ-256 presets. 16 and 32 px are scaled down for CPU
# runs: width min(32, 256 / r) at resolution r and one block per stage (the trainer's r3gan
# default on digits, README "R3GAN"); R3GAN's 32 px CIFAR-10 preset (768 channels at every
# stage, 2 blocks) costs ~1350x the multiply-adds of this 32 px D (7.0 G vs 5.2 M per image).
R3GAN_CONFIGS: dict[int, tuple[tuple[int, ...], int]] = {
    16: ((32, 32, 16), 1),
    32: ((32, 32, 16, 8), 1),
    64: ((768, 768, 768, 768, 384), 2),
    256: ((768, 768, 768, 768, 384, 192, 96), 2),
}
DEFAULT_BLOCKS = 2  # R3GAN's blocks per stage, for widths given at other resolutions
EXPANSION, GROUP_CHANNELS = 2, 16  # R3GAN's residual branch: width factor, channels per group


def default_blocks(res) -> int:
    """Residual blocks per stage at ``res`` when none are given: ``R3GAN_CONFIGS[res]``'s, else
    ``DEFAULT_BLOCKS``."""
    return R3GAN_CONFIGS[res][1] if res in R3GAN_CONFIGS else DEFAULT_BLOCKS


def widths_from_channels(res: int, channel_base: int, channel_max: int) -> tuple[int, ...]:
    """Stage widths from 4x4 up to ``res`` by the other models' rule: ``min(channel_base //
    r, channel_max)`` at resolution ``r``. ``R3GAN_CONFIGS``' widths are ``(256, 32)`` at 16
    and 32 px and ``(24576, 768)`` at 64 and 256 px."""
    check_resolution(res)
    return tuple(channels_at(4 << i, channel_base, channel_max)
                 for i in range(res.bit_length() - 2))


def check_width(channels: int, expansion: int = EXPANSION,
                group_channels: int = GROUP_CHANNELS) -> int:
    """``channels`` of a residual block, whose ``expansion * channels`` must split into
    groups of ``group_channels``; raises ``ValueError`` otherwise."""
    if channels * expansion % group_channels:
        raise ValueError(f"expansion * channels ({expansion} * {channels}) must be divisible "
                         f"by group_channels ({group_channels})")
    return channels


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def resolve_stages(res: int, widths=None, blocks=None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(widths, blocks)`` per stage, from the 4x4 stage up to ``res``, one stage per
    resolution ``4, 8, ..., res``.

    ``widths``: a sequence of ``log2(res) - 1`` channel counts, or ``None`` for
    ``R3GAN_CONFIGS[res]``. ``blocks``: residual blocks per stage, an int for all stages or a
    sequence like ``widths``; ``None`` for the configuration's, or ``DEFAULT_BLOCKS``.
    """
    check_resolution(res)
    n_stages = res.bit_length() - 2
    if widths is None:
        if res not in R3GAN_CONFIGS:
            raise ValueError(f"res {res} has no R3GAN configuration (those are "
                             f"{sorted(R3GAN_CONFIGS)}): pass widths")
        widths = R3GAN_CONFIGS[res][0]
    if blocks is None:
        blocks = default_blocks(res)
    if not isinstance(widths, Sequence) or len(widths) != n_stages:
        raise ValueError(f"widths must be a sequence of {n_stages} channel counts (stages 4x4 "
                         f"up to {res}x{res}), got {widths!r}")
    if not isinstance(blocks, Sequence):
        blocks = [blocks] * n_stages
    if len(blocks) != n_stages:
        raise ValueError(f"blocks must be an int or a sequence of {n_stages} ints, got "
                         f"{blocks!r}")
    return (tuple(_positive_int(w, f"widths[{i}]") for i, w in enumerate(widths)),
            tuple(_positive_int(b, f"blocks[{i}]") for i, b in enumerate(blocks)))


def _init_(layer: nn.Module, gain: float) -> nn.Module:
    """R3GAN's variance-preserving init: weight ``N(0, (gain / sqrt(fan_in))^2)``, bias 0."""
    with torch.no_grad():
        layer.weight.normal_(0.0, gain / math.sqrt(layer.weight[0].numel()))
        if layer.bias is not None:
            layer.bias.zero_()
    return layer


def _linear_conv(backend: str, in_channels: int, out_channels: int, kernel_size: int = 1,
                 groups: int = 1, gain: float = 1.0):
    """A conv without bias or activation, initialized with ``gain``."""
    return _init_(conv2d(backend, in_channels, out_channels, kernel_size, groups=groups,
                         bias=False, act="linear"), gain)


class ResidualBlock(nn.Module):
    """``[N, C, H, W] -> [N, C, H, W]``: ``x + project(grouped(expand(x)))``.

    ``expand``: 1x1 conv ``C -> E = expansion * C`` + bias + lrelu; ``grouped``: 3x3 conv
    ``E -> E`` in groups of ``group_channels`` channels + bias + lrelu; ``project``: 1x1 conv
    ``E -> C``, no bias, zero at init. ``total_blocks`` (``L``) scales the init of
    ``expand`` and ``grouped`` by ``L^(-1/4)``.
    """

    def __init__(self, channels: int, expansion: int, group_channels: int, total_blocks: int,
                 backend: str):
        super().__init__()
        expanded = check_width(channels, expansion, group_channels) * expansion
        act = dict(act="lrelu", alpha=LRELU_ALPHA, gain=1.0)
        gain = LRELU_INIT_GAIN * total_blocks ** -0.25
        self.expand = _init_(conv2d(backend, channels, expanded, 1, **act), gain)
        self.grouped = _init_(conv2d(backend, expanded, expanded, 3, padding=1,
                                     groups=expanded // group_channels, **act), gain)
        self.project = _linear_conv(backend, expanded, channels, gain=0.0)

    def forward(self, x):
        return x + self.project(self.grouped(self.expand(x)))


class Downsample(nn.Module):
    """``[N, in, H, W] -> [N, out, H/2, W/2]``: ``Downsample2d``, then a 1x1 conv (none when
    ``in == out``)."""

    def __init__(self, in_channels: int, out_channels: int, resample_filter, backend: str):
        super().__init__()
        self.resample = Downsample2d(resample_filter, backend)
        self.conv = (_linear_conv(backend, in_channels, out_channels)
                     if in_channels != out_channels else None)

    def forward(self, x):
        x = self.resample(x)
        return x if self.conv is None else self.conv(x)


class Upsample(nn.Module):
    """``[N, in, H, W] -> [N, out, 2H, 2W]``: a 1x1 conv (none when ``in == out``), then
    ``Upsample2d``."""

    def __init__(self, in_channels: int, out_channels: int, resample_filter, backend: str):
        super().__init__()
        self.conv = (_linear_conv(backend, in_channels, out_channels)
                     if in_channels != out_channels else None)
        self.resample = Upsample2d(resample_filter, backend)

    def forward(self, x):
        return self.resample(x if self.conv is None else self.conv(x))


def _checked_stages(res, widths, blocks, expansion, group_channels, backend):
    """``resolve_stages(res, widths, blocks)``, after checking the other shared arguments."""
    check_backend(backend)
    _positive_int(expansion, "expansion")
    _positive_int(group_channels, "group_channels")
    return resolve_stages(res, widths, blocks)


class R3GANDiscriminator(nn.Module):
    """``images [N, img_channels, res, res] -> logits [N, 1]``.

    ``from_rgb`` (1x1 conv), then one stage per resolution ``res, res/2, ..., 4``: its
    residual blocks, then (above 4x4) ``Downsample`` to the next stage's width; at 4x4 a
    depthwise 4x4 conv (``basis``) to ``[N, C, 1, 1]`` and a linear layer (``out``) to the
    logit. No layer mixes samples (no minibatch-stddev, no normalization): the logit of a
    sample depends on that sample only, so R1 and R2 can share one double backward
    (``fastgan.regularizers.r1_r2_penalty``).

    Args:
        res: image resolution, a power of two >= 4.
        widths, blocks: per stage, from 4x4 up to ``res`` (``resolve_stages``); by default
            ``R3GAN_CONFIGS[res]``: 16 px ``(32, 32, 16)`` x 1 block, 32 px ``(32, 32, 16,
            8)`` x 1, 64 px ``(768,) * 4 + (384,)`` x 2, 256 px ``(768,) * 4 + (384, 192,
            96)`` x 2.
        expansion: the residual branch's width factor (R3GAN: 2).
        group_channels: channels per group of the 3x3 conv (R3GAN: 16).
        resample_filter: the taps of ``lowpass_filter`` (R3GAN: ``(1, 2, 1)``).
        backend: ``'fastgan'`` (fused layers) or ``'torch'`` (same ``state_dict``, eager).
    """

    def __init__(self, res: int, img_channels: int = 3, widths=None, blocks=None,
                 expansion: int = EXPANSION, group_channels: int = GROUP_CHANNELS,
                 resample_filter=(1, 2, 1), backend: str = "fastgan"):
        super().__init__()
        widths, blocks = _checked_stages(res, widths, blocks, expansion, group_channels, backend)
        self.res, self.img_channels = res, _positive_int(img_channels, "img_channels")
        self.widths, self.blocks = widths, blocks
        total = sum(blocks)
        # Stages run from res down to 4: reverse the 4x4-first configuration.
        widths, blocks = widths[::-1], blocks[::-1]
        self.from_rgb = _linear_conv(backend, img_channels, widths[0])
        stages = []
        for i, (width, n_blocks) in enumerate(zip(widths, blocks)):
            layers = [ResidualBlock(width, expansion, group_channels, total, backend)
                      for _ in range(n_blocks)]
            if i + 1 < len(widths):
                layers.append(Downsample(width, widths[i + 1], resample_filter, backend))
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.basis = _linear_conv(backend, widths[-1], widths[-1], 4, groups=widths[-1])
        self.out = _init_(linear(backend, widths[-1], 1, bias=False, act="linear"), 1.0)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        want = (self.img_channels, self.res, self.res)
        if img.ndim != 4 or tuple(img.shape[1:]) != want:
            raise ValueError(f"img must have shape [N, {', '.join(map(str, want))}], got "
                             f"{tuple(img.shape)}")
        x = self.from_rgb(img)
        for stage in self.stages:
            x = stage(x)
        return self.out(self.basis(x).flatten(1))


class R3GANGenerator(nn.Module):
    """``z [N, z_dim] -> images [N, img_channels, res, res]`` (no output activation).

    The 4x4 stage starts from a learned basis ``[C, 4, 4]`` (init ``N(0, 1)``) scaled per
    channel by ``fc(z)`` (linear, no bias); each stage above 4x4 starts with ``Upsample`` from
    the previous width; every stage then runs its residual blocks; ``to_rgb`` (1x1 conv, no
    bias) gives the image. ``z`` is used as is (no normalization). Arguments as in
    ``R3GANDiscriminator`` (the same ``widths``/``blocks`` configuration, 4x4 first); the
    ``z_dim`` attribute gives the latent size (R3GAN: 64).
    """

    def __init__(self, res: int, z_dim: int = 64, img_channels: int = 3, widths=None,
                 blocks=None, expansion: int = EXPANSION, group_channels: int = GROUP_CHANNELS,
                 resample_filter=(1, 2, 1), backend: str = "fastgan"):
        super().__init__()
        widths, blocks = _checked_stages(res, widths, blocks, expansion, group_channels, backend)
        self.res, self.z_dim = res, _positive_int(z_dim, "z_dim")
        self.img_channels = _positive_int(img_channels, "img_channels")
        self.widths, self.blocks = widths, blocks
        total = sum(blocks)
        self.basis = nn.Parameter(torch.randn(widths[0], 4, 4))
        self.fc = _init_(linear(backend, z_dim, widths[0], bias=False, act="linear"), 1.0)
        stages = []
        for i, (width, n_blocks) in enumerate(zip(widths, blocks)):
            layers = [Upsample(widths[i - 1], width, resample_filter, backend)] if i else []
            layers += [ResidualBlock(width, expansion, group_channels, total, backend)
                       for _ in range(n_blocks)]
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.to_rgb = _linear_conv(backend, widths[-1], img_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"z must have shape [N, {self.z_dim}], got {tuple(z.shape)}")
        scale = self.fc(z)
        x = self.basis.to(scale.dtype) * scale[:, :, None, None]
        for stage in self.stages:
            x = stage(x)
        return self.to_rgb(x)
