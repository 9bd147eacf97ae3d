"""fastgan.nn.BiasAct, fastgan.nn.FusedLeakyReLU and fastgan.nn.fused_leaky_relu: the numbers,
parameters and state_dict of the plain-torch layers they replace, computed by the kernels."""
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastgan
from fastgan import reference
from op_helpers import DEVICE, TOL, assert_matches, leaf, randn


class PlainFusedLeakyReLU(nn.Module):
    """What a StyleGAN2 port's FusedLeakyReLU computes, written in plain torch."""

    def __init__(self, channel, negative_slope=0.2, scale=2 ** 0.5):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channel))
        self.negative_slope, self.scale = negative_slope, scale

    def forward(self, x):
        shape = [1, -1] + [1] * (x.ndim - 2)
        return F.leaky_relu(x + self.bias.view(shape), self.negative_slope) * self.scale


def _kernels_ran(launches, backward=True):
    """The forward kernel ran, and the gradient kernel where ``backward`` (False also for a
    plain bias add, whose gradient needs no kernel)."""
    counts = launches()
    assert counts.get("bias_act_fwd", 0) > 0, counts
    assert (counts.get("bias_act_grad", 0) > 0) == backward, counts


def _forward_backward(module, x, seed=80):
    """Output and gradients (input, then every parameter) for a fixed upstream gradient."""
    x = leaf(x)
    y = module(x)
    dy = randn(*y.shape, dtype=y.dtype, seed=seed)
    params = [p for p in module.parameters()]
    grads = torch.autograd.grad(y, [x] + params, dy)
    return y.detach(), grads


def _assert_same_as_plain(fused, plain, x):
    """Output and gradients of ``fused`` equal those of the plain-torch ``plain``."""
    y, grads = _forward_backward(fused, x)
    y_ref, grads_ref = _forward_backward(plain, x)
    assert_matches(y, y_ref)
    for g, r in zip(grads, grads_ref):
        assert_matches(g, r)


# --- FusedLeakyReLU / fused_leaky_relu ------------------------------------------------------

def test_fused_leaky_relu_parameters_like_stylegan2_ports():
    """One parameter, ``bias``: zeros of length ``channel``; bias=False has none."""
    m = fastgan.nn.FusedLeakyReLU(7)
    assert [name for name, _ in m.named_parameters()] == ["bias"]
    assert m.bias.shape == (7,) and (m.bias == 0).all()
    assert list(m.state_dict()) == ["bias"]
    assert m.negative_slope == 0.2 and m.scale == 2 ** 0.5
    assert list(fastgan.nn.FusedLeakyReLU(7, bias=False).parameters()) == []


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("slope,scale", [(0.2, 2 ** 0.5), (0.1, 1.0), (0.0, 3.0)])
def test_fused_leaky_relu_matches_plain_formula(slope, scale, dtype, launches):
    """Output, input gradient and bias gradient equal
    ``F.leaky_relu(x + bias.view(1, -1, 1, 1), slope) * scale``."""
    fused = fastgan.nn.FusedLeakyReLU(5, negative_slope=slope, scale=scale).to(DEVICE, dtype)
    plain = PlainFusedLeakyReLU(5, slope, scale).to(DEVICE, dtype)
    with torch.no_grad():
        fused.bias.copy_(randn(5, dtype=dtype, seed=81))
        plain.bias.copy_(fused.bias)
    x = randn(3, 5, 4, 7, dtype=dtype, seed=82)
    _assert_same_as_plain(fused, plain, x)
    _kernels_ran(launches)


@pytest.mark.parametrize("shape", [(4, 6), (2, 6, 3), (2, 6, 3, 2, 2)])
def test_fused_leaky_relu_other_ranks(shape, launches):
    """Rank-2 (after a linear layer), rank-3 and rank-5 inputs: bias along dim 1."""
    fused, plain = fastgan.nn.FusedLeakyReLU(6).to(DEVICE, torch.float64), \
        PlainFusedLeakyReLU(6).to(DEVICE, torch.float64)
    with torch.no_grad():
        fused.bias.copy_(randn(6, seed=83))
        plain.bias.copy_(fused.bias)
    x = randn(*shape, seed=84)
    _assert_same_as_plain(fused, plain, x)
    _kernels_ran(launches)


def test_fused_leaky_relu_function(launches):
    """The functional form, with and without a bias, channels_last kept."""
    x = randn(2, 4, 3, 5, seed=85).to(memory_format=torch.channels_last)
    bias = randn(4, seed=86)
    y = fastgan.nn.fused_leaky_relu(x, bias, 0.3, 1.5)
    assert_matches(y, F.leaky_relu(x + bias.view(1, -1, 1, 1), 0.3) * 1.5)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_matches(fastgan.nn.fused_leaky_relu(x), F.leaky_relu(x, 0.2) * 2 ** 0.5)
    assert launches()["bias_act_fwd"] == 2


def test_fused_leaky_relu_without_bias(launches):
    m = fastgan.nn.FusedLeakyReLU(3, bias=False, negative_slope=0.25, scale=2.0)
    x = randn(2, 3, 4, seed=87)
    assert_matches(m(x), F.leaky_relu(x, 0.25) * 2.0)
    assert launches()["bias_act_fwd"] == 1


def test_fused_leaky_relu_state_dict_round_trip(launches):
    """A port's checkpoint loads into FusedLeakyReLU (strict) and back, same outputs."""
    plain = PlainFusedLeakyReLU(4).double()
    with torch.no_grad():
        plain.bias.copy_(randn(4, seed=88, device="cpu"))
    fused = fastgan.nn.FusedLeakyReLU(4).double()
    fused.load_state_dict(plain.state_dict(), strict=True)
    back = PlainFusedLeakyReLU(4).double()
    back.load_state_dict(fused.state_dict(), strict=True)
    assert torch.equal(back.bias, plain.bias)
    x = randn(2, 4, 3, 3, seed=89)
    assert_matches(fused.to(DEVICE)(x), plain.to(DEVICE)(x))
    assert launches()["bias_act_fwd"] == 1


# --- BiasAct -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [dict(act="linear"), dict(act="relu"), dict(act="lrelu"),
                                    dict(act="lrelu", alpha=0.1, gain=1.0, clamp=0.8),
                                    dict(act="relu", dim=-1)], ids=str)
def test_bias_act_module_matches_reference(kwargs, launches):
    """BiasAct(x) = reference.bias_act(x, bias, dim, ...), values and gradients."""
    dim = kwargs.get("dim", 1)
    m = fastgan.nn.BiasAct(5, **kwargs).to(DEVICE, torch.float64)
    with torch.no_grad():
        m.bias.copy_(randn(5, seed=90))
    x = randn(2, 5, 3, 5, seed=91)
    y, (dx, db) = _forward_backward(m, x)
    cfg = {k: v for k, v in kwargs.items() if k != "dim"}
    xl, bl = leaf(x), leaf(m.bias)
    y_ref = reference.bias_act(xl, bl, dim, **cfg)
    dx_ref, db_ref = torch.autograd.grad(y_ref, (xl, bl), randn(*y_ref.shape, seed=80))
    assert_matches(y, y_ref.detach())
    assert_matches(dx, dx_ref)
    assert_matches(db, db_ref)
    _kernels_ran(launches, backward=cfg != dict(act="linear"))


def test_bias_act_module_parameters():
    """``bias`` of length ``channels`` (``bias_init``), or none; bad settings fail at once."""
    m = fastgan.nn.BiasAct(6, act="lrelu")
    assert [name for name, _ in m.named_parameters()] == ["bias"]
    assert m.bias.shape == (6,) and (m.bias == 0).all()
    assert (fastgan.nn.BiasAct(3, bias_init=0.5).bias == 0.5).all()
    assert fastgan.nn.BiasAct(3, bias=False).bias is None
    assert "act='lrelu'" in repr(m)
    with pytest.raises(ValueError, match="act must be one of"):
        fastgan.nn.BiasAct(3, act="swishy")
    with pytest.raises(ValueError, match="clamp must be"):
        fastgan.nn.BiasAct(3, clamp=-1)


def test_bias_act_module_without_bias(launches):
    m = fastgan.nn.BiasAct(3, act="relu", bias=False)
    fastgan.reset_launch_counts()  # the constructor checks its arguments by running the op
    x = randn(2, 3, 4, seed=92)
    assert_matches(m(x), reference.bias_act(x, None, 1, "relu"))
    assert launches()["bias_act_fwd"] == 1


def test_bias_act_module_state_dict_round_trip(launches):
    """save -> load into a fresh module -> same parameters and outputs."""
    m = fastgan.nn.BiasAct(4, act="lrelu", clamp=2.0).double()
    with torch.no_grad():
        m.bias.copy_(randn(4, seed=93, device="cpu"))
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    fresh = fastgan.nn.BiasAct(4, act="lrelu", clamp=2.0).double()
    fresh.load_state_dict(torch.load(buf), strict=True)
    assert torch.equal(fresh.bias, m.bias)
    x = randn(2, 4, 3, 3, seed=94)
    assert torch.equal(fresh.to(DEVICE)(x), m.to(DEVICE)(x))
    assert launches() == {"bias_act_fwd": 2}


def test_float32_parameters_with_float64_input(launches):
    """The bias is cast to the input's dtype; its gradient arrives in the parameter's dtype."""
    m = fastgan.nn.BiasAct(3, act="lrelu").to(DEVICE)
    with torch.no_grad():
        m.bias.copy_(randn(3, dtype=torch.float32, seed=95))
    x = leaf(randn(2, 3, 4, seed=96))
    y = m(x)
    assert y.dtype == torch.float64
    y.sum().backward()
    assert m.bias.grad.dtype == torch.float32
    expected = reference.bias_act(x.detach(), m.bias.detach().double(), 1, "lrelu")
    assert_matches(y.detach(), expected)
    b64 = leaf(m.bias.detach().double())
    db_ref, = torch.autograd.grad(reference.bias_act(x.detach(), b64, 1, "lrelu").sum(), b64)
    torch.testing.assert_close(m.bias.grad, db_ref.float(), **TOL[torch.float32])
    _kernels_ran(launches)
