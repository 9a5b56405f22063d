"""Partial rotary position embedding (NeoX rotate-half pairing) for the full-attention layers."""

from __future__ import annotations

from .ref import apply_partial_rope

__all__ = ["apply_partial_rope"]
