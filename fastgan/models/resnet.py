"""A StyleGAN2-style residual discriminator."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastgan.models.layers import (MinibatchStd, channels_at, check_resolution, conv2d,
                                   linear)

_SQRT_HALF = math.sqrt(0.5)


class DiscriminatorBlock(nn.Module):
    """``[N, in, H, W] -> [N, out, H/2, W/2]``, ``sqrt(0.5) * (skip + main)``.

    main: 3x3 conv + lrelu (``in -> in``), then 3x3 stride-2 conv + lrelu (``in -> out``).
    skip: 2x2 average pooling, then a 1x1 linear conv without bias (``in -> out``).
    The ``sqrt(0.5)`` is folded into each branch's last layer gain.
    """

    def __init__(self, in_channels: int, out_channels: int, backend: str):
        super().__init__()
        self.conv0 = conv2d(backend, in_channels, in_channels, 3, padding=1, act="lrelu",
                            equalized_lr=True)
        self.conv1 = conv2d(backend, in_channels, out_channels, 3, stride=2, padding=1,
                            act="lrelu", gain=math.sqrt(2) * _SQRT_HALF, equalized_lr=True)
        self.skip = conv2d(backend, in_channels, out_channels, 1, bias=False, act="linear",
                           gain=_SQRT_HALF, equalized_lr=True)

    def forward(self, x):
        return self.skip(F.avg_pool2d(x, 2)) + self.conv1(self.conv0(x))


class ResNetDiscriminator(nn.Module):
    """``images [N, img_channels, res, res] -> logits [N, 1]`` (StyleGAN2's ``resnet`` D).

    fromRGB (1x1 conv + lrelu), one ``DiscriminatorBlock`` per halving down to 4x4, then the
    epilogue: minibatch standard deviation (groups of ``mbstd_group`` samples, which must
    divide the batch), 3x3 conv + lrelu, linear + lrelu, linear to one logit. Features at
    resolution ``r`` have ``min(channel_base // r, channel_max)`` channels; the defaults are
    StyleGAN2's (config F: 128 channels at 256x256, 512 from 64x64 down). Equalized learning
    rate, lrelu with gain sqrt(2).
    """

    def __init__(self, res: int, img_channels: int = 3, channel_base: int = 32768,
                 channel_max: int = 512, mbstd_group: int = 4, mbstd_channels: int = 1,
                 backend: str = "fastgan"):
        super().__init__()
        self.res, self.img_channels = check_resolution(res), img_channels

        def ch(r):
            return channels_at(r, channel_base, channel_max)

        self.from_rgb = conv2d(backend, img_channels, ch(res), 1, act="lrelu", equalized_lr=True)
        resolutions = [res >> i for i in range(res.bit_length() - 3)]  # res, res/2, ..., 8
        self.blocks = nn.Sequential(*(DiscriminatorBlock(ch(r), ch(r // 2), backend)
                                      for r in resolutions))
        c4 = ch(4)
        self.mbstd = MinibatchStd(mbstd_group, mbstd_channels)
        self.conv = conv2d(backend, c4 + mbstd_channels, c4, 3, padding=1, act="lrelu",
                           equalized_lr=True)
        self.fc = linear(backend, c4 * 16, c4, act="lrelu", equalized_lr=True)
        self.out = linear(backend, c4, 1, act="linear", equalized_lr=True)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.from_rgb(img))
        x = self.conv(self.mbstd(x))
        return self.out(self.fc(x.flatten(1)))
