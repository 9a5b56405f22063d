"""Linear layer y = x W^T, and the dense MLP's down projection with its SiLU-and-mul folded in. On CUDA tensors
gpu.py: a Triton kernel (triton.py) for the few-row calls of decode steps (where torch's GEMMs leave weight bandwidth
unused), torch's GEMM for everything else; the reference otherwise."""

from __future__ import annotations

from deltaserve.kernels._dispatch import dispatch

from . import ref

linear = dispatch(ref.linear, "deltaserve.kernels.linear.gpu")
silu_mul_linear = dispatch(ref.silu_mul_linear, "deltaserve.kernels.linear.gpu")

__all__ = ["linear", "silu_mul_linear"]
