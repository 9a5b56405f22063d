"""RMSNorms: zero-centred (1 + w) RMSNorm with optional fused residual add, and the gated RMSNorm of GDN layers.
Triton kernels on CUDA tensors, the references otherwise."""

from __future__ import annotations

from deltaserve.kernels._dispatch import dispatch

from . import ref

rms_norm = dispatch(ref.rms_norm, "deltaserve.kernels.norm.triton")
gated_rms_norm = dispatch(ref.gated_rms_norm, "deltaserve.kernels.norm.triton")

__all__ = ["gated_rms_norm", "rms_norm"]
