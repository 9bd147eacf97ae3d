"""FID and KID (fastgan/train/fid.py) with a small TorchScript stand-in for the Inception
detector, written by the tests with the real one's call signature, on images the tests make."""
import hashlib
import json
import logging
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fastgan.train import checkpoints, fid
from fastgan.train.cli import main
from fastgan.train.fid import (DetectorUnavailable, FIDEvaluator, Statistics, dataset_statistics,
                               detector_file, fid_from_stats, kid_from_features, load_detector,
                               to_uint8)
from fastgan.train.report import read_metrics
from test_distributed import REPO, _torchrun

DIM = 8  # the stand-in's feature size (the real detector's is 2048)


class StandInDetector(torch.nn.Module):
    """uint8 [N, 3, H, W] of any size -> [N, DIM] features (2x2 average pooling, then a fixed
    random projection and tanh); without ``return_features``, one logit per image."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.register_buffer("proj", torch.randn(12, DIM,
                                                 generator=torch.Generator().manual_seed(seed)))

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise RuntimeError("expected uint8 [N, 3, H, W]")
        pooled = F.adaptive_avg_pool2d(x.to(torch.float32) / 127.5 - 1, 2).flatten(1)
        features = torch.tanh(pooled @ self.proj * 2)
        return features if return_features else features.sum(1, keepdim=True)


def write_detector(path, seed: int = 0):
    """Save a scripted ``StandInDetector`` at ``path``; returns ``path``."""
    with warnings.catch_warnings():  # torch 2.13 warns that TorchScript is deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(StandInDetector(seed)).save(str(path))
    return path


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """An empty cache folder per test, no FASTGAN_INCEPTION, and no network: the download
    address is a file that does not exist."""
    monkeypatch.setenv("FASTGAN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(fid.INCEPTION_ENV, raising=False)
    monkeypatch.setattr(fid, "INCEPTION_URL", (tmp_path / "offline" / "x.pt").as_uri())


@pytest.fixture(scope="module")
def detector_path(tmp_path_factory):
    return write_detector(tmp_path_factory.mktemp("detector") / "standin.pt")


@pytest.fixture
def detector(detector_path):
    return load_detector(detector_path)


def _images(n, seed=0, res=8, channels=3):
    """Images with some structure: a random brightness per image and per quadrant, plus noise."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, channels, 2, 2, generator=g) * 200 + 20
    x = F.interpolate(base, size=(res, res), mode="nearest") + torch.randn(
        n, channels, res, res, generator=g) * 10
    return x.clamp(0, 255).to(torch.uint8)


def _shifted(images, by):
    return (images.int() + by).clamp(0, 255).to(torch.uint8)


def _stats(features: np.ndarray) -> Statistics:
    f = np.asarray(features, np.float64)
    return Statistics(f.mean(0), np.cov(f, rowvar=False, bias=True), features)


# --- the numbers --------------------------------------------------------------------------

def test_fid_matches_an_independent_computation():
    """|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 sum sqrt(eig(S_a^1/2 S_b S_a^1/2)), via eigh."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 5)) @ rng.standard_normal((5, 5))
    b = 0.5 + rng.standard_normal((200, 5)) @ rng.standard_normal((5, 5))
    sa, sb = np.cov(a, rowvar=False, bias=True), np.cov(b, rowvar=False, bias=True)
    w, v = np.linalg.eigh(sa)
    root_a = (v * np.sqrt(w)) @ v.T
    cross = np.sqrt(np.linalg.eigvalsh(root_a @ sb @ root_a)).sum()
    expected = np.square(a.mean(0) - b.mean(0)).sum() + np.trace(sa) + np.trace(sb) - 2 * cross
    assert fid_from_stats(_stats(a), _stats(b)) == pytest.approx(expected, rel=1e-10)
    assert fid_from_stats(_stats(a), _stats(a)) == pytest.approx(0, abs=1e-9)


def test_kid_is_the_unbiased_mmd_with_the_cubic_kernel():
    """Subsets as large as both sets are permutations of them: KID is then exactly the
    unbiased MMD^2, written out here pair by pair."""
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((12, 4)), 0.3 + rng.standard_normal((12, 4))

    def k(u, v):
        return (u @ v / 4 + 1) ** 3

    m = len(x)
    within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    across = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    expected = within / (m * (m - 1)) - 2 * across / m ** 2
    assert kid_from_features(x, y, subsets=3) == pytest.approx(expected, rel=1e-10)
    # Subsets of 5 of 12: a different, noisier estimate, reproducible from its seed.
    small = kid_from_features(x, y, subsets=4, subset_size=5, seed=7)
    assert small != pytest.approx(expected, rel=1e-3)
    assert small == kid_from_features(x, y, subsets=4, subset_size=5, seed=7)
    with pytest.raises(ValueError, match="at least 2 samples"):
        kid_from_features(x[:1], y)


def test_generated_images_are_converted_as_stylegan_does():
    x = torch.tensor([-2.0, -1.0, -0.999, 0.0, 0.5, 0.999, 1.0, 3.0])
    expected = [0, 0, 0, 128, 191, 255, 255, 255]  # floor(x * 127.5 + 128), clamped
    assert to_uint8(x).tolist() == expected and to_uint8(x).dtype == torch.uint8


def test_dataset_statistics_fit_the_detector_features(detector):
    images = _images(40)
    stats = dataset_statistics(detector, images)
    features = detector.module(images, return_features=True).numpy()
    assert detector.dim == DIM and stats.features.shape == (40, DIM)
    np.testing.assert_array_equal(stats.features, features)
    np.testing.assert_allclose(stats.mean, features.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(features.astype(np.float64), rowvar=False,
                                                 bias=True), rtol=1e-9, atol=1e-14)


def test_fid_and_kid_of_a_set_against_itself_and_shifted_sets(detector):
    """KID is unbiased: ~0 for another draw of the same images (of the same set it is not 0:
    the pairs of an image with itself count only across the sets)."""
    images, draw = _images(64), _images(64, seed=1)
    real = dataset_statistics(detector, images)
    sets = [dataset_statistics(detector, x) for x in (
        images.clone(), draw, _shifted(draw, 30), _shifted(draw, 80))]  # the first from the cache
    fids = [fid_from_stats(s, real) for s in sets]
    kids = [kid_from_features(s.features, real.features) for s in sets[1:]]
    assert abs(fids[0]) < 1e-9 and 0 < fids[1] < fids[2] < fids[3], fids
    assert abs(kids[0]) < 0.2 * kids[1] and kids[1] < kids[2], kids


def test_grayscale_images_are_repeated_to_three_channels(detector):
    gray = _images(5, channels=1)
    torch.testing.assert_close(detector(gray), detector(gray.repeat(1, 3, 1, 1)), rtol=0, atol=0)
    with pytest.raises(ValueError, match="uint8"):
        detector(gray.float())


def test_generator_statistics_follow_the_latents_not_the_batching(detector):
    """FIDEvaluator draws its latents once; generated images are embedded in batches."""
    torch.manual_seed(0)
    G = torch.nn.Sequential(torch.nn.Linear(4, 3 * 8 * 8), torch.nn.Tanh(),
                            torch.nn.Unflatten(1, (3, 8, 8))).double()
    reals = _images(30)
    evaluator = FIDEvaluator(detector, reals, n_samples=70, z_dim=4, seed=3)
    numbers = evaluator(G)
    with torch.no_grad():
        fakes = to_uint8(G(evaluator.latents.double()))
    gen = _stats(detector(fakes).numpy())
    assert numbers["fid"] == pytest.approx(fid_from_stats(gen, evaluator.real), rel=1e-9)
    assert numbers["kid"] == pytest.approx(
        kid_from_features(gen.features, evaluator.real.features, seed=3), rel=1e-9)
    assert numbers == evaluator(G) and numbers["fid"] > 1


# --- the dataset statistics' cache --------------------------------------------------------

def _counting(detector):
    """Record the batch sizes the detector's network sees."""
    calls, network = [], detector.module
    detector.module = lambda x, return_features: calls.append(len(x)) or network(
        x, return_features=return_features)
    return calls


def test_dataset_statistics_are_cached_by_content_and_detector(detector, tmp_path, caplog):
    images = _images(70)
    calls = _counting(detector)
    first = dataset_statistics(detector, images)
    assert calls == [64, 6] and len(list((tmp_path / "cache" / "fid").iterdir())) == 1
    with caplog.at_level(logging.INFO, logger="fastgan.train"):
        again = dataset_statistics(detector, images.clone())
    assert calls == [64, 6] and "loaded from the cache" in caplog.text
    np.testing.assert_array_equal(again.cov, first.cov)
    np.testing.assert_array_equal(again.features, first.features)

    changed = images.clone()
    changed[69, 2, 7, 7] += 1  # one pixel of one image
    other = dataset_statistics(detector, changed)
    assert calls == [64, 6, 64, 6] and not np.array_equal(other.features, first.features)
    dataset_statistics(detector, images[:, :, :4, :4].contiguous())  # another resolution
    assert calls[-2:] == [64, 6]
    another = load_detector(write_detector(tmp_path / "other.pt", seed=1))
    dataset_statistics(another, images)
    assert len(list((tmp_path / "cache" / "fid").iterdir())) == 4


# --- where the detector comes from --------------------------------------------------------

def test_the_detector_comes_from_the_flag_then_the_environment_then_the_cache(
        detector_path, tmp_path, monkeypatch):
    with pytest.raises(DetectorUnavailable) as missing:
        detector_file()  # no flag, no variable, nothing cached, and the download fails
    assert "cannot download" in str(missing.value) and "\n" not in str(missing.value)
    assert "--inception PATH" in str(missing.value) and fid.INCEPTION_ENV in str(missing.value)

    cached = tmp_path / "cache" / fid.INCEPTION_FILE
    write_detector(cached, seed=1)
    assert detector_file() == cached
    monkeypatch.setenv(fid.INCEPTION_ENV, str(detector_path))
    assert detector_file() == detector_path
    assert detector_file(str(cached)) == cached  # the flag wins
    with pytest.raises(DetectorUnavailable, match=f"--inception {tmp_path}/nope.pt: no such"):
        detector_file(str(tmp_path / "nope.pt"))
    monkeypatch.setenv(fid.INCEPTION_ENV, str(tmp_path / "nope.pt"))
    with pytest.raises(DetectorUnavailable, match=f"{fid.INCEPTION_ENV} .*nope.pt: no such"):
        detector_file()


def test_a_file_that_is_no_detector_is_refused_in_one_line(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a TorchScript archive")
    with pytest.raises(DetectorUnavailable, match="cannot use .*junk.pt as the Inception") as e:
        load_detector(tmp_path / "junk.pt")
    assert "\n" not in str(e.value)


def test_download_is_checked_and_atomic(detector_path, tmp_path, monkeypatch):

    digest = hashlib.sha256(detector_path.read_bytes()).hexdigest()
    monkeypatch.setattr(fid, "INCEPTION_URL", detector_path.as_uri())
    cache = tmp_path / "cache"
    monkeypatch.setattr(fid, "INCEPTION_SHA256", "0" * 64)
    with pytest.raises(DetectorUnavailable, match=f"has sha256 {digest}, not 0+; nothing was"):
        detector_file(progress=False)
    assert not cache.exists() or list(cache.iterdir()) == []  # no file, no temporary file

    monkeypatch.setattr(fid, "INCEPTION_SHA256", digest)
    detector = load_detector(progress=False)
    assert detector.file == cache / fid.INCEPTION_FILE and detector.digest == digest
    assert sorted(p.name for p in cache.iterdir()) == [fid.INCEPTION_FILE]
    monkeypatch.setattr(fid, "INCEPTION_URL", (tmp_path / "gone.pt").as_uri())
    assert detector_file() == cache / fid.INCEPTION_FILE  # downloaded once


# --- training runs and the metrics command ------------------------------------------------

def _image_folder(path, n=24):
    path.mkdir()
    for i, image in enumerate(_images(n, seed=5).permute(0, 2, 3, 1).numpy()):
        Image.fromarray(image).save(path / f"{i:03d}.png")
    return path


RUN_FLAGS = ["--res", "8", "--backend", "torch", "--channel-base", "16", "--channel-max", "4",
             "--z-dim", "4", "--batch", "4", "--steps", "4", "--r1-interval", "2", "--r1-gamma",
             "1", "--dtype", "float64", "--device", "cpu", "--ckpt-every", "2", "--sample-every",
             "100", "--fid-samples", "20", "--threads", "1", "--no-progress"]


def _fid_rows(out):
    return [(r["step"], r["fid"], r["kid"]) for r in read_metrics(out / "metrics.jsonl")
            if "fid" in r]


def test_a_run_on_image_files_reports_fid_and_kid_and_keeps_its_best_checkpoint(
        detector_path, tmp_path, capsys):

    data, out = _image_folder(tmp_path / "images"), tmp_path / "run"
    assert main(["train", "--data", str(data), *RUN_FLAGS, "--inception", str(detector_path),
                 "--ckpt-keep", "1", "--out", str(out)]) == 0
    rows = _fid_rows(out)
    assert [step for step, _, _ in rows] == [1, 3]  # --fid-every: with each checkpoint
    assert all(f > 0 and np.isfinite(k) for _, f, k in rows)
    best = min(rows, key=lambda r: r[1])
    assert checkpoints.best_checkpoint(out) == {
        "step": best[0] + 1, "checkpoint": f"ckpt-{best[0] + 1:08d}.pt", "fid": best[1],
        "kid": best[2]}
    kept = sorted(p.name for p in checkpoints.checkpoint_dir(out).glob("ckpt-*.pt"))
    assert kept == sorted({"ckpt-00000004.pt", f"ckpt-{best[0] + 1:08d}.pt"})
    assert "fid %.3f" % rows[-1][1] in (out / "log.txt").read_text()
    capsys.readouterr()

    # The metrics command: the same numbers from the newest checkpoint, or any one.
    for target in (out, checkpoints.checkpoint_dir(out) / "ckpt-00000004.pt"):
        assert main(["metrics", str(target), "--no-progress"]) == 0
        printed = json.loads(capsys.readouterr().out)
        assert (printed["step"], printed["fid"], printed["kid"]) == (4, rows[-1][1], rows[-1][2])
        assert printed["fid_samples"] == 20
    assert main(["metrics", str(out), "--fid-samples", "30", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["fid"] != rows[-1][1]
    assert main(["metrics", str(tmp_path / "nothing"), "--no-progress"]) == 2
    assert "no such run folder or checkpoint file" in capsys.readouterr().err


def test_pruning_keeps_the_best_checkpoint(tmp_path):
    def names():
        return sorted(p.name for p in checkpoints.checkpoint_dir(tmp_path).glob("ckpt-*.pt"))

    checkpoints.save_checkpoint(tmp_path, {"step": 1}, keep=1, best={"fid": 5.0, "kid": 0.5})
    for step in (2, 3):
        checkpoints.save_checkpoint(tmp_path, {"step": step}, keep=1)
    assert names() == ["ckpt-00000001.pt", "ckpt-00000003.pt"]
    checkpoints.save_checkpoint(tmp_path, {"step": 4}, keep=1, best={"fid": 4.0, "kid": 0.4})
    assert names() == ["ckpt-00000004.pt"]
    assert checkpoints.best_checkpoint(tmp_path) == {
        "step": 4, "checkpoint": "ckpt-00000004.pt", "fid": 4.0, "kid": 0.4}


def test_without_the_detector_the_run_completes_and_says_why_in_one_line(tmp_path, capsys):

    data, out = _image_folder(tmp_path / "images", n=6), tmp_path / "run"
    assert main(["train", "--data", str(data), *RUN_FLAGS, "--out", str(out)]) == 0
    lines = [line for line in (out / "log.txt").read_text().splitlines() if "FID" in line]
    assert len(lines) == 1 and "FID and KID are off: cannot download" in lines[0]
    assert "--inception PATH" in lines[0] and not _fid_rows(out)
    assert (out / "checkpoints" / "ckpt-00000004.pt").exists()
    capsys.readouterr()
    assert main(["metrics", str(out), "--no-progress"]) == 2
    assert "fastgan metrics: error: cannot download" in capsys.readouterr().err


def test_two_processes_give_the_single_process_numbers(detector_path, tmp_path):

    data = _image_folder(tmp_path / "images", n=13)  # shares of 7 and 6 images
    flags = ["--data", str(data), *RUN_FLAGS, "--fid-samples", "21", "--inception",
             str(detector_path)]
    result = _torchrun(["-m", "fastgan", "train", *flags, "--out", str(tmp_path / "dist")], REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in (tmp_path / "dist" / "log.txt").read_text()
    assert main(["train", *flags, "--out", str(tmp_path / "single")]) == 0
    dist, single = _fid_rows(tmp_path / "dist"), _fid_rows(tmp_path / "single")
    assert [r[0] for r in dist] == [r[0] for r in single] == [1, 3]
    for (_, fid_d, kid_d), (_, fid_s, kid_s) in zip(dist, single):
        assert fid_d == pytest.approx(fid_s, rel=1e-9) and kid_d == pytest.approx(kid_s, rel=1e-9)
