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


@pytest.mark.parametrize("experts", [254, 255])  # E + 2 and E + 1 a power of two: the padding bin's edge cases
def test_sort_rows_int32_and_strided_ids(experts):
    ids = torch.randint(-1, experts, (24, 16), generator=torch.Generator().manual_seed(experts))
    ids = ids.to(torch.int32)[:, ::2]  # int32, rows 16 apart
    got, want = sort.sort_rows(ids, experts, 16), sort.sort_rows_reference(ids, experts, 16)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_sort_rows_ids_outside_the_experts():
    """Ids below -1 are no expert's, like -1; ids of E or more sort past bounds[E] (a bug upstream, but never a
    read out of range). The rows outside [bounds[0], bounds[E]) come in pair order, the reference's by value."""
    ids = torch.tensor([[3, -2], [0, 9], [-1, 4], [7, 0]])
    order, bounds, pos, starts = sort.sort_rows(ids, 5, 2)
    ref_order, *ref_rest = sort.sort_rows_reference(ids.clamp(-1, 5), 5, 2)
    assert bounds.tolist() == [2, 4, 4, 4, 5, 6] and all(torch.equal(g, w) for g, w in zip((bounds, pos, starts),
                                                                                          ref_rest))
    assert order.tolist() == [1, 4, 2, 7, 0, 5, 3, 6]


def test_sort_rows_falls_back_past_one_program(monkeypatch):
    """Past SORT_PROGRAM_MAX pairs torch's chain runs (test_moe_midbatch: past EXPERTS_MAX experts too)."""
    ids = torch.randint(0, 8, (sort.SORT_PROGRAM_MAX // 8 + 1, 8))
    monkeypatch.setattr(sort, "_sort_rows_kernel", None)  # the kernel would fail: not launched
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
