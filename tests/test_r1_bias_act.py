"""R1 through a tiny plain-torch discriminator whose activations are ``bias_act`` and whose
penalty is ``grad_sq_norm``: the fused ops give the parameter gradients of the reference.

The penalty ``|d D(x) / d x|^2`` needs a double backward through every bias_act, and its
gradient w.r.t. the weights a third pass; this is the path the kernels exist for.
"""
import contextlib
import types

import pytest
import torch
import torch.nn.functional as F

import fastgan
from fastgan import reference
from op_helpers import DEVICE, assert_matches, randn

FUSED = types.SimpleNamespace(bias_act=fastgan.bias_act, grad_sq_norm=fastgan.grad_sq_norm)
REFERENCE = types.SimpleNamespace(bias_act=reference.bias_act,
                                  grad_sq_norm=reference.grad_sq_norm)


def make_params(dtype=torch.float64):
    """Weights of a 2-conv + linear discriminator for 3x8x8 images, as leaves."""
    shapes = {"w1": (4, 3, 3, 3), "b1": (4,), "w2": (6, 4, 3, 3), "b2": (6,),
              "w3": (1, 6 * 4 * 4), "b3": (1,)}
    params = {}
    for seed, (name, shape) in enumerate(shapes.items()):
        scale = 0.5 if name.startswith("w") else 0.2
        params[name] = (randn(*shape, dtype=dtype, seed=100 + seed) * scale).requires_grad_()
    return params


def discriminator(x, p, ops):
    h = ops.bias_act(F.conv2d(x, p["w1"], padding=1), p["b1"], 1, "lrelu")
    h = ops.bias_act(F.conv2d(h, p["w2"], stride=2, padding=1), p["b2"], 1, "lrelu", clamp=4.0)
    return ops.bias_act(h.flatten(1) @ p["w3"].t(), p["b3"], 1, "linear")


def r1_gradients(ops, x, params, with_gan_loss=True, no_weight_grads=False, gamma=10.0):
    """``(loss, parameter gradients)`` of ``softplus(-D(x)).mean() + gamma / 2 * R1``, R1 being
    ``grad_sq_norm(autograd.grad(D(x).sum(), x, create_graph=True))``."""
    x = x.detach().requires_grad_(True)
    out = discriminator(x, params, ops)
    guard = fastgan.no_weight_gradients() if no_weight_grads else contextlib.nullcontext()
    with guard:
        g, = torch.autograd.grad(out.sum(), x, create_graph=True)
    loss = gamma / 2 * ops.grad_sq_norm(g).mean()
    if with_gan_loss:
        loss = loss + F.softplus(-out).mean()
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    grads = [torch.zeros_like(p) if d is None else d for d, p in zip(grads, params.values())]
    return loss.detach(), dict(zip(params, grads))


def _images(channels_last):
    x = randn(3, 3, 8, 8, seed=120)
    return x.to(memory_format=torch.channels_last) if channels_last else x


def _assert_kernels_ran(launches):
    counts = launches()
    for kernel in ("bias_act_fwd", "bias_act_grad", "per_sample_dot", "scale_per_sample"):
        assert counts.get(kernel, 0) > 0, counts


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("with_gan_loss", [True, False], ids=["gan+r1", "r1_only"])
def test_r1_parameter_gradients_match_reference(with_gan_loss, channels_last, launches):
    """Every parameter gradient of the R1 (+ GAN) loss equals the reference's (float64)."""
    params = make_params()
    x = _images(channels_last)
    loss, grads = r1_gradients(FUSED, x, params, with_gan_loss)
    _assert_kernels_ran(launches)
    loss_ref, grads_ref = r1_gradients(REFERENCE, x, params, with_gan_loss)
    assert_matches(loss, loss_ref)
    for name in params:
        assert_matches(grads[name], grads_ref[name])
    for name in ("w1", "w2", "w3"):  # the comparison is not between zeros
        assert grads[name].abs().sum() > 0, name


def test_r1_with_no_weight_gradients_in_the_inner_pass(launches):
    """StyleGAN2-ADA wraps the inner autograd.grad in no_weight_gradients(): same result."""
    params = make_params()
    x = _images(False)
    loss, grads = r1_gradients(FUSED, x, params, no_weight_grads=True)
    _assert_kernels_ran(launches)
    loss_ref, grads_ref = r1_gradients(REFERENCE, x, params)
    assert_matches(loss, loss_ref)
    for name in params:
        assert_matches(grads[name], grads_ref[name])


def test_r1_backward_accumulates_like_reference(launches):
    """The same loss through ``.backward()`` fills ``.grad`` of every parameter alike."""
    results = []
    for ops in (FUSED, REFERENCE):
        params = make_params()
        x = _images(True).requires_grad_(True)
        out = discriminator(x, params, ops)
        g, = torch.autograd.grad(out.sum(), x, create_graph=True)
        (5.0 * ops.grad_sq_norm(g).mean() + F.softplus(out).mean()).backward()
        results.append({n: p.grad for n, p in params.items()})
    fused, ref = results
    for name in fused:
        assert_matches(fused[name], ref[name])
    _assert_kernels_ran(launches)


def test_r1_float32_close_to_reference(launches):
    """The same in float32, within float32 rounding."""
    params = make_params(torch.float32)
    x = _images(False).float()
    loss, grads = r1_gradients(FUSED, x, params)
    _assert_kernels_ran(launches)
    loss_ref, grads_ref = r1_gradients(REFERENCE, x, params)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    for name in params:
        scale = grads_ref[name].abs().max().item() + 1e-6
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-5 * scale)


def test_device_is_where_kernels_run():
    """The tensors above live where the kernels run (CUDA, or CPU with the interpreter)."""
    assert randn(1).device.type == DEVICE.type
    assert fastgan.backend.use_triton(randn(1))
