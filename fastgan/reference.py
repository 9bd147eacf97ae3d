"""Plain-PyTorch definitions of every fastgan op.

These functions *are* the semantics: every test compares the Triton kernels against them,
and they run whenever the Triton kernels do not (CPU tensors, ``FASTGAN_BACKEND=torch``).
They follow StyleGAN2-ADA's ``bias_act`` conventions (docs/design.md section 3).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Activation:
    """An activation with its StyleGAN2-ADA defaults; ``code`` identifies it in kernels.
    ``curved``: its second derivative is nonzero, so its gradient depends on the
    pre-activation (the fused ops save their input for it; docs/design.md section 4)."""
    name: str
    code: int
    default_alpha: float
    default_gain: float
    curved: bool = False


ACTIVATIONS = {
    "linear": Activation("linear", 0, 0.0, 1.0),
    "relu": Activation("relu", 1, 0.0, math.sqrt(2)),
    "lrelu": Activation("lrelu", 2, 0.2, math.sqrt(2)),
    "tanh": Activation("tanh", 3, 0.0, 1.0, curved=True),
    "sigmoid": Activation("sigmoid", 4, 0.0, 1.0, curved=True),
    "elu": Activation("elu", 5, 0.0, 1.0, curved=True),
    "selu": Activation("selu", 6, 0.0, 1.0, curved=True),
    "softplus": Activation("softplus", 7, 0.0, 1.0, curved=True),
    "swish": Activation("swish", 8, 0.0, math.sqrt(2), curved=True),
}

# torch's F.selu: scale * (z if z > 0 else alpha * (exp(z) - 1)).
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946
# F.softplus (beta 1) returns z itself above this threshold.
SOFTPLUS_THRESHOLD = 20.0

# The activations as StyleGAN2-ADA's reference computes them; alpha is lrelu's slope.
_FUNCTIONS = {
    "linear": lambda z, alpha: z,
    "relu": lambda z, alpha: torch.relu(z),
    "lrelu": lambda z, alpha: F.leaky_relu(z, alpha),
    "tanh": lambda z, alpha: torch.tanh(z),
    "sigmoid": lambda z, alpha: torch.sigmoid(z),
    "elu": lambda z, alpha: F.elu(z),
    "selu": lambda z, alpha: F.selu(z),
    "softplus": lambda z, alpha: F.softplus(z, 1, SOFTPLUS_THRESHOLD),
    "swish": lambda z, alpha: torch.sigmoid(z) * z,
}


@dataclass(frozen=True)
class ActSpec:
    """A fully resolved activation: ``y = clamp(act(z, alpha) * gain, -clamp, clamp)``."""
    act: Activation
    alpha: float
    gain: float
    clamp: float | None


def resolve_activation(act="linear", alpha=None, gain=None, clamp=None) -> ActSpec:
    """Fill in the defaults of ``act`` and check the arguments (cached per value: every op
    call asks; not while torch.compile traces, which would warn about the cache)."""
    if torch.compiler.is_compiling():
        return _resolve(act, alpha, gain, clamp)
    try:
        return _resolve_cached(act, alpha, gain, clamp)
    except TypeError:  # an unhashable argument: checked (and refused) without the cache
        return _resolve(act, alpha, gain, clamp)


@functools.lru_cache(maxsize=1024)
def _resolve_cached(act, alpha, gain, clamp) -> ActSpec:
    return _resolve(act, alpha, gain, clamp)


def _resolve(act, alpha, gain, clamp) -> ActSpec:
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
    spec = ACTIVATIONS[act]
    alpha = spec.default_alpha if alpha is None else _number(alpha, "alpha")
    gain = spec.default_gain if gain is None else _number(gain, "gain")
    if not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha}")
    if not math.isfinite(gain):
        raise ValueError(f"gain must be a finite number, got {gain}")
    if clamp is not None:
        clamp = _number(clamp, "clamp")
        if not clamp >= 0:
            raise ValueError(f"clamp must be None or a number >= 0, got {clamp}")
    return ActSpec(spec, alpha, gain, clamp)


def _number(value, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None


def apply_activation(z: torch.Tensor, spec: ActSpec) -> torch.Tensor:
    """``clamp(act(z) * gain)`` in plain torch. Where ``|y| >= clamp`` the gradient is zero."""
    z = _FUNCTIONS[spec.act.name](z, spec.alpha)
    if spec.gain != 1:
        z = z * spec.gain
    if spec.clamp is not None:
        # The clamped branch is a constant (zero gradient, also at |z| == clamp); clamp()
        # keeps NaN as NaN (z.sign() * clamp would turn NaN into 0).
        z = torch.where(z.abs() < spec.clamp, z, z.detach().clamp(-spec.clamp, spec.clamp))
    return z


def second_derivative(z: torch.Tensor, name: str) -> torch.Tensor:
    """``f''(z)`` of the curved activation ``name`` as differentiable torch ops, equal to what
    torch's autograd gives twice through ``_FUNCTIONS[name]`` (also at 0, at softplus's
    threshold, and for inf and NaN)."""
    if name == "tanh":
        t = torch.tanh(z)
        return -2 * t * (1 - t * t)
    if name in ("elu", "selu"):
        coef = 1.0 if name == "elu" else SELU_ALPHA * SELU_SCALE
        return torch.where(z < 0, coef * torch.exp(z), 0.0)
    s = torch.sigmoid(z)
    slope = s * (1 - s)
    if name == "sigmoid":
        return slope * (1 - 2 * s)
    if name == "softplus":
        return slope * (z < SOFTPLUS_THRESHOLD).to(z.dtype)
    if name == "swish":
        return slope * (2 + z * (1 - 2 * s))
    raise ValueError(f"{name!r} is not a curved activation")


def bias_act(x, b=None, dim=1, act="linear", alpha=None, gain=None, clamp=None, *, scale=1.0):
    """``clamp(act(x * scale + b broadcast along dim) * gain, -clamp, +clamp)``."""
    spec = resolve_activation(act, alpha, gain, clamp)
    if scale != 1:
        x = x * scale
    if b is not None:
        shape = [1] * x.ndim
        shape[dim] = -1
        x = x + b.reshape(shape)
    return apply_activation(x, spec)


def grad_sq_norm(g: torch.Tensor) -> torch.Tensor:
    """Per-sample sum of squares over all non-batch dims: shape ``[N]``.

    Accumulated and returned in float32 for 16-bit inputs, in the input dtype otherwise.
    """
    acc = torch.float64 if g.dtype == torch.float64 else torch.float32
    sq = g.to(acc).square()
    if g.ndim == 1:
        return sq
    return sq.sum(dim=tuple(range(1, g.ndim)))


def conv2d_act(x, weight, bias=None, stride=1, padding=0, groups=1, act="linear", alpha=None,
               gain=None, clamp=None, weight_gain=1.0):
    """``bias_act(conv2d(x, weight * weight_gain, None, stride, padding, 1, groups), bias, 1,
    act, ...)``."""
    if weight_gain != 1:
        weight = weight * weight_gain
    y = F.conv2d(x, weight, None, stride, padding, 1, groups)
    return bias_act(y, bias, 1, act, alpha, gain, clamp)


def _int_tuple(value, name: str, lengths: tuple[int, ...]) -> tuple[int, ...]:
    """``value`` (an int, or a tuple/list of ints of one of ``lengths``) as a tuple."""
    items = (value,) if isinstance(value, int) else value
    if (not isinstance(items, (tuple, list)) or len(items) not in (1, *lengths)
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in items)):
        shapes = " or ".join(f"{n} ints" for n in lengths)
        raise TypeError(f"{name} must be an int or a list/tuple of {shapes}, got {value!r}")
    return tuple(items)


@dataclass(frozen=True)
class Resampling:
    """``upfirdn2d``'s geometry in StyleGAN2-ADA's order: ``up`` and ``down`` as ``(x, y)``,
    ``padding`` as ``(x0, x1, y0, y1)``."""
    up: tuple[int, int]
    down: tuple[int, int]
    padding: tuple[int, int, int, int]

    def output_size(self, in_size: int, taps: int, axis: int) -> int:
        """Output size along ``axis`` (0: x, 1: y) of an input of ``in_size`` pixels and a
        filter of ``taps`` taps: ``(in * up + pad0 + pad1 - taps) // down + 1``."""
        pad0, pad1 = self.padding[2 * axis:2 * axis + 2]
        return (in_size * self.up[axis] + pad0 + pad1 - taps) // self.down[axis] + 1

    def transposed(self, in_hw, out_hw, taps_hw) -> Resampling:
        """The geometry of the gradient: ``up`` and ``down`` swapped, and per axis padding
        ``taps - pad0 - 1`` before and ``in * up - out * down + pad0 - up + 1`` after, so
        that it maps an ``out_hw`` gradient back onto ``in_hw`` pixels."""
        padding = []
        for axis in (0, 1):  # x, then y; sizes are (height, width)
            size_in, size_out, taps = in_hw[1 - axis], out_hw[1 - axis], taps_hw[1 - axis]
            up, down, pad0 = self.up[axis], self.down[axis], self.padding[2 * axis]
            padding += [taps - pad0 - 1, size_in * up - size_out * down + pad0 - up + 1]
        return Resampling(self.down, self.up, tuple(padding))


def resampling(up=1, down=1, padding=0) -> Resampling:
    """Check and normalize ``upfirdn2d``'s ``up``, ``down`` (int or ``(x, y)``, each >= 1)
    and ``padding`` (int, ``(x, y)`` or ``(x0, x1, y0, y1)``; negative crops)."""
    factors = []
    for value, name in ((up, "up"), (down, "down")):
        pair = _int_tuple(value, name, (2,))
        pair = pair * 2 if len(pair) == 1 else pair
        if min(pair) < 1:
            raise ValueError(f"{name} must be >= 1, got {value!r}")
        factors.append(pair)
    pad = _int_tuple(padding, "padding", (2, 4))
    if len(pad) < 4:
        pad = (pad[0],) * 4 if len(pad) == 1 else (pad[0], pad[0], pad[1], pad[1])
    return Resampling(factors[0], factors[1], pad)


def filter_taps(f) -> tuple[int, int]:
    """``(height, width)`` of the filter ``f`` (None: ``(1, 1)``; a 1-d filter of ``k`` taps
    is separable: ``(k, k)``)."""
    if f is None:
        return 1, 1
    return f.shape[0], f.shape[-1]


def upfirdn2d(x, f, up=1, down=1, padding=0, flip_filter=False, gain=1):
    """StyleGAN2-ADA's ``upfirdn2d`` on ``x [N, C, H, W]``: insert ``up - 1`` zeros after each
    pixel, pad by ``padding`` (negative crops), correlate each channel with the filter ``f``
    (flipped unless ``flip_filter``; None: identity; a 1-d ``f`` is applied along x, then y)
    times ``gain``, keep every ``down``-th pixel. Computed in float32 (float64 for float64
    ``x``); the result has ``x``'s dtype."""
    geom = resampling(up, down, padding)
    (up_x, up_y), (down_x, down_y), (px0, px1, py0, py1) = geom.up, geom.down, geom.padding
    dtype = x.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    n, c, h, w = x.shape
    x = x.to(acc)
    if up_x > 1 or up_y > 1:
        grid = x.new_zeros(n, c, h * up_y, w * up_x)
        grid[:, :, ::up_y, ::up_x] = x
        x = grid
    x = F.pad(x, [max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)])
    x = x[:, :, max(-py0, 0):x.shape[2] - max(-py1, 0), max(-px0, 0):x.shape[3] - max(-px1, 0)]
    f = torch.ones(1, 1, dtype=acc, device=x.device) if f is None else f.to(acc)
    if not flip_filter:
        f = f.flip(list(range(f.ndim)))  # correlating with the flipped filter convolves
    if f.ndim == 2:
        weight = (f * gain).expand(c, 1, *f.shape)
        return F.conv2d(x, weight, stride=(down_y, down_x), groups=c).to(dtype)
    f = f.expand(c, 1, f.shape[0])
    x = F.conv2d(x, (f * gain).unsqueeze(2), stride=(1, down_x), groups=c)  # along x, with gain
    return F.conv2d(x, f.unsqueeze(3), stride=(down_y, 1), groups=c).to(dtype)  # along y
