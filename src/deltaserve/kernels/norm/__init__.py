"""RMSNorms: zero-centred (1 + w) RMSNorm with optional fused residual add, and the gated RMSNorm of GDN layers."""

from __future__ import annotations

from .ref import gated_rms_norm, rms_norm

__all__ = ["gated_rms_norm", "rms_norm"]
