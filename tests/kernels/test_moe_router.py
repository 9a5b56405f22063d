"""The router projection with its top-k softmax in one launch (kernels/moe/router.py) against ref.router_topk.
Without a GPU under TRITON_INTERPRET=1 on small shapes; `pytest -m gpu` at the Qwen3.5-35B-A3B router's shape."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' import (read at @triton.jit time)

triton = pytest.importorskip("triton")

from tests.tolerances import assert_close  # noqa: E402

from deltaserve.kernels.linear import triton as linear_triton  # noqa: E402
from deltaserve.kernels.moe import gpu as moe_gpu  # noqa: E402
from deltaserve.kernels.moe import ref, router  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _interpreter_like_the_gpu(interpreter_rounds_like_the_gpu):
    yield


def check_router(tokens, dim, rows, experts, top_k, device, seed, fn=router.router_topk):
    """rows: the projection's outputs (experts + the shared expert's gate + padding)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, dim, generator=gen).bfloat16().to(device)
    weight = (torch.randn(rows, dim, generator=gen) * dim ** -0.5 * 4).bfloat16().to(device)
    ws, counts = linear_triton._scratch(torch.device(device), 1, 1)
    ws.fill_(float("nan"))  # the kernel must read only the partials it wrote
    logits, weights, ids = fn(x=x, weight=weight, num_experts=experts, top_k=top_k, dtype=torch.bfloat16)
    ref_logits, _, _ = ref.router_topk(x=x.cpu(), weight=weight.cpu(), num_experts=experts, top_k=top_k,
                                       dtype=torch.bfloat16)
    assert logits.shape == (tokens, rows) and weights.shape == ids.shape == (tokens, top_k)
    assert_close(logits, ref_logits)
    # the picks are the reference's routing of the kernel's own logits (ties may pick either expert)
    want_w, want_ids = ref.moe_topk_softmax(router_logits=logits[:, :experts].cpu(), top_k=top_k,
                                            dtype=torch.bfloat16)
    probs = torch.softmax(logits[:, :experts].cpu().double(), -1)
    torch.testing.assert_close(probs.gather(1, ids.cpu()), probs.gather(1, want_ids), rtol=0, atol=0)
    # the weights are exp(l - l_max) over the picks' sum, not softmax then renormalised: equal up to fp32 rounding
    assert_close(weights.cpu(), want_w)
    assert int(counts[0]) == 0  # reset for the next call and every graph replay


def test_router_topk_interpreter():
    """K split in three uneven ranges (600 = 256 + 256 + 88), 20 outputs for 17 experts."""
    check_router(3, 600, 20, 17, 4, "cpu", seed=0)


def test_router_topk_past_max_rows_runs_apart():
    """More rows than router.MAX_ROWS: the projection, then the top-k kernel; same contract."""
    check_router(router.MAX_ROWS + 1, 64, 12, 10, 2, "cpu", seed=1, fn=moe_gpu.router_topk)


A3B_ROUTER = (2048, 264, 256, 8)  # Qwen3.5-35B-A3B: 256 experts + the shared expert's gate, padded to 264 rows


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tokens", [1, 2, 3, 16])
def test_router_topk_gpu(tokens):
    """The dispatch (one launch up to router.MAX_ROWS), and the kernel itself at every size."""
    dim, rows, experts, top_k = A3B_ROUTER
    for fn in (moe_gpu.router_topk, router.router_topk):
        check_router(tokens, dim, rows, experts, top_k, "cuda", seed=tokens, fn=fn)
        check_router(tokens, 3000, 520, 512, 10, "cuda", seed=tokens, fn=fn)  # odd K, 512 experts
