"""Helpers shared by the op tests: where the kernels run, seeded inputs, reference comparisons.

Without CUDA, conftest.py turns the Triton interpreter on and CPU tensors run the kernels; with
CUDA, the same tests run the compiled kernels on the GPU.
"""
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Tolerances against fastgan.reference: float64 must agree to 1e-10, float32 to ~1e-5.
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def randn(*shape, dtype=torch.float64, seed=0, device=DEVICE):
    """Seeded standard-normal tensor (drawn on the CPU, so every device sees the same values)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def leaf(t):
    """A leaf that requires grad, equal to ``t`` with exactly its strides and storage offset,
    on a copy of its whole storage: slices keep their gaps and expanded views their zero
    strides (``clone()`` would make those contiguous and test nothing)."""
    out = torch.empty(0, dtype=t.dtype, device=t.device)
    out.set_(t.detach().untyped_storage().clone(), t.storage_offset(), t.shape, t.stride())
    return out.requires_grad_(True)


def assert_matches(actual, expected, dtype=None):
    """``actual`` equals ``expected`` within the tolerance of ``dtype`` (default: its own),
    with NaN exactly where ``expected`` has NaN and the same shape and dtype."""
    if expected is None:
        assert actual is None
        return
    assert actual is not None
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    assert torch.equal(actual.isnan(), expected.isnan()), "NaN positions differ"
    tol = TOL[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, equal_nan=True, **tol)


def nested_grads(outputs_fn, inputs, order, seed=0):
    """Derivatives of order 1..``order`` of ``sum(w * outputs_fn(*inputs) ** 3)``: each order
    differentiates a random projection of the previous gradients (``create_graph=True``).
    Returns the list of gradient tuples, one per order."""
    out = outputs_fn(*inputs)
    w = randn(*out.shape, dtype=out.dtype, seed=seed, device=out.device)
    scalar = (w * out ** 3).sum()
    results = []
    for k in range(order):
        grads = torch.autograd.grad(scalar, inputs, create_graph=True, allow_unused=True)
        grads = tuple(torch.zeros_like(i) if g is None else g for g, i in zip(grads, inputs))
        results.append(grads)
        scalar = sum((randn(*g.shape, dtype=g.dtype, seed=seed + 10 * k + j, device=g.device)
                      * g).sum() for j, g in enumerate(grads))
    return results


class DispatchedOps:
    """Records every aten op torch runs below autograd, as ``(op, args, kwargs)`` in
    ``self.calls``: ``with DispatchedOps() as ops: ...``."""

    def __init__(self):
        self.calls = []
        self._mode = None

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        calls = self.calls

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                calls.append((func, args, kwargs))
                return func(*args, **kwargs)

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)

    def names(self) -> list[str]:
        """The ops' names (``aten::mul.Tensor`` -> ``mul``), in call order."""
        return [func.__name__.split(".")[0] for func, _, _ in self.calls]


class ConvolutionCounter(DispatchedOps):
    """Counts the convolutions torch runs below autograd, by kind: ``forward``
    (``aten.convolution``, transposed or not) and, for each ``aten.convolution_backward``,
    one ``input_grad`` and/or one ``weight_grad`` per output it was asked for.

    Use as ``with ConvolutionCounter() as c: ...`` then read ``c.counts``.
    """

    @property
    def counts(self) -> dict:
        counts = {"forward": 0, "input_grad": 0, "weight_grad": 0}
        for func, args, kwargs in self.calls:
            if func is torch.ops.aten.convolution.default:
                counts["forward"] += 1
            elif func is torch.ops.aten.convolution_backward.default:
                mask = kwargs.get("output_mask", args[-1] if args else None)
                counts["input_grad"] += int(mask[0])
                counts["weight_grad"] += int(mask[1])
        return counts
