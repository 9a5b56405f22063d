"""The verify step's commit kernel (``install_kept_states``: each row's kept GDN state into its slot, for a stack of
layers) against the reference's gather + index_copy, bit for bit (a copy, rounded once when the dtypes differ).

CPU (CI): under TRITON_INTERPRET=1 at tiny shapes (set up by test_gdn_triton's import: the interpreter's rounding
patch too). GPU (`pytest -m gpu`): the cache's 27B tensors (48 GDN layers, conv window and recurrent state) at
batch 1 and 8, eager (with host syncs made errors) and replayed from a CUDA graph with new slots and kept counts.
"""

from __future__ import annotations

import pytest
import torch

from tests.kernels.test_gdn_triton import assert_same, gdn_mod  # sets up the interpreter first

from deltaserve.kernels.gated_delta_rule import ref as gdn_ref

gpu = pytest.mark.gpu


def commit_case(layers, num_slots, rows, positions, state, src_dtype, dst_dtype, device, seed):
    """Pools [L, S, *state] and per-position buffers [L, R, k, *state] that are slices of larger ones (as strided as
    a cache could hand them out), random values everywhere."""
    gen = torch.Generator().manual_seed(seed)
    states = torch.randn(layers + 1, num_slots, *state, generator=gen).to(dst_dtype)[1:]
    kept = torch.randn(layers, rows + 1, positions + 1, *state, generator=gen).to(src_dtype)[:, 1:, :positions]
    return states.to(device), kept.to(device)


def check_install(fn, states, kept, slots, rows, num_kept):
    expected = states.cpu().clone()
    gdn_ref.install_kept_states(states=expected, kept_states=kept.cpu(), slots=slots.cpu(), rows=rows.cpu(),
                                num_kept=num_kept.cpu())
    before = states.clone()
    fn(states=states, kept_states=kept, slots=slots, rows=rows, num_kept=num_kept)
    assert_same(states, expected)
    others = [s for s in range(states.shape[1]) if s not in slots.tolist()]
    assert_same(states[:, others], before[:, others])  # the pools' other slots untouched
    for i, (slot, row, k) in enumerate(zip(slots.tolist(), rows.tolist(), num_kept.tolist())):
        assert_same(states[:, slot], kept[:, row, k - 1].to(states.dtype))


@pytest.mark.parametrize("src_dtype,dst_dtype,block", [
    (torch.float32, torch.float32, 16),  # 48-element states in 3 chunks
    (torch.float32, torch.bfloat16, 16),  # rounded to nearest even in the kernel
    (torch.bfloat16, torch.bfloat16, None),  # the launcher's own chunk: one masked 64-element chunk
])
def test_install_kept_states_matches_reference(src_dtype, dst_dtype, block):
    mod = gdn_mod()
    states, kept = commit_case(3, 7, 4, 3, (2, 3, 8), src_dtype, dst_dtype, "cpu", seed=block or 0)
    # rows out of order and not all of them, slots scattered, every kept count 1..k
    slots, rows, num_kept = torch.tensor([5, 1, 3]), torch.tensor([2, 0, 3]), torch.tensor([3, 1, 2])
    if block is None:
        fn = mod.install_kept_states
    else:
        def fn(**kw):
            return mod.install_kept_states_launch(block=block, **kw)
    check_install(fn, states, kept, slots, rows, num_kept)


def test_install_kept_states_with_no_rows_is_a_no_op():
    states, kept = commit_case(2, 3, 2, 2, (4,), torch.float32, torch.float32, "cpu", seed=1)
    before = states.clone()
    empty = torch.empty(0, dtype=torch.long)
    gdn_mod().install_kept_states(states=states, kept_states=kept, slots=empty, rows=empty, num_kept=empty)
    assert_same(states, before)


# ---------------------------------------------------------------------------------------------------------------------
# GPU: the 27B cache's shapes


QWEN27B_GDN = 48  # GDN layers
QWEN27B_CONV = (3, 2 * 16 * 128 + 48 * 128)  # (W - 1, conv_dim)
QWEN27B_SSM = (48, 128, 128)  # (HV, K, V)


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("batch", [1, 8])
def test_install_kept_states_27b_bitwise_and_in_a_graph(batch):
    from deltaserve.kernels.gated_delta_rule import install_kept_states

    dev, positions, num_slots = "cuda", 4, 2 * batch + 3
    gen = torch.Generator(device=dev).manual_seed(batch)
    kinds = [(QWEN27B_GDN, QWEN27B_CONV, torch.bfloat16, torch.bfloat16),
             (QWEN27B_GDN, QWEN27B_SSM, torch.float32, torch.float32),
             (4, QWEN27B_SSM, torch.float32, torch.bfloat16)]  # a bf16 pool fed fp32 states: rounded in the kernel
    for layers, state, src_dtype, dst_dtype in kinds:
        states = torch.randn(layers, num_slots, *state, device=dev, generator=gen).to(dst_dtype)
        kept = torch.randn(layers, batch, positions, *state, device=dev, generator=gen).to(src_dtype)

        def draw():
            slots = torch.randperm(num_slots, device=dev, generator=gen)[:batch]
            rows = torch.randperm(batch, device=dev, generator=gen)
            return slots, rows, torch.randint(1, positions + 1, (batch,), device=dev, generator=gen)

        slots, rows, num_kept = draw()
        expected = states.clone()
        gdn_ref.install_kept_states(states=expected, kept_states=kept, slots=slots, rows=rows, num_kept=num_kept)
        install_kept_states(states=states, kept_states=kept, slots=slots, rows=rows, num_kept=num_kept)  # compiles
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:  # again (the same install: idempotent) with any host sync an error
            install_kept_states(states=states, kept_states=kept, slots=slots, rows=rows, num_kept=num_kept)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.equal(states, expected)  # no NaN in these (torch.equal: compared on the device)
        # captured once, replayed with other slots, rows and kept counts written into the same device tensors
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            install_kept_states(states=states, kept_states=kept, slots=slots, rows=rows, num_kept=num_kept)
        for t, new in zip((slots, rows, num_kept), draw()):
            t.copy_(new)
        gdn_ref.install_kept_states(states=expected, kept_states=kept, slots=slots, rows=rows, num_kept=num_kept)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(states, expected)
        del states, kept, expected, graph
        torch.cuda.empty_cache()
