"""Mixture-of-experts: top-k softmax routing and the routed (+ shared) expert FFN.

CUDA tensors run ``triton.py`` (per-pair kernels at small batch, grouped GEMMs from ``cuda.py`` past it); anything
else runs the references in ``ref.py``."""

from __future__ import annotations

from deltaserve.kernels._dispatch import dispatch

from . import ref

moe_topk_softmax = dispatch(ref.moe_topk_softmax, "deltaserve.kernels.moe.triton")
fused_moe = dispatch(ref.fused_moe, "deltaserve.kernels.moe.triton")

__all__ = ["fused_moe", "moe_topk_softmax"]
