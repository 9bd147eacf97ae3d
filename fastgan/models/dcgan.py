"""A small DCGAN-style discriminator: stride-2 convs down to 4x4, then one linear layer."""
from __future__ import annotations

import torch
from torch import nn

from fastgan.models.layers import channels_at, check_resolution, conv2d, linear


class DCGANDiscriminator(nn.Module):
    """``images [N, img_channels, res, res] -> logits [N, 1]``.

    One 4x4 stride-2 conv + lrelu per halving of the resolution, down to 4x4 features, then a
    linear layer to one logit. Features at resolution ``r`` have
    ``min(channel_base // r, channel_max)`` channels; equalized learning rate and lrelu gain
    sqrt(2) as in the StyleGAN discriminators, so the same optimizer settings suit both. No
    batch-dependent layers: the logit of a sample depends on that sample only.
    """

    def __init__(self, res: int, img_channels: int = 3, channel_base: int = 2048,
                 channel_max: int = 256, backend: str = "fastgan"):
        super().__init__()
        self.res, self.img_channels = check_resolution(res), img_channels
        layers, in_channels, r = [], img_channels, res
        while r > 4:
            r //= 2
            out_channels = channels_at(r, channel_base, channel_max)
            layers.append(conv2d(backend, in_channels, out_channels, 4, stride=2, padding=1,
                                 act="lrelu", equalized_lr=True))
            in_channels = out_channels
        self.convs = nn.Sequential(*layers)
        self.out = linear(backend, in_channels * 16, 1, act="linear", equalized_lr=True)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.out(self.convs(img).flatten(1))
