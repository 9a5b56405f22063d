"""The GPU MoE: per-(token, expert) Triton kernels (triton.py) at small batch, grouped GEMMs (grouped.py) past it,
the reference where neither applies."""

from __future__ import annotations

import torch

from deltaserve.kernels.moe import grouped, triton
from deltaserve.kernels.moe.triton import moe_topk_softmax

# Routed pairs (tokens x top_k) up to which the per-pair kernels run; past it, the grouped GEMMs. 35B-A3B
# (top-8 of 256): 64 pairs = 8 tokens, where distinct experts are still ~90% of the pairs.
SMALL_BATCH_PAIRS = 64
# Without grouped GEMMs (fp16/fp32, or before SM90): per-pair kernels up to here (batch 128 at top-8), so decode
# graphs stay capturable; beyond, each pair re-reading its expert would cost more than a host sync.
NO_GROUPED_MAX_PAIRS = 1024


def fused_moe(*, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, shared_w13: torch.Tensor | None = None, shared_w2: torch.Tensor | None = None,
              shared_gate: torch.Tensor | None = None) -> torch.Tensor:
    """As ref.fused_moe. Small batches take the per-pair kernels; larger ones the grouped GEMMs (bf16 on SM90+).
    Without grouped GEMMs the per-pair kernels serve up to NO_GROUPED_MAX_PAIRS (decode batches, CUDA-graph safe);
    past that (prefill) the reference's per-expert GEMMs, which read each hit expert once but sync the host."""
    pairs = topk_ids.numel()
    has_grouped = grouped.grouped_mm_available(x)
    if pairs <= SMALL_BATCH_PAIRS or (not has_grouped and pairs <= NO_GROUPED_MAX_PAIRS):
        return triton.fused_moe_pairs(x=x, w13=w13, w2=w2, topk_weights=topk_weights, topk_ids=topk_ids,
                                      shared_w13=shared_w13, shared_w2=shared_w2, shared_gate=shared_gate)
    if not has_grouped:
        from deltaserve.kernels.moe import ref

        return ref.fused_moe(x=x, w13=w13, w2=w2, topk_weights=topk_weights, topk_ids=topk_ids,
                             shared_w13=shared_w13, shared_w2=shared_w2, shared_gate=shared_gate)
    shared = None
    if shared_w13 is not None:  # bf16 out of its down GEMM; gate and sum happen in the routed combine's fp32 sum
        from deltaserve.kernels.activation import silu_and_mul

        hidden = silu_and_mul(x=torch.nn.functional.linear(x, shared_w13))
        shared = torch.nn.functional.linear(hidden, shared_w2)
    return grouped.fused_moe(x=x, w13=w13, w2=w2, topk_weights=topk_weights, topk_ids=topk_ids, shared=shared,
                             shared_gate=shared_gate)


__all__ = ["NO_GROUPED_MAX_PAIRS", "SMALL_BATCH_PAIRS", "fused_moe", "moe_topk_softmax"]
