"""Mixture-of-experts: top-k softmax routing and the routed expert FFN."""

from __future__ import annotations

from .ref import fused_moe, moe_topk_softmax

__all__ = ["fused_moe", "moe_topk_softmax"]
