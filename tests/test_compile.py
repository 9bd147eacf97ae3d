"""torch.compile of fastgan layers: one graph (fullgraph=True), the same numbers as eager.

While torch.compile traces, the backend rule takes the compiled extension, whose
``torch.ops.fastgan`` operators have fake kernels and trace into the graph inside fastgan's own
autograd Functions (docs/design.md section 8). Compiling takes tens of seconds on CPU, so one
small model covers FusedConv2d, FusedLeakyReLU, upfirdn2d (filter2d), FusedLinear (equalized
lr, a curved activation), bias_act and grad_sq_norm, forward and first-order backward.
"""
import re

import pytest
import torch
from torch._inductor.compile_fx import compile_fx

import fastgan
from fastgan import ext
from fastgan.nn import FusedConv2d, FusedLeakyReLU, FusedLinear
from op_helpers import TOL, randn
from test_ext import require_ext


class SmallModel(torch.nn.Module):
    """``[N, 2, 4, 4] -> [N]``: FusedConv2d (linear, stride 2), FusedLeakyReLU, filter2d (a
    [1, 2, 1] blur), FusedLinear (swish, whose gradient reads its input; equalized lr),
    FusedLinear with clamp, bias_act (relu, a learned bias along dim 0 of the transposed
    output), grad_sq_norm."""

    def __init__(self):
        super().__init__()
        self.conv = FusedConv2d(2, 4, 3, stride=2, padding=1, act="linear")
        self.act = FusedLeakyReLU(4)
        self.fc1 = FusedLinear(16, 8, act="swish", equalized_lr=True, lr_mul=0.5, bias_init=0.1)
        self.fc2 = FusedLinear(8, 5, clamp=1.5)
        self.bias = torch.nn.Parameter(torch.linspace(-0.5, 0.5, 5))
        self.register_buffer("blur", fastgan.setup_filter([1, 2, 1]))

    def forward(self, x):
        # .to(float64) converts buffers too; filters are float32, as in StyleGAN2-ADA
        h = self.fc1(fastgan.filter2d(self.act(self.conv(x)), self.blur.float()).flatten(1))
        h = fastgan.bias_act(self.fc2(h).t(), self.bias, 0, "relu", clamp=2.0)
        return fastgan.grad_sq_norm(h.t())


def run(model, x):
    """The output and the gradients of x and of every parameter for a fixed upstream
    gradient."""
    x = x.detach().requires_grad_(True)
    out = model(x)
    leaves = [x, *model.parameters()]
    dout = randn(*out.shape, dtype=out.dtype, seed=3, device=out.device)
    return [out.detach(), *torch.autograd.grad(out, leaves, dout)]


def graph_code(gm) -> str:
    """The code of a traced graph and of its subgraphs (autograd Functions' forwards and
    backwards)."""
    return "\n".join(module.code for module in gm.modules() if hasattr(module, "code"))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_compiled_model_matches_eager(device, launches, monkeypatch):
    require_ext()  # builds the CUDA kernels too where torch has CUDA and nvcc is found
    if not ext.available(device):
        pytest.skip(f"the extension cannot run {device} tensors: {ext.reason(device)}")
    torch.manual_seed(0)
    model = SmallModel().to(device=device, dtype=torch.float64)
    x = randn(3, 2, 4, 4, seed=1, device=device)
    # Eager runs what the compiled model runs, so the counts below are exact: the extension,
    # and conv2d_act's cudnn path (on CUDA, untimed; it is what tracing takes).
    fastgan.set_backend("ext")
    monkeypatch.setenv("FASTGAN_CONV", "cudnn")
    eager = run(model, x)
    # the conv's epilogue (linear, gain 1, a bias) is a plain bias add: no gradient kernel
    assert launches() == {"conv2d_act_cudnn": 1, "ext_bias_act": 5, "ext_bias_act_grad": 3,
                          "ext_bias_act_grad_from_input": 1, "ext_per_sample_dot": 1,
                          "ext_scale_per_sample": 1, "ext_upfirdn2d": 2}
    fastgan.set_backend(None)  # auto: while torch.compile traces, the extension
    fastgan.reset_launch_counts()
    graphs = []

    def inductor(gm, example_inputs):
        graphs.append(graph_code(gm))
        return compile_fx(gm, example_inputs)

    compiled = torch.compile(model, fullgraph=True, backend=inductor)
    got = run(compiled, x)
    assert len(graphs) == 1
    assert set(re.findall(r"torch\.ops\.fastgan\.(\w+)", graphs[0])) == {
        "bias_act", "bias_act_grad", "bias_act_grad_from_input", "per_sample_dot",
        "scale_per_sample", "upfirdn2d"}
    assert launches() == {}  # compiled graphs launch without Python
    for g, e in zip(got, eager):
        torch.testing.assert_close(g, e, **TOL[torch.float64])
