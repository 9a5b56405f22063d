"""Reference paged attention for the full-attention layers. Per layer, k_cache, v_cache: [P, page_size, Hkv, D];
a token's KV slot index is page * page_size + offset, and block_tables[n] lists sequence n's pages in order.

Quantized pages (docs/KERNELS.md, "Quantized KV cache"): the page dtype names the format, and k_scale, v_scale
([P, page_size, Hkv] fp32) hold one symmetric scale per token and KV head, computed when the KV is written:
    float8_e4m3fn  fp8 e4m3                      QMAX 448
    int8           int8                          QMAX 127
    uint8          int4, two per byte ([..., D/2]): element 2j in the low nibble, 2j+1 in the high one, each
                   stored as q + 8                QMAX 7
scale = amax / QMAX (amax: the largest |x| of the head vector); q = x * (QMAX / amax) (0 when amax is 0), then
rounded: to fp8 by the cast (nearest even), to integers half away from zero; x is read back as q * scale. The
kernels apply the K scale to the scores after q.k and the V scale to the probabilities before p.v; the references
dequantize the pages first (the same values, in another order of fp32 operations)."""

from __future__ import annotations

import torch

from deltaserve.kernels.norm.ref import rms_norm
from deltaserve.kernels.rope.ref import apply_partial_rope

KV_QMAX: dict[torch.dtype, float] = {torch.float8_e4m3fn: 448.0, torch.int8: 127.0, torch.uint8: 7.0}


def is_quantized_kv(dtype: torch.dtype) -> bool:
    return dtype in KV_QMAX


def kv_stored_dim(dtype: torch.dtype, head_dim: int) -> int:
    """Elements of a page's last dim for head vectors of head_dim values (int4 packs two per byte)."""
    if dtype == torch.uint8:
        if head_dim % 2:
            raise ValueError(f"int4 KV pages pack two values per byte and need an even head_dim, got {head_dim}")
        return head_dim // 2
    return head_dim


def quantize_kv(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [..., D] -> (q [..., kv_stored_dim(dtype, D)] in dtype, scale [...] fp32), per the module docstring."""
    qmax = KV_QMAX[dtype]
    x32 = x.float()
    amax = x32.abs().amax(-1)
    qmax_t = torch.full_like(amax, qmax)
    # correctly rounded divisions, as the kernels' div_rn: tensor by tensor, because CUDA torch divides by a Python
    # scalar as a multiply by its rounded reciprocal (1 ulp off). An all-zero vector stores zeros and scale 0, and so
    # does one too small for qmax / amax to be finite (amax below ~1e-36): else its zeros became 0 x inf = NaN
    scale = amax / qmax_t
    inv = qmax_t / amax
    inv = torch.where(inv == torch.inf, 0.0, inv)  # (a NaN amax stays NaN: a NaN input is not hidden)
    y = (x32 * inv[..., None]).clamp(-qmax, qmax)
    if dtype == torch.float8_e4m3fn:
        return y.to(dtype), scale
    r = torch.where(y >= 0, torch.floor(y + 0.5), -torch.floor(0.5 - y))  # half away from zero, as the kernels
    if dtype == torch.int8:
        return r.to(torch.int8), scale
    nib = (r + 8).to(torch.uint8)
    return nib[..., 0::2] | (nib[..., 1::2] << 4), scale


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The inverse of quantize_kv: [..., stored] pages and [...] scales -> [..., D] fp32."""
    if q.dtype == torch.uint8:
        b = q.to(torch.int16)
        q = torch.stack([(b & 15) - 8, (b >> 4) - 8], dim=-1).flatten(-2)
    return q.float() * scale[..., None]


def _store(x: torch.Tensor, cache: torch.Tensor, scale: torch.Tensor | None, idx: torch.Tensor) -> None:
    """cache (and scale) rows idx = x, quantized when the pages are."""
    # views over the contiguous caches, so indexed assignment writes into the caches themselves
    flat = cache.view(-1, *cache.shape[2:])
    if not is_quantized_kv(cache.dtype):
        flat[idx] = x.to(cache.dtype)
        return
    if scale is None:
        raise ValueError(f"{cache.dtype} KV pages need their scale tensors (k_scale, v_scale)")
    flat[idx], scale.view(-1, scale.shape[-1])[idx] = quantize_kv(x, cache.dtype)


def write_kv(
    *, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> None:
    """k, v: [T, Hkv, D]; k_cache, v_cache: [P, page_size, Hkv, D] (or quantized pages with k_scale, v_scale
    [P, page_size, Hkv] fp32: see the module docstring); slot_mapping: [T] int64 (< 0: skip).

    Writes in place: cache.flatten(0, 1)[slot_mapping[t]] = k[t] / v[t] (quantized, with its scales).
    """
    valid = (slot_mapping >= 0).nonzero().squeeze(1)
    idx = slot_mapping[valid]
    _store(k[valid], k_cache, k_scale, idx)
    _store(v[valid], v_cache, v_scale, idx)


def _gather(cache: torch.Tensor, block_table: torch.Tensor, length: int,
            scale: torch.Tensor | None = None) -> torch.Tensor:
    """The first `length` tokens of one sequence, contiguous: [length, Hkv, D] (dequantized to fp32 when scales are
    given). Reads only the pages it needs, so unused block-table entries may hold anything."""
    pages = block_table[: -(-length // cache.shape[1])].long()
    x = cache[pages].flatten(0, 1)[:length]
    return x if scale is None else dequantize_kv(x, scale[pages].flatten(0, 1)[:length])


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first_pos: int, scale: float) -> torch.Tensor:
    """q: [Lq, Hq, D] at positions first_pos.., k, v: [Lk, Hkv, D] at positions 0..; causal, GQA (q head h reads
    kv head h // (Hq // Hkv)), fp32 softmax. Returns [Lq, Hq, D] fp32."""
    group = q.shape[1] // k.shape[1]
    k32 = k.float().repeat_interleave(group, dim=1)
    v32 = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k32) * scale
    q_pos = torch.arange(q.shape[0], device=q.device) + first_pos
    future = torch.arange(k.shape[0], device=q.device)[None, :] > q_pos[:, None]
    probs = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v32)


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

    q: [T, Hq, D]; k_cache, v_cache: [P, page_size, Hkv, D] (quantized pages: with k_scale, v_scale, see the module
    docstring); cu_seqlens_q: [N+1] int32; seq_lens: [N] int32 (KV length including the new tokens); block_tables:
    [N, max_pages] int32. Query i of sequence n sits at position seq_lens[n] - qlen_n + i (seq_lens[n] = 0: a
    padding row, output zeros). Returns o: [T, Hq, D] in q.dtype (rows of sequences with no new tokens absent).
    """
    o = torch.zeros_like(q)
    bounds = cu_seqlens_q.tolist()
    for n, length in enumerate(seq_lens.tolist()):
        lo, hi = bounds[n], bounds[n + 1]
        if hi == lo or length == 0:  # no new tokens, or a padding row (CUDA graph buffers): output zeros
            continue
        if length < hi - lo:
            raise ValueError(f"seq_lens[{n}]={length} is shorter than its {hi - lo} new tokens; it must count them")
        k = _gather(k_cache, block_tables[n], length, k_scale)
        v = _gather(v_cache, block_tables[n], length, v_scale)
        o[lo:hi] = _attend(q[lo:hi], k, v, length - (hi - lo), scale).to(q.dtype)
    return o


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
    tokens_per_row: int = 1,
) -> torch.Tensor:
    """The last tokens_per_row (T) positions of every sequence as queries: query t of sequence n at position
    seq_lens[n] - T + t, causal. T = 1: one query per sequence at its last position seq_lens[n] - 1 (a decode
    step); T = 1 + K: a verify step, the same as paged_attention_prefill with cu_seqlens_q = [0, T, 2T, ..].

    q: [N * T, Hq, D] (sequence n's queries in rows n * T ..); k_cache, v_cache: [P, page_size, Hkv, D]
    (quantized: with k_scale, v_scale); seq_lens: [N] int32 (0: padding row, output zeros); block_tables:
    [N, max_pages] int32. Returns o: [N * T, Hq, D] in q.dtype.
    """
    T = tokens_per_row
    if T < 1 or q.shape[0] != seq_lens.shape[0] * T:
        raise ValueError(f"q has {q.shape[0]} rows, expected len(seq_lens) * tokens_per_row = "
                         f"{seq_lens.shape[0]} * {T}")
    o = torch.zeros_like(q)
    for n, length in enumerate(seq_lens.tolist()):
        if length == 0:
            continue
        if length < T:
            raise ValueError(f"seq_lens[{n}]={length} is shorter than its {T} query tokens; it must count them")
        k = _gather(k_cache, block_tables[n], length, k_scale)
        v = _gather(v_cache, block_tables[n], length, v_scale)
        o[n * T : (n + 1) * T] = _attend(q[n * T : (n + 1) * T], k, v, length - T, scale).to(q.dtype)
    return o


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
    skip). Returns (q_out, k_out) in the input dtypes; the pages receive k_out (quantized from k_out's values). This
    reference rounds to the input dtype between the norm and the rotation (as the unfused layer does); a fused
    kernel may keep fp32 there.
    """
    q = rms_norm(x=q, weight=q_weight, eps=eps)
    k = rms_norm(x=k, weight=k_weight, eps=eps)
    q, k = apply_partial_rope(q=q, k=k, positions=positions, rotary_dim=rotary_dim, theta=theta)
    write_kv(k=k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping, k_scale=k_scale,
             v_scale=v_scale)
    return q, k
