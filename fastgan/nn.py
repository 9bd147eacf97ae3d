"""Drop-in modules built on the fused ops, and ``convert()`` of existing models."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastgan.ops.bias_act import bias_act
from fastgan.ops.conv2d_act import conv2d_act, int_pair
from fastgan.reference import resolve_activation


def _param_like(p, x):
    """A parameter cast to the dtype of activations (bf16 autocast keeps params in fp32)."""
    return None if p is None else p.to(x.dtype)


class BiasAct(nn.Module):
    """Learned bias + activation, ``clamp(act(x + bias) * gain)`` along ``dim`` (fused).

    ``act`` is any of ``fastgan.bias_act``'s activations (StyleGAN2-ADA's nine: linear, relu,
    lrelu, tanh, sigmoid, elu, selu, softplus, swish); ``alpha``/``gain`` default to
    StyleGAN2-ADA's values for ``act``. ``bias_init`` sets the initial bias value.
    """

    def __init__(self, channels: int, act: str = "linear", alpha=None, gain=None, clamp=None,
                 dim: int = 1, bias: bool = True, bias_init: float = 0.0):
        super().__init__()
        self.act, self.alpha, self.gain, self.clamp, self.dim = act, alpha, gain, clamp, dim
        self.bias = nn.Parameter(torch.full([channels], float(bias_init))) if bias else None
        resolve_activation(act, alpha, gain, clamp)  # check the arguments now

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


class _WeightBiasLayer(nn.Module):
    """Shared parameter handling of ``FusedConv2d`` and ``FusedLinear``: ``weight`` and
    ``bias`` named and initialized as in the torch layer they replace (``_torch_layer()``), or,
    with ``equalized_lr=True`` (StyleGAN2), initialized ``N(0, 1) / lr_mul`` and scaled at
    run time by ``lr_mul / sqrt(fan_in)`` (weight) and ``lr_mul`` (bias)."""

    def _init_parameters(self, weight_shape, bias: bool, act, alpha, gain, clamp,
                         equalized_lr: bool, lr_mul: float, bias_init: float, device, dtype):
        resolve_activation(act, alpha, gain, clamp)  # check the arguments now
        self.act, self.alpha, self.gain, self.clamp = act, alpha, gain, clamp
        self.equalized_lr, self.lr_mul = equalized_lr, float(lr_mul)
        factory = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(weight_shape, **factory))
        self.bias = nn.Parameter(torch.empty(weight_shape[0], **factory)) if bias else None
        self.reset_parameters(bias_init)

    def reset_parameters(self, bias_init: float = 0.0):
        if self.equalized_lr:
            nn.init.normal_(self.weight, 0.0, 1.0 / self.lr_mul)
            if self.bias is not None:
                nn.init.constant_(self.bias, bias_init / self.lr_mul)
            return
        plain = self._torch_layer()
        with torch.no_grad():
            self.weight.copy_(plain.weight)
            if self.bias is not None:
                self.bias.copy_(plain.bias)

    @property
    def weight_gain(self) -> float:
        """The run-time factor of the weight: ``lr_mul / sqrt(fan_in)`` with
        ``equalized_lr``, else 1."""
        return self.lr_mul / math.prod(self.weight.shape[1:]) ** 0.5 if self.equalized_lr else 1.0

    def bias_as_used(self, x):
        """The bias as the op sees it: times ``lr_mul`` with ``equalized_lr`` (skipped when
        1), in the dtype of ``x``."""
        b = self.bias
        if b is not None and self.equalized_lr and self.lr_mul != 1:
            b = b * self.lr_mul
        return _param_like(b, x)

    def weight_and_bias(self, x):
        """The weight and bias as eager code applies them: run-time scaled, in the dtype of
        ``x`` (the fused layers pass ``weight_gain`` to the op instead of scaling)."""
        w = self.weight
        if self.equalized_lr:
            w = w * self.weight_gain
        return _param_like(w, x), self.bias_as_used(x)

    def _act_repr(self):
        return (f"bias={self.bias is not None}, act={self.act!r}, alpha={self.alpha}, "
                f"gain={self.gain}, clamp={self.clamp}, equalized_lr={self.equalized_lr}, "
                f"lr_mul={self.lr_mul}")


class FusedConv2d(_WeightBiasLayer):
    """``Conv2d`` + bias + activation in one fused op (``fastgan.conv2d_act``).

    ``weight`` ``[out, in / groups, kh, kw]`` and ``bias`` ``[out]`` are named and shaped as in
    ``nn.Conv2d``, so its ``state_dict`` loads here (and back). ``act``, ``alpha``, ``gain`` and
    ``clamp`` follow ``fastgan.bias_act``, every activation (default: lrelu with StyleGAN2's
    alpha 0.2 and gain sqrt(2); an exact ``Conv2d + LeakyReLU(a)`` is ``act='lrelu', alpha=a,
    gain=1``; the curved ones run as ``F.conv2d`` then ``bias_act``, ``conv2d_act``). Padding is
    zero padding; ``dilation`` must be 1 (it is accepted only to say so clearly). With
    ``equalized_lr=True`` (StyleGAN2) the weight is initialized ``N(0, 1) / lr_mul`` and scaled
    by ``lr_mul / sqrt(fan_in)`` at run time -- inside the op, as ``conv2d_act``'s
    ``weight_gain``, so no scaled copy of the weight is made -- and the bias by ``lr_mul``;
    otherwise parameters are initialized as in ``nn.Conv2d``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 groups: int = 1, bias: bool = True, act: str = "lrelu", alpha=None, gain=None,
                 clamp=None, equalized_lr: bool = False, lr_mul: float = 1.0,
                 bias_init: float = 0.0, dilation=1, device=None, dtype=None):
        super().__init__()
        kh, kw = int_pair(kernel_size, "kernel_size", 1)
        if int_pair(dilation, "dilation", 1) != (1, 1):
            raise ValueError(f"dilation must be 1: fused convolutions support no dilation, "
                             f"got {dilation!r}")
        int_pair(stride, "stride", 1)
        int_pair(padding, "padding", 0)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) "
                             f"must be divisible by groups ({groups})")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding, self.groups = (kh, kw), stride, padding, groups
        self._init_parameters((out_channels, in_channels // groups, kh, kw), bias, act, alpha,
                              gain, clamp, equalized_lr, lr_mul, bias_init, device, dtype)

    def _torch_layer(self):
        return nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size,
                         groups=self.groups, bias=self.bias is not None,
                         device=self.weight.device, dtype=self.weight.dtype)

    def forward(self, x):
        return conv2d_act(x, _param_like(self.weight, x), self.bias_as_used(x), self.stride,
                          self.padding, self.groups, self.act, self.alpha, self.gain, self.clamp,
                          self.weight_gain)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, groups={self.groups}, "
                + self._act_repr())


class FusedLinear(_WeightBiasLayer):
    """``clamp(act(x @ weight.T + bias) * gain)``: ``[N, in] -> [N, out]``, with bias and
    activation fused (``fastgan.bias_act``).

    ``weight`` ``[out, in]`` and ``bias`` ``[out]`` are named, shaped and (unless
    ``equalized_lr``) initialized as in ``nn.Linear``; ``equalized_lr``/``lr_mul`` as in
    ``FusedConv2d``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 act: str = "linear", alpha=None, gain=None, clamp=None,
                 equalized_lr: bool = False, lr_mul: float = 1.0, bias_init: float = 0.0,
                 device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_parameters((out_features, in_features), bias, act, alpha, gain, clamp,
                              equalized_lr, lr_mul, bias_init, device, dtype)

    def _torch_layer(self):
        return nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                         device=self.weight.device, dtype=self.weight.dtype)

    def forward(self, x):
        y = F.linear(x, _param_like(self.weight, x))  # under autocast y may differ from x
        return bias_act(y, self.bias_as_used(y), 1, self.act, self.alpha, self.gain,
                        self.clamp, scale=self.weight_gain)

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, " + self._act_repr()


@dataclass(frozen=True)
class Conversion:
    """One ``nn.Conv2d`` seen by ``convert()``: ``fused`` or ``kept``, and what or why."""
    name: str
    action: str
    detail: str

    def __str__(self):
        return f"{self.action:5s} {self.name or '<root>'}: {self.detail}"


def _conv_padding(conv: nn.Conv2d):
    """The conv's padding as a pair of ints, or ``None`` where zero padding cannot express it."""
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        if any(k % 2 == 0 for k in conv.kernel_size):
            return None  # torch pads an even kernel asymmetrically
        return tuple(k // 2 for k in conv.kernel_size)
    return tuple(conv.padding)


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks
                or torch.nn.utils.parametrize.is_parametrized(m))


def _why_not_fusable(conv: nn.Module, act) -> str | None:
    """Why ``conv`` followed by ``act`` has no exact fused equivalent (``None``: it has one)."""
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} is a subclass of nn.Conv2d; its forward may differ"
    if _has_hooks(conv):
        return "has hooks or parametrizations (e.g. spectral_norm), which the fused op skips"
    if conv.dilation != (1, 1):
        return f"dilation {conv.dilation}: fused convolutions support dilation 1 only"
    if conv.padding_mode != "zeros":
        return f"padding_mode {conv.padding_mode!r}: only 'zeros' is fused"
    if _conv_padding(conv) is None:
        return f"padding='same' with the even kernel {conv.kernel_size} pads asymmetrically"
    if act is None:
        return "not directly followed by nn.ReLU / nn.LeakyReLU inside an nn.Sequential"
    if type(act) not in (nn.ReLU, nn.LeakyReLU):
        return f"followed by {type(act).__name__}, not nn.ReLU / nn.LeakyReLU"
    if _has_hooks(act):
        return f"its {type(act).__name__} has hooks"
    if isinstance(act, nn.LeakyReLU) and not act.negative_slope >= 0:
        return f"LeakyReLU negative_slope {act.negative_slope} < 0 is not supported"
    return None


def _fused_equivalent(conv: nn.Conv2d, act: nn.Module) -> FusedConv2d:
    """The exact fused equivalent of ``act(conv(x))``, holding the conv's own parameters."""
    if isinstance(act, nn.LeakyReLU):
        kind = dict(act="lrelu", alpha=float(act.negative_slope), gain=1.0)
    else:
        kind = dict(act="relu", gain=1.0)
    fused = FusedConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                        _conv_padding(conv), conv.groups, bias=conv.bias is not None,
                        device="meta", **kind)
    fused.weight = conv.weight
    if conv.bias is not None:
        fused.bias = conv.bias
    fused.train(conv.training)
    return fused


def _runs_in_order(m: nn.Module) -> bool:
    """An ``nn.Sequential`` whose forward is Sequential's: its children run in order."""
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def convert(module: nn.Module, inplace: bool = False, return_report: bool = False):
    """Replace each ``nn.Conv2d`` directly followed by ``nn.ReLU`` / ``nn.LeakyReLU`` inside an
    ``nn.Sequential`` (at any depth of ``module``) with the exact fused ``FusedConv2d``.

    Supported pattern: ``Sequential(..., Conv2d, LeakyReLU(a) | ReLU(), ...)``, where the
    Sequential is a plain ``nn.Sequential`` (or a subclass keeping its forward). The fused conv
    takes the conv's place and holds the conv's own ``Parameter`` objects; the activation's
    place holds ``nn.Identity``, so every ``state_dict`` key stays and checkpoints load both
    ways. ``LeakyReLU(a)`` becomes ``act='lrelu', alpha=a, gain=1`` and ``ReLU`` becomes
    ``act='relu', gain=1`` (not StyleGAN's defaults); ``inplace=True`` activations are fine.

    Left alone, with the reason in the report: convs not followed by one of those activations
    inside a Sequential (a conv alone gains nothing from fusing: cuDNN adds its bias already),
    convs of modules with their own forward (their call order cannot be seen), dilation != 1,
    ``padding_mode`` other than ``'zeros'``, ``padding='same'`` with an even kernel, subclasses
    of ``nn.Conv2d``, and convs or activations with hooks or parametrizations (e.g.
    ``spectral_norm``). ``padding='valid'`` and ``'same'`` with odd kernels are converted.

    Args:
        module: the model.
        inplace: convert ``module`` itself (its parameters stay the same objects, so an
            optimizer built on them keeps working); by default a deep copy is converted.
        return_report: also return the list of ``Conversion`` records, one per ``nn.Conv2d``.

    Returns the converted model, or ``(model, report)`` with ``return_report=True``.
    """
    if not inplace:
        module = copy.deepcopy(module)
    report, seen = [], set()
    for seq_name, seq in list(module.named_modules()):
        if not _runs_in_order(seq):
            continue
        keys = list(seq._modules)
        for i, key in enumerate(keys):
            conv = seq._modules[key]
            if not isinstance(conv, nn.Conv2d):
                continue
            name = f"{seq_name}.{key}" if seq_name else key
            seen.add(name)
            act = seq._modules[keys[i + 1]] if i + 1 < len(keys) else None
            reason = _why_not_fusable(conv, act)
            if reason is not None:
                report.append(Conversion(name, "kept", reason))
                continue
            fused = _fused_equivalent(conv, act)
            setattr(seq, key, fused)
            setattr(seq, keys[i + 1], nn.Identity())
            alpha = f" alpha={fused.alpha}" if fused.act == "lrelu" else ""
            report.append(Conversion(name, "fused", f"with the {type(act).__name__} at "
                                     f"{keys[i + 1]!r} (now nn.Identity): FusedConv2d "
                                     f"act={fused.act!r}{alpha} gain=1"))
    for name, m in module.named_modules():
        if isinstance(m, nn.Conv2d) and name not in seen:
            report.append(Conversion(name, "kept", "not inside an nn.Sequential: the order in "
                                     "which its parent calls it cannot be seen"))
    return (module, report) if return_report else module
