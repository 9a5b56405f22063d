"""The GPU MoE: per-(token, expert) Triton kernels (triton.py) at small batch, expert-centric Triton kernels
(midbatch.py) at mid batch, grouped GEMMs (grouped.py) past it, the reference where none applies."""

from __future__ import annotations

import torch

from deltaserve.kernels.moe import grouped, midbatch, triton
from deltaserve.kernels.moe.triton import moe_topk_softmax

# Routed pairs (tokens x top_k) up to which the per-pair kernels run. 35B-A3B (top-8 of 256): 64 pairs = 8 tokens,
# where distinct experts are still ~90% of the pairs, so re-reading an expert per pair costs little and the two
# launches beat the expert-centric path's six.
SMALL_BATCH_PAIRS = 64
# Up to here the expert-centric kernels (each touched expert read once, BLOCK_M = 16 rows a chunk); past it the
# grouped GEMMs. H200, 35B-A3B layer, `bench_kernels.py --moe-paths` (benchmarks/RESULTS.md, 2026-12-03): the mid path
# beats the grouped GEMMs at every decode batch, 176 vs 275 us at batch 16, 471 vs 601 at 128 and still 568 vs 618 at
# 256 (2048 pairs), where experts take several chunks; prefill-sized calls stay with the grouped GEMMs.
MID_BATCH_MAX_PAIRS = 2048
# Without grouped GEMMs (fp16/fp32, or before SM90): the Triton paths up to here (batch 128 at top-8), so decode
# graphs stay capturable; beyond, the reference (which syncs the host).
NO_GROUPED_MAX_PAIRS = 1024
# Benchmarks and tests: "pairs", "mid", "grouped" or "ref" forces that path at every size (None: by the thresholds).
FORCE_PATH: str | None = None


def pick_path(pairs: int, has_grouped: bool) -> str:
    if FORCE_PATH is not None:
        return FORCE_PATH
    if pairs <= SMALL_BATCH_PAIRS:
        return "pairs"
    if pairs <= MID_BATCH_MAX_PAIRS or (not has_grouped and pairs <= NO_GROUPED_MAX_PAIRS):
        return "mid"
    return "grouped" if has_grouped else "ref"


def fused_moe(*, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, shared_w13: torch.Tensor | None = None, shared_w2: torch.Tensor | None = None,
              shared_gate: torch.Tensor | None = None) -> torch.Tensor:
    """As ref.fused_moe. Small batches take the per-pair kernels, mid batches the expert-centric kernels, larger ones
    the grouped GEMMs (bf16 on SM90+). Without grouped GEMMs the Triton paths serve up to NO_GROUPED_MAX_PAIRS
    (decode batches, CUDA-graph safe); past that (prefill) the reference's per-expert GEMMs, which read each hit
    expert once but sync the host."""
    kw = dict(x=x, w13=w13, w2=w2, topk_weights=topk_weights, topk_ids=topk_ids, shared_w13=shared_w13,
              shared_w2=shared_w2, shared_gate=shared_gate)
    path = pick_path(topk_ids.numel(), grouped.grouped_mm_available(x))
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
    return grouped.fused_moe(x=x, w13=w13, w2=w2, topk_weights=topk_weights, topk_ids=topk_ids, shared=shared,
                             shared_gate=shared_gate)


__all__ = ["FORCE_PATH", "MID_BATCH_MAX_PAIRS", "NO_GROUPED_MAX_PAIRS", "SMALL_BATCH_PAIRS", "fused_moe",
           "moe_topk_softmax", "pick_path"]
