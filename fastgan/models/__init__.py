"""Standard GAN models built from fastgan layers, each also buildable in eager PyTorch.

``backend='fastgan'`` uses the fused layers; ``backend='torch'`` builds the same math from
plain torch ops with an identical ``state_dict``, for comparisons on equal weights.
"""
from __future__ import annotations

from fastgan.models.dcgan import DCGANDiscriminator
from fastgan.models.generator import Generator
from fastgan.models.layers import BACKENDS, MinibatchStd
from fastgan.nn import FusedLinear
from fastgan.models.r3gan import R3GANDiscriminator, R3GANGenerator
from fastgan.models.resnet import ResNetDiscriminator

DISCRIMINATORS = {"dcgan": DCGANDiscriminator, "resnet": ResNetDiscriminator,
                  "r3gan": R3GANDiscriminator}
# The generator each architecture trains with: dcgan and resnet share ``Generator``.
GENERATORS = {"dcgan": Generator, "resnet": Generator, "r3gan": R3GANGenerator}


def build_generator(res: int, z_dim: int = 128, img_channels: int = 3,
                    backend: str = "fastgan", arch: str = "dcgan", **kwargs):
    """The generator of ``arch`` (``z [N, z_dim] -> [N, img_channels, res, res]``); the
    module's ``z_dim`` attribute gives the latent size.

    ``arch``: ``'dcgan'`` or ``'resnet'`` (both ``Generator``; ``kwargs``: ``channel_base``,
    ``channel_max``) or ``'r3gan'`` (``R3GANGenerator``; ``kwargs``: ``widths``, ``blocks``,
    ``expansion``, ``group_channels``, ``resample_filter``).
    """
    if arch not in GENERATORS:
        raise ValueError(f"arch must be one of {sorted(GENERATORS)}, got {arch!r}")
    return GENERATORS[arch](res, z_dim=z_dim, img_channels=img_channels, backend=backend,
                            **kwargs)


def build_discriminator(arch: str, res: int, img_channels: int = 3, backend: str = "fastgan",
                        **kwargs):
    """A discriminator ``[N, img_channels, res, res] -> logits [N, 1]``.

    ``arch``: ``'dcgan'`` (small, stride-2 convs, CPU-friendly), ``'resnet'`` (StyleGAN2's
    residual D with minibatch-stddev) or ``'r3gan'`` (R3GAN's grouped-conv ResNet, no layer
    mixing samples); ``kwargs`` go to its class (``channel_base``, ``channel_max`` for dcgan
    and resnet; ``mbstd_group``, ``mbstd_channels`` for resnet; ``widths``, ``blocks``,
    ``expansion``, ``group_channels``, ``resample_filter`` for r3gan).
    """
    if arch not in DISCRIMINATORS:
        raise ValueError(f"arch must be one of {sorted(DISCRIMINATORS)}, got {arch!r}")
    return DISCRIMINATORS[arch](res, img_channels=img_channels, backend=backend, **kwargs)


__all__ = ["BACKENDS", "DCGANDiscriminator", "DISCRIMINATORS", "FusedLinear", "GENERATORS",
           "Generator", "MinibatchStd", "R3GANDiscriminator", "R3GANGenerator",
           "ResNetDiscriminator", "build_discriminator", "build_generator"]
