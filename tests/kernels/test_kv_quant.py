"""Quantized KV pages in the references: the quantize / dequantize round trip against the format written out
directly in float64 (docs/KERNELS.md, "Quantized KV cache"), and paged attention over quantized pages against dense
attention over the dequantized K/V."""

from __future__ import annotations

import pytest
import torch
from tests.tolerances import assert_close

from deltaserve.kernels.attention import ref

FORMATS = {"fp8": torch.float8_e4m3fn, "int8": torch.int8, "int4": torch.uint8}
QMAX = {"fp8": 448.0, "int8": 127.0, "int4": 7.0}


def sample(gen: torch.Generator, tokens: int = 9, heads: int = 3, dim: int = 24) -> torch.Tensor:
    """Head vectors with a wide range of magnitudes, one outlier per vector, and one all-zero vector."""
    x = torch.randn(tokens, heads, dim, generator=gen) * torch.logspace(-3, 2, tokens)[:, None, None]
    x[:, :, 5] *= 20
    x[2, 1] = 0
    return x


def direct(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The format written out in float64: (scale, stored values before packing, whether a value sits within 1e-4 of
    a rounding tie, where float32 and float64 arithmetic may round apart)."""
    x64 = x.double()
    amax = x64.abs().amax(-1, keepdim=True)
    scale = amax / QMAX[fmt]
    y = torch.where(amax > 0, x64 / torch.where(amax > 0, scale, 1.0), 0.0)
    if fmt == "fp8":
        return scale[..., 0], y.to(torch.float8_e4m3fn), torch.zeros_like(y, dtype=torch.bool)
    frac = y.abs() - y.abs().floor()
    q = torch.sign(y) * torch.floor(y.abs() + 0.5)  # half away from zero
    return scale[..., 0], q.clamp(-QMAX[fmt], QMAX[fmt]), (frac - 0.5).abs() < 1e-4


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_round_trip_matches_the_direct_formula(fmt):
    x = sample(torch.Generator().manual_seed(0))
    q, scale = ref.quantize_kv(x, FORMATS[fmt])
    scale64, expected, near_tie = direct(x, fmt)
    assert scale.dtype == torch.float32 and scale.shape == x.shape[:2]
    torch.testing.assert_close(scale.double(), scale64, rtol=2**-24, atol=0)  # fp32-rounded amax / QMAX
    if fmt == "fp8":
        assert q.dtype == torch.float8_e4m3fn and torch.equal(q.view(torch.uint8), expected.view(torch.uint8))
    else:
        values = q.float() if fmt == "int8" else unpack_int4(q)
        assert q.shape[-1] == (x.shape[-1] if fmt == "int8" else x.shape[-1] // 2)
        differ = values.double() != expected
        assert not (differ & ~near_tie).any(), "values away from a rounding tie must match exactly"
        assert (values.double() - expected).abs().max() <= 1
    back = ref.dequantize_kv(q, scale)
    assert back.dtype == torch.float32 and back.shape == x.shape
    assert (back[2, 1] == 0).all() and scale[2, 1] == 0, "an all-zero vector stores zeros"
    err = (back.double() - x.double()).abs()
    s = scale64[..., None]
    if fmt == "fp8":  # 3 mantissa bits: half an ulp relative, or half the smallest subnormal (2^-9) absolute
        bound = torch.maximum(x.double().abs() * 2**-4, s * 2**-10)
    else:
        bound = s / 2
    assert (err <= bound * (1 + 1e-5) + 1e-30).all()


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_a_vector_too_small_to_scale_reads_back_as_zeros(fmt):
    """Below amax ~ qmax / 3.4e38, qmax / amax overflows fp32: the vector stores zeros (as an all-zero one), never
    its zeros as 0 x inf (NaN in fp8 pages, an undefined integer in int8 / int4 ones); a NaN input stays NaN."""
    x = torch.zeros(3, 1, 8)
    x[0, 0, 3], x[1, 0, 5] = 1e-38, -3e-39
    x[2, 0, 2] = float("nan")
    back = ref.dequantize_kv(*ref.quantize_kv(x, FORMATS[fmt]))
    assert (back[:2] == 0).all()
    assert back[2].isnan().any() or fmt != "fp8"  # (integer pages cannot hold NaN; the scale does)
    assert ref.quantize_kv(x, FORMATS[fmt])[1][2].isnan().all()


def unpack_int4(q: torch.Tensor) -> torch.Tensor:
    """Byte j holds element 2j in its low nibble and 2j+1 in its high one, each stored as value + 8."""
    lo, hi = (q & 0xF).long() - 8, (q >> 4).long() - 8
    assert lo.min() >= -7 and hi.min() >= -7, "the nibble 0 (-8) is never written"
    return torch.stack([lo, hi], -1).flatten(-2).float()


def test_round_trip_error_shrinks_with_the_format():
    """Relative error of the round trip, largest to smallest: int4, fp8, int8 (fp8 keeps 3 mantissa bits, int8 7)."""
    x = torch.randn(64, 2, 256, generator=torch.Generator().manual_seed(1))
    errs = {}
    for fmt, dtype in FORMATS.items():
        back = ref.dequantize_kv(*ref.quantize_kv(x, dtype))
        errs[fmt] = ((back - x).norm() / x.norm()).item()
    assert errs["int4"] > errs["fp8"] > errs["int8"] and errs["int8"] < 0.01 and errs["int4"] < 0.15


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_paged_attention_reads_quantized_pages(fmt):
    """write_kv quantizes into shuffled pages; decode and prefill over those pages equal dense attention over the
    dequantized K/V (float64 truth, fp32 tolerance)."""
    dtype, gen = FORMATS[fmt], torch.Generator().manual_seed(2)
    heads, dim, page, lengths = (4, 2), 16, 4, [7, 1, 13]
    num_pages = sum(-(-n // page) for n in lengths) + 2
    stored = ref.kv_stored_dim(dtype, dim)
    caches = [torch.zeros(num_pages, page, heads[1], stored, dtype=dtype) for _ in range(2)]
    scales = [torch.full((num_pages, page, heads[1]), float("nan")) for _ in range(2)]
    perm = torch.randperm(num_pages, generator=gen)
    tables = torch.full((len(lengths), 6), -1, dtype=torch.int32)
    at, dense = 0, []
    for n, length in enumerate(lengths):
        pages = perm[at:at + -(-length // page)]
        at += len(pages)
        tables[n, :len(pages)] = pages.to(torch.int32)
        pos = torch.arange(length)
        k, v = (torch.randn(length, heads[1], dim, generator=gen) for _ in range(2))
        ref.write_kv(k=k, v=v, k_cache=caches[0], v_cache=caches[1], slot_mapping=pages[pos // page] * page
                     + pos % page, k_scale=scales[0], v_scale=scales[1])
        dense.append([ref.dequantize_kv(*ref.quantize_kv(t, dtype)) for t in (k, v)])
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    kv = dict(k_cache=caches[0], v_cache=caches[1], k_scale=scales[0], v_scale=scales[1], block_tables=tables,
              seq_lens=seq_lens, scale=dim ** -0.5)
    q = torch.randn(len(lengths), heads[0], dim, generator=gen)
    o = ref.paged_attention_decode(q=q, **kv)
    new = [3, 1, 13]
    cu = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
    qp = torch.randn(sum(new), heads[0], dim, generator=gen)
    op = ref.paged_attention_prefill(q=qp, cu_seqlens_q=cu, **kv)
    for n, (k, v) in enumerate(dense):
        assert_close(o[n:n + 1], truth(q[n:n + 1], k, v, lengths[n] - 1, dim ** -0.5))
        lo, hi = cu[n].item(), cu[n + 1].item()
        assert_close(op[lo:hi], truth(qp[lo:hi], k, v, lengths[n] - new[n], dim ** -0.5))


def truth(q, k, v, first_pos, scale):
    """Dense causal GQA attention in float64."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    pos = torch.arange(q.shape[0]) + first_pos
    scores = scores.masked_fill(torch.arange(k.shape[0])[None, :] > pos[:, None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def test_quantized_pages_without_scales_name_the_fix():
    cache = torch.zeros(2, 4, 1, 8, dtype=torch.int8)
    x = torch.randn(1, 1, 8)
    with pytest.raises(ValueError, match="k_scale, v_scale"):
        ref.write_kv(k=x, v=x, k_cache=cache, v_cache=cache.clone(), slot_mapping=torch.tensor([3]))
    with pytest.raises(ValueError, match="even head_dim"):
        ref.kv_stored_dim(torch.uint8, 7)
