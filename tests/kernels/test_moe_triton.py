"""Triton MoE kernels (top-k softmax routing; per-pair expert FFN with the shared expert folded in) against the
references. Without a GPU they run under TRITON_INTERPRET=1 on small shapes; `pytest -m gpu` runs them compiled at
Qwen3.5-35B-A3B shapes, and through the grouped-GEMM path past the small-batch threshold."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' import (read at @triton.jit time)

triton = pytest.importorskip("triton")

from tests.tolerances import assert_close, assert_error_within  # noqa: E402

from deltaserve.kernels.moe import ref  # noqa: E402
from deltaserve.kernels.moe import gpu as moe_gpu  # noqa: E402
from deltaserve.kernels.moe import triton as moe  # noqa: E402

gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(autouse=True, scope="module")
def _interpreter_like_the_gpu(interpreter_rounds_like_the_gpu):
    yield


def moe_case(tokens, dim, inter, experts, top_k, shared_inter, dtype, device, seed, drop_slot=False):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)

    logits = torch.randn(tokens, experts + 1, generator=gen).to(dtype).to(device)
    weights, ids = ref.moe_topk_softmax(router_logits=logits[:, :experts], top_k=top_k)
    if drop_slot:  # a routing slot with no expert to run (ids < 0) contributes nothing
        ids[::2, -1] = -1
    kw = {"x": rnd(tokens, dim), "w13": rnd(experts, 2 * inter, dim, scale=dim**-0.5),
          "w2": rnd(experts, dim, inter, scale=inter**-0.5), "topk_weights": weights.to(dtype), "topk_ids": ids}
    if shared_inter:
        kw.update(shared_w13=rnd(2 * shared_inter, dim, scale=dim**-0.5),
                  shared_w2=rnd(dim, shared_inter, scale=shared_inter**-0.5),
                  shared_gate=logits[:, experts:])  # a column view of the merged router output, as in the layer
    return kw


def run_ref(kw, upcast=False):
    cpu = {k: v.cpu() for k, v in kw.items()}
    if upcast:
        cpu = {k: (v.float() if v.is_floating_point() else v) for k, v in cpu.items()}
    return ref.fused_moe(**cpu)


def check_pairs(tokens, dims, dtype, device, seed, shared=True, drop_slot=False, fn=None, rel_tol=None):
    dim, inter, experts, top_k, shared_inter = dims
    kw = moe_case(tokens, dim, inter, experts, top_k, shared_inter if shared else 0, dtype, device, seed, drop_slot)
    got = (fn or moe.fused_moe_pairs)(**kw)
    assert got.dtype == dtype and got.shape == kw["x"].shape and not got.isnan().any()
    if rel_tol is not None:  # paths that round intermediates to bf16 (grouped GEMM outputs), as the HF model does
        exp = run_ref(kw, upcast=True)
        assert (got.cpu().float() - exp).norm() / exp.norm() < rel_tol
    elif dtype == torch.float32:
        assert_close(got, run_ref(kw))
    else:  # bf16: within twice the error of the reference run in bf16, against the fp32 run
        assert_error_within(got, run_ref(kw), run_ref(kw, upcast=True))


TINY = (24, 20, 12, 3, 12)  # dim, moe inter, experts, top_k, shared inter (different from the routed one)


@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_moe_pairs_interpreter(tokens, dtype):
    check_pairs(tokens, TINY, dtype, "cpu", seed=tokens)


def test_fused_moe_pairs_interpreter_no_shared_and_dropped_slots():
    check_pairs(4, TINY, torch.float32, "cpu", seed=3, shared=False, drop_slot=True)
    check_pairs(4, TINY, torch.float32, "cpu", seed=4, shared=True, drop_slot=True)


def test_fused_moe_pairs_interpreter_k_loop():
    """A hidden size of more than 4 K blocks takes the rolled K loop (wide models) instead of the unrolled one."""
    def fn(**kw):
        return moe.fused_moe_pairs(**kw, gate_up_config=(4, 8, 1), down_config=(4, 8, 1))

    check_pairs(3, (40, 20, 12, 3, 12), torch.float32, "cpu", seed=9, fn=fn)


def test_fused_moe_dispatch(monkeypatch):
    """Per-pair kernels up to SMALL_BATCH_PAIRS, the expert-centric kernels up to MID_BATCH_MAX_PAIRS, the
    block-grouped kernels past it; FORCE_PATH overrides (the reference only then)."""
    from deltaserve.kernels.moe import blocked, midbatch

    monkeypatch.setattr(moe_gpu, "SMALL_BATCH_PAIRS", 3)
    monkeypatch.setattr(moe_gpu, "MID_BATCH_MAX_PAIRS", 6)
    calls = []
    real = {"pairs": moe.fused_moe_pairs, "mid": midbatch.fused_moe_mid, "blocked": blocked.fused_moe,
            "ref": ref.fused_moe}
    for module, name, path in ((moe, "fused_moe_pairs", "pairs"), (midbatch, "fused_moe_mid", "mid"),
                               (blocked, "fused_moe", "blocked"), (ref, "fused_moe", "ref")):
        monkeypatch.setattr(module, name, lambda path=path, **kw: calls.append(path) or real[path](**kw))
    dim, inter, experts, top_k, shared_inter = TINY
    for tokens, force, path in ((1, None, "pairs"), (2, None, "mid"), (3, None, "blocked"), (3, "mid", "mid"),
                                (3, "ref", "ref")):
        monkeypatch.setattr(moe_gpu, "FORCE_PATH", force)
        kw = moe_case(tokens, dim, inter, experts, top_k, shared_inter, torch.float32, "cpu", seed=tokens)
        calls.clear()
        got = moe_gpu.fused_moe(**kw)
        assert calls == [path]
        assert_close(got, real["ref"](**kw))
    monkeypatch.setattr(moe_gpu, "FORCE_PATH", None)
    assert moe_gpu.pick_path(7) == "blocked"  # past MID_BATCH_MAX_PAIRS


def test_topk_softmax_nan_logits_stay_in_range():
    """A NaN logit must not produce an expert id past the end of the weights (it would read out of bounds)."""
    logits = torch.randn(3, 16)
    logits[1, 5] = float("nan")
    _, ids = moe.moe_topk_softmax(router_logits=logits, top_k=4)
    assert ((ids >= 0) & (ids < 16)).all()


def check_topk(tokens, experts, top_k, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(tokens, experts, generator=gen) * 3).to(dtype).to(device)
    w, ids = moe.moe_topk_softmax(router_logits=logits, top_k=top_k)
    w_ref, ids_ref = ref.moe_topk_softmax(router_logits=logits.cpu(), top_k=top_k)
    assert w.dtype == torch.float32 and ids.dtype == torch.int64 and ids.shape == (tokens, top_k)
    probs = torch.softmax(logits.cpu().double(), -1)
    # ties may pick either expert: compare the picked probabilities (descending), then the renormalised weights
    torch.testing.assert_close(probs.gather(1, ids.cpu()), probs.gather(1, ids_ref), rtol=0, atol=0)
    assert_close(w, w_ref, dtype=torch.float32)
    # weights stored in the activation dtype: the fp32 result rounded once, the same picks
    wb, ids_b = moe.moe_topk_softmax(router_logits=logits, top_k=top_k, dtype=torch.bfloat16)
    assert wb.dtype == torch.bfloat16 and torch.equal(ids_b, ids) and torch.equal(wb, w.to(torch.bfloat16))


@pytest.mark.parametrize("top_k", [3, 4])
def test_topk_softmax_interpreter(top_k):
    check_topk(7, 16, top_k, torch.bfloat16, "cpu", seed=top_k)


A3B = (2048, 512, 256, 8, 512)  # Qwen3.5-35B-A3B


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tokens", [1, 3, 8])
def test_fused_moe_pairs_gpu(tokens):
    check_pairs(tokens, A3B, torch.bfloat16, "cuda", seed=tokens)
    check_pairs(tokens, TINY, torch.float32, "cuda", seed=tokens, drop_slot=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tokens,path", [(9, "mid"), (64, "mid"), (67, "blocked"),
                                         (257, "blocked")])
def test_fused_moe_past_small_batch_gpu(tokens, path):
    """Past the small-batch threshold: the expert-centric kernels, then the large-batch path (the shared expert as
    an extra program in the first, beside them in the second)."""
    assert moe_gpu.pick_path(tokens * A3B[3]) == path
    check_pairs(tokens, A3B, torch.bfloat16, "cuda", seed=tokens, fn=moe_gpu.fused_moe, rel_tol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_topk_softmax_gpu():
    check_topk(67, 256, 8, torch.bfloat16, "cuda", seed=1)
    check_topk(5, 512, 10, torch.float32, "cuda", seed=2)
