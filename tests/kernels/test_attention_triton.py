"""Triton paged attention, KV write and the fused q/k-norm + RoPE + KV write against the references and float64 truth.

Without a GPU the kernels run under TRITON_INTERPRET=1 on tiny shapes (CI); `pytest -m gpu` runs them compiled at
the real shapes (head_dim 256, Qwen3.5-27B 24/4 and 35B-A3B 16/2 heads). Every output buffer is NaN-poisoned before
the kernel runs, block tables are shuffled, and unused pages and table entries hold NaN / -1.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' import (read at @triton.jit time)

triton = pytest.importorskip("triton")

from tolerances import assert_close, assert_error_within  # noqa: E402

from deltaserve.kernels.attention import ref  # noqa: E402
from deltaserve.kernels.attention import triton as tk  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
GPU = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True, scope="module")
def _interpreter_like_the_gpu(interpreter_rounds_like_the_gpu):
    """bf16 results compare as they would on the device (see conftest)."""
    yield


def dense_truth(q, k, v, first_pos, scale):
    """q: [Lq, Hq, D] at positions first_pos.., k, v: [Lk, Hkv, D] -> [Lq, Hq, D] float64 (causal, GQA)."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    pos = torch.arange(q.shape[0], device=q.device) + first_pos
    scores = scores.masked_fill(torch.arange(k.shape[0], device=q.device)[None, :] > pos[:, None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def plain_torch(q, k, v, first_pos, scale):
    """The same attention as a plain torch run in q.dtype (matmuls, softmax and output rounded to it): the baseline
    error the numerics policy allows twice of."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    pos = torch.arange(q.shape[0], device=q.device) + first_pos
    scores = scores.masked_fill(torch.arange(k.shape[0], device=q.device)[None, :] > pos[:, None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


class Paged:
    """Per-sequence dense K/V scattered into shuffled pages of NaN-filled caches; unused table entries are -1."""

    def __init__(self, lengths, num_kv_heads, head_dim, page_size, dtype, device, gen, spare_pages=3):
        pages_needed = [-(-n // page_size) for n in lengths]
        num_pages = sum(pages_needed) + spare_pages
        self.k_cache = torch.full((num_pages, page_size, num_kv_heads, head_dim), float("nan"), dtype=dtype,
                                  device=device)
        self.v_cache = torch.full_like(self.k_cache, float("nan"))
        width = max(pages_needed, default=0) + 2
        self.block_tables = torch.full((len(lengths), width), -1, dtype=torch.int32)
        free = torch.randperm(num_pages, generator=gen).tolist()
        self.dense = []
        for n, length in enumerate(lengths):
            k = torch.randn(length, num_kv_heads, head_dim, generator=gen).to(dtype).to(device)
            v = torch.randn(length, num_kv_heads, head_dim, generator=gen).to(dtype).to(device)
            pages = torch.tensor([free.pop() for _ in range(pages_needed[n])], dtype=torch.long)
            self.block_tables[n, : len(pages)] = pages.to(torch.int32)
            pos = torch.arange(length)
            slots = (pages[pos // page_size] * page_size + pos % page_size).to(device)
            self.k_cache.view(-1, num_kv_heads, head_dim)[slots] = k
            self.v_cache.view(-1, num_kv_heads, head_dim)[slots] = v
            self.dense.append((k, v))
        self.block_tables = self.block_tables.to(device)
        self.seq_lens = torch.tensor(lengths, dtype=torch.int32, device=device)


# ------------------------------------------------------------------------------------------------ shared test bodies


def check_write_kv(num_tokens, num_kv_heads, head_dim, page_size, dtype, device, gen):
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype).to(device)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype).to(device)
    num_pages = -(-num_tokens // page_size) + 2
    slots = torch.randperm(num_pages * page_size, generator=gen)[:num_tokens]
    slots[torch.randperm(num_tokens, generator=gen)[: num_tokens // 3]] = -1  # skipped (padding) tokens
    slots = slots.to(device)
    caches = [torch.full((num_pages, page_size, num_kv_heads, head_dim), float("nan"), dtype=dtype, device=device)
              for _ in range(4)]
    tk.write_kv(k=k, v=v, k_cache=caches[0], v_cache=caches[1], slot_mapping=slots)
    ref.write_kv(k=k, v=v, k_cache=caches[2], v_cache=caches[3], slot_mapping=slots)
    assert torch.equal(caches[0].isnan(), caches[2].isnan()) and torch.equal(caches[1].isnan(), caches[3].isnan())
    assert torch.equal(caches[0].nan_to_num(), caches[2].nan_to_num())
    assert torch.equal(caches[1].nan_to_num(), caches[3].nan_to_num())


def check_decode(lengths, heads, head_dim, page_size, dtype, device, gen, num_splits=None):
    num_q_heads, num_kv_heads = heads
    paged = Paged([max(n, 1) for n in lengths], num_kv_heads, head_dim, page_size, dtype, device, gen)
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device=device)  # 0: a padding row
    q = torch.randn(len(lengths), num_q_heads, head_dim, generator=gen).to(dtype).to(device)
    scale = head_dim**-0.5
    out = torch.full_like(q, float("nan"))
    tk.decode_into(q=q, k_cache=paged.k_cache, v_cache=paged.v_cache, seq_lens=seq_lens,
                   block_tables=paged.block_tables, scale=scale, out=out, num_splits=num_splits)
    for n, length in enumerate(lengths):
        if length == 0:
            assert (out[n] == 0).all(), "a padding row must be zeros"
            continue
        k, v = paged.dense[n]
        truth = dense_truth(q[n : n + 1], k, v, length - 1, scale)
        if dtype == torch.float32:
            assert_close(out[n : n + 1], truth)
        else:
            assert_error_within(out[n : n + 1], plain_torch(q[n : n + 1], k, v, length - 1, scale), truth)


def check_prefill(shapes, heads, head_dim, page_size, dtype, device, gen):
    """shapes: (cached tokens, new tokens) per sequence; new tokens 0 is a sequence with nothing to compute."""
    num_q_heads, num_kv_heads = heads
    lengths = [c + n for c, n in shapes]
    paged = Paged(lengths, num_kv_heads, head_dim, page_size, dtype, device, gen)
    new = [n for _, n in shapes]
    cu = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32, device=device)
    q = torch.randn(sum(new), num_q_heads, head_dim, generator=gen).to(dtype).to(device)
    scale = head_dim**-0.5
    out = torch.full_like(q, float("nan"))
    tk.prefill_into(q=q, k_cache=paged.k_cache, v_cache=paged.v_cache, cu_seqlens_q=cu, seq_lens=paged.seq_lens,
                    block_tables=paged.block_tables, scale=scale, out=out)
    for n, (cached, _) in enumerate(shapes):
        lo, hi = cu[n].item(), cu[n + 1].item()
        if lo == hi:
            continue
        k, v = paged.dense[n]
        truth = dense_truth(q[lo:hi], k, v, cached, scale)
        if dtype == torch.float32:
            assert_close(out[lo:hi], truth)
        else:
            assert_error_within(out[lo:hi], plain_torch(q[lo:hi], k, v, cached, scale), truth)


def check_fused_qk_norm_rope(num_tokens, heads, head_dim, rotary_dim, page_size, dtype, device, gen,
                             strided_q=False):
    """strided_q: q is the first half of each head's [query | gate] row, as the attention layer passes it."""
    num_q_heads, num_kv_heads = heads
    q = (torch.randn(num_tokens, num_q_heads, (1 + strided_q) * head_dim, generator=gen) * 3)
    q = q.to(dtype).to(device)[..., :head_dim]
    k = (torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen) * 3).to(dtype).to(device)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype).to(device)
    q_w = (torch.randn(head_dim, generator=gen) * 0.1).to(dtype).to(device)
    k_w = (torch.randn(head_dim, generator=gen) * 0.1).to(dtype).to(device)
    positions = torch.randint(0, 40_000, (num_tokens,), generator=gen).to(device)
    num_pages = -(-num_tokens // page_size) + 1
    slots = torch.randperm(num_pages * page_size, generator=gen)[:num_tokens]
    slots[0] = -1
    slots = slots.to(device)
    args = dict(eps=1e-6, positions=positions, rotary_dim=rotary_dim, theta=1e7, slot_mapping=slots)
    caches = [torch.full((num_pages, page_size, num_kv_heads, head_dim), float("nan"), dtype=dtype, device=device)
              for _ in range(4)]
    q_out, k_out = tk.qk_norm_rope_write_kv(q=q, k=k, v=v, q_weight=q_w, k_weight=k_w, k_cache=caches[0],
                                            v_cache=caches[1], **args)
    q_ref, k_ref = ref.qk_norm_rope_write_kv(q=q, k=k, v=v, q_weight=q_w, k_weight=k_w, k_cache=caches[2],
                                             v_cache=caches[3], **args)
    # truth: the same chain in float64 with no rounding in between
    q64, k64 = ref.qk_norm_rope_write_kv(q=q.double(), k=k.double(), v=v.double(), q_weight=q_w.double(),
                                         k_weight=k_w.double(), k_cache=caches[2].double(),
                                         v_cache=caches[3].double(), **args)
    assert_error_within(q_out, q_ref, q64)
    assert_error_within(k_out, k_ref, k64)
    valid = slots >= 0
    flat = caches[0].view(-1, num_kv_heads, head_dim)
    assert torch.equal(flat[slots[valid]], k_out[valid])
    assert torch.equal(caches[1].view(-1, num_kv_heads, head_dim)[slots[valid]], v[valid])
    assert flat.isnan().all(-1).all(-1).sum() == flat.shape[0] - valid.sum()  # nothing else written


# ------------------------------------------------------------------------------ interpreter tier (CPU, tiny shapes)

D, PAGE = 16, 4


def test_write_kv_interpreted():
    gen = torch.Generator().manual_seed(0)
    check_write_kv(9, 2, D, PAGE, torch.float32, "cpu", gen)
    check_write_kv(5, 3, 24, PAGE, torch.bfloat16, "cpu", gen)  # odd head count and head_dim: masked tiles


def test_decode_interpreted():
    # padding row, one token, a split landing mid-page, and more splits than a short sequence has tiles
    check_decode([1, 0, 23, 40], (4, 2), D, PAGE, torch.float32, "cpu", torch.Generator().manual_seed(1),
                 num_splits=3)


def test_decode_bf16_gqa3_interpreted():
    check_decode([37, 5], (6, 2), D, PAGE, torch.bfloat16, "cpu", torch.Generator().manual_seed(2))


def test_prefill_interpreted():
    # fresh prompt, 1-token continuation, chunked-prefill continuation spanning 2 query tiles, empty sequence
    check_prefill([(0, 5), (10, 1), (3, 20), (4, 0)], (4, 2), D, PAGE, torch.float32, "cpu",
                  torch.Generator().manual_seed(3))


def test_prefill_bf16_interpreted():
    check_prefill([(0, 17), (6, 3)], (2, 1), D, PAGE, torch.bfloat16, "cpu", torch.Generator().manual_seed(4))


def test_fused_qk_norm_rope_write_kv_interpreted():
    check_fused_qk_norm_rope(4, (3, 1), 32, 16, PAGE, torch.float32, "cpu", torch.Generator().manual_seed(5))


@pytest.mark.slow
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (8, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_odd_sizes_interpreted(heads, dtype):
    check_prefill([(0, 1), (64, 63), (0, 65), (17, 17)], heads, D, PAGE, dtype, "cpu",
                  torch.Generator().manual_seed(6))


@pytest.mark.slow
@pytest.mark.parametrize("num_splits", [1, 2, 4])
def test_decode_odd_sizes_interpreted(num_splits):
    check_decode([1, 63, 0, 65, 130], (8, 2), D, PAGE, torch.bfloat16, "cpu", torch.Generator().manual_seed(7),
                 num_splits=num_splits)


@pytest.mark.slow
def test_fused_qk_norm_rope_write_kv_bf16_interpreted():
    check_fused_qk_norm_rope(9, (4, 2), 48, 16, PAGE, torch.bfloat16, "cpu", torch.Generator().manual_seed(8))
    check_fused_qk_norm_rope(9, (4, 2), 48, 16, PAGE, torch.bfloat16, "cpu", torch.Generator().manual_seed(9),
                             strided_q=True)


# --------------------------------------------------------------------------------------- GPU tier (real shapes)

REAL_HEADS = [(24, 4), (16, 2)]  # Qwen3.5-27B, 35B-A3B


@GPU
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_write_kv_gpu(dtype):
    check_write_kv(65, 4, 256, 16, dtype, "cuda", torch.Generator().manual_seed(10))


@GPU
@needs_cuda
@pytest.mark.parametrize("heads", REAL_HEADS)
@pytest.mark.parametrize("page_size", [16, 256])
@pytest.mark.parametrize("num_splits", [None, 1, 7, 64])
def test_decode_gpu(heads, page_size, num_splits):
    check_decode([1, 0, 17, 1000, 4097, 63], heads, 256, page_size, torch.bfloat16, "cuda",
                 torch.Generator().manual_seed(11), num_splits=num_splits)


@GPU
@needs_cuda
def test_decode_fp32_gpu():
    check_decode([1, 65, 500], (24, 4), 256, 16, torch.float32, "cuda", torch.Generator().manual_seed(12))


@GPU
@needs_cuda
@pytest.mark.parametrize("heads", REAL_HEADS)
@pytest.mark.parametrize("page_size", [16, 256])
def test_prefill_gpu(heads, page_size):
    shapes = [(0, 1), (0, 65), (100, 63), (1000, 500), (0, 1500), (7, 0), (31, 1)]
    check_prefill(shapes, heads, 256, page_size, torch.bfloat16, "cuda", torch.Generator().manual_seed(13))


@GPU
@needs_cuda
def test_prefill_fp32_gpu():
    check_prefill([(0, 63), (70, 65)], (24, 4), 256, 16, torch.float32, "cuda", torch.Generator().manual_seed(14))


@GPU
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_qk_norm_rope_write_kv_gpu(dtype):
    check_fused_qk_norm_rope(65, (24, 4), 256, 64, 16, dtype, "cuda", torch.Generator().manual_seed(15))
    check_fused_qk_norm_rope(65, (24, 4), 256, 64, 16, dtype, "cuda", torch.Generator().manual_seed(16),
                             strided_q=True)


@GPU
@needs_cuda
def test_dispatch_selects_triton_on_cuda():
    from deltaserve.kernels import attention

    gen = torch.Generator().manual_seed(16)
    paged = Paged([5, 40], 4, 256, 16, torch.bfloat16, "cuda", gen)
    q = torch.randn(2, 24, 256, generator=gen).to(torch.bfloat16).cuda()
    args = dict(q=q, k_cache=paged.k_cache, v_cache=paged.v_cache, seq_lens=paged.seq_lens,
                block_tables=paged.block_tables, scale=256**-0.5)
    o = attention.paged_attention_decode(**args)
    o_ref = attention.paged_attention_decode.reference(**args)
    assert o.dtype == torch.bfloat16 and (o.float() - o_ref.float()).abs().max() < 2e-2


@GPU
@needs_cuda
def test_decode_cuda_graph_replay_with_new_seq_lens():
    """Captured once, replayed after copy_-ing new lengths into the static seq_lens buffer (more splits than tiles
    for some rows, a padding row): equals eager each time, so the grid never depended on seq_lens values."""
    gen = torch.Generator().manual_seed(17)
    paged = Paged([4000] * 4, 4, 256, 16, torch.bfloat16, "cuda", gen)  # pages for the longest length of each row
    q = torch.randn(4, 24, 256, generator=gen).to(torch.bfloat16).cuda()
    seq_lens = torch.tensor([300, 2000, 1, 4000], dtype=torch.int32, device="cuda")
    args = dict(q=q, k_cache=paged.k_cache, v_cache=paged.v_cache, seq_lens=seq_lens,
                block_tables=paged.block_tables, scale=256**-0.5)
    tk.paged_attention_decode(**args)  # warm up (compile) before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tk.paged_attention_decode(**args)
    for new in ([300, 2000, 1, 4000], [17, 0, 3999, 64], [0, 0, 0, 1]):
        seq_lens.copy_(torch.tensor(new, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        eager = tk.paged_attention_decode(**args)
        assert torch.equal(out, eager)
        for n, length in enumerate(new):
            if length == 0:
                assert (out[n] == 0).all()
            else:
                k, v = paged.dense[n]
                truth = dense_truth(q[n : n + 1], k[:length], v[:length], length - 1, 256**-0.5)
                base = plain_torch(q[n : n + 1], k[:length], v[:length], length - 1, 256**-0.5)
                assert_error_within(out[n : n + 1], base, truth)
