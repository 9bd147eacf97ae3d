"""Whole training steps as CUDA graphs, R1's double backward included (docs/design.md
section 8).

``torch.cuda.make_graphed_callables`` cannot capture a double backward, so an R1 step cannot
be graphed module by module; ``torch.cuda.graph`` can capture the whole step -- forward,
``autograd.grad(..., create_graph=True)``, backward and the optimizer step -- as PyTorch's
notes on whole-network capture describe. ``cuda_graph_step`` wraps that recipe:

* the step reads its inputs from static tensors; each call copies the new inputs into them;
* the first ``warmup`` calls run the step eagerly on a side stream (cuDNN, Triton's JIT and
  autotuner, fastgan's per-shape choices and cached parameter tensors all settle there);
* the next call captures the step and replays it; every later call only replays.

No call is wasted: warm-up calls are real steps, and the capturing call replays right after
capturing (a capture itself computes nothing).

The step must be capture-safe: no host synchronization (``.item()``, printing a tensor,
data-dependent shapes), random numbers drawn on the GPU (or outside, into a static input),
optimizers built with ``capturable=True``, and no tensor that the step reads replaced
between calls (load checkpoints before the first call).
"""
from __future__ import annotations

from typing import Callable

import torch

from fastgan.ops.conv_choice import graph_mode


def _check_static(inputs) -> torch.device:
    if not inputs:
        raise ValueError("cuda_graph_step needs at least one static input tensor")
    for i, t in enumerate(inputs):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"static input {i} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_cuda:
            raise ValueError(f"static input {i} is on {t.device}; CUDA graphs need CUDA tensors")
    devices = {t.device for t in inputs}
    if len(devices) != 1:
        raise ValueError(f"static inputs are on several devices {sorted(map(str, devices))}; "
                         "expected one")
    return devices.pop()


def check_inputs(static_inputs, inputs) -> None:
    """Raise a clear error unless each of ``inputs`` can be copied into its static input as it
    is: a tensor of the same shape, dtype and device (a batch of 1 would broadcast into every
    row, uint8 images would be copied unscaled)."""
    if len(inputs) not in (0, len(static_inputs)):
        raise ValueError(f"expected {len(static_inputs)} inputs (or none, to reuse the static "
                         f"ones), got {len(inputs)}")
    for i, (static, value) in enumerate(zip(static_inputs, inputs)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"input {i} must be a torch.Tensor, got {type(value).__name__}")
        for what, got, want in (("shape", tuple(value.shape), tuple(static.shape)),
                                ("dtype", value.dtype, static.dtype),
                                ("device", value.device, static.device)):
            if got != want:
                raise ValueError(f"input {i} has {what} {got}, but the static input it is "
                                 f"copied into has {what} {want}; expected the same {what}")


class GraphedStep:
    """A step function run as a CUDA graph; see ``cuda_graph_step``.

    ``graphed(*inputs)`` copies ``inputs`` (each of its static input's shape, dtype and
    device: ``check_inputs``) into the static inputs, runs the step (eagerly
    while warming up, else by replaying the graph) and returns what the step returned: the
    same tensors on every replay, overwritten in place.
    """

    def __init__(self, fn: Callable, static_inputs: tuple, warmup: int = 3,
                 pool=None):
        self.device = _check_static(static_inputs)
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an integer >= 1, got {warmup!r}")
        self.fn, self.static_inputs, self.warmup = fn, static_inputs, warmup
        self.pool = pool
        self.graph = None
        self.outputs = None
        self.calls = 0
        self._side_stream = torch.cuda.Stream(self.device)

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, *inputs):
        check_inputs(self.static_inputs, inputs)
        for static, value in zip(self.static_inputs, inputs):
            if value is not static:
                static.copy_(value, non_blocking=True)
        self.calls += 1
        if self.graph is None and self.calls <= self.warmup:
            return self._eager()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.outputs

    def _eager(self):
        """One warm-up step on a side stream (as capture will use one), joined back."""
        current = torch.cuda.current_stream(self.device)
        self._side_stream.wait_stream(current)
        with torch.cuda.stream(self._side_stream), graph_mode():
            out = self.fn(*self.static_inputs)
        current.wait_stream(self._side_stream)
        return out

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool), graph_mode():
            self.outputs = self.fn(*self.static_inputs)
        self.graph = graph


def cuda_graph_step(fn: Callable, *static_inputs: torch.Tensor, warmup: int = 3,
                    pool=None) -> GraphedStep:
    """Run ``fn(*static_inputs)`` as a CUDA graph: returns ``graphed``, to be called as
    ``graphed(*inputs)`` each step (or ``graphed()`` after writing the static inputs
    yourself). The first ``warmup`` calls run ``fn`` eagerly, the next captures and replays,
    later ones replay. ``pool``: a graph memory pool to share (``torch.cuda.graph_pool_handle()``).

    An R1 step for your own loop (``opt`` built with ``capturable=True``)::

        reals = torch.empty(batch, 3, 64, 64, device="cuda")

        def r1_step(reals):
            opt.zero_grad(set_to_none=True)
            penalty = fastgan.r1_penalty(D, reals, gamma=10.0)
            penalty.loss.backward()
            opt.step()
            return penalty.loss.detach()

        step = fastgan.cuda_graph_step(r1_step, reals)
        for images in loader:
            loss = step(images.cuda(non_blocking=True))   # replays after 3 warm-up steps
    """
    return GraphedStep(fn, static_inputs, warmup, pool)
