"""The multi-token GDN verify kernels (``fused_gdn_multistep``: conv, then the recurrence over T tokens per row, keeping
per position the conv window, the post-conv row and the gates) and the commit's replay of the recurrent state
(``replay_kept_states``) against the reference.

CPU (CI): under TRITON_INTERPRET=1 at tiny shapes (set up by test_gdn_triton's import: the interpreter's rounding
patch too). GPU (`pytest -m gpu`): the 9B and 27B GDN shapes against the reference, NaN-poisoned pools and buffers,
CUDA graph capture and replay.

Tolerances: against the reference, fp32 activations use the fp32 tolerance (1e-5: both sides run the same fp32 ops;
only the order of a few reductions differs); bf16 activations the kernel policy (error against the fp32 pipeline
within 2x that of the reference run in bf16), as the decode kernel's tests. The kernels' replay runs the verify
kernel's device functions on the same values in the same order: on the interpreter the replayed state is the state
the verify recurrence reached, bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from tests.kernels.test_gdn_triton import (NAN, assert_same, decode_case, gdn_mod,  # sets up the interpreter first
                                           nan_pool, shuffled_slots)
from tests.tolerances import assert_close, assert_error_within

from deltaserve.kernels.gated_delta_rule import ref as gdn_ref

gpu = pytest.mark.gpu


def multistep_case(n, tokens, dims, dtype, device, seed, state_dtype=torch.float32, pad=True, merged=False):
    """Inputs of fused_gdn_multistep for n rows x `tokens` tokens (row i's tokens at [i*tokens, (i+1)*tokens)):
    shuffled slots (one padding row in the middle if pad and n >= 3), NaN-poisoned pools, and NaN-filled per-position
    buffers that are slices of larger ones, as the cache hands them out ([:n, :tokens] of [n + 1, tokens + 1, ...]).
    Returns (kwargs without pools and buffers, conv pool, ssm pool, (conv out, y out, gates out))."""
    kw, _, _ = decode_case(n * tokens, dims, dtype, device, seed, pad=False, merged=merged)
    gen = torch.Generator().manual_seed(seed + 1000)
    num_slots = n + 4
    slots = shuffled_slots(n, num_slots, gen, pad)
    used = [s for s in slots if s >= 0]
    conv_dim = kw["conv_weight"].shape[0]
    conv_shape = (num_slots, kw["conv_weight"].shape[1] - 1, conv_dim)
    conv_pool = nan_pool(conv_shape, used, lambda shp: torch.randn(shp, generator=gen), dtype)
    ssm_pool = nan_pool((num_slots, dims[2], dims[1], dims[3]), used,
                        lambda shp: torch.randn(shp, generator=gen) * 0.3, state_dtype)
    kw.update(slots=torch.tensor(slots, device=device), tokens_per_row=tokens)
    outs = (torch.full((n + 1, tokens + 1, *conv_shape[1:]), NAN, dtype=dtype, device=device),
            torch.full((n + 1, tokens + 1, conv_dim), NAN, dtype=dtype, device=device),
            torch.full((n + 1, tokens + 1, 2, dims[2]), NAN, dtype=torch.float32, device=device))
    return kw, conv_pool.to(device), ssm_pool.to(device), outs


def views(kw, outs):
    """The [:n, :tokens] views of the buffers that a call writes."""
    n, tokens = kw["slots"].shape[0], kw["tokens_per_row"]
    return tuple(t[:n, :tokens] for t in outs)


def run_multistep(fn, kw, conv_pool, ssm_pool, outs):
    conv_out, y_out, gates_out = views(kw, outs)
    return fn(conv_state=conv_pool, ssm_state=ssm_pool, conv_states_out=conv_out, y_out=y_out, gates_out=gates_out,
              **kw)


def on_cpu(kw, tensors, upcast=False):
    cpu = {key: (val.cpu() if isinstance(val, torch.Tensor) else val) for key, val in kw.items()}
    tensors = [t.cpu().clone() for t in tensors]
    if upcast:
        cpu.update({key: cpu[key].float() for key in ("mixed_qkv", "a", "b", "dt_bias", "conv_weight")})
        tensors = [t.float() for t in tensors]
    return cpu, tensors


def run_ref_multistep(kw, conv_pool, ssm_pool, outs, upcast=False):
    cpu, (conv_pool, ssm_pool, *outs) = on_cpu(kw, [conv_pool, ssm_pool, *outs], upcast)
    return run_multistep(gdn_ref.fused_gdn_multistep, cpu, conv_pool, ssm_pool, outs), tuple(outs)


def heads(dims):
    return dict(num_k_heads=dims[0], head_k_dim=dims[1], num_v_heads=dims[2], head_v_dim=dims[3])


def replayed(replay, kw, ssm_pool, outs, dims, num_kept):
    """The live rows' states after committing their first num_kept[i] positions with `replay` (on a copy of the
    pool; its other slots hold NaN sentinels)."""
    live = (kw["slots"] >= 0).nonzero().squeeze(1)
    _, y_out, gates_out = views(kw, outs)
    pool = ssm_pool.clone()
    replay(states=pool.unsqueeze(0), ys=y_out.unsqueeze(0), gates=gates_out.unsqueeze(0), slots=kw["slots"][live],
           rows=live, num_kept=num_kept[live], **heads(dims))
    return pool[kw["slots"][live]]


def check_multistep(fn, n, tokens, dims, dtype, seed, state_dtype=torch.float32, pad=True, merged=False):
    kw, conv_pool, ssm_pool, outs = multistep_case(n, tokens, dims, dtype, "cpu", seed, state_dtype, pad, merged)
    pools_before = conv_pool.clone(), ssm_pool.clone()
    o_ref, outs_ref = run_ref_multistep(kw, conv_pool, ssm_pool, outs)
    o = run_multistep(fn, kw, conv_pool, ssm_pool, outs)
    assert o.dtype == dtype and o.shape == (n * tokens, dims[2], dims[3]) and not o.isnan().any()
    assert_same(conv_pool, pools_before[0])  # the pools are only read
    assert_same(ssm_pool, pools_before[1])
    live = kw["slots"] >= 0
    assert (o[~live.repeat_interleave(tokens)] == 0).all()  # padding rows' outputs are zeros
    for buf, ref_buf in zip(outs, outs_ref):
        # nothing written outside the live rows' first `tokens` positions (padding rows, the buffers' margins)
        assert buf[:n, :tokens][~live].isnan().all() and buf[n].isnan().all() and buf[:, tokens].isnan().all()
    (conv_out, y_out, gates_out), (conv_ref, y_ref, gates_ref) = views(kw, outs), views(kw, outs_ref)
    assert_same(conv_out[live], conv_ref[live])  # raw inputs: exact
    assert_close(gates_out[live], gates_ref[live], dtype=torch.float32)
    # the state after every row's last position, replayed by the kernel from its buffers, against the reference's
    every = torch.full((n,), tokens)
    state = replayed(gdn_mod().replay_kept_states, kw, ssm_pool, outs, dims, every)
    state_ref = replayed(gdn_ref.replay_kept_states, kw, ssm_pool, outs_ref, dims, every)
    if dtype == torch.float32:
        assert_close(o, o_ref)
        assert_close(y_out[live], y_ref[live])
        assert_close(state, state_ref, dtype=torch.float32)
    else:
        o_true, outs_true = run_ref_multistep(kw, *pools_before, outs, upcast=True)
        assert_error_within(o, o_ref, o_true)
        assert_error_within(y_out[live], y_ref[live], views(kw, outs_true)[1][live])
        state_true = replayed(gdn_ref.replay_kept_states, kw, pools_before[1].float(), outs_true, dims, every)
        assert_error_within(state, state_ref, state_true)
    return kw, o, outs


# (H, K, HV, V): GQA 2 with V = 24 split into a masked tail at BV 16; and 1 key head for 3 value heads (odd, GQA 3)
TINY = (2, 16, 4, 24)
ODD = (1, 16, 3, 16)


@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 5])
def test_multistep_interpreter_fp32(tokens):
    check_multistep(gdn_mod().fused_gdn_multistep, 3, tokens, TINY, torch.float32, seed=tokens)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_multistep_interpreter_bf16(state_dtype):
    check_multistep(gdn_mod().fused_gdn_multistep, 3, 3, ODD, torch.bfloat16, seed=30, state_dtype=state_dtype,
                    merged=True)


def test_multistep_interpreter_bf16_state_fp32_activations():
    check_multistep(gdn_mod().fused_gdn_multistep, 4, 2, ODD, torch.float32, seed=31, state_dtype=torch.bfloat16)


def test_multistep_interpreter_only_padding():
    kw, conv_pool, ssm_pool, outs = multistep_case(2, 2, ODD, torch.float32, "cpu", 32)
    kw["slots"] = torch.tensor([-1, -1])
    o = run_multistep(gdn_mod().fused_gdn_multistep, kw, conv_pool, ssm_pool, outs)
    assert (o == 0).all() and all(t.isnan().all() for t in outs)


@pytest.mark.parametrize("block_v", [8, 32])
def test_multistep_interpreter_tilings(block_v):
    mod = gdn_mod()

    def fn(**kw):
        return mod.fused_gdn_multistep_launch(block_v=block_v, num_warps=1, block_c=64, **kw)

    check_multistep(fn, 2, 3, TINY, torch.float32, seed=33 + block_v)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_replay_reaches_the_verify_recurrences_state_interpreter(state_dtype):
    """The replay of the first j positions (every j, rows in another order, several layers) gives, bit for bit, the
    state the verify kernel's recurrence reached there, which is the state j decode steps leave (the decode kernel
    run j times on a copy of the pools)."""
    mod = gdn_mod()
    n, tokens = 3, 4
    kw, conv_pool, ssm_pool, outs = multistep_case(n, tokens, TINY, torch.bfloat16, "cpu", 70,
                                                   state_dtype=state_dtype, pad=False)
    run_multistep(mod.fused_gdn_multistep, kw, conv_pool, ssm_pool, outs)
    seq_conv, seq_ssm = conv_pool.clone(), ssm_pool.clone()
    after = []
    per_token = {key: kw[key].view(n, tokens, -1) for key in ("mixed_qkv", "a", "b")}
    fixed = {key: val for key, val in kw.items() if key not in per_token and key != "tokens_per_row"}
    for j in range(tokens):
        mod.fused_gdn_decode(**{key: val[:, j] for key, val in per_token.items()}, **fixed, conv_state=seq_conv,
                             ssm_state=seq_ssm)
        after.append(seq_ssm.clone())
    _, y_out, gates_out = views(kw, outs)
    layers = 2  # a stack: layer 1 holds the same buffers shifted, so each layer is checked on its own
    for j in range(1, tokens + 1):
        states = torch.stack([ssm_pool, ssm_pool]).clone()
        order = torch.tensor([2, 0, 1])
        mod.replay_kept_states(states=states, ys=torch.stack([y_out] * layers), gates=torch.stack([gates_out] * layers),
                               slots=kw["slots"][order], rows=order, num_kept=torch.full((n,), j), **heads(TINY))
        for layer in range(layers):
            assert_same(states[layer], after[j - 1])


def test_replay_kept_counts_per_row_interpreter():
    """Each row its own kept count (1 .. k, and rows absent from the call), against the reference."""
    mod = gdn_mod()
    kw, conv_pool, ssm_pool, outs = multistep_case(4, 3, ODD, torch.float32, "cpu", 71, pad=False)
    run_multistep(mod.fused_gdn_multistep, kw, conv_pool, ssm_pool, outs)
    _, y_out, gates_out = views(kw, outs)
    rows, num_kept = torch.tensor([3, 0, 2]), torch.tensor([1, 3, 2])
    got, expected = ssm_pool.clone(), ssm_pool.clone()
    for replay, pool in ((mod.replay_kept_states, got), (gdn_ref.replay_kept_states, expected)):
        replay(states=pool.unsqueeze(0), ys=y_out.unsqueeze(0), gates=gates_out.unsqueeze(0), slots=kw["slots"][rows],
               rows=rows, num_kept=num_kept, **heads(ODD))
    assert_close(got[kw["slots"]], expected[kw["slots"]], dtype=torch.float32)  # the other slots: NaN sentinels
    untouched = kw["slots"][1]
    assert_same(got[untouched], ssm_pool[untouched])


def test_cache_commit_through_the_kernels_reaches_sequential_decode_interpreter(monkeypatch):
    """Every GDN layer of the tiny model: the kernels' verify of k = 3 tokens into the cache's own buffers (4
    positions, a padding row), then ModelCache.commit_verified with the kernels' commit (install + replay over the
    stacked buffers): each slot's conv window and state equal those of its kept number of sequential decode steps
    (the decode kernels on copies of the pools), bit for bit."""
    from benchmarks.common import model_config
    from deltaserve.cache import tensors
    from deltaserve.cache.tensors import CacheShape, ModelCache
    from deltaserve.config import RankShapes

    mod = gdn_mod()
    monkeypatch.setattr(tensors, "install_kept_states", mod.install_kept_states)
    monkeypatch.setattr(tensors, "replay_kept_states", mod.replay_kept_states)
    cfg = model_config("tiny")
    shapes = RankShapes.for_rank(cfg)
    dims = (shapes.linear_num_key_heads, shapes.linear_key_head_dim, shapes.linear_num_value_heads,
            shapes.linear_value_head_dim)
    cache = ModelCache(cfg, CacheShape(num_pages=2, page_size=4, num_slots=6, kv_dtype=torch.float32,
                                       conv_dtype=torch.float32), device="cpu", verify_rows=3, verify_positions=4)
    slots, n, k = torch.tensor([4, 1, -1]), 3, 3
    kept = torch.tensor([3, 2])  # the live rows' kept counts
    expected = []
    for i, layer in enumerate(cfg.linear_attention_layers):
        gdn = cache.gdn(layer)
        kw, conv_pool, ssm_pool = decode_case(n * k, dims, torch.float32, "cpu", seed=80 + i, pad=False,
                                              width=shapes.conv_kernel)
        gdn.conv.copy_(conv_pool[:6].nan_to_num())
        gdn.ssm.copy_(ssm_pool[:6].nan_to_num())
        kw.update(slots=slots, tokens_per_row=k)
        mod.fused_gdn_multistep(**kw, conv_state=gdn.conv, ssm_state=gdn.ssm, conv_states_out=gdn.conv_steps[:n, :k],
                                y_out=gdn.y_steps[:n, :k], gates_out=gdn.gate_steps[:n, :k])
        seq_conv, seq_ssm, after = gdn.conv.clone(), gdn.ssm.clone(), []
        per_token = {key: kw[key].view(n, k, -1) for key in ("mixed_qkv", "a", "b")}
        fixed = {key: val for key, val in kw.items() if key not in per_token and key != "tokens_per_row"}
        for j in range(k):
            mod.fused_gdn_decode(**{key: val[:, j] for key, val in per_token.items()}, **fixed, conv_state=seq_conv,
                                 ssm_state=seq_ssm)
            after.append((seq_conv.clone(), seq_ssm.clone()))
        expected.append(after)
    cache.commit_verified(slots[:2], kept)
    for layer, after in zip(cfg.linear_attention_layers, expected):
        gdn = cache.gdn(layer)
        for slot, count in zip(slots[:2].tolist(), kept.tolist()):
            assert_same(gdn.conv[slot], after[count - 1][0][slot])
            assert_same(gdn.ssm[slot], after[count - 1][1][slot])


# ---------------------------------------------------------------------------------------------------------------------
# GPU: model shapes (K = V = 128, 16 key heads) against the reference

GPU_DIMS = {"9B": (16, 128, 32, 128), "27B": (16, 128, 48, 128)}


@gpu
@pytest.mark.parametrize("model", list(GPU_DIMS))
@pytest.mark.parametrize("n,tokens", [(1, 4), (3, 2), (8, 4), (33, 5)])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_multistep_gpu_matches_reference(model, n, tokens, state_dtype):
    """Outputs, kept buffers and the replayed states at model shapes, bf16 activations, against the reference."""
    dims = GPU_DIMS[model]
    kw, conv_pool, ssm_pool, outs = multistep_case(n, tokens, dims, torch.bfloat16, "cuda", seed=n + tokens,
                                                   state_dtype=state_dtype, merged=True)
    pools_before = conv_pool.clone(), ssm_pool.clone()
    o_ref, outs_ref = run_ref_multistep(kw, conv_pool, ssm_pool, outs)
    o = run_multistep(gdn_mod().fused_gdn_multistep, kw, conv_pool, ssm_pool, outs)
    assert_same(conv_pool, pools_before[0])
    assert_same(ssm_pool, pools_before[1])
    live = (kw["slots"] >= 0).cpu()
    assert (o.view(n, tokens, -1)[live.cuda().logical_not()] == 0).all()
    o_true, outs_true = run_ref_multistep(kw, *pools_before, outs, upcast=True)
    assert_error_within(o.cpu(), o_ref, o_true)
    (conv_out, _, gates_out), (conv_ref, _, gates_ref) = views(kw, outs), views(kw, outs_ref)
    assert_same(conv_out.cpu()[live], conv_ref[live])
    assert_close(gates_out.cpu()[live], gates_ref[live], dtype=torch.float32)
    every = torch.full((n,), tokens)
    state = replayed(gdn_mod().replay_kept_states, kw, ssm_pool, outs, dims, every.cuda())
    cpu_kw, _ = on_cpu(kw, [])
    state_ref = replayed(gdn_ref.replay_kept_states, cpu_kw, ssm_pool.cpu(), outs_ref, dims, every)
    state_true = replayed(gdn_ref.replay_kept_states, cpu_kw, pools_before[1].cpu().float(), outs_true, dims, every)
    assert_error_within(state.cpu(), state_ref, state_true)


@gpu
@pytest.mark.parametrize("block_v,num_warps", [(8, 1), (16, 1), (32, 2), (64, 4), (128, 8)])
def test_multistep_gpu_tile_configs(block_v, num_warps):
    mod = gdn_mod()
    kw, conv_pool, ssm_pool, outs = multistep_case(6, 4, GPU_DIMS["27B"], torch.bfloat16, "cuda",
                                                   seed=block_v + num_warps)
    ref_outs = tuple(t.clone() for t in outs)
    o_ref = run_multistep(mod.fused_gdn_multistep, kw, conv_pool, ssm_pool, ref_outs)
    o = run_multistep(lambda **a: mod.fused_gdn_multistep_launch(block_v=block_v, num_warps=num_warps, **a), kw,
                      conv_pool, ssm_pool, outs)
    live = (kw["slots"] >= 0).cuda()
    assert_close(o, o_ref)
    for buf, ref_buf in zip(views(kw, outs), views(kw, ref_outs)):
        assert_close(buf[live].float(), ref_buf[live].float(), dtype=torch.float32)


@gpu
@pytest.mark.parametrize("n", [1, 8])
def test_multistep_and_replay_cuda_graph(n):
    """Capture the multistep and a replay of its first positions, then replay the graph on new inputs (two rows
    turned into padding when there are enough): same o, buffers and committed states as eager, the pools untouched
    by the multistep."""
    mod = gdn_mod()
    tokens, dims = 4, GPU_DIMS["27B"]
    kw, conv_pool, ssm_pool, outs = multistep_case(n, tokens, dims, torch.bfloat16, "cuda", seed=50)
    static = {key: (val.clone() if isinstance(val, torch.Tensor) else val) for key, val in kw.items()}
    g_outs = tuple(t.clone() for t in outs)
    g_pool = ssm_pool.clone()
    kept = torch.full((n,), 2, device="cuda")
    rows = torch.arange(n, device="cuda")
    g_slots = torch.arange(n, device="cuda") + ssm_pool.shape[0] - n  # the replay's slots: distinct, real

    def body():
        out = run_multistep(mod.fused_gdn_multistep, static, conv_pool, ssm_pool, g_outs)
        _, y_out, gates_out = views(static, g_outs)
        mod.replay_kept_states(states=g_pool.unsqueeze(0), ys=y_out.unsqueeze(0), gates=gates_out.unsqueeze(0),
                               slots=g_slots, rows=rows, num_kept=kept, **heads(dims))
        return out

    body()  # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = body()
    for step in range(3):
        fresh, _, _, _ = multistep_case(n, tokens, dims, torch.bfloat16, "cuda", seed=60 + step)
        fresh["slots"] = kw["slots"].clone()
        if n >= 4:
            fresh["slots"][[1, 3]] = -1
        e_outs = tuple(t.clone() for t in outs)
        e_pool = ssm_pool.clone()
        expected = run_multistep(mod.fused_gdn_multistep, fresh, conv_pool, ssm_pool, e_outs)
        _, y_e, gates_e = views(fresh, e_outs)
        mod.replay_kept_states(states=e_pool.unsqueeze(0), ys=y_e.unsqueeze(0), gates=gates_e.unsqueeze(0),
                               slots=g_slots, rows=rows, num_kept=kept, **heads(dims))
        for g_buf, o_buf in zip(g_outs, outs):
            g_buf.copy_(o_buf)
        g_pool.copy_(ssm_pool)
        for key, val in fresh.items():
            if isinstance(val, torch.Tensor):
                static[key].copy_(val)
        graph.replay()
        torch.cuda.synchronize()
        assert_same(out, expected)
        live = fresh["slots"] >= 0
        for g_buf, e_buf in zip(views(static, g_outs), views(fresh, e_outs)):
            assert_same(g_buf[live], e_buf[live])
        assert_same(g_pool[g_slots[live]], e_pool[g_slots[live]])
