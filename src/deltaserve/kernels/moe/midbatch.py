"""Expert-centric Triton MoE for mid-size batches (decode at batch 9-64 on top-8): each touched expert's weights are
read once for all the tokens routed to it, where the per-pair kernels (triton.py) re-read an expert for every pair and
the grouped GEMMs (grouped.py) pay a long glue chain and CUTLASS tiles sized for prefill.

Pipeline (no host syncs, no data-dependent shapes: CUDA-graph capturable):
  1. the routing sort (sort.py; stable: a group's rows in token order): bounds [E + 1], expert e's rows are sorted
     rows [bounds[e], bounds[e + 1]); ids < 0 sort first, below bounds[0], and are never computed.
  2. _gate_up_kernel, grid (1 + E, cdiv(I, BLOCK_N)): program (1 + e, nb) loads expert e's gate rows [nb*BLOCK_N, ...)
     and the matching up rows tile by tile over K = D, multiplies them with the gathered x rows of its pairs (BLOCK_M
     rows a chunk; an expert with more loops over chunks) and writes silu(gate) * up to act[sorted row]. Empty experts
     exit after two loads. Program 0 is the shared expert over all T tokens (act rows P .. P + T); it comes first so
     that its longer loop starts in the first wave.
  3. _down_kernel, grid (1 + E, cdiv(D, BLOCK_N)): act rows times w2[e] -> y[pair] (routed, in (token, slot) order)
     and y[P + t] (shared).
  4. triton.moe_combine: out[t] = sum_j w[t, j] * y[t * k + j] over the slots with ids >= 0, + sigmoid(gate) * y[P + t].

The GEMMs are weights [BLOCK_N, BLOCK_K] times activations^T [BLOCK_K, BLOCK_M] (the weights take the MMA's M side:
few tokens per expert), fp32 accumulation; act and y are rounded to x.dtype as in the grouped path."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deltaserve.kernels._device import max_shared_mem
from deltaserve.kernels.moe import sort
from deltaserve.kernels.moe.triton import moe_combine


@triton.jit
def _rows(order_ptr, bounds_ptr, pid, T, P, TOP_K: tl.constexpr):
    """(start, end) of the program's sorted rows and whether it is the shared expert (program 0: rows [0, T))."""
    shared = pid == 0
    e = tl.maximum(pid - 1, 0)
    start = tl.where(shared, 0, tl.load(bounds_ptr + e))
    end = tl.where(shared, T, tl.load(bounds_ptr + e + 1))
    return shared, e.to(tl.int64), start, end


@triton.jit
def _dot(w, a, acc, IEEE: tl.constexpr):
    """acc + w @ a, fp32 accumulation. IEEE (fp32 inputs, or the interpreter, whose bf16 tl.dot multiplies raw bits:
    docs/KERNELS.md) upcasts and multiplies in true fp32 instead of the default tf32 / bf16 tensor-core inputs."""
    if IEEE:
        return tl.dot(w.to(tl.float32), a.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(w, a, acc)


@triton.jit
def _k_mask(k, K, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """k < K; with EVEN_K (K a multiple of BLOCK_K) a constant true, so the weight loads vectorize unconditionally."""
    if EVEN_K:
        return tl.full((BLOCK_K,), 1, tl.int1)
    return k < K


@triton.jit
def _gate_up_kernel(x_ptr, w13_ptr, ws13_ptr, order_ptr, bounds_ptr, act_ptr, stride_x, stride_w13_e, stride_w13_n,
                    stride_ws13_n, stride_act, T, P, I_R, I_S, D, TOP_K: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr):
    shared, e, start, end = _rows(order_ptr, bounds_ptr, tl.program_id(0), T, P, TOP_K)
    inter = tl.where(shared, I_S, I_R)
    n0 = tl.program_id(1) * BLOCK_N
    if (start < end) & (n0 < inter):
        w_ptr = tl.where(shared, ws13_ptr, w13_ptr + e * stride_w13_e)
        stride_n = tl.where(shared, stride_ws13_n, stride_w13_n).to(tl.int64)
        n = n0 + tl.arange(0, BLOCK_N)
        m_n = n < inter
        g_ptrs = w_ptr + n[:, None] * stride_n
        u_ptrs = w_ptr + (n + inter)[:, None] * stride_n
        for m0 in range(start, end, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            m_r = rows < end
            pair = tl.load(order_ptr + rows, mask=m_r & ~shared, other=0)
            tok = tl.where(shared, rows, pair // TOP_K).to(tl.int64)
            acc_g = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            acc_u = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for k0 in range(0, D, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                m_k = _k_mask(k, D, BLOCK_K, EVEN_K)
                xt = tl.load(x_ptr + tok[None, :] * stride_x + k[:, None], mask=m_r[None, :] & m_k[:, None],
                             other=0.0)
                m_w = m_n[:, None] & m_k[None, :]
                g = tl.load(g_ptrs + k[None, :], mask=m_w, other=0.0)
                u = tl.load(u_ptrs + k[None, :], mask=m_w, other=0.0)
                acc_g = _dot(g, xt, acc_g, IEEE)
                acc_u = _dot(u, xt, acc_u, IEEE)
            h = acc_g * tl.sigmoid(acc_g) * acc_u
            act_row = tl.where(shared, P + rows, rows).to(tl.int64)
            tl.store(act_ptr + act_row[None, :] * stride_act + n[:, None], h.to(act_ptr.dtype.element_ty),
                     mask=m_r[None, :] & m_n[:, None])


@triton.jit
def _down_kernel(act_ptr, w2_ptr, ws2_ptr, order_ptr, bounds_ptr, y_ptr, stride_act, stride_w2_e, stride_w2_n,
                 stride_ws2_n, stride_y, T, P, I_R, I_S, D, TOP_K: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr):
    shared, e, start, end = _rows(order_ptr, bounds_ptr, tl.program_id(0), T, P, TOP_K)
    if start < end:
        inter = tl.where(shared, I_S, I_R)
        w_ptr = tl.where(shared, ws2_ptr, w2_ptr + e * stride_w2_e)
        stride_n = tl.where(shared, stride_ws2_n, stride_w2_n).to(tl.int64)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_n = n < D
        w_ptrs = w_ptr + n[:, None] * stride_n
        for m0 in range(start, end, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            m_r = rows < end
            pair = tl.load(order_ptr + rows, mask=m_r & ~shared, other=0)
            act_row = tl.where(shared, P + rows, rows).to(tl.int64)
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for k0 in range(0, inter, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                m_k = _k_mask(k, inter, BLOCK_K, EVEN_K)
                at = tl.load(act_ptr + act_row[None, :] * stride_act + k[:, None], mask=m_r[None, :] & m_k[:, None],
                             other=0.0)
                w = tl.load(w_ptrs + k[None, :], mask=m_n[:, None] & m_k[None, :], other=0.0)
                acc = _dot(w, at, acc, IEEE)
            y_row = tl.where(shared, P + rows, pair).to(tl.int64)
            tl.store(y_ptr + y_row[None, :] * stride_y + n[:, None], acc.to(y_ptr.dtype.element_ty),
                     mask=m_r[None, :] & m_n[:, None])


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the two kernels. Weight-streaming at decode: BLOCK_M is the
# MMA's N side (16, the smallest tl.dot takes); BLOCK_N x BLOCK_K weight tiles of 16-32 KB a stage keep ~100 KB in
# flight per SM. H200 (`bench_kernels.py --moe-paths`, RESULTS.md 2026-12-03): of CONFIGS, (16, 64, 128, 4, 4) was
# the best (or tied) gate_up tile at every batch from 4 to 256, and as the down tile within ~1% of the best and 1-3%
# faster than the first default (16, 128, 128, 4, 4) at batch 16-256.
GATE_UP_CONFIG = (16, 64, 128, 4, 4)
DOWN_CONFIG = (16, 64, 128, 4, 4)
CONFIGS = [(16, 64, 128, 4, 4), (16, 128, 64, 4, 4), (16, 128, 128, 8, 3)]


def sort_rows(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_ids [T, k] -> (order, bounds, pos) in expert order (sort.py): one launch up to sort.SORT_PROGRAM_MAX
    pairs. The ids were sorted by torch as int64 keys first (5.5% of a 35B-A3B verify step at batch 16, H200,
    RESULTS.md 2026-12-05 bench_mtp --profile), then as int16 keys."""
    order, bounds, pos, _ = sort.sort_rows(topk_ids, num_experts)
    return order, bounds, pos


def fused_moe_mid(*, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, shared_w13: torch.Tensor | None = None,
                  shared_w2: torch.Tensor | None = None, shared_gate: torch.Tensor | None = None,
                  gate_up_config: tuple[int, int, int, int, int] | None = None,
                  down_config: tuple[int, int, int, int, int] | None = None) -> torch.Tensor:
    """As ref.fused_moe (x: [T, D]; w13: [E, 2I, D]; w2: [E, D, I]; topk_weights/ids: [T, k]; shared_w13: [2I_s, D];
    shared_w2: [D, I_s]; shared_gate: [T, 1] logits) -> [T, D] in x.dtype. Intermediates (silu(gate) * up, the
    experts' outputs) are rounded to x.dtype; the weighted sum is fp32. Configs: (BLOCK_M, BLOCK_N, BLOCK_K,
    num_warps, num_stages), default GATE_UP_CONFIG / DOWN_CONFIG."""
    T, D = x.shape
    E, top_k = w13.shape[0], topk_ids.shape[1]
    has_shared = shared_w13 is not None
    if has_shared != (shared_w2 is not None) or has_shared != (shared_gate is not None):
        raise ValueError("shared_w13, shared_w2 and shared_gate come together")
    i_r = w2.shape[2]
    i_s = shared_w2.shape[1] if has_shared else 0
    x, w13, w2 = _unit_last(x), _unit_last(w13), _unit_last(w2)
    if has_shared:
        shared_w13, shared_w2 = _unit_last(shared_w13), _unit_last(shared_w2)
    else:  # placeholders: program 0 has no rows (T passed as 0), so they are never read
        shared_w13, shared_w2 = w13[0], w2[0]
    P = T * top_k
    if T == 0:
        return torch.empty_like(x)
    order, bounds, pos = sort_rows(topk_ids, E)
    rows = P + (T if has_shared else 0)
    act_w = max(i_r, i_s)
    act = torch.empty(rows, act_w, dtype=x.dtype, device=x.device)
    y = torch.empty(rows, D, dtype=x.dtype, device=x.device)
    t_shared = T if has_shared else 0
    ieee = x.dtype == torch.float32 or not x.is_cuda
    fit = dict(elt=x.element_size(), smem=max_shared_mem(x.device) if x.is_cuda else None)
    bm, *tile = gate_up_config or GATE_UP_CONFIG
    bn, bk, warps, stages = fit_tile(tile, act_w, D, None, bm=bm, weights=2, **fit)
    _gate_up_kernel[(1 + E, triton.cdiv(act_w, bn))](
        x, w13, shared_w13, order, bounds, act, x.stride(0), w13.stride(0), w13.stride(1), shared_w13.stride(0),
        act.stride(0), t_shared, P, i_r, i_s, D, TOP_K=top_k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        EVEN_K=D % bk == 0, IEEE=ieee, num_warps=warps, num_stages=stages)
    bm, *tile = down_config or DOWN_CONFIG
    bn, bk, warps, stages = fit_tile(tile, D, act_w, None, bm=bm, weights=1, **fit)
    _down_kernel[(1 + E, triton.cdiv(D, bn))](
        act, w2, shared_w2, order, bounds, y, act.stride(0), w2.stride(0), w2.stride(1), shared_w2.stride(0),
        y.stride(0), t_shared, P, i_r, i_s, D, TOP_K=top_k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        EVEN_K=i_r % bk == 0 and i_s % bk == 0, IEEE=ieee, num_warps=warps, num_stages=stages)
    shared = {"shared": y[P:], "shared_gate": shared_gate} if has_shared else {}
    return moe_combine(y=y, pos=pos, topk_weights=topk_weights, topk_ids=topk_ids, **shared)


def fit_tile(config: tuple[int, ...], n: int, k: int, k_tile: int | None, *, bm: int, weights: int, elt: int,
             smem: int | None) -> tuple[int, ...]:
    """A kernel's (BLOCK_N, BLOCK_K, warps, stages) clamped to its N and K (and to the quantized K tile), with no
    more stages than the device's shared memory (smem bytes; None: no limit) holds: a stage keeps a BLOCK_M x
    BLOCK_K tile of activations and `weights` BLOCK_K x BLOCK_N weight tiles of elt bytes each. The tiles were
    timed in bf16 on an H100 and H200, where they fit; fp32 activations double the bytes (4 stages of the blocked
    gate|up kernel: 240-288 KB against the H100's 227 KB; of the expert-centric one 221 KB against an A100's 163 KB)
    and smaller GPUs (Ada 99 KB) hold fewer stages."""
    bn, bk, warps, stages = config
    bk = min(bk, k_tile) if k_tile else bk
    bn, bk = max(16, min(bn, triton.next_power_of_2(n))), max(16, min(bk, triton.next_power_of_2(k)))
    if smem is not None:
        stages = max(1, min(stages, smem // ((bm * bk + weights * bk * bn) * elt)))
    return bn, bk, warps, stages


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()
