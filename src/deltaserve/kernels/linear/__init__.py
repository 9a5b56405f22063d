"""Linear layer y = x W^T: a Triton kernel for the few-row calls of decode steps on CUDA (where torch's GEMMs leave
weight bandwidth unused), torch's GEMM for everything else, the reference on CPU."""

from __future__ import annotations

from deltaserve.kernels._dispatch import dispatch

from . import ref

linear = dispatch(ref.linear, "deltaserve.kernels.linear.triton")

__all__ = ["linear"]
