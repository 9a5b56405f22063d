"""Routed experts as block-grouped Triton GEMMs past the expert-centric kernels' size (decode batches past 64 at
top-8, and prefill), on bf16 / fp16 / fp32 experts or on int4 / fp8 ones dequantized tile by tile (QuantExperts).
The (token, slot) pairs are sorted by expert (sort.py, as the expert-centric path sorts them) and each
expert's sorted rows cut into blocks of BLOCK_M; one program per (N tile, block) shares the expert's weight tile
across the block's rows. The grid is sized for the most blocks any routing can need and a program finds its expert
from the per-expert block starts, so nothing syncs the host (CUDA-graph capturable). The N tiles of a block are
neighbours in launch order, so they read the block's rows from L2, and an expert's blocks run close together, so its
weights stream from HBM about once.

Against the CUTLASS grouped GEMMs (grouped.py) it drops two [pairs, .] round trips through HBM: the gate|up kernel
loads its x rows through the block's pair ids (no gathered copy of x) and writes silu(gate) * up itself (no [pairs, 2I]
gate|up output for a separate silu_and_mul). The down kernel reads that act in sorted order and writes y in pair
order; moe_combine sums the slots as on the other paths. Unquantized weights are read through tensor descriptors
(TMA) from sm_90 on, by pointer before it. Any GPU Triton compiles for (no SM90 requirement; the pipeline stages
are trimmed to the device's shared memory, midbatch.fit_tile); act and y are rounded to x.dtype, the gate|up sums are
not (the grouped path rounds them too)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from deltaserve.kernels._device import max_shared_mem
from deltaserve.kernels.moe import sort
from deltaserve.kernels.moe.midbatch import _dot, _k_mask, fit_tile
from deltaserve.kernels.moe.triton import moe_combine


def block_plan(topk_ids: torch.Tensor, num_experts: int, bm: int) -> tuple[torch.Tensor, ...]:
    """The pairs of topk_ids [T, k] in blocks of bm rows of one expert, with no host sync: (order, bounds, starts,
    pos) as sort.sort_rows gives them (the sorted rows' pairs, each expert's rows, its blocks, pair order)."""
    order, bounds, pos, starts = sort.sort_rows(topk_ids, num_experts, bm)
    return order, bounds, starts, pos


def max_blocks(pairs: int, num_experts: int, bm: int) -> int:
    """The blocks any routing of `pairs` pairs can need (each expert's last block may be partial): the grid's size,
    static so that the launch needs no host sync."""
    return triton.cdiv(pairs, bm) + num_experts


@triton.jit
def _block_span(bounds_ptr, starts_ptr, b, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Block b's expert (E past the last block) and its sorted rows [first, end). The expert: how many experts'
    blocks start at or before b, from the E + 1 starts in one vector load."""
    lanes = tl.arange(0, BLOCK_E)
    starts = tl.load(starts_ptr + lanes, mask=lanes <= E, other=2147483647)
    e = tl.sum((starts <= b).to(tl.int32)) - 1
    last = tl.minimum(e, E - 1)  # past the last block e is E: no rows, and no read past bounds[E]
    first = tl.load(bounds_ptr + last) + (b - tl.load(starts_ptr + last)) * BLOCK_M
    end = tl.where(e < E, tl.minimum(tl.load(bounds_ptr + last + 1), first + BLOCK_M), first)
    return e, first, end


@triton.jit
def _span_rows(order_ptr, first, end, BM: tl.constexpr):
    """The BM rows from first (those before end are the block's), as int64, with their pair ids."""
    rows = first + tl.arange(0, BM)
    valid = rows < end
    pairs = tl.load(order_ptr + rows, mask=valid, other=0)
    return rows.to(tl.int64), pairs, valid


@triton.jit
def _block_rows(order_ptr, bounds_ptr, starts_ptr, b, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Block b's expert (E past the last block), its sorted rows, their pair ids and which rows are the expert's."""
    e, first, end = _block_span(bounds_ptr, starts_ptr, b, E, BLOCK_M, BLOCK_E)
    rows, pairs, valid = _span_rows(order_ptr, first, end, BLOCK_M)
    return e, rows, pairs, valid


@triton.jit
def _quant_tile(W_TILE: tl.constexpr, w_ptr, s_ptr, z_ptr, e, n, k0, N, K, stride_we, stride_wn, stride_se,
                stride_sn, GROUP: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_W: tl.constexpr, dtype: tl.constexpr):
    """Expert e's quantized rows n, columns [k0, k0 + BLOCK_K), dequantized by W_TILE and given as [BLOCK_K, BLOCK_N]
    in the activations' dtype, as the plain loads give the dot."""
    e = e.to(tl.int64)
    w = W_TILE(w_ptr + e * stride_we, s_ptr + e * stride_se, z_ptr + e * stride_se, k0, n, N, K, stride_wn, stride_sn,
               GROUP, BLOCK_K, EVEN_W)
    return tl.trans(w.to(dtype))


@triton.jit
def _gate_up_kernel(x_ptr, w13_ptr, w_desc, s_ptr, z_ptr, order_ptr, bounds_ptr, starts_ptr, act_ptr, stride_x,
                    stride_we, stride_wn, stride_se, stride_sn, stride_act, I, D, E, TOP_K: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
                    EVEN_K: tl.constexpr, IEEE: tl.constexpr, W_TILE: tl.constexpr = None, GROUP: tl.constexpr = 0,
                    EVEN_W: tl.constexpr = False, SPLIT: tl.constexpr = False):
    """act[row] = silu(x[token] @ G_e^T) * (x[token] @ U_e^T) for the block's sorted rows, columns
    [n0, n0 + BLOCK_N), token = pair // TOP_K (TOP_K 1: x holds a row per pair). W_TILE (quantized weights): the
    loader that dequantizes a weight tile (QuantExperts); w_desc (bf16 / fp16 / fp32 weights, None otherwise): w13 as
    a tensor descriptor, its tiles loaded by TMA where the GPU has it. SPLIT: a block of at most BLOCK_M / 2 rows (an
    expert's last) runs a tile of that height, so the tensor cores skip its padding rows."""
    e, first, end = _block_span(bounds_ptr, starts_ptr, tl.program_id(1), E, BLOCK_M, BLOCK_E)
    if e < E:
        if (end - first <= BLOCK_M // 2) & SPLIT:
            _gate_up_rows(x_ptr, w13_ptr, w_desc, s_ptr, z_ptr, order_ptr, act_ptr, e, first, end, stride_x, stride_we,
                          stride_wn, stride_se, stride_sn, stride_act, I, D, TOP_K, BLOCK_M // 2, BLOCK_N, BLOCK_K,
                          EVEN_K, IEEE, W_TILE, GROUP, EVEN_W)
        else:
            _gate_up_rows(x_ptr, w13_ptr, w_desc, s_ptr, z_ptr, order_ptr, act_ptr, e, first, end, stride_x, stride_we,
                          stride_wn, stride_se, stride_sn, stride_act, I, D, TOP_K, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K,
                          IEEE, W_TILE, GROUP, EVEN_W)


@triton.jit
def _gate_up_rows(x_ptr, w13_ptr, w_desc, s_ptr, z_ptr, order_ptr, act_ptr, e, first, end, stride_x, stride_we,
                  stride_wn, stride_se, stride_sn, stride_act, I, D, TOP_K: tl.constexpr, BM: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr,
                  W_TILE: tl.constexpr, GROUP: tl.constexpr, EVEN_W: tl.constexpr):
    """_gate_up_kernel's work on the BM rows from first (those before end valid)."""
    rows, pairs, valid = _span_rows(order_ptr, first, end, BM)
    token = (pairs // TOP_K).to(tl.int64)
    n0 = tl.program_id(0) * BLOCK_N
    n = n0 + tl.arange(0, BLOCK_N)
    m_n = n < I
    k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + token[:, None] * stride_x + k[None, :]
    g_ptrs = w13_ptr + e.to(tl.int64) * stride_we + n[None, :].to(tl.int64) * stride_wn + k[:, None]
    u_ptrs = g_ptrs + I * stride_wn
    acc_g = tl.zeros((BM, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BM, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        m_k = _k_mask(k0 + k, D, BLOCK_K, EVEN_K)
        xt = tl.load(x_ptrs, mask=valid[:, None] & m_k[None, :], other=0.0)
        if w_desc is not None:  # past the tensor's bounds the descriptor reads zeros; past I, g's are u's rows
            g = tl.trans(w_desc.load([e, n0, k0]).reshape(BLOCK_N, BLOCK_K))
            u = tl.trans(w_desc.load([e, I + n0, k0]).reshape(BLOCK_N, BLOCK_K))
        elif W_TILE is None:
            g = tl.load(g_ptrs, mask=m_n[None, :] & m_k[:, None], other=0.0)
            u = tl.load(u_ptrs, mask=m_n[None, :] & m_k[:, None], other=0.0)
        else:
            g = _quant_tile(W_TILE, w13_ptr, s_ptr, z_ptr, e, n, k0, 2 * I, D, stride_we, stride_wn, stride_se,
                            stride_sn, GROUP, BLOCK_K, EVEN_W, x_ptr.dtype.element_ty)
            u = _quant_tile(W_TILE, w13_ptr, s_ptr, z_ptr, e, n + I, k0, 2 * I, D, stride_we, stride_wn,
                            stride_se, stride_sn, GROUP, BLOCK_K, EVEN_W, x_ptr.dtype.element_ty)
        acc_g = _dot(xt, g, acc_g, IEEE)
        acc_u = _dot(xt, u, acc_u, IEEE)
        x_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    tl.store(act_ptr + rows[:, None] * stride_act + n[None, :], h.to(act_ptr.dtype.element_ty),
             mask=valid[:, None] & m_n[None, :])


@triton.jit
def _down_kernel(act_ptr, w2_ptr, w_desc, s_ptr, z_ptr, order_ptr, bounds_ptr, starts_ptr, y_ptr, stride_act, stride_we,
                 stride_wn, stride_se, stride_sn, stride_y, I, D, E, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr,
                 W_TILE: tl.constexpr = None, GROUP: tl.constexpr = 0, EVEN_W: tl.constexpr = False,
                 SPLIT: tl.constexpr = False):
    """y[pair] = act[row] @ Down_e^T for the block's sorted rows, columns [n0, n0 + BLOCK_N); SPLIT as in
    _gate_up_kernel."""
    e, first, end = _block_span(bounds_ptr, starts_ptr, tl.program_id(1), E, BLOCK_M, BLOCK_E)
    if e < E:
        if (end - first <= BLOCK_M // 2) & SPLIT:
            _down_rows(act_ptr, w2_ptr, w_desc, s_ptr, z_ptr, order_ptr, y_ptr, e, first, end, stride_act, stride_we,
                       stride_wn, stride_se, stride_sn, stride_y, I, D, BLOCK_M // 2, BLOCK_N, BLOCK_K, EVEN_K, IEEE,
                       W_TILE, GROUP, EVEN_W)
        else:
            _down_rows(act_ptr, w2_ptr, w_desc, s_ptr, z_ptr, order_ptr, y_ptr, e, first, end, stride_act, stride_we,
                       stride_wn, stride_se, stride_sn, stride_y, I, D, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, IEEE, W_TILE,
                       GROUP, EVEN_W)


@triton.jit
def _down_rows(act_ptr, w2_ptr, w_desc, s_ptr, z_ptr, order_ptr, y_ptr, e, first, end, stride_act, stride_we, stride_wn,
               stride_se, stride_sn, stride_y, I, D, BM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               EVEN_K: tl.constexpr, IEEE: tl.constexpr, W_TILE: tl.constexpr, GROUP: tl.constexpr,
               EVEN_W: tl.constexpr):
    """_down_kernel's work on the BM rows from first (those before end valid)."""
    rows, pairs, valid = _span_rows(order_ptr, first, end, BM)
    n0 = tl.program_id(0) * BLOCK_N
    n = n0 + tl.arange(0, BLOCK_N)
    m_n = n < D
    k = tl.arange(0, BLOCK_K)
    a_ptrs = act_ptr + rows[:, None] * stride_act + k[None, :]
    w_ptrs = w2_ptr + e.to(tl.int64) * stride_we + n[None, :].to(tl.int64) * stride_wn + k[:, None]
    acc = tl.zeros((BM, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        m_k = _k_mask(k0 + k, I, BLOCK_K, EVEN_K)
        a = tl.load(a_ptrs, mask=valid[:, None] & m_k[None, :], other=0.0)
        if w_desc is not None:
            w = tl.trans(w_desc.load([e, n0, k0]).reshape(BLOCK_N, BLOCK_K))
        elif W_TILE is None:
            w = tl.load(w_ptrs, mask=m_n[None, :] & m_k[:, None], other=0.0)
        else:
            w = _quant_tile(W_TILE, w2_ptr, s_ptr, z_ptr, e, n, k0, D, I, stride_we, stride_wn, stride_se,
                            stride_sn, GROUP, BLOCK_K, EVEN_W, act_ptr.dtype.element_ty)
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


# Blocks of at least this many rows run a block of at most half of them (an expert's last) at half height: with
# uniform routing at 8,192 tokens each expert gets 256 +- 16 rows, so about half of them end in a block of 1-48 rows,
# ~20% of the rows the tensor cores would run. Below it the half tile would leave wgmma's 64-row shape (64-row blocks
# split at 32 gained nothing, H100). Unquantized weights' tiles load by TMA (tensor descriptors). One 35B-A3B layer at
# 8,192 tokens, H100 (RESULTS.md, 2026-12-06): 1,272 us; split alone 1,257, TMA alone 1,213, both 1,167. The kernels
# are bound by their L2 traffic (a half-height program still streams whole weight tiles), which TMA makes cheaper.
SPLIT_MIN_M = 128
TMA_WEIGHTS = True


def pick_tiles(pairs: int) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    return next(t[1:] for t in TILES if t[0] is None or pairs <= t[0])


@dataclass(frozen=True)
class QuantExperts:
    """Quantized expert weights for the kernels: `tile`, a @triton.jit loader (w, s, z, k0, rows, N, K, stride_wn,
    stride_sn, GROUP, BK, EVEN) -> those rows' columns [k0, k0 + BK) dequantized, fp32 [rows, BK] (quant.triton's
    int4 and fp8 tiles, one scale per row and tile); the scales and zero points of w13 and w2 ([E, N, groups]; the
    zero points laid out as the scales, the scales again where there are none); the GROUP constexpr and the widest
    K tile (one that divides the group) of each; inter, which the packed w2 does not show."""
    tile: object
    s13: torch.Tensor
    z13: torch.Tensor
    s2: torch.Tensor
    z2: torch.Tensor
    groups: tuple[int, int]
    k_tiles: tuple[int, int]
    inter: int


def fused_moe(*, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, shared: torch.Tensor | None = None, shared_gate: torch.Tensor | None = None,
              tiles: tuple[int, tuple[int, ...], tuple[int, ...]] | None = None,
              quant: QuantExperts | None = None, pair_x: torch.Tensor | None = None) -> torch.Tensor:
    """As grouped.fused_moe: x [T, D]; w13 [E, 2I, D]; w2 [E, D, I]; topk_weights/ids [T, k]; shared (the shared
    expert's output [T, D]) with shared_gate ([T, 1] logits) added in the combine's fp32 sum -> [T, D] in x.dtype.
    tiles: (BLOCK_M, gate_up, down) in place of pick_tiles' (benchmarks, tests). quant: w13 and w2 are quantized
    (packed as its tile reads them), dequantized tile by tile inside the GEMMs. pair_x: the gate|up GEMM's input
    as a row per pair ([T * k, D] in pair order; act-order experts, each row in its expert's column order) instead
    of x's row per token."""
    if (shared is None) != (shared_gate is None):
        raise ValueError("shared and shared_gate come together")
    T, D = x.shape
    E, I = w13.shape[0], quant.inter if quant else w2.shape[2]
    top_k = topk_ids.shape[1]
    if T == 0:
        return torch.empty_like(x)
    x, w13, w2 = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, w13, w2))
    x_rows, rows_per_x = (x, top_k) if pair_x is None else (pair_x.contiguous(), 1)  # row of pair p: p // rows_per_x
    bm, gate_up, down = tiles or pick_tiles(T * top_k)
    order, bounds, starts, pos = block_plan(topk_ids, E, bm)
    common = dict(BLOCK_M=bm, BLOCK_E=triton.next_power_of_2(E + 1), IEEE=x.dtype == torch.float32 or not x.is_cuda,
                  SPLIT=bm >= SPLIT_MIN_M)
    grid_blocks = max_blocks(T * top_k, E, bm)
    act = torch.empty(T * top_k, I, dtype=x.dtype, device=x.device)  # in sorted-row order
    fit = dict(bm=bm, elt=x.element_size(), smem=max_shared_mem(x.device) if x.is_cuda else None)
    bn, bk, warps, stages = fit_tile(gate_up, I, D, quant.k_tiles[0] if quant else None, weights=2, **fit)
    _gate_up_kernel[(triton.cdiv(I, bn), grid_blocks)](
        x_rows, w13, _descriptor(w13, bn, bk, quant), *_scales(quant, 0, w13), order, bounds, starts, act,
        x_rows.stride(0), w13.stride(0), w13.stride(1), *_scale_strides(quant, 0), act.stride(0), I, D, E,
        TOP_K=rows_per_x, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=D % bk == 0,
        **_quant_args(quant, 0, I % bn == 0 and D % bk == 0), **common, num_warps=warps, num_stages=stages)
    y = torch.empty(T * top_k, D, dtype=x.dtype, device=x.device)  # in pair order
    bn, bk, warps, stages = fit_tile(down, D, I, quant.k_tiles[1] if quant else None, weights=1, **fit)
    _down_kernel[(triton.cdiv(D, bn), grid_blocks)](
        act, w2, _descriptor(w2, bn, bk, quant), *_scales(quant, 1, w2), order, bounds, starts, y, act.stride(0),
        w2.stride(0), w2.stride(1), *_scale_strides(quant, 1), y.stride(0), I, D, E, BLOCK_N=bn, BLOCK_K=bk,
        EVEN_K=I % bk == 0,
        **_quant_args(quant, 1, D % bn == 0 and I % bk == 0), **common, num_warps=warps, num_stages=stages)
    return moe_combine(y=y, pos=pos, topk_weights=topk_weights, topk_ids=topk_ids, shared=shared,
                       shared_gate=shared_gate)


def _descriptor(w: torch.Tensor, bn: int, bk: int, quant: QuantExperts | None) -> TensorDescriptor | None:
    """Unquantized expert weights [E, N, K] as a tensor descriptor of [1, bn, bk] tiles, or None where the weights are
    quantized, empty or break its rules (16-byte aligned base and leading strides), or the GPU has no TMA (before
    sm_90 Triton would turn the descriptor back into pointer loads, but with other code than the kernels' own
    pointer path, untimed there): the kernels then load by pointer. The interpreter takes descriptors (CPU tests)."""
    if quant is not None or not TMA_WEIGHTS or w.numel() == 0 or w.data_ptr() % 16:
        return None
    if any((stride * w.element_size()) % 16 for stride in w.stride()[:-1]):
        return None
    if w.is_cuda and torch.cuda.get_device_capability(w.device)[0] < 9:
        return None
    return TensorDescriptor.from_tensor(w, [1, bn, bk])


def _scales(quant: QuantExperts | None, which: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if quant is None:
        return w, w  # not read
    return (quant.s13, quant.z13) if which == 0 else (quant.s2, quant.z2)


def _scale_strides(quant: QuantExperts | None, which: int) -> tuple[int, int]:
    if quant is None:
        return 0, 0
    s = quant.s13 if which == 0 else quant.s2
    return s.stride(0), s.stride(1)


def _quant_args(quant: QuantExperts | None, which: int, even: bool) -> dict:
    return {} if quant is None else dict(W_TILE=quant.tile, GROUP=quant.groups[which], EVEN_W=even)
