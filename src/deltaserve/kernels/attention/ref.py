"""Reference paged attention for the full-attention layers. Per layer, k_cache, v_cache: [P, page_size, Hkv, D];
a token's KV slot index is page * page_size + offset, and block_tables[n] lists sequence n's pages in order."""

from __future__ import annotations

import torch

from deltaserve.kernels.norm.ref import rms_norm
from deltaserve.kernels.rope.ref import apply_partial_rope


def write_kv(
    *, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """k, v: [T, Hkv, D]; k_cache, v_cache: [P, page_size, Hkv, D]; slot_mapping: [T] int64 (< 0: skip).

    Writes in place: cache.flatten(0, 1)[slot_mapping[t]] = k[t] / v[t].
    """
    valid = (slot_mapping >= 0).nonzero().squeeze(1)
    idx = slot_mapping[valid]
    # views over the contiguous caches, so indexed assignment writes into the caches themselves
    k_cache.view(-1, *k_cache.shape[2:])[idx] = k[valid].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[idx] = v[valid].to(v_cache.dtype)


def _gather(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens of one sequence, contiguous: [length, Hkv, D]. Reads only the pages it needs, so
    unused block-table entries may hold anything."""
    num_pages = -(-length // cache.shape[1])
    return cache[block_table[:num_pages].long()].flatten(0, 1)[:length]


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
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its whole paged KV (new tokens already written).

    q: [T, Hq, D]; k_cache, v_cache: [P, page_size, Hkv, D]; cu_seqlens_q: [N+1] int32; seq_lens: [N] int32 (KV
    length including the new tokens); block_tables: [N, max_pages] int32. Query i of sequence n sits at position
    seq_lens[n] - qlen_n + i. Returns o: [T, Hq, D] in q.dtype (rows of sequences with no new tokens absent).
    """
    o = torch.zeros_like(q)
    bounds = cu_seqlens_q.tolist()
    for n, length in enumerate(seq_lens.tolist()):
        lo, hi = bounds[n], bounds[n + 1]
        if hi == lo:
            continue
        if length < hi - lo:
            raise ValueError(f"seq_lens[{n}]={length} is shorter than its {hi - lo} new tokens; it must count them")
        k = _gather(k_cache, block_tables[n], length)
        v = _gather(v_cache, block_tables[n], length)
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
) -> torch.Tensor:
    """One query per sequence at its last position seq_lens[n] - 1.

    q: [N, Hq, D]; k_cache, v_cache: [P, page_size, Hkv, D]; seq_lens: [N] int32 (0: padding row, output zeros);
    block_tables: [N, max_pages] int32. Returns o: [N, Hq, D] in q.dtype.
    """
    o = torch.zeros_like(q)
    for n, length in enumerate(seq_lens.tolist()):
        if length == 0:
            continue
        k = _gather(k_cache, block_tables[n], length)
        v = _gather(v_cache, block_tables[n], length)
        o[n : n + 1] = _attend(q[n : n + 1], k, v, length - 1, scale).to(q.dtype)
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention layer's pre-attention chain in one op: per-head zero-centred RMSNorm of q and k, partial RoPE,
    then k and v written to their pages.

    q: [T, Hq, D]; k, v: [T, Hkv, D]; q_weight, k_weight: [D] (applied as 1 + w); positions: [T] int64;
    k_cache, v_cache: [P, page_size, Hkv, D]; slot_mapping: [T] int64 (< 0: skip). Returns (q_out, k_out) in the
    input dtypes. This reference rounds to the input dtype between the norm and the rotation (as the unfused layer
    does); a fused kernel may keep fp32 there.
    """
    q = rms_norm(x=q, weight=q_weight, eps=eps)
    k = rms_norm(x=k, weight=k_weight, eps=eps)
    q, k = apply_partial_rope(q=q, k=k, positions=positions, rotary_dim=rotary_dim, theta=theta)
    write_kv(k=k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
    return q, k
