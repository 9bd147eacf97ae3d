"""Fused ops: one file per op, holding its Triton kernels, launchers and autograd Functions."""
