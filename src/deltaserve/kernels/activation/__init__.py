"""Gated activations. Triton kernel on CUDA tensors, the reference otherwise."""

from __future__ import annotations

from deltaserve.kernels._dispatch import dispatch

from . import ref

silu_and_mul = dispatch(ref.silu_and_mul, "deltaserve.kernels.activation.triton")

__all__ = ["silu_and_mul"]
