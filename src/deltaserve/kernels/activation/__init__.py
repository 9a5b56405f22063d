"""Gated activations."""

from __future__ import annotations

from .ref import silu_and_mul

__all__ = ["silu_and_mul"]
