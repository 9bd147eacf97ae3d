"""The fused ops behave as eager PyTorch (fastgan.reference) does, on every CPU backend (the
Triton kernels in the interpreter, the compiled extension, the reference): what may be
modified in place after them, the clamp in 16-bit dtypes, and which gradients require grad
(docs/design.md sections 3 and 4)."""
import math

import pytest
import torch

import fastgan
from fastgan import reference
from op_helpers import randn
from test_ext import require_ext

BACKENDS = ["triton", "ext", "torch"]
LAUNCH_NAMES = {"triton": ("bias_act_fwd", "bias_act_grad"),
                "ext": ("ext_bias_act", "ext_bias_act_grad"), "torch": None}


@pytest.fixture(params=BACKENDS)
def backend(request, _default_backend):
    """Each CPU backend forced in turn (the extension built if need be)."""
    if request.param == "ext":
        require_ext()
    fastgan.set_backend(request.param)
    return request.param


def _x(*shape, seed=0, dtype=torch.float64):
    return randn(*shape, dtype=dtype, seed=seed, device="cpu").requires_grad_(True)


# --------------------------------------------------------------------------------------------
# In-place changes after a fused op
# --------------------------------------------------------------------------------------------

def _skip_sum(op, inplace):
    """``op(x, b) + skip`` (in place when ``inplace``), then the gradients of a weighted sum
    w.r.t. x and b."""
    x, b, skip = _x(2, 3, 5, seed=1), _x(3, seed=2), randn(2, 3, 5, seed=3, device="cpu")
    y = op(x, b)
    y = y.add_(skip) if inplace else y + skip
    w = randn(2, 3, 5, seed=4, device="cpu")
    return torch.autograd.grad((y * w).sum(), (x, b))


@pytest.mark.parametrize("cfg", [dict(act="linear"), dict(act="linear", gain=0.5),
                                 dict(act="linear", clamp=None, scale=0.3)])
def test_linear_output_may_be_modified_in_place(cfg, backend):
    """``x = y.add_(x)`` after a linear bias_act, as StyleGAN2-ADA's resnet D and G do:
    it works and gives eager's gradients."""
    def fused(x, b):
        return fastgan.bias_act(x, b, 1, **cfg)

    def eager(x, b):
        return reference.bias_act(x, b, 1, **cfg)

    for got, want in zip(_skip_sum(fused, inplace=True), _skip_sum(eager, inplace=False)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cfg", [dict(act="lrelu"), dict(act="relu"),
                                 dict(act="linear", clamp=0.5)])
@pytest.mark.parametrize("kernels", ["triton", "ext"])
def test_in_place_after_an_output_saving_activation_is_refused(kernels, cfg, _default_backend):
    """relu, lrelu and a clamp keep the output for the gradient (docs/design.md section 4):
    an in-place change is refused, as StyleGAN2-ADA's CUDA op and torch.relu refuse it (the
    reference, made of several torch ops, saves other tensors and allows it)."""
    if kernels == "ext":
        require_ext()
    fastgan.set_backend(kernels)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        _skip_sum(lambda x, b: fastgan.bias_act(x, b, 1, **cfg), inplace=True)


@pytest.mark.parametrize("act", ["tanh", "sigmoid", "swish"])
@pytest.mark.parametrize("kernels", ["triton", "ext"])
def test_curved_output_may_be_modified_in_place(kernels, act, _default_backend):
    """A curved activation saves its input ``x`` and bias, not its output (docs/design.md
    section 4): ``y.add_(skip)`` works and gives eager's gradients of ``y + skip``. (Eager's
    own tanh and sigmoid save their output and refuse it; its swish, a product, allows it.)"""
    if kernels == "ext":
        require_ext()
    fastgan.set_backend(kernels)
    fused = _skip_sum(lambda x, b: fastgan.bias_act(x, b, 1, act, clamp=2.0), inplace=True)
    eager = _skip_sum(lambda x, b: reference.bias_act(x, b, 1, act, clamp=2.0), inplace=False)
    for got, want in zip(fused, eager):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernels", ["triton", "ext"])
def test_in_place_on_the_input_of_a_curved_activation_is_refused(kernels, _default_backend):
    """The input a curved activation saved may not change before the backward: autograd
    refuses, as for any saved tensor."""
    if kernels == "ext":
        require_ext()
    fastgan.set_backend(kernels)
    x, b = _x(2, 3, 5, seed=1), _x(3, seed=2)
    h = x * 1.0
    y = fastgan.bias_act(h, b, 1, "elu")
    h.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("kernels, path", [("triton", "triton"), ("triton", "cudnn"),
                                           ("ext", "cudnn"), ("torch", "plain")])
def test_linear_conv_and_modules_may_be_modified_in_place(kernels, path, monkeypatch,
                                                          _default_backend):
    if kernels == "ext":
        require_ext()
    fastgan.set_backend(kernels)
    monkeypatch.setenv("FASTGAN_CONV", path)
    x, w, b = _x(2, 4, 5, 5, seed=1), _x(6, 4, 3, 3, seed=2), _x(6, seed=3)
    skip = randn(2, 6, 5, 5, seed=4, device="cpu")
    y = fastgan.conv2d_act(x, w, b, padding=1, weight_gain=0.5)
    got = torch.autograd.grad(y.add_(skip).square().sum(), (x, w, b))
    y_ref = reference.conv2d_act(x, w, b, padding=1, weight_gain=0.5)
    want = torch.autograd.grad((y_ref + skip).square().sum(), (x, w, b))
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)
    conv = fastgan.nn.FusedConv2d(4, 6, 3, padding=1, act="linear").double()
    bias_act = fastgan.nn.BiasAct(6, act="linear").double()
    for module in (conv, lambda t: bias_act(conv(t))):
        out = module(x)
        out.add_(skip).sum().backward()


# --------------------------------------------------------------------------------------------
# The clamp in 16-bit dtypes
# --------------------------------------------------------------------------------------------

SG2_CLAMP = 256 * math.sqrt(0.5)  # StyleGAN2-ADA's resnet conv clamp, 181.019: 181.0 in 16 bits


@pytest.mark.parametrize("act, low", [("lrelu", -181.0), ("softplus", 0.0), ("swish", -0.0)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_clamped_elements_get_no_gradient_in_16_bit(dtype, act, low, backend, launches):
    """fp16/bf16, gain 1, clamp 181.019: x = 181, 181.1, 200, 1000 are all clamped and their
    gradient is exactly 0 (the mask compares with the clamp as stored in the dtype: 181 is
    below 181.019, but not below 181.0), also for the curved activations, whose gradient
    kernels recompute the output as stored; -1000 gives lrelu's clamp and the others' limits."""
    x = torch.tensor([181.0, 181.1, 200.0, 1000.0, -1000.0], dtype=dtype, requires_grad=True)
    y = fastgan.bias_act(x, None, 0, act, gain=1.0, clamp=SG2_CLAMP)
    dx, = torch.autograd.grad(y, x, torch.ones_like(y))
    assert dx.tolist() == [0.0] * 5
    assert y.tolist() == [181.0] * 4 + [low]
    if LAUNCH_NAMES[backend]:
        fwd, grad = LAUNCH_NAMES[backend]
        grad += "_from_input" if reference.ACTIVATIONS[act].curved else ""
        assert launches() == {fwd: 1, grad: 1}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_curved_gradient_masks_the_output_as_stored(dtype, backend, launches):
    """selu(172.25) is 180.98 in float32, which the stored output rounds to the clamp (181.0,
    from 181.019): the gradient is 0 there, as the reference's. The gradient kernels of the
    curved activations recompute the output, rounded to the dtype, for the mask."""
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the interpreter truncates float32 to bfloat16 where a GPU rounds (180.7 "
                    "to 180, not 181); tests/test_gpu_ops.py checks this on a GPU")
    x = torch.tensor([172.25, 150.0], dtype=dtype, requires_grad=True)
    y = fastgan.bias_act(x, None, 0, "selu", clamp=SG2_CLAMP)
    dx, = torch.autograd.grad(y, x, torch.ones_like(y))
    y_ref = reference.bias_act(x, None, 0, "selu", clamp=SG2_CLAMP)
    dx_ref, = torch.autograd.grad(y_ref, x, torch.ones_like(y))
    assert y[0] == y_ref[0] == 181.0 and dx[0] == dx_ref[0] == 0
    assert dx[1] == dx_ref[1] != 0
    if LAUNCH_NAMES[backend]:
        fwd, grad = LAUNCH_NAMES[backend]
        assert launches() == {fwd: 1, grad + "_from_input": 1}


@pytest.mark.parametrize("clamp", [0.5, 128.0, SG2_CLAMP, 181.07],
                         ids=["0.5", "128", "181.019", "181.07"])
@pytest.mark.parametrize("act", ["linear", "lrelu"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_16_bit_clamp_masks_as_the_reference_does(dtype, act, clamp, backend):
    """Representable clamps (0.5, 128) and ones that round down (181.019) or up (181.07 in
    fp16: 181.125): the gradient is zero exactly where the
    reference's is, and values agree to the dtype's rounding."""
    values = [-300.0, -181.5, -90.6, -0.7, -0.3, 0.0, 0.2, 0.45, 0.6, 90.0, 127.0, 128.5, 150.0,
              180.0, 181.0, 181.1, 182.0, 200.0, 1000.0, 7e4]
    x = torch.tensor(values, dtype=torch.float32).to(dtype).requires_grad_(True)
    up = torch.linspace(0.5, 2.0, len(values), dtype=dtype)
    got_y = fastgan.bias_act(x, None, 0, act, clamp=clamp)
    got, = torch.autograd.grad(got_y, x, up)
    want_y = reference.bias_act(x, None, 0, act, clamp=clamp)
    want, = torch.autograd.grad(want_y, x, up)
    assert torch.equal(got == 0, want == 0), (got, want)
    torch.testing.assert_close(got_y, want_y, rtol=1e-2, atol=0)
    torch.testing.assert_close(got, want, rtol=1e-2, atol=0)


# --------------------------------------------------------------------------------------------
# Which gradients require grad
# --------------------------------------------------------------------------------------------

STRUCTURE_CONFIGS = [dict(act=a, clamp=c) for a in ("linear", "relu", "lrelu")
                     for c in (None, 0.9)]
LINEAR = dict(act="linear", clamp=None)


def _cfg_id(cfg):
    return f"{cfg['act']}-clamp{cfg['clamp']}"


def _first_grads(op, x, b, up):
    y = op(x, b)
    return torch.autograd.grad(y, (x, b), up, create_graph=True)


@pytest.mark.parametrize("cfg", STRUCTURE_CONFIGS, ids=_cfg_id)
def test_gradients_require_grad_where_eager_ones_do(cfg, backend, launches):
    """``autograd.grad(y, (x, b), up, create_graph=True)`` with ``up`` not requiring grad:
    dx and db require grad exactly where eager's do (relu, lrelu: their slope depends on x);
    their derivative w.r.t. x is zero -- None with allow_unused=True, where eager computes
    zeros -- and asking for it runs no kernel."""
    x, b = _x(2, 3, 4, seed=5), _x(3, seed=6)
    up = randn(2, 3, 4, seed=7, device="cpu")
    want = _first_grads(lambda x, b: reference.bias_act(x, b, 1, **cfg), x, b, up)
    fastgan.reset_launch_counts()
    got = _first_grads(lambda x, b: fastgan.bias_act(x, b, 1, **cfg), x, b, up)
    if LAUNCH_NAMES[backend]:  # a plain bias add (linear, no clamp) has no gradient kernel
        forward, grad = LAUNCH_NAMES[backend]
        assert launches() == {forward: 1, **({} if cfg == LINEAR else {grad: 1})}
    assert [g.requires_grad for g in got] == [e.requires_grad for e in want]
    assert [g.requires_grad for g in got] == [cfg["act"] != "linear"] * 2
    if not got[0].requires_grad:
        return
    v = randn(2, 3, 4, seed=8, device="cpu")
    expected, = torch.autograd.grad(want[0], x, v, allow_unused=True)
    assert torch.count_nonzero(expected) == 0
    fastgan.reset_launch_counts()
    second, = torch.autograd.grad((got[0] * v).sum() + got[1].sum(), x, allow_unused=True)
    if backend == "torch":
        assert torch.count_nonzero(second) == 0
    else:
        assert second is None and launches() == {}


CONV_STRUCTURE_CASES = [(dict(act="lrelu", clamp=None), False),
                        (dict(act="relu", clamp=0.9), False),
                        (dict(act="linear", clamp=0.9), False),
                        (dict(act="lrelu", clamp=None), True),
                        (dict(act="relu", clamp=0.9), True)]


@pytest.mark.parametrize("cfg, frozen_weight", CONV_STRUCTURE_CASES,
                         ids=[f"{_cfg_id(c)}-{'frozen' if f else 'trained'}-weight"
                              for c, f in CONV_STRUCTURE_CASES])
def test_conv_gradients_require_grad_where_eager_ones_do(cfg, frozen_weight, backend):
    """dx of conv2d_act requires grad as eager's does: always when the weight requires grad,
    and for relu and lrelu also with a frozen weight. (With a frozen weight and a linear
    activation eager's dx requires grad too, because its convolution backward lists x among
    its inputs; fastgan's, a transposed convolution of dz, does not: its derivative is zero
    either way.)"""
    x, b = _x(2, 3, 5, 5, seed=1), _x(4, seed=3)
    w = _x(4, 3, 3, 3, seed=2).requires_grad_(not frozen_weight)
    up = randn(2, 4, 5, 5, seed=4, device="cpu")
    results = []
    for conv in (fastgan.conv2d_act, reference.conv2d_act):
        y = conv(x, w, b, 1, 1, 1, **cfg)
        dx, = torch.autograd.grad(y, x, up, create_graph=True)
        results.append(dx.requires_grad)
    assert results == [True, True]
