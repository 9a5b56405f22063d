"""Paged attention against dense causal attention (float64) over each sequence's contiguous K/V, with pages assigned
at random so that block tables are shuffled and unused pages / table entries hold NaN / garbage."""

from __future__ import annotations

import pytest
import torch
from tests.tolerances import assert_close

from deltaserve.kernels.attention import paged_attention_decode, paged_attention_prefill, write_kv

D, PAGE = 16, 4
NUM_PAGES = 64


def dense_truth(q, k, v, first_pos, scale):
    """q: [Lq, Hq, D] at positions first_pos.., k, v: [Lk, Hkv, D] -> [Lq, Hq, D] float64, explicit loops."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    o = torch.zeros(q.shape, dtype=torch.float64)
    for i in range(q.shape[0]):
        visible = first_pos + i + 1
        for h in range(q.shape[1]):
            scores = (k[:visible, h // group] @ q[i, h]) * scale
            o[i, h] = torch.softmax(scores, 0) @ v[:visible, h // group]
    return o


def paged_setup(lengths, num_kv_heads, dtype, gen):
    """Dense per-sequence K/V scattered into randomly chosen pages. Returns caches, block tables, dense K/V."""
    k_cache = torch.full((NUM_PAGES, PAGE, num_kv_heads, D), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    max_pages = max(-(-n // PAGE) for n in lengths) + 2
    block_tables = torch.full((len(lengths), max_pages), -1, dtype=torch.int32)  # unused entries: -1
    free = torch.randperm(NUM_PAGES, generator=gen).tolist()
    dense = []
    for n, length in enumerate(lengths):
        k = torch.randn(length, num_kv_heads, D, generator=gen).to(dtype)
        v = torch.randn(length, num_kv_heads, D, generator=gen).to(dtype)
        pages = [free.pop() for _ in range(-(-length // PAGE))]
        block_tables[n, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
        for t in range(length):
            k_cache[pages[t // PAGE], t % PAGE] = k[t]
            v_cache[pages[t // PAGE], t % PAGE] = v[t]
        dense.append((k, v))
    return k_cache, v_cache, block_tables, dense


def test_write_kv_skips_negative_slots():
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(6, 2, D, generator=gen)
    v = torch.randn(6, 2, D, generator=gen)
    k_cache = torch.full((8, PAGE, 2, D), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    slot_mapping = torch.tensor([13, -1, 0, 31, -1, 5])
    write_kv(k=k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
    flat_k, flat_v = k_cache.view(-1, 2, D), v_cache.view(-1, 2, D)
    for t, s in enumerate(slot_mapping.tolist()):
        if s >= 0:
            assert torch.equal(flat_k[s], k[t]) and torch.equal(flat_v[s], v[t])
    untouched = sorted(set(range(8 * PAGE)) - {13, 0, 31, 5})
    assert flat_k[untouched].isnan().all() and flat_v[untouched].isnan().all()


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 2), (4, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill(heads, dtype):
    num_q_heads, num_kv_heads = heads
    gen = torch.Generator().manual_seed(num_q_heads * 10 + num_kv_heads)
    # (cached tokens, new tokens): fresh prompts, chunked-prefill continuations, a 1-token continuation, odd sizes
    shapes = [(0, 5), (10, 1), (3, 65), (17, 17), (0, 1), (64, 63)]
    lengths = [c + n for c, n in shapes]
    k_cache, v_cache, block_tables, dense = paged_setup(lengths, num_kv_heads, dtype, gen)
    new = [n for _, n in shapes]
    q = torch.randn(sum(new), num_q_heads, D, generator=gen).to(dtype)
    cu = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
    scale = D**-0.5
    o = paged_attention_prefill(
        q=q, k_cache=k_cache, v_cache=v_cache, cu_seqlens_q=cu,
        seq_lens=torch.tensor(lengths, dtype=torch.int32), block_tables=block_tables, scale=scale,
    )
    assert o.dtype == dtype and o.shape == q.shape
    for n, (cached, _) in enumerate(shapes):
        k, v = dense[n]
        assert_close(o[cu[n] : cu[n + 1]], dense_truth(q[cu[n] : cu[n + 1]], k, v, cached, scale))


@pytest.mark.parametrize("heads", [(4, 4), (6, 2)])
def test_decode(heads):
    num_q_heads, num_kv_heads = heads
    gen = torch.Generator().manual_seed(1)
    lengths = [1, 9, 0, 64, 130]  # 0: a padding row
    k_cache, v_cache, block_tables, dense = paged_setup([max(n, 1) for n in lengths], num_kv_heads,
                                                        torch.float32, gen)
    q = torch.randn(len(lengths), num_q_heads, D, generator=gen)
    scale = D**-0.5
    o = paged_attention_decode(
        q=q, k_cache=k_cache, v_cache=v_cache, seq_lens=torch.tensor(lengths, dtype=torch.int32),
        block_tables=block_tables, scale=scale,
    )
    for n, length in enumerate(lengths):
        if length == 0:
            assert (o[n] == 0).all()
            continue
        k, v = dense[n]
        assert_close(o[n : n + 1], dense_truth(q[n : n + 1], k, v, length - 1, scale))


def test_decode_equals_prefill_last_row():
    """Writing through write_kv then decoding == the last row of a prefill over the same tokens."""
    gen = torch.Generator().manual_seed(2)
    num_kv_heads, length = 2, 23
    k = torch.randn(length, num_kv_heads, D, generator=gen)
    v = torch.randn(length, num_kv_heads, D, generator=gen)
    q = torch.randn(length, 4, D, generator=gen)
    pages = torch.randperm(NUM_PAGES, generator=gen)[: -(-length // PAGE)]
    block_tables = pages.to(torch.int32)[None]
    slot_mapping = pages[torch.arange(length) // PAGE] * PAGE + torch.arange(length) % PAGE
    k_cache = torch.full((NUM_PAGES, PAGE, num_kv_heads, D), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    write_kv(k=k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
    seq_lens = torch.tensor([length], dtype=torch.int32)
    o_pre = paged_attention_prefill(
        q=q, k_cache=k_cache, v_cache=v_cache, cu_seqlens_q=torch.tensor([0, length], dtype=torch.int32),
        seq_lens=seq_lens, block_tables=block_tables, scale=0.3,
    )
    o_dec = paged_attention_decode(
        q=q[-1:], k_cache=k_cache, v_cache=v_cache, seq_lens=seq_lens, block_tables=block_tables, scale=0.3
    )
    assert_close(o_dec, o_pre[-1:].double())
    assert_close(o_pre, dense_truth(q, k, v, 0, 0.3))


@pytest.mark.parametrize("tokens", [2, 4])
def test_decode_multi_token_rows(tokens):
    """tokens_per_row T: the last T positions of each row as causal queries (a verify step), padding rows zeros."""
    gen = torch.Generator().manual_seed(3)
    lengths = [tokens, 0, 9, 64]
    k_cache, v_cache, block_tables, dense = paged_setup([max(n, 1) for n in lengths], 2, torch.float32, gen)
    q = torch.randn(len(lengths) * tokens, 6, D, generator=gen)
    o = paged_attention_decode(q=q, k_cache=k_cache, v_cache=v_cache, seq_lens=torch.tensor(lengths, dtype=torch.int32),
                               block_tables=block_tables, scale=0.3, tokens_per_row=tokens)
    for n, length in enumerate(lengths):
        rows = slice(n * tokens, (n + 1) * tokens)
        if length == 0:
            assert (o[rows] == 0).all()
            continue
        assert_close(o[rows], dense_truth(q[rows], *dense[n], length - tokens, 0.3))
    with pytest.raises(ValueError, match="shorter than its"):
        paged_attention_decode(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, scale=0.3,
                               seq_lens=torch.tensor([tokens - 1, 0, 9, 64], dtype=torch.int32),
                               tokens_per_row=tokens)


@pytest.mark.parametrize("switch", ["decode", "prefill"])
def test_layer_routes_verify_rows(switch, monkeypatch):
    """The attention layer's kernel choice: decode for 1 token per row, the decode kernel with tokens_per_row for
    uniform k-token rows while VERIFY_ATTENTION is "decode" and the tile fits, else the prefill kernel."""
    from types import SimpleNamespace

    from deltaserve.layers import attention as layer

    calls = []
    monkeypatch.setattr(layer, "VERIFY_ATTENTION", switch)
    monkeypatch.setattr(layer, "paged_attention_decode",
                        lambda **kw: calls.append(("decode", kw.get("tokens_per_row"))))
    monkeypatch.setattr(layer, "paged_attention_prefill", lambda **kw: calls.append(("prefill", None)))
    attn = SimpleNamespace(num_heads=24, num_kv_heads=4, scale=1.0)
    kv = SimpleNamespace(k=None, v=None, k_scale=None, v_scale=None)
    for k in (1, 4, 11, None):
        batch = SimpleNamespace(tokens_per_row=k, seq_lens=None, block_tables=None, cu_seqlens=None)
        layer.GatedAttention._attend(attn, None, batch, kv)
    verify = ("decode", 4) if switch == "decode" else ("prefill", None)
    # 11 tokens x 6 q heads per KV head = 66 tile rows > MAX_VERIFY_TILE_ROWS: the prefill kernel
    assert calls == [("decode", None), verify, ("prefill", None), ("prefill", None)]
