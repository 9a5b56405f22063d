"""Gated delta rule (Gated DeltaNet core): chunked prefill, single-token recurrent decode, and the g/beta gating."""

from __future__ import annotations

from .ref import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule, gdn_gating

__all__ = ["chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule", "gdn_gating"]
