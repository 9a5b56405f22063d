"""The MoE router projection and its top-k softmax in one launch, for decode steps of a row or two.

At batch 1 the router ([E + 1, D] bf16, ~1 MB on 35B-A3B) and the top-k kernel after it are both launch-bound: two
launches of ~2-3 us for well under 1 us of work each, on every MoE layer. Here the router's own weight-streaming
program (linear.triton.skinny_program, with the tile the linear would take for this call) stores the logits, and the
program that completes the last column block (a grid-wide acq_rel counter after the column blocks' split-K ones)
routes every row with moe.triton.top_k_route, then resets the counter, so every call and CUDA-graph replay starts
clean. The logits are the linear's bit for bit (same program, same tile) and top_k_route's result does not depend on
the program's layout, so this launch and the two-launch path route alike: a step that takes either (eager or graph
replay, a row more or less) makes the same choices.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deltaserve.kernels._device import pdl_launch
from deltaserve.kernels.linear.triton import plan_launch, skinny_program
from deltaserve.kernels.moe.triton import store_route, top_k_route

# Up to this many rows one launch. The routing tail runs in one program after the projection, about 1-2 us a row
# (the 2026-12-04 version of this kernel, H200: 5.1 us at 1 row against 8.4 for the two launches, 7.6 at 2 rows,
# 11.4 at 4; RESULTS.md, `bench_kernels.py --moe-router`).
MAX_ROWS = 2


@triton.jit(do_not_specialize=["M"])
def _router_topk_kernel(x_ptr, w_ptr, logits_ptr, ws_ptr, count_ptr, weights_ptr, ids_ptr, M, N, K, K_SPLIT,
                        stride_xm, stride_l, E, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                        STAGES: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr,
                        TOP_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_TOPK: tl.constexpr,
                        PDL: tl.constexpr = False):
    stored = skinny_program(x_ptr, w_ptr, logits_ptr, ws_ptr, count_ptr, M, N, K, K_SPLIT, stride_xm, stride_l, BM,
                            BN, BK, STAGES, SPLIT, EVEN_K, UPCAST, PDL)
    if stored:
        tl.debug_barrier()  # every thread's logits are stored before thread 0's release below publishes them
        blocks = tl.num_programs(0)
        done = tl.atomic_add(count_ptr + blocks, 1, sem="acq_rel", scope="gpu")  # after the column blocks' counters
        if done == blocks - 1:  # the last column block: every logit is visible
            cols = tl.arange(0, BLOCK_E)
            for m in range(M):
                logit = tl.load(logits_ptr + m * stride_l + cols, mask=cols < E, other=float("-inf"),
                                cache_modifier=".cg").to(tl.float32)  # L2, not a stale L1
                weights, ids = top_k_route(logit, cols, E, TOP_K, BLOCK_TOPK)
                store_route(weights_ptr, ids_ptr, m, weights, ids, TOP_K, BLOCK_TOPK)
            tl.store(count_ptr + blocks, 0)


def router_topk_fused(*, x: torch.Tensor, weight: torch.Tensor, tile: tuple[int, ...], num_experts: int,
                      top_k: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...] | None:
    """ref.router_topk's contract for x [M, D] (unit stride in D) and a contiguous weight [N >= E, D], with the
    linear's tile for the call; None where the scratch is missing during a CUDA-graph capture (no eager call
    allocated it first): the caller then runs the two launches."""
    m, k = x.shape
    n = weight.shape[0]
    launch = plan_launch(x, n, tile, extra_counters=1)
    if launch is None:
        return None
    ws, counts = launch.scratch
    logits = torch.empty(m, n, dtype=x.dtype, device=x.device)
    weights = torch.empty(m, top_k, dtype=dtype, device=x.device)
    ids = torch.empty(m, top_k, dtype=torch.int64, device=x.device)
    _router_topk_kernel[launch.grid](
        x, weight, logits, ws, counts, weights, ids, m, n, k, launch.k_split, x.stride(0), logits.stride(0),
        num_experts, BM=launch.bm, BN=launch.bn, BK=launch.bk, STAGES=launch.stages, SPLIT=launch.grid[1],
        EVEN_K=k % launch.bk == 0, UPCAST=not x.is_cuda, TOP_K=top_k, BLOCK_E=triton.next_power_of_2(num_experts),
        BLOCK_TOPK=triton.next_power_of_2(top_k), num_warps=launch.num_warps, **pdl_launch(x.device))
    return logits, weights, ids
