"""Triton paged attention (same keyword-only signatures as ref.py): KV write, varlen causal prefill, split-KV decode.

Layouts (per layer): k_cache, v_cache: [P, page_size, Hkv, D], last dim contiguous; block_tables: [N, max_pages]
int32. Tokens are located per row of a tile (page = block_tables[n, pos // page_size]), so any power-of-two page
size works and a tile may straddle pages. Softmax runs in fp32 in the log2 domain (scores * scale * log2 e, exp2).

Decode is CUDA-graph safe: no host syncs, and the grid (N, Hkv, num_splits) depends only on tensor shapes
(num_splits comes from N, Hkv and the block-table width, never from seq_lens values).

On CPU tensors (TRITON_INTERPRET=1, the CI path) the dot operands are upcast to fp32, because the interpreter's bf16
tl.dot multiplies raw bits (docs/KERNELS.md, "Testing Triton kernels on CPU").

Quantized pages (fp8 / int8 / int4 with a scale per token and KV head; the format in ref.py's docstring) are
selected by the QUANT constexpr (0: pages in q's dtype, 1: fp8, 2: int8, 3: int4), so the unquantized kernels
compile exactly as before. The write kernels quantize in fp32 with the reference's formula (correctly rounded
divisions), so they store the same bytes as the reference; the read kernels convert the stored values to q's dtype
(exact for all three formats), dot them unscaled, and apply the K scale to the scores and the V scale to the
probabilities, one multiply per token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deltaserve.kernels._device import num_sms
from deltaserve.kernels.attention.ref import KV_QMAX, kv_stored_dim
from deltaserve.kernels.rope.triton import inv_freq, rope_cos_sin, rope_outputs

_LOG2E = 1.4426950408889634

# Tile configs for CUDA; module-level so benchmarks/bench_attention.py can sweep them. BLOCK_* are powers of two.
# From that sweep (benchmarks/RESULTS.md, 2026-11-27, bench_attention.py): 128x64 prefill tiles with 8 warps ran
# more than twice as fast as 64x64 at T=8192 with 27B heads; decode configs were within 10% of each other at
# batch 64, and more splits (4 waves, up to 128 per sequence) helped batch 1 at long context.
DECODE_CONFIG: dict[str, int] = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "WAVES": 4, "MAX_SPLITS": 128}
PREFILL_CONFIG: dict[str, int] = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}
# The interpreter (CPU tensors) runs programs serially in numpy: the smallest tiles tl.dot takes keep tests fast.
_INTERPRET_DECODE: dict[str, int] = {"BLOCK_N": 16, "num_warps": 1, "num_stages": 1, "WAVES": 2, "MAX_SPLITS": 4}
_INTERPRET_PREFILL: dict[str, int] = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 1, "num_stages": 1}


# ----------------------------------------------------------------------------------------------------------- write_kv


@triton.jit
def _quantize_store(x, h_mask, row_ptr, stride_h, scale_ptr, QUANT: tl.constexpr, QMAX: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Quantize one token's head vectors x ([BLOCK_H, BLOCK_D] fp32) and store them at row_ptr (the token's page
    row; heads stride_h apart) and their scales at scale_ptr (one per head), as ref.quantize_kv does."""
    heads = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_D)
    mask = h_mask[:, None] & (cols < HEAD_DIM)[None, :]
    x = tl.where(mask, x, 0.0)
    amax = tl.max(tl.abs(x), 1)
    qmax = tl.full([BLOCK_H], QMAX, tl.float32)
    inv = tl.where(amax > 0, tl.div_rn(qmax, amax), 0.0)
    y = tl.minimum(tl.maximum(x * inv[:, None], -QMAX), QMAX)
    tl.store(scale_ptr + heads, tl.div_rn(amax, qmax), mask=h_mask)
    rows = row_ptr + heads[:, None] * stride_h
    if QUANT == 1:
        tl.store(rows + cols[None, :], y.to(row_ptr.dtype.element_ty), mask=mask)
    else:
        r = tl.where(y >= 0, tl.floor(y + 0.5), -tl.floor(0.5 - y))
        if QUANT == 2:
            tl.store(rows + cols[None, :], r.to(tl.int8), mask=mask)
        else:
            # int4: columns 2j and 2j+1 share byte j (low, high nibble), each as q + 8
            lo, hi = tl.split(tl.reshape((r + 8.0).to(tl.int32), [BLOCK_H, BLOCK_D // 2, 2]))
            half = tl.arange(0, BLOCK_D // 2)
            tl.store(rows + half[None, :], (lo | (hi << 4)).to(tl.uint8),
                     mask=h_mask[:, None] & (half < HEAD_DIM // 2)[None, :])


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcp, stride_kcs, stride_kch, stride_vcp, stride_vcs, stride_vch, stride_sp, stride_ss,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, QUANT: tl.constexpr, QMAX: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    if slot >= 0:
        page = slot // PAGE_SIZE
        off = slot % PAGE_SIZE
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_h[:, None] < NUM_HEADS) & (offs_d[None, :] < HEAD_DIM)
        t64 = tl.cast(t, tl.int64)
        k = tl.load(k_ptr + t64 * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
        v = tl.load(v_ptr + t64 * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
        if QUANT == 0:
            kc = kc_ptr + page * stride_kcp + off * stride_kcs + offs_h[:, None] * stride_kch + offs_d[None, :]
            vc = vc_ptr + page * stride_vcp + off * stride_vcs + offs_h[:, None] * stride_vch + offs_d[None, :]
            tl.store(kc, k.to(kc_ptr.dtype.element_ty), mask=mask)
            tl.store(vc, v.to(vc_ptr.dtype.element_ty), mask=mask)
        else:
            h_mask = offs_h < NUM_HEADS
            s_off = page * stride_sp + off * stride_ss
            _quantize_store(k.to(tl.float32), h_mask, kc_ptr + page * stride_kcp + off * stride_kcs, stride_kch,
                            ks_ptr + s_off, QUANT, QMAX, HEAD_DIM, BLOCK_H, BLOCK_D)
            _quantize_store(v.to(tl.float32), h_mask, vc_ptr + page * stride_vcp + off * stride_vcs, stride_vch,
                            vs_ptr + s_off, QUANT, QMAX, HEAD_DIM, BLOCK_H, BLOCK_D)


def write_kv(
    *, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> None:
    """k, v: [T, Hkv, D]; k_cache, v_cache: [P, page_size, Hkv, D] (quantized pages: with k_scale, v_scale
    [P, page_size, Hkv] fp32); slot_mapping: [T] int64 (< 0: skip).

    Writes in place: cache.flatten(0, 1)[slot_mapping[t]] = k[t] / v[t] (quantized, with its scales). One program
    per token.
    """
    T, H, D = k.shape
    if T == 0:
        return
    _check_last_dim(k, v, k_cache, v_cache)
    quant, ks, vs, stride_sp, stride_ss = _kv_quant(k_cache, v_cache, k_scale, v_scale, D)
    _write_kv_kernel[(T,)](
        k, v, k_cache, v_cache, ks, vs, slot_mapping.to(torch.int64),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), stride_sp, stride_ss,
        NUM_HEADS=H, HEAD_DIM=D, PAGE_SIZE=k_cache.shape[1],
        BLOCK_H=triton.next_power_of_2(H), BLOCK_D=triton.next_power_of_2(D),
        QUANT=quant, QMAX=KV_QMAX.get(k_cache.dtype, 0.0),
    )


# ---------------------------------------------------------------------------------------- q/k norm + RoPE + KV write


@triton.jit
def _norm_rope_heads(x_ptr, stride_xh, w_ptr, n_heads, eps, cos, sin, cols, partner, is_rot, sign,
                     D: tl.constexpr, BLOCK_H: tl.constexpr):
    """Zero-centred RMSNorm of each head row, then the rotation; the partner columns are normalized with the same
    per-row rstd, so norm and RoPE stay one pass in fp32. Returns ([BLOCK_H, BLOCK_D] fp32, mask)."""
    heads = tl.arange(0, BLOCK_H)
    mask = (heads[:, None] < n_heads) & (cols[None, :] < D)
    rows = x_ptr + heads[:, None] * stride_xh
    x = tl.load(rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(rows + partner[None, :], mask=mask & is_rot[None, :], other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, 1) / D + eps)[:, None]
    w = 1.0 + tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    wp = 1.0 + tl.load(w_ptr + partner, mask=is_rot, other=0.0).to(tl.float32)
    y = x * rstd * w[None, :]
    yp = xp * rstd * wp[None, :]
    return tl.where(is_rot[None, :], y * cos[None, :] + sign[None, :] * yp * sin[None, :], y), mask


@triton.jit
def _qk_norm_rope_write_kv_kernel(
    q_ptr, k_ptr, v_ptr, qw_ptr, kw_ptr, qo_ptr, ko_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, pos_ptr, slot_ptr,
    inv_freq_ptr, eps,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcp, stride_kcs, stride_kch, stride_vcp, stride_vcs, stride_vch, stride_sp, stride_ss,
    HQ: tl.constexpr, HK: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr, QUANT: tl.constexpr, QMAX: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.float32)
    cols = tl.arange(0, BLOCK_D)
    cos, sin, partner, is_rot, sign = rope_cos_sin(pos, inv_freq_ptr, cols, HALF)

    qo, q_mask = _norm_rope_heads(q_ptr + t * stride_qt, stride_qh, qw_ptr, HQ, eps, cos, sin, cols, partner,
                                  is_rot, sign, D, BLOCK_HQ)
    hq = tl.arange(0, BLOCK_HQ)
    tl.store(qo_ptr + t * (HQ * D) + hq[:, None] * D + cols[None, :], qo.to(qo_ptr.dtype.element_ty), mask=q_mask)

    ko, k_mask = _norm_rope_heads(k_ptr + t * stride_kt, stride_kh, kw_ptr, HK, eps, cos, sin, cols, partner,
                                  is_rot, sign, D, BLOCK_HK)
    hk = tl.arange(0, BLOCK_HK)
    ko = ko.to(ko_ptr.dtype.element_ty)
    tl.store(ko_ptr + t * (HK * D) + hk[:, None] * D + cols[None, :], ko, mask=k_mask)
    slot = tl.load(slot_ptr + t)
    if slot >= 0:
        page = slot // PAGE_SIZE
        off = slot % PAGE_SIZE
        v = tl.load(v_ptr + t * stride_vt + hk[:, None] * stride_vh + cols[None, :], mask=k_mask)
        if QUANT == 0:
            kc = kc_ptr + page * stride_kcp + off * stride_kcs + hk[:, None] * stride_kch + cols[None, :]
            tl.store(kc, ko.to(kc_ptr.dtype.element_ty), mask=k_mask)
            vc = vc_ptr + page * stride_vcp + off * stride_vcs + hk[:, None] * stride_vch + cols[None, :]
            tl.store(vc, v.to(vc_ptr.dtype.element_ty), mask=k_mask)
        else:
            # the pages hold k_out's values (rounded to the output dtype), as the reference writes them
            h_mask = hk < HK
            s_off = page * stride_sp + off * stride_ss
            _quantize_store(ko.to(tl.float32), h_mask, kc_ptr + page * stride_kcp + off * stride_kcs, stride_kch,
                            ks_ptr + s_off, QUANT, QMAX, D, BLOCK_HK, BLOCK_D)
            _quantize_store(v.to(tl.float32), h_mask, vc_ptr + page * stride_vcp + off * stride_vcs, stride_vch,
                            vs_ptr + s_off, QUANT, QMAX, D, BLOCK_HK, BLOCK_D)


def qk_norm_rope_write_kv(
    *,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    positions: torch.Tensor,
    rotary_dim: int,
    theta: float,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention layer's pre-attention chain in one op: per-head zero-centred RMSNorm of q and k, partial RoPE,
    then k and v written to their pages.

    q: [T, Hq, D]; k, v: [T, Hkv, D]; q_weight, k_weight: [D] (applied as 1 + w); positions: [T] int64;
    k_cache, v_cache: [P, page_size, Hkv, D] (quantized: with k_scale, v_scale); slot_mapping: [T] int64 (< 0:
    skip). Returns (q_out, k_out) in the input dtypes. One program per token; fp32 from the loads to the stores (no
    rounding between norm and rotation).
    """
    T, Hq, D = q.shape
    Hk = k.shape[1]
    q_out, k_out = rope_outputs(q, k, rotary_dim)
    if T == 0:
        return q_out, k_out
    _check_last_dim(q, k, v, k_cache, v_cache)
    quant, ks, vs, stride_sp, stride_ss = _kv_quant(k_cache, v_cache, k_scale, v_scale, D)
    _qk_norm_rope_write_kv_kernel[(T,)](
        q, k, v, q_weight, k_weight, q_out, k_out, k_cache, v_cache, ks, vs, positions,
        slot_mapping.to(torch.int64), inv_freq(rotary_dim, theta, q.device), eps,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), stride_sp, stride_ss,
        HQ=Hq, HK=Hk, D=D, HALF=rotary_dim // 2, PAGE_SIZE=k_cache.shape[1],
        BLOCK_HQ=triton.next_power_of_2(Hq), BLOCK_HK=triton.next_power_of_2(Hk), BLOCK_D=triton.next_power_of_2(D),
        QUANT=quant, QMAX=KV_QMAX.get(k_cache.dtype, 0.0), num_warps=4,
    )
    return q_out, k_out


# ------------------------------------------------------------------------------------------------------------ decode


# num_splits changes as contexts grow (eager decode); stride_btn is the block-table width of the step
@triton.jit
def _load_quantized(c_ptr, rows, t_mask, out_ty: tl.constexpr, QUANT: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """The stored values (unscaled) of BLOCK_N quantized head vectors starting at element offsets rows ([BLOCK_N]),
    as [BLOCK_N, BLOCK_D] in out_ty; masked rows and columns are 0."""
    if QUANT == 3:
        half = tl.arange(0, BLOCK_D // 2)
        # 0x88: both nibbles 8, i.e. the value 0
        b = tl.load(c_ptr + rows[:, None] + half[None, :], mask=t_mask[:, None] & (half < HEAD_DIM // 2)[None, :],
                    other=0x88).to(tl.int32)
        x = tl.reshape(tl.join((b & 15) - 8, (b >> 4) - 8), [BLOCK_N, BLOCK_D])  # byte j -> columns 2j, 2j+1
    else:
        cols = tl.arange(0, BLOCK_D)
        x = tl.load(c_ptr + rows[:, None] + cols[None, :], mask=t_mask[:, None] & (cols < HEAD_DIM)[None, :],
                    other=0.0)
    return x.to(out_ty)


@triton.jit(do_not_specialize=["num_splits", "stride_btn"])
def _decode_split_kernel(
    q_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, bt_ptr, seq_lens_ptr, part_o_ptr, part_lse_ptr,
    qk_scale, num_splits,
    stride_qn, stride_qh,
    stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh, stride_sp, stride_ss,
    stride_btn,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr, QUANT: tl.constexpr,
):
    """Program (n, kv head g, split s): the GQA group's q heads are the rows of the tile, so each K/V tile is read
    once for all of them. Split s covers whole BLOCK_N tiles [lo, hi) of sequence n; writes the split's normalized
    output and its log2-sum-exp (-inf for an empty split) to the partial buffers [N, Hq, num_splits, (D)]."""
    n = tl.program_id(0)
    g = tl.program_id(1)
    s = tl.program_id(2)
    n64 = tl.cast(n, tl.int64)
    seq_len = tl.load(seq_lens_ptr + n)
    tiles_per_split = tl.cdiv(tl.cdiv(seq_len, BLOCK_N), num_splits)
    lo = s * tiles_per_split * BLOCK_N
    hi = tl.minimum(lo + tiles_per_split * BLOCK_N, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    h_mask = offs_h < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = g * GROUP + offs_h
    q = tl.load(q_ptr + n64 * stride_qn + heads[:, None] * stride_qh + offs_d[None, :],
                mask=h_mask[:, None] & d_mask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    bt_row = bt_ptr + n64 * stride_btn
    for start in range(lo, hi, BLOCK_N):
        tok = start + offs_n
        t_mask = tok < hi
        # helpers are inlined by hand on the unquantized path: each nested jit call costs milliseconds in the
        # interpreter
        page = tl.load(bt_row + tok // PAGE_SIZE, mask=t_mask, other=0).to(tl.int64)
        in_page = tok % PAGE_SIZE
        k_rows = page * stride_kp + in_page * stride_ks + g * stride_kh
        v_rows = page * stride_vp + in_page * stride_vs + g * stride_vh
        if QUANT == 0:
            kv_mask = t_mask[:, None] & d_mask[None, :]
            k = tl.load(kc_ptr + k_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(vc_ptr + v_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            scores = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        else:
            k = _load_quantized(kc_ptr, k_rows, t_mask, q.dtype, QUANT, HEAD_DIM, BLOCK_N, BLOCK_D)
            v = _load_quantized(vc_ptr, v_rows, t_mask, q.dtype, QUANT, HEAD_DIM, BLOCK_N, BLOCK_D)
            s_rows = page * stride_sp + in_page * stride_ss + g
            k_sc = tl.load(ks_ptr + s_rows, mask=t_mask, other=0.0)
            v_sc = tl.load(vs_ptr + s_rows, mask=t_mask, other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision=PREC) * (k_sc * qk_scale)[None, :]
        scores = tl.where(t_mask[None, :], scores, float("-inf"))
        # every tile holds at least one valid token, so m_new is finite
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if QUANT != 0:
            p = p * v_sc[None, :]  # l_i above sums the unscaled probabilities
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new

    nonempty = l_i > 0
    o = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
    row = (n64 * (GROUP * tl.num_programs(1)) + heads) * num_splits + s  # [N, Hq, S] flat index
    tl.store(part_lse_ptr + row, lse, mask=h_mask)
    tl.store(part_o_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], o, mask=h_mask[:, None] & d_mask[None, :])


@triton.jit(do_not_specialize=["num_splits"])  # eager decode: changes as contexts grow
def _decode_reduce_kernel(
    part_o_ptr, part_lse_ptr, o_ptr, stride_on, stride_oh, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (n, q head h): o = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M); zeros when every split is empty
    (a padding row, seq_lens 0)."""
    n = tl.program_id(0)
    h = tl.program_id(1)
    row = tl.cast(n, tl.int64) * tl.num_programs(1) + h
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    d_mask = offs_d < HEAD_DIM
    lse = tl.load(part_lse_ptr + row * num_splits + offs_s, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))
    denom = tl.sum(w, 0)
    parts = tl.load(part_o_ptr + (row * num_splits + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    o = tl.sum(parts * w[:, None], 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(o_ptr + tl.cast(n, tl.int64) * stride_on + h * stride_oh + offs_d, o.to(o_ptr.dtype.element_ty),
             mask=d_mask)


def decode_num_splits(num_seqs: int, num_kv_heads: int, max_kv_len: int, device: torch.device) -> int:
    """Splits per (sequence, kv head): enough programs for about WAVES waves over the SMs, at most one split per
    BLOCK_N tile of the longest possible sequence (block-table width * page size), at most MAX_SPLITS. Depends on
    shapes only, so a captured CUDA graph stays valid for any seq_lens."""
    if device.type == "cuda":
        sms = num_sms(device)
        cfg = DECODE_CONFIG
    else:
        sms, cfg = 8, _INTERPRET_DECODE
    want = triton.cdiv(cfg["WAVES"] * sms, max(1, num_seqs * num_kv_heads))
    return max(1, min(want, triton.cdiv(max_kv_len, cfg["BLOCK_N"]), cfg["MAX_SPLITS"]))


def paged_attention_decode(
    *,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query per sequence at its last position seq_lens[n] - 1.

    q: [N, Hq, D]; k_cache, v_cache: [P, page_size, Hkv, D] (quantized: with k_scale, v_scale); seq_lens: [N]
    int32 (0: padding row, output zeros); block_tables: [N, max_pages] int32. Returns o: [N, Hq, D] in q.dtype.
    """
    return decode_into(q=q, k_cache=k_cache, v_cache=v_cache, seq_lens=seq_lens, block_tables=block_tables,
                       scale=scale, out=torch.empty_like(q, memory_format=torch.contiguous_format),
                       k_scale=k_scale, v_scale=v_scale)


def decode_into(
    *, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
    block_tables: torch.Tensor, scale: float, out: torch.Tensor, num_splits: int | None = None,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """paged_attention_decode writing into `out` ([N, Hq, D]); `num_splits` overrides the heuristic (tests)."""
    N, Hq, D = q.shape
    Hkv, page_size = k_cache.shape[2], k_cache.shape[1]
    if N == 0:
        return out
    _check_last_dim(q, k_cache, v_cache, out)
    _check_heads(q, k_cache)
    quant, ks, vs, stride_sp, stride_ss = _kv_quant(k_cache, v_cache, k_scale, v_scale, D, q)
    if num_splits is None:
        num_splits = decode_num_splits(N, Hkv, block_tables.shape[1] * page_size, q.device)
    group = Hq // Hkv
    cfg = _config(DECODE_CONFIG, _INTERPRET_DECODE, q)
    part_o = torch.empty((N, Hq, num_splits, D), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((N, Hq, num_splits), dtype=torch.float32, device=q.device)
    BLOCK_D = triton.next_power_of_2(D)
    _decode_split_kernel[(N, Hkv, num_splits)](
        q, k_cache, v_cache, ks, vs, block_tables, seq_lens, part_o, part_lse,
        scale * _LOG2E, num_splits,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), stride_sp, stride_ss,
        block_tables.stride(0),
        GROUP=group, HEAD_DIM=D, PAGE_SIZE=page_size,
        BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_N=cfg["BLOCK_N"], BLOCK_D=BLOCK_D,
        UPCAST=not q.is_cuda, PREC=_precision(q), QUANT=quant,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    _decode_reduce_kernel[(N, Hq)](
        part_o, part_lse, out, out.stride(0), out.stride(1), num_splits,
        HEAD_DIM=D, BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=BLOCK_D,
        num_warps=4,
    )
    return out


# ----------------------------------------------------------------------------------------------------------- prefill


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


# ----------------------------------------------------------------------------------------------------------- helpers


def _config(gpu: dict[str, int], interpret: dict[str, int], q: torch.Tensor) -> dict[str, int]:
    """The tile config for q's device and dtype. fp32 tiles (tests, debugging) are twice the bytes of the bf16 ones
    the configs are tuned for: halve them and drop pipelining so they fit in shared memory."""
    if not q.is_cuda:
        return interpret
    if q.element_size() <= 2:
        return gpu
    cfg = dict(gpu, num_stages=1)
    for key in ("BLOCK_M", "BLOCK_N"):
        if key in cfg:
            cfg[key] = max(16, cfg[key] // 2)
    return cfg


def _precision(q: torch.Tensor) -> str:
    # fp32 inputs (and the interpreter's upcast tiles) get true fp32 dots; half types use the tensor cores anyway
    return "ieee" if q.dtype == torch.float32 or not q.is_cuda else "tf32"


def _check_last_dim(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.stride(-1) != 1:
            raise ValueError(f"attention kernels need a contiguous last dim, got strides {t.stride()}; "
                             "call .contiguous() first")


def _check_heads(q: torch.Tensor, k_cache: torch.Tensor) -> None:
    if q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"Hq={q.shape[1]} is not a multiple of Hkv={k_cache.shape[2]}")


_QUANT_CODE = {torch.float8_e4m3fn: 1, torch.int8: 2, torch.uint8: 3}  # the kernels' QUANT constexpr


def _kv_quant(k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor | None,
              v_scale: torch.Tensor | None, head_dim: int, q: torch.Tensor | None = None,
              ) -> tuple[int, torch.Tensor, torch.Tensor, int, int]:
    """(QUANT, k scale, v scale, scale page stride, scale slot stride) for the kernels, after checking the pages'
    format. Unquantized pages get the caches themselves as never-read scale pointers; q, when given, must then
    have the pages' dtype."""
    if k_cache.dtype != v_cache.dtype:
        raise TypeError(f"k_cache and v_cache dtypes differ ({k_cache.dtype}, {v_cache.dtype})")
    if k_cache.dtype not in _QUANT_CODE:
        if q is not None and q.dtype != k_cache.dtype:
            raise TypeError(f"q is {q.dtype} but the KV pages are {k_cache.dtype}: pages hold q's dtype, or are "
                            "quantized (float8_e4m3fn, int8, uint8 = int4) with k_scale and v_scale")
        return 0, k_cache, v_cache, 0, 0
    if k_scale is None or v_scale is None:
        raise ValueError(f"{k_cache.dtype} KV pages need k_scale and v_scale ([P, page_size, Hkv] fp32)")
    want = tuple(k_cache.shape[:3])
    for name, sc in (("k_scale", k_scale), ("v_scale", v_scale)):
        if sc.dtype != torch.float32 or tuple(sc.shape) != want or sc.stride() != k_scale.stride() or \
                sc.stride(-1) != 1:
            raise ValueError(f"{name} must be fp32 {list(want)} with unit stride in heads (and the same strides "
                             f"for k_scale and v_scale), got {sc.dtype} {list(sc.shape)} strides {sc.stride()}")
    if k_cache.shape[-1] != kv_stored_dim(k_cache.dtype, head_dim):
        raise ValueError(f"{k_cache.dtype} pages of head_dim {head_dim} have a last dim of "
                         f"{kv_stored_dim(k_cache.dtype, head_dim)}, got {k_cache.shape[-1]}")
    return _QUANT_CODE[k_cache.dtype], k_scale, v_scale, k_scale.stride(0), k_scale.stride(1)


__all__ = ["DECODE_CONFIG", "PREFILL_CONFIG", "decode_into", "decode_num_splits", "paged_attention_decode",
           "paged_attention_prefill", "prefill_into", "qk_norm_rope_write_kv", "write_kv"]
