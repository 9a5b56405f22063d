"""The fused multi-token GDN verify kernels (``fused_gdn_multistep``, MULTISTEP_KERNEL "fused") against the reference
and against the chained decode kernels they replace.

CPU (CI): under TRITON_INTERPRET=1 at tiny shapes (set up by test_gdn_triton's import: the interpreter's rounding
patch too). GPU (`pytest -m gpu`): the 9B and 27B GDN shapes against the chained path, NaN-poisoned pools and
buffers, CUDA graph capture and replay.

Tolerances: against the reference, fp32 activations use the fp32 tolerance (1e-5: both sides run the same fp32 ops;
only the order of a few reductions differs); bf16 activations the kernel policy (error against the fp32 pipeline
within 2x that of the reference run in bf16), as the decode kernel's tests. The fused and the chained path run the
same device functions on the same values in the same order, so on the interpreter they agree bit for bit; on the GPU
the states are held to the fp32 tolerance and o to its dtype's (a different schedule may contract an FMA
differently, which a bf16 rounding of o can turn into one ulp).
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
    Returns (kwargs without pools and buffers, conv pool, ssm pool, conv out, ssm out)."""
    kw, _, _ = decode_case(n * tokens, dims, dtype, device, seed, pad=False, merged=merged)
    gen = torch.Generator().manual_seed(seed + 1000)
    num_slots = n + 4
    slots = shuffled_slots(n, num_slots, gen, pad)
    used = [s for s in slots if s >= 0]
    conv_shape = (num_slots, kw["conv_weight"].shape[1] - 1, kw["conv_weight"].shape[0])
    conv_pool = nan_pool(conv_shape, used, lambda shp: torch.randn(shp, generator=gen), dtype)
    ssm_pool = nan_pool((num_slots, dims[2], dims[1], dims[3]), used,
                        lambda shp: torch.randn(shp, generator=gen) * 0.3, state_dtype)
    kw.update(slots=torch.tensor(slots, device=device), tokens_per_row=tokens)
    conv_out = torch.full((n + 1, tokens + 1, *conv_shape[1:]), NAN, dtype=dtype, device=device)
    ssm_out = torch.full((n + 1, tokens + 1, *ssm_pool.shape[1:]), NAN, dtype=state_dtype, device=device)
    return kw, conv_pool.to(device), ssm_pool.to(device), conv_out, ssm_out


def run_multistep(fn, kw, conv_pool, ssm_pool, conv_out, ssm_out):
    n, tokens = kw["slots"].shape[0], kw["tokens_per_row"]
    return fn(conv_state=conv_pool, ssm_state=ssm_pool, conv_states_out=conv_out[:n, :tokens],
              ssm_states_out=ssm_out[:n, :tokens], **kw)


def run_ref_multistep(kw, conv_pool, ssm_pool, conv_out, ssm_out, upcast=False):
    cpu = {key: (val.cpu() if isinstance(val, torch.Tensor) else val) for key, val in kw.items()}
    conv_pool, ssm_pool, conv_out, ssm_out = (t.cpu().clone() for t in (conv_pool, ssm_pool, conv_out, ssm_out))
    if upcast:
        cpu.update({key: cpu[key].float() for key in ("mixed_qkv", "a", "b", "dt_bias", "conv_weight")})
        conv_pool, conv_out = conv_pool.float(), conv_out.float()
    o = run_multistep(gdn_ref.fused_gdn_multistep, cpu, conv_pool, ssm_pool, conv_out, ssm_out)
    return o, conv_out, ssm_out


def check_multistep(fn, n, tokens, dims, dtype, seed, state_dtype=torch.float32, pad=True, merged=False):
    kw, conv_pool, ssm_pool, conv_out, ssm_out = multistep_case(n, tokens, dims, dtype, "cpu", seed, state_dtype,
                                                                pad, merged)
    pools_before = conv_pool.clone(), ssm_pool.clone()
    o_ref, conv_ref, ssm_ref = run_ref_multistep(kw, conv_pool, ssm_pool, conv_out, ssm_out)
    o = run_multistep(fn, kw, conv_pool, ssm_pool, conv_out, ssm_out)
    assert o.dtype == dtype and o.shape == (n * tokens, dims[2], dims[3]) and not o.isnan().any()
    assert_same(conv_pool, pools_before[0])  # the pools are only read
    assert_same(ssm_pool, pools_before[1])
    live = kw["slots"] >= 0
    rows = live.repeat_interleave(tokens)
    assert (o[~rows] == 0).all()  # padding rows' outputs are zeros
    # nothing written outside the live rows' first `tokens` positions (padding rows, the buffers' margins)
    assert conv_out[:n, :tokens][~live].isnan().all() and ssm_out[:n, :tokens][~live].isnan().all()
    assert conv_out[n].isnan().all() and conv_out[:, tokens].isnan().all()
    assert ssm_out[n].isnan().all() and ssm_out[:, tokens].isnan().all()
    assert_same(conv_out[:n, :tokens][live], conv_ref[:n, :tokens][live])  # raw inputs: exact
    if dtype == torch.float32:
        assert_close(o, o_ref)
        assert_close(ssm_out[:n, :tokens][live], ssm_ref[:n, :tokens][live], dtype=torch.float32)
    else:
        o_true, _, ssm_true = run_ref_multistep(kw, pools_before[0], pools_before[1], conv_out, ssm_out, upcast=True)
        assert_error_within(o, o_ref, o_true)
        assert_error_within(ssm_out[:n, :tokens][live], ssm_ref[:n, :tokens][live], ssm_true[:n, :tokens][live])
    return kw, o, conv_out, ssm_out


# (H, K, HV, V): GQA 2 with V = 24 split into a masked tail at BV 16; and 1 key head for 3 value heads (odd, GQA 3)
TINY = (2, 16, 4, 24)
ODD = (1, 16, 3, 16)


@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 5])
def test_multistep_interpreter_fp32(tokens):
    check_multistep(gdn_mod().fused_gdn_multistep_fused, 3, tokens, TINY, torch.float32, seed=tokens)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_multistep_interpreter_bf16(state_dtype):
    check_multistep(gdn_mod().fused_gdn_multistep_fused, 3, 3, ODD, torch.bfloat16, seed=30,
                    state_dtype=state_dtype, merged=True)


def test_multistep_interpreter_bf16_state_fp32_activations():
    check_multistep(gdn_mod().fused_gdn_multistep_fused, 4, 2, ODD, torch.float32, seed=31,
                    state_dtype=torch.bfloat16)


def test_multistep_interpreter_only_padding():
    kw, conv_pool, ssm_pool, conv_out, ssm_out = multistep_case(2, 2, ODD, torch.float32, "cpu", 32)
    kw["slots"] = torch.tensor([-1, -1])
    o = run_multistep(gdn_mod().fused_gdn_multistep_fused, kw, conv_pool, ssm_pool, conv_out, ssm_out)
    assert (o == 0).all() and conv_out.isnan().all() and ssm_out.isnan().all()


@pytest.mark.parametrize("block_v", [8, 32])
def test_multistep_interpreter_tilings(block_v):
    mod = gdn_mod()

    def fn(**kw):
        return mod.fused_gdn_multistep_launch(block_v=block_v, num_warps=1, block_c=64, **kw)

    check_multistep(fn, 2, 3, TINY, torch.float32, seed=33 + block_v)


def test_multistep_switch_fused_equals_chained_interpreter(monkeypatch):
    """The entry point by MULTISTEP_KERNEL: both paths give the same o and kept states bit for bit (live rows; the
    chained path writes a copy of slot 0's states for padding rows, which nothing reads)."""
    mod = gdn_mod()
    results = {}
    for kind in ("chained", "fused"):
        monkeypatch.setattr(mod, "MULTISTEP_KERNEL", kind)
        kw, conv_pool, ssm_pool, conv_out, ssm_out = multistep_case(3, 3, TINY, torch.bfloat16, "cpu", 34,
                                                                    state_dtype=torch.bfloat16)
        results[kind] = (run_multistep(mod.fused_gdn_multistep, kw, conv_pool, ssm_pool, conv_out, ssm_out),
                         conv_out, ssm_out)
    live = kw["slots"] >= 0
    (o1, c1, s1), (o2, c2, s2) = results["chained"], results["fused"]
    assert_same(o2, o1)
    assert_same(c2[:3, :3][live], c1[:3, :3][live])
    assert_same(s2[:3, :3][live], s1[:3, :3][live])
    monkeypatch.setattr(mod, "MULTISTEP_KERNEL", "other")
    with pytest.raises(ValueError, match="MULTISTEP_KERNEL"):
        run_multistep(mod.fused_gdn_multistep, kw, conv_pool, ssm_pool, conv_out, ssm_out)


# ---------------------------------------------------------------------------------------------------------------------
# GPU: model shapes (K = V = 128, 16 key heads) against the chained path

GPU_DIMS = {"9B": (16, 128, 32, 128), "27B": (16, 128, 48, 128)}


def run_both_gpu(kw, conv_pool, ssm_pool, conv_out, ssm_out):
    """(fused, chained) results on copies of the pools and buffers: (o, conv pool, ssm pool, conv out, ssm out)."""
    mod = gdn_mod()
    out = []
    for fn in (mod.fused_gdn_multistep_fused, mod.fused_gdn_multistep_chained):
        bufs = [t.clone() for t in (conv_pool, ssm_pool, conv_out, ssm_out)]
        out.append((run_multistep(fn, kw, *bufs), *bufs))
    return out


def check_against_chained_gpu(kw, conv_pool, ssm_pool, conv_out, ssm_out):
    n, tokens = kw["slots"].shape[0], kw["tokens_per_row"]
    (o, cp, sp, co, so), (o_c, _, _, co_c, so_c) = run_both_gpu(kw, conv_pool, ssm_pool, conv_out, ssm_out)
    assert not o.isnan().any()
    assert_same(cp, conv_pool)
    assert_same(sp, ssm_pool)
    live = (kw["slots"] >= 0).cuda()
    assert (o.view(n, tokens, -1)[~live] == 0).all()
    assert co[:n, :tokens][~live].isnan().all() and so[:n, :tokens][~live].isnan().all()
    assert co[n].isnan().all() and so[n].isnan().all() and co[:, tokens].isnan().all() and so[:, tokens].isnan().all()
    assert_same(co[:n, :tokens][live], co_c[:n, :tokens][live])
    assert_close(o, o_c)
    assert_close(so[:n, :tokens][live], so_c[:n, :tokens][live], dtype=torch.float32)


@gpu
@pytest.mark.parametrize("model", list(GPU_DIMS))
@pytest.mark.parametrize("n,tokens", [(1, 4), (3, 2), (8, 4), (33, 5)])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_multistep_gpu_matches_chained(model, n, tokens, state_dtype):
    case = multistep_case(n, tokens, GPU_DIMS[model], torch.bfloat16, "cuda", seed=n + tokens,
                          state_dtype=state_dtype, merged=True)
    check_against_chained_gpu(*case)


@gpu
def test_multistep_gpu_matches_reference():
    """One small model-shape case against the CPU reference (the chained path is itself checked against it)."""
    check = dict(n=3, tokens=4, dims=GPU_DIMS["27B"], dtype=torch.float32)
    kw, conv_pool, ssm_pool, conv_out, ssm_out = multistep_case(check["n"], check["tokens"], check["dims"],
                                                                check["dtype"], "cuda", seed=40)
    o_ref, conv_ref, ssm_ref = run_ref_multistep(kw, conv_pool, ssm_pool, conv_out, ssm_out)
    o = run_multistep(gdn_mod().fused_gdn_multistep_fused, kw, conv_pool, ssm_pool, conv_out, ssm_out)
    live = (kw["slots"] >= 0).cpu()
    assert_close(o, o_ref)
    assert_same(conv_out.cpu()[:3, :4][live], conv_ref[:3, :4][live])
    assert_close(ssm_out.cpu()[:3, :4][live], ssm_ref[:3, :4][live], dtype=torch.float32)


@gpu
@pytest.mark.parametrize("block_v,num_warps", [(8, 1), (16, 1), (32, 2), (64, 4), (128, 8)])
def test_multistep_gpu_tile_configs(block_v, num_warps):
    mod = gdn_mod()
    kw, conv_pool, ssm_pool, conv_out, ssm_out = multistep_case(6, 4, GPU_DIMS["27B"], torch.bfloat16, "cuda",
                                                                seed=block_v + num_warps)
    ref_so = ssm_out.clone()
    o_ref = run_multistep(mod.fused_gdn_multistep_chained, kw, conv_pool.clone(), ssm_pool.clone(), conv_out.clone(),
                          ref_so)
    o = run_multistep(lambda **a: mod.fused_gdn_multistep_launch(block_v=block_v, num_warps=num_warps, **a), kw,
                      conv_pool, ssm_pool, conv_out, ssm_out)
    live = (kw["slots"] >= 0).cuda()
    assert_close(o, o_ref)
    assert_close(ssm_out[:6, :4][live], ref_so[:6, :4][live], dtype=torch.float32)


@gpu
@pytest.mark.parametrize("n", [1, 8])
def test_multistep_cuda_graph(n):
    """Capture the fused path, then replay on new inputs (two rows turned into padding when there are enough):
    same o and kept states as eager, the pools untouched."""
    mod = gdn_mod()
    tokens = 4
    kw, conv_pool, ssm_pool, conv_out, ssm_out = multistep_case(n, tokens, GPU_DIMS["27B"], torch.bfloat16, "cuda",
                                                                seed=50)
    static = {key: (val.clone() if isinstance(val, torch.Tensor) else val) for key, val in kw.items()}
    g_conv_out, g_ssm_out = conv_out.clone(), ssm_out.clone()
    run_multistep(mod.fused_gdn_multistep, static, conv_pool, ssm_pool, g_conv_out, g_ssm_out)  # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run_multistep(mod.fused_gdn_multistep, static, conv_pool, ssm_pool, g_conv_out, g_ssm_out)
    for step in range(3):
        fresh, _, _, _, _ = multistep_case(n, tokens, GPU_DIMS["27B"], torch.bfloat16, "cuda", seed=60 + step)
        fresh["slots"] = kw["slots"].clone()
        if n >= 4:
            fresh["slots"][[1, 3]] = -1
        e_conv_out, e_ssm_out = conv_out.clone(), ssm_out.clone()
        expected = run_multistep(mod.fused_gdn_multistep, fresh, conv_pool, ssm_pool, e_conv_out, e_ssm_out)
        g_conv_out.copy_(conv_out)
        g_ssm_out.copy_(ssm_out)
        for key, val in fresh.items():
            if isinstance(val, torch.Tensor):
                static[key].copy_(val)
        graph.replay()
        torch.cuda.synchronize()
        assert_same(out, expected)
        assert_same(g_conv_out, e_conv_out)
        assert_same(g_ssm_out, e_ssm_out)
