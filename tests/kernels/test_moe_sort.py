"""The routing sort (kernels/moe/sort.py): the one-program Triton sort against torch's chain (its reference), bit
for bit, for every routing pattern (ids < 0, experts with no pairs, all pairs to one expert), pair counts from one
to sort.SORT_PROGRAM_MAX, with and without the block starts. Without a GPU under TRITON_INTERPRET=1."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' import (read at @triton.jit time)

triton = pytest.importorskip("triton")

from tests.kernels.test_moe_grouped import ROUTINGS, routing  # noqa: E402

from deltaserve.kernels.moe import sort  # noqa: E402

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def check_sort(tokens: int, experts: int, top_k: int, kind: str, block_m: int, device: str) -> None:
    _, ids = routing(tokens, experts, top_k, kind, torch.Generator().manual_seed(tokens + block_m))
    ids = ids.to(device)
    got = sort.sort_rows(ids, experts, block_m)
    want = sort.sort_rows_reference(ids, experts, block_m)
    for name, g, w in zip(("order", "bounds", "pos", "starts"), got, want):
        if w is None:
            assert g is None, name
            continue
        assert g.dtype == w.dtype and g.shape == w.shape and torch.equal(g, w), name


@pytest.mark.parametrize("kind", ROUTINGS)
@pytest.mark.parametrize("tokens,experts,top_k,block_m", [(1, 12, 3, 0), (37, 12, 3, 16), (16, 256, 8, 0)])
def test_sort_rows_matches_reference(tokens, experts, top_k, kind, block_m):
    check_sort(tokens, experts, top_k, kind, block_m, "cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("tokens,kind,block_m", [(300, "dropped", 128), (512, "gaps", 16)])
def test_sort_rows_matches_reference_to_one_program_max(tokens, kind, block_m):
    """Up to SORT_PROGRAM_MAX pairs (512 tokens at top-8: 5 s a case under the interpreter)."""
    check_sort(tokens, 256, 8, kind, block_m, "cuda" if torch.cuda.is_available() else "cpu")


def test_sort_rows_falls_back_past_one_program():
    """Past SORT_PROGRAM_MAX pairs torch's chain runs (test_moe_midbatch: past EXPERTS_MAX experts too)."""
    ids = torch.randint(0, 8, (sort.SORT_PROGRAM_MAX // 8 + 1, 8))
    assert all(torch.equal(g, w) for g, w in zip(sort.sort_rows(ids, 8, 16), sort.sort_rows_reference(ids, 8, 16)))


def test_sort_rows_reference_by_hand():
    ids = torch.tensor([[2, 0], [2, -1], [1, 2], [2, 2]])
    order, bounds, pos, starts = sort.sort_rows_reference(ids, 4, 2)
    assert order.tolist() == [3, 1, 4, 0, 2, 5, 6, 7]  # the id < 0, expert 0, 1, then expert 2's pairs in order
    assert bounds.tolist() == [1, 2, 3, 8, 8] and starts.tolist() == [0, 1, 2, 5, 5]
    assert torch.equal(pos.reshape(-1), torch.arange(8))


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("kind", ROUTINGS)
@pytest.mark.parametrize("tokens,block_m", [(1, 0), (16, 0), (64, 0), (129, 128), (256, 128), (512, 16)])
def test_sort_rows_gpu(tokens, block_m, kind):
    """35B-A3B's routing (256 experts, top-8) at decode, MTP-verify and short-chunk sizes."""
    check_sort(tokens, 256, 8, kind, block_m, "cuda")
