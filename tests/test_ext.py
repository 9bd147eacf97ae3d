"""The compiled extension's raw ops (``torch.ops.fastgan.*``) on CPU against fastgan.reference,
and its loader.

A module fixture builds the extension when it is not available yet (g++ and ninja are all it
needs), so these tests run wherever those are installed. Float64 must agree with the reference
to 1e-10 and float32 to 1e-5 (op_helpers.TOL); 16-bit tensors within one rounding of the
float32 reference. gradcheck belongs to the autograd Functions the ops are wired into
(tests/test_ext_ops.py; docs/design.md).
"""
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import setuptools
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fastgan import ext, reference
from op_helpers import assert_matches, randn

ACTS = sorted(reference.ACTIVATIONS)
CLAMPS = (None, 0.7)
# One unit in the last place: what a single rounding of the same float32 value may differ by.
ULP = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}
# (shape, dim) pairs that take every path of the kernels: rows of one channel (inner >= 64,
# with tails, split over items), periodic rows (channels last, small inner, a short last row),
# rank 1 and size-1 dims.
CASES = [((3, 5, 7, 9), 0), ((3, 5, 7, 9), 1), ((3, 5, 7, 9), 2), ((3, 5, 7, 9), -1),
         ((2, 3, 5000), 1), ((4, 70), 0), ((4, 70), 1), ((3, 2100), 1), ((9001,), 0),
         ((1, 1, 1), 1), ((2, 6, 4, 4), 1)]


def require_ext():
    """``torch.ops.fastgan`` with its CPU kernels, built here if need be; skips the calling
    test where it cannot be built (other test modules call this too)."""
    if not ext.available("cpu"):
        blockers = ext.build_blockers()
        if blockers:
            pytest.skip("the extension cannot be built here: " + "; ".join(blockers))
        ext.build(verbose=False)
    assert ext.available("cpu"), ext.reason("cpu")
    return ext.ops()


@pytest.fixture(scope="module")
def ops():
    return require_ext()


def channels_innermost(x, dim):
    """``x`` in the dense layout whose innermost dim is ``dim`` (channels_last for NCHW)."""
    return x.movedim(dim, -1).contiguous().movedim(-1, dim)


def act_args(act, clamp):
    """``(act code, alpha, gain, clamp)`` as the ops take them (clamp -1: none)."""
    spec = reference.resolve_activation(act, clamp=clamp)
    return spec.act.code, spec.alpha, spec.gain, -1.0 if clamp is None else float(clamp)


def reference_grads(x, b, dim, act, clamp, scale, dy):
    """``(y, dx, db)`` of ``reference.bias_act(x * scale, b, ...)`` by autograd."""
    x = x.detach().requires_grad_(True)
    leaves = [x] if b is None else [x, b.detach().requires_grad_(True)]
    y = reference.bias_act(x * scale if scale != 1 else x, None if b is None else leaves[1],
                           dim, act, clamp=clamp)
    grads = torch.autograd.grad(y, leaves, dy)
    return y.detach(), grads[0], grads[1] if b is not None else None


def grad_op(ops, act, dy, x, b, y, dim, args, scale, need_db):
    """``(dx, db)`` by the extension's gradient op for ``act``: from the output ``y``, or from
    the input ``x`` and bias ``b`` for the curved activations."""
    if reference.ACTIVATIONS[act].curved:
        return ops.bias_act_grad_from_input(dy, x, b, dim, *args, scale, True, need_db)
    return ops.bias_act_grad(dy, y, dim, *args, scale, need_db)


def check_bias_act(ops, x, b, dim, act, clamp, scale, dy):
    """The forward and the gradient's variants against the reference; returns ``(y, dx)``."""
    args = act_args(act, clamp)
    y = ops.bias_act(x, b, dim, *args, scale)
    y_ref, dx_ref, db_ref = reference_grads(x, b, dim, act, clamp, scale, dy)
    assert_matches(y, y_ref)
    dx, db = grad_op(ops, act, dy, x, b, y, dim, args, scale, b is not None)
    assert_matches(dx, dx_ref)
    assert_matches(db, db_ref)
    dx_only, none = grad_op(ops, act, dy, x, b, y, dim, args, scale, False)
    assert none is None
    torch.testing.assert_close(dx_only, dx, rtol=0, atol=0, equal_nan=True)  # bitwise
    if reference.ACTIVATIONS[act].curved:  # dz itself, which dx is scale times
        dz, _ = ops.bias_act_grad_from_input(dy, x, b, dim, *args, scale, False, False)
        torch.testing.assert_close(dz * scale, dx, rtol=0, atol=0, equal_nan=True)
    return y, dx


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("clamp", CLAMPS)
@pytest.mark.parametrize("act", ACTS)
def test_bias_act_matches_reference(ops, act, clamp, dtype):
    for i, (shape, dim) in enumerate(CASES):
        x = randn(*shape, dtype=dtype, seed=i, device="cpu")
        dy = randn(*shape, dtype=dtype, seed=100 + i, device="cpu")
        b = randn(shape[dim], dtype=dtype, seed=200 + i, device="cpu")
        for bias, scale in ((b, 1.0), (b, 0.37), (None, 1.0), (None, -1.5)):
            y, dx = check_bias_act(ops, x, bias, dim, act, clamp, scale, dy)
            assert y.stride() == dx.stride() == x.stride()


@pytest.mark.parametrize("act", ACTS)
def test_bias_act_layouts(ops, act):
    """Dense layouts are kept; other strides are read through a contiguous copy."""
    base = randn(4, 6, 33, 33, seed=1, device="cpu")
    dense = [base.contiguous(memory_format=torch.channels_last), base.permute(2, 0, 3, 1),
             base[:1], base.transpose(0, 1)]
    strided = [base[:, ::2], base[:, :1], base[..., 1:30], base[:1].expand(3, 6, 33, 33)]
    for j, x in enumerate(dense + strided):
        dy = randn(*x.shape, seed=j, device="cpu")
        for dim in range(x.ndim):
            b = randn(x.shape[dim], seed=dim, device="cpu")
            y, dx = check_bias_act(ops, x, b, dim, act, 0.7, 0.5, dy)
            expected = x.stride() if j < len(dense) else x.contiguous().stride()
            assert y.stride() == dx.stride() == expected
            # dy in another layout than y is copied into y's
            check_bias_act(ops, x, b, dim, act, 0.7, 0.5,
                           dy.contiguous(memory_format=torch.channels_last))


def test_bias_act_strided_bias(ops):
    x = randn(4, 5, 3, seed=2, device="cpu")
    dy = randn(4, 5, 3, seed=3, device="cpu")
    B = randn(5, 3, seed=4, device="cpu")
    for b, dim in ((randn(10, seed=5, device="cpu")[::2], 1), (B[:, 0], 1),
                   (torch.tensor([0.5], dtype=torch.float64).expand(4), 0)):
        assert not b.is_contiguous()
        check_bias_act(ops, x, b, dim, "lrelu", 0.7, 1.0, dy)


@pytest.mark.parametrize("shape, dim", [((0, 4, 3), 1), ((2, 0, 3), 1), ((2, 4, 0), 1),
                                        ((0,), 0)])
def test_empty(ops, shape, dim):
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        x = torch.empty(shape, dtype=dtype)
        y = ops.bias_act(x, torch.ones(shape[dim], dtype=dtype), dim, *act_args("lrelu", 0.7),
                         1.0)
        assert y.shape == x.shape and y.dtype == dtype
        b = torch.ones(shape[dim], dtype=dtype)
        for dx, db in (ops.bias_act_grad(x, y, dim, *act_args("lrelu", 0.7), 2.0, True),
                       ops.bias_act_grad_from_input(x, x, b, dim, *act_args("tanh", 0.7), 2.0,
                                                    True, True)):
            assert dx.shape == x.shape and dx.dtype == dtype
            assert db.dtype == dtype and torch.equal(db, torch.zeros(shape[dim], dtype=dtype))
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        dot = ops.per_sample_dot(x, x)
        assert dot.dtype == acc and torch.equal(dot, torch.zeros(shape[0], dtype=acc))
        scaled = ops.scale_per_sample(x, torch.ones(shape[0]))
        assert scaled.shape == x.shape and scaled.dtype == dtype


def sprinkle(t, start, step):
    """``t`` with NaN, inf and -inf in turn at every ``step``-th element from ``start``."""
    flat = t.clone().view(-1)
    n = len(flat[start::step])
    flat[start::step] = torch.tensor([float("nan"), float("inf"), -float("inf")],
                                     dtype=t.dtype).repeat(n // 3 + 1)[:n]
    return flat.view(t.shape)


@pytest.mark.parametrize("clamp", CLAMPS)
@pytest.mark.parametrize("act", ACTS)
def test_nan_and_inf(ops, act, clamp):
    """NaN propagates as in torch; where the slope is zero, dx is 0 even for inf/NaN dy."""
    x = sprinkle(randn(3, 4, 70, seed=6, device="cpu"), 0, 7)
    if act in ("elu", "selu"):
        # torch's gradient of these at NaN disagrees with itself (NaN in its vectorized loop, the
        # positive slope in its scalar tail); tests/test_curved_activations.py checks fastgan's
        x = x.nan_to_num(nan=float("inf"), posinf=float("inf"), neginf=-float("inf"))
    dy = sprinkle(randn(3, 4, 70, seed=7, device="cpu"), 3, 11)
    b = randn(4, seed=8, device="cpu")
    for layout in (x, channels_innermost(x, 1)):
        check_bias_act(ops, layout, b, 1, act, clamp, 1.0, dy)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act", ACTS)
def test_16_bit(ops, act, dtype):
    """16-bit tensors, computed in float32: within one rounding of the float32 reference."""
    clamp = 1.0  # representable; inputs near it are moved away so that masks agree
    tol = dict(rtol=ULP[dtype], atol=1e-5)
    for shape, dim in ((3, 5, 7, 9), 1), ((4, 6, 5, 5), 1), ((2, 3, 300), 2):
        x = randn(*shape, dtype=dtype, seed=9, device="cpu")
        b = randn(shape[dim], dtype=dtype, seed=10, device="cpu")
        dy = randn(*shape, dtype=dtype, seed=11, device="cpu")
        unclamped = reference.bias_act(x.float() * 0.5, b.float(), dim, act)
        x = torch.where((unclamped.abs() - clamp).abs() < 0.05, torch.full_like(x, 64), x)
        for layout in (x, channels_innermost(x, dim)):
            args = act_args(act, clamp)
            y = ops.bias_act(layout, b, dim, *args, 0.5)
            y_ref, dx_ref, db_ref = reference_grads(layout.float(), b.float(), dim, act, clamp,
                                                    0.5, dy.float())
            assert y.dtype == dtype and y.stride() == layout.stride()
            torch.testing.assert_close(y.float(), y_ref.to(dtype).float(), **tol)
            dx, db = grad_op(ops, act, dy, layout, b, y, dim, args, 0.5, True)
            assert dx.dtype == db.dtype == dtype
            torch.testing.assert_close(dx.float(), dx_ref.to(dtype).float(), **tol)
            torch.testing.assert_close(db.float(), db_ref.to(dtype).float(), **tol)
        a = randn(*shape, dtype=dtype, seed=12, device="cpu")
        torch.testing.assert_close(ops.per_sample_dot(x, x), reference.grad_sq_norm(x),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ops.per_sample_dot(x, a),
                                   (x.float() * a.float()).flatten(1).sum(1),
                                   rtol=1e-5, atol=1e-5)
        s = randn(shape[0], dtype=torch.float32, seed=13, device="cpu")
        expected = (x.float() * s.view(-1, *[1] * (x.ndim - 1))).to(dtype)
        torch.testing.assert_close(ops.scale_per_sample(x, s).float(), expected.float(), **tol)


def per_sample_cases():
    """Tensors with a batch dim: contiguous, channels_last, batch not outermost (copied),
    strided views, rank 1, several chunks per sample."""
    x = randn(5, 3, 7, 9, seed=14, device="cpu")
    yield x
    yield x.contiguous(memory_format=torch.channels_last)
    yield x.transpose(0, 1).contiguous().transpose(0, 1)
    yield x[:, ::2]
    yield randn(6, seed=15, device="cpu")
    yield randn(3, 1, seed=16, device="cpu")
    yield randn(2, 20001, seed=17, device="cpu")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_per_sample_ops_match_reference(ops, dtype):
    for i, x in enumerate(per_sample_cases()):
        x = x.to(dtype)
        other = randn(*x.shape, dtype=dtype, seed=30 + i, device="cpu")
        assert_matches(ops.per_sample_dot(x, x), reference.grad_sq_norm(x))
        for b in (other, other.contiguous(memory_format=torch.channels_last)
                  if x.ndim == 4 else other):
            expected = (x * b).flatten(1).sum(1) if x.ndim > 1 else x * b
            assert_matches(ops.per_sample_dot(x, b), expected)
        for s_dtype in (torch.float32, torch.float64):
            s = randn(x.shape[0], dtype=s_dtype, seed=40 + i, device="cpu")
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            expected = (x.to(acc) * s.to(acc).view(-1, *[1] * (x.ndim - 1))).to(dtype)
            y = ops.scale_per_sample(x, s)
            assert_matches(y, expected)
            batch_outermost = x.is_contiguous() or x.is_contiguous(
                memory_format=torch.channels_last)
            assert y.stride() == (x.stride() if batch_outermost else x.contiguous().stride())


def test_deterministic_across_threads(ops):
    """Sums are bitwise the same run to run and for 1 or 2 threads."""
    cases = [(randn(4, 64, 33, 65, dtype=torch.float32, seed=18, device="cpu"), 1),
             (randn(4, 64, 33, 65, dtype=torch.float32, seed=18, device="cpu")
              .contiguous(memory_format=torch.channels_last), 1),
             (randn(100003, dtype=torch.float32, seed=19, device="cpu"), 0)]
    a = randn(3, 100003, dtype=torch.float32, seed=20, device="cpu")

    def results():
        out = []
        for y, dim in cases:
            out += ops.bias_act_grad(y, y, dim, *act_args("lrelu", None), 1.0, True)
            out += ops.bias_act_grad_from_input(y, y, y.new_ones(y.shape[dim]), dim,
                                                *act_args("swish", 1.5), 0.5, True, True)
        return out + [ops.per_sample_dot(a, a), ops.per_sample_dot(a, a.flip(1))]

    assert_same_for_any_threads(results)


def assert_same_for_any_threads(results):
    """``results()``, a list of tensors, is bitwise the same run to run and for 1 or 2
    threads."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first, second = results(), results()
        torch.set_num_threads(1)
        single = results()
    finally:
        torch.set_num_threads(threads)
    for u, v, w in zip(first, second, single):
        assert torch.equal(u, v) and torch.equal(u, w)


def fake_cases():
    x = randn(3, 5, 7, 9, dtype=torch.float32, seed=21, device="cpu")
    return [x, x.contiguous(memory_format=torch.channels_last), x.permute(2, 0, 3, 1),
            x[:, ::2], x.transpose(0, 1)]


def fake_calls(ops, x, fake_s):
    args = act_args("lrelu", 0.7)
    dx, db = ops.bias_act_grad(x, x, 1, *args, 1.0, True)
    dx_only, none = ops.bias_act_grad(x, x, -1, *args, 1.0, False)
    b = x.new_zeros(x.shape[1])
    curved = act_args("tanh", None)
    return [ops.bias_act(x, b, 1, *args, 1.0), ops.bias_act(x, None, 3, *args, 2.0), dx, db,
            dx_only, none, ops.per_sample_dot(x, x), ops.scale_per_sample(x, fake_s(x)),
            *ops.bias_act_grad_from_input(x, x, b, 1, *curved, 2.0, True, True),
            *ops.bias_act_grad_from_input(x, x, None, -1, *curved, 1.0, False, False)]


def test_fake_kernels(ops):
    """Under FakeTensorMode and on meta tensors the ops give the real ops' shapes, dtypes and
    strides."""
    for x in fake_cases():
        real = fake_calls(ops, x, lambda t: torch.ones(t.shape[0]))
        with FakeTensorMode() as mode:
            fake = fake_calls(ops, mode.from_tensor(x), lambda t: torch.ones(t.shape[0]))
        meta_x = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
        meta = fake_calls(ops, meta_x, lambda t: torch.ones(t.shape[0], device="meta"))
        for r, f, m in zip(real, fake, meta):
            if r is None:
                assert f is None and m is None
                continue
            assert f.shape == m.shape == r.shape
            assert f.dtype == m.dtype == r.dtype
            assert f.stride() == m.stride() == r.stride()
            assert m.device.type == "meta"


def test_bad_inputs(ops):
    x = torch.ones(3, 5, dtype=torch.float64)
    args = act_args("lrelu", None)
    bad = [
        (TypeError, "x must be float16", lambda: ops.bias_act(x.long(), None, 1, *args, 1.0)),
        (ValueError, "x must have at least one dimension",
         lambda: ops.bias_act(x[0, 0], None, 0, *args, 1.0)),
        (IndexError, "dim=2 is out of range", lambda: ops.bias_act(x, None, 2, *args, 1.0)),
        (ValueError, r"b must be a 1-d tensor of length x.shape\[1\] = 5",
         lambda: ops.bias_act(x, torch.ones(3, dtype=torch.float64), 1, *args, 1.0)),
        (TypeError, "b has dtype", lambda: ops.bias_act(x, torch.ones(5), 1, *args, 1.0)),
        (ValueError, "b is on meta but x is on cpu",
         lambda: ops.bias_act(x, torch.ones(5, dtype=torch.float64, device="meta"), 1, *args,
                              1.0)),
        (ValueError, r"act must be 0 \(linear\), 1 \(relu\), 2 \(lrelu\), 3 \(tanh\), "
         r"4 \(sigmoid\), 5 \(elu\), 6 \(selu\), 7 \(softplus\) or 8 \(swish\), got 9",
         lambda: ops.bias_act(x, None, 1, 9, 0.2, 1.0, -1.0, 1.0)),
        (ValueError, r"act must be 0 \(linear\), 1 \(relu\) or 2 \(lrelu\) \(the others' "
         r"gradient is bias_act_grad_from_input\), got 3",
         lambda: ops.bias_act_grad(x, x, 1, 3, 0.2, 1.0, -1.0, 1.0, True)),
        (ValueError, r"act must be 3 \(tanh\), .* or 8 \(swish\) \(the others' gradient is "
         r"bias_act_grad\), got 2",
         lambda: ops.bias_act_grad_from_input(x, x, None, 1, *args, 1.0, True, True)),
        (ValueError, "dy has shape",
         lambda: ops.bias_act_grad_from_input(x[:2], x, None, 1, 3, 0.0, 1.0, -1.0, 1.0, True,
                                              True)),
        (ValueError, r"b must be a 1-d tensor of length x.shape\[0\] = 3",
         lambda: ops.bias_act_grad_from_input(x, x, torch.ones(5, dtype=torch.float64), 0, 3,
                                              0.0, 1.0, -1.0, 1.0, True, True)),
        (ValueError, "alpha must be", lambda: ops.bias_act(x, None, 1, 2, -0.1, 1.0, -1.0, 1.0)),
        (ValueError, "gain must be",
         lambda: ops.bias_act(x, None, 1, 2, 0.2, float("inf"), -1.0, 1.0)),
        (ValueError, "clamp must be",
         lambda: ops.bias_act(x, None, 1, 2, 0.2, 1.0, float("nan"), 1.0)),
        (ValueError, "scale must be",
         lambda: ops.bias_act(x, None, 1, 2, 0.2, 1.0, -1.0, float("nan"))),
        (ValueError, "dy has shape",
         lambda: ops.bias_act_grad(x[:2], x, 1, *args, 1.0, True)),
        (TypeError, "dy has dtype", lambda: ops.bias_act_grad(x.float(), x, 1, *args, 1.0, True)),
        (TypeError, "y must be float16", lambda: ops.bias_act_grad(x, x.int(), 1, *args, 1.0,
                                                                   True)),
        (ValueError, "b has shape", lambda: ops.per_sample_dot(x, x[:2])),
        (ValueError, "a must have at least one dimension",
         lambda: ops.per_sample_dot(x[0, 0], x[0, 0])),
        (TypeError, "s must be float32 or float64",
         lambda: ops.scale_per_sample(x, torch.ones(3, dtype=torch.float16))),
        (ValueError, r"s must be a 1-d tensor of length x.shape\[0\] = 3",
         lambda: ops.scale_per_sample(x, torch.ones(5))),
        (TypeError, "x must be float16", lambda: ops.scale_per_sample(x.long(), torch.ones(3))),
    ]
    for error, message, call in bad:
        with pytest.raises(error, match=message):
            call()


def test_status_and_reasons(ops):
    status = ext.status()
    assert status["cpu"] == "usable" and ext.reason("cpu") is None
    assert status["library"] is not None
    assert ext.available("cuda") == (ext.reason("cuda") is None)
    if torch.version.cuda is None:
        assert ext.reason("cuda") == f"torch {torch.__version__} has no CUDA (CPU kernels only)"
    assert not ext.available("mps") and "no kernels for mps" in ext.reason("mps")
    assert ext.build_dir().name == ext.cache_key()


@pytest.fixture
def installed(monkeypatch, tmp_path):
    """``(modules, loaded)``: the ahead-of-time modules put in ``modules`` (``{name: path}``)
    pass for installed, the just-in-time build folder is ``tmp_path``, and
    ``torch.ops.load_library`` appends each path to ``loaded`` and fails, so nothing is
    really loaded."""
    modules, loaded = {}, []
    monkeypatch.setattr(ext, "_module_path", modules.get)
    monkeypatch.setattr(ext, "build_dir", lambda: tmp_path)

    def load_library(path):
        loaded.append(path)
        raise OSError("undefined symbol: demo")

    monkeypatch.setattr(torch.ops, "load_library", load_library)
    return modules, loaded


def test_avx2_build_is_refused_unloaded_on_a_cpu_without_avx2(installed, monkeypatch, tmp_path):
    """An ahead-of-time build compiled for AVX2 is never loaded on a CPU without it (its code
    would crash there): the reason says so in one line and names the fix."""
    modules, loaded = installed
    monkeypatch.setattr(ext, "_cpu_has_avx2", lambda: False)
    modules["fastgan._C_avx2"] = tmp_path / "_C_avx2.so"
    state = ext._load()
    assert loaded == []
    assert state.library is None and state.cpu == state.cuda
    assert state.cpu == (f"{tmp_path / '_C_avx2.so'} (fastgan._C_avx2) was built for CPUs with "
                         "AVX2, FMA and F16C, and this CPU lacks them: not loaded; build for "
                         "this CPU with `python -m fastgan build-ext`")
    # a portable build beside it is tried (and here fails to load); the refusal stays first
    modules["fastgan._C_base"] = tmp_path / "_C_base.so"
    ext.aot_sources_record(tmp_path / "_C_base.so", "base").write_text(ext.sources_digest())
    assert ext._load().cpu == state.cpu
    assert loaded == [str(tmp_path / "_C_base.so")]


def test_builds_are_tried_in_order_on_an_avx2_cpu(installed, monkeypatch, tmp_path):
    """On an AVX2 CPU: the AVX2 build, then the portable one, then the just-in-time one."""
    modules, loaded = installed
    monkeypatch.setattr(ext, "_cpu_has_avx2", lambda: True)
    for name in ("fastgan._C_base", "fastgan._C_avx2"):
        modules[name] = tmp_path / f"{name}.so"
        ext.aot_sources_record(modules[name], name[-4:]).write_text(ext.sources_digest())
    (tmp_path / f"{ext.LIBRARY_NAME}.so").touch()
    state = ext._load()
    assert loaded == [str(tmp_path / "fastgan._C_avx2.so"),
                                   str(tmp_path / "fastgan._C_base.so"),
                                   str(tmp_path / f"{ext.LIBRARY_NAME}.so")]
    assert state.library is None and state.cpu.startswith("ABI mismatch: ")
    assert "fastgan._C_avx2" in state.cpu and "undefined symbol: demo" in state.cpu


@pytest.mark.parametrize("avx2", [True, False])
def test_cpu_capability_decides_flags_name_and_cache_key(avx2, monkeypatch):
    monkeypatch.setattr(ext, "_cpu_has_avx2", lambda: avx2)
    capability = "avx2" if avx2 else "base"
    assert ext.cpu_capability() == capability
    assert ("-mavx2" in ext.build_flags(with_cuda=False)["cxx"]) == avx2
    assert ext.aot_module(capability) == f"fastgan._C_{capability}"
    assert f"-{capability}-" in ext.cache_key()


def test_setup_names_the_ahead_of_time_module_by_cpu_capability(monkeypatch):
    """``FASTGAN_BUILD_EXT=1`` setup.py builds ``fastgan._C_<this CPU's capability>`` from
    the extension's sources (setup() is intercepted: nothing is compiled)."""
    calls = []
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setenv("FASTGAN_BUILD_EXT", "1")
    runpy.run_path(str(Path(ext.__file__).parent.parent / "setup.py"))
    kwargs, = calls
    module, = kwargs["ext_modules"]
    assert module.name == ext.aot_module(ext.cpu_capability())
    assert sorted(Path(s).name for s in module.sources) == sorted(
        p.name for p in ext.sources(ext.build_with_cuda()))


def test_a_stale_ahead_of_time_build_is_not_loaded(installed, monkeypatch, tmp_path):
    """An ahead-of-time build whose recorded sources differ from this checkout's kernels/ (or
    with no record, from an older fastgan) is refused unloaded, with the reason; one recording
    this checkout's digest is loaded."""
    modules, loaded = installed
    monkeypatch.setattr(ext, "_cpu_has_avx2", lambda: False)
    built = modules["fastgan._C_base"] = tmp_path / "_C_base.cpython-311-x86_64-linux-gnu.so"
    record = ext.aot_sources_record(built, "base")
    assert record == tmp_path / "_C_base.sources"
    state = ext._load()
    assert loaded == [] and state.cpu == (
        f"{built} (fastgan._C_base) has no record of the sources it was built from (an older "
        "fastgan built it): not loaded; rebuild it with `FASTGAN_BUILD_EXT=1 pip install "
        "--no-build-isolation -e .` or build with `python -m fastgan build-ext`")
    record.write_text("0123456789ab\n")
    assert loaded == [] and ext._load().cpu.startswith(
        f"{built} (fastgan._C_base) was built from other kernels/ sources (0123456789ab) than "
        f"this checkout's ({ext.sources_digest()}): not loaded")
    record.write_text(ext.sources_digest() + "\n")
    ext._load()
    assert loaded == [str(built)]


def test_a_failing_ahead_of_time_build_installs_the_pure_package(tmp_path):
    """``FASTGAN_BUILD_EXT=1 pip install`` with a compiler that fails: the installation
    succeeds without the extension, pip's log says why, and the installed fastgan's
    backend_info() quotes the reason."""
    repo = Path(ext.__file__).resolve().parent.parent
    src = tmp_path / "src"
    for name in ("fastgan", "kernels"):
        shutil.copytree(repo / name, src / name, ignore=shutil.ignore_patterns("__pycache__",
                                                                               "_C_*"))
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(repo / name, src / name)
    env = dict(os.environ, FASTGAN_BUILD_EXT="1", CXX="false", MAX_JOBS="1",
               FASTGAN_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-v", "--no-deps",
                           "--no-build-isolation", "--target", str(tmp_path / "site"), str(src)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "fastgan: the optional compiled extension was not built (" in done.stdout + done.stderr
    installed = tmp_path / "site" / "fastgan"
    assert not list(installed.glob("_C_*.so"))
    reason = (installed / ext.AOT_BUILD_ERROR).read_text().strip()
    assert reason
    info = subprocess.run(
        [sys.executable, "-c", "import fastgan; print(fastgan.backend_info()['cpu_extension'])"],
        env=dict(env, PYTHONPATH=str(tmp_path / "site")), cwd=tmp_path, capture_output=True,
        text=True, timeout=300)
    assert info.returncode == 0, info.stderr[-3000:]
    assert info.stdout.strip().startswith(
        f"not used: the ahead-of-time build failed ({reason}); not built")
