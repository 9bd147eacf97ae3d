"""R1 / R2 penalties and the lazy-R1 schedule (fastgan/regularizers.py)."""
import math

import pytest
import torch

import fastgan
from fastgan.grad_control import weight_gradients_disabled
from fastgan.models import build_discriminator
from fastgan.regularizers import LazyR1, grad_penalty, r1_penalty, r2_penalty


def _tiny_d(backend, arch="resnet"):
    torch.manual_seed(0)
    kw = {"mbstd_group": 2} if arch == "resnet" else {}
    return build_discriminator(arch, 8, img_channels=2, backend=backend, channel_base=16,
                               channel_max=3, **kw).double()


def test_r1_matches_autograd_definition_in_float64():
    D = _tiny_d("torch")
    x = torch.randn(4, 2, 8, 8, dtype=torch.float64)
    got = r1_penalty(D, x, gamma=3.0)
    xr = x.clone().requires_grad_(True)
    g, = torch.autograd.grad(D(xr).sum(), xr, create_graph=True)
    want = 1.5 * g.square().sum(dim=(1, 2, 3)).mean()
    torch.testing.assert_close(got.loss, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(got.grad_sq_norm, g.square().sum(dim=(1, 2, 3)),
                               rtol=1e-12, atol=0)
    assert got.outputs.shape == (4, 1)
    assert not x.requires_grad  # the caller's tensor is left alone


def test_r1_through_fused_layers_matches_torch_layers(launches):
    """Penalty and its parameter gradients (double backward) on the Triton path (interpreted)
    equal the eager-PyTorch model's on equal weights."""
    D_fused, D_torch = _tiny_d("fastgan"), _tiny_d("torch")
    D_torch.load_state_dict(D_fused.state_dict())
    x = torch.randn(4, 2, 8, 8, dtype=torch.float64)
    results = []
    for D in (D_fused, D_torch):
        pen = r1_penalty(D, x, gamma=2.0)
        grads = torch.autograd.grad(pen.loss, list(D.parameters()), materialize_grads=True)
        results.append((pen.loss, grads))
    assert launches().get("per_sample_dot", 0) > 0 and launches().get("bias_act_fwd", 0) > 0
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-10, atol=1e-12)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


class _RecordWeightGradFlag(torch.autograd.Function):
    seen = []

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, dy):
        _RecordWeightGradFlag.seen.append(weight_gradients_disabled())
        return dy


def test_inner_pass_runs_with_weight_gradients_disabled():
    D = _tiny_d("torch", "dcgan")
    _RecordWeightGradFlag.seen.clear()
    pen = r1_penalty(lambda x: D(_RecordWeightGradFlag.apply(x)), torch.randn(2, 2, 8, 8,
                                                                        dtype=torch.float64), 1.0)
    assert _RecordWeightGradFlag.seen == [True]
    pen.loss.backward()  # the outer pass computes weight gradients
    assert all(p.grad is not None for name, p in D.named_parameters() if "weight" in name)


def test_r2_gives_the_generator_no_gradient():
    D = _tiny_d("torch", "dcgan")
    w = torch.randn(2, 2, 8, 8, dtype=torch.float64, requires_grad=True)
    fakes = w * 2  # stands for G(z)
    pen = r2_penalty(D, fakes, gamma=1.0)
    pen.loss.backward()
    assert w.grad is None
    assert pen.loss.item() > 0


def test_grad_penalty_checks_its_arguments():
    D = _tiny_d("torch", "dcgan")
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="require grad"):
        grad_penalty(D(x), x, 1.0)
    with pytest.raises(ValueError, match="gamma"):
        r1_penalty(D, x, -1.0)


def test_lazy_r1_schedule_and_adam_adjustment():
    lazy = LazyR1(gamma=10.0, interval=16)
    assert [s for s in range(40) if lazy.due(s)] == [0, 16, 32]
    assert lazy.lazy and lazy.effective_gamma == 160.0
    r = 16 / 17
    lr, (b1, b2) = lazy.adam_params(0.0025, (0.0, 0.99))
    assert lr == pytest.approx(0.0025 * r) and b1 == 0.0 and b2 == pytest.approx(0.99 ** r)
    assert math.isclose(lazy.ratio, r)


@pytest.mark.parametrize("interval", [None, 0, 1])
def test_r1_every_step_is_not_lazy(interval):
    every = LazyR1(gamma=2.0, interval=interval)
    assert not every.lazy and every.interval == 1 and every.effective_gamma == 2.0
    assert all(every.due(s) for s in range(5))
    assert every.adam_params(0.01, (0.5, 0.9)) == (0.01, (0.5, 0.9))


def test_lazy_r1_gamma_zero_disables_it():
    off = LazyR1(gamma=0.0, interval=16)
    assert not any(off.due(s) for s in range(40))
    assert off.adam_params(0.01, (0.0, 0.99)) == (0.01, (0.0, 0.99))


@pytest.mark.parametrize("kw", [{"gamma": float("nan")}, {"gamma": -1},
                                {"gamma": 1, "interval": -2}, {"gamma": 1, "interval": 2.5}])
def test_lazy_r1_rejects_bad_arguments(kw):
    with pytest.raises(ValueError):
        LazyR1(**kw)


def test_lazy_penalty_uses_the_effective_gamma():
    D = _tiny_d("torch", "dcgan")
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    lazy = LazyR1(gamma=0.5, interval=4)
    torch.testing.assert_close(lazy.penalty(D, x).loss, r1_penalty(D, x, 2.0).loss)


def test_exported_from_the_package():
    assert (fastgan.r1_penalty, fastgan.r2_penalty, fastgan.LazyR1) == (r1_penalty, r2_penalty,
                                                                      LazyR1)
