"""Linear layer y = x W^T. On CUDA tensors gpu.py: a Triton kernel (triton.py) for the few-row calls of decode steps
(where torch's GEMMs leave weight bandwidth unused), torch's GEMM for everything else; the reference otherwise."""

from __future__ import annotations

from deltaserve.kernels._dispatch import dispatch

from . import ref

linear = dispatch(ref.linear, "deltaserve.kernels.linear.gpu")

__all__ = ["linear"]
