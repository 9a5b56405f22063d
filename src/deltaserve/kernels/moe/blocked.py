"""Routed experts as block-grouped Triton GEMMs, for prefill-sized calls: the (token, slot) pairs sorted by expert
(one int16 sort, as the expert-centric path sorts them), each expert's sorted rows cut into blocks of BLOCK_M, one
program per (N tile, block) sharing the expert's weight tile across the block's rows. The grid is sized for the most
blocks any routing can need and a program finds its expert from the per-expert block starts, so nothing syncs the
host (CUDA-graph capturable). The N tiles of a block are neighbours in launch order, so they read the block's rows
from L2, and an expert's blocks run close together, so its weights stream from HBM about once.

Against the CUTLASS grouped GEMMs (grouped.py) it drops two [pairs, .] round trips through HBM: the gate|up kernel
loads its x rows through the block's pair ids (no gathered copy of x) and writes silu(gate) * up itself (no [pairs, 2I]
gate|up output for a separate silu_and_mul). The down kernel reads that act in sorted order and writes y in pair
order; moe_combine sums the slots as on the other paths. Any float dtype, any GPU Triton compiles for (no SM90 or bf16
requirement); act and y are rounded to x.dtype, the gate|up sums are not (the grouped path rounds them too)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deltaserve.kernels.moe.midbatch import _dot, _k_mask, sort_rows
from deltaserve.kernels.moe.triton import moe_combine


def block_starts(bounds: torch.Tensor, bm: int) -> torch.Tensor:
    """bounds int32 [E + 1] (expert e's sorted rows are [bounds[e], bounds[e + 1])) -> int32 [E + 1]: expert e's
    blocks of bm rows are [starts[e], starts[e + 1]); starts[E] blocks in all."""
    blocks = (bounds[1:] - bounds[:-1] + (bm - 1)) // bm
    return torch.cat([blocks.new_zeros(1), torch.cumsum(blocks, 0, dtype=torch.int32)])


def block_plan(topk_ids: torch.Tensor, num_experts: int, bm: int) -> tuple[torch.Tensor, ...]:
    """The pairs of topk_ids [T, k] in blocks of bm rows of one expert, with no host sync: (order, bounds, pos) as
    midbatch.sort_rows gives them (the sorted rows' pairs, each expert's rows, pair order), and block_starts."""
    order, bounds, pos = sort_rows(topk_ids, num_experts)
    return order, bounds, block_starts(bounds, bm), pos


def max_blocks(pairs: int, num_experts: int, bm: int) -> int:
    """The blocks any routing of `pairs` pairs can need (each expert's last block may be partial): the grid's size,
    static so that the launch needs no host sync."""
    return triton.cdiv(pairs, bm) + num_experts


@triton.jit
def _block_rows(order_ptr, bounds_ptr, starts_ptr, b, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Block b's expert (E past the last block), its sorted rows, their pair ids and which rows are the expert's.
    The expert: how many experts' blocks start at or before b, from the E + 1 starts in one vector load."""
    lanes = tl.arange(0, BLOCK_E)
    starts = tl.load(starts_ptr + lanes, mask=lanes <= E, other=2147483647)
    e = tl.sum((starts <= b).to(tl.int32)) - 1
    last = tl.minimum(e, E - 1)  # past the last block e is E: no rows, and no read past bounds[E]
    first = tl.load(bounds_ptr + last) + (b - tl.load(starts_ptr + last)) * BLOCK_M
    rows = first + tl.arange(0, BLOCK_M)
    valid = (rows < tl.load(bounds_ptr + last + 1)) & (e < E)
    pairs = tl.load(order_ptr + rows, mask=valid, other=0)
    return e, rows.to(tl.int64), pairs, valid


@triton.jit
def _gate_up_kernel(x_ptr, w13_ptr, order_ptr, bounds_ptr, starts_ptr, act_ptr, stride_x, stride_we, stride_wn,
                    stride_act, I, D, E, TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr):
    """act[row] = silu(x[token] @ G_e^T) * (x[token] @ U_e^T) for the block's sorted rows, columns
    [n0, n0 + BLOCK_N)."""
    e, rows, pairs, valid = _block_rows(order_ptr, bounds_ptr, starts_ptr, tl.program_id(1), E, BLOCK_M, BLOCK_E)
    if e < E:
        token = (pairs // TOP_K).to(tl.int64)
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_n = n < I
        k = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + token[:, None] * stride_x + k[None, :]
        g_ptrs = w13_ptr + e.to(tl.int64) * stride_we + n[None, :].to(tl.int64) * stride_wn + k[:, None]
        u_ptrs = g_ptrs + I * stride_wn
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            m_k = _k_mask(k0 + k, D, BLOCK_K, EVEN_K)
            xt = tl.load(x_ptrs, mask=valid[:, None] & m_k[None, :], other=0.0)
            g = tl.load(g_ptrs, mask=m_n[None, :] & m_k[:, None], other=0.0)
            u = tl.load(u_ptrs, mask=m_n[None, :] & m_k[:, None], other=0.0)
            acc_g = _dot(xt, g, acc_g, IEEE)
            acc_u = _dot(xt, u, acc_u, IEEE)
            x_ptrs += BLOCK_K
            g_ptrs += BLOCK_K
            u_ptrs += BLOCK_K
        h = acc_g * tl.sigmoid(acc_g) * acc_u
        tl.store(act_ptr + rows[:, None] * stride_act + n[None, :], h.to(act_ptr.dtype.element_ty),
                 mask=valid[:, None] & m_n[None, :])


@triton.jit
def _down_kernel(act_ptr, w2_ptr, order_ptr, bounds_ptr, starts_ptr, y_ptr, stride_act, stride_we, stride_wn,
                 stride_y, I, D, E, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_E: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr):
    """y[pair] = act[row] @ Down_e^T for the block's sorted rows, columns [n0, n0 + BLOCK_N)."""
    e, rows, pairs, valid = _block_rows(order_ptr, bounds_ptr, starts_ptr, tl.program_id(1), E, BLOCK_M, BLOCK_E)
    if e < E:
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_n = n < D
        k = tl.arange(0, BLOCK_K)
        a_ptrs = act_ptr + rows[:, None] * stride_act + k[None, :]
        w_ptrs = w2_ptr + e.to(tl.int64) * stride_we + n[None, :].to(tl.int64) * stride_wn + k[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            m_k = _k_mask(k0 + k, I, BLOCK_K, EVEN_K)
            a = tl.load(a_ptrs, mask=valid[:, None] & m_k[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=m_n[None, :] & m_k[:, None], other=0.0)
            acc = _dot(a, w, acc, IEEE)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        tl.store(y_ptr + pairs.to(tl.int64)[:, None] * stride_y + n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=valid[:, None] & m_n[None, :])


# Tiles by routed pairs: (up to this many pairs, BLOCK_M, gate_up, down), the first that fits; BLOCK_M is the rows
# of a block (both kernels share the blocks), gate_up / down each kernel's (BLOCK_N, BLOCK_K, num_warps, num_stages).
# H100, one 35B-A3B layer (`bench_kernels.py --moe-paths`, RESULTS.md 2026-12-06): 64-row blocks were best at batch 256
# (2,048 pairs) and tied at 2,048 tokens, where the layer streams every expert's weights (bound by HBM); 128-row
# blocks with the wider down tile were best at 8,192 tokens (1.39 vs 1.59 ms).
TILES = [(16384, 64, (128, 64, 8, 4), (128, 64, 8, 4)), (None, 128, (128, 64, 8, 4), (256, 64, 8, 4))]
# (BLOCK_M, gate_up, down) configs that bench_kernels.py --moe-paths times and the GPU tests check
CONFIGS = [(128, (128, 64, 8, 4), (256, 64, 8, 4)), (128, (128, 64, 8, 3), (256, 64, 8, 3)),
           (64, (128, 64, 8, 4), (128, 64, 8, 4)), (64, (64, 64, 4, 4), (128, 64, 4, 4)),
           (128, (64, 128, 4, 3), (128, 128, 8, 3))]


def pick_tiles(pairs: int) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    return next(t[1:] for t in TILES if t[0] is None or pairs <= t[0])


def fused_moe(*, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, shared: torch.Tensor | None = None, shared_gate: torch.Tensor | None = None,
              tiles: tuple[int, tuple[int, ...], tuple[int, ...]] | None = None) -> torch.Tensor:
    """As grouped.fused_moe: x [T, D]; w13 [E, 2I, D]; w2 [E, D, I]; topk_weights/ids [T, k]; shared (the shared
    expert's output [T, D]) with shared_gate ([T, 1] logits) added in the combine's fp32 sum -> [T, D] in x.dtype.
    tiles: (BLOCK_M, gate_up, down) in place of pick_tiles' (benchmarks, tests)."""
    if (shared is None) != (shared_gate is None):
        raise ValueError("shared and shared_gate come together")
    T, D = x.shape
    E, I = w13.shape[0], w2.shape[2]
    top_k = topk_ids.shape[1]
    if T == 0:
        return torch.empty_like(x)
    x, w13, w2 = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, w13, w2))
    bm, gate_up, down = tiles or pick_tiles(T * top_k)
    order, bounds, starts, pos = block_plan(topk_ids, E, bm)
    grid_blocks, block_e = max_blocks(T * top_k, E, bm), triton.next_power_of_2(E + 1)
    ieee = x.dtype == torch.float32 or not x.is_cuda
    act = torch.empty(T * top_k, I, dtype=x.dtype, device=x.device)  # in sorted-row order
    bn, bk, warps, stages = gate_up
    bn, bk = max(16, min(bn, triton.next_power_of_2(I))), max(16, min(bk, triton.next_power_of_2(D)))
    _gate_up_kernel[(triton.cdiv(I, bn), grid_blocks)](
        x, w13, order, bounds, starts, act, x.stride(0), w13.stride(0), w13.stride(1), act.stride(0), I, D, E,
        TOP_K=top_k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_E=block_e, EVEN_K=D % bk == 0, IEEE=ieee,
        num_warps=warps, num_stages=stages)
    y = torch.empty(T * top_k, D, dtype=x.dtype, device=x.device)  # in pair order
    bn, bk, warps, stages = down
    bn, bk = max(16, min(bn, triton.next_power_of_2(D))), max(16, min(bk, triton.next_power_of_2(I)))
    _down_kernel[(triton.cdiv(D, bn), grid_blocks)](
        act, w2, order, bounds, starts, y, act.stride(0), w2.stride(0), w2.stride(1), y.stride(0), I, D, E,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_E=block_e, EVEN_K=I % bk == 0, IEEE=ieee, num_warps=warps,
        num_stages=stages)
    return moe_combine(y=y, pos=pos, topk_weights=topk_weights, topk_ids=topk_ids, shared=shared,
                       shared_gate=shared_gate)
