"""The decode linear kernel against a float64 product and torch's GEMM (the reference).

Without a GPU the kernel runs under TRITON_INTERPRET=1 at small shapes with small tiles (several programs, several K
steps, a ragged K tail); `pytest -m gpu` runs it compiled at the models' decode shapes and at every tile
benchmarks/bench_linear.py sweeps (the tiles tile_config picks among them). The kernel's error against the float64
product may be at most twice that of torch's own GEMM in the same dtype (tests/tolerances.py).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' import (read at @triton.jit time)

triton = pytest.importorskip("triton")

from tests.tolerances import assert_error_within  # noqa: E402

from benchmarks.bench_linear import SWEEP_TILES  # noqa: E402
from deltaserve.kernels.linear import linear  # noqa: E402
from deltaserve.kernels.linear import ref as linear_ref  # noqa: E402
from deltaserve.kernels.linear import gpu as linear_gpu  # noqa: E402
from deltaserve.kernels.linear import triton as linear_triton  # noqa: E402

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


def test_wrapper_takes_leading_dims_and_strided_rows(monkeypatch):
    """[B, T, K] inputs and rows with a stride (a column slice) give the reference's result, same shape. The tile
    is forced: at this size tile_config would hand the call to torch, and the wrapper's kernel path is under test."""
    monkeypatch.setattr(linear_triton, "tile_config", lambda *args, **kwargs: (16, 32, 4, 2))
    gen = torch.Generator().manual_seed(0)
    wide = torch.randn(2, 3, 80, generator=gen).bfloat16()
    x = wide[..., :64]
    w = (torch.randn(24, 64, generator=gen) * 0.125).bfloat16()
    y = linear_gpu.linear(x=x, weight=w)
    assert y.shape == (2, 3, 24)
    truth = x.double() @ w.double().T
    assert_error_within(y, linear_ref.linear(x=x.float(), weight=w.float()).bfloat16(), truth)


def test_many_rows_and_fp32_fall_back_to_torch():
    assert linear_triton.tile_config(linear_triton.MAX_ROWS + 1, 1 << 17, 64) is None
    assert linear_triton.tile_config(32, 4096, 4096) is None  # cuBLAS is as fast there
    assert linear_triton.tile_config(1, 4096, 4096, num_sms=132)[0] == 32  # 128 programs of 32 columns, not 64 of 64
    assert linear_triton.tile_config(1, 2048, 4096, num_sms=132) is None  # too few programs to fill the SMs
    assert linear_triton.tile_config(1, 257, 2048, num_sms=132) is None  # a router
    assert linear_triton.tile_config(1, 12352, 2048, num_sms=132) is None  # K too short to fill the pipeline
    assert linear_triton.tile_config(1, 248320, 2048, num_sms=132) is not None  # unless the output is vocab-sized
    x = torch.randn(3, 16)
    w = torch.randn(8, 16)
    assert torch.equal(linear_gpu.linear(x=x, weight=w), torch.nn.functional.linear(x, w))


def test_dispatch_runs_the_reference_on_cpu():
    assert linear.reference is linear_ref.linear
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    assert torch.equal(linear(x=x, weight=w), torch.nn.functional.linear(x, w))


# 9B and 27B decode projections: (in, out)
MODEL_SHAPES = [(4096, 12352), (4096, 4096), (4096, 10240), (4096, 24576), (12288, 4096), (5120, 16480),
                (6144, 5120), (17408, 5120), (4096, 248320)]


@gpu
@needs_cuda
@pytest.mark.parametrize("in_features,out_features", MODEL_SHAPES)
@pytest.mark.parametrize("rows", [1, 7, 64])
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
