"""GAN losses on discriminator logits (``[N, ...]``), each returning a scalar to minimize."""
from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("logistic", "hinge")


def _at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits (mixed precision) upcast to float32; float32/float64 kept."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def check_loss(name: str) -> str:
    if name not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {name!r}")
    return name


def generator_loss(name: str, fake_logits):
    """logistic (non-saturating): ``softplus(-D(G(z)))``; hinge: ``-D(G(z))``; batch mean."""
    fake_logits = _at_least_fp32(fake_logits)
    if check_loss(name) == "logistic":
        return F.softplus(-fake_logits).mean()
    return -fake_logits.mean()


def discriminator_loss(name: str, real_logits, fake_logits):
    """logistic: ``softplus(D(fake)) + softplus(-D(real))``; hinge: ``relu(1 + D(fake)) +
    relu(1 - D(real))``; each term a batch mean."""
    real_logits, fake_logits = _at_least_fp32(real_logits), _at_least_fp32(fake_logits)
    if check_loss(name) == "logistic":
        return F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()
    return F.relu(1 + fake_logits).mean() + F.relu(1 - real_logits).mean()
