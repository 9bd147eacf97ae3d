"""The public ops through the compiled extension on CPU, against fastgan.reference.

The backend is forced to ``ext`` (``fastgan.set_backend``); the extension is built by
``test_ext.require_ext`` when missing. The autograd Functions are the same as for the Triton
kernels (docs/design.md section 4), with the extension's ops in their forwards, so gradcheck,
gradgradcheck and third-order checks run through it. Every test asserts from the launch
counters that the extension ran (``ext_<op>``) and nothing else did.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import fastgan
from fastgan import reference
from fastgan.ops.bias_act import unit_slope
from op_helpers import assert_matches, leaf, nested_grads, randn
from test_ext import require_ext

F64, F32 = torch.float64, torch.float32
FWD_BWD = {"ext_bias_act": 1, "ext_bias_act_grad": 1}
NORM_FWD_BWD = {"ext_per_sample_dot": 1, "ext_scale_per_sample": 1}
CONV_FWD_BWD = {"conv2d_act_cudnn": 1, **FWD_BWD}
CONFIGS = [dict(act="linear"), dict(act="relu"), dict(act="lrelu"),
           dict(act="lrelu", alpha=0.3, gain=-2.0, clamp=1.5),
           dict(act="relu", gain=0.5, clamp=0.8), dict(act="linear", gain=-1.5, clamp=1.0)]


@pytest.fixture(autouse=True)
def ext_backend(_default_backend):
    require_ext()
    fastgan.set_backend("ext")


def fwd_bwd(cfg, scale=1.0):
    """The launches of one forward and backward: no gradient kernel for a plain bias add."""
    if unit_slope(reference.resolve_activation(**cfg), scale):
        return {"ext_bias_act": 1}
    return FWD_BWD


def cpu(*shape, dtype=F64, seed=0):
    return randn(*shape, dtype=dtype, seed=seed, device="cpu")


def cfg_id(cfg):
    return "-".join(f"{k}={v}" for k, v in cfg.items())


def both(fns, inputs, seed=7):
    """For ``fns`` (the fused op and its reference): the output and the gradients w.r.t. the
    non-None ``inputs`` (leaves with their strides) for the same random upstream gradient."""
    results = []
    for fn in fns:
        leaves = [None if t is None else leaf(t) for t in inputs]
        out = fn(*leaves)
        dout = cpu(*out.shape, dtype=out.dtype, seed=seed)
        wanted = [t for t in leaves if t is not None]
        results.append((out.detach(), *torch.autograd.grad(out, wanted, dout)))
    return results


def assert_bias_act_matches(x, b, dim, cfg, scale=1.0):
    """y, dx (and db) of fastgan.bias_act equal the reference's; returns the fused ones."""
    fused, ref = both([lambda x, b, fn=fn: fn(x, b, dim, **cfg, scale=scale)
                       for fn in (fastgan.bias_act, reference.bias_act)], (x, b))
    for got, want in zip(fused, ref):
        assert_matches(got, want)
    return fused


# --- bias_act ------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [1.0, 0.37])
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=cfg_id)
def test_bias_act_matches_reference(cfg, dtype, scale, launches):
    y, dx, db = assert_bias_act_matches(cpu(3, 5, 7, 9, dtype=dtype, seed=1),
                                        cpu(5, dtype=dtype, seed=2), 1, cfg, scale)
    assert y.dtype == dx.dtype == db.dtype == dtype
    assert launches() == fwd_bwd(cfg, scale)


@pytest.mark.parametrize("shape,dim", [
    ((7,), 0), ((4, 6), 0), ((4, 6), -1), ((3, 5, 7, 9), 0), ((3, 5, 7, 9), 2),
    ((3, 5, 7, 9), 3), ((3, 5, 7, 9), -3), ((2, 3, 4, 3, 2), 4), ((2, 3, 4, 3, 2), -5),
    ((1, 1, 1), 1), ((2, 3, 301), 1), ((3, 2100), 1), ((9001,), 0)])
def test_bias_act_every_rank_and_dim(shape, dim, launches):
    """Ranks 1-5, every kind of ``dim``, odd sizes, rows split over several work items."""
    assert_bias_act_matches(cpu(*shape, seed=3), cpu(shape[dim], seed=4), dim,
                            dict(act="lrelu", clamp=1.2))
    assert launches() == FWD_BWD


def test_bias_act_without_bias(launches):
    y, dx = assert_bias_act_matches(cpu(3, 5, 7, seed=5), None, -1, dict(act="lrelu"), 0.5)
    assert launches() == FWD_BWD


def layouts():
    """``(name, x, dim, dense)``: dense layouts other than contiguous, and strided views."""
    base = cpu(2, 6, 5, 9, seed=13)
    return [("channels_last", base.to(memory_format=torch.channels_last), 1, True),
            ("channels_last_dim-1", base.to(memory_format=torch.channels_last), -1, True),
            ("permuted", cpu(9, 2, 5, 6, seed=15).permute(1, 3, 2, 0), 1, True),
            ("transposed_2d", cpu(7, 4, seed=16).t(), 0, True),
            ("sliced_channels", base[:, ::2], 1, False),
            ("sliced_last", base[..., 1:], -1, False),
            ("expanded", cpu(2, 6, 1, 9, seed=17).expand(2, 6, 5, 9), 1, False)]


@pytest.mark.parametrize("index", range(7), ids=[case[0] for case in layouts()])
def test_bias_act_layouts(index, launches):
    """Dense layouts are kept in y and dx; strided views give the reference's numbers."""
    _, x, dim, dense = layouts()[index]
    assert not x.is_contiguous()
    y, dx, _ = assert_bias_act_matches(x, cpu(x.shape[dim], seed=18), dim,
                                       dict(act="lrelu", clamp=1.5))
    if dense:
        assert y.stride() == dx.stride() == x.stride()
    assert launches() == FWD_BWD


@pytest.mark.parametrize("name", ["step2", "column", "expanded"])
def test_bias_act_strided_bias(name, launches):
    """A bias with any strides; the gradient reaches the tensor it is a view of."""
    x = cpu(2, 5, 3, 4, seed=64).to(memory_format=torch.channels_last)
    base = {"step2": cpu(10, seed=65), "column": cpu(5, 3, seed=65),
            "expanded": cpu(1, seed=65)}[name]
    view = {"step2": lambda t: t[::2], "column": lambda t: t[:, 0],
            "expanded": lambda t: t.expand(5)}[name]
    fused, ref = both([lambda x, base, fn=fn: fn(x, view(base), 1, "lrelu", clamp=1.5)
                       for fn in (fastgan.bias_act, reference.bias_act)], (x, base))
    for got, want in zip(fused, ref):
        assert_matches(got, want)
    assert launches() == FWD_BWD


@pytest.mark.parametrize("name", ["expanded", "transposed", "step2"])
def test_bias_act_strided_upstream_gradient(name, launches):
    dy = {"expanded": lambda: cpu(1, 1, 5, seed=67).expand(3, 4, 5),
          "transposed": lambda: cpu(5, 4, 3, seed=67).permute(2, 1, 0),
          "step2": lambda: cpu(3, 4, 10, seed=67)[..., ::2]}[name]()
    results = []
    for fn in (fastgan.bias_act, reference.bias_act):
        x, b = leaf(cpu(3, 4, 5, seed=65)), leaf(cpu(4, seed=66))
        results.append(torch.autograd.grad(fn(x, b, 1, "lrelu"), (x, b), dy))
    for got, want in zip(*results):
        assert_matches(got, want)
    assert launches() == FWD_BWD


@pytest.mark.parametrize("shape,dim", [((0, 5, 3), 1), ((2, 0, 3), 1), ((3, 4, 0), 1),
                                       ((0,), 0)])
def test_bias_act_empty(shape, dim, launches):
    """Empty tensors: empty results, a zero bias gradient, nothing launched."""
    y, dx, db = assert_bias_act_matches(cpu(*shape), cpu(shape[dim], seed=1), dim,
                                        dict(act="lrelu"))
    assert y.shape == dx.shape == shape and torch.equal(db, torch.zeros(shape[dim], dtype=F64))
    assert launches() == {}


@pytest.mark.parametrize("cfg", CONFIGS, ids=cfg_id)
def test_bias_act_nan_and_inf(cfg, launches):
    """NaN and Inf in x, b and dy land exactly where the reference puts them."""
    x, b = cpu(2, 4, 3, seed=25), cpu(4, seed=26)
    for index, value in (((0, 0, 0), "nan"), ((0, 1, 1), "inf"), ((1, 1, 2), "-inf"),
                         ((1, 0, 1), "-inf")):
        x[index] = float(value)
    b[3] = float("nan")
    dy = cpu(2, 4, 3, seed=27)
    dy[0, 2, :] = torch.tensor([float("inf"), float("nan"), -float("inf")], dtype=F64)
    results = []
    for fn in (fastgan.bias_act, reference.bias_act):
        xl, bl = leaf(x), leaf(b)
        y = fn(xl, bl, 1, **cfg)
        results.append((y.detach(), *torch.autograd.grad(y, (xl, bl), dy)))
    assert results[1][0].isnan().any()
    for got, want in zip(*results):
        assert_matches(got, want)
        assert torch.equal(got.isinf(), want.isinf())
    assert launches() == fwd_bwd(cfg)


GRADCHECK_CASES = [(dict(act="linear", gain=0.7), 1.0), (dict(act="relu"), 1.0),
                   (dict(act="lrelu"), 0.6), (dict(act="lrelu", alpha=0.3, gain=1.3, clamp=0.9),
                                              -1.4)]


@pytest.mark.parametrize("cfg,scale", GRADCHECK_CASES, ids=[cfg_id(c) for c, _ in GRADCHECK_CASES])
def test_bias_act_gradcheck_and_gradgradcheck(cfg, scale, launches):
    for x, dim in ((cpu(2, 3, 4, seed=27), 1),
                   (cpu(2, 3, 2, 3, seed=29).to(memory_format=torch.channels_last), -1)):
        x, b = leaf(x), leaf(cpu(x.shape[dim], seed=28))

        def fn(x, b):
            return fastgan.bias_act(x, b, dim, **cfg, scale=scale)

        assert torch.autograd.gradcheck(fn, (x, b))
        assert torch.autograd.gradgradcheck(fn, (x, b))
    assert set(launches()) == {"ext_bias_act", "ext_bias_act_grad"}


@pytest.mark.parametrize("cfg,scale", GRADCHECK_CASES, ids=[cfg_id(c) for c, _ in GRADCHECK_CASES])
def test_bias_act_third_order(cfg, scale, launches):
    """Three nested autograd.grad of ``sum(w * bias_act(x, b) ** 3)`` equal the reference's."""
    x, b = leaf(cpu(3, 4, 5, seed=31)), leaf(cpu(4, seed=32))
    fused = nested_grads(lambda x, b: fastgan.bias_act(x, b, 1, **cfg, scale=scale), (x, b), 3)
    ref = nested_grads(lambda x, b: reference.bias_act(x, b, 1, **cfg, scale=scale), (x, b), 3)
    for got, want in zip(fused, ref):
        for g, r in zip(got, want):
            assert_matches(g, r)
    assert fused[2][0].abs().sum() > 0
    counts = launches()
    assert counts.pop("ext_bias_act") == 1 and set(counts) == {"ext_bias_act_grad"}


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_bias_act_is_deterministic(channels_last, launches):
    """Two runs give bitwise the same y, dx and db."""
    x = cpu(4, 8, 21, 21, dtype=F32, seed=33)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    runs = [both([lambda x, b: fastgan.bias_act(x, b, 1, "lrelu")],
                 (x, cpu(8, dtype=F32, seed=34)))[0] for _ in range(2)]
    for first, second in zip(*runs):
        assert torch.equal(first, second)
    assert launches() == {"ext_bias_act": 2, "ext_bias_act_grad": 2}


# --- grad_sq_norm --------------------------------------------------------------------------------

def assert_norm_matches(g):
    fused, ref = both([fastgan.grad_sq_norm, reference.grad_sq_norm], (g,))
    for got, want in zip(fused, ref):
        assert_matches(got, want)
    return fused


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (4,), (4, 6), (2, 3, 4, 3, 2), (1, 1),
                                   (3, 25000)])
def test_grad_sq_norm_matches_reference(shape, dtype, launches):
    out, dg = assert_norm_matches(cpu(*shape, dtype=dtype, seed=51))
    assert out.shape == (shape[0],) and out.dtype == dg.dtype == dtype
    assert launches() == NORM_FWD_BWD


def norm_layouts():
    base = cpu(4, 6, 5, 3, seed=52)
    return {"channels_last": base.to(memory_format=torch.channels_last),
            "batch_inner": cpu(6, 4, seed=53).t(),
            "transposed": base.transpose(1, 3),
            "permuted_batch": cpu(5, 4, 6, seed=54).permute(1, 0, 2),
            "sliced": base[:, ::2],
            "sliced_batch": base[1::2],
            "expanded": cpu(4, 1, 5, 3, seed=55).expand(4, 6, 5, 3)}


@pytest.mark.parametrize("name", list(norm_layouts()))
def test_grad_sq_norm_layouts(name, launches):
    g = norm_layouts()[name]
    assert not g.is_contiguous()
    _, dg = assert_norm_matches(g)
    assert dg.shape == g.shape
    assert launches() == NORM_FWD_BWD


@pytest.mark.parametrize("shape", [(0, 3, 4), (3, 0, 4), (0,)])
def test_grad_sq_norm_empty(shape, launches):
    out, dg = assert_norm_matches(cpu(*shape))
    assert torch.equal(out, torch.zeros(shape[0], dtype=F64)) and dg.shape == shape
    assert launches() == {}


def test_grad_sq_norm_nan_and_inf(launches):
    g = cpu(3, 4, seed=56)
    g[0, 1], g[1, 2], g[2, 0] = float("nan"), float("inf"), -float("inf")
    out, dg = assert_norm_matches(g)
    assert out[0].isnan() and out[1] == out[2] == float("inf")
    assert launches() == NORM_FWD_BWD


def test_grad_sq_norm_gradcheck_gradgradcheck_and_third_order(launches):
    for g in (cpu(3, 2, 2, seed=57),
              cpu(3, 2, 2, 2, seed=58).to(memory_format=torch.channels_last)):
        assert torch.autograd.gradcheck(fastgan.grad_sq_norm, (leaf(g),))
        assert torch.autograd.gradgradcheck(fastgan.grad_sq_norm, (leaf(g),))
    g = leaf(cpu(3, 4, 5, seed=59))
    fused = nested_grads(fastgan.grad_sq_norm, (g,), 3)
    ref = nested_grads(reference.grad_sq_norm, (g,), 3)
    for got, want in zip(fused, ref):
        assert_matches(got[0], want[0])
    assert set(launches()) == {"ext_per_sample_dot", "ext_scale_per_sample"}


def test_grad_sq_norm_is_deterministic(launches):
    g = cpu(3, 100003, dtype=F32, seed=60)
    runs = [both([fastgan.grad_sq_norm], (g,))[0] for _ in range(2)]
    for first, second in zip(*runs):
        assert torch.equal(first, second)
    assert launches() == {"ext_per_sample_dot": 2, "ext_scale_per_sample": 2}


# --- conv2d_act: F.conv2d, then the extension's bias_act -----------------------------------------

CONV_CASES = [  # x shape, weight shape, kwargs of conv2d_act, x layout
    ((2, 4, 7, 6), (6, 4, 3, 3), dict(padding=1, act="lrelu", clamp=2.0), "contiguous"),
    ((2, 4, 7, 6), (6, 2, 3, 2), dict(stride=2, groups=2, act="relu", weight_gain=0.4),
     "channels_last"),
    ((1, 3, 5, 5), (4, 3, 1, 1), dict(act="linear", gain=0.5), "sliced"),
]


def conv_inputs(x_shape, w_shape, layout, bias=True):
    x = cpu(*x_shape, seed=70)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = cpu(x_shape[0], 2 * x_shape[1], *x_shape[2:], seed=70)[:, ::2]
    w = cpu(*w_shape, seed=71) / math.sqrt(math.prod(w_shape[1:]))
    return x, w, cpu(w_shape[0], seed=72) if bias else None


@pytest.mark.parametrize("case", range(len(CONV_CASES)))
def test_conv2d_act_matches_reference(case, launches):
    """On CPU the extension runs conv2d_act as F.conv2d + its bias_act (the ``cudnn`` path of
    Conv2dAct): values and the gradients of x, weight and bias equal the reference's, and the
    output keeps the memory format of x."""
    x_shape, w_shape, kwargs, layout = CONV_CASES[case]
    inputs = conv_inputs(x_shape, w_shape, layout)
    fused, ref = both([lambda x, w, b, fn=fn: fn(x, w, b, **kwargs)
                       for fn in (fastgan.conv2d_act, reference.conv2d_act)], inputs)
    for got, want in zip(fused, ref):
        assert_matches(got, want)
    channels_last = layout == "channels_last"
    assert fused[0].is_contiguous(memory_format=torch.channels_last) == channels_last
    assert launches() == CONV_FWD_BWD


def test_conv2d_act_paths_forced_by_fastgan_conv(monkeypatch, launches):
    """``FASTGAN_CONV=plain`` runs the reference; ``cudnn`` is the default; ``triton`` cannot
    run where the extension does on CPU, so the default runs."""
    x, w, b = conv_inputs((2, 4, 5, 5), (3, 4, 3, 3), "contiguous")
    expected = reference.conv2d_act(x, w, b, 1, 1, act="lrelu")
    for value, counts in (("plain", {}), ("cudnn", {"conv2d_act_cudnn": 1, "ext_bias_act": 1}),
                          ("triton", {"conv2d_act_cudnn": 1, "ext_bias_act": 1})):
        monkeypatch.setenv("FASTGAN_CONV", value)
        fastgan.reset_launch_counts()
        assert_matches(fastgan.conv2d_act(x, w, b, 1, 1, act="lrelu"), expected)
        assert launches() == counts


def test_conv2d_act_gradcheck_and_gradgradcheck(launches):
    x, w, b = (leaf(t) for t in conv_inputs((1, 2, 4, 4), (2, 2, 3, 3), "channels_last"))

    def fn(x, w, b):
        return fastgan.conv2d_act(x, w, b, 1, 1, act="lrelu", clamp=1.0, weight_gain=0.7)

    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))
    assert set(launches()) == {"conv2d_act_cudnn", "ext_bias_act", "ext_bias_act_grad"}


def test_r1_through_fused_layers_matches_reference(launches):
    """R1 (the input gradient with create_graph, grad_sq_norm, backward) through two fused
    conv layers and a FusedLinear head gives the reference's parameter gradients."""
    results = []
    for conv, linear_act, sq_norm in (
            (fastgan.conv2d_act, fastgan.bias_act, fastgan.grad_sq_norm),
            (reference.conv2d_act, reference.bias_act, reference.grad_sq_norm)):
        params = [leaf(t) for t in (cpu(4, 2, 3, 3, seed=80) / 3, cpu(4, seed=81),
                                    cpu(4, 2, 3, 3, seed=82) / 3, cpu(4, seed=83),
                                    cpu(1, 36, seed=84) / 6, cpu(1, seed=85))]
        w1, b1, w2, b2, w3, b3 = params
        x = leaf(cpu(2, 2, 6, 6, seed=86))
        h = conv(x, w1, b1, 2, 1, 1, "lrelu", clamp=4.0)
        h = conv(h, w2, b2, 1, 1, 2, "lrelu")
        out = linear_act(F.linear(h.flatten(1), w3), b3, 1, "linear", scale=0.5)
        gx, = torch.autograd.grad(out.sum(), x, create_graph=True)
        (F.softplus(-out).mean() + 5.0 * sq_norm(gx).mean()).backward()
        results.append([p.grad for p in params])
    for got, want in zip(*results):
        assert_matches(got, want)
    counts = launches()
    assert counts.pop("conv2d_act_cudnn") == 2 and counts.pop("ext_bias_act") == 3
    assert set(counts) == {"ext_bias_act_grad", "ext_per_sample_dot", "ext_scale_per_sample"}
