"""Triton paged attention (same keyword-only signatures as ref.py): KV write and the fused q/k norm + RoPE + KV write
here, split-KV decode in triton_decode.py, varlen causal prefill in triton_prefill.py (re-exported here, the
dispatch target), shared helpers in _triton_common.py.

Layouts (per layer): k_cache, v_cache: [P, page_size, Hkv, D], last dim contiguous; block_tables: [N, max_pages]
int32. Tokens are located per row of a tile (page = block_tables[n, pos // page_size]), so any power-of-two page
size works and a tile may straddle pages. Softmax runs in fp32 in the log2 domain (scores * scale * log2 e, exp2).

Decode also serves verify steps (tokens_per_row = 1 + K queries at the end of every row, causal): the GQA group's
queries of all those tokens are the rows of one tile, so each KV page is still read once per (row, KV head, split).

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

from deltaserve.kernels._device import pdl_launch
from deltaserve.kernels._pdl import wait_then_release
from deltaserve.kernels.attention._triton_common import _check_last_dim, _kv_quant
from deltaserve.kernels.attention.ref import KV_QMAX
from deltaserve.kernels.attention.triton_decode import (DECODE_CONFIG, MULTI_TOKEN_DECODE_CONFIG, QUANT_DECODE_CONFIG,
                                                        decode_into, decode_num_splits, paged_attention_decode)
from deltaserve.kernels.attention.triton_prefill import PREFILL_CONFIG, paged_attention_prefill, prefill_into
from deltaserve.kernels.rope.triton import inv_freq, rope_cos_sin, rope_outputs


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
    inv = tl.div_rn(qmax, amax)
    inv = tl.where(inv == float("inf"), 0.0, inv)  # amax 0 or below ~1e-36: zeros, as ref.quantize_kv
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
    PDL: tl.constexpr = False,
):
    t = tl.program_id(0).to(tl.int64)
    wait_then_release(PDL)  # q, k, v: the projection's output; positions, slots, pages: step data
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
        QUANT=quant, QMAX=KV_QMAX.get(k_cache.dtype, 0.0), num_warps=4, **pdl_launch(q.device),
    )
    return q_out, k_out


__all__ = ["DECODE_CONFIG", "MULTI_TOKEN_DECODE_CONFIG", "QUANT_DECODE_CONFIG", "PREFILL_CONFIG", "decode_into",
           "decode_num_splits", "paged_attention_decode", "paged_attention_prefill", "prefill_into",
           "qk_norm_rope_write_kv", "write_kv"]
