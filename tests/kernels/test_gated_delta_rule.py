"""Gated delta rule reference ops against a per-token, per-head float64 loop of the recurrence."""

from __future__ import annotations

import math

import pytest
import torch
from tolerances import assert_close

from deltaserve.kernels.gated_delta_rule import (
    chunk_gated_delta_rule,
    fused_recurrent_gated_delta_rule,
    gdn_gating,
)

# K >= 32: with K = 16 a 64-token chunk of keys is so collinear that the chunked form's fp32 error (inherent to the
# UT solve; transformers' torch_chunk_gated_delta_rule has the same) comes near the fp32 tolerance. The model has K = 128.
H, K, V = 2, 32, 12
SCALE = K**-0.5


def delta_rule_truth(q, k, v, g, beta, s0, *, l2=True):
    """One sequence, float64. q, k: [L, H, K]; v: [L, HV, V]; g, beta: [L, HV]; s0: [HV, K, V] -> (o, S)."""
    q, k, v, g, beta = (t.double() for t in (q, k, v, g, beta))
    if l2:
        q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
        k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    num_v_heads = v.shape[1]
    ratio = num_v_heads // q.shape[1]
    s = s0.double().clone()
    o = torch.zeros(v.shape, dtype=torch.float64)
    for t in range(q.shape[0]):
        for h in range(num_v_heads):
            kh, qh = k[t, h // ratio], q[t, h // ratio] * SCALE
            s[h] = math.exp(g[t, h]) * s[h]
            delta = beta[t, h] * (v[t, h] - s[h].T @ kh)
            s[h] = s[h] + torch.outer(kh, delta)
            o[t, h] = s[h].T @ qh
    return o, s


def random_inputs(total, num_k_heads, num_v_heads, gen, dtype=torch.float32, k_scale=1.0, q_scale=1.0):
    q = (torch.randn(total, num_k_heads, K, generator=gen) * q_scale).to(dtype)
    k = (torch.randn(total, num_k_heads, K, generator=gen) * k_scale).to(dtype)
    v = torch.randn(total, num_v_heads, V, generator=gen).to(dtype)
    # per-head decay rates spanning long memory (state survives many chunks) to short, as A_log does in the model
    rate = torch.exp(torch.empty(num_v_heads).uniform_(-6.0, 0.0, generator=gen))
    g = -rate * torch.rand(total, num_v_heads, generator=gen) * 2
    g[torch.rand(total, num_v_heads, generator=gen) < 0.05] = -40.0  # near-total forgetting: exp underflow paths
    beta = torch.rand(total, num_v_heads, generator=gen).to(dtype)
    return q, k, v, g, beta


def cu_of(lengths):
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32)


def run_chunk_and_check(
    lengths, init, slots, *, ratio=2, chunk_size=64, dtype=torch.float32, l2=True, qk_scale=1.0, seed=0
):
    gen = torch.Generator().manual_seed(seed)
    num_v_heads, num_slots = H * ratio, max(slots) + 3
    # without the L2 norm keep beta * |k|^2 < 1 (|k|^2 ~ 0.7 here), or the delta rule itself can diverge
    k_scale = qk_scale if l2 else 0.15
    q, k, v, g, beta = random_inputs(sum(lengths), H, num_v_heads, gen, dtype, k_scale=k_scale, q_scale=qk_scale)
    # NaN wherever a correct op must not read: unused slots and the slots of fresh sequences
    pool = torch.full((num_slots, num_v_heads, K, V), float("nan"))
    for slot, has in zip(slots, init):
        if slot >= 0 and has:
            pool[slot] = torch.randn(num_v_heads, K, V, generator=gen) * 0.5
    before = pool.clone()
    cu = cu_of(lengths)
    o = chunk_gated_delta_rule(
        q=q, k=k, v=v, g=g, beta=beta, state=pool, cu_seqlens=cu, slots=torch.tensor(slots),
        has_initial_state=torch.tensor(init), scale=SCALE, use_qk_l2norm=l2, chunk_size=chunk_size,
    )
    assert o.dtype == dtype and o.shape == v.shape and pool.dtype == torch.float32
    for n, (slot, has) in enumerate(zip(slots, init)):
        lo, hi = cu[n].item(), cu[n + 1].item()
        if slot < 0:
            assert (o[lo:hi] == 0).all()
            continue
        s0 = before[slot] if has else torch.zeros(num_v_heads, K, V)
        o_ref, s_ref = delta_rule_truth(q[lo:hi], k[lo:hi], v[lo:hi], g[lo:hi], beta[lo:hi], s0, l2=l2)
        assert_close(o[lo:hi], o_ref)
        assert_close(pool[slot], s_ref)  # the state is fp32 whatever the activation dtype
    untouched = sorted(set(range(num_slots)) - {s for s in slots if s >= 0})
    assert pool[untouched].isnan().all()


@pytest.mark.parametrize("length", [1, 63, 64, 65, 130])
def test_chunk_single_sequence(length):
    run_chunk_and_check([length], [True], [1], ratio=2)


@pytest.mark.parametrize("ratio", [1, 2, 3])
def test_chunk_gva_ratio_varlen(ratio):
    # mixed lengths in one call, some continuing from a saved state, some fresh, shuffled slots, one padding slot
    lengths = [5, 1, 70, 2, 33, 64]
    init = [True, False, True, True, False, False]
    slots = [4, 0, 6, -1, 2, 1]
    run_chunk_and_check(lengths, init, slots, ratio=ratio, seed=ratio)


def test_chunk_small_chunks():
    # chunk_size 16 makes every sequence span several chunks, including partial last chunks
    run_chunk_and_check([17, 48, 3, 50], [True, False, True, True], [3, 1, 0, 5], ratio=2, chunk_size=16)


def test_chunk_without_l2norm():
    run_chunk_and_check([40, 7], [True, False], [0, 2], ratio=1, chunk_size=16, l2=False)


def test_chunk_l2norm_eps_on_tiny_vectors():
    # |q|^2, |k|^2 ~ 1e-5, comparable to the 1e-6 eps, so the eps value and its place inside the rsqrt matter
    run_chunk_and_check([20, 3], [True, False], [0, 1], ratio=2, qk_scale=1e-3)


def test_chunk_bf16_activations():
    run_chunk_and_check([65, 3], [True, False], [1, 0], ratio=2, dtype=torch.bfloat16)


@pytest.mark.parametrize("ratio", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_recurrent_matches_truth(ratio, dtype):
    gen = torch.Generator().manual_seed(10 + ratio)
    num_v_heads = H * ratio
    slots = [3, -1, 0, 5, 1]
    q, k, v, g, beta = random_inputs(len(slots), H, num_v_heads, gen, dtype)
    pool = torch.full((7, num_v_heads, K, V), float("nan"))
    for s in slots:
        if s >= 0:
            pool[s] = torch.randn(num_v_heads, K, V, generator=gen) * 0.5
    before = pool.clone()
    o = fused_recurrent_gated_delta_rule(
        q=q, k=k, v=v, g=g, beta=beta, state=pool, slots=torch.tensor(slots), scale=SCALE
    )
    assert o.dtype == dtype
    for n, s in enumerate(slots):
        if s < 0:
            assert (o[n] == 0).all()
            continue
        o_ref, s_ref = delta_rule_truth(q[n : n + 1], k[n : n + 1], v[n : n + 1], g[n : n + 1], beta[n : n + 1],
                                        before[s])
        assert_close(o[n : n + 1], o_ref)
        assert_close(pool[s], s_ref)
    assert pool[[2, 4, 6]].isnan().all()


@pytest.mark.parametrize("ratio", [1, 2, 3])
def test_prefill_then_decode_equals_one_prefill(ratio):
    """Chunked prefill of a prefix, then fused_recurrent token by token == one chunked call over everything."""
    gen = torch.Generator().manual_seed(20 + ratio)
    num_v_heads, steps = H * ratio, 5
    prefix = [1, 64, 70]
    total = [p + steps for p in prefix]
    slots = torch.tensor([2, 0, 1])
    init = torch.tensor([True, False, True])
    q, k, v, g, beta = random_inputs(sum(total), H, num_v_heads, gen)
    s0 = torch.randn(3, num_v_heads, K, V, generator=gen) * 0.5

    full_pool = s0.clone()
    cu_full = cu_of(total)
    o_full = chunk_gated_delta_rule(
        q=q, k=k, v=v, g=g, beta=beta, state=full_pool, cu_seqlens=cu_full, slots=slots,
        has_initial_state=init, scale=SCALE,
    )

    pool = s0.clone()
    pre = torch.cat([torch.arange(cu_full[n], cu_full[n] + p) for n, p in enumerate(prefix)])
    o_pre = chunk_gated_delta_rule(
        q=q[pre], k=k[pre], v=v[pre], g=g[pre], beta=beta[pre], state=pool, cu_seqlens=cu_of(prefix),
        slots=slots, has_initial_state=init, scale=SCALE,
    )
    o_steps = []
    for i in range(steps):
        rows = torch.tensor([cu_full[n] + p + i for n, p in enumerate(prefix)])
        o_steps.append(fused_recurrent_gated_delta_rule(
            q=q[rows], k=k[rows], v=v[rows], g=g[rows], beta=beta[rows], state=pool, slots=slots, scale=SCALE
        ))
    cu_pre = cu_of(prefix)
    for n in range(3):
        got = torch.cat([o_pre[cu_pre[n] : cu_pre[n + 1]], torch.stack([o[n] for o in o_steps])])
        assert_close(got, o_full[cu_full[n] : cu_full[n + 1]])
    assert_close(pool, full_pool)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gdn_gating(dtype):
    gen = torch.Generator().manual_seed(3)
    a = (torch.randn(65, 6, generator=gen) * 15).to(dtype)  # spans softplus' linear (> 20) branch
    b = (torch.randn(65, 6, generator=gen) * 4).to(dtype)
    A_log = torch.randn(6, generator=gen).to(dtype)
    dt_bias = torch.randn(6, generator=gen).to(dtype)
    g, beta = gdn_gating(a=a, b=b, A_log=A_log, dt_bias=dt_bias)
    assert g.dtype == torch.float32 and beta.dtype == torch.float32
    x = a.double() + dt_bias.double()
    g_ref = -A_log.double().exp() * torch.log1p(torch.exp(x))
    assert_close(g, g_ref, dtype=torch.float32)
    assert_close(beta, torch.sigmoid(b.double()), dtype=torch.float32)
    assert (g <= 0).all()
