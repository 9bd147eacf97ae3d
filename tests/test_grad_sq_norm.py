"""fastgan.grad_sq_norm (Triton kernels) against fastgan.reference.grad_sq_norm.

Forward runs ``per_sample_dot``; every derivative runs ``scale_per_sample`` and
``per_sample_dot`` again. Each test asserts that those kernels ran.
"""
import pytest
import torch

import fastgan
from fastgan import reference
from op_helpers import DEVICE, assert_matches, leaf, nested_grads, randn


def _both(g, seed=50):
    """``(norm, dg)`` of the fused op and of the reference, with the same upstream gradient."""
    results = []
    for fn in (fastgan.grad_sq_norm, reference.grad_sq_norm):
        gl = leaf(g)
        out = fn(gl)
        dout = randn(*out.shape, dtype=out.dtype, seed=seed)
        dg, = torch.autograd.grad(out, gl, dout)
        results.append((out.detach(), dg))
    return results


def _assert_both_match(g, launches, dtype=None):
    (out, dg), (out_ref, dg_ref) = _both(g)
    assert_matches(out, out_ref, dtype)
    assert_matches(dg, dg_ref, dtype)
    counts = launches()
    assert counts.get("per_sample_dot", 0) > 0 and counts.get("scale_per_sample", 0) > 0, counts
    return out, dg


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (4,), (4, 6), (2, 3, 4, 3, 2), (1, 1),
                                   (3, 2500)])
def test_matches_reference(shape, dtype, launches):
    """Values and gradient for ranks 1-5, odd sizes and samples of several chunks (2500)."""
    g = randn(*shape, dtype=dtype, seed=51)
    out, _ = _assert_both_match(g, launches)
    assert out.shape == (shape[0],)
    assert out.dtype == dtype  # float32 and float64 accumulate and return in their own dtype


def test_hand_computed(launches):
    """[[1, 2], [3, -4]] -> [5, 25]; d/dg = 2 g."""
    g = leaf(torch.tensor([[1.0, 2.0], [3.0, -4.0]], dtype=torch.float64, device=DEVICE))
    out = fastgan.grad_sq_norm(g)
    assert out.tolist() == [5.0, 25.0]
    dg, = torch.autograd.grad(out.sum(), g)
    assert dg.tolist() == [[2.0, 4.0], [6.0, -8.0]]
    assert launches() == {"per_sample_dot": 1, "scale_per_sample": 1}


def _layout(name):
    base = randn(4, 6, 5, 3, seed=52)
    return {
        "channels_last": lambda: base.to(memory_format=torch.channels_last),
        "batch_inner": lambda: randn(6, 4, seed=53).t(),  # batch is the fastest dim in memory
        "transposed": lambda: base.transpose(1, 3),
        "permuted_batch": lambda: randn(5, 4, 6, seed=54).permute(1, 0, 2),
        "sliced": lambda: base[:, ::2],
        "sliced_last": lambda: base[..., 1:],
        "sliced_batch": lambda: base[1::2],
        "expanded": lambda: randn(4, 1, 5, 3, seed=55).expand(4, 6, 5, 3),
    }[name]()


@pytest.mark.parametrize("name", ["channels_last", "batch_inner", "transposed", "permuted_batch",
                                  "sliced", "sliced_last", "sliced_batch", "expanded"])
def test_layouts_match_reference(name, launches):
    """Any strides give the reference's numbers; the gradient has the input's shape."""
    g = _layout(name)
    assert not g.is_contiguous()
    _, dg = _assert_both_match(g, launches)
    assert dg.shape == g.shape


@pytest.mark.parametrize("shape", [(0, 3, 4), (3, 0, 4), (0,)], ids=["batch0", "chan0", "rank1"])
def test_empty_tensors(shape):
    """No samples -> shape [0]; empty samples -> zeros; the gradient is empty like g."""
    g = randn(*shape, seed=56)
    (out, dg), (out_ref, dg_ref) = _both(g)
    assert out.shape == (shape[0],) and dg.shape == g.shape
    assert (out == 0).all()
    assert_matches(out, out_ref)
    assert_matches(dg, dg_ref)


def test_nan_and_inf_propagate_like_reference(launches):
    """A NaN or Inf in a sample makes that sample's norm NaN or Inf, and nothing else."""
    g = randn(4, 3, 5, seed=57)
    g[1, 0, 2] = float("nan")
    g[2, 2, 4] = float("inf")
    g[3, 1, 1] = -float("inf")
    (out, dg), (out_ref, dg_ref) = _both(g)
    assert out.isnan().tolist() == [False, True, False, False]
    assert out.isinf().tolist() == [False, False, True, True]
    for actual, expected in ((out, out_ref), (dg, dg_ref)):
        assert_matches(actual, expected)
        assert torch.equal(actual.isinf(), expected.isinf())
    assert launches()["per_sample_dot"] == 1


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_gradcheck_and_gradgradcheck(channels_last, launches):
    """Analytical first and second derivatives equal finite differences (float64)."""
    g = randn(2, 3, 2, 3, seed=58)
    if channels_last:
        g = g.to(memory_format=torch.channels_last)
    g = leaf(g)
    assert torch.autograd.gradcheck(fastgan.grad_sq_norm, (g,))
    assert torch.autograd.gradgradcheck(fastgan.grad_sq_norm, (g,))
    # gradcheck decides how many calls it makes; what must hold is that only the kernels ran
    assert set(launches()) == {"per_sample_dot", "scale_per_sample"}


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_third_order_matches_reference(channels_last, launches):
    """Three nested autograd.grad of ``sum(w * grad_sq_norm(g) ** 3)`` equal the reference's
    (the double backward mixes the layouts of g and of the incoming gradients)."""
    g = randn(3, 4, 2, 3, seed=59)
    if channels_last:
        g = g.to(memory_format=torch.channels_last)
    g = leaf(g)
    fused = nested_grads(fastgan.grad_sq_norm, (g,), 3)
    ref = nested_grads(reference.grad_sq_norm, (g,), 3)
    for got, want in zip(fused, ref):
        assert_matches(got[0], want[0])
    assert fused[2][0].abs().sum() > 0
    counts = launches()
    assert counts == {"per_sample_dot": 4, "scale_per_sample": 6}, counts


def test_backward_is_differentiable_in_the_upstream_gradient(launches):
    """The gradient w.r.t. ``dout`` (used when the norm's weight is itself learned) matches."""
    g = leaf(randn(3, 7, seed=60))
    dout = leaf(randn(3, seed=61))
    results = []
    for fn in (fastgan.grad_sq_norm, reference.grad_sq_norm):
        dg, = torch.autograd.grad(fn(g), g, dout, create_graph=True)
        results.append(torch.autograd.grad((dg ** 2).sum(), (g, dout)))
    for got, want in zip(*results):
        assert_matches(got, want)
    assert launches() == {"per_sample_dot": 2, "scale_per_sample": 2}


def test_deterministic(launches):
    """Two runs of the norm and its gradient on a multi-chunk input are bitwise equal."""
    g = randn(3, 40000, dtype=torch.float32, seed=62)
    runs = [_both(g)[0] for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    assert torch.equal(runs[0][1], runs[1][1])
    assert launches()["per_sample_dot"] == 2


@pytest.mark.parametrize("call,exc,match", [
    (lambda: fastgan.grad_sq_norm(torch.ones(2, 3, dtype=torch.int32, device=DEVICE)),
     TypeError, r"g must be float16, bfloat16, float32 or float64, got torch\.int32"),
    (lambda: fastgan.grad_sq_norm(torch.ones(2, 3, dtype=torch.bool, device=DEVICE)),
     TypeError, r"g must be .*torch\.bool"),
    (lambda: fastgan.grad_sq_norm(torch.tensor(2.0, device=DEVICE)), ValueError,
     r"g must have a batch dimension"),
    (lambda: fastgan.grad_sq_norm([[1.0, 2.0]]), TypeError, r"g must be a torch\.Tensor"),
], ids=["int", "bool", "0d", "list"])
def test_bad_input_names_the_argument(call, exc, match):
    """Bad input raises an exception naming ``g`` and what was expected."""
    with pytest.raises(exc, match=match):
        call()
