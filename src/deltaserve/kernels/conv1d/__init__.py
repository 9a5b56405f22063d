"""Causal depthwise conv1d + SiLU for Gated DeltaNet layers (prefill over a varlen batch, single-token decode).

CUDA tensors run the Triton kernels in ``triton.py``; anything else runs the references in ``ref.py``."""

from __future__ import annotations

from deltaserve.kernels._dispatch import dispatch

from . import ref

causal_conv1d_prefill = dispatch(ref.causal_conv1d_prefill, "deltaserve.kernels.conv1d.triton")
causal_conv1d_prefill_split = dispatch(ref.causal_conv1d_prefill_split, "deltaserve.kernels.conv1d.triton")
causal_conv1d_prefill_qkv = dispatch(ref.causal_conv1d_prefill_qkv, "deltaserve.kernels.conv1d.triton")
causal_conv1d_update = dispatch(ref.causal_conv1d_update, "deltaserve.kernels.conv1d.triton")

__all__ = ["causal_conv1d_prefill", "causal_conv1d_prefill_qkv", "causal_conv1d_prefill_split", "causal_conv1d_update"]
