"""Triton kernels generated from fused elementwise regions of a compiled plan."""
