"""fastgan: fused Triton kernels for GAN discriminators with R1, differentiable to any order."""
from fastgan import nn, reference
from fastgan.backend import backend_info, launch_counts, reset_launch_counts, set_backend
from fastgan.cuda_graphs import cuda_graph_step
from fastgan.grad_control import no_weight_gradients
from fastgan.nn import convert
from fastgan.ops.bias_act import bias_act
from fastgan.ops.conv2d_act import conv2d_act
from fastgan.ops.grad_sq_norm import grad_sq_norm
from fastgan.ops.upfirdn2d import downsample2d, filter2d, setup_filter, upfirdn2d, upsample2d
from fastgan.regularizers import LazyR1, r1_penalty, r1_r2_penalty, r2_penalty

__version__ = "0.1.0"

__all__ = [
    "backend_info", "bias_act", "conv2d_act", "convert", "cuda_graph_step", "downsample2d",
    "filter2d", "grad_sq_norm", "launch_counts", "nn", "no_weight_gradients", "reference",
    "reset_launch_counts", "set_backend", "setup_filter", "upfirdn2d", "upsample2d", "LazyR1",
    "r1_penalty", "r1_r2_penalty", "r2_penalty",
]
