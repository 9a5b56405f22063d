"""Causal depthwise conv1d + SiLU for Gated DeltaNet layers (prefill over a varlen batch, single-token decode)."""

from __future__ import annotations

from .ref import causal_conv1d_prefill, causal_conv1d_update

__all__ = ["causal_conv1d_prefill", "causal_conv1d_update"]
