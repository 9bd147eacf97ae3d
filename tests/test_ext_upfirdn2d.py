"""upfirdn2d through the compiled extension's CPU kernel (``torch.ops.fastgan.upfirdn2d``)
against fastgan.reference.

The raw op: every configuration of tests/test_upfirdn2d.py and more, float64 to 1e-10,
float32 to 1e-5, 16-bit within one rounding of the float32 reference, output strides, fake
kernels, bit-identical results for 1 and 2 threads, argument errors. The public op with the
backend forced to ``ext``: the same autograd Function as the Triton kernel's (docs/design.md
section 4), so gradcheck, gradgradcheck and third-order checks run through the extension; the
launch counters show that it ran (``ext_upfirdn2d``) and nothing else did.
"""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastgan
from fastgan import reference
from fastgan.ops.layout import memory_format
from op_helpers import assert_matches, leaf, nested_grads, randn
from test_ext import ULP, assert_same_for_any_threads, require_ext
from test_upfirdn2d import CASES, GRAD_CASES, case_id, make_filter, make_x, random_cases

F64, F32 = torch.float64, torch.float32
EXT_CASES = CASES + random_cases(60, seed=21)


@pytest.fixture(scope="module")
def ops():
    return require_ext()


@pytest.fixture
def ext_backend(_default_backend):
    require_ext()
    fastgan.set_backend("ext")


def raw(ops, x, f, up, down, padding, flip, gain):
    """``torch.ops.fastgan.upfirdn2d`` with fastgan.upfirdn2d's arguments."""
    geom = reference.resampling(up, down, padding)
    return ops.upfirdn2d(x, f, *geom.up, *geom.down, *geom.padding, flip, float(gain))


def test_raw_op_matches_reference(ops):
    """Every configuration, and the same x channels_last and contiguous: the reference's
    values, in x's memory format."""
    for shape, layout, dtype, kind, *args in EXT_CASES:
        f = make_filter(kind, device="cpu")
        for x in (make_x(shape, layout, dtype, device="cpu"),
                  make_x(shape, "channels_last", dtype, device="cpu"),
                  make_x(shape, "contiguous", dtype, device="cpu")):
            y = raw(ops, x, f, *args)
            assert_matches(y, reference.upfirdn2d(x, f, *args))
            assert y.stride() == torch.empty(y.shape, memory_format=memory_format(x)).stride()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_raw_op_16_bit(ops, dtype):
    """16-bit tensors, computed in float32: within one rounding of the float32 reference."""
    for shape, layout, _, kind, *args in CASES:
        f = make_filter(kind, device="cpu")
        x = make_x(shape, layout, F32, device="cpu").to(dtype)
        y = raw(ops, x, f, *args)
        assert y.dtype == dtype
        expected = reference.upfirdn2d(x.float(), f, *args)
        torch.testing.assert_close(y.float(), expected.to(dtype).float(),
                                   rtol=ULP[dtype], atol=1e-5)


def test_raw_op_deterministic_across_threads(ops):
    """Bitwise the same run to run and for 1 or 2 threads, work items split over threads."""
    f = fastgan.setup_filter([1, 3, 3, 1])
    x = randn(4, 16, 33, 65, dtype=F32, seed=3, device="cpu")
    inputs = [x, x.contiguous(memory_format=torch.channels_last)]

    def results():
        return [raw(ops, t, f, *args) for t in inputs
                for args in ((1, 1, 2, False, 1), (2, 1, (2, 1), False, 4), (1, 2, 1, False, 1))]

    assert_same_for_any_threads(results)


def test_fake_kernel(ops):
    """Under FakeTensorMode and on meta tensors the op gives the real op's shape, dtype and
    strides."""
    for shape, layout, dtype, kind, *args in CASES:
        x, f = make_x(shape, layout, dtype, device="cpu"), make_filter(kind, device="cpu")
        real = raw(ops, x, f, *args)
        with FakeTensorMode() as mode:
            fake = raw(ops, mode.from_tensor(x), None if f is None else mode.from_tensor(f),
                       *args)
        meta = raw(ops, torch.empty_strided(x.shape, x.stride(), dtype=dtype, device="meta"),
                   None if f is None else f.to("meta"), *args)
        for t in (fake, meta):
            assert (t.shape, t.dtype, t.stride()) == (real.shape, real.dtype, real.stride())
        assert meta.device.type == "meta"


def test_raw_op_bad_arguments(ops):
    x, f = torch.ones(1, 2, 5, 5), torch.ones(3, 3)
    geom = (1, 1, 1, 1, 0, 0, 0, 0, False, 1.0)
    bad = [
        (TypeError, "x must be float16", lambda: ops.upfirdn2d(x.long(), f, *geom)),
        (ValueError, "x must be 4-d", lambda: ops.upfirdn2d(x[0], f, *geom)),
        (TypeError, "f must be float32", lambda: ops.upfirdn2d(x, f.double(), *geom)),
        (ValueError, "f must be a non-empty 1-d", lambda: ops.upfirdn2d(x, f[None], *geom)),
        (ValueError, "f is on meta", lambda: ops.upfirdn2d(x, f.to("meta"), *geom)),
        (ValueError, "up must be >= 1",
         lambda: ops.upfirdn2d(x, f, 0, 1, 1, 1, 0, 0, 0, 0, False, 1.0)),
        (ValueError, "down must be >= 1",
         lambda: ops.upfirdn2d(x, f, 1, 1, 1, 0, 0, 0, 0, 0, False, 1.0)),
        (ValueError, "gain must be a finite number",
         lambda: ops.upfirdn2d(x, f, 1, 1, 1, 1, 0, 0, 0, 0, False, float("inf"))),
        (ValueError, "along y leaves 2 pixels",
         lambda: ops.upfirdn2d(x, f, 1, 1, 1, 1, 0, 0, -1, -2, False, 1.0)),
    ]
    for error, message, call in bad:
        with pytest.raises(error, match=message):
            call()


# --- the public op with the backend forced to 'ext' ----------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_public_op_runs_the_extension(case, ext_backend, launches):
    """y and dx of fastgan.upfirdn2d equal the reference's, from one extension call each."""
    shape, layout, dtype, kind, *args = case
    x, f = make_x(shape, layout, dtype, device="cpu"), make_filter(kind, device="cpu")
    results = []
    for fn in (fastgan.upfirdn2d, reference.upfirdn2d):
        xl = leaf(x)
        y = fn(xl, f, *args)
        dy = randn(*y.shape, dtype=dtype, seed=7, device="cpu")
        results.append((y.detach(), *torch.autograd.grad(y, xl, dy)))
    for got, want in zip(*results):
        assert_matches(got, want)
    assert launches() == {"ext_upfirdn2d": 2}


def test_public_op_empty_batch(ext_backend, launches):
    x = leaf(torch.zeros(0, 3, 5, 4, dtype=F64))
    y = fastgan.upfirdn2d(x, fastgan.setup_filter([1, 3, 3, 1]), down=2, padding=1)
    assert y.shape == (0, 3, 2, 2)
    assert torch.autograd.grad(y, x, torch.ones_like(y))[0].shape == x.shape
    assert launches() == {}


@pytest.mark.parametrize("case", GRAD_CASES, ids=[case_id(c) for c in GRAD_CASES])
def test_gradcheck_gradgradcheck_and_third_order(case, ext_backend, launches):
    shape, layout, dtype, kind, *args = case
    x, f = leaf(make_x(shape, layout, dtype, device="cpu")), make_filter(kind, device="cpu")
    assert torch.autograd.gradcheck(lambda x: fastgan.upfirdn2d(x, f, *args), (x,))
    assert torch.autograd.gradgradcheck(lambda x: fastgan.upfirdn2d(x, f, *args), (x,))
    fused = nested_grads(lambda x: fastgan.upfirdn2d(x, f, *args), (x,), 3)
    ref = nested_grads(lambda x: reference.upfirdn2d(x, f, *args), (x,), 3)
    for got, want in zip(fused, ref):
        assert_matches(got[0], want[0])
    assert set(launches()) == {"ext_upfirdn2d"}
