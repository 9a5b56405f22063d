"""The int4 / fp8 GEMM and MoE kernels (kernels/quant/triton.py) against their dequantize-then-GEMM references.

Without a GPU they run under TRITON_INTERPRET=1 at small shapes and small tiles (several programs, split-K, ragged
N and K tails, several groups); `pytest -m gpu` runs them compiled at the real layer shapes of Qwen3.5-27B, 35B-A3B
and 122B-A10B, with odd sizes and NaN-poisoned outputs (every element must be written). Error policy as elsewhere
(tests/tolerances.py): at most twice the error of the reference in the same dtype against a float64 product of the
same exactly dequantized weights (the reference rounds them to the activation dtype first; UNPACK 3 does not).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from tests.tolerances import assert_error_within  # noqa: E402

from deltaserve.kernels.quant import ref  # noqa: E402
from deltaserve.kernels.quant import triton as qt  # noqa: E402

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True, scope="module")
def _interpreter_like_the_gpu(interpreter_rounds_like_the_gpu):
    yield


def _gen(gen: torch.Generator) -> torch.Generator:
    """A generator on DEV seeded from `gen` (weights of real layer sizes are made on the GPU, not copied to it)."""
    return torch.Generator(device=DEV).manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))


def int4_weight(n: int, k: int, group: int, gen: torch.Generator, device=DEV):
    g = _gen(gen)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8, device=DEV)
    groups = -(-k // group)
    scales = torch.rand(n, groups, generator=g, device=DEV) * 0.02 + 0.001
    zeros = torch.randint(0, 16, (n, groups), generator=g, dtype=torch.uint8, device=DEV)
    return ref.pack_int4(codes), scales, zeros


def fp8_weight(n: int, k: int, block: int, gen: torch.Generator, device=DEV):
    g = _gen(gen)
    w = (torch.randn(n, k, generator=g, device=DEV) * 8).to(torch.float8_e4m3fn)
    scale = torch.rand(n, -(-k // block), generator=g, device=DEV) * 0.01 + 0.001
    return w, scale


def gemm_case(kind: str, m: int, n: int, k: int, group: int, dtype: torch.dtype, seed: int = 0,
              x_scale: float = 1.0):
    """x and a random int4 or fp8 weight -> (x, weight, scale, zeros, the reference's product, the exact one)."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=gen) * x_scale).to(dtype).to(DEV)
    if kind == "int4":
        qw, s, z = int4_weight(n, k, group, gen)
        w = ref.dequant_int4(qweight=qw, scales=s, zeros=z, group_size=group, k=k)
        baseline = ref.int4_linear(x=x, qweight=qw, scales=s, zeros=z, group_size=group)
        weight, zeros = qw, z
    else:
        weight, s = fp8_weight(n, k, group, gen)
        w = ref.dequant_fp8(weight=weight, scale=s, block_k=group)
        baseline = ref.fp8_linear(x=x, weight=weight, scale=s, block_k=group)
        zeros = None
    # Against the exact dequantized weight: the reference rounds it to x.dtype first (the model dequantized ahead of
    # time); the GPU kernels scale after the dot and skip that rounding, so they must be at least as close.
    return x, weight, s, zeros, baseline, x.double() @ w.double().T


def check_gemm(kind: str, m: int, n: int, k: int, group: int, dtype: torch.dtype, tiles=None, seed: int = 0,
               unpack=None, x_scale: float = 1.0, calls: int = 1) -> list[torch.Tensor]:
    """`calls` calls, each within tolerance -> their results."""
    x, weight, s, zeros, baseline, expected = gemm_case(kind, m, n, k, group, dtype, seed, x_scale)
    results = []
    for _ in range(calls):
        out = torch.full((m, n), float("nan"), dtype=dtype, device=DEV)  # NaN-poisoned: every element must be written
        got = qt.quant_gemm(x, weight, s, zeros, group, out=out, tiles=tiles, unpack=unpack)
        assert got is out
        assert_error_within(got, baseline, expected, atol=(1e-4 if dtype != torch.float32 else 1e-6) * x_scale)
        results.append(got)
    return results


@pytest.mark.parametrize("kind", ["int4", "fp8"])
@pytest.mark.parametrize("m,tiles", [(3, (16, 32, 16, 3)), (20, (16, 16, 32, 1)), (40, (32, 32, 16, 2))])
def test_gemm_interpreted(kind, m, tiles):
    check_gemm(kind, m, 72, 96, 32, torch.bfloat16 if m != 20 else torch.float32, tiles=tiles, seed=m)


@pytest.mark.parametrize("kind", ["int4", "fp8"])
def test_gemm_takes_rows_without_unit_stride(kind):
    """x given column-major (a transposed view): the same product as its contiguous copy; the kernels step through a
    row with unit stride and read the row stride alone, so such an x gave a wrong product."""
    x, weight, s, zeros, _, _ = gemm_case(kind, 5, 72, 96, 32, torch.bfloat16, seed=7)
    strided = x.T.contiguous().T
    assert strided.stride(-1) != 1
    assert torch.equal(qt.quant_gemm(strided, weight, s, zeros, 32), qt.quant_gemm(x, weight, s, zeros, 32))


@pytest.mark.parametrize("kind", ["int4", "fp8"])
def test_gemm_whole_tiles_interpreted(kind):
    """N and K whole tiles: the tl.dot kernel's unmasked weight loads (EVEN), split-K."""
    check_gemm(kind, 5, 64, 128, 32, torch.bfloat16, tiles=(16, 32, 32, 2), seed=9, unpack=0)


# The H200 sweep's best tl.dot tiles (bench_quant_kernels.py --sweep --rows 16 64, RESULTS.md 2026-12-05) that
# _plan_sm90's rule reproduces: (shape, kind, rows) -> (BM, BN, BK, split, num_warps, num_stages).
H200_SWEEP_PICKS = [((34816, 5120), "int4", 16, (16, 64, 128, 1, 4, 3)),
                    ((5120, 17408), "int4", 16, (16, 128, 128, 6, 8, 3)),
                    ((12288, 2048), "int4", 16, (16, 128, 128, 2, 4, 3)),
                    ((5120, 17408), "fp8", 16, (16, 128, 128, 6, 4, 3)),
                    ((12288, 2048), "fp8", 16, (16, 128, 128, 2, 4, 3)),
                    ((34816, 5120), "int4", 64, (64, 64, 64, 1, 4, 3)),
                    ((34816, 5120), "fp8", 64, (64, 128, 64, 1, 4, 3)),
                    ((5120, 17408), "fp8", 64, (64, 128, 128, 6, 4, 3)),
                    ((12288, 2048), "fp8", 64, (64, 128, 64, 2, 4, 3))]


@pytest.mark.parametrize("shape,kind,m,picked", H200_SWEEP_PICKS)
def test_sm90_plan_is_the_sweeps_pick(shape, kind, m, picked):
    """The tile rule gives the sweep's best at 132 SMs (the H200) where the sweep's pick is what it timed best."""
    n, k = shape
    assert qt._plan_sm90(m, n, k, 128, picked[0], 132, kind == "int4") == picked


@pytest.mark.parametrize("m,n,k,group,tiles,dtype", [(3, 72, 96, 32, (16, 32, 32, 3), torch.bfloat16),
                                                      (20, 40, 99, 99, (16, 16, 16, 2), torch.float32),
                                                      (40, 24, 160, 32, (32, 16, 32, 1), torch.bfloat16),
                                                      (5, 64, 128, 32, (16, 32, 32, 2), torch.bfloat16)])
@pytest.mark.parametrize("unpack", [0, 2])
def test_int4_dequantize_then_dot_interpreted(m, n, k, group, tiles, dtype, unpack):
    """int4 UNPACK 0 (the default past the GEMV's rows): each word loaded once, its nibbles interleaved back into
    column order, one dot per tile; and UNPACK 2 (benchmarks: eight nibble-plane dots per tile); ragged N and K,
    split-K, and whole tiles (the unmasked loads, EVEN)."""
    check_gemm("int4", m, n, k, group, dtype, tiles=tiles, seed=m + k, unpack=unpack)


@pytest.mark.parametrize("kind", ["int4", "fp8"])
@pytest.mark.parametrize("m,tiles,dtype", [(1, (1, 32, 32, 2), torch.bfloat16), (3, (4, 16, 16, 3), torch.float32)])
def test_gemv_interpreted(kind, m, tiles, dtype):
    """The CUDA-core GEMV (variant 4): one row and a padded row tile, ragged N, split-K over several groups."""
    check_gemm(kind, m, 72, 96, 32, dtype, tiles=tiles, seed=m + 11, unpack=4)


@pytest.mark.parametrize("kind", ["int4", "fp8"])
@pytest.mark.parametrize("n,k,group,tiles", [(72, 100, 100, (1, 32, 32, 2)), (40, 99, 99, (1, 16, 16, 3)),
                                             (24, 160, 32, None)])
def test_gemv_ragged_k_interpreted(kind, n, k, group, tiles):
    """The GEMV where K is not a multiple of the K tile (nor of 8), across split-K boundaries, and at its default
    plan: the masked last tile and the clamped prefetch of the tile after it."""
    check_gemm(kind, 1, n, k, group, torch.bfloat16, tiles=tiles, seed=k, unpack=4)


@pytest.fixture(params=[1, 4], ids=["words1", "words4"])
def gemv_f16(monkeypatch, request):
    """The int4 GEMVs with fp16 products (qt.GEMV_F16), one word per fp16 accumulator (words1, the asm of 4ac49b6)
    or four chained (words4, F16_WORDS: at most BK/8, so the 16- and 32-column tiles chain 2 and 4); fails the test
    if that variant never ran. Error bound for both: check_gemm's, twice the bf16 reference's error against the exact
    product (about 3x its own: the interpreter measured 4.5e-4 (words1) and 7.5e-4 to 1e-3 (words4) of max |y| in fp32
    at K 2048, where the bf16 reference errs by 2.4e-3 to 3.4e-3)."""
    calls, real = [], qt.plane_major_f16
    monkeypatch.setattr(qt, "GEMV_F16", True)
    monkeypatch.setattr(qt, "GEMV_F16_WORDS", request.param)
    monkeypatch.setattr(qt, "MOE_PAIR_F16_WORDS", request.param)
    monkeypatch.setattr(qt, "plane_major_f16", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    yield
    assert calls, "the F16_FMA GEMV did not run"


@pytest.mark.parametrize("m,n,k,group,tiles", [(1, 72, 96, 32, (1, 32, 32, 2)), (3, 72, 96, 32, (4, 16, 16, 3)),
                                               (1, 72, 100, 100, (1, 32, 32, 2)), (1, 40, 99, 99, (1, 16, 16, 3)),
                                               (1, 24, 160, 32, None)])
def test_gemv_f16_interpreted(gemv_f16, m, n, k, group, tiles):
    """The F16_FMA GEMV (bf16 activations only) at the GEMV tests' cases: padded row tile, ragged N and K, split-K,
    the default plan."""
    check_gemm("int4", m, n, k, group, torch.bfloat16, tiles=tiles, seed=k + m, unpack=4)


@pytest.mark.parametrize("x_scale", [1e5, 1e-7])
def test_gemv_f16_activation_range_interpreted(gemv_f16, x_scale):
    """Activations past fp16's largest value (65504) or below its normals (6e-5): the per-tile power-of-two scale
    of plane_major_f16 keeps them finite and exact."""
    check_gemm("int4", 1, 40, 256, 128, torch.bfloat16, tiles=(1, 16, 128, 2), seed=7, unpack=4, x_scale=x_scale)


@pytest.fixture(params=[(3, False), (2, True), (3, True)], ids=["depth3", "evict", "depth3-evict"])
def gemv_pipeline(monkeypatch, request):
    """quant_gemm's GEMV with three tiles an iteration (qt.GEMV_DEPTH) and/or its words loaded evict-first."""
    monkeypatch.setattr(qt, "GEMV_DEPTH", request.param[0])
    monkeypatch.setattr(qt, "GEMV_EVICT_FIRST", request.param[1])


@pytest.mark.parametrize("m,n,bn,int4,want", [(1, 34816, 128, True, (3, True)), (2, 34816, 128, True, (2, True)),
                                               (1, 34816, 64, False, (2, True)), (1, 16384, 128, True, (2, False)),
                                               (1, 16384, 64, False, (2, False)), (1, 5120, 128, True, (2, False))])
def test_gemv_pipeline_rule(m, n, bn, int4, want):
    """At 132 SMs (the H200) the rule gives the pipelines the H200 timed best per shape: 27B gate_up (N 34816, N tiles
    past two waves) evict-first, with three tiles an iteration at one int4 row; 27B in_proj (16384) and down (5120)
    the two-tile loop."""
    assert qt._gemv_pipeline(m, n, bn, int4, 132) == want


def test_gemv_pipeline_per_card_entry():
    """A card's measured entry (GEMV_DEPTH_TUNED) overrides the rule's depth for its one-row int4 shape only: the H100
    takes three tiles for the 27B down projection, the H200 and other rows, formats and shapes keep the rule."""
    h100 = "NVIDIA H100 80GB HBM3"
    assert qt._gemv_pipeline(1, 5120, 128, True, 132, 17408, h100) == (3, False)
    assert qt._gemv_pipeline(1, 5120, 128, True, 132, 17408, "NVIDIA H200") == (2, False)
    assert qt._gemv_pipeline(2, 5120, 128, True, 132, 17408, h100) == (2, False)
    assert qt._gemv_pipeline(1, 5120, 64, False, 132, 17408, h100) == (2, False)
    assert qt._gemv_pipeline(1, 5120, 128, True, 132, 6144, h100) == (2, False)


def test_gemv_pipeline_knobs_override_the_rule(monkeypatch):
    monkeypatch.setattr(qt, "GEMV_DEPTH", 2)
    monkeypatch.setattr(qt, "GEMV_EVICT_FIRST", False)
    assert qt._gemv_pipeline(1, 34816, 128, True, 132) == (2, False)


@pytest.mark.parametrize("depth", [1, 4])
def test_gemv_pipeline_refuses_a_depth_it_has_no_loop_for(monkeypatch, depth):
    """_gemv_acc has loops of two and three tiles only: any other GEMV_DEPTH would run the two-tile loop while a
    benchmark labels it otherwise, so it is refused, naming the knob."""
    monkeypatch.setattr(qt, "GEMV_DEPTH", depth)
    with pytest.raises(ValueError, match="GEMV_DEPTH must be 2 or 3"):
        qt._gemv_pipeline(1, 34816, 128, True, 132)


@pytest.mark.parametrize("kind", ["int4", "fp8"])
@pytest.mark.parametrize("k,tiles", [(160, (1, 16, 32, 1)), (160, (1, 16, 32, 2)), (224, (1, 16, 32, 2)),
                                     (99, (1, 16, 16, 2)), (32, (1, 16, 32, 1))])
def test_gemv_pipeline_interpreted(gemv_pipeline, kind, k, tiles):
    """The GEMV's other pipelines (qt.GEMV_DEPTH 3, GEMV_EVICT_FIRST) at every remainder of K tiles per split against an
    iteration's three (1 to 5 tiles: 160 columns in one split and in two of 96 + 64, 224 in 128 + 96, a ragged 99
    in 64 + 35, one tile), ragged N, with the default fp16 products."""
    check_gemm(kind, 1, 40, k, min(k, 32), torch.bfloat16, tiles=tiles, seed=k + tiles[3], unpack=4)


@pytest.fixture
def gemv_fp8_f16(monkeypatch):
    """The fp8 GEMV with fp16 products (qt.GEMV_FP8_F16) -> the list of its act_f16 calls. Error bound: check_gemm's,
    twice the bf16 reference's error against the exact product."""
    calls, real = [], qt.act_f16
    monkeypatch.setattr(qt, "GEMV_FP8_F16", True)
    monkeypatch.setattr(qt, "act_f16", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    return calls


@pytest.mark.parametrize("m,n,k,group,tiles", [(1, 72, 96, 32, (1, 32, 32, 2)), (2, 72, 96, 32, (2, 16, 16, 3)),
                                               (1, 40, 128, 128, (1, 16, 64, 1)), (1, 24, 160, 32, None)])
def test_gemv_fp8_f16_interpreted(gemv_fp8_f16, m, n, k, group, tiles):
    """The fp8 GEMV with fp16 products: padded row tile, ragged N, split-K, the default plan."""
    check_gemm("fp8", m, n, k, group, torch.bfloat16, tiles=tiles, seed=k + m, unpack=4)
    assert gemv_fp8_f16, "the fp16-product fp8 GEMV did not run"


@pytest.mark.parametrize("x_scale", [1e5, 1e-7])
def test_gemv_fp8_f16_activation_range_interpreted(gemv_fp8_f16, x_scale):
    """Activations past fp16's range either way: act_f16's per-tile power of two keeps them finite and exact."""
    check_gemm("fp8", 1, 40, 256, 128, torch.bfloat16, tiles=(1, 16, 128, 2), seed=7, unpack=4, x_scale=x_scale)
    assert gemv_fp8_f16


def test_gemv_fp8_f16_largest_products_stay_finite(gemv_fp8_f16):
    """Every weight at e4m3's largest value (448) and every activation equal, the tile's |x| scaled to its top of
    range: each fp16 chain of 16 products and the sum of its halves stay below fp16's largest value."""
    n, k = 16, 128
    w = torch.full((n, k), 448.0).to(torch.float8_e4m3fn).to(DEV)
    s = torch.ones(n, 1, device=DEV)
    x = torch.full((1, k), 7.96875, dtype=torch.bfloat16, device=DEV)
    got = qt.quant_gemm(x, w, s, None, k, unpack=4).float()
    assert gemv_fp8_f16
    assert torch.allclose(got, torch.full_like(got, 448.0 * 7.96875 * k), rtol=1e-2)


def test_gemv_fp8_f16_falls_back_on_unaligned_rows(gemv_fp8_f16):
    """Rows of 100 bytes are not whole 16-byte vectors: the fp32 GEMV runs instead, as correct."""
    check_gemm("fp8", 1, 40, 100, 100, torch.bfloat16, tiles=(1, 16, 32, 1), seed=5, unpack=4)
    assert not gemv_fp8_f16


def test_gemv_fp8_f16_falls_back_on_ragged_k_views(gemv_fp8_f16):
    """A column slice of 102 of a weight with 16-byte rows: the words would drop its last two columns, so the fp32
    GEMV runs, as correct as on a contiguous copy."""
    w, s = fp8_weight(16, 112, 102, torch.Generator().manual_seed(2))
    x = torch.randn(1, 102, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).to(DEV)
    got = qt.quant_gemm(x, w[:, :102], s, None, 102, unpack=4)
    want = qt.quant_gemm(x, w[:, :102].contiguous(), s, None, 102, unpack=4)
    assert not gemv_fp8_f16
    assert torch.equal(got, want)


def test_e4m3_decode_matches_torch():
    """The interpreter's e4m3 decode (_e4m3_bits_to_f16, what cvt.rn.f16x2.e4m3x2 does on the GPU) against torch's
    float8_e4m3fn for every non-NaN code."""
    codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.int32, device=DEV)
    out = torch.empty(len(codes), dtype=torch.float16, device=DEV)
    _e4m3_kernel[(1,)](codes, out, len(codes), BLOCK=256)
    assert torch.equal(out, codes.to(torch.uint8).view(torch.float8_e4m3fn).to(torch.float16))


@triton.jit
def _e4m3_kernel(c_ptr, o_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(o_ptr + offs, qt._e4m3_bits_to_f16(tl.load(c_ptr + offs, mask=offs < n, other=0)), mask=offs < n)


# Split-K reduced in the launch (_reduce_splits): workspace and counters are the linear kernel's, one pair per device.

def check_split(kind: str, m: int, dtype: torch.dtype, tiles, unpack=None):
    """A split-K call (72 columns: ragged N tiles; K 96 in three or two ranges over three groups) with a NaN-filled
    workspace, twice: both within tolerance and bitwise equal (the counters came back to 0, the reduction is
    deterministic), every counter 0 after, the workspace written (the in-launch reduction ran)."""
    from deltaserve.kernels.linear import triton as linear_triton
    check_gemm(kind, m, 72, 96, 32, dtype, tiles=tiles, seed=m, unpack=unpack)  # compiles, allocates the scratch
    ws, counts = linear_triton._split_buffers[str(torch.device(DEV))]
    ws.fill_(float("nan"))
    first, second = check_gemm(kind, m, 72, 96, 32, dtype, tiles=tiles, seed=m, unpack=unpack, calls=2)
    assert torch.equal(first, second)
    assert not counts.any()
    assert not ws.isnan().all()


@pytest.mark.parametrize("kind,m,dtype", [("int4", 1, torch.bfloat16), ("fp8", 1, torch.bfloat16),
                                          ("int4", 3, torch.float32), ("fp8", 3, torch.float32)])
def test_gemv_split_interpreted(kind, m, dtype):
    """The GEMV (one row, or three in a tile of 4), 5 N tiles x 3 K ranges reduced in one launch."""
    check_split(kind, m, dtype, (1 if m == 1 else 4, 16, 16, 3), unpack=4)


@pytest.mark.parametrize("kind,m,dtype,tiles", [("int4", 20, torch.bfloat16, (16, 32, 16, 3)),
                                                ("fp8", 20, torch.float32, (16, 32, 16, 3)),
                                                ("int4", 40, torch.float32, (32, 16, 32, 2)),
                                                ("fp8", 3, torch.bfloat16, (16, 16, 16, 2))])
def test_gemm_split_interpreted(kind, m, dtype, tiles):
    """The tiled kernel: 1-2 M tiles (the last one padded) x 3-5 N tiles x 2-3 K ranges reduced in one launch."""
    check_split(kind, m, dtype, tiles)


@pytest.mark.parametrize("kind", ["int4", "fp8"])
def test_split_without_scratch_interpreted(kind, monkeypatch):
    """No workspace (a capture's first call of its size): the partials go to a temporary and torch adds them."""
    asked = []
    monkeypatch.setattr(qt, "_scratch", lambda *args: asked.append(args))  # None: as in a capture
    check_gemm(kind, 1, 72, 96, 32, torch.bfloat16, tiles=(1, 16, 16, 3), seed=1, unpack=4)
    check_gemm(kind, 20, 72, 96, 32, torch.bfloat16, tiles=(16, 32, 16, 3), seed=20)
    assert len(asked) == 2


def _loader_codes(order: str, codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group: int):
    """codes [N, K], zeros and scales [N, K/G] stored as a GPTQ v1 or an AutoAWQ GEMM checkpoint, then converted by
    the loader (layers/quant.py) -> (qweight, scales, zeros) in the kernels' layout."""
    from types import SimpleNamespace

    from deltaserve.layers.quant import AWQ_ORDER, _convert_int4
    n, k = codes.shape
    if order == "gptq":  # packed along K (qweight [K/8, N]), zeros stored minus one in 4 bits (0 as 15)
        t = {"qweight": ref.pack_int4(codes.cpu()).T.contiguous(),
             "qzeros": ref.pack_int4(((zeros.cpu().int() - 1) & 0xF).to(torch.uint8).T.contiguous()),
             "scales": scales.cpu().T.contiguous()}
        fmt = SimpleNamespace(checkpoint="gptq", zero_offset=1, symmetric=False)
    else:  # packed along N, column 8c + j in nibble AWQ_ORDER[j]
        def awq(u: torch.Tensor) -> torch.Tensor:  # [R, N] -> [R, N/8]
            v = torch.empty_like(u).view(u.shape[0], -1, 8)
            v[..., list(AWQ_ORDER)] = u.view(u.shape[0], -1, 8)
            return ref.pack_int4(v.reshape(u.shape))
        t = {"qweight": awq(codes.cpu().T.contiguous()), "qzeros": awq(zeros.cpu().T.contiguous()),
             "scales": scales.cpu().T.contiguous()}
        fmt = SimpleNamespace(checkpoint="awq")
    q, z, s, _ = _convert_int4(fmt, "w", t, n, k, group)
    return ref.pack_int4(q).to(DEV), s.to(DEV), z.to(DEV)


def check_loader_order(order: str, n: int, k: int, group: int, tiles=None):
    """The F16_FMA GEMV on weights that went through the loader from `order`'s packing, against the reference."""
    gen = torch.Generator().manual_seed(n + k)
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    zeros = torch.randint(0, 16, (n, k // group), generator=gen, dtype=torch.uint8)
    assert (zeros == 0).any()
    scales = torch.rand(n, k // group, generator=gen) * 0.02 + 0.001
    qw, s, z = _loader_codes(order, codes, zeros, scales, group)
    # GPTQ v1 readers add 1 to the stored zero - 1 without wrapping: a zero point of 0 (stored 15) reads as 16
    loaded = torch.where(zeros == 0, 16, zeros) if order == "gptq" else zeros
    assert torch.equal(ref.unpack_int4(qw.cpu(), k), codes) and torch.equal(z.cpu(), loaded)
    x = torch.randn(1, k, generator=gen).to(torch.bfloat16).to(DEV)
    w = ref.dequant_int4(qweight=qw, scales=s, zeros=z, group_size=group, k=k)
    baseline = ref.int4_linear(x=x, qweight=qw, scales=s, zeros=z, group_size=group)
    out = torch.full((1, n), float("nan"), dtype=torch.bfloat16, device=DEV)
    got = qt.quant_gemm(x, qw, s, z, group, out=out, tiles=tiles, unpack=4)
    assert_error_within(got, baseline, x.double() @ w.double().T, atol=1e-4)


def _run_ptx(text: str, args: list[int]) -> float:
    """A few PTX instructions (those of the F16_FMA asm blocks) run on one set of 32-bit operands, numpy fp16 math
    (fma: exact product and sum in float64, one rounding to fp16) -> $0 read as fp32."""
    import numpy as np

    regs = {f"${i}": v & 0xFFFFFFFF for i, v in enumerate(args)}

    def val(tok: str) -> int:
        return int(tok, 16) if tok.startswith("0x") else int(tok) if tok.isdigit() else regs[tok]

    def halves(v: int) -> np.ndarray:
        return np.array([v & 0xFFFF, v >> 16], dtype=np.uint16).view(np.float16)

    def pack(h: np.ndarray) -> int:
        u = h.astype(np.float16).view(np.uint16)
        return int(u[0]) | int(u[1]) << 16

    for line in text.splitlines():
        line = line.strip().rstrip(";")
        if not line or line[0] in "{}." or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        if op == "mov.b32":  # mov.b32 {lo, hi}, acc
            lo, hi = (r.strip() for r in rest[rest.index("{") + 1:rest.index("}")].split(","))
            src = regs[rest.rsplit(",", 1)[1].strip()]
            regs[lo], regs[hi] = src & 0xFFFF, src >> 16
            continue
        d, *src = (t.strip() for t in rest.split(","))
        if op == "shr.u32":
            regs[d] = val(src[0]) >> val(src[1])
        elif op == "and.b32":
            regs[d] = val(src[0]) & val(src[1])
        elif op in ("mul.rn.f16x2", "fma.rn.f16x2"):
            a, b = halves(val(src[0])).astype(np.float64), halves(val(src[1])).astype(np.float64)
            c = halves(val(src[2])).astype(np.float64) if op.startswith("fma") else 0.0
            regs[d] = pack(a * b + c)
        elif op == "add.rn.f16":
            h = np.array([val(src[0]), val(src[1])], dtype=np.uint16).view(np.float16).astype(np.float64)
            regs[d] = int(np.array([h.sum()], dtype=np.float16).view(np.uint16)[0])
        elif op == "cvt.f32.f16":
            regs[d] = int(np.array([float(np.array([val(src[0])], dtype=np.uint16).view(np.float16)[0])],
                                   dtype=np.float32).view(np.uint32)[0])
        else:
            raise AssertionError(f"unexpected PTX {op}")
    return float(np.array([regs["$0"]], dtype=np.uint32).view(np.float32)[0])


@pytest.mark.parametrize("words", [1, 2, 4])
def test_f16_asm_pairs_nibbles_with_their_activations(words):
    """The F16_FMA asm text (not runnable under the interpreter), run by _run_ptx on random words and activation
    pairs: sum over the words' 8 nibbles q_j * 2^-24 times the activation of column j (plane_major_f16's pairing:
    word c of pair-plane p holds columns p and p + 4, odd p divided by 16), within the fp16 sums' rounding."""
    gen = torch.Generator().manual_seed(words)
    text = qt._word_dot_f16_ptx() if words == 1 else qt._chain_f16_ptx(words)
    for _ in range(20):
        w = torch.randint(0, 2**32, (words,), generator=gen, dtype=torch.int64).tolist()
        x = torch.empty(words, 8).uniform_(-2**15, 2**15, generator=gen).to(torch.float16).double()
        want, xw = 0.0, []
        for i in range(words):
            for p in range(4):  # pair-plane p: low half column p, high half column p + 4
                lo, hi = x[i, p] / (16 if p % 2 else 1), x[i, p + 4] / (16 if p % 2 else 1)
                xw.append(int(torch.tensor([lo, hi]).to(torch.float16).view(torch.int16)[0]) & 0xFFFF
                          | (int(torch.tensor([lo, hi]).to(torch.float16).view(torch.int16)[1]) & 0xFFFF) << 16)
            want += sum(((w[i] >> (4 * j)) & 0xF) * 2.0**-24 * float(x[i, j]) for j in range(8))
        got = _run_ptx(text, [0, *w, *xw])
        bound = words * 8 * 15 * 2.0**-9 * 2.0**-10  # 8W products below 15 * 2^-9, fp16 sums' relative 2^-11 each
        assert abs(got - want) <= bound, (got, want)


@pytest.mark.parametrize("order", ["gptq", "awq"])
def test_gemv_f16_loader_orders_interpreted(gemv_f16, order):
    """Both packing orders the loaders take (GPTQ along K, AutoAWQ along N interleaved) reach the GEMV in one order."""
    check_loader_order(order, 48, 256, 64, tiles=(1, 16, 64, 2))


def test_moe_f16_interpreted(gemv_f16):
    """The MoE's per-pair GEMVs with fp16 products (the down GEMVs' input is fp32)."""
    check_moe("int4", tokens=3, experts=4, top_k=2, d=64, inter=32, group=32, dtype=torch.bfloat16)


def test_moe_fp8_f16_interpreted(gemv_fp8_f16):
    """The fp8 MoE's gate|up GEMVs with fp16 products, the shared expert folded in."""
    check_moe("fp8", tokens=3, experts=4, top_k=2, d=64, inter=32, group=32, dtype=torch.bfloat16, shared=True)
    assert gemv_fp8_f16


def check_act_order_linear(m: int, n: int, k: int, seed: int = 0) -> None:
    """int4_linear with an act-order perm (the fp16-product GEMV gathers x in its activation copy) against the
    reference, which gathers first; NaN-poisoned output on a GPU."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16).to(DEV)
    qw, s, z = int4_weight(n, k, 128, gen)
    perm = torch.randperm(k, generator=gen).to(DEV)
    want = ref.int4_linear(x=x, qweight=qw, scales=s, zeros=z, group_size=128, perm=perm)
    if DEV != "cpu":
        torch.full((m * n * 4,), float("nan"), device=DEV)
    got = qt.int4_linear(x=x, qweight=qw, scales=s, zeros=z, group_size=128, perm=perm)
    exact = x[:, perm].double() @ ref.dequant_int4(qweight=qw, scales=s, zeros=z, group_size=128, k=k).double().T
    assert_error_within(got, want, exact, atol=1e-4)


def test_act_order_gemv_gathers_in_its_activation_copy_interpreted(gemv_f16):
    check_act_order_linear(2, 48, 256)


# ---- a dense tail in the GEMV's launch (the GDN in_proj's bf16 b|a beside its quantized qkv|z) ----

def check_tail(kind: str, m: int, n: int, n_tail: int, k: int, dtype: torch.dtype, tiles=None, seed: int = 0):
    """quant_gemm with a dense tail, NaN-poisoned [M, N + N_TAIL] output, twice (bitwise equal: split-K counters back
    to 0): the quantized columns within check_gemm's tolerance, the tail's within twice the error of x @ tail^T in
    the same dtype (the reference) against the float64 product."""
    x, weight, s, zeros, baseline, expected = gemm_case(kind, m, n, k, min(k, 128), dtype, seed)
    tail = torch.randn(n_tail, k, generator=torch.Generator().manual_seed(seed + 1)).to(dtype).to(DEV)
    results = []
    for _ in range(2):
        out = torch.full((m, n + n_tail), float("nan"), dtype=dtype, device=DEV)
        got = qt.quant_gemm(x, weight, s, zeros, min(k, 128), out=out, tiles=tiles, unpack=4, tail=tail)
        assert_error_within(got[:, :n], baseline, expected, atol=1e-4 if dtype != torch.float32 else 1e-6)
        assert_error_within(got[:, n:], torch.nn.functional.linear(x, tail), x.double() @ tail.double().T,
                            atol=1e-4 if dtype != torch.float32 else 1e-6)
        results.append(got)
    assert torch.equal(*results)


@pytest.mark.parametrize("kind", ["int4", "fp8"])
@pytest.mark.parametrize("m,dtype,tiles,k", [(1, torch.bfloat16, (1, 16, 32, 3), 160),
                                             (2, torch.bfloat16, (2, 16, 32, 1), 160),
                                             (3, torch.float32, (4, 32, 32, 2), 160),
                                             (1, torch.float16, (1, 16, 32, 3), 200)])
def test_gemv_tail_interpreted(kind, m, dtype, tiles, k):
    """72 quantized columns in ragged tiles then 40 tail rows (two whole 16-row tail tiles and one of 8), K in 1-3
    splits (the last ragged; K 200 ends inside a K tile), one to three activation rows, bf16 / fp16 / fp32."""
    check_tail(kind, m, 72, 40, k, dtype, tiles=tiles, seed=m)


@pytest.mark.parametrize("kind", ["int4", "fp8"])
def test_gemv_tail_without_scratch_interpreted(kind, monkeypatch):
    """No split-K workspace (a capture's first call of its size): the tail's partials go to the temporary too."""
    asked = []
    monkeypatch.setattr(qt, "_scratch", lambda *args: asked.append(args))
    check_tail(kind, 1, 72, 40, 160, torch.bfloat16, tiles=(1, 16, 32, 3), seed=5)
    assert asked


@pytest.mark.parametrize("kind,m,act_order", [("int4", 1, True), ("int4", 2, False), ("int4", 3, True),
                                              ("fp8", 1, False), ("fp8", 2, False)])
def test_linear_tail_ops_interpreted(kind, m, act_order, monkeypatch):
    """The public ops against their references: in the GEMV's launch (int4 up to 2 rows, fp8 1; an act-order perm
    gathers the quantized columns' input only), and as two calls past it (column views either way)."""
    tails, real = [], qt.quant_gemm
    monkeypatch.setattr(qt, "quant_gemm", lambda *a, **kw: tails.append(kw.get("tail")) or real(*a, **kw))
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, 256, generator=gen).to(torch.bfloat16).to(DEV)
    tail = torch.randn(48, 256, generator=gen).to(torch.bfloat16).to(DEV)
    if kind == "int4":
        qw, s, z = int4_weight(80, 256, 128, gen)
        args = dict(qweight=qw, scales=s, zeros=z, group_size=128,
                    perm=torch.randperm(256, generator=gen).to(DEV) if act_order else None)
        got, want = qt.int4_linear_tail(x=x, tail=tail, **args), ref.int4_linear_tail(x=x, tail=tail, **args)
        exact = x[:, args["perm"]] if act_order else x
        exact = exact.double() @ ref.dequant_int4(qweight=qw, scales=s, zeros=z, group_size=128, k=256).double().T
    else:
        w, s = fp8_weight(80, 256, 128, gen)
        args = dict(weight=w, scale=s, block_k=128)
        got, want = qt.fp8_linear_tail(x=x, tail=tail, **args), ref.fp8_linear_tail(x=x, tail=tail, **args)
        exact = x.double() @ ref.dequant_fp8(weight=w, scale=s, block_k=128).double().T
    assert [t.shape for t in got] == [(m, 80), (m, 48)]
    assert [t is tail for t in tails] == [m <= (2 if kind == "int4" else 1)]  # one launch, or the GEMM and torch's
    assert_error_within(got[0], want[0], exact, atol=1e-4)
    assert_error_within(got[1], want[1], x.double() @ tail.double().T, atol=1e-4)


def test_gemv_tail_refusals():
    x = torch.randn(1, 64).to(torch.bfloat16).to(DEV)
    qw, s, z = int4_weight(32, 64, 64, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="dense tail must be .*bfloat16"):
        qt.quant_gemm(x, qw, s, z, 64, unpack=4, tail=torch.randn(8, 64, device=DEV))
    with pytest.raises(ValueError, match="K = 64"):
        qt.quant_gemm(x, qw, s, z, 64, unpack=4, tail=torch.randn(8, 32, device=DEV).to(torch.bfloat16))
    with pytest.raises(ValueError, match="GEMV's launch only"):
        qt.quant_gemm(x, qw, s, z, 64, unpack=0, tail=torch.randn(8, 64, device=DEV).to(torch.bfloat16))


# ---- SiLU-and-mul in the GEMVs' activation copy (a dense MLP's down projection) ----

def check_silu_gate(kind: str, m: int, n: int, k: int, dtype: torch.dtype, fused: bool, tiles=None, unpack=None,
                    act_order=False, seed: int = 0):
    """quant_gemm on [gate | up] rows with silu_gate against the same call on silu_and_mul's output (the Triton
    kernel's, what the engine ran before), bit for bit, NaN-poisoned; and within check_gemm's tolerance of the
    exact product. fused: whether the activation copy computes it (else silu_and_mul runs first)."""
    from deltaserve.kernels.activation.triton import silu_and_mul
    gen = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(m, 2 * k, generator=gen).to(dtype).to(DEV)
    if kind == "int4":
        weight, s, zeros = int4_weight(n, k, 128, gen)
        w = ref.dequant_int4(qweight=weight, scales=s, zeros=zeros, group_size=128, k=k)
    else:
        (weight, s), zeros = fp8_weight(n, k, 128, gen), None
        w = ref.dequant_fp8(weight=weight, scale=s, block_k=128)
    perm = torch.randperm(k, generator=gen).to(DEV) if act_order else None
    act = silu_and_mul(x=gate_up)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEV)
    apart = []  # silu_and_mul's calls inside quant_gemm: none where the activation copy computes it
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(qt, "silu_and_mul", lambda **kw: apart.append(1) or silu_and_mul(**kw))
        got = qt.quant_gemm(gate_up, weight, s, zeros, 128, out=out, tiles=tiles, unpack=unpack, perm=perm,
                            silu_gate=True)
    assert bool(apart) != fused
    want = qt.quant_gemm(act, weight, s, zeros, 128, tiles=tiles, unpack=unpack, perm=perm)
    assert torch.equal(got, want)
    xin = act if perm is None else act[:, perm]
    baseline = torch.nn.functional.linear(xin, w.to(dtype))
    assert_error_within(got, baseline, xin.double() @ w.double().T, atol=1e-4 if dtype != torch.float32 else 1e-6)


@pytest.mark.parametrize("kind,m,dtype,tiles,unpack,act_order,fused", [
    ("int4", 1, torch.bfloat16, (1, 16, 32, 3), 4, False, True),  # plane_major_f16 with SILU, split-K
    ("int4", 2, torch.bfloat16, (2, 16, 32, 1), 4, True, True),  # and the act-order gather
    ("fp8", 1, torch.bfloat16, (1, 16, 32, 2), 4, False, True),  # act_f16 with SILU
    ("int4", 3, torch.float32, (4, 16, 32, 2), 4, False, False),  # fp32 GEMV: silu_and_mul first
    ("fp8", 20, torch.bfloat16, (16, 32, 32, 2), None, False, False)])  # tl.dot kernel: silu_and_mul first
def test_silu_gate_interpreted(kind, m, dtype, tiles, unpack, act_order, fused):
    """K 160 (ragged against 32-column tiles, as many columns of gate as of up)."""
    check_silu_gate(kind, m, 40, 160, dtype, fused, tiles=tiles, unpack=unpack, act_order=act_order, seed=m)


@pytest.mark.parametrize("kind", ["int4", "fp8"])
@pytest.mark.parametrize("m", [1, 300])
def test_silu_gate_ops_interpreted(kind, m):
    """The public ops against their references, at one row (the copy computes it) and past FUSED_MAX_ROWS
    (dequantize, then torch's GEMM on silu_and_mul's output)."""
    gen = torch.Generator().manual_seed(m)
    gate_up = torch.randn(m, 2 * 128, generator=gen).to(torch.bfloat16).to(DEV)
    if kind == "int4":
        qw, s, z = int4_weight(48, 128, 128, gen)
        args = dict(qweight=qw, scales=s, zeros=z, group_size=128)
        got, want = qt.int4_linear(x=gate_up, silu_gate=True, **args), ref.int4_linear(x=gate_up, silu_gate=True,
                                                                                        **args)
        w = ref.dequant_int4(k=128, **args)
    else:
        w8, s = fp8_weight(48, 128, 128, gen)
        args = dict(weight=w8, scale=s, block_k=128)
        got, want = qt.fp8_linear(x=gate_up, silu_gate=True, **args), ref.fp8_linear(x=gate_up, silu_gate=True,
                                                                                      **args)
        w = ref.dequant_fp8(**args)
    act = ref.silu_and_mul(x=gate_up)
    assert_error_within(got, want, act.double() @ w.double().T, atol=1e-4)


def test_silu_gate_refusals():
    x = torch.randn(1, 63).to(torch.bfloat16).to(DEV)
    qw, s, z = int4_weight(32, 64, 64, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="even width, got 63"):
        qt.quant_gemm(x, qw, s, z, 64, unpack=4, silu_gate=True)


def test_gemv_refuses_more_rows_than_it_tiles():
    x = torch.zeros(qt.GEMV_SWEEP_ROWS + 1, 64, dtype=torch.bfloat16, device=DEV)
    w, s = fp8_weight(16, 64, 32, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=f"at most {qt.GEMV_SWEEP_ROWS} rows, got {qt.GEMV_SWEEP_ROWS + 1}"):
        qt.quant_gemm(x, w, s, None, 32, unpack=4)


def test_gemv_refuses_fewer_tile_rows_than_rows():
    x = torch.zeros(3, 64, dtype=torch.bfloat16, device=DEV)
    w, s = fp8_weight(16, 64, 32, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="BM 2 must be at least M = 3"):
        qt.quant_gemm(x, w, s, None, 32, tiles=(2, 16, 32, 1), unpack=4)


@pytest.mark.parametrize("kind", ["int4", "fp8"])
def test_gemm_per_channel_ragged_k_interpreted(kind):
    """One scale per row over all of K (G = K), K not a multiple of the tile nor of 8."""
    check_gemm(kind, 5, 40, 100, 100, torch.bfloat16, tiles=(16, 16, 32, 2), seed=5)


@pytest.mark.parametrize("kind", ["int4", "fp8"])
@pytest.mark.parametrize("rows", [24, 64])  # 64: whole 64-row tiles, the unmasked loads (EVEN)
def test_dequantize_interpreted(kind, rows):
    gen = torch.Generator().manual_seed(9)
    if kind == "int4":
        qw, s, z = int4_weight(2 * rows, 96, 32, gen)
        qw, s, z = qw.view(2, rows, -1), s.view(2, rows, -1), z.view(2, rows, -1)
        want = ref.dequant_int4(qweight=qw, scales=s, zeros=z, group_size=32, k=96)
    else:
        w, s = fp8_weight(2 * rows, 96, 32, gen)
        w, s, z = w.view(2, rows, 96), s.view(2, rows, -1), None
        want = ref.dequant_fp8(weight=w, scale=s, block_k=32)
        qw = w
    got = qt.dequantize(qw, s, z, 32, 96, torch.float32)
    assert torch.equal(got.cpu(), want.cpu())


@pytest.mark.parametrize("kind", ["int4", "fp8"])
def test_moe_interpreted(kind):
    check_moe(kind, tokens=3, experts=4, top_k=2, d=64, inter=32, group=32, dtype=torch.bfloat16)


@pytest.mark.parametrize("kind", ["int4", "fp8"])
def test_moe_shared_folded_interpreted(kind, monkeypatch):
    """The shared expert run as one more pair per token; every token's first slot on expert 0 (its programs
    finish the token's sums as often as the others); gate/up and down tiles that do not divide the intermediate
    size (48 in halves of 32) or the hidden size (96 in 64); gate/up split over K."""
    monkeypatch.setitem(qt.MOE_TILES, kind, ((64, 4, 2), (64, 4)))  # gate/up: 6 K tiles of 16 in 3 ranges
    check_moe(kind, tokens=3, experts=4, top_k=2, d=96, inter=48, group=16, dtype=torch.bfloat16, shared=True,
              first_slot_expert=0)


def routed_rows_case(seed: int, tokens: int, d: int, experts: int) -> tuple[torch.Tensor, ...]:
    """x [tokens, d] bf16, top-2 ids over `experts` (token 1's first slot with no expert: id -1) and an order of
    the d columns per expert, as act-order experts gather their rows."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d, generator=gen).to(torch.bfloat16).to(DEV)
    ids = torch.randint(0, experts, (tokens, 2), generator=gen).to(DEV)
    ids[1, 0] = -1
    perm = torch.stack([torch.randperm(d, generator=gen) for _ in range(experts)]).to(torch.int32).to(DEV)
    return x, ids, perm


def test_pair_rows_interpreted():
    """Each routed pair's row in its expert's column order (a slot with no expert included), with and without the
    shared expert's own row per token, against the reference."""
    x, ids, perm = routed_rows_case(1, 5, 40, 3)
    for shared in (False, True):
        got = qt.pair_rows(x, ids, perm, shared)
        want = ref.pair_rows(x, ids, perm, shared)
        assert torch.equal(got.cpu(), want.cpu())


def test_pair_rows_reference_matches_the_direct_formula():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 8, generator=gen)
    ids = torch.tensor([[0, 2], [1, 0], [2, 1]])
    perm = torch.stack([torch.randperm(8, generator=gen) for _ in range(3)])
    rows = ref.pair_rows(x, ids, perm, shared_slot=True).view(3, 3, 8)
    for t in range(3):
        for j in range(2):
            assert torch.equal(rows[t, j], torch.tensor([x[t, c].item() for c in perm[ids[t, j]]]))
        assert torch.equal(rows[t, 2], x[t])


def test_act_order_moe_reference_matches_unpermuted_weights():
    """ref.int4_fused_moe with w13_perm equals the bf16 MoE reference on the weights put back in input order:
    stored column j of expert e multiplies x[perm[e, j]]."""
    from deltaserve.kernels.moe import ref as moe_ref
    gen = torch.Generator().manual_seed(3)
    e, d, inter, group = 3, 32, 16, 16
    (qw13, s13, z13), (qw2, s2, z2) = (tuple(t.cpu() for t in moe_weights("int4", n, k, group, gen, e))
                                       for n, k in ((2 * inter, d), (d, inter)))
    perm = torch.stack([torch.randperm(d, generator=gen) for _ in range(e)])
    x = torch.randn(4, d, generator=gen)
    w, ids = torch.rand(4, 2, generator=gen), torch.randint(0, e, (4, 2), generator=gen)
    got = ref.int4_fused_moe(x=x, w13_qweight=qw13, w13_scales=s13, w13_zeros=z13, w2_qweight=qw2, w2_scales=s2,
                             w2_zeros=z2, group_size=group, topk_weights=w, topk_ids=ids, w13_perm=perm)
    stored = ref.dequant_int4(qweight=qw13, scales=s13, zeros=z13, group_size=group, k=d)
    w13 = torch.zeros_like(stored)
    for ex in range(e):
        for j in range(d):
            w13[ex, :, perm[ex, j]] = stored[ex, :, j]
    w2 = ref.dequant_int4(qweight=qw2, scales=s2, zeros=z2, group_size=group, k=inter)
    want = moe_ref.fused_moe(x=x, w13=w13, w2=w2, topk_weights=w, topk_ids=ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["int4", "fp8"])
def test_moe_shared_output_interpreted(kind, monkeypatch):
    """A shared expert in another format (Qwen's GPTQ layout keeps it bf16) runs through its own layers and its
    output comes into the op, added with its gate in the fp32 sum (by the down kernel on the per-pair path), on each
    of the three paths."""
    check_moe(kind, tokens=3, experts=4, top_k=2, d=64, inter=32, group=32, dtype=torch.bfloat16, shared="out")
    monkeypatch.setattr(qt, "PAIR_GEMV_MAX", 4)
    check_moe(kind, tokens=9, experts=4, top_k=2, d=64, inter=32, group=32, dtype=torch.bfloat16, seed=3,
              shared="out")
    monkeypatch.setattr(qt, "PAIR_MAX", 8)
    check_moe(kind, tokens=9, experts=4, top_k=2, d=64, inter=32, group=32, dtype=torch.bfloat16, seed=4,
              shared="out", act_order=kind == "int4")


@pytest.mark.parametrize("kind", ["int4", "fp8"])
def test_moe_shared_dense_interpreted(kind, monkeypatch):
    """A bf16 shared expert beside int4 / fp8 experts (Qwen's GPTQ-Int4 layout) given to the op as its dense
    weights: one more pair per token in the per-pair kernels (tiles that do not divide the intermediate or hidden
    size, gate/up split over K), the dense MLP's path and an added output on the other two; act-order experts too."""
    monkeypatch.setitem(qt.MOE_TILES, kind, ((64, 4, 2), (64, 4)))  # gate/up: 6 K tiles of 16 in 3 ranges
    check_moe(kind, tokens=3, experts=4, top_k=2, d=96, inter=48, group=16, dtype=torch.bfloat16, shared="dense",
              first_slot_expert=0)
    check_moe(kind, tokens=2, experts=4, top_k=2, d=64, inter=32, group=32, dtype=torch.bfloat16, seed=2,
              shared="dense", act_order=kind == "int4")
    monkeypatch.setattr(qt, "PAIR_GEMV_MAX", 4)
    check_moe(kind, tokens=9, experts=4, top_k=2, d=64, inter=32, group=32, dtype=torch.bfloat16, seed=3,
              shared="dense")
    monkeypatch.setattr(qt, "PAIR_MAX", 8)
    check_moe(kind, tokens=9, experts=4, top_k=2, d=64, inter=32, group=32, dtype=torch.bfloat16, seed=4,
              shared="dense")


def test_moe_shared_dense_without_fp16_products_interpreted(monkeypatch):
    """The dense shared expert beside GEMVs that take fp32 activations: int4 with GEMV_F16 off (act-order rows by
    pair_rows, then the fp32 plane-major copy), and an fp32 model."""
    monkeypatch.setattr(qt, "GEMV_F16", False)
    check_moe("int4", tokens=2, experts=4, top_k=2, d=80, inter=40, group=16, dtype=torch.bfloat16, seed=5,
              shared="dense", act_order=True)
    monkeypatch.setattr(qt, "GEMV_F16", True)
    check_moe("int4", tokens=2, experts=4, top_k=2, d=80, inter=40, group=16, dtype=torch.float32, seed=6,
              shared="dense")


@pytest.mark.parametrize("bad", ["inter", "fp8", "strided"])
def test_moe_shared_dense_weights_of_the_wrong_kind_are_refused(bad):
    """A dense shared expert of another intermediate size, a bare fp8 tensor, or a transposed view: the kernels would
    read it wrong, so the op refuses it naming the tensor and what it takes, on every path and in the reference."""
    gen = torch.Generator().manual_seed(7)
    d, inter = 32, 16
    w13, w2 = moe_weights("int4", 2 * inter, d, 16, gen, 2), moe_weights("int4", d, inter, 16, gen, 2)
    sw13, sw2 = torch.randn(2 * inter, d), torch.randn(d, inter)
    if bad == "inter":
        sw13, sw2 = torch.randn(4 * inter, d), torch.randn(d, 2 * inter)
    elif bad == "fp8":
        sw13 = sw13.to(torch.float8_e4m3fn)
    else:
        sw13 = torch.randn(d, 2 * inter).t()
    args = dict(x=torch.randn(3, d), w13_qweight=w13[0], w13_scales=w13[1], w13_zeros=w13[2], w2_qweight=w2[0],
                w2_scales=w2[1], w2_zeros=w2[2], group_size=16, topk_weights=torch.ones(3, 1),
                topk_ids=torch.zeros(3, 1, dtype=torch.long), shared_w13=sw13, shared_w2=sw2,
                shared_gate=torch.zeros(3, 1))
    for fn in (ref.int4_fused_moe, qt.int4_fused_moe):
        with pytest.raises(ValueError, match=r"shared_w\d+: a dense shared expert's weight is \[.*unit column stride"):
            fn(**{k: v.to(DEV) if isinstance(v, torch.Tensor) else v for k, v in args.items()})


def test_plane_major_pairs_equal_the_gathered_rows_interpreted():
    """plane_major_f16's pairs mode (each routed pair's row in its expert's order, the shared slot as it is, a slot
    with no expert) writes the words and tile tails that plane_major_f16 writes for ref.pair_rows' rows."""
    x, ids, perm = routed_rows_case(8, 3, 200, 4)
    for shared in (False, True):
        for bk in (64, 128):
            got = qt.plane_major_f16(x, bk, perm, ids, shared)
            want = qt.plane_major_f16(ref.pair_rows(x, ids, perm, shared).contiguous(), bk)
            written = -(-200 // bk) * (bk // 2 + 2)  # the words, then (2^-n, sum) a tile; padding unwritten
            assert torch.equal(got[:, :written].cpu(), want[:, :written].cpu())


def test_moe_shared_dense_reference_is_the_bf16_expert():
    """ref.int4_fused_moe with dense shared weights adds sigmoid(gate) * SiLU-MLP(x) to the routed sum."""
    gen = torch.Generator().manual_seed(6)
    qw13, s13, z13 = (t.cpu() for t in moe_weights("int4", 32, 16, 16, gen, 2))
    qw2, s2, z2 = (t.cpu() for t in moe_weights("int4", 16, 16, 16, gen, 2))
    x, gate = torch.randn(3, 16, generator=gen), torch.randn(3, 1, generator=gen)
    sw13, sw2 = torch.randn(32, 16, generator=gen), torch.randn(16, 16, generator=gen)
    w, ids = torch.rand(3, 1, generator=gen), torch.randint(0, 2, (3, 1), generator=gen)
    args = dict(x=x, w13_qweight=qw13, w13_scales=s13, w13_zeros=z13, w2_qweight=qw2, w2_scales=s2, w2_zeros=z2,
                group_size=16, topk_weights=w, topk_ids=ids)
    h = x @ sw13.T
    mlp = (torch.nn.functional.silu(h[:, :16]) * h[:, 16:]) @ sw2.T
    want = ref.int4_fused_moe(**args) + torch.sigmoid(gate) * mlp
    got = ref.int4_fused_moe(**args, shared_w13=sw13, shared_w2=sw2, shared_gate=gate)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="both dense tensors or both tuples"):
        qt.int4_fused_moe(**args, shared_w13=sw13, shared_w2=(qw2[0], s2[0], z2[0]), shared_gate=gate)


def test_moe_shared_output_reference_adds_the_gated_output():
    gen = torch.Generator().manual_seed(5)
    qw13, s13, z13 = (t.cpu() for t in moe_weights("int4", 32, 16, 16, gen, 2))
    qw2, s2, z2 = (t.cpu() for t in moe_weights("int4", 16, 16, 16, gen, 2))
    x, out = torch.randn(3, 16, generator=gen), torch.randn(3, 16, generator=gen)
    gate = torch.randn(3, 1, generator=gen)
    w, ids = torch.rand(3, 1, generator=gen), torch.randint(0, 2, (3, 1), generator=gen)
    args = dict(x=x, w13_qweight=qw13, w13_scales=s13, w13_zeros=z13, w2_qweight=qw2, w2_scales=s2, w2_zeros=z2,
                group_size=16, topk_weights=w, topk_ids=ids)
    routed = ref.int4_fused_moe(**args)
    got = ref.int4_fused_moe(**args, shared_out=out, shared_gate=gate)
    torch.testing.assert_close(got, routed + torch.sigmoid(gate) * out, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="weights .* or as its output, not both"):
        ref.int4_fused_moe(**args, shared_out=out, shared_gate=gate, shared_w13=(qw13[0], s13[0], z13[0]),
                           shared_w2=(qw2[0], s2[0], z2[0]))


@pytest.mark.parametrize("shared", [False, True])
def test_moe_act_order_interpreted(shared, monkeypatch):
    """Act-order experts on each of the three paths: a GEMV per pair (each pair's row in its expert's order, the
    shared expert's row as it is), blocks of pairs past PAIR_GEMV_MAX, moe.blocked's kernels past PAIR_MAX."""
    check_moe("int4", tokens=3, experts=4, top_k=2, d=64, inter=32, group=32, dtype=torch.bfloat16, shared=shared,
              act_order=True)
    monkeypatch.setattr(qt, "PAIR_GEMV_MAX", 4)
    check_moe("int4", tokens=9, experts=4, top_k=2, d=64, inter=32, group=32, dtype=torch.bfloat16, seed=3,
              shared=shared, act_order=True)
    monkeypatch.setattr(qt, "PAIR_MAX", 8)
    check_moe("int4", tokens=9, experts=4, top_k=2, d=64, inter=32, group=32, dtype=torch.bfloat16, seed=4,
              shared=shared, act_order=True)


@pytest.mark.parametrize("kind", ["int4", "fp8"])
def test_moe_per_channel_interpreted(kind, monkeypatch):
    """Per-channel experts (GPTQ group_size -1, compressed-tensors FP8 per channel) as the loader stores them: one
    group of max(hidden, intermediate) columns, so one scale per row for gate|up (K = 64) and for down (K = 32); per
    routed pair, in blocks of pairs, and past PAIR_MAX in moe.blocked's kernels (tiles dequantized in the K loop)."""
    check_moe(kind, tokens=3, experts=4, top_k=2, d=64, inter=32, group=64, dtype=torch.bfloat16, shared=True)
    monkeypatch.setattr(qt, "PAIR_GEMV_MAX", 4)
    check_moe(kind, tokens=9, experts=4, top_k=2, d=64, inter=32, group=64, dtype=torch.bfloat16, seed=3, shared=True)
    monkeypatch.setattr(qt, "PAIR_MAX", 8)
    check_moe(kind, tokens=9, experts=4, top_k=2, d=64, inter=32, group=64, dtype=torch.bfloat16, seed=4, shared=True)


def moe_weights(kind, n, k, group, gen, experts=None):
    """(qweight, scales, zeros) int4 or (weight, scale) fp8 of `experts` stacked experts, or one matrix."""
    make = int4_weight if kind == "int4" else fp8_weight
    if experts is None:
        return make(n, k, group, gen)
    parts = [make(n, k, group, gen) for _ in range(experts)]
    return tuple(torch.stack(t) for t in zip(*parts))


def check_moe(kind, tokens, experts, top_k, d, inter, group, dtype, seed=0, shared=False, first_slot_expert=None,
              column_major=False, act_order=False):
    """shared: True (the shared expert's weights in the experts' format, run by the op), "dense" (its bf16 weights,
    run by the op) or "out" (its output, from its own layers, added by the op); act_order (int4): each expert reads
    its input in an order of its own."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d, generator=gen).to(dtype).to(DEV)
    if column_major:  # x.stride(-1) != 1: a transposed view, as a caller may hand it
        x = x.t().contiguous().t()
    logits = torch.randn(tokens, experts, generator=gen)
    if first_slot_expert is not None:
        logits[:, first_slot_expert] = 1e3
    w, ids = logits.softmax(-1).topk(top_k, dim=-1)
    ids[0, -1] = -1  # a routing slot with no expert (another rank's)
    w, ids = (w / w.sum(-1, keepdim=True)).to(DEV), ids.to(DEV)
    w13, w2 = moe_weights(kind, 2 * inter, d, group, gen, experts), moe_weights(kind, d, inter, group, gen, experts)
    if kind == "int4":
        args = dict(w13_qweight=w13[0], w13_scales=w13[1], w13_zeros=w13[2], w2_qweight=w2[0], w2_scales=w2[1],
                    w2_zeros=w2[2], group_size=group)
        if act_order:
            args["w13_perm"] = torch.stack([torch.randperm(d, generator=gen) for _ in range(experts)]).to(
                torch.int32).to(DEV)
        fn_ref, fn = ref.int4_fused_moe, qt.int4_fused_moe
    else:
        args = dict(w13=w13[0], w13_scale=w13[1], w2=w2[0], w2_scale=w2[1], block_k=group)
        fn_ref, fn = ref.fp8_fused_moe, qt.fp8_fused_moe
    if shared == "out":
        args.update(shared_out=torch.randn(tokens, d, generator=gen).to(dtype).to(DEV),
                    shared_gate=torch.randn(tokens, 1, generator=gen).to(dtype).to(DEV))
    elif shared == "dense":
        args.update(shared_w13=(0.1 * torch.randn(2 * inter, d, generator=gen)).to(dtype).to(DEV),
                    shared_w2=(0.1 * torch.randn(d, inter, generator=gen)).to(dtype).to(DEV),
                    shared_gate=torch.randn(tokens, 1, generator=gen).to(dtype).to(DEV))
    elif shared:
        args.update(shared_w13=moe_weights(kind, 2 * inter, d, group, gen),
                    shared_w2=moe_weights(kind, d, inter, group, gen),
                    shared_gate=torch.randn(tokens, 1, generator=gen).to(dtype).to(DEV))
    baseline = fn_ref(x=x, topk_weights=w, topk_ids=ids, **args)
    if DEV != "cpu":  # NaN where the output will be allocated: every element must be written
        torch.full((tokens * d * 64,), float("nan"), device=DEV)
    got = fn(x=x, topk_weights=w, topk_ids=ids, **args)
    assert torch.isfinite(got).all()
    # the reference is fp32 math with dtype-rounded weights: the kernel may differ by fp32 ordering and the final
    # rounding only
    err = (got.double().cpu() - baseline.double().cpu()).abs().max().item()
    scale = baseline.double().abs().max().item()
    assert err <= 1.6e-2 * scale + 1e-4, f"max error {err:.3g} (scale {scale:.3g})"
    assert torch.equal(fn(x=x, topk_weights=w, topk_ids=ids, **args), got)  # deterministic; counters back to 0


# ---- compiled, at the models' real shapes ----------------------------------------------------------------------

# (N, K) of the quantized projections: 27B (H 5120), 35B-A3B (H 2048), 122B-A10B (H 3072), plus odd sizes.
SHAPES_27B = [(16384, 5120), (5120, 6144), (34816, 5120), (5120, 17408), (12288, 5120)]
SHAPES_35B = [(12288, 2048), (2048, 4096), (8192, 2048), (1024, 2048), (2048, 512)]
SHAPES_122B = [(2048, 3072), (3072, 1024), (3072, 8192)]
ODD = [(136, 384), (4104, 2048 + 128), (520, 1152), (520, 1000)]


@gpu
@needs_cuda
@pytest.mark.parametrize("kind", ["int4", "fp8"])
@pytest.mark.parametrize("m", [1, 2, 3, 7, 24, 64, 300])
@pytest.mark.parametrize("n,k", SHAPES_27B + SHAPES_35B + SHAPES_122B + ODD)
def test_gemm_gpu(kind, m, n, k):
    check_gemm(kind, m, n, k, 128, torch.bfloat16, seed=n + k + m)


@gpu
@needs_cuda
@pytest.mark.parametrize("n,k", SHAPES_27B + SHAPES_35B + ODD)
def test_gemv_fp8_f16_gpu(gemv_fp8_f16, n, k):
    """The fp8 GEMV with fp16 products at the real shapes (ODD's 1000 columns take the fp32 GEMV)."""
    check_gemm("fp8", 1, n, k, 128, torch.bfloat16, seed=n + k, unpack=4)
    assert bool(gemv_fp8_f16) == (k % 16 == 0)


@gpu
@needs_cuda
@pytest.mark.parametrize("kind", ["int4", "fp8"])
@pytest.mark.parametrize("m", [3, 24])
@pytest.mark.parametrize("n,k", SHAPES_27B[:1] + ODD)
def test_gemm_scale_after_dot_gpu(kind, m, n, k):
    """UNPACK 3 (scale after the dot; a benchmark variant since UNPACK 0 beat it) stays correct."""
    check_gemm(kind, m, n, k, 128, torch.bfloat16, seed=n + k + m, unpack=3)


@gpu
@needs_cuda
@pytest.mark.parametrize("m", [1, 24])
@pytest.mark.parametrize("unpack", [None, 3])
@pytest.mark.parametrize("n,k", [(16384, 5120), (2048, 4096)] + ODD)
def test_gemm_fp16_gpu(m, unpack, n, k):
    """fp16 activations: the default kernels, and UNPACK 3's other magic number (1024.0) and packed subtract."""
    check_gemm("int4", m, n, k, 128, torch.float16, seed=n + k + m, unpack=unpack)


@gpu
@needs_cuda
@pytest.mark.parametrize("kind", ["int4", "fp8"])
@pytest.mark.parametrize("m", [1, 300, 2048])
def test_linear_dispatch_gpu(kind, m):
    """The public ops (fused kernel up to FUSED_MAX_ROWS rows, dequantize + GEMM past it) against the references."""
    from deltaserve.kernels.quant import fp8_linear, int4_linear
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, 5120, generator=gen).to(torch.bfloat16).to(DEV)
    if kind == "int4":
        qw, s, z = int4_weight(6144, 5120, 128, gen)
        got = int4_linear(x=x, qweight=qw, scales=s, zeros=z, group_size=128)
        want = ref.int4_linear(x=x, qweight=qw, scales=s, zeros=z, group_size=128)
    else:
        w, s = fp8_weight(6144, 5120, 128, gen)
        got = fp8_linear(x=x, weight=w, scale=s, block_k=128)
        want = ref.fp8_linear(x=x, weight=w, scale=s, block_k=128)
    err = (got.float() - want.float()).abs().max().item()
    assert err <= 2e-2 * want.float().abs().max().item()


@gpu
@needs_cuda
@pytest.mark.parametrize("kind", ["int4", "fp8"])
@pytest.mark.parametrize("tokens", [1, 64, 300])
def test_moe_per_channel_gpu(kind, tokens):
    """Per-channel experts at 35B-A3B's shape: one group of 2048 columns covers gate|up's K (2048) and down's (512)."""
    check_moe(kind, tokens, 256, 8, 2048, 512, 2048, torch.bfloat16, seed=tokens, shared=True)


@gpu
@needs_cuda
@pytest.mark.parametrize("kind", ["int4", "fp8"])
@pytest.mark.parametrize("tokens", [1, 64, 300])
@pytest.mark.parametrize("shape", [(256, 8, 2048, 512), (256, 8, 3072, 1024)], ids=["35B-A3B", "122B-A10B"])
@pytest.mark.parametrize("shared", [False, True], ids=["routed", "shared"])
def test_moe_gpu(kind, tokens, shape, shared):
    experts, top_k, d, inter = shape
    check_moe(kind, tokens, experts, top_k, d, inter, 128, torch.bfloat16, seed=tokens, shared=shared,
              first_slot_expert=3 if tokens == 64 else None)


@gpu
@needs_cuda
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("n,k", SHAPES_27B + ODD)
def test_gemv_f16_gpu(gemv_f16, n, k, m):
    """The F16_FMA GEMV at 27B's projections and odd sizes, NaN-poisoned output."""
    check_gemm("int4", m, n, k, 128, torch.bfloat16, seed=n + k + m, unpack=4)


@gpu
@needs_cuda
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("n,k", SHAPES_27B[2:4] + ODD[:2])
def test_act_order_gemv_gpu(n, k, m):
    check_act_order_linear(m, n, k, seed=n + k + m)


@gpu
@needs_cuda
@pytest.mark.parametrize("kind", ["int4", "fp8"])
@pytest.mark.parametrize("n,k", SHAPES_27B[:4] + ODD)
def test_gemv_pipeline_gpu(gemv_pipeline, kind, n, k):
    """The GEMV's other pipelines at 27B's projections and odd sizes, NaN-poisoned output."""
    check_gemm(kind, 1, n, k, 128, torch.bfloat16, seed=n + k, unpack=4)


@gpu
@needs_cuda
@pytest.mark.parametrize("kind", ["int4", "fp8"])
@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("n,n_tail,k", [(16384, 96, 5120), (12288, 64, 2048), (136, 40, 384), (4104, 72, 2176)],
                         ids=["27B-in_proj", "35B-A3B-in_proj", "odd", "odd-ragged"])
def test_gemv_tail_gpu(kind, m, n, n_tail, k):
    """The GDN in_proj's b|a rows in the quantized qkv|z GEMV's launch at 27B's and 35B-A3B's shapes and odd sizes,
    the plan's tiles and split, NaN-poisoned output."""
    check_tail(kind, m, n, n_tail, k, torch.bfloat16, seed=n + k + m)


@gpu
@needs_cuda
@pytest.mark.parametrize("kind", ["int4", "fp8"])
@pytest.mark.parametrize("m", [1, 2, 24])
@pytest.mark.parametrize("n,k", [(5120, 17408), (4096, 12288), (136, 384), (520, 1000)])
def test_silu_gate_gpu(kind, m, n, k):
    """The down projection of 27B's and 9B's MLP and odd sizes on [gate | up] rows, bit for bit the call on
    silu_and_mul's output, NaN-poisoned."""
    fused = m <= (2 if kind == "int4" else 1) and (kind == "int4" or k % 16 == 0)  # fp8's words: 16-byte rows
    check_silu_gate(kind, m, n, k, torch.bfloat16, fused, seed=n + k + m, act_order=kind == "int4" and m == 2)


@gpu
@needs_cuda
@pytest.mark.parametrize("x_scale", [1e5, 1e-7])
def test_gemv_f16_activation_range_gpu(gemv_f16, x_scale):
    check_gemm("int4", 1, 5120, 17408, 128, torch.bfloat16, seed=3, unpack=4, x_scale=x_scale)


@gpu
@needs_cuda
@pytest.mark.parametrize("order", ["gptq", "awq"])
@pytest.mark.parametrize("n,k", [(5120, 17408), (520, 1152)])
def test_gemv_f16_loader_orders_gpu(gemv_f16, order, n, k):
    check_loader_order(order, n, k, 128)


def moe_f16_gpu(test):
    """The fp16-product MoE GPU tests' cases: 1 and 8 tokens on the 35B-A3B and 122B-A10B expert shapes."""
    for mark in (gpu, needs_cuda, pytest.mark.parametrize("tokens", [1, 8]),
                 pytest.mark.parametrize("shape", [(256, 8, 2048, 512), (256, 8, 3072, 1024)],
                                         ids=["35B-A3B", "122B-A10B"])):
        test = mark(test)
    return test


@moe_f16_gpu
def test_moe_f16_gpu(gemv_f16, tokens, shape):
    experts, top_k, d, inter = shape
    check_moe("int4", tokens, experts, top_k, d, inter, 128, torch.bfloat16, seed=tokens)


@moe_f16_gpu
def test_moe_fp8_f16_gpu(gemv_fp8_f16, tokens, shape):
    experts, top_k, d, inter = shape
    check_moe("fp8", tokens, experts, top_k, d, inter, 128, torch.bfloat16, seed=tokens, shared=True)
    assert gemv_fp8_f16


@gpu
@needs_cuda
@pytest.mark.parametrize("kind", ["int4", "fp8"])
def test_moe_prefill_gpu(kind):
    """A prefill-sized call at 35B-A3B's shape (16,800 routed pairs: moe.blocked's 128-row tiles), shared expert
    included, against the reference."""
    check_moe(kind, 2100, 256, 8, 2048, 512, 128, torch.bfloat16, seed=5, shared=True)


@gpu
@needs_cuda
@pytest.mark.parametrize("kind", ["int4", "fp8"])
@pytest.mark.parametrize("tokens", [1, 8, 300, 2100])
@pytest.mark.parametrize("shared", ["out", "dense"])
def test_moe_shared_output_gpu(kind, tokens, shared):
    """The shared expert's output added by the op, or its bf16 weights run by it (Qwen's GPTQ layout), 35B-A3B's
    shape, every path, NaN-poisoned output; the per-pair path with act-order experts too."""
    check_moe(kind, tokens, 256, 8, 2048, 512, 128, torch.bfloat16, seed=tokens, shared=shared,
              act_order=kind == "int4" and shared == "dense" and tokens == 1)


@gpu
@needs_cuda
@pytest.mark.parametrize("tokens", [1, 8, 64, 300, 2100])
def test_moe_act_order_gpu(tokens):
    """Act-order int4 experts at 35B-A3B's shape on every path (per pair, blocks of pairs, moe.blocked past
    PAIR_MAX), shared expert included, NaN-poisoned output."""
    check_moe("int4", tokens, 256, 8, 2048, 512, 128, torch.bfloat16, seed=tokens, shared=True, act_order=True)


@pytest.mark.parametrize("kind", ["int4", "fp8"])
def test_moe_grouped_blocks_interpreted(kind, monkeypatch):
    """Past PAIR_GEMV_MAX pairs: blocks of pairs routed to one expert share each weight tile (the shared expert
    through quant_gemm); past PAIR_MAX, moe.blocked's kernels dequantize each weight tile in their K loop."""
    monkeypatch.setattr(qt, "PAIR_GEMV_MAX", 4)
    check_moe(kind, tokens=9, experts=4, top_k=2, d=64, inter=32, group=32, dtype=torch.bfloat16, seed=3, shared=True)
    # ragged: no whole 64-row tiles (the masked loads), K of the down projection not a multiple of the group
    check_moe(kind, tokens=9, experts=4, top_k=2, d=96, inter=40, group=32, dtype=torch.bfloat16, seed=5)
    monkeypatch.setattr(qt, "PAIR_MAX", 8)
    check_moe(kind, tokens=9, experts=4, top_k=2, d=64, inter=32, group=32, dtype=torch.bfloat16, seed=4, shared=True)


@pytest.mark.parametrize("kind", ["int4", "fp8"])
def test_moe_blocked_split_quantized_interpreted(kind, monkeypatch):
    """moe.blocked's half-height blocks (SPLIT) on dequantized weight tiles: 32-row blocks split from 32 rows on (the
    GPU's rule starts at 128); 30 tokens x top-2 over 3 experts give experts a full block and a short last one."""
    from deltaserve.kernels.moe import blocked

    monkeypatch.setattr(qt, "PAIR_MAX", 8)
    monkeypatch.setattr(blocked, "SPLIT_MIN_M", 32)
    monkeypatch.setattr(blocked, "TILES", [(None, 32, (16, 32, 1, 1), (16, 32, 1, 1))])
    check_moe(kind, tokens=30, experts=3, top_k=2, d=64, inter=32, group=32, dtype=torch.bfloat16, seed=5,
              shared=True)


@pytest.mark.parametrize("kind", ["int4", "fp8"])
def test_moe_prefill_column_major_x_interpreted(kind, monkeypatch):
    """Past PAIR_MAX with x a transposed view (stride(-1) != 1): the shared expert's quant_gemm reads x by its row
    stride only, so x must reach it with unit column stride, as the routed experts' kernels get it."""
    monkeypatch.setattr(qt, "PAIR_MAX", 8)
    check_moe(kind, tokens=9, experts=4, top_k=2, d=64, inter=32, group=32, dtype=torch.bfloat16, seed=6, shared=True,
              column_major=True)


# ---- dynamic FP8 activations (W8A8) ------------------------------------------------------------------------------

def test_quantize_fp8_act_zero_rows():
    xq, sx = ref.quantize_fp8_act(torch.zeros(0, 300))
    assert xq.shape == (0, 300) and sx.shape == (0, 3)


def test_quantize_fp8_act_matches_the_direct_formula():
    """Per row and 128 columns: scale = amax / 448, code = x / scale rounded to e4m3; a zero group stays zero."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 300, generator=gen) * torch.tensor([1.0, 1e-3, 50.0]).unsqueeze(-1)
    x[1, 128:256] = 0
    xq, sx = ref.quantize_fp8_act(x)
    assert xq.dtype == torch.float8_e4m3fn and sx.shape == (3, 3)
    for r in range(3):
        for g in range(3):
            cols = slice(128 * g, min(128 * (g + 1), 300))
            amax = x[r, cols].abs().max().item()
            assert sx[r, g].item() == pytest.approx(amax / 448, rel=1e-6)
            if amax == 0:
                assert xq[r, cols].float().abs().max() == 0
                continue
            want = (x[r, cols] / sx[r, g]).to(torch.float8_e4m3fn)
            assert torch.equal(xq[r, cols].float(), want.float())
    back = ref.dequant_fp8_act(xq, sx)
    assert ((back - x).abs() <= x.abs() * 2**-4 + sx.repeat_interleave(128, -1)[:, :300] * 2**-9).all()


@pytest.mark.parametrize("m,tiles", [(3, (16, 32, 128, 2)), (40, (32, 16, 128, 1))])
def test_w8a8_gemm_interpreted(m, tiles):
    check_w8a8(m, 72, 300, 128, tiles, seed=m)


def check_w8a8(m: int, n: int, k: int, block: int, tiles=None, seed: int = 0, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype).to(DEV)
    w, s = fp8_weight(n, k, block, gen)
    xq, sx = ref.quantize_fp8_act(x)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEV)
    got = qt.quant_gemm(x, w, s, None, block, out=out, tiles=tiles, act_fp8=True)  # quantizes x as it loads it
    baseline = ref.fp8_linear(x=x, weight=w, scale=s, block_k=block, act_fp8=True)
    expected = ref.dequant_fp8_act(xq, sx).double() @ ref.dequant_fp8(weight=w, scale=s, block_k=block).double().T
    assert got is out
    assert_error_within(got, baseline, expected, atol=1e-4)


def test_w8a8_is_close_to_bf16_activations():
    """What quantizing the activations costs on one GEMM: a few percent of the output scale, not more."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(8, 512, generator=gen)
    w, s = fp8_weight(64, 512, 128, gen, device="cpu")
    w, s = w.cpu(), s.cpu()
    a16 = ref.fp8_linear(x=x, weight=w, scale=s, block_k=128)
    a8 = ref.fp8_linear(x=x, weight=w, scale=s, block_k=128, act_fp8=True)
    rel = ((a8 - a16).norm() / a16.norm()).item()
    assert 1e-4 < rel < 0.05, rel


@gpu
@needs_cuda
@pytest.mark.parametrize("m", [1, 7, 64, 300])
@pytest.mark.parametrize("n,k", [(34816, 5120), (5120, 17408), (12288, 2048)] + ODD)
def test_w8a8_gemm_gpu(m, n, k):
    from deltaserve.kernels.quant import fp8_linear
    check_w8a8(m, n, k, 128, seed=n + k + m)
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16).to(DEV)
    w, s = fp8_weight(n, k, 128, gen)
    got = fp8_linear(x=x, weight=w, scale=s, block_k=128, act_fp8=True)
    want = ref.fp8_linear(x=x, weight=w, scale=s, block_k=128, act_fp8=True)
    assert (got.float() - want.float()).abs().max() <= 2e-2 * want.float().abs().max()


@gpu
@needs_cuda
def test_w8a8_captures_in_a_cuda_graph():
    """The activation quantizer and the W8A8 GEMM launch no host sync, so decode steps capture them."""
    from deltaserve.kernels.quant import fp8_linear
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 2048, generator=gen).to(torch.bfloat16).to(DEV)
    w, s = fp8_weight(1024, 2048, 128, gen)
    eager = fp8_linear(x=x, weight=w, scale=s, block_k=128, act_fp8=True)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fp8_linear(x=x, weight=w, scale=s, block_k=128, act_fp8=True)  # warm-up (compile) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fp8_linear(x=x, weight=w, scale=s, block_k=128, act_fp8=True)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


@gpu
@needs_cuda
@pytest.mark.parametrize("kind", ["int4", "fp8"])
@pytest.mark.parametrize("m", [1, 8])
def test_split_captures_in_a_cuda_graph(kind, m, monkeypatch):
    """A split-K call (N 5120, K 4096: the plan splits K 3 to 11 ways) captured in a CUDA graph replays bitwise equal
    to the eager call over replays with new inputs, and leaves every counter at 0; a capture that finds no scratch
    (no eager call of its size before it) adds the partials with torch inside the graph instead."""
    from deltaserve.kernels.linear import triton as linear_triton
    gen = torch.Generator().manual_seed(m)
    if kind == "int4":
        w, s, z = int4_weight(5120, 4096, 128, gen)
    else:
        (w, s), z = fp8_weight(5120, 4096, 128, gen), None
    xs = [torch.randn(m, 4096, generator=gen).to(torch.bfloat16).to(DEV) for _ in range(3)]
    x = xs[0].clone()
    qt.quant_gemm(x, w, s, z, 128)  # warm-up: compiles, allocates the scratch
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = qt.quant_gemm(x, w, s, z, 128)
    for xi in xs:
        x.copy_(xi)
        graph.replay()
        assert torch.equal(y, qt.quant_gemm(xi, w, s, z, 128))
    assert not linear_triton._split_buffers[str(x.device)][1].any()
    monkeypatch.setattr(linear_triton, "_split_buffers", {})
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = qt.quant_gemm(x, w, s, z, 128)
    graph.replay()
    torch.testing.assert_close(y, qt.quant_gemm(x, w, s, z, 128))
