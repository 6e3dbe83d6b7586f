"""Triton kernels of tlg's three hot ops; torch tensors in, torch tensors out.

Imports nothing from ``tlg``. Set ``TRITON_INTERPRET=1`` before importing this package to run
the kernels on the CPU under Triton's interpreter (see :mod:`tlgkernels._common`).
"""
from ._common import INTERPRET
from .correlation import (correlation_backward, correlation_forward, correlation_stack_backward,
                          correlation_stack_forward)
from .cp_conv4d import cp_conv4d_backward, cp_conv4d_forward
from .sinkhorn import sinkhorn_backward, sinkhorn_forward

__all__ = [
    "INTERPRET",
    "correlation_forward",
    "correlation_backward",
    "correlation_stack_forward",
    "correlation_stack_backward",
    "cp_conv4d_forward",
    "cp_conv4d_backward",
    "sinkhorn_forward",
    "sinkhorn_backward",
]
