"""fastgan.conv2d_act against the reference, in the Triton interpreter on CPU (tiny shapes)."""
import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import fastgan
from fastgan import reference
from fastgan.backend import interpreter_enabled
from fastgan.ops import conv2d_act as conv_mod
from fastgan.ops import launch
from op_helpers import ConvolutionCounter, DispatchedOps, nested_grads

pytestmark = pytest.mark.skipif(not interpreter_enabled(), reason="runs the Triton kernels on CPU "
                                "in the interpreter; tests/test_gpu_conv.py covers CUDA")

F64 = torch.float64


def random_case(seed: int) -> dict:
    """A random small problem: kernel 1/3/4/rectangular, stride 1-3, padding 0-2, groups 1/2/4,
    every activation, with or without clamp and bias."""
    rng = random.Random(seed)
    groups = rng.choice([1, 1, 2, 4])
    kh, kw = rng.choice([(1, 1), (3, 3), (4, 4), (1, 3), (3, 2), (2, 4)])
    stride = rng.choice([1, 2, 3, (1, 2), (2, 1)])
    padding = rng.choice([0, 1, 2, (0, 1), (2, 1)])
    c = groups * rng.choice([1, 2]) if groups < 4 else 4 * rng.choice([1, 2])
    oc = groups * rng.choice([1, 2])
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    h = rng.randint(max(1, kh - 2 * ph), 9)
    w = rng.randint(max(1, kw - 2 * pw), 9)
    act = rng.choice(["linear", "relu", "lrelu"])
    return dict(shape=(rng.randint(1, 2), c, h, w), wshape=(oc, c // groups, kh, kw),
                bias=rng.random() < 0.7, stride=stride, padding=padding, groups=groups, act=act,
                alpha=rng.choice([None, 0.1]) if act == "lrelu" else None,
                gain=rng.choice([None, 1.0, 0.5]),
                clamp=rng.choice([None, None, 0.5, 2.0]))


def make_inputs(case, dtype=F64, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(case["shape"], generator=g, dtype=dtype)
    w = torch.randn(case["wshape"], generator=g, dtype=dtype) / math.sqrt(
        math.prod(case["wshape"][1:]))
    b = torch.randn(case["wshape"][0], generator=g, dtype=dtype) if case["bias"] else None
    for t in (x, w, b):
        if t is not None:
            t.requires_grad_(requires_grad)
    return x, w, b


def op_kwargs(case):
    return {k: case[k] for k in ("stride", "padding", "groups", "act", "alpha", "gain", "clamp")}


def relayout(x, layout):
    """``x`` (values unchanged) stored contiguous, channels_last, or as a strided view."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":  # a view with gaps: every other element of a wider tensor
        wide = torch.zeros(*x.shape[:3], 2 * x.shape[3] + 1, dtype=x.dtype)
        wide[..., 1::2] = x
        return wide[..., 1::2]
    if layout == "transposed":  # a permuted (W, H swapped) contiguous tensor, viewed back
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    raise ValueError(layout)


@pytest.mark.parametrize("seed", range(14))
def test_forward_float64_matches_reference(seed, launches):
    case = random_case(seed)
    layout = ["contiguous", "channels_last", "sliced", "transposed"][seed % 4]
    x, w, b = make_inputs(case, seed=seed)
    y = fastgan.conv2d_act(relayout(x, layout), w, b, **op_kwargs(case))
    expected = reference.conv2d_act(x, w, b, **op_kwargs(case))
    assert launches().get("conv2d_act_fwd", 0) == 1, case
    assert y.shape == expected.shape and y.dtype == F64
    torch.testing.assert_close(y, expected, atol=1e-10, rtol=0, msg=str(case))


@pytest.mark.parametrize("seed", range(200, 204))
def test_channels_last_weight_is_read_in_place(seed, launches):
    """A channels_last weight (input channels innermost) runs without the relayout copy and
    gives the reference's result, forward and backward."""
    case = random_case(seed)
    x, w, b = make_inputs(case, seed=seed, requires_grad=True)
    w_cl = w.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    x = relayout(x, "channels_last").detach().requires_grad_()
    y = fastgan.conv2d_act(x, w_cl, b, **op_kwargs(case))
    assert launches().get("conv2d_act_fwd", 0) == 1, case
    expected = reference.conv2d_act(x, w, b, **op_kwargs(case))
    torch.testing.assert_close(y, expected, atol=1e-10, rtol=0, msg=str(case))
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w_cl), g)
    want = torch.autograd.grad(expected, (x, w), g)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, atol=1e-10, rtol=0, msg=str(case))


@pytest.mark.parametrize("seed", range(100, 106))
def test_forward_float32_matches_reference(seed, launches):
    case = random_case(seed)
    x, w, b = make_inputs(case, dtype=torch.float32, seed=seed)
    y = fastgan.conv2d_act(x, w, b, **op_kwargs(case))
    assert launches().get("conv2d_act_fwd", 0) == 1
    torch.testing.assert_close(y, reference.conv2d_act(x, w, b, **op_kwargs(case)),
                               atol=2e-5, rtol=1e-5)


def test_grouped_16_channels_per_group(launches):
    """R3GAN's grouped 3x3 with 16 channels per group (here 2 groups, one image)."""
    x = torch.randn(1, 32, 5, 5, dtype=F64)
    w = torch.randn(32, 16, 3, 3, dtype=F64) / 12
    b = torch.randn(32, dtype=F64)
    y = fastgan.conv2d_act(x, w, b, 1, 1, 2, "lrelu", 0.2, 1.0)
    assert launches()["conv2d_act_fwd"] == 1
    torch.testing.assert_close(y, reference.conv2d_act(x, w, b, 1, 1, 2, "lrelu", 0.2, 1.0),
                               atol=1e-10, rtol=0)


@pytest.mark.parametrize("layout, expected_format", [
    ("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last),
    ("sliced", torch.contiguous_format), ("channels_last_sliced", torch.channels_last)])
def test_output_memory_format_follows_input(layout, expected_format, launches):
    x = torch.randn(2, 4, 6, 5, dtype=F64)
    if layout == "channels_last_sliced":
        x = x.contiguous(memory_format=torch.channels_last)[:, :, 1:, :]
    else:
        x = relayout(x, layout)
    w = torch.randn(6, 4, 3, 3, dtype=F64)
    y = fastgan.conv2d_act(x, w, None, 1, 1, act="relu")
    assert launches()["conv2d_act_fwd"] == 1
    assert y.is_contiguous(memory_format=expected_format)
    torch.testing.assert_close(y, reference.conv2d_act(x, w, None, 1, 1, act="relu"),
                               atol=1e-10, rtol=0)


def test_channel_slice_view_input(launches):
    """A view holding channels 2..5 of a wider tensor (channel offset and gaps)."""
    full = torch.randn(2, 8, 7, 7, dtype=F64).contiguous(memory_format=torch.channels_last)
    x = full[:, 2:6]
    w = torch.randn(4, 2, 3, 3, dtype=F64)
    y = fastgan.conv2d_act(x, w, None, 2, 1, 2, "lrelu")
    assert launches()["conv2d_act_fwd"] == 1
    torch.testing.assert_close(y, reference.conv2d_act(x, w, None, 2, 1, 2, "lrelu"),
                               atol=1e-10, rtol=0)


def test_int64_offsets(launches, monkeypatch):
    """The 64-bit offset variant (used for tensors past 2**31 elements) computes the same."""
    monkeypatch.setattr(conv_mod, "INT32_MAX", 100)
    case = random_case(7)
    x, w, b = make_inputs(case, seed=7)
    y = fastgan.conv2d_act(relayout(x, "channels_last"), w, b, **op_kwargs(case))
    assert launches()["conv2d_act_fwd"] == 1
    torch.testing.assert_close(y, reference.conv2d_act(x, w, b, **op_kwargs(case)), atol=1e-10,
                               rtol=0)


def test_empty_batch(launches):
    x = torch.randn(0, 4, 5, 5, dtype=F64, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, dtype=F64, requires_grad=True)
    y = fastgan.conv2d_act(x, w, torch.zeros(6, dtype=F64), 2, 1, 2, "lrelu")
    assert y.shape == (0, 6, 3, 3)
    assert "conv2d_act_fwd" not in launches()
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w))


GRAD_CASES = [
    dict(shape=(1, 4, 5, 4), wshape=(4, 2, 3, 3), bias=True, stride=2, padding=1, groups=2,
         act="lrelu", alpha=None, gain=None, clamp=1.5),
    dict(shape=(2, 2, 4, 4), wshape=(3, 2, 2, 3), bias=False, stride=(1, 2), padding=(1, 0),
         groups=1, act="relu", alpha=None, gain=None, clamp=None),
    dict(shape=(1, 3, 4, 4), wshape=(2, 3, 1, 1), bias=True, stride=1, padding=0, groups=1,
         act="linear", alpha=None, gain=0.7, clamp=None),
]


@pytest.mark.parametrize("case", GRAD_CASES)
def test_gradcheck_and_gradgradcheck(case, launches):
    x, w, b = make_inputs(case, requires_grad=True)
    inputs = (x, w) if b is None else (x, w, b)

    def f(*args):
        return fastgan.conv2d_act(*args, **op_kwargs(case))

    assert gradcheck(f, inputs, fast_mode=True)
    assert gradgradcheck(f, inputs, fast_mode=True)
    # gradcheck decides how many calls it makes; what must hold is that only the kernels ran
    assert set(launches()) == {"conv2d_act_fwd", "bias_act_grad"}


def test_gradcheck_full_jacobian(launches):
    """One tiny case with every Jacobian entry checked (not only a random projection)."""
    case = dict(GRAD_CASES[0], shape=(1, 2, 3, 3), wshape=(1, 2, 2, 2), groups=1)
    x, w, b = make_inputs(case, requires_grad=True)
    assert gradcheck(lambda *a: fastgan.conv2d_act(*a, **op_kwargs(case)), (x, w, b))
    assert set(launches()) == {"conv2d_act_fwd", "bias_act_grad"}


def test_third_order_matches_reference(launches):
    case = GRAD_CASES[0]
    x, w, b = make_inputs(case, requires_grad=True)

    def third(op):
        y = op(x, w, b, **op_kwargs(case))
        gx, = torch.autograd.grad((y ** 2).sum(), x, create_graph=True)
        gw, = torch.autograd.grad((gx ** 2).sum(), w, create_graph=True)
        return torch.autograd.grad((gw ** 3).sum(), (x, w, b))

    got, expected = third(fastgan.conv2d_act), third(reference.conv2d_act)
    assert launches()["conv2d_act_fwd"] == 1
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-9, rtol=1e-9)


def _stack_params(seed=0):
    """A 3-layer discriminator stack: stride-2 4x4, grouped 3x3, 3x3 down to one channel."""
    g = torch.Generator().manual_seed(seed)
    specs = [((4, 2, 4, 4), dict(stride=2, padding=1, groups=1)),
             ((4, 2, 3, 3), dict(stride=1, padding=1, groups=2)),
             ((1, 4, 3, 3), dict(stride=1, padding=0, groups=1))]
    return [(torch.randn(shape, generator=g, dtype=F64).div_(math.sqrt(math.prod(shape[1:])))
             .requires_grad_(), torch.randn(shape[0], generator=g, dtype=F64).requires_grad_(),
             geom) for shape, geom in specs]


def _stack_forward(op, x, params):
    for i, (w, b, geom) in enumerate(params):
        act = dict(act="lrelu", clamp=4.0) if i < 2 else dict(act="linear")
        x = op(x, w, b, **geom, **act)
    return x


@pytest.mark.parametrize("path", ["triton", "cudnn"])
def test_r1_through_fused_stack_matches_reference(path, launches, monkeypatch):
    """R1: gradient w.r.t. the input with create_graph, grad_sq_norm, then backward, through
    three fused layers (stride 2, groups) gives the reference's parameter gradients; with
    ``FASTGAN_CONV=cudnn`` the same through the torch conv + fused bias_act path."""
    monkeypatch.setenv("FASTGAN_CONV", path)
    x0 = torch.randn(2, 2, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(1))
    results = []
    for op, sq_norm in ((fastgan.conv2d_act, fastgan.grad_sq_norm),
                        (reference.conv2d_act, reference.grad_sq_norm)):
        params = _stack_params()
        x = x0.clone().requires_grad_()
        out = _stack_forward(op, x, params)
        gx, = torch.autograd.grad(out.sum(), x, create_graph=True)
        loss = F.softplus(-out).mean() + 5.0 * sq_norm(gx).mean()
        loss.backward()
        results.append([t.grad for w, b, _ in params for t in (w, b)])
    counts = launches()
    assert counts.get("conv2d_act_fwd" if path == "triton" else "conv2d_act_cudnn") == 3
    assert counts.get("conv2d_act_cudnn" if path == "triton" else "conv2d_act_fwd") is None
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)


class CountCalls:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


# R1 on the 3-layer stack, pass by pass: convolutions by kind and kernel launches
# (tests/test_counts.py counts the same passes on meta tensors and must find these).
R1_INNER = ({"forward": 3, "input_grad": 0, "weight_grad": 0}, {"bias_act_grad": 2})
R1_OUTER = ({"forward": 0, "input_grad": 2, "weight_grad": 3},
            {"per_sample_dot": 1, "scale_per_sample": 1, "bias_act_grad": 2})


@pytest.mark.parametrize("path", ["triton", "cudnn"])
def test_r1_passes_do_only_the_needed_work(path, launches, monkeypatch):
    """R1 on a 3-layer fused stack, counted exactly. Inner pass (``autograd.grad(out, x)``):
    one transposed conv per layer and one bias_act_grad per layer with an activation (2: the
    last layer is a plain bias add, whose gradient is dy itself), no weight gradient. Outer
    pass: the
    weight gradient of each layer's transposed conv (3), the input gradient of the two
    transposed convs whose input needs one (2), and one bias_act_grad per chained layer (2);
    no layer's own backward runs again on zeros (eager runs 11 convolutions here). The
    biases get no gradient (None) from R1 alone."""
    monkeypatch.setenv("FASTGAN_CONV", path)
    params = _stack_params()
    x = torch.randn(2, 2, 8, 8, dtype=F64, requires_grad=True)
    out = _stack_forward(fastgan.conv2d_act, x, params)
    fastgan.reset_launch_counts()
    with ConvolutionCounter() as inner:
        gx, = torch.autograd.grad(out.sum(), x, create_graph=True)
    assert (inner.counts, launches()) == R1_INNER
    fastgan.reset_launch_counts()
    with ConvolutionCounter() as outer:
        fastgan.grad_sq_norm(gx).sum().backward()
    assert (outer.counts, launches()) == R1_OUTER
    assert all(w.grad is not None and b.grad is None for w, b, _ in params)
    expected = _r1_reference_weight_grads(x)
    for (w, _, _), want in zip(params, expected):
        torch.testing.assert_close(w.grad, want, atol=1e-10, rtol=1e-10)


def _r1_reference_weight_grads(x):
    params = _stack_params()
    out = _stack_forward(reference.conv2d_act, x, params)
    gx, = torch.autograd.grad(out.sum(), x, create_graph=True)
    return torch.autograd.grad(reference.grad_sq_norm(gx).sum(), [w for w, _, _ in params])


def test_weight_gradients_computed_when_asked_for(launches, monkeypatch):
    counter = CountCalls(conv_mod.conv2d_weight_grad)
    monkeypatch.setattr(conv_mod, "conv2d_weight_grad", counter)
    (w, b, _), = _stack_params()[:1]
    x = torch.randn(1, 2, 6, 6, dtype=F64, requires_grad=True)
    y = fastgan.conv2d_act(x, w, b, 2, 1, act="lrelu")
    gx, gw = torch.autograd.grad(y.sum(), (x, w))
    assert counter.calls == 1
    expected = torch.autograd.grad(reference.conv2d_act(x, w, b, 2, 1, act="lrelu").sum(), w)[0]
    torch.testing.assert_close(gw, expected, atol=1e-10, rtol=0)
    assert launches()["conv2d_act_fwd"] == 1


def test_no_weight_gradients_context(launches, monkeypatch):
    counter = CountCalls(conv_mod.conv2d_weight_grad)
    monkeypatch.setattr(conv_mod, "conv2d_weight_grad", counter)
    (w, b, _), = _stack_params()[:1]
    x = torch.randn(1, 2, 6, 6, dtype=F64, requires_grad=True)
    with fastgan.no_weight_gradients():
        fastgan.conv2d_act(x, w, b, 2, 1, act="lrelu").sum().backward()
    assert counter.calls == 0 and w.grad is None and b.grad is None
    assert x.grad is not None
    assert launches()["conv2d_act_fwd"] == 1


def _args(**overrides):
    kwargs = dict(x=torch.randn(1, 4, 5, 5), weight=torch.randn(6, 2, 3, 3), bias=None,
                  stride=1, padding=0, groups=2)
    kwargs.update(overrides)
    return kwargs


@pytest.mark.parametrize("kwargs, error, match", [
    (_args(weight=torch.randn(6, 2, 3)), ValueError, "weight must be 4-d"),
    (_args(x=torch.randn(4, 5, 5)), ValueError, "x must be 4-d"),
    (_args(weight=torch.randn(6, 1, 3, 3), groups=4), ValueError, "divisible by groups"),
    (_args(weight=torch.randn(6, 3, 3, 3)), ValueError, "x has 4 channels"),
    (_args(groups=0), ValueError, "groups must be"),
    (_args(stride=0), ValueError, "stride must be >= 1"),
    (_args(stride=(1, 0)), ValueError, "stride must be >= 1"),
    (_args(padding=-1), ValueError, "padding must be >= 0"),
    (_args(padding=(1, 2, 3)), TypeError, "padding must be an int or a pair"),
    (_args(padding="same"), TypeError, "padding must be an int or a pair"),
    (_args(stride=1.5), TypeError, "stride must be an int"),
    (_args(x=torch.randn(1, 4, 2, 5)), ValueError, "x height 2 plus padding"),
    (_args(x=torch.randn(1, 4, 5, 1), padding=(1, 0)), ValueError, "x width 1 plus padding"),
    (_args(weight=torch.randn(6, 2, 3, 3, dtype=F64)), TypeError, "weight has dtype"),
    (_args(bias=torch.randn(5)), ValueError, "bias must be a 1-d tensor of length"),
    (_args(bias=torch.randn(6, dtype=F64)), TypeError, "bias has dtype"),
    (_args(bias=torch.randn(6, device="meta")), ValueError, "bias is on meta"),
    (_args(weight=torch.randn(6, 2, 3, 3, device="meta")), ValueError, "weight is on meta"),
    (_args(x=torch.randint(0, 3, (1, 4, 5, 5))), TypeError, "x must be float16"),
    (_args(weight=torch.ones(6, 2, 3, 3, dtype=torch.int32)), TypeError, "weight must be"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        fastgan.conv2d_act(**kwargs)


def test_bad_activation_argument():
    with pytest.raises(ValueError, match="act must be one of"):
        fastgan.conv2d_act(torch.randn(1, 2, 3, 3), torch.randn(2, 2, 1, 1), act="gelu")


def test_dilation_refused_by_module():
    with pytest.raises(ValueError, match="dilation must be 1"):
        fastgan.nn.FusedConv2d(4, 4, 3, dilation=2)
    with pytest.raises(TypeError, match="dilation"):
        fastgan.conv2d_act(torch.randn(1, 2, 5, 5), torch.randn(2, 2, 3, 3), dilation=2)


def test_forced_paths_and_backend_info(launches, monkeypatch):
    x, w, b = make_inputs(random_case(3))
    kwargs = op_kwargs(random_case(3))
    expected = reference.conv2d_act(x, w, b, **kwargs)
    info = fastgan.backend_info()["conv2d_act_choices"]
    assert info["mode"] == "auto" and isinstance(info["choices"], dict)

    monkeypatch.setenv("FASTGAN_CONV", "cudnn")
    torch.testing.assert_close(fastgan.conv2d_act(x, w, b, **kwargs), expected, atol=1e-10,
                               rtol=0)
    assert launches() == {"conv2d_act_cudnn": 1, "bias_act_fwd": 1}
    assert fastgan.backend_info()["conv2d_act_choices"]["mode"] == "cudnn"

    monkeypatch.setenv("FASTGAN_CONV", "triton")
    fastgan.reset_launch_counts()
    torch.testing.assert_close(fastgan.conv2d_act(x, w, b, **kwargs), expected, atol=1e-10,
                               rtol=0)
    assert launches() == {"conv2d_act_fwd": 1}

    monkeypatch.setenv("FASTGAN_CONV", "fastest")
    with pytest.raises(ValueError, match="FASTGAN_CONV must be"):
        fastgan.conv2d_act(x, w, b, **kwargs)


def test_torch_backend_runs_reference(launches):
    x, w, b = make_inputs(random_case(5))
    fastgan.set_backend("torch")
    y = fastgan.conv2d_act(x, w, b, **op_kwargs(random_case(5)))
    assert launches() == {}
    torch.testing.assert_close(y, reference.conv2d_act(x, w, b, **op_kwargs(random_case(5))))


class TestFusedConv2d:
    def test_loads_conv2d_state_dict_and_matches(self, launches):
        conv = torch.nn.Conv2d(4, 6, 3, 2, 1, groups=2).double()
        fused = fastgan.nn.FusedConv2d(4, 6, 3, 2, 1, groups=2, act="lrelu", alpha=0.1,
                                       gain=1.0).double()
        fused.load_state_dict(conv.state_dict())
        x = torch.randn(2, 4, 7, 7, dtype=F64)
        torch.testing.assert_close(fused(x), F.leaky_relu(conv(x), 0.1), atol=1e-10, rtol=0)
        assert launches()["conv2d_act_fwd"] == 1
        conv.load_state_dict(fused.state_dict())

    def test_equalized_lr(self, launches):
        torch.manual_seed(0)
        m = fastgan.nn.FusedConv2d(4, 2, 3, padding=1, equalized_lr=True, lr_mul=0.5,
                                   bias_init=0.2).double()
        assert m.weight.std().item() == pytest.approx(2.0, rel=0.3)  # N(0, 1) / lr_mul
        torch.testing.assert_close(m.bias, torch.full((2,), 0.4, dtype=F64))
        x = torch.randn(1, 4, 5, 5, dtype=F64)
        expected = reference.conv2d_act(x, m.weight * 0.5 / math.sqrt(36), m.bias * 0.5,
                                        1, 1, act="lrelu")
        torch.testing.assert_close(m(x), expected, atol=1e-10, rtol=0)
        assert launches()["conv2d_act_fwd"] == 1

    def test_bad_construction(self):
        with pytest.raises(ValueError, match="divisible by groups"):
            fastgan.nn.FusedConv2d(4, 6, 3, groups=4)
        with pytest.raises(ValueError, match="stride must be >= 1"):
            fastgan.nn.FusedConv2d(4, 6, 3, stride=0)
        with pytest.raises(ValueError, match="act must be one of"):
            fastgan.nn.FusedConv2d(4, 6, 3, act="gelu")


def test_autocast_casts_inputs_like_conv2d(launches):
    """Under torch.autocast the fused conv computes in the autocast dtype, as F.conv2d does, and
    fp32 parameters still receive fp32 gradients."""
    torch.manual_seed(0)
    x = torch.randn(1, 2, 5, 5)
    w = torch.randn(4, 2, 3, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.float16):
        y = fastgan.conv2d_act(x, w, b, padding=1, act="lrelu")
        y_ref = F.conv2d(x, w, None, 1, 1)
    assert y.dtype == y_ref.dtype == torch.float16
    assert launches().get("conv2d_act_fwd", 0) == 1
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32


# --- any strides, layouts, weight gain, autocast ------------------------------------------------

STRIDED_PARAMS = {  # (shape of a leaf ``base``, the view of it that the op receives)
    "bias_step2": ((12,), lambda base: base[::2]),
    "bias_column": ((6, 3), lambda base: base[:, 0]),
    "bias_expanded": ((1,), lambda base: base.expand(6)),
    "weight_step2": ((12, 2, 3, 3), lambda base: base[::2]),
    "weight_transposed": ((6, 2, 3, 3), lambda base: base.transpose(2, 3).contiguous()
                          .transpose(2, 3)),
    "weight_expanded": ((1, 2, 3, 3), lambda base: base.expand(6, 2, 3, 3)),
}


@pytest.mark.parametrize("path", ["triton", "cudnn"])
@pytest.mark.parametrize("name", list(STRIDED_PARAMS))
def test_strided_bias_and_weight_match_reference(name, path, launches, monkeypatch):
    """A bias or weight with any strides (slices, a matrix column, an expanded tensor, a
    transposed view) gives the reference's output and gradients on both paths."""
    monkeypatch.setenv("FASTGAN_CONV", path)
    g = torch.Generator().manual_seed(5)
    shape, view = STRIDED_PARAMS[name]
    base = torch.randn(shape, generator=g, dtype=F64) * 0.3
    x0 = torch.randn(2, 4, 6, 5, generator=g, dtype=F64)
    dy = torch.randn(2, 6, 6, 5, generator=g, dtype=F64)
    results = []
    for op in (fastgan.conv2d_act, reference.conv2d_act):
        x, leaf_ = x0.clone().requires_grad_(), base.clone().requires_grad_()
        w = view(leaf_) if name.startswith("weight") else torch.randn(
            6, 2, 3, 3, generator=torch.Generator().manual_seed(6), dtype=F64)
        b = view(leaf_) if name.startswith("bias") else torch.zeros(6, dtype=F64)
        assert (w if name.startswith("weight") else b).is_contiguous() is False
        y = op(x, w, b, 1, 1, 2, "lrelu", clamp=2.0)
        results.append((y, *torch.autograd.grad(y, (x, leaf_), dy)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    assert launches()["conv2d_act_fwd" if path == "triton" else "conv2d_act_cudnn"] == 1


@pytest.mark.parametrize("path", ["triton", "cudnn"])
@pytest.mark.parametrize("x_cl", [False, True], ids=["x_nchw", "x_cl"])
@pytest.mark.parametrize("w_cl", [False, True], ids=["w_nchw", "w_cl"])
def test_output_memory_format_is_x_s_on_both_paths(path, x_cl, w_cl, launches, monkeypatch):
    """The output has the memory format of ``x`` whatever the weight's, on both paths."""
    monkeypatch.setenv("FASTGAN_CONV", path)
    x = torch.randn(2, 4, 6, 5, dtype=F64)
    w = torch.randn(6, 4, 3, 3, dtype=F64)
    if x_cl:
        x = x.contiguous(memory_format=torch.channels_last)
    if w_cl:
        w = w.contiguous(memory_format=torch.channels_last)
    y = fastgan.conv2d_act(x, w, None, 1, 1, act="relu")
    fmt = torch.channels_last if x_cl else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(y, reference.conv2d_act(x, w, None, 1, 1, act="relu"),
                               atol=1e-10, rtol=0)
    assert sum(launches().values()) == (1 if path == "triton" else 2)


@pytest.mark.parametrize("path", ["triton", "cudnn"])
def test_weight_gain_matches_scaled_weight(path, launches, monkeypatch):
    """``weight_gain`` is ``conv2d(x, weight * weight_gain)``: values, gradients (the weight's
    gradient is of the unscaled weight) and second order."""
    monkeypatch.setenv("FASTGAN_CONV", path)
    case = dict(GRAD_CASES[0])
    x, w, b = make_inputs(case, requires_grad=True)

    def f(op, x, w, b):
        return op(x, w, b, **op_kwargs(case), weight_gain=0.37)

    got = nested_grads(lambda *a: f(fastgan.conv2d_act, *a), (x, w, b), 2)
    want = nested_grads(lambda *a: f(reference.conv2d_act, *a), (x, w, b), 2)
    for g_order, w_order in zip(got, want):
        for g, e in zip(g_order, w_order):
            torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-10)
    assert gradgradcheck(lambda *a: f(fastgan.conv2d_act, *a), (x, w, b), fast_mode=True)
    fused = {"conv2d_act_fwd"} if path == "triton" else {"conv2d_act_cudnn", "bias_act_fwd"}
    assert set(launches()) == fused | {"bias_act_grad"}  # gradcheck decides how many


@pytest.mark.parametrize("lr_mul", [1.0, 0.25])
def test_equalized_lr_layer_reads_its_weight_in_place(lr_mul, launches, monkeypatch):
    """A FusedConv2d with an equalized learning rate and an NCHW weight launches one kernel
    on its own weight tensor: no scaled or relaid copy of the weight is made per forward."""
    monkeypatch.setenv("FASTGAN_CONV", "triton")
    m = fastgan.nn.FusedConv2d(4, 6, 3, padding=1, equalized_lr=True, lr_mul=lr_mul).double()
    x = torch.randn(2, 4, 5, 5, dtype=F64)
    expected = reference.conv2d_act(x, m.weight * (lr_mul / 6), m.bias * lr_mul, 1, 1,
                                    act="lrelu")
    torch.testing.assert_close(m(x), expected, atol=1e-10, rtol=0)  # also the warm-up
    with launch.recording() as recorded, DispatchedOps() as ops:
        m(x)
    assert [r.name for r in recorded] == ["conv2d_act_fwd"]
    assert recorded[0].pointers[1] is not m.weight  # a view (the engine's node), not a copy:
    assert recorded[0].pointers[1].data_ptr() == m.weight.data_ptr()
    assert recorded[0].pointers[1].stride() == m.weight.stride()
    computing = [name for name in ops.names() if name not in ("view", "empty", "detach")]
    assert computing == ([] if lr_mul == 1 else ["mul"])  # lr_mul != 1: the bias, [6]


def test_autocast_leaves_float64_alone(launches):
    """Autocast's rule: float64 tensors are not cast to the autocast dtype (F.conv2d keeps
    them float64); float32 ones are."""
    x = torch.randn(1, 2, 5, 5, dtype=F64)
    w = torch.randn(4, 2, 3, 3, dtype=F64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fastgan.conv2d_act(x, w, None, padding=1, act="lrelu")
        assert F.conv2d(x, w, None, 1, 1).dtype == F64
        y32 = fastgan.conv2d_act(x.float(), w.float(), None, padding=1, act="lrelu")
    assert y.dtype == F64 and y32.dtype == torch.bfloat16
    torch.testing.assert_close(y, reference.conv2d_act(x, w, None, 1, 1, act="lrelu"),
                               atol=1e-10, rtol=0)
    assert launches()["conv2d_act_fwd"] == 2


@pytest.mark.parametrize("path", ["triton", "cudnn"])
def test_strided_upstream_gradient_and_input(path, launches, monkeypatch):
    """An expanded upstream gradient (``y.sum().backward()``), a transposed one, and a sliced
    input with gaps: the gradients of the reference."""
    monkeypatch.setenv("FASTGAN_CONV", path)
    g = torch.Generator().manual_seed(8)
    wide = torch.randn(2, 4, 6, 11, generator=g, dtype=F64)
    w = torch.randn(6, 4, 3, 3, generator=g, dtype=F64) / 6
    b = torch.randn(6, generator=g, dtype=F64)
    upstream = {"expanded": torch.ones(1, 1, 1, 1, dtype=F64).expand(2, 6, 6, 6),
                "transposed": torch.randn(2, 6, 6, 6, generator=g, dtype=F64).transpose(2, 3)}
    for name, dy in upstream.items():
        results = []
        for op in (fastgan.conv2d_act, reference.conv2d_act):
            x = wide.clone().requires_grad_()
            y = op(x[..., ::2], w, b, 1, 1, act="lrelu", clamp=3.0)
            results.append(torch.autograd.grad(y, x, dy)[0])
        torch.testing.assert_close(*results, atol=1e-10, rtol=1e-10, msg=name)
    assert launches()["conv2d_act_fwd" if path == "triton" else "conv2d_act_cudnn"] == 2


@pytest.mark.parametrize("path", ["triton", "cudnn"])
def test_identity_epilogue_adds_no_pass(path, launches, monkeypatch):
    """A linear layer without bias, gain, clamp or weight gain (e.g. a 1x1 projection): the
    cuDNN path is F.conv2d alone and neither path runs bias_act_grad in the backward."""
    monkeypatch.setenv("FASTGAN_CONV", path)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 4, 5, 5, generator=g, dtype=F64, requires_grad=True)
    w = torch.randn(6, 4, 1, 1, generator=g, dtype=F64, requires_grad=True)
    dy = torch.randn(2, 6, 5, 5, generator=g, dtype=F64)
    got = fastgan.conv2d_act(x, w, act="linear")
    grads = torch.autograd.grad(got, (x, w), dy)
    want = reference.conv2d_act(x, w, act="linear")
    for a, b in zip((got, *grads), (want, *torch.autograd.grad(want, (x, w), dy))):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    assert launches() == {"conv2d_act_fwd" if path == "triton" else "conv2d_act_cudnn": 1}
