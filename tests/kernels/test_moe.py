"""MoE routing and expert FFN against per-token float64 loops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests.tolerances import assert_close

from deltaserve.kernels.moe import fused_moe, moe_topk_softmax

D, I = 24, 20


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 65])
def test_topk_softmax(dtype, tokens):
    gen = torch.Generator().manual_seed(tokens)
    num_experts, top_k = 16, 4
    logits = (torch.randn(tokens, num_experts, generator=gen) * 3).to(dtype)
    weights, ids = moe_topk_softmax(router_logits=logits, top_k=top_k)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64 and ids.shape == (tokens, top_k)
    for t in range(tokens):
        probs = torch.softmax(logits[t].double(), 0)  # over ALL experts, before the top-k
        kept = probs.sort(descending=True).values[:top_k]
        # ties (common with bf16 logits) may pick either expert: check the picks' probabilities, not their ids
        assert len(set(ids[t].tolist())) == top_k
        assert torch.equal(probs[ids[t]], kept)
        assert_close(weights[t], kept / kept.sum(), dtype=torch.float32)


def moe_truth(x, w13, w2, weights, ids):
    x, w13, w2, weights = x.double(), w13.double(), w2.double(), weights.double()
    y = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = ids[t, j].item()
            gate, up = w13[e, :I] @ x[t], w13[e, I:] @ x[t]
            y[t] += weights[t, j] * (w2[e] @ (gate * torch.sigmoid(gate) * up))
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 63, 65])
def test_fused_moe(dtype, tokens):
    gen = torch.Generator().manual_seed(100 + tokens)
    num_experts, top_k = 12, 3
    x = torch.randn(tokens, D, generator=gen).to(dtype)
    w13 = (torch.randn(num_experts, 2 * I, D, generator=gen) * D**-0.5).to(dtype)
    w2 = (torch.randn(num_experts, D, I, generator=gen) * I**-0.5).to(dtype)
    weights, ids = moe_topk_softmax(router_logits=torch.randn(tokens, num_experts, generator=gen), top_k=top_k)
    y = fused_moe(x=x, w13=w13, w2=w2, topk_weights=weights, topk_ids=ids)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, moe_truth(x, w13, w2, weights, ids))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_moe_with_shared_expert(dtype):
    gen = torch.Generator().manual_seed(7)
    tokens, num_experts, top_k, shared_inter = 9, 12, 3, 16
    x = torch.randn(tokens, D, generator=gen).to(dtype)
    w13 = (torch.randn(num_experts, 2 * I, D, generator=gen) * D**-0.5).to(dtype)
    w2 = (torch.randn(num_experts, D, I, generator=gen) * I**-0.5).to(dtype)
    s13 = (torch.randn(2 * shared_inter, D, generator=gen) * D**-0.5).to(dtype)
    s2 = (torch.randn(D, shared_inter, generator=gen) * shared_inter**-0.5).to(dtype)
    gate = torch.randn(tokens, 1, generator=gen).to(dtype)
    weights, ids = moe_topk_softmax(router_logits=torch.randn(tokens, num_experts, generator=gen), top_k=top_k)
    y = fused_moe(x=x, w13=w13, w2=w2, topk_weights=weights, topk_ids=ids, shared_w13=s13, shared_w2=s2,
                  shared_gate=gate)
    hs = x.double() @ s13.double().T
    shared = torch.sigmoid(gate.double()) * ((F.silu(hs[:, :shared_inter]) * hs[:, shared_inter:]) @ s2.double().T)
    assert y.dtype == dtype
    assert_close(y, moe_truth(x, w13, w2, weights, ids) + shared)
