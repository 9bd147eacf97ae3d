"""fastgan.convert(): exact fused replacements of Conv2d + ReLU/LeakyReLU, keeping state_dicts."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastgan
from fastgan.backend import interpreter_enabled
from fastgan.nn import FusedConv2d

pytestmark = pytest.mark.skipif(not interpreter_enabled(), reason="runs the Triton kernels on CPU "
                                "in the interpreter; tests/test_gpu_conv.py covers CUDA")


def dcgan_d():
    """DCGAN-style: conv/lrelu (inplace), conv/batchnorm/lrelu, conv to one logit."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(4, 8, 4, 2, 1, bias=False), nn.BatchNorm2d(8), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(8, 1, 2, 1, 0, bias=False))


class GroupedBlock(nn.Module):
    """R3GAN-like residual block: 1x1 -> grouped 3x3 -> 1x1 with leaky ReLUs."""

    def __init__(self, channels, groups):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(channels, channels, 3, 1, 1, groups=groups), nn.LeakyReLU(0.2),
            nn.Conv2d(channels, channels, 1, bias=False))

    def forward(self, x):
        return x + self.body(x)


def grouped_d():
    return nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.LeakyReLU(0.2),
        GroupedBlock(8, groups=2),
        nn.Conv2d(8, 8, 4, 2, 1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 3 * 3, 1))


def r1_grads(model, x):
    """Parameter gradients of a non-saturating loss + R1 (input gradient, create_graph)."""
    x = x.clone().requires_grad_()
    out = model(x)
    gx, = torch.autograd.grad(out.sum(), x, create_graph=True)
    loss = F.softplus(-out).mean() + 5.0 * gx.square().sum(dim=(1, 2, 3)).mean()
    model.zero_grad(set_to_none=True)
    loss.backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("make, x_shape, fused, kept", [
    (dcgan_d, (2, 3, 9, 9), ["0"], ["2", "5"]),
    (grouped_d, (2, 3, 6, 6), ["0", "2.body.0", "2.body.2", "3"], ["2.body.4"]),
])
def test_convert_is_exact(make, x_shape, fused, kept, launches):
    torch.manual_seed(0)
    model = make().double()
    converted, report = fastgan.convert(model, return_report=True)
    assert sorted(r.name for r in report if r.action == "fused") == fused
    assert sorted(r.name for r in report if r.action == "kept") == kept
    assert all(isinstance(converted.get_submodule(n), FusedConv2d) for n in fused)
    assert all(type(model.get_submodule(n)) is nn.Conv2d for n in fused)  # original untouched
    assert list(converted.state_dict()) == list(model.state_dict())

    x = torch.randn(x_shape, dtype=torch.float64)
    out, grads = r1_grads(model, x)
    out_c, grads_c = r1_grads(converted, x)
    assert launches()["conv2d_act_fwd"] == len(fused)
    torch.testing.assert_close(out_c, out, atol=1e-10, rtol=0)
    assert grads.keys() == grads_c.keys()
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], atol=1e-10, rtol=1e-10, msg=name)


def test_checkpoints_load_both_ways():
    model = grouped_d()
    converted = fastgan.convert(model)
    other = grouped_d()
    converted.load_state_dict(other.state_dict())
    model.load_state_dict(converted.state_dict())
    for (n, p), (_, q) in zip(model.named_parameters(), other.named_parameters()):
        assert torch.equal(p, q), n


def test_activation_parameters_are_exact():
    model = nn.Sequential(nn.Conv2d(2, 2, 3), nn.LeakyReLU(0.1), nn.Conv2d(2, 2, 1), nn.ReLU())
    converted = fastgan.convert(model)
    lrelu, relu = converted[0], converted[2]
    assert (lrelu.act, lrelu.alpha, lrelu.gain) == ("lrelu", 0.1, 1.0)
    assert (relu.act, relu.gain) == ("relu", 1.0)
    assert isinstance(converted[1], nn.Identity) and isinstance(converted[3], nn.Identity)


def test_inplace_keeps_parameter_objects():
    model = dcgan_d()
    weight = model[0].weight
    same = fastgan.convert(model, inplace=True)
    assert same is model and isinstance(model[0], FusedConv2d) and model[0].weight is weight
    copied = fastgan.convert(dcgan_d())
    assert isinstance(copied[0], FusedConv2d)


class ConvThenAct(nn.Module):
    """A conv and an activation called by a custom forward: not converted."""

    def __init__(self):
        super().__init__()
        self.conv, self.act = nn.Conv2d(2, 2, 3), nn.LeakyReLU(0.2)

    def forward(self, x):
        return self.act(self.conv(x))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_unsupported_convs_are_left_alone_with_a_reason(launches):
    model = nn.Sequential(
        nn.Conv2d(2, 2, 3, padding=2, dilation=2), nn.LeakyReLU(0.2),
        nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), nn.LeakyReLU(0.2),
        nn.Conv2d(2, 2, 2, padding="same"), nn.LeakyReLU(0.2),
        torch.nn.utils.spectral_norm(nn.Conv2d(2, 2, 3, padding=1)), nn.LeakyReLU(0.2),
        nn.Conv2d(2, 2, 3, padding=1), nn.Tanh(),
        nn.Conv2d(2, 2, 3, padding=1), nn.LeakyReLU(-0.5),
        ConvThenAct(),
        nn.Conv2d(2, 2, 3, padding="same"), nn.LeakyReLU(0.2),
        nn.Conv2d(2, 2, 3, padding="valid"), nn.ReLU(inplace=True)).double()
    converted, report = fastgan.convert(model, return_report=True)
    reasons = {r.name: r.detail for r in report if r.action == "kept"}
    assert "dilation" in reasons["0"]
    assert "padding_mode 'reflect'" in reasons["2"]
    assert "even kernel" in reasons["4"]
    assert "spectral_norm" in reasons["6"]
    assert "Tanh" in reasons["8"]
    assert "negative_slope" in reasons["10"]
    assert "not inside an nn.Sequential" in reasons["12.conv"]
    assert sorted(r.name for r in report if r.action == "fused") == ["13", "15"]
    assert converted[13].padding == (1, 1) and converted[15].padding == (0, 0)
    assert list(converted.state_dict()) == list(model.state_dict())

    x = torch.randn(1, 2, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(converted(x), model(x), atol=1e-10, rtol=0)
    assert launches()["conv2d_act_fwd"] == 2


def test_shared_activation_instance(launches):
    act = nn.LeakyReLU(0.2)
    model = nn.Sequential(nn.Conv2d(2, 2, 3), act, nn.Conv2d(2, 2, 3), act).double()
    converted = fastgan.convert(copy.deepcopy(model))
    assert [type(m).__name__ for m in converted] == ["FusedConv2d", "Identity"] * 2
    x = torch.randn(1, 2, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(converted(x), model(x), atol=1e-10, rtol=0)
    assert launches()["conv2d_act_fwd"] == 2
