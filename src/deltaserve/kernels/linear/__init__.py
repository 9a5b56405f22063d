"""Linear layer y = x W^T. On CUDA tensors gpu.py: a Triton kernel (triton.py) for the few-row calls of decode steps
(where torch's GEMMs leave weight bandwidth unused), torch's GEMM for everything else; the reference otherwise.

rms_norm_linear(x, residual, norm) = linear(rms_norm(x + residual)): on CUDA, where `can_fold_norm` says so, the
norm runs inside the linear kernel (one launch instead of two); the reference otherwise."""

from __future__ import annotations

import importlib

import torch

from deltaserve.kernels._dispatch import dispatch, runs_reference

from . import ref

linear = dispatch(ref.linear, "deltaserve.kernels.linear.gpu")
rms_norm_linear = dispatch(ref.rms_norm_linear, "deltaserve.kernels.linear.gpu")


def can_fold_norm(*, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether rms_norm_linear on this input runs the norm inside the linear kernel (never on CPU, nor with
    DELTASERVE_KERNELS=ref: there the reference runs, norm then linear)."""
    if runs_reference(x):
        return False
    return importlib.import_module("deltaserve.kernels.linear.gpu").fold_tile(x, weight) is not None


__all__ = ["can_fold_norm", "linear", "rms_norm_linear"]
