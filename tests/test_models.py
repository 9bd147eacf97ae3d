"""Models (fastgan/models): fused and eager-PyTorch builds agree on equal weights."""
import math

import pytest
import torch

from fastgan.models import (FusedLinear, MinibatchStd, build_discriminator, build_generator)
from fastgan.models.layers import TorchLinear

TINY = {"channel_base": 16, "channel_max": 3}


def _pair(build):
    """The same model built with both backends, the torch one loaded with the fused one's
    weights (float64)."""
    torch.manual_seed(0)
    fused = build("fastgan").double()
    plain = build("torch").double()
    plain.load_state_dict(fused.state_dict())
    return fused, plain


def _shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


BUILDERS = {
    "generator": (lambda b: build_generator(8, z_dim=3, img_channels=2, backend=b, **TINY),
                  lambda n: torch.randn(n, 3, dtype=torch.float64)),
    "dcgan": (lambda b: build_discriminator("dcgan", 8, img_channels=2, backend=b, **TINY),
              lambda n: torch.randn(n, 2, 8, 8, dtype=torch.float64)),
    "resnet": (lambda b: build_discriminator("resnet", 8, img_channels=2, backend=b,
                                             mbstd_group=2, **TINY),
               lambda n: torch.randn(n, 2, 8, 8, dtype=torch.float64)),
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_backends_share_state_dict_and_agree_on_equal_weights(name, launches):
    build, make_input = BUILDERS[name]
    fused, plain = _pair(build)
    assert _shapes(fused) == _shapes(plain)
    x = make_input(4)
    outs, grads = [], []
    for model in (fused, plain):
        xi = x.clone().requires_grad_(True)
        y = model(xi)
        w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
        grads.append(torch.autograd.grad((y * w).sum(), [xi, *model.parameters()]))
        outs.append(y)
    assert sum(launches().values()) > 0  # the fused model ran fastgan's Triton kernels
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-12)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_output_shapes_and_z_dim():
    G = build_generator(16, z_dim=5, img_channels=3, backend="torch", **TINY)
    assert G.z_dim == 5
    assert G(torch.randn(2, 5)).shape == (2, 3, 16, 16)
    for arch in ("dcgan", "resnet"):
        D = build_discriminator(arch, 16, img_channels=3, backend="torch", **TINY)
        assert D(torch.randn(4, 3, 16, 16)).shape == (4, 1)


def test_resnet_256_is_stylegan2_sized():
    D = build_discriminator("resnet", 256, img_channels=3, backend="torch")
    assert D.from_rgb.out_channels == 128
    widths = [(b.conv0.in_channels, b.conv1.out_channels) for b in D.blocks]
    assert widths == [(128, 256), (256, 512), (512, 512), (512, 512), (512, 512), (512, 512)]
    assert D.blocks[0].skip.bias is None and D.blocks[0].skip.kernel_size == (1, 1)
    assert D.blocks[0].conv1.stride == 2
    assert D.fc.in_features == 512 * 16 and D.out.out_features == 1
    assert D.conv.in_channels == 513  # minibatch-stddev channel
    assert 28.5e6 < sum(p.numel() for p in D.parameters()) < 29.5e6
    assert all(m.equalized_lr for m in D.modules() if hasattr(m, "equalized_lr"))


def test_resnet_branches_are_scaled_by_sqrt_half():
    D = build_discriminator("resnet", 8, img_channels=1, backend="torch", **TINY)
    block = D.blocks[0]
    assert block.skip.gain == pytest.approx(math.sqrt(0.5))
    assert block.conv1.gain == pytest.approx(1.0)  # sqrt(2) lrelu gain * sqrt(0.5)
    assert block.conv0.gain is None  # lrelu default, sqrt(2)


def test_minibatch_std_matches_its_definition():
    torch.manual_seed(0)
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    y = MinibatchStd(group_size=3, num_channels=2)(x)
    assert y.shape == (6, 6, 3, 3)
    torch.testing.assert_close(y[:, :4], x)
    # Group j holds samples j, j + 2, j + 4; new channel f averages channels 2f, 2f + 1.
    for j in range(2):
        members = x[j::2]
        std = (members.var(dim=0, unbiased=False) + 1e-8).sqrt()
        for f in range(2):
            want = std[2 * f:2 * f + 2].mean()
            for i in (j, j + 2, j + 4):
                torch.testing.assert_close(y[i, 4 + f], want.expand(3, 3))
    with pytest.raises(ValueError, match="divisible"):
        MinibatchStd(group_size=4)(torch.randn(6, 2, 2, 2))


def test_fused_linear_has_linear_state_dict_and_equalized_scaling():
    torch.manual_seed(0)
    layer = FusedLinear(5, 3, act="lrelu", equalized_lr=True, lr_mul=0.5, bias_init=1.0)
    assert _shapes(layer) == {"weight": (3, 5), "bias": (3,)}
    x = torch.randn(4, 5, dtype=torch.float64)
    layer = layer.double()
    want = torch.nn.functional.leaky_relu(
        x @ (layer.weight * 0.5 / math.sqrt(5)).T + layer.bias * 0.5, 0.2) * math.sqrt(2)
    torch.testing.assert_close(layer(x), want)
    plain = TorchLinear(5, 3, act="lrelu", equalized_lr=True, lr_mul=0.5).double()
    plain.load_state_dict(layer.state_dict())
    torch.testing.assert_close(plain(x), want)
    assert torch.allclose(layer.bias, torch.full((3,), 2.0, dtype=torch.float64))


@pytest.mark.parametrize("call, match", [
    (lambda: build_discriminator("vgg", 8), "arch"),
    (lambda: build_discriminator("dcgan", 12), "power of two"),
    (lambda: build_generator(2), "power of two"),
    (lambda: build_generator(8, backend="cuda"), "backend"),
    (lambda: build_generator(8, z_dim=4, backend="torch")(torch.randn(2, 5)), r"\[N, 4\]"),
])
def test_bad_arguments_are_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()
