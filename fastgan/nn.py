"""Drop-in modules built on the fused ops."""
from __future__ import annotations

import torch
from torch import nn

from fastgan.ops.bias_act import bias_act
from fastgan.ops.conv2d_act import conv2d_act


def _param_like(p, x):
    """A parameter cast to the dtype of activations (bf16 autocast keeps params in fp32)."""
    return None if p is None else p.to(x.dtype)


class BiasAct(nn.Module):
    """Learned bias + activation, ``clamp(act(x + bias) * gain)`` along ``dim`` (fused).

    ``act`` is ``'linear'``, ``'relu'`` or ``'lrelu'``; ``alpha``/``gain`` default to
    StyleGAN2-ADA's values for ``act``. ``bias_init`` sets the initial bias value.
    """

    def __init__(self, channels: int, act: str = "linear", alpha=None, gain=None, clamp=None,
                 dim: int = 1, bias: bool = True, bias_init: float = 0.0):
        super().__init__()
        self.act, self.alpha, self.gain, self.clamp, self.dim = act, alpha, gain, clamp, dim
        self.bias = nn.Parameter(torch.full([channels], float(bias_init))) if bias else None
        bias_act(torch.zeros([1, channels]), None, 1, act, alpha, gain, clamp)  # check args now

    def forward(self, x):
        return bias_act(x, _param_like(self.bias, x), self.dim, self.act, self.alpha, self.gain,
                        self.clamp)

    def extra_repr(self):
        return (f"channels={None if self.bias is None else self.bias.numel()}, act={self.act!r}, "
                f"alpha={self.alpha}, gain={self.gain}, clamp={self.clamp}, dim={self.dim}")


def fused_leaky_relu(x, bias=None, negative_slope: float = 0.2, scale: float = 2 ** 0.5):
    """``leaky_relu(x + bias, negative_slope) * scale`` with ``bias`` along dim 1 (fused), the
    function StyleGAN2 ports call ``fused_leaky_relu``."""
    return bias_act(x, _param_like(bias, x), 1, "lrelu", negative_slope, scale)


class FusedLeakyReLU(nn.Module):
    """Bias + leaky ReLU + scale along dim 1, parameter-compatible with the ``FusedLeakyReLU``
    of StyleGAN2 ports (a ``bias`` of zeros of length ``channel``)."""

    def __init__(self, channel: int, bias: bool = True, negative_slope: float = 0.2,
                 scale: float = 2 ** 0.5):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channel)) if bias else None
        self.negative_slope, self.scale = negative_slope, scale

    def forward(self, x):
        return fused_leaky_relu(x, self.bias, self.negative_slope, self.scale)


class FusedConv2d(nn.Module):
    """``Conv2d`` + bias + activation in one fused op (``fastgan.conv2d_act``).

    ``weight`` ``[out, in / groups, kh, kw]`` and ``bias`` ``[out]`` are named and shaped as in
    ``nn.Conv2d``, so its ``state_dict`` loads here. With ``equalized_lr=True`` (StyleGAN2) the
    weight is initialized ``N(0, 1) / lr_mul`` and scaled by ``lr_mul / sqrt(fan_in)`` at run
    time, the bias by ``lr_mul``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 groups: int = 1, bias: bool = True, act: str = "lrelu", alpha=None, gain=None,
                 clamp=None, equalized_lr: bool = False, lr_mul: float = 1.0,
                 bias_init: float = 0.0):
        super().__init__()
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) "
                             f"must be divisible by groups ({groups})")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding, self.groups = (kh, kw), stride, padding, groups
        self.act, self.alpha, self.gain, self.clamp = act, alpha, gain, clamp
        self.equalized_lr, self.lr_mul = equalized_lr, float(lr_mul)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kh, kw))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters(bias_init)

    def reset_parameters(self, bias_init: float = 0.0):
        if self.equalized_lr:
            nn.init.normal_(self.weight, 0.0, 1.0 / self.lr_mul)
            if self.bias is not None:
                nn.init.constant_(self.bias, bias_init / self.lr_mul)
        else:
            conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size,
                             groups=self.groups, bias=self.bias is not None)
            with torch.no_grad():
                self.weight.copy_(conv.weight)
                if self.bias is not None:
                    self.bias.copy_(conv.bias)

    def weight_and_bias(self, x):
        """The weight and bias as the op sees them: run-time scaled, in the dtype of ``x``."""
        w, b = self.weight, self.bias
        if self.equalized_lr:
            fan_in = w.shape[1] * w.shape[2] * w.shape[3]
            w = w * (self.lr_mul / fan_in ** 0.5)
            b = None if b is None else b * self.lr_mul
        return _param_like(w, x), _param_like(b, x)

    def forward(self, x):
        w, b = self.weight_and_bias(x)
        return conv2d_act(x, w, b, self.stride, self.padding, self.groups, self.act, self.alpha,
                          self.gain, self.clamp)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, groups={self.groups}, "
                f"bias={self.bias is not None}, act={self.act!r}, alpha={self.alpha}, "
                f"gain={self.gain}, clamp={self.clamp}, equalized_lr={self.equalized_lr}, "
                f"lr_mul={self.lr_mul}")
