"""``python -m benchmarks --count`` (``benchmarks/counts.py``, docs/design.md sections 6 and 7):
the counts of a small stack equal a hand count (kernels, bytes, FLOPs) for eager and fastgan,
R1 counted pass by pass equals the R1-work test's exact counts, and the counts files (with a
GPU's measured results beside them) are written as documented. Everything runs on meta
tensors, with fastgan's Triton launches recorded, not run."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

import fastgan
from benchmarks import count_report, counts, report
from benchmarks.common import conv_path_forced
from benchmarks.op_cases import Conv, conv_stack
from benchmarks.runner import parse_args
from fastgan import reference
from fastgan.ops.activation import act_params
from test_conv2d_act import R1_INNER, R1_OUTER, _stack_forward, _stack_params

REPO = Path(__file__).resolve().parent.parent
META = torch.device("meta")
F32 = 4  # bytes per element


def nbytes(*shape) -> int:
    return F32 * math.prod(shape)


def conv_flops(n, cout, ho, wo, cin_per_group, k) -> int:
    """2 x multiply-adds of a convolution."""
    return 2 * n * cout * ho * wo * cin_per_group * k * k


# The two-layer stack: 3x3 conv 4 -> 6 and 1x1 conv 6 -> 3, bias + lrelu each, on 2x4x5x5.
N, H, W = 2, 5, 5
LAYERS = (Conv(4, 6), Conv(6, 3, k=1))
X, Y1, Y2 = nbytes(N, 4, H, W), nbytes(N, 6, H, W), nbytes(N, 3, H, W)
W1, B1, W2, B2 = nbytes(6, 4, 3, 3), nbytes(6), nbytes(3, 6, 1, 1), nbytes(3)
F1, F2 = conv_flops(N, 6, H, W, 4, 3), conv_flops(N, 3, H, W, 6, 1)


def stack_fwd_bwd(conv2d_act):
    """A fwd+bwd call of the stack on meta tensors: gradients of x and every parameter."""
    def build():
        x = torch.empty(N, 4, H, W, device=META, requires_grad=True)
        params = [torch.empty(6, 4, 3, 3, device=META, requires_grad=True),
                  torch.empty(6, device=META, requires_grad=True),
                  torch.empty(3, 6, 1, 1, device=META, requires_grad=True),
                  torch.empty(3, device=META, requires_grad=True)]
        dy = torch.empty(N, 3, H, W, device=META)
        return lambda: torch.autograd.grad(conv_stack(conv2d_act, LAYERS, x, *params),
                                           [x, *params], dy)
    return build


def kernel_set(counter) -> Counter:
    return Counter((k.name, k.read, k.written, k.flops) for k in counter.kernels)


def test_eager_stack_counts_equal_a_hand_count():
    """Per layer, forward: the convolution, then the bias add, leaky ReLU and gain, each
    reading and writing the layer's output; backward: the gain's mul, leaky ReLU's backward
    (reads the incoming gradient and the pre-activation), the bias gradient's sum, and one
    convolution-backward kernel for the input gradient and one for the weight gradient."""
    counter = counts.count_call(stack_fwd_bwd(reference.conv2d_act), None)
    expected = Counter()
    for x, w, b, y, f in ((X, W1, B1, Y1, F1), (Y1, W2, B2, Y2, F2)):
        expected.update([("aten.convolution", x + w, y, f), ("aten.add", y + b, y, 0),
                         ("aten.leaky_relu", y, y, 0), ("aten.mul", y, y, 0),
                         ("aten.mul", y, y, 0), ("aten.leaky_relu_backward", 2 * y, y, 0),
                         ("aten.sum", y, b, 0),
                         ("aten.convolution_backward[input]", y + w, x, f),
                         ("aten.convolution_backward[weight]", y + x, w, f)])
    assert kernel_set(counter) == expected
    assert len(counter.kernels) == 18 and counter.triton == 0
    row = counts.summarize(counter)
    assert row["flops"] == 3 * (F1 + F2)
    assert row["bytes_read"] + row["bytes_written"] == sum(
        (r + w) * n for (_, r, w, _), n in expected.items())


@pytest.mark.parametrize("path", ["triton", "cudnn"])
def test_fastgan_stack_counts_equal_a_hand_count(path):
    """Forward per layer: the fused kernel (triton: reads x, w, b and the activation's
    parameters, writes y), or the convolution then ``bias_act_fwd`` (cudnn). Backward per
    layer: ``bias_act_grad`` (reads dy, y and the parameters; writes dz and one fp32 partial
    bias sum per (sample, channel) row: each row's H x W pixels fit one block), the sum of the
    partials, the input gradient as a transposed convolution and the weight gradient."""
    counter = counts.count_call(stack_fwd_bwd(fastgan.conv2d_act), path)
    p = act_params(reference.resolve_activation("lrelu"), torch.float32, META).nbytes
    expected = Counter()
    for x, w, b, y, f, c in ((X, W1, B1, Y1, F1, 6), (Y1, W2, B2, Y2, F2, 3)):
        if path == "triton":
            expected.update([("conv2d_act_fwd", x + w + b + p, y, f)])
        else:
            expected.update([("aten.convolution", x + w, y, f),
                             ("bias_act_fwd", y + b + p, y, 0)])
        partial = nbytes(N * c)
        expected.update([("bias_act_grad", 2 * y + p, y + partial, 0),
                         ("aten.sum", partial, b, 0), ("aten.convolution", y + w, x, f),
                         ("aten.convolution_backward[weight]", y + x, w, f)])
    assert kernel_set(counter) == expected
    assert counter.triton == 4
    assert len(counter.kernels) == (10 if path == "triton" else 12)
    assert counts.summarize(counter)["flops"] == 3 * (F1 + F2)


def _on_meta(params):
    return [(w.detach().to(META).requires_grad_(), b.detach().to(META).requires_grad_(), geom)
            for w, b, geom in params]


def _convs_and_launches(counter) -> tuple[dict, dict]:
    """A count as the R1-work test sees it: convolutions by kind, Triton launches by name."""
    names = Counter(k.name for k in counter.kernels)
    convs = {"forward": names["aten.convolution"],
             "input_grad": names["aten.convolution_backward[input]"],
             "weight_grad": names["aten.convolution_backward[weight]"]}
    return convs, dict(Counter(k.name for k in counter.kernels if "." not in k.name))


@pytest.mark.parametrize("path", ["triton", "cudnn"])
def test_r1_counts_equal_the_r1_work_tests(path):
    """R1 on the R1-work test's 3-layer stack (tests/test_conv2d_act.py), counted pass by
    pass: the convolutions and Triton launches are exactly the ones that test asserts, and
    the other kernels are the losses': inner ``out.sum()`` and its gradient's seed (a
    ``ones_like``; the last layer is a plain bias add, whose gradient is that seed itself);
    outer the norm's sum and seed, the partial sums of ``per_sample_dot`` and ``2 * dout``."""
    params = _on_meta(_stack_params())
    x = torch.empty(2, 2, 8, 8, dtype=torch.float64, device=META, requires_grad=True)
    state = {}

    def inner():
        out = _stack_forward(fastgan.conv2d_act, x, params)
        with counts.KernelCounter() as counter:
            state["gx"], = torch.autograd.grad(out.sum(), x, create_graph=True)
        return counter

    def outer():
        with counts.KernelCounter() as counter:
            fastgan.grad_sq_norm(state["gx"]).sum().backward()
        return counter

    for run, expected, others in ((inner, R1_INNER, {"aten.sum": 1, "aten.ones_like": 1}),
                                  (outer, R1_OUTER, {"aten.sum": 2, "aten.ones_like": 1,
                                                     "aten.mul": 1})):
        with fastgan.ops.launch.recording(), conv_path_forced(path):
            counter = run()
        convs, launched = _convs_and_launches(counter)
        assert (convs, launched) == expected
        rest = Counter(k.name for k in counter.kernels if k.name.startswith("aten.")
                       and not k.name.startswith("aten.convolution"))
        assert rest == others
        assert len(counter.kernels) == sum(convs.values()) + sum(launched.values()) + sum(
            others.values())


def test_kernel_rules():
    """What launches nothing, and the bytes of views, expanded and twice-passed tensors."""
    with counts.KernelCounter() as counter:
        a = torch.empty(4, 8, device=META)
        a.view(8, 4).t().detach()
        b = torch.empty(8, device=META).expand(4, 8)  # storage read once: 8 elements
        a.add(b)
        a.mul(a)  # a read once
        torch.zeros_like(a)  # reads no data
        a.add_(1.0)  # reads and writes a
        a[:2].clone()  # the slice only
    assert [(k.name, k.read, k.written) for k in counter.kernels] == [
        ("aten.add", nbytes(4, 8) + nbytes(8), nbytes(4, 8)),
        ("aten.mul", nbytes(4, 8), nbytes(4, 8)),
        ("aten.zeros_like", 0, nbytes(4, 8)),
        ("aten.add_", nbytes(4, 8), nbytes(4, 8)),
        ("aten.clone", nbytes(2, 8), nbytes(2, 8))]


def test_pointer_roles_come_from_the_kernel_source():
    from fastgan.ops import bias_act, conv2d_act, grad_sq_norm

    def written(kernel):
        return counts.pointer_roles(kernel)[1]

    assert written(bias_act._bias_act_fwd_kernel) == {"y_ptr"}
    assert written(bias_act._bias_act_grad_kernel) == {"dx_ptr", "partial_ptr"}
    assert written(conv2d_act._conv2d_act_fwd_kernel) == {"y_ptr"}
    assert written(grad_sq_norm._per_sample_dot_kernel) == {"partial_ptr"}
    assert written(grad_sq_norm._scale_per_sample_kernel) == {"y_ptr"}


def test_floor_is_the_larger_of_bandwidth_and_compute_time():
    h100 = counts.GPUS[0]
    assert h100.floor_ms(3.35e9, 0, "bfloat16") == pytest.approx(1.0)
    assert h100.floor_ms(1, 989.5e9, "bfloat16") == pytest.approx(1.0)
    assert h100.floor_ms(1, 494.5e9, "float32") == pytest.approx(1.0)
    assert counts.gpu_for("NVIDIA H100 80GB HBM3") is h100
    assert counts.gpu_for("NVIDIA H200").name == "H200"
    assert counts.gpu_for("NVIDIA H100 PCIe") is None  # another bandwidth: no figures


def _fake_results(device: str, counts_doc: dict) -> dict:
    """A GPU results file (docs/design.md section 7) measuring the first counted case:
    eager at twice its floor, fastgan at 1.5x the lower fastgan floor."""
    row = counts_doc["results"][0]
    key = {k: row[k] for k in ("bench", "mode", "shape", "dtype")}
    group = report.group_rows(counts_doc["results"])[tuple(key.values())]
    gpu = counts.gpu_for(device).name
    fast = min(group[p]["floor_ms"][gpu] for p in count_report.FASTGAN)

    def timed(provider, ms):
        return {**key, "provider": provider, "median_ms": ms, "p20_ms": ms, "p80_ms": ms,
                "peak_mem_mb": 1.0, "gbps": None, "status": "ok", "note": ""}
    return {"device": device, "torch": "2.11.0", "triton": "3.6.0", "fastgan": "abc",
            "date": "2030-01-01", "copy_gbps": 3000.0,
            "results": [timed("eager", 2 * group["eager"]["floor_ms"][gpu]),
                        timed("fastgan", 1.5 * fast)]}


def test_count_run_writes_counts_and_puts_measured_results_beside_predictions(tmp_path):
    """``--count --smoke`` on two benches: counts.json rows for every case and provider
    (documented keys, floors per GPU); with a GPU results file in the folder, counts.md
    shows its measured medians beside the predicted floors."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--count", "--smoke", "--bench",
                           "bias_act", "r1_step", "--dtype", "fp32", "--out", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "counts.json").read_text())
    assert set(doc) == set(counts.HEADER_KEYS) | {"results"}
    assert [g["name"] for g in doc["gpus"]] == ["H100 SXM", "H200"]
    cases = counts.count_cases("smoke", ["bias_act", "r1_step"])
    expected = {(*c.key, p) for c in cases if c.dtype_name == "float32"
                for p in counts.COUNT_PROVIDERS}
    assert {report.row_key(r) for r in doc["results"]} == expected
    for row in doc["results"]:
        assert row["status"] == "ok", row
        assert row["launches"] > 0 and row["bytes_read"] > 0 and row["bytes_written"] > 0
        assert set(row["floor_ms"]) == {"H100 SXM", "H200"}
        assert row["launches"] == sum(k["launches"] for k in row["kernels"].values())
    assert not any(r["mode"].endswith("+graph") for r in doc["results"])
    md = (tmp_path / "counts.md").read_text()
    assert "## Whole steps" in md and "## Ops" in md and "Predicted and measured" not in md
    device = "NVIDIA H100 80GB HBM3"
    results = _fake_results(device, doc)
    (tmp_path / "nvidia-h100-80gb-hbm3.json").write_text(json.dumps(results))
    count_report.write_reports(tmp_path / "counts.json")
    md = (tmp_path / "counts.md").read_text()
    assert f"## Predicted and measured: {device} (H100 SXM figures)" in md
    eager, fastgan_row = results["results"]
    table = md[md.index("## Predicted and measured"):]
    line = next(line for line in table.splitlines() if line.startswith(f"| {eager['bench']} "))
    cells = [c.strip() for c in line.strip("|").split("|")]
    group = report.group_rows(doc["results"])[report.row_key(eager)[:4]]
    assert cells[4] == f"{group['eager']['floor_ms']['H100 SXM']:.3g}"
    assert cells[5] == f"{eager['median_ms']:.4g}" and cells[7] == f"{fastgan_row['median_ms']:.4g}"
    assert cells[9] == f"{eager['median_ms'] / fastgan_row['median_ms']:.2f}x"
    from PIL import Image
    assert max(Image.open(tmp_path / "counts.png").size) <= 2000


def test_count_refuses_the_timing_options(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--count", "--provider", "eager"])
    assert "--count times nothing" in capsys.readouterr().err
