"""R3GAN models (fastgan/models/r3gan.py), FIR resampling (fastgan/models/layers.py) and the
rpgan loss (fastgan/train/losses.py)."""
import math

import pytest
import torch
import torch.nn.functional as F

import fastgan
from fastgan.models import (DISCRIMINATORS, GENERATORS, Generator, R3GANDiscriminator,
                            R3GANGenerator, build_discriminator, build_generator)
from fastgan.models.layers import Downsample2d, Upsample2d, lowpass_filter
from fastgan.models.r3gan import (LRELU_INIT_GAIN, R3GAN_CONFIGS, Downsample, ResidualBlock,
                                  check_width, widths_from_channels)
from fastgan.train.losses import RELATIVISTIC_LOSSES, discriminator_loss, generator_loss

# res 8: a 4x4 stage of 4 channels (1 block) and an 8x8 stage of 8 (2 blocks); expanded 8 and
# 16 channels in groups of 4, so the 3x3 convs have 2 and 4 groups.
TINY = {"widths": (4, 8), "blocks": (1, 2), "group_channels": 4}


def _tiny(kind, backend):
    if kind == "D":
        return build_discriminator("r3gan", 8, img_channels=2, backend=backend, **TINY)
    return build_generator(8, z_dim=3, img_channels=2, backend=backend, arch="r3gan", **TINY)


def _randomized(module, seed=0):
    """Every parameter redrawn (the zero-initialized branch ends too), so every layer counts."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            std = p[0].numel() ** -0.5 if p.ndim > 1 else 0.1
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return module


def _blocks(module):
    return [m for m in module.modules() if isinstance(m, ResidualBlock)]


@pytest.mark.parametrize("res", sorted(R3GAN_CONFIGS))
def test_configured_resolutions_build_with_their_stages(res):
    """Every configured resolution, at the benchmark batch sizes, on the meta device (shapes
    only): image and logit shapes, stage widths, blocks and groups of 16 channels."""
    widths, blocks = R3GAN_CONFIGS[res]
    with torch.device("meta"):
        D = build_discriminator("r3gan", res, backend="torch")
        G = build_generator(res, z_dim=64, backend="torch", arch="r3gan")
        batch = 64 if res <= 64 else 32
        assert D(torch.empty(batch, 3, res, res)).shape == (batch, 1)
        assert G(torch.empty(batch, 64)).shape == (batch, 3, res, res)
    for model, stage_widths in ((G, widths), (D, widths[::-1])):
        assert [len(_blocks(stage)) for stage in model.stages] == [blocks] * len(widths)
        for stage, width in zip(model.stages, stage_widths):
            for block in _blocks(stage):
                assert block.expand.in_channels == width and block.expand.out_channels == 2 * width
                assert block.grouped.groups == 2 * width // 16
                assert block.grouped.kernel_size == (3, 3)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in D.modules())


def test_r3gan_presets_at_64_and_256_px():
    """R3GAN's FFHQ-64 and FFHQ-256 widths (4x4 first), two blocks per stage."""
    assert R3GAN_CONFIGS[64] == ((768, 768, 768, 768, 384), 2)
    assert R3GAN_CONFIGS[256] == ((768, 768, 768, 768, 384, 192, 96), 2)


def test_widths_from_channels_give_the_configurations():
    """The other models' channel rule, ``min(channel_base // r, channel_max)`` per stage,
    gives R3GAN_CONFIGS' widths with (256, 32) up to 32 px and (24576, 768) above."""
    for res, (widths, _) in R3GAN_CONFIGS.items():
        assert widths_from_channels(res, *((256, 32) if res <= 32 else (24576, 768))) == widths
    assert widths_from_channels(8, 64, 16) == (16, 8)
    assert widths_from_channels(8, 4, 16) == (1, 1)  # at least one channel
    with pytest.raises(ValueError, match="res must be a power of two"):
        widths_from_channels(12, 512, 64)


def test_check_width_needs_whole_groups():
    assert check_width(8) == 8 and check_width(4, expansion=4) == 4
    assert check_width(3, expansion=2, group_channels=6) == 3
    with pytest.raises(ValueError, match=r"expansion \* channels \(2 \* 4\) must be divisible "
                       r"by group_channels \(16\)"):
        check_width(4)


def test_16px_config_runs_on_the_cpu():
    torch.manual_seed(0)
    G = build_generator(16, z_dim=8, img_channels=1, backend="torch", arch="r3gan")
    D = build_discriminator("r3gan", 16, img_channels=1, backend="torch")
    images = G(torch.randn(3, 8))
    logits = D(images)
    assert images.shape == (3, 1, 16, 16) and logits.shape == (3, 1)
    assert images.isfinite().all() and logits.isfinite().all()


@pytest.mark.parametrize("kind", ["D", "G"])
def test_backends_share_state_dict_and_agree_in_float64(kind, launches):
    torch.manual_seed(0)
    fused = _randomized(_tiny(kind, "fastgan").double())
    plain = _tiny(kind, "torch").double()
    assert {k: v.shape for k, v in fused.state_dict().items()} == \
        {k: v.shape for k, v in plain.state_dict().items()}
    plain.load_state_dict(fused.state_dict())
    if kind == "D":  # a channels_last batch
        x = torch.randn(2, 2, 8, 8, dtype=torch.float64).to(memory_format=torch.channels_last)
    else:
        x = torch.randn(2, 3, dtype=torch.float64)
    results = []
    for model in (fused, plain):
        xi = x.detach().clone().requires_grad_(True)
        y = model(xi)
        w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
        results.append((y, torch.autograd.grad((y * w).sum(), [xi, *model.parameters()])))
    assert launches().get("conv2d_act_fwd", 0) > 0  # the fused model ran the Triton conv
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-10, atol=1e-12)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["D", "G"])
def test_residual_branches_start_at_zero(kind):
    """The last layer of every residual branch is zero, so each block is the identity."""
    model = _tiny(kind, "torch").double()
    blocks = _blocks(model)
    assert len(blocks) == sum(TINY["blocks"])
    for block in blocks:
        assert block.project.bias is None and not block.project.weight.any()
        assert block.expand.weight.any() and block.grouped.weight.any()
        x = torch.randn(2, block.expand.in_channels, 4, 4, dtype=torch.float64)
        assert torch.equal(block(x), x)


def test_init_is_variance_scaled_by_the_block_count():
    """Branch layers: std ``sqrt(2 / (1 + 0.2^2)) * L^(-1/4) / sqrt(fan_in)``, bias 0;
    transitions: ``1 / sqrt(fan_in)`` (estimated from ~10^4 weights, 5%)."""
    torch.manual_seed(0)
    block = ResidualBlock(64, expansion=2, group_channels=16, total_blocks=16, backend="torch")
    for layer, fan_in in ((block.expand, 64), (block.grouped, 16 * 9)):
        want = LRELU_INIT_GAIN * 16 ** -0.25 / math.sqrt(fan_in)
        assert layer.weight.std().item() == pytest.approx(want, rel=0.05)
        assert not layer.bias.any()
    assert (block.expand.act, block.expand.alpha, block.expand.gain) == ("lrelu", 0.2, 1.0)
    assert (block.grouped.act, block.grouped.alpha, block.grouped.gain) == ("lrelu", 0.2, 1.0)
    assert not block.expand.equalized_lr
    down = Downsample(128, 64, (1, 2, 1), "torch")
    assert down.conv.weight.std().item() == pytest.approx(128 ** -0.5, rel=0.05)
    assert down.conv.bias is None and down.conv.act == "linear"


def _cross_sample_gradients(D, x):
    """``|d D(x)[i] / d x[j]|`` summed over ``i != j``, and the same for ``i == j``."""
    x = x.detach().clone().requires_grad_(True)
    out = D(x)
    cross = own = 0.0
    for i in range(x.shape[0]):
        g, = torch.autograd.grad(out[i].sum(), x, retain_graph=True)
        own += g[i].abs().sum().item()
        cross += g.abs().sum().item() - g[i].abs().sum().item()
    return cross, own


def test_logit_of_a_sample_depends_on_that_sample_only():
    D = _randomized(_tiny("D", "torch").double())
    x = torch.randn(4, 2, 8, 8, dtype=torch.float64)
    cross, own = _cross_sample_gradients(D, x)
    assert cross == 0 and own > 0
    torch.testing.assert_close(D(x)[2:3], D(x[2:3]), rtol=1e-12, atol=1e-14)
    # The check sees coupling where there is some: StyleGAN2's D has minibatch-stddev.
    resnet = build_discriminator("resnet", 8, img_channels=2, backend="torch", channel_base=16,
                                 channel_max=3, mbstd_group=4).double()
    assert _cross_sample_gradients(resnet, x)[0] > 0


def test_generators_pair_with_discriminators():
    assert set(GENERATORS) == set(DISCRIMINATORS)
    assert DISCRIMINATORS["r3gan"] is R3GANDiscriminator and GENERATORS["r3gan"] is R3GANGenerator
    assert type(build_generator(8, z_dim=4, backend="torch")) is Generator  # the default
    G = build_generator(8, z_dim=5, backend="torch", arch="r3gan", **TINY)
    assert isinstance(G, R3GANGenerator) and G.z_dim == 5


@pytest.mark.parametrize("call, match", [
    (lambda: R3GANDiscriminator(128), r"res 128 has no R3GAN configuration .*pass widths"),
    (lambda: R3GANDiscriminator(12), "power of two"),
    (lambda: R3GANDiscriminator(8, widths=(4, 4, 4)), r"widths must be a sequence of 2"),
    (lambda: R3GANDiscriminator(8, widths=(4, 0)), r"widths\[1\] must be an integer >= 1"),
    (lambda: R3GANDiscriminator(8, widths=(4, 8), blocks=(1,)), "blocks must be an int or"),
    (lambda: R3GANDiscriminator(8, widths=(4, 8), blocks=0), r"blocks\[0\] must be"),
    (lambda: R3GANDiscriminator(8, widths=(4, 12), group_channels=16), "divisible by "
     r"group_channels \(16\)"),
    (lambda: R3GANDiscriminator(8, widths=(4, 8), expansion=0), "expansion must be"),
    (lambda: R3GANGenerator(8, widths=(4, 8), group_channels=True), "group_channels must be"),
    (lambda: R3GANDiscriminator(8, widths=(4, 8), backend="cuda"), "backend must be one of"),
    (lambda: R3GANDiscriminator(8, widths=(4, 8), resample_filter=(1, 1)), "taps must be an odd"),
    (lambda: build_generator(8, arch="vgg"), "arch must be one of"),
    (lambda: _tiny("D", "torch")(torch.randn(2, 2, 16, 16)), r"img must have shape \[N, 2, 8, 8\]"),
    (lambda: _tiny("G", "torch")(torch.randn(2, 4)), r"z must have shape \[N, 3\]"),
])
def test_bad_arguments_are_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# FIR resampling ------------------------------------------------------------------------------

def test_lowpass_filter_is_the_normalized_outer_product():
    f = torch.tensor([1.0, 3.0, 3.0, 1.0])  # (1, 2, 1) convolved with the box (1, 1)
    torch.testing.assert_close(lowpass_filter((1, 2, 1)), torch.outer(f, f) / 64)
    torch.testing.assert_close(lowpass_filter((1,)), torch.full((2, 2), 0.25))


def test_box_filter_resampling_is_average_pooling_and_nearest():
    x = torch.randn(2, 3, 6, 10, dtype=torch.float64)
    torch.testing.assert_close(Downsample2d((1,)).double()(x), F.avg_pool2d(x, 2))
    torch.testing.assert_close(Upsample2d((1,)).double()(x),
                               F.interpolate(x, scale_factor=2, mode="nearest"))


def test_fir_downsample_filters_then_keeps_every_second_pixel():
    """Against filter-then-subsample (upfirdn2d's definition), odd and even sizes,
    channels_last."""
    k = lowpass_filter((1, 2, 1)).double()
    x = torch.randn(2, 3, 7, 8, dtype=torch.float64).to(memory_format=torch.channels_last)
    filtered = F.conv2d(F.pad(x, (1, 1, 1, 1)), k.expand(3, 1, 4, 4), groups=3)
    got = Downsample2d((1, 2, 1)).double()(x)
    assert got.shape == (2, 3, 3, 4)
    torch.testing.assert_close(got, filtered[:, :, ::2, ::2], rtol=1e-12, atol=1e-14)


def test_fir_upsample_inserts_zeros_then_filters():
    """Against zero insertion + padding (2, 1) + filtering with 4 * kernel (upfirdn2d)."""
    k = lowpass_filter((1, 2, 1)).double()
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    zeros = torch.zeros(2, 3, 10, 8, dtype=torch.float64)
    zeros[:, :, ::2, ::2] = x
    want = F.conv2d(F.pad(zeros, (2, 1, 2, 1)), 4 * k.expand(3, 1, 4, 4), groups=3)
    got = Upsample2d((1, 2, 1)).double()(x)
    assert got.shape == (2, 3, 10, 8)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    # Upsampling is 4x the adjoint of downsampling, and keeps a constant image's interior.
    y = torch.randn(2, 3, 10, 8, dtype=torch.float64)
    down = Downsample2d((1, 2, 1)).double()
    torch.testing.assert_close((down(y) * x).sum() * 4, (got * y).sum(), rtol=1e-12, atol=0)
    ones = Upsample2d((1, 2, 1)).double()(torch.ones(1, 1, 6, 6, dtype=torch.float64))
    torch.testing.assert_close(ones[:, :, 2:-2, 2:-2], torch.ones(1, 1, 8, 8, dtype=torch.float64))


def test_resampling_is_twice_differentiable():
    x = torch.randn(1, 1, 2, 4, dtype=torch.float64, requires_grad=True)
    for module in (Downsample2d(), Upsample2d()):
        module = module.double()
        assert torch.autograd.gradgradcheck(lambda t: module(t) ** 2, (x,))


def test_resampling_kernel_is_a_buffer_outside_the_state_dict():
    module = Downsample2d().double()
    assert module.kernel.dtype == torch.float64 and module.state_dict() == {}
    assert not any("kernel" in key for key in _tiny("D", "torch").state_dict())


# rpgan loss --------------------------------------------------------------------------------

def test_rpgan_loss_values_and_gradients_by_hand():
    torch.manual_seed(0)
    real = torch.randn(5, 1, dtype=torch.float64, requires_grad=True)
    fake = torch.randn(5, 1, dtype=torch.float64, requires_grad=True)
    d_loss = discriminator_loss("rpgan", real, fake)
    g_loss = generator_loss("rpgan", fake, real)
    torch.testing.assert_close(d_loss, torch.log1p(torch.exp(fake - real)).mean(), rtol=1e-14,
                               atol=0)
    torch.testing.assert_close(g_loss, torch.log1p(torch.exp(real - fake)).mean(), rtol=1e-14,
                               atol=0)
    d_real, = torch.autograd.grad(d_loss, real)
    torch.testing.assert_close(d_real, -torch.sigmoid(fake - real).detach() / 5)
    # bf16 logits (mixed precision) give a float32 loss, like the other losses.
    assert generator_loss("rpgan", fake.bfloat16(), real.bfloat16()).dtype == torch.float32
    assert RELATIVISTIC_LOSSES == ("rpgan",)


def test_rpgan_needs_paired_real_logits():
    fake = torch.randn(4, 1)
    with pytest.raises(ValueError, match="'rpgan' needs real_logits"):
        generator_loss("rpgan", fake)
    with pytest.raises(ValueError, match="same shape"):
        discriminator_loss("rpgan", torch.randn(3, 1), fake)
    with pytest.raises(ValueError, match="same shape"):
        generator_loss("rpgan", fake, torch.randn(4))


def test_logistic_and_hinge_callers_are_unchanged():
    fake, real = torch.randn(4, 1, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64)
    torch.testing.assert_close(generator_loss("logistic", fake), F.softplus(-fake).mean())
    torch.testing.assert_close(generator_loss("hinge", fake), -fake.mean())
    torch.testing.assert_close(generator_loss("logistic", fake, real), F.softplus(-fake).mean())
    torch.testing.assert_close(discriminator_loss("hinge", real, fake),
                               F.relu(1 + fake).mean() + F.relu(1 - real).mean())


@pytest.mark.parametrize("taps", [(1, 2, 1), (1,)])
def test_fused_resampling_runs_upfirdn2d_and_equals_the_depthwise_convs(taps, launches):
    """backend='fastgan': one upfirdn2d kernel per resampling and per gradient, the depthwise
    convs' values and gradients to every order (float64), and no convolution at all -- the
    torch twin's double backward runs one per channel."""
    from op_helpers import ConvolutionCounter, nested_grads

    x = torch.randn(2, 3, 6, 8, dtype=torch.float64).to(memory_format=torch.channels_last)
    for cls in (Downsample2d, Upsample2d):
        fused, plain = cls(taps, backend="fastgan").double(), cls(taps).double()
        fastgan.reset_launch_counts()
        with ConvolutionCounter() as convs:
            got = nested_grads(fused, (x.clone().requires_grad_(),), order=2)
        assert convs.counts == {"forward": 0, "input_grad": 0, "weight_grad": 0}
        assert set(launches()) == {"upfirdn2d"}
        want = nested_grads(plain, (x.clone().requires_grad_(),), order=2)
        torch.testing.assert_close(fused(x), plain(x), rtol=1e-12, atol=1e-14)
        for g, w in zip(got, want):
            torch.testing.assert_close(g[0], w[0], rtol=1e-10, atol=1e-12)
