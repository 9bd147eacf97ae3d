"""Standard GAN models built from fastgan layers, each also buildable in eager PyTorch.

``backend='fastgan'`` uses the fused layers; ``backend='torch'`` builds the same math from
plain torch ops with an identical ``state_dict``, for comparisons on equal weights.
"""
from __future__ import annotations

from fastgan.models.dcgan import DCGANDiscriminator
from fastgan.models.generator import Generator
from fastgan.models.layers import BACKENDS, MinibatchStd
from fastgan.nn import FusedLinear
from fastgan.models.resnet import ResNetDiscriminator

DISCRIMINATORS = {"dcgan": DCGANDiscriminator, "resnet": ResNetDiscriminator}


def build_generator(res: int, z_dim: int = 128, img_channels: int = 3,
                    backend: str = "fastgan", **kwargs) -> Generator:
    """A ``Generator`` (``z [N, z_dim] -> [N, img_channels, res, res]``); ``kwargs``:
    ``channel_base``, ``channel_max``. The module's ``z_dim`` attribute gives the latent size."""
    return Generator(res, z_dim=z_dim, img_channels=img_channels, backend=backend, **kwargs)


def build_discriminator(arch: str, res: int, img_channels: int = 3, backend: str = "fastgan",
                        **kwargs):
    """A discriminator ``[N, img_channels, res, res] -> logits [N, 1]``.

    ``arch``: ``'dcgan'`` (small, stride-2 convs, CPU-friendly) or ``'resnet'`` (StyleGAN2's
    residual D with minibatch-stddev); ``kwargs`` go to its class (``channel_base``,
    ``channel_max``; ``mbstd_group``, ``mbstd_channels`` for resnet).
    """
    if arch not in DISCRIMINATORS:
        raise ValueError(f"arch must be one of {sorted(DISCRIMINATORS)}, got {arch!r}")
    return DISCRIMINATORS[arch](res, img_channels=img_channels, backend=backend, **kwargs)


__all__ = ["BACKENDS", "DCGANDiscriminator", "DISCRIMINATORS", "FusedLinear", "Generator",
           "MinibatchStd", "ResNetDiscriminator", "build_discriminator", "build_generator"]
