"""Gated activations. Triton kernel on CUDA tensors, the reference otherwise."""

from __future__ import annotations

from deltaserve.kernels._dispatch import dispatch

from . import ref

silu_and_mul = dispatch(ref.silu_and_mul, "deltaserve.kernels.activation.triton")
sigmoid_gate_mul = dispatch(ref.sigmoid_gate_mul, "deltaserve.kernels.activation.triton")

__all__ = ["sigmoid_gate_mul", "silu_and_mul"]
