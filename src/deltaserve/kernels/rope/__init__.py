"""Partial rotary position embedding (NeoX rotate-half pairing) for the full-attention layers. Triton kernel on CUDA
tensors, the reference otherwise."""

from __future__ import annotations

from deltaserve.kernels._dispatch import dispatch

from . import ref

apply_partial_rope = dispatch(ref.apply_partial_rope, "deltaserve.kernels.rope.triton")

__all__ = ["apply_partial_rope"]
