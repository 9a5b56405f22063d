"""Mixture-of-experts: top-k softmax routing and the routed expert FFN (grouped GEMMs on CUDA)."""

from __future__ import annotations

from deltaserve.kernels._dispatch import dispatch

from . import ref

moe_topk_softmax = ref.moe_topk_softmax  # a softmax and a top-k: torch ops already run on the GPU
fused_moe = dispatch(ref.fused_moe, "deltaserve.kernels.moe.cuda")

__all__ = ["fused_moe", "moe_topk_softmax"]
