"""The skinny linear with the layer's input RMSNorm folded into its prologue (kernels/linear, rms_norm_linear)
against the unfused reference (norm, then linear: ref.rms_norm_linear).

Under TRITON_INTERPRET=1 (no GPU) at small shapes with small tiles: several programs, split and unsplit K, a
ragged K tail, odd N, 1 to 16 rows, with and without a residual, and a prologue of one or several column steps.
`pytest -m gpu` runs it compiled at the in-projections of 9B, 27B and 35B-A3B. Outputs, the written residual
stream and the split-K workspace start NaN-poisoned (an element left unwritten fails). The output's error against
the float64 product of the float64-normed input may be at most twice that of the unfused reference in the same
dtype (tests/tolerances.py); the residual stream must equal x + residual bit for bit.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' import (read at @triton.jit time)

triton = pytest.importorskip("triton")

from tests.tolerances import assert_error_within  # noqa: E402

from deltaserve.kernels.linear import gpu as linear_gpu  # noqa: E402
from deltaserve.kernels.linear import ref as linear_ref  # noqa: E402
from deltaserve.kernels.linear import triton as linear_triton  # noqa: E402
from deltaserve.kernels.linear.triton import NormPrologue  # noqa: E402

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
EPS = 1e-6


@pytest.fixture(autouse=True, scope="module")
def _interpreter_like_the_gpu(interpreter_rounds_like_the_gpu):
    yield


def make_inputs(rows, in_features, out_features, residual, dtype, device, seed):
    """Layer-like inputs: h and the residual stream of unit scale, a near-zero (1 + w) norm weight."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, in_features, generator=gen).to(dtype).to(device)
    r = torch.randn(rows, in_features, generator=gen).to(dtype).to(device) if residual else None
    g = (torch.randn(in_features, generator=gen) * 0.1).to(dtype).to(device)
    w = (torch.randn(out_features, in_features, generator=gen) * in_features ** -0.5).to(dtype).to(device)
    return h, r, g, w


def truth_and_baseline(h, r, g, w):
    """(float64 linear of the float64-normed input, the unfused reference's output)."""
    s = h if r is None else h + r  # summed in the activation dtype, as the model does
    s64 = s.double().cpu()
    normed = s64 * torch.rsqrt(s64.pow(2).mean(-1, keepdim=True) + EPS) * (1 + g.double().cpu())
    truth = normed @ w.double().cpu().T
    out = torch.empty_like(h) if r is not None else None
    baseline = linear_ref.rms_norm_linear(x=h.cpu(), weight=w.cpu(), norm_weight=g.cpu(), eps=EPS,
                                          residual=None if r is None else r.cpu(),
                                          residual_out=None if out is None else out.cpu())
    return truth, baseline


def run_fused(h, r, g, w, tile):
    """The fused kernel into NaN-poisoned outputs -> (y, the residual stream it wrote or None)."""
    y = torch.full((h.shape[0], w.shape[0]), float("nan"), dtype=h.dtype, device=h.device)
    stream = torch.full_like(h, float("nan")) if r is not None else None
    linear_triton.skinny_linear(h, w, tile, out=y, norm=NormPrologue(g, EPS, r, stream))
    return y, stream


def check_fused(rows, in_features, out_features, residual, tile, device, seed, dtype=torch.bfloat16):
    h, r, g, w = make_inputs(rows, in_features, out_features, residual, dtype, device, seed)
    y, stream = run_fused(h, r, g, w, tile)
    truth, baseline = truth_and_baseline(h, r, g, w)
    assert_error_within(y, baseline, truth)
    if r is not None:
        assert torch.equal(stream, h + r), "the residual stream differs from x + residual"
    return h, r, g, w, y


# (rows, in, out, residual): one row, odd rows, a full 16-row tile; K a multiple of the tile and K with a tail
SMALL = [(1, 100, 40, True), (3, 96, 72, False), (7, 72, 33, True), (16, 128, 24, True)]


@pytest.mark.parametrize("rows,in_features,out_features,residual", SMALL)
def test_norm_linear_interpreted(rows, in_features, out_features, residual):
    check_fused(rows, in_features, out_features, residual, (16, 32, 4, 2), "cpu", seed=rows)


def test_norm_linear_fp16_interpreted():
    check_fused(5, 64, 24, True, (16, 32, 4, 2), "cpu", seed=5, dtype=torch.float16)


# (rows, in, out, split): 2-4 K ranges, the last one short where K is not a multiple of the range
SMALL_SPLIT = [(1, 200, 40, 2), (5, 150, 33, 3), (16, 256, 72, 4)]


@pytest.mark.parametrize("rows,in_features,out_features,split", SMALL_SPLIT)
def test_norm_linear_split_interpreted(rows, in_features, out_features, split, monkeypatch):
    """Split K, with a prologue of several column steps (a small element budget), twice over a NaN workspace:
    counters back to 0, results bitwise equal."""
    monkeypatch.setattr(linear_triton, "NORM_PROLOGUE_ELEMS", 64)
    check_split_twice(rows, in_features, out_features, (16, 32, 4, 2, split), "cpu", seed=rows)


def check_split_twice(rows, in_features, out_features, tile, device, seed):
    h, r, g, w = make_inputs(rows, in_features, out_features, True, torch.bfloat16, device, seed)
    linear_triton.skinny_linear(h[:1], w, tile)  # allocates the device's scratch
    ws, counts = linear_triton._split_buffers[str(h.device)]
    ws.fill_(float("nan"))
    (y1, s1), (y2, s2) = run_fused(h, r, g, w, tile), run_fused(h, r, g, w, tile)
    assert not counts.any()
    assert torch.equal(y1, y2) and torch.equal(s1, s2)
    assert torch.equal(s1, h + r)
    truth, baseline = truth_and_baseline(h, r, g, w)
    assert_error_within(y1, baseline, truth)


def test_wrapper_takes_leading_dims_and_falls_back_unfused(monkeypatch):
    """gpu.rms_norm_linear: [B, T, K] inputs through the fused kernel (tile forced: tile_config gives none at this
    size), and with no tile the norm then the linear, unfused; both within the policy of the reference."""
    h, r, g, w = make_inputs(6, 64, 24, True, torch.bfloat16, "cpu", seed=3)
    truth, baseline = truth_and_baseline(h, r, g, w)
    for tile in [(16, 32, 4, 2), None]:
        monkeypatch.setattr(linear_gpu, "norm_fold_tile", lambda *args, tile=tile: tile)
        stream = torch.full((2, 3, 64), float("nan"), dtype=torch.bfloat16)
        y = linear_gpu.rms_norm_linear(x=h.view(2, 3, 64), weight=w, norm_weight=g, eps=EPS,
                                       residual=r.view(2, 3, 64), residual_out=stream)
        assert y.shape == (2, 3, 24)
        assert_error_within(y.view(6, 24), baseline, truth)
        assert torch.equal(stream.view(6, 64), h + r)


def test_fold_tile_rule():
    """Up to 16 rows: tile_config's tile, or the wide K = 2048 tile where it leaves the call to torch; never more
    rows, nor fp32 / misaligned inputs."""
    assert linear_triton.norm_fold_tile(1, 12352, 4096) == linear_triton.tile_config(1, 12352, 4096)
    assert linear_triton.norm_fold_tile(1, 12352, 2048) == linear_triton.FOLD_WIDE_TILE  # 35B-A3B GDN in_proj
    assert linear_triton.norm_fold_tile(16, 9216, 2048) == linear_triton.FOLD_WIDE_TILE  # 35B-A3B qkv_proj
    assert linear_triton.norm_fold_tile(17, 12352, 4096) is None
    assert linear_triton.norm_fold_tile(1, 4096, 1024) is None  # no tile: the norm runs alone
    x = torch.randn(1, 4096)
    assert linear_gpu.fold_tile(x, torch.randn(12352, 4096)) is None  # fp32
    assert linear_gpu.fold_tile(x[:, :4092].bfloat16(), torch.randn(12352, 4092).bfloat16()) is None  # K % 8
    assert linear_triton.parse_tile("64,128,4,6") == (64, 128, 4, 6, 1)


# ------------------------------------------------------------------------------------------------------ GPU tier

# in-projections (K, N): 9B GDN in_proj, qkv_proj; 27B GDN in_proj, qkv_proj; 35B-A3B GDN in_proj, qkv_proj
IN_PROJ_SHAPES = [(4096, 12352), (4096, 10240), (5120, 16480), (5120, 14336), (2048, 12352), (2048, 9216)]


@gpu
@needs_cuda
@pytest.mark.parametrize("in_features,out_features", IN_PROJ_SHAPES)
@pytest.mark.parametrize("rows", [1, 4, 16])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "first-layer"])
def test_norm_linear_gpu_in_proj_shapes(in_features, out_features, rows, residual):
    tile = linear_triton.norm_fold_tile(rows, out_features, in_features, linear_gpu.num_sms(torch.device("cuda")))
    assert tile is not None
    check_fused(rows, in_features, out_features, residual, tile, "cuda", seed=rows)


@gpu
@needs_cuda
@pytest.mark.parametrize("tile", [(64, 128, 4, 6), (64, 128, 4, 4), (32, 128, 4, 6), (64, 256, 4, 4),
                                  (128, 128, 8, 4)])
def test_norm_linear_gpu_wide_tiles(tile):
    """Tiles a --fold-wide-tile sweep may pick for 35B-A3B, at its GDN in_proj."""
    check_fused(4, 2048, 12352, True, tile, "cuda", seed=tile[0])


@gpu
@needs_cuda
@pytest.mark.parametrize("rows", [1, 16])
def test_norm_linear_gpu_split(rows):
    check_split_twice(rows, 4096, 2048, linear_triton.tile_config(rows, 2048, 4096, 132), "cuda", seed=rows)


@gpu
@needs_cuda
def test_norm_linear_cuda_graph():
    """Captured, the fused call replays bitwise equal to the eager one over new inputs (output and residual)."""
    h, r, g, w = make_inputs(1, 2048, 12352, True, torch.bfloat16, "cuda", seed=1)
    inputs = [make_inputs(1, 2048, 12352, True, torch.bfloat16, "cuda", seed=s)[:2] for s in range(2, 5)]
    stream = torch.empty_like(h)

    def call():
        return linear_gpu.rms_norm_linear(x=h, weight=w, norm_weight=g, eps=EPS, residual=r, residual_out=stream)

    call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = call()
    for hi, ri in inputs:
        h.copy_(hi)
        r.copy_(ri)
        graph.replay()
        want_stream = torch.empty_like(h)
        want = linear_gpu.rms_norm_linear(x=hi, weight=w, norm_weight=g, eps=EPS, residual=ri,
                                          residual_out=want_stream)
        assert torch.equal(y, want) and torch.equal(stream, want_stream)
