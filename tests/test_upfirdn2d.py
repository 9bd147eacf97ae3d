"""fastgan.upfirdn2d (the Triton kernel) against fastgan.reference.upfirdn2d, the reference
against a direct definition, the gradient rule, StyleGAN2-ADA's helpers and the argument checks.

Every test that runs the op asserts, through the ``launches`` fixture, exactly how many times
the Triton kernel ran: without that, a silent fallback to the reference would pass every
comparison.
"""
import random

import pytest
import torch

import fastgan
from fastgan import reference
from fastgan.ops import launch
from fastgan.ops import upfirdn2d as upfirdn2d_module
from fastgan.ops.layout import memory_format
from op_helpers import DEVICE, assert_matches, leaf, nested_grads, randn
from test_ext import ULP

F64, F32 = torch.float64, torch.float32


def make_filter(kind, seed=0, device=DEVICE):
    """None, a 1-d (separable) filter ``(k,)`` or a 2-d one ``(fh, fw)``, float32."""
    if kind is None:
        return None
    return randn(*kind, dtype=F32, seed=seed, device=device)


def make_x(shape, layout, dtype, seed=1, device=DEVICE):
    """``x`` of ``shape`` as a contiguous tensor, channels_last, a channel slice or a
    transposed view."""
    n, c, h, w = shape
    if layout == "sliced":
        return randn(n, 2 * c, h, w + 1, dtype=dtype, seed=seed, device=device)[:, ::2, :, 1:]
    if layout == "transposed":
        return randn(n, c, w, h, dtype=dtype, seed=seed, device=device).transpose(2, 3)
    x = randn(*shape, dtype=dtype, seed=seed, device=device)
    return x.to(memory_format=torch.channels_last) if layout == "channels_last" else x


# x shape, layout, dtype, filter, up, down, padding, flip_filter, gain
CASES = [
    ((2, 3, 7, 9), "contiguous", F64, (4, 4), 1, 1, 2, False, 1),           # SG2's blur
    ((2, 3, 9, 8), "channels_last", F64, (4, 4), 1, 2, 1, False, 1),        # SG2's downsample
    ((1, 4, 5, 6), "contiguous", F64, (4,), 2, 1, (2, 1), False, 4),        # upsample, 1-d
    ((1, 2, 3, 4), "transposed", F64, (5,), 4, 1, (3, 2, 1, 4), True, 1),   # up 4, odd taps
    ((1, 3, 4, 5), "contiguous", F64, (3, 2), (2, 1), (1, 2), (1, -1, 2, 0), True, -1.3),
    ((1, 2, 9, 9), "channels_last", F64, (5, 5), 1, 4, (-1, 2, 0, 3), False, 1),
    ((2, 3, 4, 3), "sliced", F64, None, (1, 4), (3, 1), (0, -2, 1, 1), False, 0.5),
    ((1, 2, 5, 4), "contiguous", F64, (2, 2), (3, 2), (2, 3), (-4, 1, -3, 2), True, 1),
    ((2, 5, 8, 7), "channels_last", F32, (3,), 2, 2, 1, False, 1),
    ((2, 8, 3, 3), "contiguous", F32, (3, 3), 1, 1, 1, True, 2),            # channels per tile
    ((1, 1, 9, 300), "contiguous", F32, (2, 3), 1, 1, 1, False, 1),         # tiles of pixels
    ((1, 200, 2, 3), "channels_last", F32, (2,), 2, 1, 0, False, 1),        # blocks of channels
]


def random_cases(count, seed):
    """Seeded random configurations: up/down 1, 2 or 4 per axis, padding -2..3 (the output is
    never empty), 1-d, 2-d (odd and even sizes) or no filter, odd image sizes, every layout."""
    rng = random.Random(seed)
    cases = []
    while len(cases) < count:
        up = (rng.choice([1, 2, 4]), rng.choice([1, 2, 4]))
        down = (rng.choice([1, 2, 4]), rng.choice([1, 2]))
        kind = rng.choice([None, (rng.randint(1, 5),), (rng.randint(1, 5), rng.randint(1, 4))])
        shape = (rng.randint(1, 2), rng.randint(1, 4), rng.randint(1, 7), rng.randint(1, 7))
        padding = tuple(rng.randint(-2, 3) for _ in range(4))
        taps = reference.filter_taps(None if kind is None else torch.empty(kind))
        if (shape[3] * up[0] + padding[0] + padding[1] < taps[1]
                or shape[2] * up[1] + padding[2] + padding[3] < taps[0]):
            continue
        cases.append((shape, rng.choice(["contiguous", "channels_last", "sliced", "transposed"]),
                      rng.choice([F64, F32]), kind, up, down, padding, rng.random() < 0.5,
                      round(rng.uniform(-2, 3), 3)))
    return cases


def case_id(case):
    shape, layout, dtype, kind, up, down, padding, flip, gain = case
    return (f"{'x'.join(map(str, shape))}-{layout}-{str(dtype)[6:]}-f{kind}-up{up}-down{down}-"
            f"pad{padding}-flip{int(flip)}-gain{gain}")


def both(case, seed=7):
    """``(y, dx)`` of fastgan.upfirdn2d and of the reference (autograd) for ``case``, with the
    same leaf (its strides kept) and the same random upstream gradient, in y's layout."""
    shape, layout, dtype, kind, up, down, padding, flip, gain = case
    x, f = make_x(shape, layout, dtype), make_filter(kind)
    results = []
    for fn in (fastgan.upfirdn2d, reference.upfirdn2d):
        xl = leaf(x)
        y = fn(xl, f, up, down, padding, flip, gain)
        dy = torch.empty_like(y).copy_(randn(*y.shape, dtype=dtype, seed=seed, device=y.device))
        results.append((y.detach(), *torch.autograd.grad(y, xl, dy)))
    return x, results


ALL_CASES = CASES + random_cases(10, seed=5)


@pytest.mark.parametrize("case", ALL_CASES, ids=[case_id(c) for c in ALL_CASES])
def test_matches_reference(case, launches):
    """y and dx equal the reference's (float64 to 1e-10), y in x's dtype and memory format
    (channels_last for a channels_last x that is not also contiguous), and dx in dy's, here
    y's; one kernel launch for the forward and one for the gradient."""
    x, ((y, dx), (y_ref, dx_ref)) = both(case)
    assert_matches(y, y_ref)
    assert_matches(dx, dx_ref)
    channels_last = case[1] == "channels_last" and not x.is_contiguous()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert memory_format(x) == fmt
    assert y.is_contiguous(memory_format=fmt) and dx.is_contiguous(memory_format=fmt)
    assert launches() == {"upfirdn2d": 2}


@pytest.mark.parametrize("shape", [(0, 3, 5, 4), (2, 0, 5, 4)])
def test_empty_batch_or_channels(shape, launches):
    """An empty batch (or no channels) gives an empty output of the right shape and an empty
    gradient, and launches nothing."""
    f = make_filter((4, 4))
    x = leaf(randn(*shape))
    y = fastgan.upfirdn2d(x, f, up=2, padding=(2, 1, 0, 3))
    assert y.shape == (*shape[:2], 5 * 2 + 0 + 3 - 4 + 1, 4 * 2 + 2 + 1 - 4 + 1)
    dx, = torch.autograd.grad(y, x, torch.ones_like(y))
    assert dx.shape == shape
    assert launches() == {}


GRAD_CASES = [
    ((1, 2, 3, 4), "contiguous", F64, (3, 2), (2, 1), (1, 2), (1, -1, 2, 0), True, 1.3),
    ((1, 2, 4, 3), "channels_last", F64, (4,), 1, 2, 1, False, 1),
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=[case_id(c) for c in GRAD_CASES])
def test_gradcheck_and_gradgradcheck(case, launches):
    shape, layout, dtype, kind, up, down, padding, flip, gain = case
    x, f = leaf(make_x(shape, layout, dtype)), make_filter(kind)

    def fn(x):
        return fastgan.upfirdn2d(x, f, up, down, padding, flip, gain)

    assert torch.autograd.gradcheck(fn, (x,), fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, (x,), fast_mode=True)
    assert set(launches()) == {"upfirdn2d"}


def test_third_order(launches):
    """Three nested autograd.grad of ``sum(w * upfirdn2d(x) ** 3)`` equal the reference's, all
    on the kernel: the forward, one launch for the first order (the forward's backward), two
    for each higher one (the previous gradient's backward, then the forward's again)."""
    x, f = leaf(randn(1, 2, 4, 5, seed=3)), make_filter((3,))
    args = ((2, 1), (1, 2), (2, 1, 1, 0), False, 1.5)
    fused = nested_grads(lambda x: fastgan.upfirdn2d(x, f, *args), (x,), 3)
    ref = nested_grads(lambda x: reference.upfirdn2d(x, f, *args), (x,), 3)
    for got, want in zip(fused, ref):
        assert_matches(got[0], want[0])
    assert fused[2][0].abs().sum() > 0
    assert launches() == {"upfirdn2d": 1 + 1 + 2 + 2}


# --- the reference and the gradient rule --------------------------------------------------------

def direct_upfirdn2d(x, f, up, down, padding, flip, gain):
    """upfirdn2d by its definition, one output pixel at a time: output (oy, ox) sums
    ``w[ky, kx] * g[oy * down_y + ky - pad_y0, ox * down_x + kx - pad_x0]``, where ``g`` is
    ``x`` with ``up - 1`` zeros after each pixel (zero outside) and ``w`` the filter (its
    outer product if 1-d) flipped unless ``flip``, times ``gain``."""
    (up_x, up_y), (down_x, down_y) = [(v, v) if isinstance(v, int) else v for v in (up, down)]
    px0, px1, py0, py1 = padding
    f = torch.ones(1, 1, dtype=F64) if f is None else f.to(F64)
    f = torch.outer(f, f) if f.ndim == 1 else f
    w = (f if flip else f.flip(0, 1)) * gain
    n, c, h, width = x.shape
    oh = (h * up_y + py0 + py1 - w.shape[0]) // down_y + 1
    ow = (width * up_x + px0 + px1 - w.shape[1]) // down_x + 1
    y = torch.zeros(n, c, oh, ow, dtype=F64)
    for oy in range(oh):
        for ox in range(ow):
            for ky in range(w.shape[0]):
                for kx in range(w.shape[1]):
                    u, v = oy * down_y + ky - py0, ox * down_x + kx - px0
                    if u % up_y or v % up_x or not (0 <= u < h * up_y and 0 <= v < width * up_x):
                        continue
                    y[:, :, oy, ox] += w[ky, kx] * x[:, :, u // up_y, v // up_x]
    return y


@pytest.mark.parametrize("case", random_cases(12, seed=11), ids=case_id)
def test_reference_follows_the_definition(case):
    shape, _, _, kind, up, down, padding, flip, gain = case
    x, f = randn(*shape, device="cpu"), make_filter(kind, device="cpu")
    expected = direct_upfirdn2d(x, f, up, down, padding, flip, gain)
    assert_matches(reference.upfirdn2d(x, f, up, down, padding, flip, gain), expected)


@pytest.mark.parametrize("case", random_cases(12, seed=12), ids=case_id)
def test_gradient_rule_is_autograd_of_the_reference(case):
    """The gradient is upfirdn2d of dy with the same filter, flip_filter negated, up and down
    swapped and padding ``taps - pad0 - 1`` / ``in * up - out * down + pad0 - up + 1`` per
    axis: the op's backward (``Resampling.transposed``) gives autograd's gradient of the
    reference, in x's shape."""
    shape, _, _, kind, up, down, padding, flip, gain = case
    x, f = leaf(randn(*shape, device="cpu")), make_filter(kind, device="cpu")
    y = reference.upfirdn2d(x, f, up, down, padding, flip, gain)
    dy = randn(*y.shape, seed=3, device="cpu")
    dx, = torch.autograd.grad(y, x, dy)
    geom = reference.resampling(up, down, padding)
    (up_x, up_y), (down_x, down_y), (px0, _, py0, _) = geom.up, geom.down, geom.padding
    fh, fw = reference.filter_taps(f)
    (h, w), (oh, ow) = shape[2:], y.shape[2:]
    rule = (fw - px0 - 1, w * up_x - ow * down_x + px0 - up_x + 1,
            fh - py0 - 1, h * up_y - oh * down_y + py0 - up_y + 1)
    assert geom.transposed((h, w), (oh, ow), (fh, fw)).padding == rule
    assert_matches(reference.upfirdn2d(dy, f, (down_x, down_y), (up_x, up_y), rule, not flip,
                                       gain), dx)


# --- StyleGAN2-ADA's helpers -------------------------------------------------------------------

HELPER_FILTERS = [None, (4,), (3, 5), (2, 2)]
HELPER_PADDINGS = [0, (1, 2), (1, -1, 2, 0)]


def sg2_padding(padding):
    """``(x0, x1, y0, y1)`` from an int, ``(x, y)`` or a 4-tuple."""
    if isinstance(padding, int):
        return [padding] * 4
    return [padding[0], padding[0], padding[1], padding[1]] if len(padding) == 2 else list(padding)


@pytest.mark.parametrize("padding", HELPER_PADDINGS)
@pytest.mark.parametrize("kind", HELPER_FILTERS)
def test_helpers_pad_as_stylegan2_ada(kind, padding, launches):
    """filter2d, upsample2d and downsample2d are upfirdn2d with StyleGAN2-ADA's padding
    adjustments (``impl='ref'``: the reference, no kernel)."""
    x, f = randn(2, 3, 6, 7, device="cpu"), make_filter(kind, device="cpu")
    fh, fw = reference.filter_taps(f)
    x0, x1, y0, y1 = sg2_padding(padding)
    expected = reference.upfirdn2d(x, f, padding=(x0 + fw // 2, x1 + (fw - 1) // 2,
                                                  y0 + fh // 2, y1 + (fh - 1) // 2), gain=0.5)
    assert torch.equal(fastgan.filter2d(x, f, padding, gain=0.5, impl="ref"), expected)
    for up in (2, (2, 3)):
        ux, uy = (up, up) if isinstance(up, int) else up
        expected = reference.upfirdn2d(
            x, f, up=up, padding=(x0 + (fw + ux - 1) // 2, x1 + (fw - ux) // 2,
                                  y0 + (fh + uy - 1) // 2, y1 + (fh - uy) // 2),
            flip_filter=True, gain=3 * ux * uy)
        assert torch.equal(fastgan.upsample2d(x, f, up, padding, True, 3, impl="ref"), expected)
    for down in (2, (3, 2)):
        dx, dy = (down, down) if isinstance(down, int) else down
        expected = reference.upfirdn2d(
            x, f, down=down, padding=(x0 + (fw - dx + 1) // 2, x1 + (fw - dx) // 2,
                                      y0 + (fh - dy + 1) // 2, y1 + (fh - dy) // 2))
        assert torch.equal(fastgan.downsample2d(x, f, down, padding, impl="ref"), expected)
    assert launches() == {}


def test_helpers_run_the_kernel_and_keep_sizes(launches):
    """With StyleGAN2-ADA's [1, 3, 3, 1] filter and no extra padding, filter2d keeps the size,
    upsample2d doubles it and downsample2d halves it, on the kernel."""
    f = fastgan.setup_filter([1, 3, 3, 1], device=DEVICE)
    x = randn(2, 3, 6, 8)
    cases = [(fastgan.filter2d(x, f), reference.upfirdn2d(x, f, padding=(2, 1, 2, 1)), (6, 8)),
             (fastgan.upsample2d(x, f), reference.upfirdn2d(x, f, 2, padding=(2, 1, 2, 1),
                                                            gain=4), (12, 16)),
             (fastgan.downsample2d(x, f), reference.upfirdn2d(x, f, down=2, padding=1), (3, 4))]
    for y, expected, size in cases:
        assert_matches(y, expected)
        assert y.shape[2:] == size
    assert launches() == {"upfirdn2d": 3}


def test_setup_filter():
    """StyleGAN2-ADA's rules: float32; normalized to sum 1; a 1-d filter becomes its outer
    product unless separable (by default when it has 8 taps or more); flip; gain ** (ndim /
    2); None and scalars become [[1]]; the input is not modified."""
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
    f = fastgan.setup_filter(taps)
    assert f.dtype == F32 and torch.equal(f, torch.outer(taps, taps) / 64)
    assert torch.equal(taps, torch.tensor([1.0, 3.0, 3.0, 1.0]))
    assert torch.equal(fastgan.setup_filter([1, 3, 3, 1], separable=True), taps / 8)
    long = torch.arange(1.0, 9.0)
    assert torch.equal(fastgan.setup_filter(long), long / 36)
    assert fastgan.setup_filter(long, separable=False).shape == (8, 8)
    ramp = [[1.0, 2.0], [3.0, 4.0]]
    assert torch.equal(fastgan.setup_filter(ramp, normalize=False, flip_filter=True, gain=2),
                       torch.tensor([[8.0, 6.0], [4.0, 2.0]]))
    torch.testing.assert_close(fastgan.setup_filter([1.0, 1.0], separable=True, gain=4),
                               torch.tensor([1.0, 1.0]))
    for value in (None, 2.0, [5.0]):
        assert torch.equal(fastgan.setup_filter(value), torch.ones(1, 1))
    assert torch.equal(fastgan.setup_filter(3.0, normalize=False), torch.full((1, 1), 9.0))
    assert fastgan.setup_filter(taps, device="meta").device.type == "meta"
    for call, message in ((lambda: fastgan.setup_filter(torch.ones(2, 2, 2)), "f must be"),
                          (lambda: fastgan.setup_filter([]), "f must be"),
                          (lambda: fastgan.setup_filter(ramp, separable=True),
                           "separable=True needs a 1-d f"),
                          (lambda: fastgan.setup_filter(long, gain=-1), "gain must be >= 0")):
        with pytest.raises(ValueError, match=message):
            call()


# --- backends and arguments ----------------------------------------------------------------------

def test_ref_impl_and_torch_backend_run_the_reference(launches):
    x, f = randn(1, 2, 5, 5), make_filter((3, 3))
    expected = reference.upfirdn2d(x, f, 2, 1, 1)
    assert torch.equal(fastgan.upfirdn2d(x, f, 2, 1, 1, impl="ref"), expected)
    fastgan.set_backend("torch")
    assert torch.equal(fastgan.upfirdn2d(x, f, 2, 1, 1), expected)
    assert launches() == {}


@pytest.mark.parametrize("chosen, device, expected", [
    ("triton", "cpu", "triton"), ("torch", "cpu", "torch"), ("ext", "cpu", "ext"),
    ("ext", "meta", "without the extension")])
def test_backend_rule(chosen, device, expected, monkeypatch):
    """The extension's op has a CPU kernel only: where the rule says 'ext' for another
    device, what the rule runs without the extension (Triton; the reference while
    torch.compile traces: ``backend.implementation_without_extension``)."""
    monkeypatch.setattr(upfirdn2d_module, "implementation", lambda x: chosen)
    monkeypatch.setattr(upfirdn2d_module, "implementation_without_extension",
                        lambda x: "without the extension")
    assert upfirdn2d_module._path(torch.empty(1, device=device)) == expected


def test_int64_variant_for_large_tensors(launches):
    """Offsets past 2**31 take the INT64 variant (recorded launches on meta tensors)."""
    f = torch.empty(4, 4, device="meta")
    with launch.recording() as recorded:
        for shape in ((1, 1, 2**16, 2**15 + 1), (1, 1, 2**15, 2**15)):
            x = torch.empty(shape, dtype=torch.bfloat16, device="meta")
            assert fastgan.upfirdn2d(x, f, down=2, padding=1).shape == (*shape[:2],
                                                                        *(s // 2 for s in
                                                                          shape[2:]))
    assert [r.meta["INT64"] for r in recorded] == [True, False]
    assert launches() == {"upfirdn2d": 2}


def test_bad_arguments_raise_clear_errors(launches):
    x, f = randn(1, 2, 5, 5), make_filter((3, 3))
    bad = [
        (TypeError, "x must be float16", lambda: fastgan.upfirdn2d(x.long(), f)),
        (ValueError, "x must be 4-d", lambda: fastgan.upfirdn2d(x[0], f)),
        (TypeError, "f must be float32", lambda: fastgan.upfirdn2d(x, f.double())),
        (TypeError, "f must be None or a torch.Tensor", lambda: fastgan.upfirdn2d(x, [1, 2])),
        (ValueError, "f must be a non-empty 1-d", lambda: fastgan.upfirdn2d(x, f[None])),
        (ValueError, "f must be a non-empty 1-d", lambda: fastgan.upfirdn2d(x, f[:0])),
        (ValueError, "f must not require grad",
         lambda: fastgan.upfirdn2d(x, f.clone().requires_grad_())),
        (ValueError, "f is on meta", lambda: fastgan.upfirdn2d(x, f.to("meta"))),
        (ValueError, "up must be >= 1", lambda: fastgan.upfirdn2d(x, f, up=0)),
        (TypeError, "down must be an int or a list/tuple of 2 ints",
         lambda: fastgan.upfirdn2d(x, f, down=(1, 2, 3))),
        (TypeError, "padding must be an int or a list/tuple of 2 ints or 4 ints",
         lambda: fastgan.upfirdn2d(x, f, padding=(1, 2, 3))),
        (TypeError, "padding must be", lambda: fastgan.upfirdn2d(x, f, padding=True)),
        (TypeError, "flip_filter must be a bool", lambda: fastgan.upfirdn2d(x, f, flip_filter=1)),
        (ValueError, "gain must be finite", lambda: fastgan.upfirdn2d(x, f, gain=float("nan"))),
        (ValueError, "the output would be -1x3", lambda: fastgan.upfirdn2d(x, f, padding=(0, -2))),
        (TypeError, "f must be float32", lambda: fastgan.filter2d(x, f.double())),
        (ValueError, "up must be >= 1", lambda: fastgan.upsample2d(x, f, up=(2, 0))),
        (TypeError, "down must be", lambda: fastgan.downsample2d(x, f, down=2.0)),
    ]
    for error, message, call in bad:
        with pytest.raises(error, match=message):
            call()
    assert launches() == {}


# --- compiled kernels on a GPU (skipped without CUDA; benchmarks/gpu_check.sh runs them) --------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_on_gpu(dtype, launches):
    """16-bit x, summed in fp32 by the compiled kernel: y and dx within one rounding of the
    float32 reference's, at StyleGAN2's blur, downsample and upsample."""
    f = fastgan.setup_filter([1, 3, 3, 1], device="cuda")
    fastgan.set_backend("triton")
    for layout in ("contiguous", "channels_last"):
        for kwargs in (dict(padding=2), dict(down=2, padding=1), dict(up=2, padding=(2, 1),
                                                                      gain=4)):
            x = leaf(make_x((4, 32, 33, 40), layout, dtype, device="cuda"))
            y = fastgan.upfirdn2d(x, f, **kwargs)
            dy = torch.empty_like(y).copy_(randn(*y.shape, seed=5, device="cuda"))
            dx, = torch.autograd.grad(y, x, dy)
            xf = leaf(x.detach().float())
            y_ref = reference.upfirdn2d(xf, f, **kwargs)
            dx_ref, = torch.autograd.grad(y_ref, xf, dy.float())
            for got, want in ((y, y_ref), (dx, dx_ref)):
                assert got.dtype == dtype
                torch.testing.assert_close(got.float(), want, rtol=ULP[dtype], atol=1e-4)
    assert launches() == {"upfirdn2d": 12}


def check_past_int32(shape, device):
    """upfirdn2d (4x4 filter, down 2, padding 1) of a bf16 x of ``shape`` (an even height):
    its last 3 output rows against the reference on x's last 8 rows, whose first output row
    reaches above them into the padding and is left out."""
    f = fastgan.setup_filter([1, 3, 3, 1], device=device)
    x = torch.randn(shape, dtype=torch.bfloat16, device=device)
    y = fastgan.upfirdn2d(x, f, down=2, padding=1)
    expected = reference.upfirdn2d(x[:, :, -8:], f, down=2, padding=1)[:, :, 1:]
    torch.testing.assert_close(y[:, :, -3:].float(), expected.float(),
                               rtol=ULP[torch.bfloat16], atol=1e-3)


@pytest.mark.gpu
def test_past_2_31_elements_on_gpu(launches):
    """x of more than 2**31 elements (4 GiB in bf16) takes the INT64 variant and is read
    right to its end."""
    fastgan.set_backend("triton")
    check_past_int32((1, 1, 2**16, 2**15 + 8), torch.device("cuda"))
    assert launches() == {"upfirdn2d": 1}
