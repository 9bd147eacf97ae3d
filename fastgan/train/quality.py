"""A quality signal for runs on the built-in digits: class coverage and a Frechet distance.

A small CNN classifier is trained once on scikit-learn's digits (at 16x16, seconds on a CPU)
and cached in ``<cache_dir>/digits_classifier_v1.pt``. Images of any resolution are converted
to grayscale and resized to 16x16 before it sees them, so one classifier serves every
``--res``.

* ``fd``: Frechet distance between Gaussians fitted to the classifier's penultimate features
  (64-d) of generated and of real digits (lower is better; real vs real is ~0).
* ``coverage``: the fraction of the 10 classes that receive at least a quarter of their fair
  share (``n / 40``) of the classifier's predictions on generated digits (1.0: no class
  missing).
"""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastgan.train.data import digits
from fastgan.files import atomic_write, cache_dir

log = logging.getLogger("fastgan.train")

_CLASSIFIER_FILE = "digits_classifier_v1.pt"


class DigitClassifier(nn.Module):
    """``images [N, C, H, W] in [-1, 1] -> logits [N, 10]``; ``features`` gives ``[N, 64]``."""

    RES = 16

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, 64)
        self.head = nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().mean(dim=1, keepdim=True)
        if x.shape[-1] != self.RES or x.shape[-2] != self.RES:
            x = F.interpolate(x, size=(self.RES, self.RES), mode="bilinear",
                              align_corners=False, antialias=True)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _train_classifier(epochs: int = 10, seed: int = 0) -> DigitClassifier:
    """Train on 80% of the digits; log the accuracy on the other 20%. Leaves the global RNG
    state as it found it."""
    images, labels = digits(DigitClassifier.RES)
    x = images.float() / 127.5 - 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        order = torch.randperm(len(x))
        test, train = order[: len(x) // 5], order[len(x) // 5:]
        model = DigitClassifier()
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        for _ in range(epochs):
            for idx in train[torch.randperm(len(train))].split(64):
                loss = F.cross_entropy(model(x[idx]), labels[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    with torch.no_grad():
        accuracy = (model(x[test]).argmax(1) == labels[test]).float().mean().item()
    log.info("digit classifier trained: %.1f%% accuracy on held-out digits", 100 * accuracy)
    return model.eval()


def digit_classifier() -> DigitClassifier:
    """The cached classifier, trained and cached on first use."""
    path = cache_dir() / _CLASSIFIER_FILE
    model = DigitClassifier()
    try:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval().requires_grad_(False)
    except (OSError, RuntimeError, KeyError, EOFError):  # missing, partial or stale
        pass
    model = _train_classifier()
    atomic_write(path, lambda f: torch.save(model.state_dict(), f))
    return model.requires_grad_(False)


def frechet_distance(feat_a: np.ndarray, feat_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets ``[Na, K]`` and ``[Nb, K]``:
    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))``."""
    a, b = np.asarray(feat_a, np.float64), np.asarray(feat_b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # tr((S_a S_b)^(1/2)) = sum of sqrt(eigenvalues of S_a^(1/2) S_b S_a^(1/2)), a PSD matrix.
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ s_b @ root_a), 0, None)).sum()
    return float(np.square(mu_a - mu_b).sum() + np.trace(s_a) + np.trace(s_b) - 2 * cross)


class DigitQuality:
    """Scores a generator against ``reals`` (``[N, C, H, W]`` in ``[-1, 1]``) on
    ``n_samples`` fixed latents drawn from ``seed``: ``evaluator(G) -> {'fd', 'coverage'}``."""

    def __init__(self, reals: torch.Tensor, z_dim: int, n_samples: int = 1000, seed: int = 0,
                 batch: int = 250):
        self.device = reals.device
        self.classifier = digit_classifier().to(self.device)
        self.batch = batch
        self.latents = torch.randn(n_samples, z_dim,
                                   generator=torch.Generator().manual_seed(seed))
        self.real_features = self._features(reals.split(batch)).cpu().numpy()

    @torch.no_grad()
    def _features(self, batches) -> torch.Tensor:
        return torch.cat([self.classifier.features(x) for x in batches])

    @torch.no_grad()
    def __call__(self, G) -> dict:
        fakes = (G(z.to(self.device)).float().clamp(-1, 1) for z in self.latents.split(self.batch))
        features = self._features(fakes)
        predicted = self.classifier.head(features).argmax(dim=1)
        counts = torch.bincount(predicted, minlength=10)
        coverage = (counts >= len(predicted) / 40).float().mean().item()
        return {"fd": frechet_distance(features.cpu().numpy(), self.real_features),
                "coverage": coverage}
