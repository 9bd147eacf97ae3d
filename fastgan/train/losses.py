"""GAN losses on discriminator logits (``[N, ...]``), each returning a scalar to minimize."""
from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("logistic", "hinge", "rpgan")
# Losses whose generator term compares each fake with a real: the G step needs D(reals) too.
RELATIVISTIC_LOSSES = ("rpgan",)


def _at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits (mixed precision) upcast to float32; float32/float64 kept."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def check_loss(name: str) -> str:
    if name not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {name!r}")
    return name


def _paired(real_logits: torch.Tensor, fake_logits: torch.Tensor):
    """RpGAN's pairs: ``real_logits[i]`` with ``fake_logits[i]``; equal shapes required."""
    if real_logits.shape != fake_logits.shape:
        raise ValueError(f"rpgan pairs real and fake logits one to one: real_logits "
                         f"{tuple(real_logits.shape)} and fake_logits {tuple(fake_logits.shape)} "
                         f"must have the same shape")
    return _at_least_fp32(real_logits), _at_least_fp32(fake_logits)


def generator_loss(name: str, fake_logits, real_logits=None):
    """logistic (non-saturating): ``softplus(-D(G(z)))``; hinge: ``-D(G(z))``; rpgan
    (relativistic pairing, R3GAN): ``softplus(D(real) - D(G(z)))`` over pairs; batch mean.

    ``real_logits``: ``D(reals)``, required by the losses in ``RELATIVISTIC_LOSSES`` (same shape
    as ``fake_logits``) and not used by the others.
    """
    if check_loss(name) == "rpgan":
        if real_logits is None:
            raise ValueError("loss 'rpgan' needs real_logits (D of real images, paired with "
                             "fake_logits) for the generator loss")
        real_logits, fake_logits = _paired(real_logits, fake_logits)
        return F.softplus(real_logits - fake_logits).mean()
    fake_logits = _at_least_fp32(fake_logits)
    if name == "logistic":
        return F.softplus(-fake_logits).mean()
    return -fake_logits.mean()


def discriminator_loss(name: str, real_logits, fake_logits):
    """logistic: ``softplus(D(fake)) + softplus(-D(real))``; hinge: ``relu(1 + D(fake)) +
    relu(1 - D(real))``; each term a batch mean. rpgan: ``softplus(D(fake) - D(real))`` over
    pairs (equal shapes), batch mean."""
    if check_loss(name) == "rpgan":
        real_logits, fake_logits = _paired(real_logits, fake_logits)
        return F.softplus(fake_logits - real_logits).mean()
    real_logits, fake_logits = _at_least_fp32(real_logits), _at_least_fp32(fake_logits)
    if name == "logistic":
        return F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()
    return F.relu(1 + fake_logits).mean() + F.relu(1 - real_logits).mean()
