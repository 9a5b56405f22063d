"""causal_conv1d_prefill / causal_conv1d_update against an explicit float64 loop."""

from __future__ import annotations

import pytest
import torch
from tests.tolerances import assert_close

from deltaserve.kernels.conv1d import causal_conv1d_prefill, causal_conv1d_update

W = 4
C = 24


def conv_truth(x: torch.Tensor, weight: torch.Tensor, hist: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence, float64: x [L, C], hist [W-1, C] -> (y [L, C], new history [W-1, C])."""
    xx = torch.cat([hist, x]).double()
    w = weight.double()
    y = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        acc = torch.zeros(x.shape[1], dtype=torch.float64)
        for j in range(W):
            acc += w[:, j] * xx[t + j]  # xx[t + W-1] is token t, multiplied by w[:, W-1]
        y[t] = acc * torch.sigmoid(acc)
    return y, xx[-(W - 1):]


def make_case(lengths, init, slots, num_slots, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(lengths), C, generator=gen).to(dtype)
    weight = (torch.randn(C, W, generator=gen) * 0.5).to(dtype)
    # NaN everywhere a correct op must not read: unused slots and slots of fresh sequences
    pool = torch.full((num_slots, W - 1, C), float("nan"), dtype=dtype)
    for slot, has in zip(slots, init):
        if slot >= 0 and has:
            pool[slot] = torch.randn(W - 1, C, generator=gen).to(dtype)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return x, weight, pool, cu


def run_prefill_and_check(lengths, init, slots, num_slots, dtype):
    x, weight, pool, cu = make_case(lengths, init, slots, num_slots, dtype)
    before = pool.clone()
    y = causal_conv1d_prefill(
        x=x, weight=weight, conv_state=pool, cu_seqlens=cu,
        slots=torch.tensor(slots, dtype=torch.int64), has_initial_state=torch.tensor(init),
    )
    assert y.dtype == dtype and y.shape == x.shape
    for n, (slot, has) in enumerate(zip(slots, init)):
        lo, hi = cu[n].item(), cu[n + 1].item()
        if slot < 0:
            assert (y[lo:hi] == 0).all()
            continue
        hist = before[slot] if has else torch.zeros(W - 1, C, dtype=dtype)
        y_ref, state_ref = conv_truth(x[lo:hi], weight, hist)
        assert_close(y[lo:hi], y_ref)
        assert torch.equal(pool[slot], state_ref.to(dtype))  # the state is a copy of inputs: exact
    touched = {s for s in slots if s >= 0}
    for s in range(num_slots):
        if s not in touched:
            assert pool[s].isnan().all(), f"slot {s} was written"


@pytest.mark.parametrize("length", [1, 2, 3, 63, 64, 65, 130])
@pytest.mark.parametrize("has_init", [False, True])
def test_prefill_single(length, has_init):
    run_prefill_and_check([length], [has_init], [2], 4, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_varlen_mixed(dtype):
    # short sequences with history keep part of it; slots shuffled; -1 is a padding sequence
    lengths = [5, 1, 2, 70, 3, 4, 1]
    init = [True, True, False, True, False, True, False]
    slots = [6, 0, 3, -1, 8, 1, 5]
    run_prefill_and_check(lengths, init, slots, 10, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_update_matches_truth(dtype):
    gen = torch.Generator().manual_seed(1)
    slots = [4, -1, 0, 2]
    x = torch.randn(len(slots), C, generator=gen).to(dtype)
    weight = torch.randn(C, W, generator=gen).to(dtype)
    pool = torch.full((6, W - 1, C), float("nan"), dtype=dtype)
    for s in slots:
        if s >= 0:
            pool[s] = torch.randn(W - 1, C, generator=gen).to(dtype)
    before = pool.clone()
    y = causal_conv1d_update(x=x, weight=weight, conv_state=pool, slots=torch.tensor(slots))
    for n, s in enumerate(slots):
        if s < 0:
            assert (y[n] == 0).all()
            continue
        y_ref, state_ref = conv_truth(x[n : n + 1], weight, before[s])
        assert_close(y[n : n + 1], y_ref)
        assert torch.equal(pool[s], state_ref.to(dtype))
    for s in (1, 3, 5):
        assert pool[s].isnan().all()


def test_prefill_then_update_equals_full_prefill():
    """Prefill a prefix (of length 1, 2 and 40: shorter and longer than W-1), then decode token by token."""
    gen = torch.Generator().manual_seed(2)
    prefix, steps = [1, 2, 40], 6
    total = [p + steps for p in prefix]
    xs = [torch.randn(t, C, generator=gen) for t in total]
    weight = torch.randn(C, W, generator=gen)
    slots = torch.tensor([2, 0, 1])
    fresh = torch.tensor([False, False, False])

    full_pool = torch.full((3, W - 1, C), float("nan"))
    cu_full = torch.tensor([0, *torch.tensor(total).cumsum(0).tolist()], dtype=torch.int32)
    y_full = causal_conv1d_prefill(
        x=torch.cat(xs), weight=weight, conv_state=full_pool, cu_seqlens=cu_full, slots=slots,
        has_initial_state=fresh,
    )

    pool = torch.full((3, W - 1, C), float("nan"))
    cu = torch.tensor([0, *torch.tensor(prefix).cumsum(0).tolist()], dtype=torch.int32)
    y_pre = causal_conv1d_prefill(
        x=torch.cat([x[:p] for x, p in zip(xs, prefix)]), weight=weight, conv_state=pool, cu_seqlens=cu,
        slots=slots, has_initial_state=fresh,
    )
    y_steps = [
        causal_conv1d_update(x=torch.stack([x[p + i] for x, p in zip(xs, prefix)]), weight=weight,
                             conv_state=pool, slots=slots)
        for i in range(steps)
    ]
    for n, p in enumerate(prefix):
        got = torch.cat([y_pre[cu[n] : cu[n + 1]], torch.stack([ys[n] for ys in y_steps])])
        assert_close(got, y_full[cu_full[n] : cu_full[n + 1]])
    assert torch.equal(pool, full_pool)
