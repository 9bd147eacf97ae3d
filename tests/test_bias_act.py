"""fastgan.bias_act (Triton kernels) against fastgan.reference.bias_act.

Every test that runs the op asserts, through the ``launches`` fixture, that the Triton kernels
ran: without that, a silent fallback to the reference would pass every comparison.
"""
import math

import pytest
import torch

import fastgan
from fastgan import reference
from fastgan.ops import bias_act as bias_act_module
from fastgan.ops.bias_act import unit_slope
from op_helpers import DEVICE, assert_matches, leaf, nested_grads, randn

ACT_CONFIGS = [
    dict(act="linear"),
    dict(act="relu"),
    dict(act="lrelu"),
    dict(act="lrelu", alpha=0.1, gain=1.0),
    dict(act="relu", gain=0.5, clamp=0.8),
    dict(act="linear", gain=-1.5, clamp=1.0),
    dict(act="lrelu", alpha=0.3, gain=-2.0),
    dict(act="lrelu", alpha=0.3, gain=2.0, clamp=1.5),
]


def _cfg_id(cfg):
    return "-".join(f"{k}={v}" for k, v in cfg.items())


def _both(x, b, dim, cfg, dy_seed=7):
    """``(y, dx, db)`` of the fused op and of the reference for the same leaves and ``dy``."""
    results = []
    for fn in (fastgan.bias_act, reference.bias_act):
        xl = leaf(x)
        bl = None if b is None else leaf(b)
        y = fn(xl, bl, dim, **cfg)
        dy = randn(*y.shape, dtype=y.dtype, seed=dy_seed)
        inputs = (xl,) if bl is None else (xl, bl)
        grads = torch.autograd.grad(y, inputs, dy)
        results.append((y.detach(), grads[0], grads[1] if bl is not None else None))
    return results


def _assert_both_match(x, b, dim, cfg, launches, dtype=None):
    (y, dx, db), (y_ref, dx_ref, db_ref) = _both(x, b, dim, cfg)
    assert_matches(y, y_ref, dtype)
    assert_matches(dx, dx_ref, dtype)
    assert_matches(db, db_ref, dtype)
    counts = launches()
    # a plain bias add (unit_slope) runs no gradient kernel: dx is dy, db torch's sum
    assert counts.get("bias_act_fwd", 0) > 0, counts
    assert (counts.get("bias_act_grad", 0) > 0) != _unit_slope(cfg), counts
    return y, dx, db


def _unit_slope(cfg) -> bool:
    return unit_slope(reference.resolve_activation(**cfg), 1.0)


# --- values and first derivatives ---------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("cfg", ACT_CONFIGS, ids=_cfg_id)
def test_every_activation_matches_reference(cfg, dtype, launches):
    """All acts with default and custom alpha/gain/clamp: y, dx and db match the reference."""
    x = randn(3, 5, 7, 9, dtype=dtype, seed=1)
    b = randn(5, dtype=dtype, seed=2)
    y, _, _ = _assert_both_match(x, b, 1, cfg, launches)
    assert y.dtype == dtype and y.shape == x.shape


@pytest.mark.parametrize("shape,dim", [
    ((3, 5, 7, 9), 0), ((3, 5, 7, 9), 2), ((3, 5, 7, 9), 3), ((3, 5, 7, 9), -1),
    ((3, 5, 7, 9), -3), ((7,), 0), ((7,), -1), ((4, 6), 1), ((4, 6), -2), ((4, 6), 0),
    ((2, 3, 4, 3, 2), 3), ((2, 3, 4, 3, 2), -5), ((2, 3, 4, 3, 2), 4), ((1, 1, 1), 1),
])
@pytest.mark.parametrize("cfg", [dict(act="lrelu", clamp=1.2), dict(act="linear")],
                         ids=_cfg_id)
def test_every_rank_and_dim_matches_reference(shape, dim, cfg, launches):
    """Ranks 1, 2, 3, 4, 5 and every kind of ``dim`` (first, middle, last, negative), with
    the gradient kernel and with a plain bias add (no kernel: db is torch's sum)."""
    x = randn(*shape, seed=3)
    b = randn(shape[dim], seed=4)
    _assert_both_match(x, b, dim, cfg, launches)


@pytest.mark.parametrize("dim", [1, -1])
def test_without_bias(dim, launches):
    """``b=None`` is the activation alone."""
    x = randn(3, 5, 7, 9, seed=5)
    _assert_both_match(x, None, dim, dict(act="lrelu", alpha=0.25), launches)
    assert "bias_act_fwd" in launches()


def test_only_one_input_requires_grad(launches):
    """Gradients flow to ``b`` alone, or to ``x`` alone, as in the reference."""
    x, b = randn(2, 3, 4, seed=6), randn(3, seed=7)
    dy = randn(2, 3, 4, seed=8)
    bl = leaf(b)
    db, = torch.autograd.grad(fastgan.bias_act(x, bl, 1, "lrelu"), bl, dy)
    db_ref, = torch.autograd.grad(reference.bias_act(x, bl, 1, "lrelu"), bl, dy)
    assert_matches(db, db_ref)
    xl = leaf(x)
    dx, = torch.autograd.grad(fastgan.bias_act(xl, b, 1, "relu"), xl, dy)
    dx_ref, = torch.autograd.grad(reference.bias_act(xl, b, 1, "relu"), xl, dy)
    assert_matches(dx, dx_ref)
    assert launches().get("bias_act_grad", 0) == 2


def test_hand_computed_defaults(launches):
    """StyleGAN2-ADA defaults: linear (gain 1), relu (gain sqrt 2), lrelu (0.2, sqrt 2)."""
    x = torch.tensor([[-1.0, 2.0]], dtype=torch.float64, device=DEVICE)
    b = torch.tensor([0.5, -1.0], dtype=torch.float64, device=DEVICE)  # x + b = [-0.5, 1]
    s2 = math.sqrt(2)
    expected = {
        "linear": [-0.5, 1.0],
        "relu": [0.0, s2],
        "lrelu": [-0.1 * s2, s2],
    }
    for act, values in expected.items():
        y = fastgan.bias_act(x, b, 1, act)
        torch.testing.assert_close(y, torch.tensor([values], dtype=torch.float64, device=DEVICE),
                                   rtol=0, atol=1e-15)
    y = fastgan.bias_act(x, b, 1, "lrelu", alpha=0.5, gain=3.0)
    torch.testing.assert_close(y.cpu(), torch.tensor([[-0.75, 3.0]], dtype=torch.float64),
                               rtol=0, atol=1e-15)
    assert launches()["bias_act_fwd"] == 4


def test_hand_computed_clamp(launches):
    """Values are clamped to [-clamp, clamp] and the gradient is 0 where |y| >= clamp,
    including exactly at the bound."""
    x = torch.tensor([-3.0, -0.5, 0.0, 0.25, 0.5, 2.0], dtype=torch.float64, device=DEVICE,
                     requires_grad=True)
    y = fastgan.bias_act(x, None, 0, "linear", clamp=0.5)
    dx, = torch.autograd.grad(y.sum(), x)
    assert y.tolist() == [-0.5, -0.5, 0.0, 0.25, 0.5, 0.5]
    assert dx.tolist() == [0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    counts = launches()
    assert counts["bias_act_fwd"] == 1 and counts["bias_act_grad"] == 1


def test_gradient_at_exactly_zero_follows_torch(launches):
    """At ``x + b == 0`` torch's relu has slope 0 and leaky_relu slope alpha (times gain)."""
    x = leaf(torch.tensor([[0.0, 1.0], [-1.0, 0.5]], dtype=torch.float64, device=DEVICE))
    b = torch.tensor([0.0, -1.0], dtype=torch.float64, device=DEVICE)  # zeros on the diagonal
    s2 = math.sqrt(2)
    for act, values in (("relu", [[0.0, 0.0], [0.0, 0.0]]),
                        ("lrelu", [[0.2 * s2, 0.2 * s2], [0.2 * s2, 0.2 * s2]])):
        dx, = torch.autograd.grad(fastgan.bias_act(x, b, 1, act).sum(), x)
        dx_ref, = torch.autograd.grad(reference.bias_act(x, b, 1, act).sum(), x)
        assert_matches(dx, dx_ref)
        torch.testing.assert_close(dx.cpu(), torch.tensor(values, dtype=torch.float64),
                                   rtol=0, atol=1e-15)
    assert launches()["bias_act_grad"] == 2


@pytest.mark.parametrize("act", ["linear", "relu", "lrelu"])
def test_clamp_bounds_values_and_zeroes_gradient(act, launches):
    """Random input: |y| <= clamp everywhere, and dx and db get nothing where |y| >= clamp."""
    x, b = leaf(randn(4, 3, 5, 5, seed=9) * 3), leaf(randn(3, seed=10))
    y = fastgan.bias_act(x, b, 1, act, clamp=0.7)
    dx, db = torch.autograd.grad(y.sum(), (x, b))
    saturated = y.detach().abs() >= 0.7
    assert saturated.any() and (~saturated).any()
    assert (y.abs() <= 0.7).all()
    assert (dx[saturated] == 0).all()
    assert_matches(db, dx.sum(dim=(0, 2, 3)))
    _assert_both_match(x, b, 1, dict(act=act, clamp=0.7), launches)


def test_clamp_zero(launches):
    """``clamp=0`` forces every output (and gradient) to zero."""
    x = leaf(randn(2, 3, 4, seed=11))
    y = fastgan.bias_act(x, None, 1, "lrelu", clamp=0)
    dx, = torch.autograd.grad(y.sum(), x)
    assert (y == 0).all() and (dx == 0).all()
    _assert_both_match(x, randn(3, seed=12), 1, dict(act="lrelu", clamp=0.0), launches)


# --- layouts ---------------------------------------------------------------------------------

def _layout(name):
    """A ``(x, dim, dense)`` triple: input of the named layout and whether it is dense."""
    base = randn(2, 6, 5, 9, seed=13)
    if name == "channels_last":
        return base.to(memory_format=torch.channels_last), 1, True
    if name == "channels_last_dim-1":
        return base.to(memory_format=torch.channels_last), -1, True
    if name == "channels_last_3d":
        x = randn(2, 3, 4, 3, 5, seed=14).to(memory_format=torch.channels_last_3d)
        return x, 1, True
    if name == "permuted":  # dense, but no standard memory format
        return randn(9, 2, 5, 6, seed=15).permute(1, 3, 2, 0), 1, True
    if name == "transposed":
        return base.transpose(1, 3), 1, True
    if name == "transposed_2d":
        return randn(7, 4, seed=16).t(), 0, True
    if name == "sliced_channels":
        return base[:, ::2], 1, False
    if name == "sliced_last":
        return base[..., 1:], 1, False
    if name == "sliced_last_dim-1":
        return base[..., 1:], -1, False
    if name == "expanded":
        return randn(2, 6, 1, 9, seed=17).expand(2, 6, 5, 9), 1, False
    raise ValueError(name)


LAYOUTS = ["channels_last", "channels_last_dim-1", "channels_last_3d", "permuted", "transposed",
           "transposed_2d", "sliced_channels", "sliced_last", "sliced_last_dim-1", "expanded"]


@pytest.mark.parametrize("name", LAYOUTS)
def test_layouts_match_reference(name, launches):
    """channels_last, permuted/transposed views, slices and broadcasts give the reference's
    numbers; a dense input's layout is kept in y and dx."""
    x, dim, dense = _layout(name)
    assert not x.is_contiguous()  # the cases test something beyond the plain layout
    b = randn(x.shape[dim], seed=18)
    y, dx, _ = _assert_both_match(x, b, dim, dict(act="lrelu", clamp=1.5), launches)
    if dense:
        assert y.stride() == x.stride()
        assert dx.stride() == x.stride()


def test_channels_last_in_channels_last_out(launches):
    """The memory format of the output follows the input's."""
    x = randn(2, 4, 3, 5, seed=19).to(memory_format=torch.channels_last)
    y = fastgan.bias_act(x, randn(4, seed=20), 1, "lrelu")
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert not y.is_contiguous()
    y = fastgan.bias_act(x.contiguous(), randn(4, seed=20), 1, "lrelu")
    assert y.is_contiguous()
    assert launches()["bias_act_fwd"] == 2


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_several_tiles_and_bias_partials(channels_last, launches):
    """Tensors larger than one tile (11664 elements > 4096) sum bias partials of several
    programs; both the row-channel and column-channel kernels are covered."""
    x = randn(2, 8, 27, 27, seed=21)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    _assert_both_match(x, randn(8, seed=22), 1, dict(act="lrelu"), launches)
    x32 = x.float()
    _assert_both_match(x32, randn(8, seed=22, dtype=torch.float32), 1, dict(act="relu"),
                       launches)


STRIDED_BIASES = {  # a bias of C values viewed, with strides != (1,), from a leaf ``base``
    "step2": (lambda c: (2 * c,), lambda base: base[::2]),
    "column": (lambda c: (c, 3), lambda base: base[:, 0]),
    "expanded": (lambda c: (1,), lambda base: base.expand(base.shape[0] * 5)),
}


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("name", list(STRIDED_BIASES))
def test_strided_bias_matches_reference(name, layout, launches):
    """A bias with any strides (a slice, a matrix column, an expanded scalar) gives the
    reference's y and gradients, with channels as rows or as columns of the kernels."""
    x = randn(2, 5, 3, 4, seed=64)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    base_shape, view = STRIDED_BIASES[name]
    base = randn(*base_shape(5), seed=65)
    dy = randn(*x.shape, seed=66)
    results = []
    for fn in (fastgan.bias_act, reference.bias_act):
        xl, bl = leaf(x), leaf(base)
        b = view(bl)
        assert b.shape == (5,) and b.stride() != (1,)
        y = fn(xl, b, 1, "lrelu", clamp=1.5)
        results.append((y, *torch.autograd.grad(y, (xl, bl), dy)))
    for got, want in zip(*results):
        assert_matches(got, want)
    counts = launches()
    assert counts["bias_act_fwd"] == 1 and counts["bias_act_grad"] == 1, counts


@pytest.mark.parametrize("name", ["expanded", "transposed", "step2"])
def test_strided_upstream_gradient_matches_reference(name, launches):
    """The upstream gradient reaching the Functions may have any strides: an expanded one
    (``y.sum().backward()``), a transposed one, a slice."""
    x, b = randn(3, 4, 5, seed=65), randn(4, seed=66)
    if name == "expanded":
        dy = randn(1, 1, 5, seed=67).expand(3, 4, 5)
    elif name == "transposed":
        dy = randn(5, 4, 3, seed=67).permute(2, 1, 0)
    else:
        dy = randn(3, 4, 10, seed=67)[..., ::2]
    results = []
    for fn in (fastgan.bias_act, reference.bias_act):
        xl, bl = leaf(x), leaf(b)
        results.append(torch.autograd.grad(fn(xl, bl, 1, "lrelu"), (xl, bl), dy))
    for got, want in zip(*results):
        assert_matches(got, want)
    assert launches()["bias_act_grad"] == 1


# --- empty tensors, NaN and Inf ---------------------------------------------------------------

@pytest.mark.parametrize("shape,dim", [((0, 5, 3, 3), 1), ((2, 0, 3, 3), 1), ((0,), 0),
                                       ((3, 4, 0), 1)], ids=["batch0", "chan0", "rank1", "inner0"])
def test_empty_tensors(shape, dim):
    """Empty inputs give empty outputs of the same shape, and a zero (or empty) bias grad."""
    x = randn(*shape, seed=23)
    b = randn(shape[dim], seed=24)
    (y, dx, db), (y_ref, dx_ref, db_ref) = _both(x, b, dim, dict(act="lrelu"))
    assert y.shape == x.shape and dx.shape == x.shape and db.shape == (shape[dim],)
    assert_matches(y, y_ref)
    assert_matches(dx, dx_ref)
    assert_matches(db, db_ref)
    assert (db == 0).all()


def _with_nonfinite(dtype=torch.float64):
    """A [2, 4, 3] input with NaN, +Inf and -Inf in several channels, and a NaN bias entry."""
    x = randn(2, 4, 3, seed=25, dtype=dtype)
    x[0, 0, 0] = float("nan")
    x[0, 1, 1] = float("inf")
    x[1, 1, 2] = -float("inf")
    x[1, 2, 0] = float("inf")
    x[1, 0, 1] = -float("inf")
    b = randn(4, seed=26, dtype=dtype)
    b[3] = float("nan")
    return x, b


@pytest.mark.parametrize("cfg", ACT_CONFIGS, ids=_cfg_id)
def test_nan_and_inf_propagate_like_reference(cfg, launches):
    """NaN and Inf in x and b: y, dx and db have NaN/Inf exactly where the reference has them."""
    x, b = _with_nonfinite()
    (y, dx, db), (y_ref, dx_ref, db_ref) = _both(x, b, 1, cfg)
    assert y_ref.isnan().any()  # the comparison below is not vacuous
    for actual, expected in ((y, y_ref), (dx, dx_ref), (db, db_ref)):
        assert_matches(actual, expected)
        assert torch.equal(actual.isinf(), expected.isinf())
    assert launches().get("bias_act_grad", 0) == (0 if _unit_slope(cfg) else 1)


@pytest.mark.parametrize("cfg", [dict(act="relu"), dict(act="linear", clamp=0.5),
                                 dict(act="lrelu", clamp=0.5), dict(act="lrelu", alpha=0.0)],
                         ids=_cfg_id)
# Expected with alpha 0: activation_grad evaluates both branches of tl.where, and the
# interpreter's numpy warns on the Inf * 0 of ``g * alpha``. Where y < 0 that NaN is the
# result (the reference gives NaN too); where y > 0 it is discarded. A GPU computes it silently.
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")
def test_nonfinite_upstream_gradient_like_reference(cfg, launches):
    """An Inf or NaN ``dy`` where the slope is zero (relu off, clamped) gives what autograd
    gives through the reference: exactly 0 for relu and clamp, NaN for ``0 * Inf``."""
    x = leaf(torch.tensor([-2.0, -1.0, 0.1, 3.0, -0.2, 0.3], dtype=torch.float64, device=DEVICE))
    dy = torch.tensor([float("inf"), float("nan"), float("inf"), float("nan"), 1.0, -float("inf")],
                      dtype=torch.float64, device=DEVICE)
    dx, = torch.autograd.grad(fastgan.bias_act(x, None, 0, **cfg), x, dy)
    dx_ref, = torch.autograd.grad(reference.bias_act(x, None, 0, **cfg), x, dy)
    assert_matches(dx, dx_ref)
    assert torch.equal(dx.isinf(), dx_ref.isinf())
    assert launches()["bias_act_grad"] == 1


# --- higher orders -----------------------------------------------------------------------------

GRADCHECK_CONFIGS = [dict(act="linear", gain=0.7), dict(act="relu"), dict(act="lrelu"),
                     dict(act="lrelu", alpha=0.3, gain=1.3, clamp=0.9)]


@pytest.mark.parametrize("cfg", GRADCHECK_CONFIGS, ids=_cfg_id)
def test_gradcheck_and_gradgradcheck(cfg, launches):
    """Analytical first and second derivatives equal finite differences (float64)."""
    x = leaf(randn(2, 3, 4, seed=27))
    b = leaf(randn(3, seed=28))

    def fn(x, b):
        return fastgan.bias_act(x, b, 1, **cfg)

    assert torch.autograd.gradcheck(fn, (x, b))
    assert torch.autograd.gradgradcheck(fn, (x, b))
    # gradcheck decides how many calls it makes; what must hold is that only the kernels ran
    assert set(launches()) == {"bias_act_fwd", "bias_act_grad"}


def test_gradcheck_channels_last_last_dim(launches):
    """gradcheck with a channels_last input and the bias along the last dim."""
    x = leaf(randn(2, 3, 2, 3, seed=29).to(memory_format=torch.channels_last))
    b = leaf(randn(3, seed=30))

    def fn(x, b):
        return fastgan.bias_act(x, b, -1, "lrelu", clamp=1.0)

    assert torch.autograd.gradcheck(fn, (x, b))
    assert torch.autograd.gradgradcheck(fn, (x, b))
    assert set(launches()) == {"bias_act_fwd", "bias_act_grad"}


@pytest.mark.parametrize("cfg", GRADCHECK_CONFIGS, ids=_cfg_id)
def test_third_order_matches_reference(cfg, launches):
    """Three nested autograd.grad of ``sum(w * bias_act(x, b) ** 3)`` equal the reference's."""
    x = leaf(randn(3, 4, 5, seed=31))
    b = leaf(randn(4, seed=32))
    fused = nested_grads(lambda x, b: fastgan.bias_act(x, b, 1, **cfg), (x, b), 3)
    ref = nested_grads(lambda x, b: reference.bias_act(x, b, 1, **cfg), (x, b), 3)
    for order, (got, want) in enumerate(zip(fused, ref), 1):
        for g, r in zip(got, want):
            assert_matches(g, r)
    assert fused[2][0].abs().sum() > 0  # third derivative is not trivially zero
    counts = launches()
    assert counts == {"bias_act_fwd": 1, "bias_act_grad": 5}, counts


# --- determinism and skipped bias gradients -----------------------------------------------------

@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_bias_gradient_is_deterministic(channels_last, launches):
    """Two runs of the bias gradient on the same input are bitwise equal."""
    x = randn(4, 8, 21, 21, dtype=torch.float32, seed=33)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    b = randn(8, dtype=torch.float32, seed=34)
    dy = randn(4, 8, 21, 21, dtype=torch.float32, seed=35)
    runs = []
    for _ in range(2):
        bl = leaf(b)
        db, = torch.autograd.grad(fastgan.bias_act(x, bl, 1, "lrelu"), bl, dy)
        runs.append(db)
    assert torch.equal(runs[0], runs[1])
    assert launches()["bias_act_grad"] == 2


@pytest.fixture
def need_db_calls(monkeypatch):
    """Records the ``need_db`` argument of every launch of the gradient kernel."""
    calls = []
    original = bias_act_module.bias_act_grad

    def recording(dy, y, dim, spec, need_db, scale=1.0):
        calls.append(need_db)
        return original(dy, y, dim, spec, need_db, scale)

    monkeypatch.setattr(bias_act_module, "bias_act_grad", recording)
    return calls


def test_inner_r1_pass_skips_bias_gradient(need_db_calls, launches):
    """``autograd.grad(y.sum(), x, create_graph=True)`` never uses db, so the kernel runs with
    NEED_DB False although b requires grad; dx is still right."""
    x, b = leaf(randn(2, 3, 4, 4, seed=36)), leaf(randn(3, seed=37))
    dx, = torch.autograd.grad(fastgan.bias_act(x, b, 1, "lrelu").sum(), x, create_graph=True)
    assert need_db_calls == [False]
    dx_ref, = torch.autograd.grad(reference.bias_act(x, b, 1, "lrelu").sum(), x)
    assert_matches(dx, dx_ref)
    assert launches()["bias_act_grad"] == 1


def test_backward_computes_bias_gradient(need_db_calls, launches):
    """A normal ``.backward()`` (and ``autograd.grad`` w.r.t. b) asks for db."""
    x, b = leaf(randn(2, 3, 4, 4, seed=38)), leaf(randn(3, seed=39))
    fastgan.bias_act(x, b, 1, "lrelu").sum().backward()
    assert need_db_calls == [True]
    assert b.grad is not None
    torch.autograd.grad(fastgan.bias_act(x, b, 1, "lrelu").sum(), b)
    assert need_db_calls == [True, True]
    assert launches()["bias_act_grad"] == 2


def test_no_weight_gradients_skips_bias_gradient(need_db_calls, launches):
    """Under ``fastgan.no_weight_gradients()`` backward leaves ``b.grad`` None."""
    x, b = leaf(randn(2, 3, 4, 4, seed=40)), leaf(randn(3, seed=41))
    with fastgan.no_weight_gradients():
        fastgan.bias_act(x, b, 1, "lrelu").sum().backward()
    assert need_db_calls == [False]
    assert b.grad is None and x.grad is not None
    with fastgan.no_weight_gradients(False):  # disable=False is a no-op
        fastgan.bias_act(x, b, 1, "lrelu").sum().backward()
    assert need_db_calls == [False, True]
    assert launches()["bias_act_grad"] == 2


def test_without_private_engine_api_bias_gradient_is_computed(need_db_calls, monkeypatch,
                                                              launches):
    """If torch drops ``_will_engine_execute_node``, the op stays correct: it computes db."""
    monkeypatch.delattr(torch._C, "_will_engine_execute_node")
    x, b = leaf(randn(2, 3, 4, seed=45)), leaf(randn(3, seed=46))
    dx, = torch.autograd.grad(fastgan.bias_act(x, b, 1, "lrelu").sum(), x, create_graph=True)
    assert need_db_calls == [True]
    dx_ref, = torch.autograd.grad(reference.bias_act(x, b, 1, "lrelu").sum(), x)
    assert_matches(dx, dx_ref)
    assert launches()["bias_act_grad"] == 1


def test_no_weight_gradients_nests():
    """An inner ``no_weight_gradients(False)`` does not re-enable weight gradients."""
    from fastgan.grad_control import weight_gradients_disabled

    assert not weight_gradients_disabled()
    with fastgan.no_weight_gradients():
        with fastgan.no_weight_gradients(False):
            assert weight_gradients_disabled()
        assert weight_gradients_disabled()
    assert not weight_gradients_disabled()


def test_bias_without_grad_skips_bias_gradient(need_db_calls, launches):
    """A bias that does not require grad is never reduced."""
    x = leaf(randn(2, 3, 4, seed=42))
    fastgan.bias_act(x, randn(3, seed=43), 1, "relu").sum().backward()
    assert need_db_calls == [False]
    assert launches()["bias_act_grad"] == 1


# --- bad input ------------------------------------------------------------------------------------

def _x():
    return randn(2, 3, 4, seed=44)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: fastgan.bias_act(_x(), randn(4), 1), ValueError,
     r"b must be .*length x\.shape\[1\] = 3"),
    (lambda: fastgan.bias_act(_x(), randn(3, 1), 1), ValueError, r"b must be a 1-d tensor"),
    (lambda: fastgan.bias_act(_x(), randn(3), 3), IndexError, r"dim=3 is out of range"),
    (lambda: fastgan.bias_act(_x(), randn(2), -4), IndexError, r"dim=-4 is out of range"),
    (lambda: fastgan.bias_act(_x(), randn(3), 1.0), TypeError, r"dim must be an int"),
    (lambda: fastgan.bias_act(torch.ones(2, 3, dtype=torch.int32, device=DEVICE), None, 1),
     TypeError, r"x must be float16, bfloat16, float32 or float64, got torch\.int32"),
    (lambda: fastgan.bias_act(torch.ones(2, 3, dtype=torch.bool, device=DEVICE), None, 1),
     TypeError, r"x must be .*torch\.bool"),
    (lambda: fastgan.bias_act(_x(), torch.ones(3, dtype=torch.int64, device=DEVICE), 1),
     TypeError, r"b must be .*torch\.int64"),
    (lambda: fastgan.bias_act(_x(), torch.ones(3, dtype=torch.bool, device=DEVICE), 1),
     TypeError, r"b must be .*torch\.bool"),
    (lambda: fastgan.bias_act(_x().tolist(), None, 1), TypeError, r"x must be a torch\.Tensor"),
    (lambda: fastgan.bias_act(_x(), randn(3), 1, act="gelu"), ValueError, r"act must be one of"),
    (lambda: fastgan.bias_act(_x(), randn(3, dtype=torch.float32), 1), TypeError,
     r"b has dtype torch\.float32 but x has torch\.float64"),
    (lambda: fastgan.bias_act(_x(), None, 1, clamp=-1.0), ValueError, r"clamp must be None or"),
    (lambda: fastgan.bias_act(_x(), None, 1, clamp=float("nan")), ValueError, r"clamp must"),
    (lambda: fastgan.bias_act(_x(), None, 1, act="lrelu", alpha=-0.2), ValueError,
     r"alpha must be a finite number >= 0"),
    (lambda: fastgan.bias_act(_x(), None, 1, gain=float("inf")), ValueError, r"gain must be"),
    (lambda: fastgan.bias_act(torch.tensor(1.0, device=DEVICE), None, 0), ValueError,
     r"x must have at least one dimension"),
], ids=["b-length", "b-rank", "dim-high", "dim-low", "dim-float", "x-int", "x-bool", "b-int",
        "b-bool", "x-list", "act", "dtypes", "clamp-neg", "clamp-nan", "alpha-neg", "gain-inf",
        "x-0d"])
def test_bad_input_names_the_argument(call, exc, match):
    """Each bad argument raises an exception whose message names it and what was expected."""
    with pytest.raises(exc, match=match):
        call()


def test_no_weight_gradients_holds_on_the_thread_that_runs_the_backward(need_db_calls,
                                                                         launches):
    """Autograd runs CUDA backward passes on its own device threads: the context entered by
    the caller must hold there. Here the backward runs on a plain other thread."""
    import threading

    x, b = leaf(randn(2, 3, 4, seed=47)), leaf(randn(3, seed=48))
    y = fastgan.bias_act(x, b, 1, "lrelu")
    errors = []

    def backward():
        try:
            y.sum().backward()
        except Exception as e:  # reported below
            errors.append(e)

    with fastgan.no_weight_gradients():
        worker = threading.Thread(target=backward)
        worker.start()
        worker.join()
    assert errors == []
    assert need_db_calls == [False]
    assert b.grad is None and x.grad is not None
    assert launches()["bias_act_grad"] == 1


@pytest.mark.parametrize("cfg", [dict(act="lrelu"), dict(act="relu", clamp=0.8)], ids=_cfg_id)
def test_input_scale_matches_reference(cfg, launches):
    """``scale`` multiplies x before the bias (an equalized-lr weight gain): values and the
    first three derivatives equal the reference's."""
    x, b = leaf(randn(2, 3, 4, seed=50)), leaf(randn(3, seed=51))
    fused = nested_grads(lambda x, b: fastgan.bias_act(x, b, 1, **cfg, scale=0.3), (x, b), 3)
    ref = nested_grads(lambda x, b: reference.bias_act(x, b, 1, **cfg, scale=0.3), (x, b), 3)
    for got, want in zip(fused, ref):
        for g, r in zip(got, want):
            assert_matches(g, r)
    counts = launches()
    assert counts["bias_act_fwd"] == 1


@pytest.mark.parametrize("scale,exc", [(float("nan"), ValueError), ("2", TypeError),
                                       (True, TypeError)])
def test_bad_scale_names_the_argument(scale, exc):
    with pytest.raises(exc, match="scale must be"):
        fastgan.bias_act(_x(), None, 1, scale=scale)


def test_activation_arguments_that_are_not_numbers_are_named():
    """Unhashable or non-numeric alpha, gain, clamp: a TypeError naming the argument."""
    for kwargs, name in ((dict(alpha=[0.1]), "alpha"), (dict(gain="big"), "gain"),
                         (dict(clamp={}), "clamp")):
        with pytest.raises(TypeError, match=f"{name} must be a number"):
            fastgan.bias_act(_x(), None, 1, "lrelu", **kwargs)
