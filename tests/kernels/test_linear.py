"""The decode linear kernel against a float64 product and torch's GEMM (the reference).

Without a GPU the kernel runs under TRITON_INTERPRET=1 at small shapes with small tiles (several programs, several K
steps, a ragged K tail); `pytest -m gpu` runs it compiled at the models' decode shapes and at every tile
benchmarks/bench_linear.py sweeps (the tiles tile_config picks among them). The kernel's error against the float64
product may be at most twice that of torch's own GEMM in the same dtype (tests/tolerances.py). Split-K calls also
run with NaN-poisoned outputs and workspace, twice (the second call proves the counters came back to 0, and equal
results that the reduction is deterministic), and on the GPU inside a CUDA graph.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' import (read at @triton.jit time)

triton = pytest.importorskip("triton")

from tests.tolerances import assert_error_within  # noqa: E402

from benchmarks.bench_linear import SPLIT_TILES, SWEEP_TILES  # noqa: E402
from deltaserve.kernels.linear import linear  # noqa: E402
from deltaserve.kernels.linear import ref as linear_ref  # noqa: E402
from deltaserve.kernels.linear import gpu as linear_gpu  # noqa: E402
from deltaserve.kernels.linear import triton as linear_triton  # noqa: E402
from deltaserve.kernels.linear.tuned import _MISSING, TUNED_TILES, tuned_tile  # noqa: E402

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True, scope="module")
def _interpreter_like_the_gpu(interpreter_rounds_like_the_gpu):
    yield


def check_linear(fn, rows, in_features, out_features, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=gen).to(dtype).to(device)
    w = (torch.randn(out_features, in_features, generator=gen) * in_features ** -0.5).to(dtype).to(device)
    y = fn(x, w)
    assert y.dtype == dtype and y.shape == (rows, out_features)
    truth = x.double() @ w.double().T
    baseline = linear_ref.linear(x=x.cpu().float(), weight=w.cpu().float()).to(dtype)  # torch, rounded once
    assert_error_within(y, baseline, truth)


# (rows, in, out): one row (a GEMV), odd row counts, 64 rows; K a multiple of the tile, and K with a tail
SMALL = [(1, 64, 40), (3, 96, 72), (17, 128, 33), (64, 80, 48)]


@pytest.mark.parametrize("rows,in_features,out_features", SMALL)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_skinny_linear_interpreted(rows, in_features, out_features, dtype):
    def fn(x, w):
        return linear_triton.skinny_linear(x, w, (16, 32, 4, 2))

    check_linear(fn, rows, in_features, out_features, dtype, "cpu", seed=rows + in_features)


def check_split(rows, in_features, out_features, tile, device, seed):
    """NaN in the output and the workspace, two calls: both within tolerance, bitwise equal, counters back to 0."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=gen).bfloat16().to(device)
    w = (torch.randn(out_features, in_features, generator=gen) * in_features ** -0.5).bfloat16().to(device)
    linear_triton.skinny_linear(x[:1], w, tile)  # allocates the device's scratch
    ws, counts = linear_triton._split_buffers[str(x.device)]
    ws.fill_(float("nan"))
    ys = [linear_triton.skinny_linear(x, w, tile, out=torch.full((rows, out_features), float("nan"),
                                                                 dtype=torch.bfloat16, device=device))
          for _ in range(2)]
    assert not counts.any()
    assert torch.equal(ys[0], ys[1])
    truth = x.double() @ w.double().T
    assert_error_within(ys[0], linear_ref.linear(x=x.cpu().float(), weight=w.cpu().float()).bfloat16(), truth)


# (rows, in, out, split): one row, an odd row count, a full 16-row tile; odd N; K with a tail; 2-4 K ranges (the
# last one short where K is not a multiple of the range)
SMALL_SPLIT = [(1, 200, 40, 2), (3, 150, 33, 3), (16, 256, 72, 4)]


@pytest.mark.parametrize("rows,in_features,out_features,split", SMALL_SPLIT)
def test_skinny_linear_split_interpreted(rows, in_features, out_features, split):
    check_split(rows, in_features, out_features, (16, 32, 4, 2, split), "cpu", seed=rows)


def test_wrapper_takes_leading_dims_and_strided_rows(monkeypatch):
    """[B, T, K] inputs and rows with a stride (a column slice) give the reference's result, same shape. The tile
    is forced: at this size tile_config would hand the call to torch, and the wrapper's kernel path is under test."""
    monkeypatch.setattr(linear_gpu, "tile_config", lambda *args, **kwargs: (16, 32, 4, 2))  # gpu.py's name
    skinny_calls = []
    kernel = linear_gpu.skinny_linear
    monkeypatch.setattr(linear_gpu, "skinny_linear", lambda *a, **k: (skinny_calls.append(a[2]), kernel(*a, **k))[1])
    gen = torch.Generator().manual_seed(0)
    wide = torch.randn(2, 3, 80, generator=gen).bfloat16()
    x = wide[..., :64]
    w = (torch.randn(24, 64, generator=gen) * 0.125).bfloat16()
    y = linear_gpu.linear(x=x, weight=w)
    assert y.shape == (2, 3, 24) and skinny_calls == [(16, 32, 4, 2)]  # the kernel ran (not torch's GEMM)
    truth = x.double() @ w.double().T
    assert_error_within(y, linear_ref.linear(x=x.float(), weight=w.float()).bfloat16(), truth)


def test_many_rows_and_fp32_fall_back_to_torch():
    assert linear_triton.tile_config(linear_triton.MAX_ROWS + 1, 1 << 17, 64) is None
    assert linear_triton.tile_config(32, 4096, 4096) is None  # cuBLAS is as fast there
    assert linear_triton.tile_config(1, 24576, 4096, num_sms=132) == (64, 256, 4, 4, 1)  # wide: no split
    # narrow outputs split K to about two programs per SM: 64 column blocks x 4, 128 x 2, a router's 17 x 2 (each
    # program at least 32 KB of weight)
    assert linear_triton.tile_config(1, 2048, 4096, num_sms=132) == (32, 256, 4, 4, 4)
    assert linear_triton.tile_config(16, 4096, 4096, num_sms=132) == (32, 256, 4, 4, 2)
    assert linear_triton.tile_config(1, 264, 2048, num_sms=132) == (16, 256, 4, 4, 2)
    assert linear_triton.tile_config(17, 2048, 4096, num_sms=132) is None
    assert linear_triton.tile_config(1, 2048, 1024, num_sms=132) is None
    assert linear_triton.tile_config(1, 12352, 2048, num_sms=132) is None  # K too short to fill the pipeline
    assert linear_triton.tile_config(1, 248320, 2048, num_sms=132) is not None  # unless the output is vocab-sized
    x = torch.randn(3, 16)
    w = torch.randn(8, 16)
    assert torch.equal(linear_gpu.linear(x=x, weight=w), torch.nn.functional.linear(x, w))


def test_tuned_tiles_are_looked_up_by_card_and_exact_shape():
    assert tuned_tile("NVIDIA H200", 1, 2048, 4096) == (64, 256, 4, 4, 4)
    assert tuned_tile("NVIDIA H200", 1, 5120, 6144) is None  # measured: torch's GEMM
    assert tuned_tile("NVIDIA H200", 2, 2048, 4096) is _MISSING  # only one-row calls were swept
    assert tuned_tile("NVIDIA H100 80GB HBM3", 1, 2048, 4096) is _MISSING  # another card: the rule


def test_dispatch_runs_the_reference_on_cpu():
    assert linear.reference is linear_ref.linear
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    assert torch.equal(linear(x=x, weight=w), torch.nn.functional.linear(x, w))


# 9B and 27B decode projections: (in, out)
MODEL_SHAPES = [(4096, 12352), (4096, 4096), (4096, 10240), (4096, 24576), (12288, 4096), (5120, 16480),
                (6144, 5120), (17408, 5120), (4096, 248320)]
# narrow outputs that split K: 35B-A3B out_proj / o_proj and router; 9B out_proj, MLP down; 27B out_proj, MLP down
SPLIT_SHAPES = [(4096, 2048), (2048, 264), (4096, 4096), (12288, 4096), (6144, 5120), (17408, 5120)]


@gpu
@needs_cuda
@pytest.mark.parametrize("in_features,out_features", MODEL_SHAPES + SPLIT_SHAPES[:2])
@pytest.mark.parametrize("rows", [1, 7, 16, 64])
def test_linear_gpu_model_shapes(in_features, out_features, rows):
    check_linear(lambda x, w: linear(x=x, weight=w), rows, in_features, out_features, torch.bfloat16, "cuda",
                 seed=rows)


@gpu
@needs_cuda
@pytest.mark.parametrize("tile", SWEEP_TILES)
@pytest.mark.parametrize("rows", [1, 33])
def test_skinny_linear_gpu_tiles(tile, rows):
    check_linear(lambda x, w: linear_triton.skinny_linear(x, w, tile), rows, 4096, 4104, torch.bfloat16, "cuda",
                 seed=tile[0] + rows)


@gpu
@needs_cuda
@pytest.mark.parametrize("key,tile", [(key, tile) for table in TUNED_TILES.values() for key, tile in table.items()
                                      if tile is not None])
def test_tuned_tiles_gpu(key, tile):
    """Every tile of the per-card tables at its own shape, on whatever GPU runs the tests."""
    rows, out_features, in_features = key
    if tile.split > 1:
        check_split(rows, in_features, out_features, tile, "cuda", seed=rows)
    else:
        check_linear(lambda x, w: linear_triton.skinny_linear(x, w, tile), rows, in_features, out_features,
                     torch.bfloat16, "cuda", seed=out_features)


@gpu
@needs_cuda
@pytest.mark.parametrize("in_features,out_features", SPLIT_SHAPES)
@pytest.mark.parametrize("rows", [1, 8, 16])
def test_split_linear_gpu(in_features, out_features, rows):
    tile = linear_triton.tile_config(rows, out_features, in_features, linear_gpu.num_sms(torch.device("cuda")))
    assert tile is not None and tile.split > 1
    check_split(rows, in_features, out_features, tile, "cuda", seed=rows)


@gpu
@needs_cuda
@pytest.mark.parametrize("tile", SPLIT_TILES)
def test_split_linear_gpu_tiles(tile):
    check_split(16, 4096, 2056, tile, "cuda", seed=tile[0] + tile[-1])


@gpu
@needs_cuda
def test_split_linear_cuda_graph(monkeypatch):
    """A captured split-K call replays bitwise equal to the eager one, over replays with new inputs; a capture that
    finds no scratch (no eager call before it) runs torch's GEMM in the graph instead."""
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(2048, 4096, generator=gen) * 4096 ** -0.5).bfloat16().cuda()
    xs = [torch.randn(1, 4096, generator=gen).bfloat16().cuda() for _ in range(3)]
    x = xs[0].clone()
    linear(x=x, weight=w)  # warm-up: compiles, allocates the scratch
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = linear(x=x, weight=w)
    for xi in xs:
        x.copy_(xi)
        graph.replay()
        assert torch.equal(y, linear(x=xi, weight=w))
    monkeypatch.setattr(linear_triton, "_split_buffers", {})
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = linear(x=x, weight=w)
    graph.replay()
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w))
