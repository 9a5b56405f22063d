"""The router projection with its top-k softmax in one launch (kernels/moe/router.py): against ref.router_topk, and
bit for bit against the two launches it replaces (the linear with the same tile, then the top-k kernel), since an
eager step and a graph replay may take either. Without a GPU under TRITON_INTERPRET=1 on small shapes; `pytest -m
gpu` at the Qwen3.5 routers' shapes."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' import (read at @triton.jit time)

triton = pytest.importorskip("triton")

from tests.tolerances import assert_close  # noqa: E402

from deltaserve.kernels.linear import triton as linear_triton  # noqa: E402
from deltaserve.kernels.linear.gpu import pick_tile  # noqa: E402
from deltaserve.kernels.moe import gpu as moe_gpu  # noqa: E402
from deltaserve.kernels.moe import ref, router  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _interpreter_like_the_gpu(interpreter_rounds_like_the_gpu):
    yield


def router_case(tokens, dim, rows, seed, device):
    """x [tokens, dim] and a router weight of `rows` outputs (experts + the shared expert's gate + padding)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, dim, generator=gen).bfloat16().to(device)
    weight = (torch.randn(rows, dim, generator=gen) * dim ** -0.5 * 4).bfloat16().to(device)
    return x, weight


def check_fused(tokens, dim, rows, experts, top_k, tile, device, seed):
    x, weight = router_case(tokens, dim, rows, seed, device)
    ws, counts = linear_triton._scratch(torch.device(device), 1, 1)
    ws.fill_(float("nan"))  # the kernel must read only the partials it wrote
    kw = dict(num_experts=experts, top_k=top_k, dtype=torch.bfloat16)
    logits, weights, ids = router.router_topk_fused(x=x, weight=weight, tile=tile, **kw)
    assert logits.shape == (tokens, rows) and weights.shape == ids.shape == (tokens, top_k)
    # the two launches with the same tile: the same bits
    apart = linear_triton.skinny_linear(x, weight, tile)
    w_apart, ids_apart = moe_gpu.moe_topk_softmax(router_logits=apart[:, :experts], top_k=top_k, dtype=torch.bfloat16)
    assert torch.equal(logits, apart) and torch.equal(ids, ids_apart) and torch.equal(weights, w_apart)
    # and the reference within tolerance, its picks those of the kernel's own logits (ties may pick either expert)
    ref_logits, _, _ = ref.router_topk(x=x.cpu(), weight=weight.cpu(), **kw)
    assert_close(logits, ref_logits)
    want_w, want_ids = ref.moe_topk_softmax(router_logits=logits[:, :experts].cpu(), top_k=top_k,
                                            dtype=torch.bfloat16)
    probs = torch.softmax(logits[:, :experts].cpu().double(), -1)
    torch.testing.assert_close(probs.gather(1, ids.cpu()), probs.gather(1, want_ids), rtol=0, atol=0)
    assert_close(weights.cpu(), want_w)
    assert not counts[:triton.cdiv(rows, tile[0]) + 1].any()  # reset for the next call and every graph replay


@pytest.mark.parametrize("tile", [(16, 256, 4, 3, 3), (16, 64, 4, 2, 1)], ids=["split-k", "one-range"])
def test_router_topk_interpreter(tile):
    """K split in three uneven ranges (600 = 256 + 256 + 88) or streamed whole; 20 outputs for 17 experts."""
    check_fused(2, 600, 20, 17, 4, tile, "cpu", seed=0)


def test_router_topk_dispatch_runs_apart_past_max_rows():
    """More rows than router.MAX_ROWS (or a shape the linear leaves to torch): the projection, then the top-k
    kernel; the same contract."""
    x, weight = router_case(router.MAX_ROWS + 1, 64, 12, 1, "cpu")
    logits, weights, ids = moe_gpu.router_topk(x=x, weight=weight, num_experts=10, top_k=2, dtype=torch.bfloat16)
    want_logits, want_w, want_ids = ref.router_topk(x=x, weight=weight, num_experts=10, top_k=2, dtype=torch.bfloat16)
    assert torch.equal(logits, want_logits) and torch.equal(ids, want_ids)
    assert_close(weights, want_w)


ROUTERS = [(2048, 264, 256, 8), (3072, 264, 256, 8), (4096, 520, 512, 10)]  # 35B-A3B, 122B-A10B, 397B-A17B


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tokens", [1, 2])
@pytest.mark.parametrize("shape", ROUTERS, ids=["35B-A3B", "122B-A10B", "397B-A17B"])
def test_router_topk_gpu(tokens, shape):
    """The tile the linear takes on this card, and a one-range tile; then the dispatch at 1-3 rows."""
    dim, rows, experts, top_k = shape
    tile = pick_tile(torch.empty(tokens, dim, dtype=torch.bfloat16, device="cuda"),
                     torch.empty(rows, dim, dtype=torch.bfloat16, device="cuda"))
    assert tile is not None
    for t in (tile, (32, 256, 4, 3, 1)):
        check_fused(tokens, dim, rows, experts, top_k, t, "cuda", seed=tokens)
    for n in (1, 2, 3):
        x, weight = router_case(n, dim, rows, n, "cuda")
        logits, weights, ids = moe_gpu.router_topk(x=x, weight=weight, num_experts=experts, top_k=top_k,
                                                   dtype=torch.bfloat16)
        apart = moe_gpu.moe_topk_softmax(router_logits=logits[:, :experts], top_k=top_k, dtype=torch.bfloat16)
        assert torch.equal(weights, apart[0]) and torch.equal(ids, apart[1])
