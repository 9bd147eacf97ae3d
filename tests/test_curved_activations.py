"""The curved activations (tanh, sigmoid, elu, selu, softplus, swish: a nonzero second
derivative) of fastgan.bias_act against fastgan.reference, on the Triton kernels (in the
interpreter) and on the compiled extension (docs/design.md sections 3 and 4).

Their gradient is computed from the saved input by ``bias_act_grad_from_input``; its backward
runs that kernel again for the derivative w.r.t. the upstream gradient and torch ops for the
curvature term. Every test that runs the op asserts exact launch counts of the backend forced
for it, so that a fallback to the reference cannot pass.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import fastgan
from fastgan import reference
from fastgan.ops import bias_act as bias_act_module
from op_helpers import TOL, assert_matches, leaf, nested_grads
from test_ext import require_ext
from test_ext_ops import cpu, layouts

CURVED = [name for name, act in reference.ACTIVATIONS.items() if act.curved]
LAUNCHES = {"triton": ("bias_act_fwd", "bias_act_grad_from_input"),
            "ext": ("ext_bias_act", "ext_bias_act_grad_from_input")}
F64, F32 = torch.float64, torch.float32


@pytest.fixture(params=["triton", "ext"])
def kernels(request, _default_backend):
    """The Triton kernels (interpreter) and the extension's CPU kernels, each forced in turn."""
    if request.param == "ext":
        require_ext()
    fastgan.set_backend(request.param)
    return request.param


def counts(kernels, forward=1, grad=1):
    """The exact launch counts of ``forward`` forwards and ``grad`` gradients on ``kernels``."""
    fwd, bwd = LAUNCHES[kernels]
    return {name: n for name, n in ((fwd, forward), (bwd, grad)) if n}


def grads_of(fn, x, b, dim, cfg, dy):
    """``(y, dx, db)`` of ``fn`` (the fused op or the reference) for leaves equal to ``x`` and
    ``b`` and the upstream gradient ``dy``."""
    xl, bl = leaf(x), None if b is None else leaf(b)
    y = fn(xl, bl, dim, **cfg)
    grads = torch.autograd.grad(y, [xl] if bl is None else [xl, bl], dy)
    return y.detach(), grads[0], grads[1] if bl is not None else None


def both(x, b, dim, cfg, dy):
    """``[(y, dx, db)]`` of the fused op and of the reference for the same inputs."""
    return [grads_of(fn, x, b, dim, cfg, dy) for fn in (fastgan.bias_act, reference.bias_act)]


def assert_both_match(x, b, dim, cfg, seed=7, dtype=None):
    fused, ref = both(x, b, dim, cfg, cpu(*x.shape, dtype=x.dtype, seed=seed))
    for got, want in zip(fused, ref):
        assert_matches(got, want, dtype)
    return fused


# --- the reference -------------------------------------------------------------------------------

def test_defaults_are_stylegan2_adas():
    """Every activation with StyleGAN2-ADA's default alpha and gain and its code; the curved
    ones are those with a nonzero second derivative."""
    s2 = math.sqrt(2)
    table = {"linear": (0, 0, 1, False), "relu": (1, 0, s2, False),
             "lrelu": (2, 0.2, s2, False), "tanh": (3, 0, 1, True), "sigmoid": (4, 0, 1, True),
             "elu": (5, 0, 1, True), "selu": (6, 0, 1, True), "softplus": (7, 0, 1, True),
             "swish": (8, 0, s2, True)}
    assert {name: (a.code, a.default_alpha, a.default_gain, a.curved)
            for name, a in reference.ACTIVATIONS.items()} == table


def test_reference_functions_by_hand():
    """The reference computes the functions StyleGAN2-ADA's reference does, with its gains."""
    z = [-25.0, -1.5, -1e-3, 0.0, 0.7, 19.0, 21.0]
    sig = [1 / (1 + math.exp(-v)) for v in z]
    selu_alpha, selu_scale = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946
    expected = {
        "tanh": [math.tanh(v) for v in z],
        "sigmoid": sig,
        "elu": [v if v > 0 else math.expm1(v) for v in z],
        "selu": [selu_scale * (v if v > 0 else selu_alpha * math.expm1(v)) for v in z],
        "softplus": [v if v > 20 else math.log1p(math.exp(v)) for v in z],
        "swish": [math.sqrt(2) * s * v for s, v in zip(sig, z)],
    }
    for act, values in expected.items():
        y = reference.bias_act(torch.tensor(z, dtype=F64), None, 0, act)
        torch.testing.assert_close(y, torch.tensor(values, dtype=F64), rtol=1e-14, atol=0)


@pytest.mark.parametrize("act", CURVED)
def test_second_derivative_is_autograds(act):
    """``reference.second_derivative`` equals torch's autograd taken twice, also at 0, around
    softplus's threshold, for large |z|, inf and NaN."""
    z = torch.cat([cpu(50, seed=1) * 4, torch.tensor(
        [0.0, 1e-9, -1e-9, 19.999, 20.0, 20.001, 800.0, -800.0, float("inf"), -float("inf"),
         float("nan")], dtype=F64)]).requires_grad_(True)
    spec = reference.resolve_activation(act, gain=1.0)
    slope, = torch.autograd.grad(reference.apply_activation(z, spec).sum(), z, create_graph=True)
    expected, = torch.autograd.grad(slope.sum(), z)
    got = reference.second_derivative(z.detach(), act)
    assert torch.equal(got.isnan(), expected.isnan())
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15, equal_nan=True)
    assert got[:50].abs().min() > 0 or act in ("elu", "selu")  # nonzero: a curved activation


# --- values and first derivatives -----------------------------------------------------------------

CONFIGS = [dict(), dict(gain=0.6), dict(clamp=0.5), dict(gain=-1.3, clamp=0.9, scale=0.7),
           dict(alpha=0.3, scale=-1.2)]


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("act", CURVED)
def test_matches_reference(act, dtype, kernels, launches):
    """y, dx and db equal the reference's with defaults, gain, clamp, scale and alpha (which
    the curved activations ignore), with and without bias."""
    x = cpu(3, 5, 4, 7, dtype=dtype, seed=1) * 2
    b = cpu(5, dtype=dtype, seed=2)
    for cfg in CONFIGS:
        assert_both_match(x, b, 1, dict(act=act, **cfg))
    assert_both_match(x, None, 2, dict(act=act, clamp=0.8))
    assert launches() == counts(kernels, len(CONFIGS) + 1, len(CONFIGS) + 1)


LAYOUTS = layouts() + [("rank1", cpu(11, seed=18), 0, True)]


@pytest.mark.parametrize("index", range(len(LAYOUTS)), ids=[case[0] for case in LAYOUTS])
def test_layouts(index, kernels, launches):
    """Layouts keep theirs in y and dx (dense) or give the reference's numbers (strided); a
    strided bias and an upstream gradient of other strides too."""
    _, x, dim, dense = LAYOUTS[index]
    act = CURVED[index % len(CURVED)]
    b = cpu(2 * x.shape[dim], seed=19)[::2]
    y, dx, _ = assert_both_match(x, b, dim, dict(act=act, clamp=1.2, scale=0.8))
    if dense:
        assert y.stride() == dx.stride() == x.stride()
    fused, ref = both(x, b, dim, dict(act=act), cpu(*reversed(x.shape), seed=20).permute(
        *reversed(range(x.ndim))))
    for got, want in zip(fused, ref):
        assert_matches(got, want)
    assert launches() == counts(kernels, 2, 2)


def test_several_tiles_and_bias_partials(kernels, launches):
    """Tensors larger than one tile (and one CPU work item): the bias partials of several
    programs, with channels as rows and as columns."""
    x = cpu(2, 8, 27, 27, seed=21)
    for layout in (x, x.to(memory_format=torch.channels_last)):
        assert_both_match(layout, cpu(8, seed=22), 1, dict(act="swish", clamp=1.0))
    assert launches() == counts(kernels, 2, 2)


@pytest.mark.parametrize("shape,dim", [((0, 5, 3), 1), ((2, 0, 3), 1), ((3, 4, 0), 1),
                                       ((0,), 0)])
def test_empty(shape, dim, kernels, launches):
    """Empty tensors: empty results, a zero bias gradient, nothing launched."""
    y, dx, db = assert_both_match(cpu(*shape), cpu(shape[dim], seed=1), dim, dict(act="tanh"))
    assert y.shape == dx.shape == shape and torch.equal(db, torch.zeros(shape[dim], dtype=F64))
    assert launches() == {}


@pytest.mark.parametrize("act", CURVED)
def test_tiny_and_large_inputs_are_accurate(act, kernels, launches):
    """Relative accuracy where naive formulas lose it (exp(z) - 1, log(1 + exp(z)) and tanh
    near 0), saturation for large |z| and softplus around its threshold 20."""
    z = torch.tensor([1e-300, -1e-300, 3e-12, -3e-12, 1e-7, -1e-7, 19.9999, 20.0, 20.0001, 36.0,
                      -36.0, 40.0, -40.0, 700.0, -700.0, -750.0], dtype=F64)
    fused, ref = both(z, None, 0, dict(act=act), cpu(len(z), seed=3))
    for got, want in zip(fused[:2], ref[:2]):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-300)
    assert launches() == counts(kernels)


def test_float32_within_a_few_ulp(kernels, launches):
    """float32 values within 4 ulp (2**-21 relative) of the float64 reference on a grid from
    -40 to 40 and at tiny |z| (the extension computes exp(z) - 1 and tanh from exp, with
    Taylor polynomials near 0, in float32); gradients within 2e-6 (torch's formulas, such as
    ``1 - t * t``, cancel in float32 where the slope is near 0 or 1)."""
    grid = torch.linspace(-40, 40, 8001, dtype=F32)
    z = torch.cat([grid, torch.logspace(-30, 0, 301, dtype=F32), -torch.logspace(-30, 0, 301,
                                                                                 dtype=F32)])
    dy = torch.ones_like(z)
    for act in CURVED:
        fused = grads_of(fastgan.bias_act, z, None, 0, dict(act=act), dy)
        ref = grads_of(reference.bias_act, z.double(), None, 0, dict(act=act), dy.double())
        torch.testing.assert_close(fused[0].double(), ref[0], rtol=2 ** -21, atol=1e-37)
        torch.testing.assert_close(fused[1].double(), ref[1], rtol=2 ** -21, atol=2e-6)
    assert launches() == counts(kernels, len(CURVED), len(CURVED))


@pytest.mark.parametrize("clamp", [None, 0.6])
@pytest.mark.parametrize("act", CURVED)
# Expected: the interpreter's numpy warns where inf * 0 or inf - inf make the NaN the reference
# makes too (or in a branch tl.where discards). A GPU computes it silently.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_nan_and_inf_like_reference(act, clamp, kernels, launches):
    """NaN and inf in x, b and dy land exactly where autograd through the reference puts
    them (the order of the gradient formulas is torch's)."""
    x = cpu(2, 4, 9, seed=25) * 3
    x[0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=F64)
    x[1, 2, :3] = torch.tensor([0.0, 800.0, -800.0], dtype=F64)
    b = cpu(4, seed=26)
    b[3] = float("nan")
    dy = cpu(2, 4, 9, seed=27)
    dy[:, 1, :3] = torch.tensor([float("inf"), float("nan"), -float("inf")], dtype=F64)
    dy[1, 2, :3] = float("inf")
    fused, ref = both(x, b, 1, dict(act=act, clamp=clamp), dy)
    assert ref[0].isnan().any() and ref[1].isnan().any()
    if act in ("elu", "selu"):
        # torch's CPU kernel of their gradient disagrees with itself where z is NaN (NaN in its
        # vectorized loop, the positive slope in its scalar tail): fastgan's is NaN there
        z_nan = (x + b.view(-1, 1)).isnan()
        assert fused[1][z_nan].isnan().all()
        fused[1][z_nan] = ref[1][z_nan] = 0.0
    for got, want in zip(fused, ref):
        assert_matches(got, want)
        assert torch.equal(got.isinf(), want.isinf())
    assert launches() == counts(kernels)


# --- higher orders -------------------------------------------------------------------------------

@pytest.mark.parametrize("act", CURVED)
def test_gradcheck_and_gradgradcheck(act, kernels, launches):
    """First and second derivatives equal finite differences (float64), with clamp and scale,
    contiguous and (for two of them) channels_last with the bias along the last dim."""
    cases = [(cpu(2, 3, 2, seed=27), 1)]
    if act in ("tanh", "selu"):
        cases.append((cpu(1, 2, 2, 3, seed=29).to(memory_format=torch.channels_last), -1))
    for x, dim in cases:
        x, b = leaf(x), leaf(cpu(x.shape[dim], seed=28))

        def fn(x, b):
            return fastgan.bias_act(x, b, dim, act, gain=1.3, clamp=0.9, scale=0.8)

        assert torch.autograd.gradcheck(fn, (x, b))
        assert torch.autograd.gradgradcheck(fn, (x, b))
    # gradcheck decides how many calls it makes; what must hold is that only the kernels ran
    assert set(launches()) == set(LAUNCHES[kernels])


@pytest.mark.parametrize("cfg", [dict(), dict(clamp=0.8, scale=0.6, gain=1.4)],
                         ids=["default", "clamp-scale-gain"])
@pytest.mark.parametrize("act", CURVED)
def test_third_order_matches_reference(act, cfg, kernels, launches):
    """Three nested autograd.grad of ``sum(w * bias_act(x, b) ** 3)`` equal the reference's;
    the kernels run for the forward and for every gradient w.r.t. an upstream gradient, the
    curvature term is torch ops."""
    x, b = leaf(cpu(3, 4, 5, seed=31)), leaf(cpu(4, seed=32))
    fused = nested_grads(lambda x, b: fastgan.bias_act(x, b, 1, act, **cfg), (x, b), 3)
    ref = nested_grads(lambda x, b: reference.bias_act(x, b, 1, act, **cfg), (x, b), 3)
    for got, want in zip(fused, ref):
        for g, r in zip(got, want):
            assert_matches(g, r)
    assert fused[2][0].abs().sum() > 0
    # order 1: dz; orders 2 and 3: two gradients w.r.t. an upstream gradient each (``w * y**3``
    # makes every upstream gradient depend on x), the curvature terms run no kernel
    assert launches() == counts(kernels, 1, 5)


@pytest.mark.parametrize("act", ["tanh", "softplus"])
def test_r1_pattern_runs_the_kernels_and_the_curvature(act, kernels, launches, monkeypatch):
    """R1's inner pass (the input gradient, create_graph) runs the gradient kernel without
    the bias reduction; the outer backward adds the curvature term with torch ops and no
    kernel; the parameter gradients equal the reference's."""
    need_db = []
    original = bias_act_module.bias_act_grad_from_input
    monkeypatch.setattr(bias_act_module, "bias_act_grad_from_input",
                        lambda *args: need_db.append(args[5]) or original(*args))
    results = []
    for fn in (fastgan.bias_act, reference.bias_act):
        x, b = leaf(cpu(2, 3, 4, seed=40)), leaf(cpu(3, seed=41))
        w = cpu(2, 3, 4, seed=42)
        y = fn(x, b, 1, act, clamp=1.5, scale=0.5)
        gx, = torch.autograd.grad((w * y).sum(), x, create_graph=True)
        (y.square().mean() + gx.square().sum()).backward()
        results.append((gx.detach(), x.grad, b.grad))
    for got, want in zip(*results):
        assert_matches(got, want)
    assert need_db == [False, True]  # the inner pass, then y.square()'s backward
    assert launches() == counts(kernels, 1, 2)


def test_gradients_require_grad_as_eagers_and_the_second_derivative_runs_no_kernel(
        kernels, launches):
    """With ``create_graph=True`` dx and db require grad, as eager's do (the slope depends on
    x and b); the second derivative w.r.t. x and b equals eager's and is torch ops only."""
    for act in CURVED:
        results = []
        for fn in (fastgan.bias_act, reference.bias_act):
            x, b = leaf(cpu(2, 3, 4, seed=5)), leaf(cpu(3, seed=6))
            dx, db = torch.autograd.grad(fn(x, b, 1, act), (x, b), cpu(2, 3, 4, seed=7),
                                         create_graph=True)
            assert dx.requires_grad and db.requires_grad
            fastgan.reset_launch_counts()
            second = torch.autograd.grad((dx * cpu(2, 3, 4, seed=8)).sum() + db.sum(), (x, b))
            assert launches() == {}
            results.append(second)
        for got, want in zip(*results):
            assert_matches(got, want)


# --- 16 bits, impl, conv2d_act, modules ---------------------------------------------------------

ULP = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_16_bit_within_one_rounding_of_float32(dtype, kernels, launches):
    """fp16/bf16, computed in float32: y, dx and db within one rounding of the float32
    reference, the clamp mask exactly the reference's (inputs near the clamp moved away)."""
    tol = dict(rtol=ULP[dtype], atol=1e-5)
    for act in CURVED:
        x = cpu(3, 5, 6, dtype=dtype, seed=9) * 2
        b = cpu(5, dtype=dtype, seed=10)
        dy = cpu(3, 5, 6, dtype=dtype, seed=11)
        unclamped = reference.bias_act(x.float() * 0.5, b.float(), 1, act)
        x = torch.where((unclamped.abs() - 1.0).abs() < 0.05, torch.full_like(x, 64), x)
        cfg = dict(act=act, clamp=1.0, scale=0.5)
        fused = grads_of(fastgan.bias_act, x, b, 1, cfg, dy)
        ref = grads_of(reference.bias_act, x.float(), b.float(), 1, cfg, dy.float())
        for got, want in zip(fused, ref):
            assert got.dtype == dtype
            torch.testing.assert_close(got.float(), want.to(dtype).float(), **tol)
        assert torch.equal(fused[1] == 0, ref[1].to(dtype) == 0)
    assert launches() == counts(kernels, len(CURVED), len(CURVED))


def test_impl_ref_runs_the_reference(kernels, launches):
    """StyleGAN2-ADA's ``impl``: ``'ref'`` runs fastgan.reference (no kernel, eager's autograd
    graph), any other value the fused op."""
    x, b = cpu(2, 3, 4, seed=1), cpu(3, seed=2)
    y = fastgan.bias_act(leaf(x), b, 1, "selu", None, None, 0.9, "ref")
    assert launches() == {}
    assert "Where" in type(y.grad_fn).__name__  # the reference's clamp, not a fused Function
    assert_matches(y, reference.bias_act(x, b, 1, "selu", clamp=0.9))
    for impl in (None, "cuda"):
        assert_matches(fastgan.bias_act(x, b, 1, "selu", clamp=0.9, impl=impl), y.detach())
    assert launches() == counts(kernels, 2, 0)


def test_forced_ext_on_cuda_runs_triton_for_curved_activations(monkeypatch):
    """The extension's CUDA kernels compute linear, relu and lrelu: where the backend rule
    picks the extension for a CUDA tensor, a curved activation runs what the rule runs without
    it (Triton; the reference while torch.compile traces). A stand-in tensor on 'cuda' and a
    rule that answers 'ext' show it without a GPU."""
    from types import SimpleNamespace

    monkeypatch.setattr(bias_act_module, "implementation", lambda x: "ext")
    on_cuda, on_cpu = (SimpleNamespace(device=torch.device(d)) for d in ("cuda", "cpu"))
    tanh, lrelu = reference.resolve_activation("tanh"), reference.resolve_activation("lrelu")
    assert bias_act_module._implementation(on_cuda, tanh) == "triton"
    assert bias_act_module._implementation(on_cuda, lrelu) == "ext"
    assert bias_act_module._implementation(on_cpu, tanh) == "ext"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert bias_act_module._implementation(on_cuda, tanh) == "torch"


@pytest.mark.parametrize("act", ["tanh", "elu", "swish"])
def test_conv2d_act_is_conv_then_bias_act(act, kernels, launches):
    """conv2d_act with a curved activation: F.conv2d, then bias_act with the weight gain as
    its scale (no fused conv); values and the gradients of x, weight and bias equal the
    reference's, and the second order equals finite differences (gradgradcheck, swish)."""
    x = cpu(2, 3, 5, 5, seed=50).to(memory_format=torch.channels_last)
    w, b = cpu(4, 3, 3, 3, seed=51) / 5, cpu(4, seed=52)
    dy = cpu(2, 4, 3, 3, seed=53)
    results = []
    for fn in (fastgan.conv2d_act, reference.conv2d_act):
        leaves = [leaf(t) for t in (x, w, b)]
        y = fn(*leaves, act=act, clamp=1.1, weight_gain=0.7)
        results.append((y.detach(), *torch.autograd.grad(y, leaves, dy)))
    for got, want in zip(*results):
        assert_matches(got, want)
    assert launches() == counts(kernels)
    assert results[0][0].is_contiguous(memory_format=torch.channels_last)
    if act != "swish":
        return

    def fn(x, w, b):
        return fastgan.conv2d_act(x, w, b, padding=1, act=act, weight_gain=0.7)

    small = (cpu(1, 1, 2, 3, seed=54), cpu(2, 1, 2, 2, seed=55), cpu(2, seed=56))
    assert torch.autograd.gradgradcheck(fn, tuple(leaf(t) for t in small))
    assert set(launches()) == set(LAUNCHES[kernels])


def test_modules_take_curved_activations(kernels, launches):
    """BiasAct, FusedConv2d and FusedLinear run every activation (equalized lr as scale)."""
    torch.manual_seed(0)
    x = cpu(2, 3, 4, 4, seed=60)
    conv = fastgan.nn.FusedConv2d(3, 4, 3, padding=1, act="softplus", equalized_lr=True).double()
    act = fastgan.nn.BiasAct(4, act="sigmoid", bias_init=0.2).double()
    fc = fastgan.nn.FusedLinear(64, 2, act="tanh", equalized_lr=True, lr_mul=0.5).double()
    out = fc(act(conv(x)).flatten(1))
    h = reference.conv2d_act(x, conv.weight, conv.bias * conv.lr_mul, padding=1, act="softplus",
                             weight_gain=conv.weight_gain)
    h = reference.bias_act(h, act.bias, 1, "sigmoid").flatten(1)
    want = reference.bias_act(F.linear(h, fc.weight * fc.weight_gain), fc.bias * fc.lr_mul, 1,
                              "tanh")
    torch.testing.assert_close(out, want, **TOL[F64])
    assert launches() == counts(kernels, 3, 0)
