"""Triton MoE kernels for small batches (decode): top-k softmax routing in one kernel, and the expert FFN as two
kernels over (token, expert) pairs, with the shared expert folded in as one more pair per token.

At decode the expert FFN is weight-streaming: each pair reads its expert's rows once, so a GEMV per pair runs near
copy bandwidth, while a sort + grouped-GEMM pipeline pays ~25 small launches per layer (on 35B-A3B at batch 1 that
overhead was 3x the weight time). No host syncs: CUDA-graph capturable. gpu.py decides when these run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deltaserve.kernels._device import pdl_launch
from deltaserve.kernels._pdl import prefetch_l2, wait_then_release

@triton.jit
def _topk_softmax_kernel(logits_ptr, w_ptr, ids_ptr, stride_l, E, TOP_K: tl.constexpr, BLOCK_E: tl.constexpr,
                         BLOCK_TOPK: tl.constexpr, PDL: tl.constexpr = False):
    """One token per program: softmax over all E experts in fp32, the top_k (descending), renormalised."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    wait_then_release(PDL)  # the logits are the router projection's output
    logit = tl.load(logits_ptr + t * stride_l + cols, mask=cols < E, other=float("-inf")).to(tl.float32)
    p = tl.exp(logit - tl.max(logit, 0))
    p = p / tl.sum(p, 0)
    slot = tl.arange(0, BLOCK_TOPK)
    picked_w = tl.zeros((BLOCK_TOPK,), dtype=tl.float32)
    picked_id = tl.zeros((BLOCK_TOPK,), dtype=tl.int64)
    for j in tl.static_range(TOP_K):  # k rounds of argmax; the lowest index wins a tie
        best = tl.max(p, 0)
        # clamped: with a NaN logit nothing equals the max, and an id >= E would read past the expert weights
        idx = tl.minimum(tl.min(tl.where(p == best, cols, BLOCK_E), 0), E - 1)
        picked_w = tl.where(slot == j, best, picked_w)
        picked_id = tl.where(slot == j, idx.to(tl.int64), picked_id)
        p = tl.where(cols == idx, -1.0, p)
    picked_w = picked_w / tl.sum(picked_w, 0)
    tl.store(w_ptr + t * TOP_K + slot, picked_w.to(w_ptr.dtype.element_ty), mask=slot < TOP_K)
    tl.store(ids_ptr + t * TOP_K + slot, picked_id, mask=slot < TOP_K)


def moe_topk_softmax(*, router_logits: torch.Tensor, top_k: int,
                     dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits: [T, E] -> (weights [T, top_k] in dtype, ids int64 [T, top_k]), as ref.moe_topk_softmax. The
    weights are rounded to dtype in the kernel's store (the layer wants them in the activation dtype: no cast
    launch)."""
    T, E = router_logits.shape
    if router_logits.stride(-1) != 1:
        router_logits = router_logits.contiguous()
    w = torch.empty(T, top_k, dtype=dtype, device=router_logits.device)
    ids = torch.empty(T, top_k, dtype=torch.int64, device=router_logits.device)
    if T:
        _topk_softmax_kernel[(T,)](router_logits, w, ids, router_logits.stride(0), E, TOP_K=top_k,
                                   BLOCK_E=triton.next_power_of_2(E), BLOCK_TOPK=triton.next_power_of_2(top_k),
                                   num_warps=4 if E > 512 else 1, **pdl_launch(router_logits.device))
    return w, ids


@triton.jit
def _gate_up_block(acc_g, acc_u, x_row, w_ptr, stride_n, n, m_n, inter, k0, D, BLOCK_K: tl.constexpr):
    """Accumulate one [BLOCK_N, BLOCK_K] block of the gate and up rows times x (2-D; reduced by the caller)."""
    k = k0 + tl.arange(0, BLOCK_K)
    m_k = k < D
    xk = tl.load(x_row + k, mask=m_k, other=0.0).to(tl.float32)
    m = m_n[:, None] & m_k[None, :]
    g = tl.load(w_ptr + n[:, None] * stride_n + k[None, :], mask=m, other=0.0).to(tl.float32)
    u = tl.load(w_ptr + (n + inter)[:, None] * stride_n + k[None, :], mask=m, other=0.0).to(tl.float32)
    return acc_g + g * xk[None, :], acc_u + u * xk[None, :]


@triton.jit
def _gate_up_kernel(x_ptr, w13_ptr, ws13_ptr, ids_ptr, act_ptr, stride_x, stride_w13_e, stride_w13_n, stride_ws13_n,
                    I_R, I_S, ACT_W: tl.constexpr, D: tl.constexpr, TOP_K: tl.constexpr, HAS_SHARED: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UNROLL_K: tl.constexpr,
                    PDL: tl.constexpr = False):
    """act[p, n] = silu(x[t] . G_e[n]) * (x[t] . U_e[n]) in fp32 for pair p = (token t, slot j); a token has TOP_K
    routed slots, then (HAS_SHARED) one for the shared expert. Accumulates 2-D and reduces once at the end; with up
    to 4 K blocks the loop is unrolled (D is a model constant), so all of the program's weight loads are in flight."""
    pairs: tl.constexpr = TOP_K + HAS_SHARED
    p = tl.program_id(0).to(tl.int64)
    t, j = p // pairs, p % pairs
    shared = j >= TOP_K  # only ever true with HAS_SHARED
    wait_then_release(PDL)  # the expert ids (and x) come from the kernels before: every weight read depends on them
    e = tl.load(ids_ptr + t * TOP_K + tl.minimum(j, TOP_K - 1)).to(tl.int64)
    # e < 0 marks a routing slot without an expert (e.g. owned by another rank): nothing to compute.
    inter = tl.where(shared, I_S, tl.where(e >= 0, I_R, 0))
    w_ptr = tl.where(shared, ws13_ptr, w13_ptr + tl.maximum(e, 0) * stride_w13_e)
    stride_n = tl.where(shared, stride_ws13_n, stride_w13_n)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    if tl.program_id(1) * BLOCK_N < inter:
        m_n = n < inter
        acc_g = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        if UNROLL_K:  # a few K blocks: unrolled, every load in flight at once
            for k0 in tl.static_range(0, D, BLOCK_K):
                acc_g, acc_u = _gate_up_block(acc_g, acc_u, x_ptr + t * stride_x, w_ptr, stride_n, n, m_n, inter,
                                              k0, D, BLOCK_K)
        else:  # wide hidden sizes: a loop, so the loads in flight do not spill registers
            for k0 in range(0, D, BLOCK_K):
                acc_g, acc_u = _gate_up_block(acc_g, acc_u, x_ptr + t * stride_x, w_ptr, stride_n, n, m_n, inter,
                                              k0, D, BLOCK_K)
        gate, up = tl.sum(acc_g, 1), tl.sum(acc_u, 1)
        tl.store(act_ptr + p * ACT_W + n, gate * tl.sigmoid(gate) * up, mask=m_n)


@triton.jit
def _down_kernel(act_ptr, w2_ptr, ws2_ptr, ids_ptr, weights_ptr, shared_gate_ptr, out_ptr, stride_w2_e, stride_w2_n,
                 stride_ws2_n, stride_sg, stride_out, I_R, I_S, ACT_W: tl.constexpr, D, TOP_K: tl.constexpr,
                 HAS_SHARED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 PDL: tl.constexpr = False, NUM_E: tl.constexpr = 1):
    """out[t, n] = sum over the token's pairs of (weight * act[p]) . Down_e[n], fp32; the shared expert's weight is
    sigmoid(shared_gate[t]). Pairs and K are unrolled; one 2-D accumulator, reduced at the end."""
    pairs: tl.constexpr = TOP_K + HAS_SHARED
    t = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = n < D
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    LINE: tl.constexpr = 1024 // w2_ptr.dtype.element_ty.primitive_bitwidth  # elements per 128-byte line
    if PDL and BLOCK_K >= LINE:  # while the gate/up kernel finishes: this program's weight rows into L2, a hint a line
        for j in tl.static_range(pairs):
            if j < TOP_K:  # the ids are read again below, after the wait (kernels/_pdl.py, rule 1's exception)
                e = tl.load(ids_ptr + t * TOP_K + j).to(tl.int64)
                inter = tl.where(e >= 0, I_R, 0)
                w_ptr = w2_ptr + tl.minimum(tl.maximum(e, 0), NUM_E - 1) * stride_w2_e
                stride_n = stride_w2_n
            else:
                inter = I_S
                w_ptr = ws2_ptr
                stride_n = stride_ws2_n
            for k0 in tl.static_range(0, ACT_W, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K // LINE) * LINE
                prefetch_l2(w_ptr + n[:, None] * stride_n + k[None, :], m_n[:, None] & (k < inter)[None, :])
    wait_then_release(PDL)  # act is the gate/up kernel's output
    for j in tl.static_range(pairs):
        if j < TOP_K:
            e = tl.load(ids_ptr + t * TOP_K + j).to(tl.int64)
            inter = tl.where(e >= 0, I_R, 0)
            w_ptr = w2_ptr + tl.maximum(e, 0) * stride_w2_e
            stride_n = stride_w2_n
            weight = tl.load(weights_ptr + t * TOP_K + j).to(tl.float32)
        else:
            inter = I_S
            w_ptr = ws2_ptr
            stride_n = stride_ws2_n
            weight = tl.sigmoid(tl.load(shared_gate_ptr + t * stride_sg).to(tl.float32))
        for k0 in tl.static_range(0, ACT_W, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            m_k = k < inter
            a = tl.load(act_ptr + (t * pairs + j) * ACT_W + k, mask=m_k, other=0.0) * weight
            w = tl.load(w_ptr + n[:, None] * stride_n + k[None, :], mask=m_n[:, None] & m_k[None, :],
                        other=0.0).to(tl.float32)
            acc += w * a[None, :]
    tl.store(out_ptr + t * stride_out + n, tl.sum(acc, 1).to(out_ptr.dtype.element_ty), mask=m_n)


# (BLOCK_N, BLOCK_K, num_warps) of the two expert kernels, from `benchmarks/bench_kernels.py --moe-paths --moe-batches
# 1 4 8` (H200, 35B-A3B layer, 4 layers a call; benchmarks/RESULTS.md, 2026-12-04). gate_up: two rows by all of K at
# once (18.9 us for both kernels at batch 1, 61.6 at 4, 110 at 8, against 21.2 / 63.5 / 114 with the H100's 8 x 512).
# down: one warp per 2 rows at two tokens and more (60.5 / 104 us at 4 / 8 against 63.5 / 114), but at one token
# 512 programs of 4 rows (21.2 us; 2 x 512 x 1 takes 24.1 there).
GATE_UP_CONFIG = (2, 2048, 4)
DOWN_CONFIG = (2, 512, 1)
DOWN_CONFIG_ONE_TOKEN = (4, 512, 2)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def fused_moe_pairs(*, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                    topk_ids: torch.Tensor, shared_w13: torch.Tensor | None = None,
                    shared_w2: torch.Tensor | None = None, shared_gate: torch.Tensor | None = None,
                    gate_up_config: tuple[int, int, int] | None = None,
                    down_config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """fused_moe through the per-pair kernels at any batch size (the tests and the config sweep drive it)."""
    T, D = x.shape
    top_k = topk_ids.shape[1]
    has_shared = shared_w13 is not None
    i_r, i_s = w2.shape[2], (shared_w2.shape[1] if has_shared else 0)
    pairs = top_k + int(has_shared)
    x, w13, w2 = _unit_last(x), _unit_last(w13), _unit_last(w2)
    ids, weights = topk_ids.contiguous(), topk_weights.contiguous()
    if has_shared:
        shared_w13, shared_w2 = _unit_last(shared_w13), _unit_last(shared_w2)
    else:  # placeholders: never read when HAS_SHARED is off
        shared_w13, shared_w2, shared_gate = w13, w2, weights
    out = torch.empty_like(x)
    if T == 0:
        return out
    act_w = max(i_r, i_s)
    act = torch.empty(T * pairs, act_w, dtype=torch.float32, device=x.device)
    bn, bk, warps = gate_up_config or GATE_UP_CONFIG
    bk = min(bk, triton.next_power_of_2(D))
    _gate_up_kernel[(T * pairs, triton.cdiv(act_w, bn))](
        x, w13, shared_w13, ids, act, x.stride(0), w13.stride(0), w13.stride(1), shared_w13.stride(0),
        i_r, i_s, ACT_W=act_w, D=D, TOP_K=top_k, HAS_SHARED=int(has_shared), BLOCK_N=bn, BLOCK_K=bk,
        UNROLL_K=triton.cdiv(D, bk) <= 4, num_warps=warps, **pdl_launch(x.device))
    bn, bk, warps = down_config or (DOWN_CONFIG_ONE_TOKEN if T == 1 else DOWN_CONFIG)
    bk = min(bk, triton.next_power_of_2(act_w))
    _down_kernel[(T, triton.cdiv(D, bn))](
        act, w2, shared_w2, ids, weights, shared_gate, out, w2.stride(0), w2.stride(1), shared_w2.stride(0),
        shared_gate.stride(0), out.stride(0), i_r, i_s, ACT_W=act_w, D=D, TOP_K=top_k, HAS_SHARED=int(has_shared),
        BLOCK_N=bn, BLOCK_K=bk, NUM_E=w2.shape[0], num_warps=warps, **pdl_launch(x.device))
    return out


@triton.jit
def _combine_kernel(y_ptr, pos_ptr, ids_ptr, w_ptr, shared_ptr, gate_ptr, out_ptr, stride_y, stride_s, stride_g,
                    stride_out, D, TOP_K: tl.constexpr, HAS_SHARED: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[t] = sum_j w[t, j] * y[pos[t, j]] (+ sigmoid(gate[t]) * shared[t]): a gather-sum, one program per (token,
    column block), fp32 in registers, one store; no atomics, so the sum's order (and result) is fixed."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m = cols < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):  # unrolled: the k row loads are in flight together
        valid = tl.load(ids_ptr + t * TOP_K + j) >= 0
        row = tl.where(valid, tl.load(pos_ptr + t * TOP_K + j), 0).to(tl.int64)
        w = tl.load(w_ptr + t * TOP_K + j).to(tl.float32)
        # an id < 0 (expert on another rank) is masked, not weighted by 0: its row may hold garbage or NaN
        v = tl.load(y_ptr + row * stride_y + cols, mask=m & valid, other=0.0).to(tl.float32)
        acc += tl.where(valid, w, 0.0) * v
    if HAS_SHARED:
        g = tl.sigmoid(tl.load(gate_ptr + t * stride_g).to(tl.float32))
        acc += g * tl.load(shared_ptr + t * stride_s + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=m)


def moe_combine(*, y: torch.Tensor, pos: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                shared: torch.Tensor | None = None, shared_gate: torch.Tensor | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """As ref.moe_combine, in one launch (grid: tokens x column blocks of 1024)."""
    T, top_k = topk_ids.shape
    D = y.shape[1]
    y = _unit_last(y)
    pos, ids, weights = pos.contiguous(), topk_ids.contiguous(), topk_weights.contiguous()
    has_shared = shared is not None
    if has_shared:
        shared = _unit_last(shared)
    else:  # placeholders: never read when HAS_SHARED is off
        shared, shared_gate = y, weights
    if out is None:
        out = torch.empty(T, D, dtype=y.dtype, device=y.device)
    if T and D:
        block = min(1024, triton.next_power_of_2(D))  # D=2048: 8 elements (16 bytes of bf16) a thread
        _combine_kernel[(T, triton.cdiv(D, block))](
            y, pos, ids, weights, shared, shared_gate, out, y.stride(0), shared.stride(0), shared_gate.stride(0),
            out.stride(0), D, TOP_K=top_k, HAS_SHARED=int(has_shared), BLOCK_D=block, num_warps=4)
    return out
