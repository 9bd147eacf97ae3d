"""Skipping gradients nobody asked for (docs/design.md section 4).

In R1's inner pass, ``autograd.grad(D(x).sum(), x, create_graph=True)``, the weight and bias
gradients of every layer are never used, but a custom Function's ``ctx.needs_input_grad``
still says True. ``engine_will_use_grad`` asks the autograd engine instead (a private API,
guarded), and ``no_weight_gradients()`` lets a training loop say it explicitly.
"""
from __future__ import annotations

import contextlib
import threading

import torch

# A process-wide count of the active no_weight_gradients() contexts (as StyleGAN2-ADA's module
# global), not a thread-local or a context variable: autograd runs CUDA backward passes on its
# own device threads, which see neither the caller's thread-locals nor its context variables.
_disabled_depth = 0
_depth_lock = threading.Lock()


@contextlib.contextmanager
def no_weight_gradients(disable: bool = True):
    """Within this context, fused ops compute no weight or bias gradients (as StyleGAN2-ADA's
    ``conv2d_gradfix.no_weight_gradients``), in every thread that runs a backward pass,
    autograd's device threads included. Nests; ``disable=False`` is a no-op. Process-wide:
    a backward running concurrently in another thread skips weight gradients too."""
    global _disabled_depth
    if not disable:
        yield
        return
    with _depth_lock:
        _disabled_depth += 1
    try:
        yield
    finally:
        with _depth_lock:
            _disabled_depth -= 1


def weight_gradients_disabled() -> bool:
    return _disabled_depth > 0


def route_through_node(param):
    """Give a leaf parameter its own graph node (a view) before it enters a custom Function.

    The engine cannot say whether a leaf's gradient will be used during ``autograd.grad()``
    (``_will_engine_execute_node`` refuses leaves there); for a view of the leaf it can.
    """
    if torch.compiler.is_compiling():  # traced code cannot ask the engine: no node needed
        return param
    if param is not None and param.requires_grad and param.grad_fn is None:
        return param.view_as(param)
    return param


def engine_will_use_grad(ctx, index: int, is_weight: bool = True) -> bool:
    """Whether the gradient for input ``index`` of a custom Function will be used.

    False when autograd does not need it, when ``no_weight_gradients()`` is active (for
    weights and biases), or when the engine will not execute the node it flows into.
    """
    if not ctx.needs_input_grad[index]:
        return False
    if is_weight and weight_gradients_disabled():
        return False
    if torch.compiler.is_compiling():  # the engine cannot be asked while tracing
        return True
    node = ctx.next_functions[index][0]
    if node is None:
        return False
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except (AttributeError, RuntimeError):
        return True
