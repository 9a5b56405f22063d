"""The GPU MoE: per-(token, expert) Triton kernels (triton.py) at small batch, expert-centric Triton kernels
(midbatch.py) at mid batch, block-grouped Triton GEMMs (blocked.py) past it; the CUTLASS grouped GEMMs (grouped.py)
where FORCE_PATH asks for them. None syncs the host, so every path is CUDA-graph capturable."""

from __future__ import annotations

import torch

from deltaserve.kernels.moe import blocked, grouped, midbatch, triton
from deltaserve.kernels.moe.triton import moe_topk_softmax

# Routed pairs (tokens x top_k) up to which the per-pair kernels run. 35B-A3B (top-8 of 256): 64 pairs = 8 tokens,
# where distinct experts are still ~90% of the pairs, so re-reading an expert per pair costs little and the two
# launches beat the expert-centric path's six.
SMALL_BATCH_PAIRS = 64
# Up to here the expert-centric kernels (each touched expert read once, BLOCK_M = 16 rows a chunk); past it the
# block-grouped kernels (blocked.py, 64-128 rows a block). H100, 35B-A3B layer, `bench_kernels.py --moe-paths`
# (benchmarks/RESULTS.md, 2026-12-06), us: batch 64 mid 499 / blocked 516 / CUTLASS grouped 595; batch 128 599 / 579
# / 659; batch 256 694 / 597 / 679; 2,048 tokens grouped 811, blocked 716; 8,192 tokens 1,530 / 1,390.
MID_BATCH_MAX_PAIRS = 512
# Benchmarks and tests: "pairs", "mid", "blocked", "grouped" (CUTLASS, bf16 on SM90+ only: the baseline the blocked
# kernels replaced) or "ref" forces that path at every size (None: by the thresholds).
FORCE_PATH: str | None = None


def pick_path(pairs: int) -> str:
    if FORCE_PATH is not None:
        return FORCE_PATH
    if pairs <= SMALL_BATCH_PAIRS:
        return "pairs"
    if pairs <= MID_BATCH_MAX_PAIRS:
        return "mid"
    return "blocked"


def fused_moe(*, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, shared_w13: torch.Tensor | None = None, shared_w2: torch.Tensor | None = None,
              shared_gate: torch.Tensor | None = None) -> torch.Tensor:
    """As ref.fused_moe, by the path pick_path names (the reference only where FORCE_PATH asks for it: it syncs the
    host)."""
    kw = dict(x=x, w13=w13, w2=w2, topk_weights=topk_weights, topk_ids=topk_ids, shared_w13=shared_w13,
              shared_w2=shared_w2, shared_gate=shared_gate)
    path = pick_path(topk_ids.numel())
    if path == "pairs":
        return triton.fused_moe_pairs(**kw)
    if path == "mid":
        return midbatch.fused_moe_mid(**kw)
    if path == "ref":
        from deltaserve.kernels.moe import ref

        return ref.fused_moe(**kw)
    shared = None
    if shared_w13 is not None:  # bf16 out of its down GEMM; gate and sum happen in the routed combine's fp32 sum
        from deltaserve.kernels.activation import silu_and_mul

        hidden = silu_and_mul(x=torch.nn.functional.linear(x, shared_w13))
        shared = torch.nn.functional.linear(hidden, shared_w2)
    large = grouped.fused_moe if path == "grouped" else blocked.fused_moe
    return large(x=x, w13=w13, w2=w2, topk_weights=topk_weights, topk_ids=topk_ids, shared=shared,
                 shared_gate=shared_gate)


__all__ = ["FORCE_PATH", "MID_BATCH_MAX_PAIRS", "SMALL_BATCH_PAIRS", "fused_moe",
           "moe_topk_softmax", "pick_path"]
