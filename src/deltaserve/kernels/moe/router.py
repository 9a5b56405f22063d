"""The MoE router and its top-k softmax in one launch, for decode batches (gpu.router_topk routes calls here).

At batch 1 the router projection reads ~1 MB ([E + 1, D] bf16) and the top-k kernel after it a few hundred logits:
both are launch-bound, two launches of ~2-3 µs each per MoE layer for well under 1 µs of work. Here programs split
the projection by column blocks and K ranges (each streams its slab of the weight and stores an fp32 partial), and
the program that arrives last over the whole grid (one acq_rel counter) sums the partials in a fixed order (the
result does not depend on which program came last), rounds the logits to the activation dtype as the projection
would, stores them, and picks each row's experts. It resets the counter, so every call and CUDA-graph replay starts
clean. The scratch (workspace and counters) is the split-K linear's (kernels/linear/triton.py), shared by both on
the model's one stream.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deltaserve.kernels._device import pdl_launch
from deltaserve.kernels._pdl import wait_then_release
from deltaserve.kernels.linear.triton import _fit_stages, _scratch
from deltaserve.kernels.moe.triton import top_k_softmax_rows

# Up to this many rows one launch; above, the projection and the top-k kernel apart. The last program's routing
# costs ~2.5 µs a row however the rows are grouped, while the two launches take ~8.4 µs at 1-16 rows: H200, 35B-A3B
# router (`bench_kernels.py --moe-router`, benchmarks/RESULTS.md 2026-12-04): 5.1 / 7.6 / 11.4 / 19.6 µs fused at
# 1 / 2 / 4 / 8 rows.
MAX_ROWS = 2
BN, BK, WARPS, STAGES = 32, 256, 4, 3
MAX_SPLIT = 8  # K ranges: D = 2048 -> 8 ranges of 256, so a [264, 2048] router runs as 9 x 8 programs of 16 KB


@triton.jit(do_not_specialize=["M"])
def _router_topk_kernel(x_ptr, w_ptr, logits_ptr, weights_ptr, ids_ptr, ws_ptr, count_ptr, M, N, E, K, K_SPLIT,
                        stride_xm, stride_l, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                        STAGES: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr, TOP_K: tl.constexpr,
                        BLOCK_E: tl.constexpr, BLOCK_TOPK: tl.constexpr, BLOCK_M: tl.constexpr,
                        UPCAST: tl.constexpr, PDL: tl.constexpr = False):
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    rm = tl.arange(0, BM)
    rk = tl.arange(0, BK)
    m_m, m_n = rm < M, rn < N
    x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * K + rk[None, :]
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    k_lo = pid_k * K_SPLIT
    wait_then_release(PDL)  # x is the previous kernel's output
    for k in tl.range(k_lo, tl.minimum(K, k_lo + K_SPLIT), BK, num_stages=STAGES):
        if EVEN_K:
            x = tl.load(x_ptrs + k, mask=m_m[:, None], other=0.0)
            w = tl.load(w_ptrs + k, mask=m_n[:, None], other=0.0)
        else:
            m_k = rk + k < K
            x = tl.load(x_ptrs + k, mask=m_m[:, None] & m_k[None, :], other=0.0)
            w = tl.load(w_ptrs + k, mask=m_n[:, None] & m_k[None, :], other=0.0)
        if UPCAST:  # the interpreter's bf16 tl.dot multiplies raw bits (docs/KERNELS.md)
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    # workspace [SPLIT, BM, N] fp32
    tl.store(ws_ptr + pid_k * BM * N + rm[:, None] * N + rn[None, :], acc, mask=m_m[:, None] & m_n[None, :])
    tl.debug_barrier()  # every thread's partial is stored before thread 0's release below publishes them
    programs = tl.num_programs(0) * tl.num_programs(1)
    if tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu") == programs - 1:  # the last: all partials visible
        cols = tl.arange(0, BLOCK_E)
        rows = tl.arange(0, BLOCK_M)[:, None]
        slot = tl.arange(0, BLOCK_TOPK)[None, :]
        m_l = (rows < M) & (cols < N)[None, :]
        total = tl.zeros([BLOCK_M, BLOCK_E], dtype=tl.float32)
        for s in tl.static_range(SPLIT):  # fixed order, whichever program got here
            total += tl.load(ws_ptr + s * BM * N + rows * N + cols[None, :], mask=m_l, other=0.0, cache_modifier=".cg")
        logit = total.to(logits_ptr.dtype.element_ty)  # rounded as the projection's output is
        tl.store(logits_ptr + rows * stride_l + cols[None, :], logit, mask=m_l)
        logit = tl.where((cols < E)[None, :], logit.to(tl.float32), float("-inf"))
        picked_w, picked_id = top_k_softmax_rows(logit, cols, E, TOP_K, BLOCK_E, BLOCK_TOPK)
        m_k = (rows < M) & (slot < TOP_K)
        tl.store(weights_ptr + rows * TOP_K + slot, picked_w.to(weights_ptr.dtype.element_ty), mask=m_k)
        tl.store(ids_ptr + rows * TOP_K + slot, picked_id, mask=m_k)
        tl.store(count_ptr, 0)


def fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether router_topk takes this call: few rows, 16-bit activations and weight alike, unit strides."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (1 <= rows <= MAX_ROWS and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype and
            weight.is_contiguous() and x.stride(-1) == 1 and x.dim() == 2)


def router_topk(*, x: torch.Tensor, weight: torch.Tensor, num_experts: int, top_k: int,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """As ref.router_topk for a call that `fits`; None when the split scratch is missing during a CUDA-graph
    capture (no eager call allocated it first): the caller then runs the projection and the top-k apart."""
    m, k = x.shape
    n = weight.shape[0]
    bm = max(16, triton.next_power_of_2(m))
    k_tiles = triton.cdiv(k, BK)
    k_split = triton.cdiv(k_tiles, min(MAX_SPLIT, k_tiles)) * BK
    split = triton.cdiv(k, k_split)
    scratch = _scratch(x.device, split * bm * n, 1)
    if scratch is None:
        return None
    ws, counts = scratch
    logits = torch.empty(m, n, dtype=x.dtype, device=x.device)
    weights = torch.empty(m, top_k, dtype=dtype, device=x.device)
    ids = torch.empty(m, top_k, dtype=torch.int64, device=x.device)
    _router_topk_kernel[(triton.cdiv(n, BN), split)](
        x, weight, logits, weights, ids, ws, counts, m, n, num_experts, k, k_split, x.stride(0), logits.stride(0),
        BM=bm, BN=BN, BK=BK, STAGES=_fit_stages(bm, BN, BK, STAGES), SPLIT=split, EVEN_K=k % BK == 0, TOP_K=top_k,
        BLOCK_E=triton.next_power_of_2(n), BLOCK_TOPK=triton.next_power_of_2(top_k),
        BLOCK_M=triton.next_power_of_2(m), UPCAST=not x.is_cuda,
        num_warps=WARPS, **pdl_launch(x.device))
    return logits, weights, ids
