"""FID and KID as the StyleGAN family computes them (docs/design.md section 8).

The detector is StyleGAN2-ADA's TorchScript translation of TensorFlow's Inception-v3
(``inception-2015-12-05.pt``): ``detector(uint8 [N, 3, H, W], return_features=True) ->
float32 [N, 2048]`` at any H, W (it resizes internally). It comes from ``--inception PATH``,
else ``$FASTGAN_INCEPTION``, else ``<cache_dir>/inception-2015-12-05.pt``, downloaded there once
from ``INCEPTION_URL`` and checked against ``INCEPTION_SHA256``. Only torch is needed.

* Images: real ones as stored (uint8); generated ones ``(x * 127.5 + 128).clamp(0, 255)``
  truncated to uint8; one channel is repeated to three.
* ``fid``: ``|mu_g - mu_r|^2 + tr(S_g + S_r - 2 sqrtm(S_g S_r))`` (scipy's ``sqrtm``, real
  part) of Gaussians fitted in float64, the covariance divided by N. The real statistics cover
  the whole dataset and are cached per content of the images (so per resolution and channels)
  and per detector file, in ``<cache_dir>/fid/``.
* ``kid``: the unbiased MMD^2 with kernel ``(a.b / d + 1)^3``, averaged over ``KID_SUBSETS``
  random subsets of ``min(KID_SUBSET_SIZE, N_g, N_r)`` samples of each set.

Under torchrun, rank ``r`` of ``W`` embeds images ``r, r + W, ...``; the float64 sums are
all-reduced and the features gathered in order on rank 0, which computes the numbers and
broadcasts them: the same numbers as one process.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastgan.files import atomic_write, cache_dir
from fastgan.train.distributed import (broadcast_from_main, gather_interleaved, gather_objects,
                                       rank_and_world_size, sum_over_ranks)

log = logging.getLogger("fastgan.train")

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = ("https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
                 + INCEPTION_FILE)
# The file's sha256, as several public projects that verify their download of it record it.
INCEPTION_SHA256 = "f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4"
INCEPTION_ENV = "FASTGAN_INCEPTION"
HOW_TO_PROVIDE = (f"download {INCEPTION_URL} and pass --inception PATH or set {INCEPTION_ENV}"
                  "=PATH")
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000
DETECTOR_BATCH = 64  # images per detector call
_STATS_VERSION = 1


class DetectorUnavailable(RuntimeError):
    """The detector cannot be had; the message is one line saying why and how to provide it."""


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def download(url: str, path, sha256: str, progress: bool = True, timeout: float = 60.0) -> None:
    """Fetch ``url`` into ``path`` through a temporary file beside it, with a progress bar; the
    file is renamed into place only when its sha256 is ``sha256``, so a failed, partial or
    corrupted download leaves nothing. Raises ``DetectorUnavailable``."""
    from tqdm import tqdm

    path = Path(path)

    def fetch(f):
        digest = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=timeout) as response:
            size = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=size, unit="B", unit_scale=True, desc=path.name,
                      disable=not progress) as bar:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    f.write(chunk)
                    bar.update(len(chunk))
        if digest.hexdigest() != sha256:
            raise DetectorUnavailable(f"the file downloaded from {url} has sha256 "
                                      f"{digest.hexdigest()}, not {sha256}; nothing was saved; "
                                      + HOW_TO_PROVIDE)

    log.info("downloading the Inception detector from %s to %s", url, path)
    try:
        atomic_write(path, fetch)
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise DetectorUnavailable(f"cannot download the Inception detector from {url} "
                                  f"({_one_line(e)}); {HOW_TO_PROVIDE}") from None


def detector_file(path=None, progress: bool = True) -> Path:
    """The detector's file: ``path`` (``--inception``), else ``$FASTGAN_INCEPTION``, else the
    cached copy, downloaded first if missing. Raises ``DetectorUnavailable``."""
    for given, source in ((path, "--inception"), (os.environ.get(INCEPTION_ENV), INCEPTION_ENV)):
        if given:
            found = Path(given).expanduser()
            if not found.is_file():
                raise DetectorUnavailable(f"{source} {given}: no such file; {HOW_TO_PROVIDE}")
            return found
    cached = cache_dir() / INCEPTION_FILE
    if not cached.is_file():
        download(INCEPTION_URL, cached, INCEPTION_SHA256, progress)
    return cached


class Detector:
    """A feature network on ``device``: ``detector(uint8 [N, 1 or 3, H, W]) -> float32 [N,
    dim]``. ``digest`` is the sha256 of its ``file`` (part of the dataset statistics' key)."""

    def __init__(self, module, file: Path, device):
        self.module, self.file, self.device = module, file, torch.device(device)
        self.digest = hashlib.sha256(file.read_bytes()).hexdigest()
        self.dim = self(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)).shape[1]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be uint8 [N, 1 or 3, H, W], got {images.dtype} "
                             f"{tuple(images.shape)}")
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        features = self.module(images.to(self.device), return_features=True)
        if features.ndim != 2 or features.shape[0] != images.shape[0]:
            raise ValueError(f"the detector returned {tuple(features.shape)} for "
                             f"{images.shape[0]} images, not [N, features]")
        return features.float()


def load_detector(path=None, device="cpu", progress: bool = True) -> Detector:
    """The detector from ``detector_file(path)`` on ``device``, checked with one call. Raises
    ``DetectorUnavailable``."""
    file = detector_file(path, progress)
    try:
        with warnings.catch_warnings():  # torch 2.13 warns that TorchScript is deprecated
            warnings.filterwarnings("ignore", ".*torch.jit.load", DeprecationWarning)
            module = torch.jit.load(str(file), map_location=device).eval()
        return Detector(module, file, device)
    except (RuntimeError, ValueError, OSError) as e:
        raise DetectorUnavailable(f"cannot use {file} as the Inception detector "
                                  f"({_one_line(e)}); {HOW_TO_PROVIDE}") from None


@dataclass
class Statistics:
    """Features of ``len(features)`` images: ``mean`` ``[D]`` and ``cov`` ``[D, D]`` in float64
    (the covariance divides by N), and the features ``[N, D]`` themselves (float32, for KID)."""
    mean: np.ndarray
    cov: np.ndarray
    features: np.ndarray


def fid_from_stats(gen: Statistics, real: Statistics) -> float:
    """The Frechet distance of the two Gaussians."""
    import scipy.linalg

    root = scipy.linalg.sqrtm(gen.cov @ real.cov)
    distance = np.square(gen.mean - real.mean).sum() + np.trace(gen.cov + real.cov - 2 * root)
    return float(np.real(distance))


def kid_from_features(gen: np.ndarray, real: np.ndarray, subsets: int = KID_SUBSETS,
                      subset_size: int = KID_SUBSET_SIZE, seed: int = 0, device="cpu") -> float:
    """The unbiased MMD^2 of ``gen`` ``[Ng, D]`` and ``real`` ``[Nr, D]`` with kernel ``(a.b / D
    + 1)^3``, averaged over ``subsets`` pairs of subsets of ``m = min(subset_size, Ng, Nr)``
    rows drawn without replacement (numpy's generator seeded by ``seed``); computed in float64
    on ``device``."""
    m = min(subset_size, len(gen), len(real))
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples in each set, got {len(gen)} generated "
                         f"and {len(real)} real")
    gen, real = (torch.as_tensor(f, dtype=torch.float64, device=device) for f in (gen, real))
    dim, rng, total = gen.shape[1], np.random.default_rng(seed), 0.0
    for _ in range(subsets):
        x = gen[torch.from_numpy(rng.choice(len(gen), m, replace=False)).to(device)]
        y = real[torch.from_numpy(rng.choice(len(real), m, replace=False)).to(device)]
        within = (x @ x.T / dim + 1) ** 3 + (y @ y.T / dim + 1) ** 3
        across = (x @ y.T / dim + 1) ** 3
        total += ((within.sum() - within.trace()) / (m * (m - 1)) - 2 * across.mean()).item()
    return total / subsets


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Generator output (``[-1, 1]``) as the detector sees it: ``x * 127.5 + 128``, clamped to
    ``[0, 255]`` and truncated to uint8 (StyleGAN's conversion)."""
    return (images * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def _embed(detector: Detector, images_of, total: int, desc: str, progress: bool,
           batch: int = DETECTOR_BATCH) -> Statistics | None:
    """Collective: the statistics of images ``0 .. total - 1`` (``images_of(indices)`` gives
    them as uint8); rank ``r`` of ``W`` embeds ``r, r + W, ...``. ``None`` except on rank 0."""
    from tqdm import tqdm

    rank, world_size = rank_and_world_size()
    dev = detector.device
    sums = torch.zeros(detector.dim, dtype=torch.float64, device=dev)
    outer = torch.zeros(detector.dim, detector.dim, dtype=torch.float64, device=dev)
    parts = [torch.zeros(0, detector.dim, device=dev)]
    with tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for indices in torch.arange(rank, total, world_size).split(batch):
            features = detector(images_of(indices)).to(dev)
            f64 = features.double()
            sums += f64.sum(0)
            outer += f64.T @ f64
            parts.append(features)
            bar.update(min(len(indices) * world_size, total - bar.n))
    sum_over_ranks(sums, outer)
    features = gather_interleaved(torch.cat(parts), total)
    if features is None:
        return None
    mean = sums / total
    cov = outer / total - torch.outer(mean, mean)
    return Statistics(mean.cpu().numpy(), cov.cpu().numpy(), features.cpu().numpy())


def _stats_path(detector: Detector, images: torch.Tensor) -> Path:
    """The cache file of ``images``' statistics: named by a hash of their shape and content
    and of the detector's file."""
    key = hashlib.sha256(json.dumps([_STATS_VERSION, list(images.shape),
                                     detector.digest]).encode())
    for chunk in images.split(1024):
        key.update(chunk.contiguous().cpu().numpy().tobytes())
    return cache_dir() / "fid" / f"{key.hexdigest()[:32]}.npz"


def _read_stats(path: Path) -> Statistics | None:
    """Cached statistics, or ``None`` if the file is missing or unreadable."""
    try:
        with np.load(path) as f:
            return Statistics(f["mean"], f["cov"], f["features"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None


def dataset_statistics(detector: Detector, images: torch.Tensor,
                       progress: bool = False) -> Statistics | None:
    """Collective: the statistics of all ``images`` (uint8 ``[N, C, H, W]``), from the cache
    when rank 0 finds them there, else computed and cached by rank 0. ``None`` except on rank
    0."""
    rank, _ = rank_and_world_size()
    stats = path = None
    if rank == 0:
        path = _stats_path(detector, images)
        stats = _read_stats(path)
    found = broadcast_from_main(torch.tensor(float(stats is not None), device=detector.device))
    if found.item():
        if rank == 0:
            log.info("FID: dataset statistics loaded from the cache %s", path)
        return stats
    stats = _embed(detector, lambda i: images[i.to(images.device)], len(images),
                   "FID: dataset features", progress)
    if rank == 0:
        atomic_write(path, lambda f: np.savez(f, mean=stats.mean, cov=stats.cov,
                                              features=stats.features))
        log.info("FID: statistics of %d dataset images cached in %s", len(images), path)
    return stats


class FIDEvaluator:
    """``evaluator(G) -> {'fid', 'kid'}`` of ``n_samples`` images of generator ``G`` (``z [N,
    z_dim] -> [N, C, H, W]``) against all ``reals`` (uint8). The latents are drawn once from
    ``seed``, in one order for any number of ranks, and so are KID's subsets. Collective:
    every rank builds and calls it, and every rank gets the numbers."""

    def __init__(self, detector: Detector, reals: torch.Tensor, n_samples: int, z_dim: int,
                 seed: int = 0, progress: bool = False):
        if n_samples < 2:
            raise ValueError(f"--fid-samples must be at least 2, got {n_samples}")
        self.detector, self.seed, self.progress = detector, seed, progress
        self.latents = torch.randn(n_samples, z_dim, generator=torch.Generator().manual_seed(seed))
        self.real = dataset_statistics(detector, reals, progress)

    @torch.no_grad()
    def __call__(self, G) -> dict:
        param = next(G.parameters())
        gen = _embed(self.detector,
                     lambda i: to_uint8(G(self.latents[i].to(param.device, param.dtype))),
                     len(self.latents), "FID: generated features", self.progress)
        values = torch.zeros(2, dtype=torch.float64, device=self.detector.device)
        if gen is not None:
            values[0] = fid_from_stats(gen, self.real)
            values[1] = kid_from_features(gen.features, self.real.features, seed=self.seed,
                                          device=self.detector.device)
        fid, kid = broadcast_from_main(values).tolist()
        return {"fid": fid, "kid": kid}


def open_evaluator(inception, device, reals: torch.Tensor, n_samples: int, z_dim: int,
                   seed: int = 0, progress: bool = False) -> FIDEvaluator:
    """Collective: an ``FIDEvaluator`` with the detector from ``inception`` (a path or
    ``None``: see ``detector_file``) on every rank; ranks that lack the cached copy each
    download it (the writes are atomic). When some rank cannot have the detector, every rank
    raises ``DetectorUnavailable`` with the first such rank's reason."""
    detector, reason = None, None
    try:
        detector = load_detector(inception, device, progress)
    except DetectorUnavailable as e:
        reason = str(e)
    reasons = [f"rank {r}: {why}" if r else why
               for r, why in enumerate(gather_objects(reason)) if why]
    if reasons:
        raise DetectorUnavailable(reasons[0])
    log.info("FID and KID of %d generated images against %d dataset images, detector %s",
             n_samples, len(reals), detector.file)
    return FIDEvaluator(detector, reals, n_samples, z_dim, seed, progress)
