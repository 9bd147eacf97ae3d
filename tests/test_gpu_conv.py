"""conv2d_act compiled on a CUDA GPU: half precision, realistic shapes, both fused paths, the
choice among them and eager PyTorch.

Each problem is checked against the float64 reference computed from the same (rounded)
inputs; the error is measured relative to the largest output magnitude.
"""
import json
import time

import pytest
import torch
import torch.nn.functional as F
import triton

import fastgan
from fastgan import reference
from fastgan.ops import conv2d_act as conv_mod
from fastgan.ops import conv_choice as choice
from fastgan.ops.conv_choice import PATHS

pytestmark = pytest.mark.gpu

# Largest error / largest |reference| allowed: rounding of the output (bf16: 2^-8,
# fp16: 2^-11) and of tf32 products (2^-11) over K-long sums in fp32.
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 5e-3}

# (x shape, weight shape, stride, padding, groups)
SHAPES = {
    "3x3": ((8, 128, 64, 64), (128, 128, 3, 3), 1, 1, 1),
    "4x4_stride2": ((8, 64, 32, 32), (128, 64, 4, 4), 2, 1, 1),
    "1x1": ((8, 128, 32, 32), (256, 128, 1, 1), 1, 0, 1),
    "grouped16": ((8, 256, 32, 32), (256, 16, 3, 3), 1, 1, 16),
}


def make(shape_name, dtype, channels_last=True, seed=0):
    x_shape, w_shape, stride, padding, groups = SHAPES[shape_name]
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(x_shape, device="cuda", generator=g).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    fan_in = w_shape[1] * w_shape[2] * w_shape[3]
    w = (torch.randn(w_shape, device="cuda", generator=g) / fan_in ** 0.5).to(dtype)
    b = torch.randn(w_shape[0], device="cuda", generator=g).to(dtype)
    return x, w, b, dict(stride=stride, padding=padding, groups=groups)


def relative_error(y, x, w, b, geom, **act):
    expected = reference.conv2d_act(x.double(), w.double(), b.double(), **geom, **act)
    return ((y.double() - expected).abs().max() / expected.abs().max()).item()


@pytest.fixture
def path(request, monkeypatch):
    """Force one forward implementation through FASTGAN_CONV."""
    monkeypatch.setenv("FASTGAN_CONV", request.param)
    return request.param


@pytest.mark.parametrize("path", ["triton"], indirect=True)
@pytest.mark.parametrize("shape_name, dtype", [
    ("3x3", torch.bfloat16), ("3x3", torch.float16), ("3x3", torch.float32),
    ("4x4_stride2", torch.bfloat16), ("1x1", torch.bfloat16), ("grouped16", torch.bfloat16),
    ("grouped16", torch.float32),
])
def test_triton_forward_matches_float64_reference(shape_name, dtype, path, launches):
    x, w, b, geom = make(shape_name, dtype)
    y = fastgan.conv2d_act(x, w, b, **geom, act="lrelu", clamp=256)
    assert launches()["conv2d_act_fwd"] == 1
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(y, x, w, b, geom, act="lrelu", clamp=256) < TOLERANCE[dtype]


@pytest.mark.parametrize("path", ["triton", "cudnn"], indirect=True)
def test_both_paths_nchw_bf16(path, launches):
    x, w, b, geom = make("3x3", torch.bfloat16, channels_last=False)
    y = fastgan.conv2d_act(x, w, b, **geom, act="relu")
    assert launches()["conv2d_act_fwd" if path == "triton" else "conv2d_act_cudnn"] == 1
    assert y.is_contiguous()
    assert relative_error(y, x, w, b, geom, act="relu") < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("path", ["triton"], indirect=True)
def test_fp32_without_tf32_is_ieee(path, launches, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    x, w, b, geom = make("grouped16", torch.float32)
    y = fastgan.conv2d_act(x, w, b, **geom, act="lrelu")
    assert launches()["conv2d_act_fwd"] == 1
    assert relative_error(y, x, w, b, geom, act="lrelu") < 1e-5


@pytest.mark.parametrize("path", ["triton"], indirect=True)
def test_float64(path, launches):
    x = torch.randn(2, 8, 9, 9, device="cuda", dtype=torch.float64)
    w = torch.randn(16, 4, 3, 3, device="cuda", dtype=torch.float64)
    b = torch.randn(16, device="cuda", dtype=torch.float64)
    y = fastgan.conv2d_act(x, w, b, 2, 1, 2, "lrelu")
    assert launches()["conv2d_act_fwd"] == 1
    torch.testing.assert_close(y, reference.conv2d_act(x, w, b, 2, 1, 2, "lrelu"), atol=1e-10,
                               rtol=0)


@pytest.mark.parametrize("path", ["triton"], indirect=True)
def test_int64_offsets(path, launches, monkeypatch):
    """The 64-bit offset variant (tensors past 2**31 elements) compiles and computes the same."""
    monkeypatch.setattr(conv_mod, "INT32_MAX", 1000)
    x, w, b, geom = make("grouped16", torch.bfloat16)
    y = fastgan.conv2d_act(x, w, b, **geom, act="lrelu")
    assert launches()["conv2d_act_fwd"] == 1
    assert relative_error(y, x, w, b, geom, act="lrelu") < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("path", ["triton", "cudnn"], indirect=True)
def test_r1_double_backward(path, launches):
    """R1 through three fused convs (stride 2, groups) on CUDA matches float64 eager."""
    torch.backends.cudnn.allow_tf32 = False
    try:
        g = torch.Generator(device="cuda").manual_seed(0)
        shapes = [((32, 16, 4, 4), 2, 1, 1), ((32, 16, 3, 3), 1, 1, 2), ((1, 32, 3, 3), 1, 0, 1)]
        params = [(torch.randn(s, device="cuda", generator=g) / (s[1] * s[2] * s[3]) ** 0.5,
                   torch.randn(s[0], device="cuda", generator=g) * 0.1, st, pad, grp)
                  for s, st, pad, grp in shapes]
        x0 = torch.randn(4, 16, 16, 16, device="cuda", generator=g)
        grads = []
        for op, dtype in ((fastgan.conv2d_act, torch.float32),
                          (reference.conv2d_act, torch.float64)):
            ps = [(w.to(dtype).detach().requires_grad_(), b.to(dtype).detach().requires_grad_(),
                   st, pad, grp)
                  for w, b, st, pad, grp in params]
            x = x0.to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
            h = x
            for i, (w, b, st, pad, grp) in enumerate(ps):
                h = op(h, w, b, st, pad, grp, "lrelu" if i < 2 else "linear")
            gx, = torch.autograd.grad(h.sum(), x, create_graph=True)
            (F.softplus(-h).mean() + 5 * reference.grad_sq_norm(gx).mean()).backward()
            grads.append([t.grad.double() for w, b, *_ in ps for t in (w, b)])
        for got, expected in zip(*grads):
            assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-4
        assert launches()["conv2d_act_fwd" if path == "triton" else "conv2d_act_cudnn"] == 3
    finally:
        torch.backends.cudnn.allow_tf32 = True


# The launches of one forward by each path (``plain`` is eager torch: no fastgan kernel).
FORWARD_LAUNCHES = {"triton": {"conv2d_act_fwd": 1},
                    "cudnn": {"conv2d_act_cudnn": 1, "bias_act_fwd": 1}, "plain": {}}


def test_auto_choice_times_all_three_caches_and_saves(measured_choices, monkeypatch, launches):
    """The first call of a problem measures triton, cudnn and plain (forward and backward);
    later calls reuse the answer -- the eager one, or the GPU-time one in graph_mode() -- and a
    new process reads it from the cache file, keyed with the GPU and library versions."""
    monkeypatch.delenv("FASTGAN_CONV", raising=False)
    fastgan.set_backend("triton")  # bias_act by Triton: the measurements and counts are the conv's
    cache, measured = measured_choices
    x, w, b, geom = make("1x1", torch.bfloat16, seed=3)
    x, w, b = (t.requires_grad_() for t in (x, w, b))

    y = fastgan.conv2d_act(x, w, b, **geom, act="lrelu")
    assert len(measured) == 3
    assert launches()["conv2d_act_fwd"] > 1 and launches()["conv2d_act_cudnn"] > 1
    (name, entry), = fastgan.backend_info()["conv2d_act_choices"]["choices"].items()
    assert entry["source"] == "timed" and {entry["eager"], entry["graph"]} <= set(PATHS)
    for path in PATHS:
        assert entry["gpu_ms"][path] > 0 and entry["host_ms"][path] > 0
    assert entry["eager"] == min(PATHS, key=lambda p: max(entry["gpu_ms"][p],
                                                          entry["host_ms"][p]))
    assert entry["graph"] == min(PATHS, key=entry["gpu_ms"].get)
    assert " grads x,w,b " in name and torch.cuda.get_device_name() in name
    assert f"torch {torch.__version__} " in name and f"triton {triton.__version__}" in name
    assert relative_error(y, x.detach(), w.detach(), b.detach(), geom,
                          act="lrelu") < TOLERANCE[torch.bfloat16]

    fastgan.reset_launch_counts()
    fastgan.conv2d_act(x, w, b, **geom, act="lrelu")
    assert launches() == FORWARD_LAUNCHES[entry["eager"]]
    fastgan.reset_launch_counts()
    with choice.graph_mode():
        fastgan.conv2d_act(x, w, b, **geom, act="lrelu")
    assert launches() == FORWARD_LAUNCHES[entry["graph"]]
    assert len(measured) == 3  # decided once, in memory
    saved = json.loads(cache.read_text())[name]
    assert saved == {k: entry[k] for k in ("eager", "graph", "gpu_ms", "host_ms", "sources")}

    choice.clear_choices()
    fastgan.conv2d_act(x, w, b, **geom, act="lrelu")
    assert len(measured) == 3  # read back from the file
    info = fastgan.backend_info()["conv2d_act_choices"]
    assert info["choices"][name]["source"] == "file" and info["cache_file"] == str(cache)
    choice.clear_choices()


def test_measure_separates_gpu_time_from_host_time():
    """GPU time excludes the host's gaps between calls (the stream is held until all calls
    are queued) and host time excludes the GPU's work (no synchronization)."""
    device = torch.device("cuda")
    cycles_per_ms = choice._sleep_cycles_per_ms(torch.cuda.current_device())
    gpu_ms, host_ms = choice._measure(
        lambda: torch.cuda._sleep(int(0.5 * cycles_per_ms)), device)
    assert 0.35 < gpu_ms < 0.75 and host_ms < 0.2
    gpu_ms, host_ms = choice._measure(
        lambda: (time.sleep(0.002), torch.cuda._sleep(int(0.02 * cycles_per_ms))), device)
    assert host_ms >= 2.0 and gpu_ms < 0.2


def test_a_problem_first_met_during_capture_runs_the_fixed_path_untimed(monkeypatch, launches):
    x, w, b, geom = make("grouped16", torch.bfloat16, seed=6)
    monkeypatch.setenv("FASTGAN_CONV", "cudnn")
    fastgan.conv2d_act(x, w, b, **geom, act="lrelu")  # compiles bias_act before capture
    monkeypatch.delenv("FASTGAN_CONV")
    choice.clear_choices()
    fastgan.reset_launch_counts()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fastgan.conv2d_act(x, w, b, **geom, act="lrelu")
    graph.replay()
    torch.cuda.synchronize()
    assert launches() == {"conv2d_act_cudnn": 1, "bias_act_fwd": 1}
    (name, entry), = fastgan.backend_info()["conv2d_act_choices"]["choices"].items()
    assert entry["source"] == "untimed" and "CUDA graph capture" in entry["reason"]
    assert (entry["eager"], entry["graph"]) == ("cudnn", "cudnn")
    assert relative_error(y, x, w, b, geom, act="lrelu") < TOLERANCE[torch.bfloat16]
    choice.clear_choices()


def test_graphed_steps_warm_up_and_capture_in_graph_mode():
    modes = []

    def step(x):
        modes.append(choice._graph_depth > 0)
        return x * 2

    graphed = fastgan.cuda_graph_step(step, torch.zeros(4, device="cuda"), warmup=2)
    for _ in range(4):
        out = graphed(torch.ones(4, device="cuda"))
    assert modes == [True, True, True]  # 2 warm-up calls, the capture; replays call nothing
    assert choice._graph_depth == 0 and out.tolist() == [2.0] * 4


@pytest.mark.parametrize("path", ["triton", "cudnn"], indirect=True)
def test_no_weight_gradients_on_cuda(path, launches):
    """CUDA backward passes run on autograd's device threads: no_weight_gradients() entered
    by the caller holds there (weight and bias get no gradient, the input does)."""
    x, w, b, geom = make("1x1", torch.bfloat16, seed=4)
    x, w, b = (t.detach().requires_grad_() for t in (x, w, b))
    with fastgan.no_weight_gradients():
        fastgan.conv2d_act(x, w, b, **geom, act="lrelu").float().sum().backward()
    assert w.grad is None and b.grad is None and x.grad is not None
    fastgan.conv2d_act(x, w, b, **geom, act="lrelu").float().sum().backward()
    assert w.grad is not None and b.grad is not None


@pytest.mark.parametrize("path", ["triton"], indirect=True)
@pytest.mark.parametrize("weight_layout", ["nchw", "channels_last"])
def test_weight_read_in_place_with_weight_gain(path, weight_layout, launches):
    """NCHW and channels_last weights, read in place, with an equalized-lr weight gain."""
    x, w, b, geom = make("grouped16", torch.bfloat16, seed=5)
    if weight_layout == "channels_last":
        w = w.contiguous(memory_format=torch.channels_last)
    y = fastgan.conv2d_act(x, w, b, **geom, act="lrelu", weight_gain=0.5)
    expected = reference.conv2d_act(x.double(), w.double(), b.double(), **geom, act="lrelu",
                                    weight_gain=0.5)
    assert ((y.double() - expected).abs().max() / expected.abs().max()).item() < 1e-2
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert launches()["conv2d_act_fwd"] == 1
