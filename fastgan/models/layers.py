"""The layers the models are built from, in a fused and a plain-torch version.

``backend='fastgan'`` builds ``FusedConv2d`` and ``FusedLinear`` (``fastgan.nn``), whose
bias and activation run in fastgan's fused ops. ``backend='torch'`` builds ``TorchConv2d`` and
``TorchLinear``: the same parameters (same ``state_dict`` keys, shapes and initialization)
computed the way eager PyTorch code does it, ``F.conv2d``/``F.linear`` with the bias and then
``F.leaky_relu(y, alpha) * gain``. The two are interchangeable on equal weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastgan import reference
from fastgan.nn import FusedConv2d, FusedLinear
from fastgan.ops.upfirdn2d import upfirdn2d

BACKENDS = ("fastgan", "torch")


def plain_activation(y: torch.Tensor, act: str, alpha, gain, clamp) -> torch.Tensor:
    """``clamp(act(y) * gain)`` in plain torch ops (``F.leaky_relu``, multiply)."""
    return reference.apply_activation(y, reference.resolve_activation(act, alpha, gain, clamp))


class TorchConv2d(FusedConv2d):
    """``FusedConv2d``'s parameters and function in eager PyTorch: ``F.conv2d`` with bias,
    then the activation as separate ops."""

    def forward(self, x):
        w, b = self.weight_and_bias(x)
        y = F.conv2d(x, w, b, self.stride, self.padding, 1, self.groups)
        return plain_activation(y, self.act, self.alpha, self.gain, self.clamp)


class TorchLinear(FusedLinear):
    """``FusedLinear``'s parameters and function in eager PyTorch: ``F.linear`` with bias, then
    the activation as separate ops."""

    def forward(self, x):
        w, b = self.weight_and_bias(x)
        y = F.linear(x, w, b)
        return plain_activation(y, self.act, self.alpha, self.gain, self.clamp)


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def conv2d(backend: str, *args, **kwargs) -> FusedConv2d:
    """A conv + bias + activation layer of ``backend`` (arguments of ``FusedConv2d``)."""
    return (FusedConv2d if check_backend(backend) == "fastgan" else TorchConv2d)(*args, **kwargs)


def linear(backend: str, *args, **kwargs) -> FusedLinear:
    """A linear + bias + activation layer of ``backend`` (arguments of ``FusedLinear``)."""
    return (FusedLinear if check_backend(backend) == "fastgan" else TorchLinear)(*args, **kwargs)


def pixel_norm(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Each sample's feature vector scaled to unit mean square along dim 1 (ProGAN)."""
    return x * (x.square().mean(dim=1, keepdim=True) + eps).rsqrt()


class MinibatchStd(nn.Module):
    """Appends ``num_channels`` feature maps holding the standard deviation of features across
    groups of ``group_size`` samples (StyleGAN2's minibatch-stddev layer).

    ``[N, C, H, W] -> [N, C + num_channels, H, W]``. The batch is split into ``N / G``
    groups (``G = min(group_size, N)``, which must divide ``N``); sample ``i`` belongs to
    group ``i % (N / G)``. Within a group, the per-feature standard deviation is averaged over
    a slice of ``C / num_channels`` channels and all pixels, giving one value per new channel.
    """

    def __init__(self, group_size: int = 4, num_channels: int = 1):
        super().__init__()
        if group_size < 1 or num_channels < 1:
            raise ValueError(f"group_size ({group_size}) and num_channels ({num_channels}) "
                             "must be >= 1")
        self.group_size, self.num_channels = group_size, num_channels

    def forward(self, x):
        n, c, h, w = x.shape
        g, f = min(self.group_size, n), self.num_channels
        if n % g or c % f:
            raise ValueError(f"minibatch-stddev needs the batch size ({n}) divisible by its "
                             f"group size ({g}) and the channels ({c}) by {f}")
        y = x.reshape(g, n // g, f, c // f, h, w)
        y = (y - y.mean(dim=0)).square().mean(dim=0).add(1e-8).sqrt()  # [N/G, F, C/F, H, W]
        y = y.mean(dim=(2, 3, 4)).reshape(n // g, f, 1, 1)
        return torch.cat([x, y.repeat(g, 1, h, w)], dim=1)

    def extra_repr(self):
        return f"group_size={self.group_size}, num_channels={self.num_channels}"


def channels_at(res: int, channel_base: int, channel_max: int) -> int:
    """Feature maps at resolution ``res``: ``min(channel_base // res, channel_max)``, >= 1."""
    return max(1, min(channel_base // res, channel_max))


def check_resolution(res) -> int:
    """``res`` must be a power of two >= 4 (the models halve or double it down to 4x4)."""
    if isinstance(res, bool) or not isinstance(res, int) or res < 4 or res & (res - 1):
        raise ValueError(f"res must be a power of two >= 4, got {res!r}")
    return res


def lowpass_filter(taps=(1, 2, 1)) -> torch.Tensor:
    """The normalized 2-D low-pass kernel of a factor-2 resampling (R3GAN's interpolative
    resamplers): the 1-D ``taps`` convolved with ``[1, 1]`` (the factor-2 box), their outer
    product, divided by its sum. ``(1, 2, 1)`` gives ``outer(f, f) / 64`` with ``f = [1, 3, 3,
    1]``; ``(1,)`` the 2x2 box. ``taps``: an odd number of finite values with a nonzero sum, so
    the kernel has an even size ``len(taps) + 1`` and pads symmetrically. Returns float32
    ``[k, k]`` on the CPU."""
    taps = torch.as_tensor(taps, dtype=torch.float64, device="cpu")
    if taps.ndim != 1 or taps.numel() % 2 == 0 or not taps.isfinite().all() or taps.sum() == 0:
        raise ValueError(f"taps must be an odd number of finite values with a nonzero sum, "
                         f"got {taps.tolist()}")
    f = torch.cat([taps, taps.new_zeros(1)]) + torch.cat([taps.new_zeros(1), taps])
    kernel = torch.outer(f, f)
    return (kernel / kernel.sum()).float()


class _Resample2d(nn.Module):
    """The fixed kernel of ``lowpass_filter(taps)`` (a non-persistent buffer: it follows
    ``.to()`` but is not in the ``state_dict``), applied per channel: with
    ``backend='fastgan'`` by ``fastgan.upfirdn2d`` (one kernel, whose gradient is one kernel
    again), with ``'torch'`` by a depthwise convolution (whose double backward runs one
    convolution per channel)."""

    def __init__(self, taps=(1, 2, 1), backend: str = "torch"):
        super().__init__()
        self.taps = tuple(float(t) for t in taps)
        self.backend = check_backend(backend)
        self.register_buffer("kernel", lowpass_filter(self.taps), persistent=False)
        self.padding = self.kernel.shape[0] // 2 - 1

    def _filter(self) -> torch.Tensor:
        """The kernel as ``upfirdn2d`` takes filters: float32 (StyleGAN2-ADA's rule), also
        after the module was moved to another dtype."""
        return self.kernel if self.kernel.dtype == torch.float32 else self.kernel.float()

    def _depthwise_kernel(self, x: torch.Tensor, gain: float) -> torch.Tensor:
        """``[C, 1, k, k]``: ``gain * kernel`` for each of the ``C`` channels of ``x``, on its
        device and in its dtype."""
        k = self.kernel.to(x.device, x.dtype) * gain
        return k.expand(x.shape[1], 1, *k.shape).contiguous()

    def extra_repr(self):
        return f"taps={self.taps}, backend={self.backend!r}"


class Downsample2d(_Resample2d):
    """``[N, C, H, W] -> [N, C, H // 2, W // 2]``: each channel low-pass filtered with
    ``lowpass_filter(taps)`` (zero padding ``k / 2 - 1``), then every second pixel kept; a depthwise
    ``F.conv2d`` with stride 2 (``upfirdn2d`` with ``down=2`` on the fused backend).
    ``taps=(1,)`` is 2x2 average pooling. Anti-aliased, unlike a strided conv (R3GAN,
    StyleGAN2)."""

    def forward(self, x):
        if self.backend == "fastgan":
            return upfirdn2d(x, self._filter(), down=2, padding=self.padding)
        return F.conv2d(x, self._depthwise_kernel(x, 1.0), stride=2, padding=self.padding,
                        groups=x.shape[1])


class Upsample2d(_Resample2d):
    """``[N, C, H, W] -> [N, C, 2H, 2W]``: zeros inserted between pixels, then each channel
    filtered with ``4 * lowpass_filter(taps)`` (the 4 keeps the mean); a depthwise
    ``F.conv_transpose2d`` with stride 2, the adjoint of ``Downsample2d`` times 4
    (``upfirdn2d`` with ``up=2`` and padding ``(k / 2, k / 2 - 1)`` on the fused backend).
    ``taps=(1,)`` is nearest-neighbour upsampling."""

    def forward(self, x):
        if self.backend == "fastgan":
            p = self.padding
            return upfirdn2d(x, self._filter(), up=2, padding=(p + 1, p, p + 1, p), gain=4)
        return F.conv_transpose2d(x, self._depthwise_kernel(x, 4.0), stride=2,
                                  padding=self.padding, groups=x.shape[1])
