"""The grouped-GEMM MoE path (kernels/moe/grouped.py) and its glue: the expert sort (offsets, inverse permutation),
silu_and_mul on the gate|up GEMM's [rows, 2I] output, the gather-sum combine (moe_combine) with the shared expert.

Without a GPU the Triton kernels run under TRITON_INTERPRET=1 and ref.grouped_mm stands in for torch._grouped_mm
(which has no CPU kernel); `pytest -m gpu` runs the real path at a 35B-A3B-like shape against ref.fused_moe."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' import (read at @triton.jit time)

triton = pytest.importorskip("triton")

from tests.tolerances import assert_close  # noqa: E402

from deltaserve.kernels.moe import grouped, ref  # noqa: E402
from deltaserve.kernels.moe import triton as moe  # noqa: E402

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ROUTINGS = ["dropped", "gaps", "one", "none"]


@pytest.fixture(autouse=True, scope="module")
def _interpreter_like_the_gpu(interpreter_rounds_like_the_gpu):
    yield


def routing(tokens, experts, top_k, kind, gen, device="cpu"):
    """(weights fp32 [T, k], ids [T, k]). dropped: some slots < 0 (experts on another rank); gaps: only odd experts
    get tokens (expert 0, the first group, and every other one empty); one: every token's first slot to the last
    expert, the other slots < 0; none: every slot < 0."""
    logits = torch.randn(tokens, experts, generator=gen)
    if kind == "gaps":
        logits[:, ::2] = -1e4
    weights, ids = ref.moe_topk_softmax(router_logits=logits, top_k=top_k)
    if kind == "dropped":
        ids[::3, -1] = -1
        ids[1::4, 0] = -1
    elif kind == "one":
        ids[:, 0] = experts - 1
        ids[:, 1:] = -1
    elif kind == "none":
        ids[:] = -1
    return weights.to(device), ids.to(device)


@pytest.mark.parametrize("kind", ROUTINGS)
def test_sort_pairs(kind):
    gen = torch.Generator().manual_seed(1)
    experts, top_k = 12, 3
    _, ids = routing(37, experts, top_k, kind, gen)
    token_of_row, offs, pos = grouped.sort_pairs(ids, experts)
    assert offs.dtype == torch.int32 and offs.shape == (experts,) and pos.shape == ids.shape
    # each group's size is its expert's count; the ids < 0 sort first, into expert 0's group
    counts = torch.stack([(ids == e).sum() for e in range(experts)]) + torch.eye(experts)[0].long() * (ids < 0).sum()
    assert torch.equal(torch.diff(offs.long(), prepend=torch.zeros(1, dtype=torch.long)), counts)
    assert offs[-1] == ids.numel()
    # pos is the inverse permutation: the sorted row of pair (t, j) holds token t, in the group of ids[t, j]
    assert torch.equal(torch.sort(pos.reshape(-1)).values, torch.arange(ids.numel()))
    assert torch.equal(token_of_row[pos], torch.arange(37)[:, None].expand(37, top_k))
    expert_of_row = torch.searchsorted(offs.long(), torch.arange(ids.numel()), right=True)
    assert torch.equal(expert_of_row[pos][ids >= 0], ids[ids >= 0])



def test_sort_pairs_radix_sized():
    """Past 4,096 pairs torch sorts by radix (the int16 keys): the groups keep their rows in token order, as the
    stable int64 sort of the ids gives them, with 512 experts (397B-A17B's count) and dropped pairs."""
    gen = torch.Generator().manual_seed(2)
    experts, tokens, top_k = 512, 1100, 8
    ids = torch.randint(experts, (tokens, top_k), generator=gen)
    ids[::7, 3] = -1
    token_of_row, offs, pos = grouped.sort_pairs(ids, experts)
    order = torch.sort(ids.reshape(-1), stable=True).indices
    assert torch.equal(token_of_row, order // top_k)
    assert torch.equal(offs.long(), torch.searchsorted(ids.reshape(-1)[order], torch.arange(experts), right=True))
    with pytest.raises(ValueError, match="int16"):
        grouped.sort_pairs(ids, 40000)

def combine_case(tokens, dim, top_k, kind, dtype, shared, device, seed, extra_rows=5):
    """moe_combine's inputs: y with the pairs' rows in a random order plus NaN rows that no valid pair reads (slots
    with ids < 0 point at them), and the shared gate as a column view of a wider router output, as the layer has it."""
    gen = torch.Generator().manual_seed(seed)
    weights, ids = routing(tokens, 12, top_k, kind, gen)
    pairs = tokens * top_k
    y = torch.randn(pairs + extra_rows, dim, generator=gen)
    y[pairs:] = float("nan")
    pos = torch.randperm(pairs, generator=gen).view(tokens, top_k)
    pos = torch.where(ids >= 0, pos, pairs + torch.randint(extra_rows, ids.shape, generator=gen))
    kw = {"y": y.to(dtype), "pos": pos, "topk_weights": weights.to(dtype), "topk_ids": ids}
    if shared:
        router = torch.randn(tokens, 13, generator=gen).to(dtype)
        kw.update(shared=torch.randn(tokens, dim, generator=gen).to(dtype), shared_gate=router[:, 12:])
    return {k: v.to(device) for k, v in kw.items()}


def combine_truth(kw):
    """float64, one pair at a time."""
    ids, pos, w = kw["topk_ids"].cpu(), kw["pos"].cpu(), kw["topk_weights"].cpu().double()
    y = kw["y"].cpu().double()
    out = torch.zeros(ids.shape[0], y.shape[1], dtype=torch.float64)
    for t in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            if ids[t, j] >= 0:
                out[t] += w[t, j] * y[pos[t, j]]
    if "shared" in kw:
        out += torch.sigmoid(kw["shared_gate"].cpu().double()) * kw["shared"].cpu().double()
    return out


@pytest.mark.parametrize("kind", ROUTINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [40, 1100])  # one column block, masked; two blocks, the second ragged
def test_moe_combine_interpreter(kind, dtype, dim):
    for shared in (True, False):
        kw = combine_case(7, dim, 3, kind, dtype, shared, "cpu", seed=dim)
        truth = combine_truth(kw)
        expected = ref.moe_combine(**kw)
        out = torch.full((7, dim), float("nan"), dtype=dtype)  # NaN-poisoned: every element must be written
        got = moe.moe_combine(**kw, out=out)
        assert got is out and got.dtype == dtype
        assert_close(expected, truth)
        assert_close(got, truth)
        assert torch.equal(moe.moe_combine(**kw), got)  # the allocating call writes the same


def moe_inputs(tokens, dim, inter, experts, top_k, dtype, device, seed, kind="dropped", shared_inter=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)

    weights, ids = routing(tokens, experts, top_k, kind, gen, device)
    kw = {"x": rnd(tokens, dim), "w13": rnd(experts, 2 * inter, dim, scale=dim**-0.5),
          "w2": rnd(experts, dim, inter, scale=inter**-0.5), "topk_weights": weights.to(dtype), "topk_ids": ids}
    if shared_inter:
        kw.update(shared_w13=rnd(2 * shared_inter, dim, scale=dim**-0.5),
                  shared_w2=rnd(dim, shared_inter, scale=shared_inter**-0.5),
                  shared_gate=rnd(tokens, experts + 1)[:, experts:])
    return kw


def shared_output(kw):
    """The shared expert's [T, D] output as gpu.fused_moe hands it to the grouped path (rounded to x.dtype)."""
    if "shared_w13" not in kw:
        return {}
    h = kw["x"].float() @ kw["shared_w13"].float().T
    half = h.shape[1] // 2
    hidden = torch.nn.functional.silu(h[:, :half]) * h[:, half:]
    return {"shared": (hidden @ kw["shared_w2"].float().T).to(kw["x"].dtype), "shared_gate": kw["shared_gate"]}


def run_grouped(kw, mm=None):
    routed = {k: kw[k] for k in ("x", "w13", "w2", "topk_weights", "topk_ids")}
    return grouped.fused_moe(**routed, **shared_output(kw), mm=mm)


def rel_error(got, kw):
    exp = ref.fused_moe(**{k: (v.float() if v.is_floating_point() else v) for k, v in kw.items()})
    return ((got.float() - exp).norm() / exp.norm().clamp(min=1e-30)).item()


@pytest.mark.parametrize("kind", ROUTINGS)
def test_grouped_glue_fp32_matches_reference(kind):
    """fp32 on CPU (ref.grouped_mm for the GEMMs, the Triton glue interpreted): the sort, silu_and_mul, the combine
    and the shared term together equal the reference to fp32 rounding, ids < 0 and empty experts included."""
    kw = moe_inputs(37, 40, 20, 12, 3, torch.float32, "cpu", seed=5, kind=kind, shared_inter=12)
    got = run_grouped(kw, mm=ref.grouped_mm)
    assert got.dtype == torch.float32 and got.shape == kw["x"].shape
    assert_close(got, ref.fused_moe(**kw))


@pytest.mark.parametrize("shared_inter", [0, 12])
def test_grouped_glue_bf16_interpreter(shared_inter):
    """bf16: the GEMM outputs and silu(gate) * up are rounded to bf16 (as the HF model does), the sum is not."""
    kw = moe_inputs(37, 40, 20, 12, 3, torch.bfloat16, "cpu", seed=6, shared_inter=shared_inter)
    got = run_grouped(kw, mm=ref.grouped_mm)
    assert got.dtype == torch.bfloat16 and not got.isnan().any()
    assert rel_error(got, kw) < 1e-2


def test_grouped_needs_both_shared_inputs():
    kw = moe_inputs(3, 8, 4, 4, 2, torch.float32, "cpu", seed=0)
    with pytest.raises(ValueError):
        grouped.fused_moe(**kw, shared=kw["x"], mm=ref.grouped_mm)


A3B_LIKE = dict(dim=2048, inter=512, experts=64, top_k=8)  # 35B-A3B's expert shape, a quarter of its experts


def poison_allocator(*shapes):
    """Leave NaN-filled blocks of these shapes in the caching allocator, which hands them to the next allocations of
    the same sizes (the output's among them): an element the kernels never write stays NaN."""
    blocks = [torch.full(s, float("nan"), dtype=torch.bfloat16, device="cuda") for s in shapes]
    del blocks


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kind,shared_inter", [("dropped", 512), ("dropped", 0), ("gaps", 512), ("one", 512)])
def test_grouped_path_gpu(kind, shared_inter, monkeypatch):
    """torch._grouped_mm and the compiled glue at T=333 (odd) against the fp32 reference, through gpu.fused_moe as
    the layer calls it (the shared expert folded into the combine when given). Pinned: by the thresholds this size
    takes the block-grouped kernels (test_moe_blocked.py); the grouped GEMMs run only through FORCE_PATH."""
    from deltaserve.kernels.moe import gpu as moe_gpu

    monkeypatch.setattr(moe_gpu, "FORCE_PATH", "grouped")
    T, c = 333, A3B_LIKE
    kw = moe_inputs(T, c["dim"], c["inter"], c["experts"], c["top_k"], torch.bfloat16, "cuda", seed=11, kind=kind,
                    shared_inter=shared_inter)
    assert T * c["top_k"] > moe_gpu.SMALL_BATCH_PAIRS and grouped.grouped_mm_available(kw["x"])
    poison_allocator((T, c["dim"]), (T * c["top_k"], c["dim"]), (T * c["top_k"], c["inter"]))
    got = moe_gpu.fused_moe(**kw)
    assert got.dtype == torch.bfloat16 and not got.isnan().any()
    assert rel_error(got, kw) < 1e-2


@pytest.mark.gpu
@gpu
def test_moe_combine_gpu():
    """The compiled combine at the 35B-A3B width (two 1024-column blocks), NaN-poisoned output."""
    for kind in ROUTINGS:
        kw = combine_case(333, 2048, 8, kind, torch.bfloat16, True, "cuda", seed=3)
        out = torch.full((333, 2048), float("nan"), dtype=torch.bfloat16, device="cuda")
        assert_close(moe.moe_combine(**kw, out=out), combine_truth(kw))


@pytest.mark.gpu
@gpu
def test_grouped_path_cuda_graph_gpu():
    """No host syncs, no data-dependent shapes: captured once, replayed on new routing, equal to eager."""
    c = A3B_LIKE
    kw = moe_inputs(333, c["dim"], c["inter"], c["experts"], c["top_k"], torch.bfloat16, "cuda", seed=12,
                    shared_inter=512)
    run_grouped(kw)  # compile the kernels outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = run_grouped(kw)
    fresh = moe_inputs(333, c["dim"], c["inter"], c["experts"], c["top_k"], torch.bfloat16, "cuda", seed=13,
                       kind="gaps", shared_inter=512)
    for name in ("x", "topk_weights", "topk_ids", "shared_gate"):
        kw[name].copy_(fresh[name])
    graph.replay()
    assert torch.equal(static_out, run_grouped(kw))
