"""Fused conv2d + bias + activation (PROVISIONAL: cuDNN conv followed by the fused bias_act).

``conv2d_act(x, w, b, stride, padding, groups, act, alpha, gain, clamp)`` is exactly
``bias_act(F.conv2d(x, w, None, stride, padding, 1, groups), b, 1, act, alpha, gain, clamp)``.
"""
from __future__ import annotations

import torch.nn.functional as F

from fastgan import reference
from fastgan.backend import use_triton
from fastgan.ops.bias_act import bias_act


def conv2d_act(x, weight, bias=None, stride=1, padding=0, groups=1, act="linear", alpha=None,
               gain=None, clamp=None):
    if not use_triton(x):
        return reference.conv2d_act(x, weight, bias, stride, padding, groups, act, alpha, gain,
                                    clamp)
    y = F.conv2d(x, weight, None, stride, padding, 1, groups)
    return bias_act(y, bias, 1, act, alpha, gain, clamp)
