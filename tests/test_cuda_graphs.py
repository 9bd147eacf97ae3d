"""fastgan.cuda_graph_step: argument checks on any machine; capture on a GPU.

The GPU tests capture whole steps -- R1's double backward through fused convs included -- and
compare N replayed steps with N eager ones.
"""
import copy

import pytest
import torch

import fastgan
from fastgan.models import build_discriminator, build_generator
from fastgan.regularizers import LazyR1
from fastgan.train.steps import TrainSteps


def test_static_inputs_must_be_cuda_tensors():
    with pytest.raises(ValueError, match="at least one static input"):
        fastgan.cuda_graph_step(lambda: None)
    with pytest.raises(TypeError, match="static input 0 must be a torch.Tensor"):
        fastgan.cuda_graph_step(lambda x: x, [1.0])
    with pytest.raises(ValueError, match="static input 0 is on cpu; CUDA graphs need CUDA"):
        fastgan.cuda_graph_step(lambda x: x, torch.zeros(2))


def test_inputs_must_match_their_static_inputs():
    """A batch of 1, uint8 images, a batch of 3 or a tensor on another device is a clear error
    naming the input and what differs (checked on CPU tensors; the copy itself needs a GPU)."""
    from fastgan.cuda_graphs import check_inputs

    static = (torch.zeros(4, 3, 8, 8), torch.zeros(4, 16))
    check_inputs(static, ())
    check_inputs(static, (torch.ones(4, 3, 8, 8), torch.ones(4, 16)))
    cases = [
        ((torch.ones(1, 3, 8, 8), static[1]), ValueError,
         r"input 0 has shape \(1, 3, 8, 8\), but the static input it is copied into has shape "
         r"\(4, 3, 8, 8\); expected the same shape"),
        ((torch.ones(4, 3, 8, 8, dtype=torch.uint8), static[1]), ValueError,
         "input 0 has dtype torch.uint8, but the static input it is copied into has dtype "
         "torch.float32"),
        ((static[0], torch.ones(3, 16)), ValueError, r"input 1 has shape \(3, 16\)"),
        ((static[0], torch.ones(4, 16, device="meta")), ValueError,
         "input 1 has device meta, but the static input it is copied into has device cpu"),
        ((static[0], [0.0] * 16), TypeError, "input 1 must be a torch.Tensor, got list"),
        ((static[0],), ValueError, r"expected 2 inputs \(or none, to reuse the static ones\), "
                                   "got 1"),
    ]
    for inputs, error, match in cases:
        with pytest.raises(error, match=match):
            check_inputs(static, inputs)


def _fused_d(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        fastgan.nn.FusedConv2d(3, 16, 3, padding=1, equalized_lr=True),
        fastgan.nn.FusedConv2d(16, 32, 4, stride=2, padding=1, equalized_lr=True),
        fastgan.nn.FusedConv2d(32, 32, 3, padding=1, groups=2, equalized_lr=True),
        torch.nn.Flatten(), fastgan.nn.FusedLinear(32 * 8 * 8, 1)).cuda()


@pytest.mark.gpu
def test_graphed_r1_step_matches_eager_steps(launches, monkeypatch):
    """R1 (forward, autograd.grad with create_graph, grad_sq_norm, backward, Adam) through
    fused convs, captured as one graph: 8 replayed steps equal 8 eager ones, and replays
    launch nothing from Python."""
    monkeypatch.setenv("FASTGAN_CONV", "triton")  # no per-shape timing in the launch counts
    fastgan.set_backend("triton")
    D_eager = _fused_d()
    D_graph = copy.deepcopy(D_eager)
    opts = [torch.optim.Adam(D.parameters(), 1e-3, betas=(0.0, 0.99), capturable=True)
            for D in (D_eager, D_graph)]
    batches = [torch.randn(8, 3, 16, 16, device="cuda", generator=torch.Generator(
        device="cuda").manual_seed(i)) for i in range(8)]

    def step(D, opt, reals):
        opt.zero_grad(set_to_none=True)
        penalty = fastgan.r1_penalty(D, reals, gamma=10.0)
        penalty.loss.backward()
        opt.step()
        return penalty.loss.detach()

    static = torch.empty_like(batches[0])
    graphed = fastgan.cuda_graph_step(lambda x: step(D_graph, opts[1], x), static, warmup=3)
    for reals in batches:
        expected = step(D_eager, opts[0], reals)
        got = graphed(reals)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert graphed.captured and graphed.calls == 8
    for a, b in zip(D_graph.parameters(), D_eager.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # 3 convs per call: 8 eager steps, 3 warm-up calls and the capture; replays: none
    assert launches()["conv2d_act_fwd"] == 3 * (8 + 3 + 1)


@pytest.mark.gpu
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
def test_graphed_train_steps_match_plain_ones(amp):
    """TrainSteps with cuda_graphs: N iterations of G step, D step and lazy R1 step give the
    losses and weights of N plain iterations (bf16 within bf16 tolerance)."""
    results = []
    for graphs in (False, True):
        torch.manual_seed(0)
        G = build_generator(16, z_dim=32, channel_base=512, channel_max=32).cuda()
        D = build_discriminator("resnet", 16, channel_base=512, channel_max=32).cuda()
        lazy = LazyR1(1.0, 2)  # R1 at every other step: captured at its 4th call
        opt_G = torch.optim.Adam(G.parameters(), 2e-3, betas=(0.0, 0.99), capturable=True)
        lr, betas = lazy.adam_params(2e-3, (0.0, 0.99))
        opt_D = torch.optim.Adam(D.parameters(), lr, betas=betas, capturable=True)
        gen = torch.Generator().manual_seed(1)
        steps = TrainSteps(G, D, opt_G, opt_D, lazy, amp=amp, cuda_graphs=graphs,
                           sample_z=lambda n: torch.randn(n, 32, generator=gen).cuda())
        reals_gen = torch.Generator().manual_seed(2)
        losses = []
        for i in range(12):
            reals = (torch.rand(8, 3, 16, 16, generator=reals_gen) * 2 - 1).cuda()
            row = {**steps.g_step(8), **steps.d_step(reals)}
            if lazy.due(i):
                row.update(steps.r1_step(reals))
            losses.append({k: float(v) for k, v in row.items()})
        results.append((losses, [p.detach().clone() for p in (*G.parameters(),
                                                              *D.parameters())]))
    tol = dict(rtol=3e-2, atol=3e-3) if amp else dict(rtol=1e-4, atol=1e-5)
    (plain_losses, plain_w), (graph_losses, graph_w) = results
    for a, b in zip(plain_losses, graph_losses):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=tol["rtol"], abs=tol["atol"]), k
    for a, b in zip(plain_w, graph_w):
        torch.testing.assert_close(a, b, **tol)
