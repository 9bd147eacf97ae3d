"""A simple generator: latent -> 4x4 features -> (upsample, conv, conv) per doubling -> RGB."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastgan.models.layers import channels_at, check_resolution, conv2d, linear, pixel_norm


class GeneratorBlock(nn.Module):
    """``[N, in, H, W] -> [N, out, 2H, 2W]``: nearest upsampling, two 3x3 conv + lrelu layers,
    each followed by pixel norm."""

    def __init__(self, in_channels: int, out_channels: int, backend: str):
        super().__init__()
        self.conv0 = conv2d(backend, in_channels, out_channels, 3, padding=1, act="lrelu",
                            equalized_lr=True)
        self.conv1 = conv2d(backend, out_channels, out_channels, 3, padding=1, act="lrelu",
                            equalized_lr=True)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return pixel_norm(self.conv1(pixel_norm(self.conv0(x))))


class Generator(nn.Module):
    """``z [N, z_dim] -> images [N, img_channels, res, res]``, roughly in ``[-1, 1]`` (not
    clamped).

    The latent is normalized (pixel norm), mapped by a linear + lrelu layer to 4x4 features,
    refined by a 3x3 conv, then doubled by ``GeneratorBlock``s up to ``res``; a 1x1 linear
    conv ("toRGB") gives the image. All layers use equalized learning rate and lrelu with gain
    sqrt(2); features at resolution ``r`` have ``min(channel_base // r, channel_max)``
    channels. ``backend`` is ``'fastgan'`` (fused layers) or ``'torch'`` (the same math and
    ``state_dict`` in eager PyTorch).
    """

    def __init__(self, res: int, z_dim: int = 128, img_channels: int = 3,
                 channel_base: int = 16384, channel_max: int = 512, backend: str = "fastgan"):
        super().__init__()
        self.res, self.z_dim, self.img_channels = check_resolution(res), z_dim, img_channels
        ch = [channels_at(4 << i, channel_base, channel_max) for i in range(res.bit_length() - 2)]
        self.fc = linear(backend, z_dim, ch[0] * 16, act="lrelu", equalized_lr=True)
        self.conv4 = conv2d(backend, ch[0], ch[0], 3, padding=1, act="lrelu", equalized_lr=True)
        self.blocks = nn.ModuleList(GeneratorBlock(a, b, backend) for a, b in zip(ch, ch[1:]))
        self.to_rgb = conv2d(backend, ch[-1], img_channels, 1, act="linear", equalized_lr=True)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"z must have shape [N, {self.z_dim}], got {tuple(z.shape)}")
        x = pixel_norm(self.fc(pixel_norm(z)).reshape(z.shape[0], -1, 4, 4))
        x = pixel_norm(self.conv4(x))
        for block in self.blocks:
            x = block(x)
        return self.to_rgb(x)
