"""Mixture-of-experts: top-k softmax routing and the routed (+ shared) expert FFN.

CUDA tensors run ``gpu.py`` (Triton per-pair kernels from ``triton.py`` at small batch, expert-centric kernels from
``midbatch.py`` at mid batch, block-grouped GEMMs from ``blocked.py`` past it; moe_combine, their gather-sum, from
``triton.py``); anything else runs the references in ``ref.py``."""

from __future__ import annotations

from deltaserve.kernels._dispatch import dispatch

from . import ref

moe_topk_softmax = dispatch(ref.moe_topk_softmax, "deltaserve.kernels.moe.gpu")
fused_moe = dispatch(ref.fused_moe, "deltaserve.kernels.moe.gpu")
moe_combine = dispatch(ref.moe_combine, "deltaserve.kernels.moe.triton")

__all__ = ["fused_moe", "moe_combine", "moe_topk_softmax"]
