"""GPU-only checks of the compiled Triton kernels of bias_act and grad_sq_norm.

They skip on a machine without CUDA (tests/conftest.py) and run through
``benchmarks/gpu_check.sh``: fp16/bf16 against a float64 reference, channels_last, tensors of
more than 2**31 elements, gradcheck in float64 on CUDA, determinism, and proof that the
*compiled* kernels (not the interpreter, not the torch fallback) ran. The backend is forced to
``triton``, except for the last test: ``auto`` runs the Triton kernels even where the
extension has CUDA kernels, which run when forced. About a minute on an H100; the large tests
need ~20 GB of GPU memory.

Determinism tests run the same inputs twice with a run on other inputs in between, so that
an output the kernels failed to write would hold that run's values, not an equal copy.

Tolerances (a kernel computes in fp32 and rounds its result once to the tensor's dtype):
elementwise ``rtol`` just above one rounding (bf16 2**-9, fp16 2**-12, fp32 ~1e-7), and the
relative l2 error over the whole tensor (``norm``). Reductions (db, grad_sq_norm) accumulate in
fp32, so their error is bounded relative to the sum of absolute values of their terms.
"""
import gc

import pytest
import torch
import triton

import fastgan
from fastgan import backend, ext, reference
from fastgan.ops import bias_act as bias_act_module
from fastgan.ops import grad_sq_norm as grad_sq_norm_module
from test_ext import require_ext

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
TWO_31 = 2 ** 31  # the int32 limit the large tests cross (a module constant for dry runs)

TOL = {
    torch.bfloat16: dict(rtol=1e-2, atol=1e-6, norm=4e-3),
    torch.float16: dict(rtol=2e-3, atol=1e-6, norm=5e-4),
    torch.float32: dict(rtol=1e-5, atol=1e-6, norm=1e-6),
}
EPS = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -24}
REDUCTION_RTOL = 1e-5  # fp32 accumulation, relative to the sum of |terms|
ACT = dict(act="lrelu", clamp=2.0)  # one activation throughout: fewer kernel variants to compile


@pytest.fixture(autouse=True)
def _triton_backend():
    """The Triton kernels, whether or not the extension has CUDA kernels."""
    fastgan.set_backend("triton")


@pytest.fixture(autouse=True)
def _free_gpu_memory():
    """The large tests hold tens of GB: give it back between tests."""
    yield
    gc.collect()
    torch.cuda.empty_cache()


def cuda_randn(*shape, dtype=torch.float32, seed=0):
    gen = torch.Generator(device=CUDA).manual_seed(seed)
    return torch.randn(shape, generator=gen, device=CUDA, dtype=dtype)


def assert_close_to_reference(actual, expected, dtype):
    """``actual`` (any float dtype) against the float64 ``expected``: elementwise and in norm."""
    tol = TOL[dtype]
    a = actual.double()
    assert a.shape == expected.shape
    torch.testing.assert_close(a, expected, rtol=tol["rtol"], atol=tol["atol"])
    err = (a - expected).norm() / expected.norm().clamp_min(1e-30)
    assert err <= tol["norm"], f"relative l2 error {err:.3g} > {tol['norm']} for {dtype}"


def assert_reduction_close(actual, expected, abs_sum, dtype):
    """A sum of many terms: error bounded by one rounding of the result plus fp32
    accumulation relative to the sum of |terms|."""
    bound = TOL[dtype]["rtol"] * expected.abs() + REDUCTION_RTOL * abs_sum + 1e-6
    err = (actual.double() - expected).abs()
    assert (err <= bound).all(), f"max error {err.max():.3g}, bound {bound.min():.3g}"


def _kernels_ran(launches, *names):
    counts = launches()
    for name in names:
        assert counts.get(name, 0) > 0, counts


def _sum_dims(x, dim):
    return [d for d in range(x.ndim) if d != dim % x.ndim]


def _expected_bias_act(x, b, dim, dy, dx, act=ACT["act"], clamp=ACT["clamp"]):
    """float64 reference ``y``, and the ``dx``, ``db`` and per-channel ``sum |dx|`` the kernel
    must give for its inputs ``x, b, dy``. One allowance: the kernel decides "clamped" from its
    rounded ``y``, so where the unclamped ``|y|`` lies within one rounding of the clamp, ``dx``
    may be 0 or the unclamped gradient (whichever the kernel gave must be that value)."""
    xr, br, dyr = x.detach().double(), b.detach().double(), dy.double()

    def reference_grad(clamp):
        xl = xr.clone().requires_grad_(True)
        y = reference.bias_act(xl, br, dim, act=act, clamp=clamp)
        return y.detach(), torch.autograd.grad(y, xl, dyr)[0]

    y, dx_ref = reference_grad(clamp)
    y_free, dx_free = reference_grad(None)
    ambiguous = (y_free.abs() - clamp).abs() <= 2 * EPS[x.dtype] * clamp
    expected = torch.where(ambiguous, torch.where(dx == 0, 0.0, dx_free), dx_ref)
    dims = _sum_dims(x, dim)
    return y, expected, expected.sum(dim=dims), expected.abs().sum(dim=dims)


# --- the compiled path ------------------------------------------------------------------------

def test_compiled_kernels_run(launches):
    """CUDA tensors run compiled Triton kernels: the interpreter is off, the kernels are
    JITFunctions (the interpreter would make them InterpretedFunctions), and they launched."""
    assert not backend.interpreter_enabled()
    for kernel in (bias_act_module._bias_act_fwd_kernel, bias_act_module._bias_act_grad_kernel,
                   grad_sq_norm_module._per_sample_dot_kernel,
                   grad_sq_norm_module._scale_per_sample_kernel):
        assert isinstance(kernel, triton.runtime.jit.JITFunction), type(kernel)
    assert fastgan.backend_info()["cuda_tensors"] == "Triton kernels, compiled"
    x = cuda_randn(4, 8, 5, 5, seed=1).requires_grad_(True)
    b = cuda_randn(8, seed=2).requires_grad_(True)
    fastgan.grad_sq_norm(fastgan.bias_act(x, b, 1, **ACT)).sum().backward()
    assert x.grad is not None and b.grad is not None
    _kernels_ran(launches, "bias_act_fwd", "bias_act_grad", "per_sample_dot", "scale_per_sample")


# --- half precision and float32 against float64 ------------------------------------------------

@pytest.mark.parametrize("dim", [1, -1])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32],
                         ids=["bf16", "fp16", "fp32"])
def test_bias_act_dtypes_against_float64(dtype, channels_last, dim, launches):
    """y, dx and db of fp16/bf16/fp32 inputs against the float64 reference on the same values;
    the output keeps the input's dtype and layout."""
    x = cuda_randn(8, 64, 33, 35, dtype=dtype, seed=3)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    b = cuda_randn(x.shape[dim], dtype=dtype, seed=4)
    dy = cuda_randn(*x.shape, dtype=dtype, seed=5)
    xl, bl = x.clone().requires_grad_(True), b.clone().requires_grad_(True)
    y = fastgan.bias_act(xl, bl, dim, **ACT)
    dx, db = torch.autograd.grad(y, (xl, bl), dy)
    y_ref, dx_ref, db_ref, abs_sum = _expected_bias_act(x, b, dim, dy, dx)
    assert y.dtype == dx.dtype == db.dtype == dtype
    assert y.stride() == x.stride()
    assert_close_to_reference(y, y_ref, dtype)
    assert_close_to_reference(dx, dx_ref, dtype)
    assert_reduction_close(db, db_ref, abs_sum, dtype)
    _kernels_ran(launches, "bias_act_fwd", "bias_act_grad")


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32],
                         ids=["bf16", "fp16", "fp32"])
def test_grad_sq_norm_dtypes_against_float64(dtype, channels_last, launches):
    """The norm (float32 for 16-bit input) and its gradient against float64."""
    g = cuda_randn(16, 3, 65, 67, dtype=dtype, seed=6)
    if channels_last:
        g = g.to(memory_format=torch.channels_last)
    gl = g.clone().requires_grad_(True)
    out = fastgan.grad_sq_norm(gl)
    assert out.dtype == torch.float32
    dout = cuda_randn(16, seed=7)
    dg, = torch.autograd.grad(out, gl, dout)
    assert dg.dtype == dtype
    g64 = g.double()
    sq = g64.square().sum(dim=(1, 2, 3))
    assert_reduction_close(out, sq, sq, torch.float32)
    assert_close_to_reference(dg, 2 * g64 * dout.double().view(-1, 1, 1, 1), dtype)
    _kernels_ran(launches, "per_sample_dot", "scale_per_sample")


# --- several tiles per program, determinism ------------------------------------------------------

@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_bias_act_multi_tile_programs_and_determinism(channels_last, launches):
    """A tensor large enough that each program loops over several tiles (ITERS > 1): right
    against float64, and two runs of dx and db are bitwise equal."""
    shape = (32, 128, 128, 128)  # 67M bf16 elements
    x = cuda_randn(*shape, dtype=torch.bfloat16, seed=8)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    _, outer, chan, inner = bias_act_module.as_outer_chan_inner(x, 1)
    assert bias_act_module._tiling(outer, chan, inner)["meta"]["ITERS"] > 1, \
        "pick a larger shape: this one no longer gives several tiles per program"
    b = cuda_randn(128, dtype=torch.bfloat16, seed=9)
    dy = cuda_randn(*shape, dtype=torch.bfloat16, seed=10)
    other = (x * -0.5, b + 1, dy * 2)
    runs = []
    for inputs in ((x, b, dy), other, (x, b, dy)):  # the middle run overwrites freed memory
        xl, bl = (t.clone().requires_grad_(True) for t in inputs[:2])
        y = fastgan.bias_act(xl, bl, 1, **ACT)
        runs.append((y.detach(), *torch.autograd.grad(y, (xl, bl), inputs[2])))
        del xl, bl, y
    assert torch.equal(runs[0][1], runs[2][1]) and torch.equal(runs[0][2], runs[2][2])
    assert not torch.equal(runs[0][2], runs[1][2])
    del other
    y_ref, dx_ref, db_ref, abs_sum = _expected_bias_act(x, b, 1, dy, runs[0][1])
    assert_close_to_reference(runs[0][0], y_ref, torch.bfloat16)
    assert_close_to_reference(runs[0][1], dx_ref, torch.bfloat16)
    assert_reduction_close(runs[0][2], db_ref, abs_sum, torch.bfloat16)
    _kernels_ran(launches, "bias_act_fwd", "bias_act_grad")


def test_grad_sq_norm_determinism(launches):
    """Two runs of the norm and its gradient on a large input are bitwise equal."""
    g = cuda_randn(64, 3, 256, 256, dtype=torch.bfloat16, seed=11)
    dout = cuda_randn(64, seed=12)
    runs = []
    for gi, di in ((g, dout), (g * 3, -dout), (g, dout)):  # the middle run overwrites memory
        gl = gi.clone().requires_grad_(True)
        out = fastgan.grad_sq_norm(gl)
        runs.append((out.detach(), *torch.autograd.grad(out, gl, di)))
        del gl, out
    assert torch.equal(runs[0][0], runs[2][0]) and torch.equal(runs[0][1], runs[2][1])
    assert not torch.equal(runs[0][0], runs[1][0])
    _kernels_ran(launches, "per_sample_dot", "scale_per_sample")


# --- more than 2**31 elements -----------------------------------------------------------------

def _check_slices(n):
    """Slices of the last dim: the start, the middle, around 2**31 when inside, the end."""
    w = 4096
    starts = {0, n // 2 - w // 2, max(0, n - w)}
    if n > TWO_31:
        starts.add(TWO_31 - w // 2)
    return [slice(s, min(n, s + w)) for s in sorted(starts)]


@pytest.mark.parametrize("shape,dim", [
    ((1, 2, TWO_31 // 2 + 7), 1),  # 2**31 + 14 elements; offsets past 2**31 in channel 1
    ((1, TWO_31 + 3), 0),          # a single row longer than 2**31 (column index > int32)
], ids=["two_channels", "one_long_row"])
def test_bias_act_more_than_2_31_elements(shape, dim, launches):
    """bf16 x with > 2**31 elements: y and dx on slices (incl. past 2**31) and the full db
    against float64."""
    n = shape[-1]
    x = cuda_randn(*shape, dtype=torch.bfloat16, seed=13)
    assert x.numel() > TWO_31
    b = cuda_randn(shape[dim], dtype=torch.bfloat16, seed=14)
    dy = cuda_randn(*shape, dtype=torch.bfloat16, seed=15)
    x.requires_grad_(True)
    bl = b.clone().requires_grad_(True)
    y = fastgan.bias_act(x, bl, dim, **ACT)
    dx, db = torch.autograd.grad(y, (x, bl), dy)
    _kernels_ran(launches, "bias_act_fwd", "bias_act_grad")
    x = x.detach()
    for s in _check_slices(n):
        y_ref, dx_ref, _, _ = _expected_bias_act(x[..., s], b, dim, dy[..., s], dx[..., s])
        assert_close_to_reference(y[..., s], y_ref, torch.bfloat16)
        assert_close_to_reference(dx[..., s], dx_ref, torch.bfloat16)
    del y
    db_ref = torch.zeros(shape[dim], dtype=torch.float64, device=CUDA)
    abs_sum = torch.zeros_like(db_ref)
    chunk = 2 ** 26
    for start in range(0, n, chunk):
        s = slice(start, min(n, start + chunk))
        _, _, db_part, abs_part = _expected_bias_act(x[..., s], b, dim, dy[..., s], dx[..., s])
        db_ref += db_part
        abs_sum += abs_part
    assert_reduction_close(db, db_ref, abs_sum, torch.bfloat16)


@pytest.mark.parametrize("shape", [(2, TWO_31 // 2 + 5), (1, TWO_31 + 5)],
                         ids=["two_samples", "one_long_sample"])
def test_grad_sq_norm_more_than_2_31_elements(shape, launches):
    """bf16 g with > 2**31 elements: the norm against a chunked float64 sum, its gradient on
    slices (incl. past 2**31)."""
    n = shape[1]
    g = cuda_randn(*shape, dtype=torch.bfloat16, seed=16)
    assert g.numel() > TWO_31
    g.requires_grad_(True)
    out = fastgan.grad_sq_norm(g)
    dout = cuda_randn(shape[0], seed=17)
    dg, = torch.autograd.grad(out, g, dout)
    _kernels_ran(launches, "per_sample_dot", "scale_per_sample")
    g = g.detach()
    sq = torch.zeros(shape[0], dtype=torch.float64, device=CUDA)
    for start in range(0, n, 2 ** 27):
        sq += g[:, start:start + 2 ** 27].double().square().sum(dim=1)
    # 2**31 fp32 terms per sample: allow 10x the usual accumulation error
    assert_reduction_close(out, sq, 10 * sq, torch.float32)
    for s in _check_slices(n):
        expected = 2 * g[:, s].double() * dout.double()[:, None]
        assert_close_to_reference(dg[:, s], expected, torch.bfloat16)


CURVED = [name for name, act in reference.ACTIVATIONS.items() if act.curved]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_curved_activations_against_float64(dtype, launches):
    """tanh, sigmoid, elu, selu, softplus and swish (their gradient from the saved input) in
    bf16 and fp32, channels_last, clamp 2: y, dx and db against the float64 reference."""
    x = cuda_randn(4, 32, 17, 19, dtype=dtype, seed=40).to(memory_format=torch.channels_last)
    x = x * 3
    b = cuda_randn(32, dtype=dtype, seed=41)
    dy = cuda_randn(*x.shape, dtype=dtype, seed=42)
    for act in CURVED:
        xl, bl = x.clone().requires_grad_(True), b.clone().requires_grad_(True)
        y = fastgan.bias_act(xl, bl, 1, act, clamp=2.0)
        dx, db = torch.autograd.grad(y, (xl, bl), dy)
        y_ref, dx_ref, db_ref, abs_sum = _expected_bias_act(x, b, 1, dy, dx, act, 2.0)
        assert y.dtype == dx.dtype == db.dtype == dtype and y.stride() == x.stride()
        assert_close_to_reference(y, y_ref, dtype)
        assert_close_to_reference(dx, dx_ref, dtype)
        assert_reduction_close(db, db_ref, abs_sum, dtype)
    assert launches() == {"bias_act_fwd": len(CURVED), "bias_act_grad_from_input": len(CURVED)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_curved_gradient_masks_the_output_as_stored(dtype, launches):
    """selu(172.25) is 180.98 in float32, which the stored output rounds to the clamp (181.0,
    StyleGAN2-ADA's 181.019 as stored): its gradient is 0, as the reference's (the CPU suite
    checks bf16 on the extension only: the interpreter truncates to bf16 where a GPU rounds)."""
    x = torch.tensor([172.25, 150.0], dtype=dtype, device=CUDA, requires_grad=True)
    y = fastgan.bias_act(x, None, 0, "selu", clamp=256 * 0.5 ** 0.5)
    dx, = torch.autograd.grad(y, x, torch.ones_like(y))
    assert y[0] == 181.0 and dx[0] == 0 and dx[1] != 0
    assert launches() == {"bias_act_fwd": 1, "bias_act_grad_from_input": 1}


def test_forced_ext_runs_triton_for_curved_activations(launches):
    """The extension's CUDA kernels compute linear, relu and lrelu; with the backend forced to
    ``ext`` the curved activations run the Triton kernels on CUDA tensors."""
    require_ext()
    if not ext.available("cuda"):
        pytest.skip(f"the extension cannot run cuda tensors: {ext.reason('cuda')}")
    fastgan.set_backend("ext")
    x = cuda_randn(2, 8, 5, 5, seed=43).requires_grad_(True)
    for act, expected in (("swish", {"bias_act_fwd": 1, "bias_act_grad_from_input": 1}),
                          ("lrelu", {"ext_bias_act": 1, "ext_bias_act_grad": 1})):
        fastgan.reset_launch_counts()
        y = fastgan.bias_act(x, None, 1, act)
        dx, = torch.autograd.grad(y.sum(), x)
        torch.testing.assert_close(y, reference.bias_act(x, None, 1, act), rtol=1e-5, atol=1e-6)
        assert launches() == expected, act


# --- float64 derivatives on CUDA, devices -------------------------------------------------------

@pytest.mark.parametrize("cfg", [dict(act="lrelu", clamp=1.0), dict(act="relu"),
                                 dict(act="tanh", clamp=0.8, scale=0.7)], ids=str)
def test_bias_act_gradcheck_cuda(cfg, launches):
    x = cuda_randn(2, 3, 4, dtype=torch.float64, seed=18).requires_grad_(True)
    b = cuda_randn(3, dtype=torch.float64, seed=19).requires_grad_(True)

    def fn(x, b):
        return fastgan.bias_act(x, b, 1, **cfg)

    assert torch.autograd.gradcheck(fn, (x, b))
    assert torch.autograd.gradgradcheck(fn, (x, b))
    curved = reference.ACTIVATIONS[cfg["act"]].curved
    _kernels_ran(launches, "bias_act_fwd", "bias_act_grad_from_input" if curved else
                 "bias_act_grad")


def test_grad_sq_norm_gradcheck_cuda(launches):
    g = cuda_randn(2, 3, 2, 3, dtype=torch.float64, seed=20)
    g = g.to(memory_format=torch.channels_last).requires_grad_(True)
    assert torch.autograd.gradcheck(fastgan.grad_sq_norm, (g,))
    assert torch.autograd.gradgradcheck(fastgan.grad_sq_norm, (g,))
    _kernels_ran(launches, "per_sample_dot", "scale_per_sample")


def test_bias_on_another_device_names_the_argument():
    """x and b on different devices: the error names b, x and both devices."""
    x = cuda_randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"b is on cpu but x is on cuda.*same device"):
        fastgan.bias_act(x, torch.zeros(3), 1)
    with pytest.raises(ValueError, match=r"b is on cuda.* but x is on cpu"):
        fastgan.bias_act(x.cpu(), torch.zeros(3, device=CUDA), 1)


# --- direct launches of the compiled kernels ----------------------------------------------------

def test_direct_launch_matches_the_jit_launch(launches):
    """The first launch of a problem goes through Triton's JIT, the next ones call the kept
    compiled kernel directly: bitwise the same results, for every kernel, also on a tensor
    that is not 16-byte aligned (its own problem) and for the autotuned conv."""
    from fastgan.ops import conv2d_act as conv_mod
    from fastgan.ops import launch

    x = cuda_randn(4, 8, 9, 7, dtype=torch.bfloat16, seed=11)
    b = cuda_randn(8, dtype=torch.bfloat16, seed=12)
    w = cuda_randn(8, 8, 3, 3, dtype=torch.bfloat16, seed=13) / 8
    unaligned = cuda_randn(4 * 8 * 9 * 7 + 1, dtype=torch.bfloat16, seed=14)[1:].view(4, 8, 9, 7)
    assert unaligned.data_ptr() % 16 != 0
    launchers = (bias_act_module._launch_fwd, bias_act_module._launch_grad,
                 grad_sq_norm_module._launch_dot, grad_sq_norm_module._launch_scale,
                 conv_mod._launch_fwd)
    for launcher in launchers:
        launcher.clear()

    def run(inp):
        xl = inp.detach().requires_grad_()
        y = fastgan.bias_act(xl, b, 1, **ACT)
        z = fastgan.conv2d_act(y, w, b, 1, 1, act="lrelu")
        loss = fastgan.grad_sq_norm(z).sum()
        return [t.clone() for t in (y, z, loss, *torch.autograd.grad(loss, xl))]

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTGAN_CONV", "triton")
        for inp in (x, unaligned):
            first, second, third = run(inp), run(inp), run(inp)
            for a, b2, c in zip(first, second, third):
                assert torch.equal(a, b2) and torch.equal(a, c)
    assert all(launcher._cache for launcher in launchers)  # every kernel ran directly
    assert not launch.is_recording()


# --- auto runs Triton on CUDA; the extension's CUDA kernels when forced -----------------------

TRITON_LAUNCHES = {"bias_act_fwd": 1, "bias_act_grad": 1, "per_sample_dot": 1,
                   "scale_per_sample": 1}
EXT_LAUNCHES = {f"ext_{k}": 1 for k in ("bias_act", "bias_act_grad", "per_sample_dot",
                                        "scale_per_sample")}


def test_auto_runs_triton_and_forced_ext_runs_the_extension(launches):
    """With the extension's CUDA kernels built, auto still runs the Triton kernels (no timing,
    the same summation order every run); forced ext runs the extension's, with results equal
    up to summation order."""
    require_ext()  # builds the CUDA kernels too where nvcc is found
    if not ext.available("cuda"):
        pytest.skip(f"the extension cannot run cuda tensors: {ext.reason('cuda')}")
    x = cuda_randn(8, 64, 32, 32, seed=30).to(memory_format=torch.channels_last)
    b, dout = cuda_randn(64, seed=31), cuda_randn(8, seed=32)

    def run():
        xl, bl = x.clone().requires_grad_(True), b.clone().requires_grad_(True)
        y = fastgan.bias_act(xl, bl, 1, **ACT)
        n = fastgan.grad_sq_norm(y)
        return [t.detach() for t in (y, n, *torch.autograd.grad(n, (xl, bl), dout))]

    results = {}
    for name, expected in (("auto", TRITON_LAUNCHES), ("ext", EXT_LAUNCHES)):
        fastgan.set_backend(name)
        fastgan.reset_launch_counts()
        results[name] = run()
        assert launches() == expected, name
    (y, n, dx, db), alone = results["auto"], results["ext"]
    torch.testing.assert_close(alone[0], y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(alone[2], dx, rtol=1e-6, atol=1e-6)
    assert_reduction_close(alone[1], n.double(), n.double(), torch.float32)
    assert_reduction_close(alone[3], db.double(), dx.abs().double().sum(dim=(0, 2, 3)),
                           torch.float32)

