"""Memory-layout helpers shared by the launchers of fused ops."""
from __future__ import annotations

import functools
import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Offsets above this need 64-bit index arithmetic in the kernels (their INT64 variants).
INT32_MAX = 2**31 - 1


def check_float_tensor(t, name: str) -> None:
    """Raise a clear error unless ``t`` is a floating tensor of a supported dtype."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def check_same_device_dtype(t, name: str, ref, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; "
                         "expected the same device")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; "
                        "expected the same dtype")


def check_batched(t, name: str) -> None:
    """``t`` a float tensor of rank >= 1."""
    check_float_tensor(t, name)
    if t.ndim < 1:
        raise ValueError(f"{name} must have at least one dimension, got a 0-d tensor")


def check_same_shape(t, name: str, ref, ref_name: str) -> None:
    """``t`` a float tensor of ``ref``'s shape, dtype and device."""
    check_float_tensor(t, name)
    if t.shape != ref.shape:
        raise ValueError(f"{name} has shape {list(t.shape)} but {ref_name} has shape "
                         f"{list(ref.shape)}; expected the same shape")
    check_same_device_dtype(t, name, ref, ref_name)


def check_scale(value, name: str) -> float:
    """``value`` as a float, or a clear error unless it is a finite real number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def normalize_dim(dim, ndim: int, name: str = "dim") -> int:
    if not isinstance(dim, int) or isinstance(dim, bool):
        raise TypeError(f"{name} must be an int, got {type(dim).__name__}")
    if not -ndim <= dim < ndim:
        raise IndexError(f"{name}={dim} is out of range for a tensor of rank {ndim}; "
                         f"expected {-ndim} <= {name} < {ndim}")
    return dim % ndim


@functools.lru_cache(maxsize=4096)
def _dense_order(shape: tuple, stride: tuple) -> tuple | None:
    """Dims from outermost to innermost in memory, if a tensor of this shape and these strides
    is dense (no gaps, no overlap) in that order; otherwise ``None``. Contiguous:
    ``(0, 1, ..., n-1)``; channels_last NCHW: ``(0, 2, 3, 1)``. Cached: it runs on every
    launch."""
    order = sorted(range(len(shape)), key=lambda d: (-stride[d], -shape[d], d))
    expected = 1
    for d in reversed(order):
        if shape[d] != 1 and stride[d] != expected:
            return None
        expected *= shape[d]
    return tuple(order)


@functools.lru_cache(maxsize=4096)
def _outer_chan_inner(shape: tuple, order: tuple, dim: int) -> tuple[int, int, int]:
    sizes = [shape[d] for d in order]
    pos = order.index(dim)
    return math.prod(sizes[:pos]), sizes[pos], math.prod(sizes[pos + 1:])


def as_outer_chan_inner(x: torch.Tensor, dim: int):
    """A dense version of ``x`` and its view as ``[outer, chan, inner]`` in memory order.

    Returns ``(x_dense, outer, chan, inner)``: ``x_dense`` is ``x`` itself when it is
    already dense (contiguous, channels_last, or any permutation of those), else a contiguous
    copy; element ``(o, c, i)`` lives at flat offset ``(o * chan + c) * inner + i`` and has
    index ``c`` along ``dim``.
    """
    order = _dense_order(tuple(x.shape), x.stride())
    if order is None:
        x = x.contiguous()
        order = tuple(range(x.ndim))
    return (x, *_outer_chan_inner(tuple(x.shape), order, dim))


def empty_dense(dense: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized tensor of ``dtype`` with the shape and strides of the dense tensor
    ``dense``."""
    return torch.empty_strided(dense.shape, dense.stride(), dtype=dtype, device=dense.device)


def like_layout(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` with exactly the strides of the dense tensor ``ref`` (a copy only if needed)."""
    if t.stride() == ref.stride():
        return t
    out = torch.empty_like(ref, dtype=t.dtype)
    out.copy_(t)
    return out


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last when the 4-d ``x`` is (or, for strided views, resembles) channels_last;
    the memory format of the 4-d outputs made from it."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last) or x.stride(1) < x.stride(3):
        return torch.channels_last
    return torch.contiguous_format


def max_offset(t: torch.Tensor) -> int:
    """The largest element offset ``t`` addresses (its strides may leave gaps)."""
    return sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
