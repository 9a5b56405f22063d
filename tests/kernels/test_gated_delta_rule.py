"""Gated delta rule reference ops against a per-token, per-head float64 loop of the recurrence."""

from __future__ import annotations

import math

import pytest
import torch
from tests.tolerances import assert_close

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


# ---- the contracts prefix caching and speculative decoding build on ---------------------------------------------------
@pytest.mark.parametrize("chunk_size", [16, 64])
def test_chunk_states_are_the_states_at_every_chunk_start(chunk_size):
    """chunk_states[c] is the state after the sequence's first j * chunk_size tokens (j: the chunk's index in its
    sequence): equal to the final state of a prefill that stops there. Padding sequences' entries are untouched."""
    gen = torch.Generator().manual_seed(31)
    lengths, init, slots = [1, 2 * chunk_size + 5, chunk_size, 7], [True, False, True, True], [2, 0, -1, 1]
    num_v_heads = 2 * H
    q, k, v, g, beta = random_inputs(sum(lengths), H, num_v_heads, gen)
    s0 = torch.randn(3, num_v_heads, K, V, generator=gen) * 0.5
    counts = [-(-n // chunk_size) for n in lengths]
    chunk_states = torch.full((sum(counts), num_v_heads, K, V), float("nan"))
    common = dict(slots=torch.tensor(slots), has_initial_state=torch.tensor(init), scale=SCALE, chunk_size=chunk_size)
    pool = s0.clone()
    o = chunk_gated_delta_rule(q=q, k=k, v=v, g=g, beta=beta, state=pool, cu_seqlens=cu_of(lengths),
                               chunk_states=chunk_states, **common)
    plain_pool = s0.clone()
    plain = chunk_gated_delta_rule(q=q, k=k, v=v, g=g, beta=beta, state=plain_pool, cu_seqlens=cu_of(lengths),
                                   **common)
    assert torch.equal(o, plain) and torch.equal(pool, plain_pool)  # asking for the states changes nothing else
    cu, first = cu_of(lengths).tolist(), 0
    for n, (slot, has) in enumerate(zip(slots, init)):
        for j in range(counts[n]):
            got = chunk_states[first + j]
            if slot < 0:
                assert got.isnan().all()
                continue
            start = s0[slot] if has else torch.zeros(num_v_heads, K, V)
            end = cu[n] + j * chunk_size
            _, expected = delta_rule_truth(q[cu[n]:end], k[cu[n]:end], v[cu[n]:end], g[cu[n]:end],
                                           beta[cu[n]:end], start)
            assert_close(got, expected)
        first += counts[n]


def gdn_decode_case(n: int, hv: int, gen: torch.Generator, tokens: int = 1):
    """Inputs of fused_gdn_decode for n rows x `tokens` tokens (H key heads, K = V head dims, conv width 4)."""
    conv_dim, width = 2 * H * K + hv * K, 4
    return {"mixed_qkv": torch.randn(n * tokens, conv_dim, generator=gen), "a": torch.randn(n * tokens, hv, generator=gen),
            "b": torch.randn(n * tokens, hv, generator=gen), "A_log": torch.rand(hv, generator=gen),
            "dt_bias": torch.rand(hv, generator=gen), "conv_weight": torch.randn(conv_dim, width, generator=gen) * 0.3,
            "num_k_heads": H, "head_k_dim": K, "num_v_heads": hv, "head_v_dim": K, "scale": SCALE}


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 2, 4])
def test_multistep_keeps_each_positions_inputs_and_commit_replays_to_its_state(tokens, state_dtype):
    """fused_gdn_multistep = `tokens` successive fused_gdn_decode steps (outputs, conv windows bit for bit; the
    post-conv rows and gates kept), the pools untouched; commit_gdn_states then leaves in each slot exactly the state
    those decode steps left after its last accepted position (replayed), or its own state at 0 accepted."""
    from deltaserve.kernels.gated_delta_rule import commit_gdn_states, fused_gdn_decode, fused_gdn_multistep

    gen = torch.Generator().manual_seed(40 + tokens)
    hv, slots = 2 * H, torch.tensor([3, -1, 0, 2])
    n = slots.shape[0]
    case = gdn_decode_case(n, hv, gen, tokens)
    conv_dim = case["mixed_qkv"].shape[1]
    conv = torch.randn(5, 3, conv_dim, generator=gen)
    ssm = (torch.randn(5, hv, K, K, generator=gen) * 0.5).to(state_dtype)
    conv_out = torch.full((n, tokens, 3, conv_dim), float("nan"))
    y_out = torch.full((n, tokens, conv_dim), float("nan"))
    gates_out = torch.full((n, tokens, 2, hv), float("nan"))
    pools = (conv.clone(), ssm.clone())
    o = fused_gdn_multistep(**case, conv_state=pools[0], ssm_state=pools[1], slots=slots, tokens_per_row=tokens,
                            conv_states_out=conv_out, y_out=y_out, gates_out=gates_out)
    assert torch.equal(pools[0], conv) and torch.equal(pools[1], ssm)  # the pools are only read
    # the same tokens through `tokens` successive single-token decode steps
    seq_conv, seq_ssm = conv.clone(), ssm.clone()
    states_after = []
    rows = lambda t, j: t.view(n, tokens, *t.shape[1:])[:, j]  # noqa: E731
    live = slots >= 0
    for j in range(tokens):
        step = {key: rows(val, j) if key in ("mixed_qkv", "a", "b") else val for key, val in case.items()}
        o_j = fused_gdn_decode(**step, conv_state=seq_conv, ssm_state=seq_ssm, slots=slots)
        assert torch.equal(rows(o, j), o_j)
        assert torch.equal(conv_out[live, j], seq_conv[slots[live]])
        states_after.append(seq_ssm.clone())
    assert not y_out[live].isnan().any() and not gates_out[live].isnan().any()
    assert (rows(o, 0)[1] == 0).all() and conv_out[1].isnan().all() and y_out[1].isnan().all()
    accepted = torch.tensor([tokens, 1, 0, max(tokens - 1, 1)])
    commit_gdn_states(conv_state=pools[0], ssm_state=pools[1], slots=slots, conv_states_out=conv_out, y_out=y_out,
                      gates_out=gates_out, num_accepted=accepted, num_k_heads=H, head_k_dim=K, num_v_heads=hv,
                      head_v_dim=K)
    assert torch.equal(pools[1][3], states_after[tokens - 1][3]) and torch.equal(pools[0][3], conv_out[0, tokens - 1])
    assert torch.equal(pools[1][0], ssm[0]) and torch.equal(pools[0][0], conv[0])  # 0 accepted: unchanged
    assert torch.equal(pools[1][2], states_after[accepted[3] - 1][2])
    assert torch.equal(pools[1][[1, 4]], ssm[[1, 4]])  # slots of no row: untouched
