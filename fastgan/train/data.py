"""Training images: scikit-learn's bundled handwritten digits, or a folder or .zip of images.

Every dataset is held in memory as uint8 ``[N, C, res, res]`` and handed out as float
batches scaled to ``[-1, 1]``.

* ``digits``: the 1797 8x8 grayscale digits that ship with scikit-learn (no download),
  upscaled bilinearly to ``res``. One channel by default (they are grayscale); ``channels=3``
  replicates it.
* a folder (searched recursively) or a ``.zip`` of PNG/JPEG files: each image is converted to
  RGB (3 channels, the default) or grayscale (``channels=1``), center-cropped to a square and
  resized to ``res`` (Lanczos). Files that cannot be decoded are skipped and counted in the
  log. The decoded array is cached in ``<cache_dir>/datasets/``, keyed by the path, the
  names, sizes and modification times of the files, ``res`` and ``channels``.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fastgan.files import atomic_write, cache_dir

log = logging.getLogger("fastgan.train")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_CACHE_VERSION = 1


class ImageDataset:
    """``images``: uint8 ``[N, C, res, res]``; ``name``: where they came from."""

    def __init__(self, images: torch.Tensor, name: str):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} "
                             f"{tuple(images.shape)}")
        self.images, self.name = images, name

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    def to(self, device) -> "ImageDataset":
        """Keep the uint8 images on ``device`` (batches are then gathered there)."""
        return ImageDataset(self.images.to(device), self.name)

    def batch(self, indices: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """Images ``indices`` as ``[len(indices), C, res, res]`` floats in ``[-1, 1]``."""
        x = self.images[indices.to(self.images.device)]
        return x.to(dtype) / 127.5 - 1


def digits(res: int, channels: int = 1) -> torch.Tensor:
    """scikit-learn's 8x8 digits (values 0..16) upscaled to ``res``: uint8 ``[1797, C, res,
    res]``, and their labels ``[1797]``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images).float().unsqueeze(1) / 16  # [N, 1, 8, 8] in [0, 1]
    x = F.interpolate(x, size=(res, res), mode="bilinear", align_corners=False,
                      antialias=res < 8)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, channels, -1, -1)
    return x.contiguous(), torch.from_numpy(bunch.target).long()


def _image_files(path: Path) -> list[tuple[str, int, int]]:
    """``(name, size, mtime_ns)`` of the image files in a folder or zip, sorted by name."""
    if path.is_dir():
        found = []
        for root, _, files in os.walk(path):
            for name in files:
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    full = Path(root) / name
                    st = full.stat()
                    found.append((str(full.relative_to(path)), st.st_size, st.st_mtime_ns))
        return sorted(found)
    with zipfile.ZipFile(path) as zf:
        return sorted((i.filename, i.file_size, 0) for i in zf.infolist()
                      if not i.is_dir() and i.filename.lower().endswith(IMAGE_EXTENSIONS))


def _decode(raw: bytes, res: int, mode: str) -> np.ndarray:
    """One image file's bytes -> uint8 ``[res, res, C]``, center-cropped and resized."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(raw)) as im:
        im = ImageOps.fit(im.convert(mode), (res, res), Image.Resampling.LANCZOS)
    arr = np.asarray(im, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def _decode_all(path: Path, names: list[str], res: int, mode: str):
    """Decode every file; returns ``(uint8 [N, res, res, C], skipped, first_error)``."""
    images, skipped, first_error = [], 0, None
    zf = zipfile.ZipFile(path) if path.is_file() else None
    try:
        for name in names:
            try:
                raw = zf.read(name) if zf else (path / name).read_bytes()
                images.append(_decode(raw, res, mode))
            except Exception as e:  # Pillow raises many exception types for malformed files
                skipped += 1
                first_error = first_error or f"{name}: {e}"
    finally:
        if zf:
            zf.close()
    channels = 1 if mode == "L" else 3
    stacked = np.stack(images) if images else np.zeros((0, res, res, channels), np.uint8)
    return stacked, skipped, first_error


def _read_cache(cache: Path):
    """``(images, skipped)`` from a cache file, or ``None`` if it is missing or unreadable."""
    try:
        with np.load(cache) as f:
            return f["images"], int(f["skipped"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None


def _load_image_files(data: str, res: int, channels: int) -> torch.Tensor:
    path = Path(data).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--data {data}: no such folder or .zip file (use 'digits' "
                                "for the built-in data set)")
    if path.is_file() and not zipfile.is_zipfile(path):
        raise ValueError(f"--data {data}: not a folder or a .zip file")
    files = _image_files(path)
    st = path.stat()
    stamp = (st.st_size, st.st_mtime_ns) if path.is_file() else None
    key = json.dumps([_CACHE_VERSION, str(path.resolve()), stamp, files, res, channels])
    cache = cache_dir() / "datasets" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.npz"
    cached = _read_cache(cache)
    if cached is not None:
        (images, skipped), first_error = cached, None
        log.info("%s: decoded images loaded from the cache %s", data, cache)
    else:
        images, skipped, first_error = _decode_all(path, [f[0] for f in files], res,
                                                   "L" if channels == 1 else "RGB")
        if len(images):
            atomic_write(cache, lambda f: np.savez(f, images=images, skipped=skipped))
    if skipped:
        log.warning("%s: skipped %d of %d image files that could not be read%s", data, skipped,
                    len(files), f" (first: {first_error})" if first_error else "")
    if len(images) == 0:
        raise ValueError(f"--data {data}: no readable images ({'/'.join(IMAGE_EXTENSIONS)}) "
                         f"found; {len(files)} image files, {skipped} unreadable")
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def natural_channels(data: str) -> int:
    """The channels of ``data`` when none are asked for: 1 for digits, 3 for image files."""
    return 1 if data == "digits" else 3


def load_dataset(data: str, res: int, channels: int | None = None) -> ImageDataset:
    """``data``: ``'digits'`` or a folder/.zip path; ``channels``: 1 or 3, ``None`` for
    ``natural_channels(data)``."""
    if channels not in (None, 1, 3):
        raise ValueError(f"--channels must be 1 or 3, got {channels!r}")
    channels = channels or natural_channels(data)
    if data == "digits":
        images, _ = digits(res, channels)
    else:
        images = _load_image_files(data, res, channels)
    log.info("data %s: %d images, %d channel(s), %dx%d", data, len(images), images.shape[1],
             res, res)
    return ImageDataset(images, data)
