"""Triton paged attention, prefill: causal varlen attention of new tokens over their cached prefix and
themselves (triton.py describes the layouts and formats)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deltaserve.kernels.attention._triton_common import (_LOG2E, _check_heads, _check_last_dim, _config,
                                                        _kv_quant, _load_quantized, _precision)

# Tile config for CUDA (benchmarks/bench_attention.py sweeps it): 128x64 tiles with 8 warps ran more than twice
# as fast as 64x64 at T=8192 with 27B heads (benchmarks/RESULTS.md, 2026-11-27, bench_attention.py).
PREFILL_CONFIG: dict[str, int] = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}
_INTERPRET_PREFILL: dict[str, int] = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 1, "num_stages": 1}


@triton.jit
def _prefill_tile(
    acc, l_i, m_i, q, kc_ptr, vc_ptr, ks_ptr, vs_ptr, bt_row, start, q_pos, seq_len, kvh, qk_scale,
    stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh, stride_sp, stride_ss,
    offs_n, offs_d, d_mask,
    PAGE_SIZE: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    QUANT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One BLOCK_N tile of keys [start, start + BLOCK_N) folded into the online softmax. Unmasked tiles lie wholly
    below every row's causal limit (and below seq_len)."""
    tok = start + offs_n
    if MASKED:
        t_mask = tok < seq_len
        kv_mask = t_mask[:, None] & d_mask[None, :]
    else:
        t_mask = tok >= 0
        kv_mask = d_mask[None, :]
    page = tl.load(bt_row + tok // PAGE_SIZE, mask=t_mask, other=0).to(tl.int64)
    in_page = tok % PAGE_SIZE
    k_rows = page * stride_kp + in_page * stride_ks + kvh * stride_kh
    v_rows = page * stride_vp + in_page * stride_vs + kvh * stride_vh
    if QUANT == 0:
        k = tl.load(kc_ptr + k_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(vc_ptr + v_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    else:
        k = _load_quantized(kc_ptr, k_rows, t_mask, q.dtype, QUANT, HEAD_DIM, BLOCK_N, BLOCK_D)
        v = _load_quantized(vc_ptr, v_rows, t_mask, q.dtype, QUANT, HEAD_DIM, BLOCK_N, BLOCK_D)
        s_rows = page * stride_sp + in_page * stride_ss + kvh
        k_sc = tl.load(ks_ptr + s_rows, mask=t_mask, other=0.0)
        v_sc = tl.load(vs_ptr + s_rows, mask=t_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PREC) * (k_sc * qk_scale)[None, :]
    if MASKED:
        visible = (tok[None, :] <= q_pos[:, None]) & t_mask[None, :]
        scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    # a row with nothing visible yet keeps m = -inf; shift by 0 there so exp2 never sees (-inf) - (-inf)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(scores - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if QUANT != 0:
        p = p * v_sc[None, :]  # l_i above sums the unscaled probabilities
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return acc, l_i, m_new


# Both vary every step (stride_btn is the block-table width): no recompile per divisibility class.
@triton.jit(do_not_specialize=["num_seqs", "stride_btn"])
def _prefill_kernel(
    q_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, o_ptr, cu_q_ptr, cu_tiles_ptr, seq_lens_ptr, bt_ptr,
    qk_scale, num_seqs,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh, stride_sp, stride_ss,
    stride_btn,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SEQ: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr, QUANT: tl.constexpr,
):
    """Program (q head h, query tile): the grid's tile axis is an upper bound (T // BLOCK_M + N) over all
    sequences; a program finds its sequence from cu_tiles on the device (no host sync) and exits past the end.
    Tiles run last-first, so the long causal rows start early. Keys below the tile's first query position need no
    mask (first loop); the diagonal band and the seq_len edge are masked (second loop)."""
    h = tl.program_id(0)
    tile = tl.num_programs(1) - 1 - tl.program_id(1)
    offs_seq = tl.arange(0, BLOCK_SEQ)
    ends = tl.load(cu_tiles_ptr + 1 + offs_seq, mask=offs_seq < num_seqs, other=2147483647)
    n = tl.sum((ends <= tile).to(tl.int32), 0)
    if n < num_seqs:
        tile_in_seq = tile - tl.load(cu_tiles_ptr + n)
        q_lo = tl.load(cu_q_ptr + n)
        qlen = tl.load(cu_q_ptr + n + 1) - q_lo
        seq_len = tl.load(seq_lens_ptr + n)
        ctx = seq_len - qlen
        m_start = tile_in_seq * BLOCK_M
        offs_m = m_start + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m_mask = offs_m < qlen
        d_mask = offs_d < HEAD_DIM
        rows = tl.cast(q_lo, tl.int64) + offs_m
        q = tl.load(q_ptr + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        q_pos = ctx + offs_m
        kvh = h // GROUP
        bt_row = bt_ptr + tl.cast(n, tl.int64) * stride_btn

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        full_end = (ctx + m_start) // BLOCK_N * BLOCK_N
        for start in range(0, full_end, BLOCK_N):
            acc, l_i, m_i = _prefill_tile(
                acc, l_i, m_i, q, kc_ptr, vc_ptr, ks_ptr, vs_ptr, bt_row, start, q_pos, seq_len, kvh, qk_scale,
                stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh, stride_sp, stride_ss,
                offs_n, offs_d, d_mask, PAGE_SIZE, False, UPCAST, PREC, QUANT, HEAD_DIM, BLOCK_N, BLOCK_D)
        end = tl.minimum(seq_len, ctx + m_start + BLOCK_M)
        for start in range(full_end, end, BLOCK_N):
            acc, l_i, m_i = _prefill_tile(
                acc, l_i, m_i, q, kc_ptr, vc_ptr, ks_ptr, vs_ptr, bt_row, start, q_pos, seq_len, kvh, qk_scale,
                stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh, stride_sp, stride_ss,
                offs_n, offs_d, d_mask, PAGE_SIZE, True, UPCAST, PREC, QUANT, HEAD_DIM, BLOCK_N, BLOCK_D)
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(o_ptr + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
                 o.to(o_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def paged_attention_prefill(
    *,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its whole paged KV (new tokens already written).

    q: [T, Hq, D]; k_cache, v_cache: [P, page_size, Hkv, D] (quantized: with k_scale, v_scale); cu_seqlens_q: [N+1]
    int32; seq_lens: [N] int32 (KV length including the new tokens); block_tables: [N, max_pages] int32. Query i of
    sequence n sits at position seq_lens[n] - qlen_n + i. Returns o: [T, Hq, D] in q.dtype (rows of sequences with
    no new tokens absent). Unlike the reference it does not check seq_lens >= qlen on the host (that would sync).
    """
    return prefill_into(q=q, k_cache=k_cache, v_cache=v_cache, cu_seqlens_q=cu_seqlens_q, seq_lens=seq_lens,
                        block_tables=block_tables, scale=scale,
                        out=torch.empty_like(q, memory_format=torch.contiguous_format), k_scale=k_scale,
                        v_scale=v_scale)


def prefill_into(
    *, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float, out: torch.Tensor,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """paged_attention_prefill writing into `out` ([T, Hq, D]); rows outside cu_seqlens_q are left as they are."""
    T, Hq, D = q.shape
    N = seq_lens.shape[0]
    Hkv, page_size = k_cache.shape[2], k_cache.shape[1]
    if T == 0 or N == 0:
        return out
    _check_last_dim(q, k_cache, v_cache, out)
    _check_heads(q, k_cache)
    quant, ks, vs, stride_sp, stride_ss = _kv_quant(k_cache, v_cache, k_scale, v_scale, D, q)
    cfg = _config(PREFILL_CONFIG, _INTERPRET_PREFILL, q)
    BLOCK_M = cfg["BLOCK_M"]
    cu = cu_seqlens_q.to(torch.int32)
    tiles = torch.div(cu[1:] - cu[:-1] + (BLOCK_M - 1), BLOCK_M, rounding_mode="floor")
    cu_tiles = torch.zeros(N + 1, dtype=torch.int32, device=q.device)
    torch.cumsum(tiles, 0, out=cu_tiles[1:])
    grid = (Hq, T // BLOCK_M + N)  # each sequence adds at most one partial tile
    _prefill_kernel[grid](
        q, k_cache, v_cache, ks, vs, out, cu, cu_tiles, seq_lens, block_tables,
        scale * _LOG2E, N,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), stride_sp, stride_ss,
        block_tables.stride(0),
        GROUP=Hq // Hkv, HEAD_DIM=D, PAGE_SIZE=page_size,
        BLOCK_M=BLOCK_M, BLOCK_N=cfg["BLOCK_N"], BLOCK_D=triton.next_power_of_2(D),
        # At least 256 so batches of up to 255 sequences share one compiled kernel (a new power of two per batch
        # size would recompile mid-run: seconds each).
        BLOCK_SEQ=max(256, triton.next_power_of_2(N + 1)),
        UPCAST=not q.is_cuda, PREC=_precision(q), QUANT=quant,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out
