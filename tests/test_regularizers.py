"""R1 / R2 penalties and the lazy-R1 schedule (fastgan/regularizers.py)."""
import math
import re
import warnings
from pathlib import Path

import pytest
import torch

import fastgan
from fastgan import regularizers as fastgan_regularizers
from fastgan.grad_control import weight_gradients_disabled
from fastgan.models import MinibatchStd, build_discriminator, build_generator
from fastgan.regularizers import LazyR1, grad_penalty, r1_penalty, r2_penalty

README = Path(__file__).resolve().parent.parent / "README.md"


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


@pytest.mark.parametrize("arch, convs", [("resnet", 5), ("dcgan", 1)])
def test_r1_alone_gives_a_fused_bias_a_gradient_only_before_minibatch_std(arch, convs,
                                                                           launches):
    """r1_penalty's rule: under R1 alone the bias of a fused layer that runs before the
    minibatch-stddev layer gets its true, nonzero gradient (eager's); every other fused bias
    (after it, or anywhere in a D without one) gets None, where eager gives zeros or None."""
    D_fused, D_torch = _tiny_d("fastgan", arch), _tiny_d("torch", arch)
    D_torch.load_state_dict(D_fused.state_dict())
    order = []
    hooks = [m.register_forward_pre_hook(lambda module, args, name=name: order.append(name))
             for name, m in D_fused.named_modules()
             if isinstance(m, MinibatchStd) or isinstance(getattr(m, "bias", None),
                                                          torch.nn.Parameter)]
    x = torch.randn(4, 2, 8, 8, dtype=torch.float64)
    grads = []
    for D in (D_fused, D_torch):
        r1_penalty(D, x, 2.0).loss.backward()
        grads.append({n[:-len(".bias")]: p.grad for n, p in D.named_parameters()
                      if n.endswith(".bias")})
    for hook in hooks:
        hook.remove()
    before = set(order[:order.index("mbstd")]) if "mbstd" in order else set()
    assert before == ({"from_rgb", "blocks.0.conv0", "blocks.0.conv1"} if arch == "resnet"
                      else set())
    fused, eager = grads
    assert set(fused) - before == ({"conv", "fc", "out"} if arch == "resnet" else
                                   {"convs.0", "out"})
    for layer, grad in fused.items():
        if layer in before:
            assert grad is not None and grad.any(), layer
            torch.testing.assert_close(grad, eager[layer], rtol=1e-9, atol=1e-12)
        else:
            assert grad is None, layer
            assert eager[layer] is None or not eager[layer].any(), layer
    assert eager["out"] is None and any(g is not None for g in eager.values())
    # The fused D's convs ran once each; each penalty's grad_sq_norm once (eager D's too).
    assert (launches()["conv2d_act_fwd"], launches()["per_sample_dot"]) == (convs, 2)


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


def test_readmes_lazy_r1_loop_runs_as_written(launches):
    """README "Lazy R1 in your own loop", run as written on a tiny fused D and eager G for 3
    minibatches: R1 runs once (step 0), on the Triton kernels; D's Adam has adam_params'
    settings; every parameter of both moves."""
    code = re.search(r"### Lazy R1 in your own loop\n.*?```python\n(.*?)```", README.read_text(),
                     re.S).group(1)
    torch.manual_seed(0)
    G = build_generator(8, z_dim=3, img_channels=1, backend="torch", channel_base=16,
                        channel_max=2)
    D = build_discriminator("dcgan", 8, img_channels=1, channel_base=16, channel_max=2)
    before = [p.detach().clone() for p in (*G.parameters(), *D.parameters())]
    scope = {"G": G, "D": D, "z_dim": 3, "loader": [torch.rand(2, 1, 8, 8) * 2 - 1] * 3}
    exec(compile(code, str(README), "exec"), scope)
    assert launches()["per_sample_dot"] == 1
    opt_D = scope["opt_D"].param_groups[0]
    r = 16 / 17
    assert (opt_D["lr"], opt_D["betas"]) == (0.002 * r, (0.0, 0.99 ** r))
    assert all(not torch.equal(p, b) for p, b in zip((*G.parameters(), *D.parameters()), before))


def test_exported_from_the_package():
    assert (fastgan.r1_penalty, fastgan.r2_penalty, fastgan.LazyR1) == (r1_penalty, r2_penalty,
                                                                      LazyR1)


# R1 + R2 in one pass (r1_r2_penalty) ------------------------------------------------------

def _tiny_r3gan(backend, seed=0):
    """A small R3GAN D (grouped convs, FIR downsampling), every parameter redrawn so that no
    layer is zero (the branch ends start at zero)."""
    D = build_discriminator("r3gan", 8, img_channels=2, backend=backend, widths=(4, 8),
                            blocks=1, group_channels=4).double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in D.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype)
                    * (p[0].numel() ** -0.5 if p.ndim > 1 else 0.1))
    return D


class _Counted:
    """Counts calls of ``torch.autograd.grad`` and forwards of ``D`` while active."""

    def __init__(self, monkeypatch, D):
        self.grad_calls = self.forwards = 0
        real_grad = torch.autograd.grad

        def counting_grad(*args, **kwargs):
            self.grad_calls += 1
            return real_grad(*args, **kwargs)

        monkeypatch.setattr(torch.autograd, "grad", counting_grad)
        self._undo = monkeypatch.undo
        if isinstance(D, torch.nn.Module):
            self._hook = D.register_forward_pre_hook(self._count_forward)

    def _count_forward(self, module, args):
        self.forwards += 1

    def stop(self):
        self._undo()
        if hasattr(self, "_hook"):
            self._hook.remove()


def _penalty_grads(D, loss, outputs):
    """Parameter gradients of ``loss`` plus a weighted sum of ``outputs`` (the main loss that
    reuses them)."""
    total = loss + sum((o * (i + 1)).sum() for i, o in enumerate(outputs))
    return torch.autograd.grad(total, list(D.parameters()), materialize_grads=True)


@pytest.mark.parametrize("backend", ["fastgan", "torch"])
def test_r1_r2_joint_equals_two_penalties(backend, launches, monkeypatch):
    """One forward and one double backward give R1 and R2 equal, in values, per-sample norms,
    outputs and every parameter gradient, to two separate penalties."""
    D = _tiny_r3gan(backend)
    reals = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    fakes = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    counted = _Counted(monkeypatch, D)
    fastgan.reset_launch_counts()
    pen = fastgan_regularizers.r1_r2_penalty(D, reals, fakes, r1_gamma=3.0, r2_gamma=0.5)
    counted.stop()
    assert pen.joint and pen.coupled == ()
    # One forward, one inner autograd.grad and one grad_sq_norm (Triton) for both halves.
    assert (counted.grad_calls, counted.forwards, launches()["per_sample_dot"]) == (1, 1, 1)
    grads = _penalty_grads(D, pen.loss, (pen.real_outputs, pen.fake_outputs))

    counted = _Counted(monkeypatch, D)
    fastgan.reset_launch_counts()
    r1, r2 = r1_penalty(D, reals, 3.0), r2_penalty(D, fakes, 0.5)
    counted.stop()
    assert (counted.grad_calls, counted.forwards, launches()["per_sample_dot"]) == (2, 2, 2)
    want_grads = _penalty_grads(D, r1.loss + r2.loss, (r1.outputs, r2.outputs))

    tol = dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pen.loss, r1.loss + r2.loss, **tol)
    torch.testing.assert_close(pen.r1_grad_sq_norm, r1.grad_sq_norm, **tol)
    torch.testing.assert_close(pen.r2_grad_sq_norm, r2.grad_sq_norm, **tol)
    torch.testing.assert_close(pen.real_outputs, r1.outputs, **tol)
    torch.testing.assert_close(pen.fake_outputs, r2.outputs, **tol)
    assert pen.r1_grad_sq_norm.shape == (2,) and pen.r2_grad_sq_norm.shape == (1,)
    assert all(g.any() for g in want_grads)  # every parameter takes part
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, **tol)


def test_r1_r2_falls_back_on_minibatch_std_and_says_so(monkeypatch):
    D = _tiny_d("torch")  # StyleGAN2's resnet D: minibatch-stddev mixes samples
    reals = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    fakes = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    counted = _Counted(monkeypatch, D)
    with pytest.warns(UserWarning, match=r"mbstd \(MinibatchStd\).*separately"):
        pen = fastgan_regularizers.r1_r2_penalty(D, reals, fakes, r1_gamma=2.0)
    counted.stop()
    assert not pen.joint and pen.coupled == ("mbstd (MinibatchStd)",)
    assert (counted.grad_calls, counted.forwards) == (2, 2)
    r1, r2 = r1_penalty(D, reals, 2.0), r2_penalty(D, fakes, 2.0)
    torch.testing.assert_close(pen.loss, r1.loss + r2.loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(pen.r1_grad_sq_norm, r1.grad_sq_norm, rtol=1e-12, atol=0)
    torch.testing.assert_close(pen.r2_grad_sq_norm, r2.grad_sq_norm, rtol=1e-12, atol=0)
    with warnings.catch_warnings(record=True) as caught:  # once per D
        warnings.simplefilter("always")
        assert not fastgan_regularizers.r1_r2_penalty(D, reals, fakes, 2.0).joint
    assert caught == []
    with pytest.raises(ValueError, match=r"joint=True.*mbstd \(MinibatchStd\)"):
        fastgan_regularizers.r1_r2_penalty(D, reals, fakes, 2.0, joint=True)


def test_batch_norm_couples_samples_only_with_batch_statistics():
    torch.manual_seed(0)
    D = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3),
                            torch.nn.Flatten(), torch.nn.Linear(3 * 36, 1)).double()
    assert fastgan_regularizers.batch_coupled_layers(D) == ("1 (BatchNorm2d)",)
    reals = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    fakes = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    D(torch.cat([reals, fakes]))  # running statistics that differ from the initial ones
    D.eval()  # running statistics: per sample
    assert fastgan_regularizers.batch_coupled_layers(D) == ()
    pen = fastgan_regularizers.r1_r2_penalty(D, reals, fakes, 1.0)
    assert pen.joint
    torch.testing.assert_close(pen.loss, r1_penalty(D, reals, 1.0).loss
                               + r2_penalty(D, fakes, 1.0).loss, rtol=1e-12, atol=0)


def test_r1_r2_on_a_plain_callable(monkeypatch):
    """A D that is not an nn.Module cannot be inspected: separate passes unless joint=True."""
    D_module = _tiny_r3gan("torch")
    D = lambda x: D_module(x)  # noqa: E731
    reals = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    fakes = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    with pytest.warns(UserWarning, match="not an nn.Module"):
        separate = fastgan_regularizers.r1_r2_penalty(D, reals, fakes, 1.0)
    assert not separate.joint and separate.coupled == ("<D is not an nn.Module> (function)",)
    joint = fastgan_regularizers.r1_r2_penalty(D, reals, fakes, 1.0, joint=True)
    assert joint.joint
    torch.testing.assert_close(joint.loss, separate.loss, rtol=1e-10, atol=0)
    forced = fastgan_regularizers.r1_r2_penalty(D_module, reals, fakes, 1.0, joint=False)
    assert not forced.joint and forced.coupled == ()


def test_r1_r2_gives_neither_generator_nor_data_a_gradient():
    D = _tiny_r3gan("torch")
    w = torch.randn(2, 2, 8, 8, dtype=torch.float64, requires_grad=True)
    reals = torch.randn(2, 2, 8, 8, dtype=torch.float64, requires_grad=True)
    pen = fastgan_regularizers.r1_r2_penalty(D, reals, w * 2, 1.0)  # w * 2 stands for G(z)
    (pen.loss + pen.real_outputs.sum() + pen.fake_outputs.sum()).backward()
    assert w.grad is None and reals.grad is None
    assert all(p.grad is not None for p in D.parameters())


def test_r1_r2_inner_pass_runs_with_weight_gradients_disabled():
    D = _tiny_r3gan("torch")
    _RecordWeightGradFlag.seen.clear()
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    fastgan_regularizers.r1_r2_penalty(lambda t: D(_RecordWeightGradFlag.apply(t)), x, x, 1.0,
                                       joint=True)
    assert _RecordWeightGradFlag.seen == [True]


@pytest.mark.parametrize("args, kwargs, match", [
    ((torch.zeros(0, 2, 8, 8), torch.zeros(2, 2, 8, 8), 1.0), {}, r"reals must be a tensor"),
    ((torch.zeros(2, 2, 8, 8), "fakes", 1.0), {}, r"fakes must be a tensor"),
    ((torch.zeros(2, 2, 8, 8), torch.zeros(2, 2, 4, 4), 1.0), {}, "same per-sample shape"),
    ((torch.zeros(2, 2, 8, 8), torch.zeros(2, 2, 8, 8, dtype=torch.float64), 1.0), {},
     "same per-sample shape, dtype"),
    ((torch.zeros(2, 2, 8, 8), torch.zeros(2, 2, 8, 8), -1.0), {}, "gamma"),
    ((torch.zeros(2, 2, 8, 8), torch.zeros(2, 2, 8, 8), 1.0), {"r2_gamma": math.inf}, "gamma"),
    ((torch.zeros(2, 2, 8, 8), torch.zeros(2, 2, 8, 8), 1.0), {"joint": "yes"}, "joint must"),
])
def test_r1_r2_checks_its_arguments(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastgan_regularizers.r1_r2_penalty(_tiny_r3gan("torch").float(), *args, **kwargs)
