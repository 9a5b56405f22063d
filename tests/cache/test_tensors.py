"""Cache tensor sizes: the planner's per-page and per-slot bytes at the published 27B shapes, and the tensors a
ModelCache allocates for each KV format (quantized pages with their scales)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.common import model_config
from deltaserve.cache.tensors import (CacheShape, ModelCache, kv_bytes_per_page, kv_page_dtype,
                                      state_bytes_per_slot, verify_bytes_per_position)
from deltaserve.config import RankShapes


@pytest.mark.parametrize("kv,per_token", [("auto", 65536), ("fp8", 33280), ("int8", 33280), ("int4", 16896)])
def test_27b_kv_bytes_per_token_count_the_scales(kv, per_token):
    """16 attention layers x K and V x 4 heads x (256 values + a 4-byte scale when quantized; int4: 128 bytes)."""
    cfg = model_config("27B")
    dtype = kv_page_dtype(kv, torch.bfloat16)
    assert kv_bytes_per_page(RankShapes.for_rank(cfg), 16, dtype, num_layers=16) == 16 * per_token


@pytest.mark.parametrize("state,nbytes", [("float32", 150_994_944 + 2_949_120), ("bfloat16", 75_497_472 + 2_949_120)])
def test_27b_state_bytes_per_slot(state, nbytes):
    """48 GDN layers x 48 heads x 128 x 128 recurrent state, plus the bf16 conv window (3 x 10240 per layer)."""
    cfg = model_config("27B")
    assert state_bytes_per_slot(RankShapes.for_rank(cfg), 48, torch.bfloat16, getattr(torch, state)) == nbytes


@pytest.mark.parametrize("kv", ["auto", "fp8", "int8", "int4"])
def test_model_cache_allocates_pages_and_scales(kv):
    cfg = model_config("tiny")  # head_dim 32, 2 KV heads
    shapes = RankShapes.for_rank(cfg)
    dtype = kv_page_dtype(kv, torch.float32)
    shape = CacheShape(num_pages=3, page_size=4, num_slots=2, kv_dtype=dtype, conv_dtype=torch.float32,
                       state_dtype=torch.bfloat16)
    cache = ModelCache(cfg, shape, device="cpu")
    pages = cache.attention(cfg.full_attention_layers[0])
    assert pages.k.shape == (3, 4, 2, 16 if kv == "int4" else 32) and pages.v.dtype == dtype
    if kv == "auto":
        assert pages.k_scale is None and pages.v_scale is None
    else:
        assert pages.k_scale.shape == (3, 4, 2) and pages.v_scale.dtype == torch.float32
    assert cache.gdn(cfg.linear_attention_layers[0]).ssm.dtype == torch.bfloat16
    kv_bytes = kv_bytes_per_page(shapes, 4, dtype, num_layers=len(cfg.full_attention_layers)) * 3
    state_bytes = state_bytes_per_slot(shapes, len(cfg.linear_attention_layers), torch.float32, torch.bfloat16) * 2
    assert cache.nbytes() == kv_bytes + state_bytes


def test_commit_verified_is_the_kernels_commit_for_every_layer():
    """The cache's commit after a verify step installs what commit_gdn_states installs in each layer's pools."""
    from deltaserve.kernels.gated_delta_rule import commit_gdn_states

    cfg = model_config("tiny")
    shape = CacheShape(num_pages=3, page_size=4, num_slots=5, kv_dtype=torch.float32, conv_dtype=torch.float32)
    cache = ModelCache(cfg, shape, device="cpu", verify_rows=3, verify_positions=4)
    gen = torch.Generator().manual_seed(0)
    layers = [cache.gdn(i) for i in cfg.linear_attention_layers]
    for gdn in layers:
        for t in gdn:
            t.copy_(torch.randn(t.shape, generator=gen))
    slots, kept = torch.tensor([4, 0, 2]), torch.tensor([2, 4, 1])
    before = layers[0].ssm.clone()
    expected = [(gdn.conv.clone(), gdn.ssm.clone()) for gdn in layers]
    heads = dict(num_k_heads=cfg.linear_num_key_heads, head_k_dim=cfg.linear_key_head_dim,
                 num_v_heads=cfg.linear_num_value_heads, head_v_dim=cfg.linear_value_head_dim)
    for (conv, ssm), gdn in zip(expected, layers):
        commit_gdn_states(conv_state=conv, ssm_state=ssm, slots=slots, conv_states_out=gdn.conv_steps,
                          y_out=gdn.y_steps, gates_out=gdn.gate_steps, num_accepted=kept, **heads)
    cache.commit_verified(slots, kept)
    for (conv, ssm), gdn in zip(expected, layers):
        assert torch.equal(gdn.conv, conv) and torch.equal(gdn.ssm, ssm)
    assert torch.equal(layers[0].conv[4], layers[0].conv_steps[0, 1]) and not torch.equal(layers[0].ssm, before)


def test_verify_buffers_are_what_the_planner_counts():
    """The per-position buffers a verify step keeps (conv windows, post-conv rows, gates) take exactly rows x positions
    x verify_bytes_per_position, the planner's figure; at 27B that is ~4 MB a position (not a 147 MiB state)."""
    cfg = model_config("tiny")
    shape = CacheShape(num_pages=1, page_size=4, num_slots=2, kv_dtype=torch.bfloat16, conv_dtype=torch.bfloat16)
    plain = ModelCache(cfg, shape, device="cpu").nbytes()
    verify = ModelCache(cfg, shape, device="cpu", verify_rows=3, verify_positions=4).nbytes()
    per_position = verify_bytes_per_position(RankShapes.for_rank(cfg), len(cfg.linear_attention_layers), torch.bfloat16)
    assert verify - plain == 3 * 4 * per_position > 0
    big = model_config("27B")
    assert verify_bytes_per_position(RankShapes.for_rank(big), 48, torch.bfloat16) == 48 * (4 * 10240 * 2 + 2 * 48 * 4)



def test_the_mtp_heads_hidden_state_is_a_slots_state():
    """With an MTP head each slot keeps one hidden state (model dtype): counted in the planner's slot bytes, in the
    cache's bytes with the head's KV pages, and copied with the GDN states (into and out of checkpoints)."""
    cfg = model_config("tiny")
    shapes = RankShapes.for_rank(cfg)
    shape = CacheShape(num_pages=2, page_size=4, num_slots=3, kv_dtype=torch.float32, conv_dtype=torch.float32)
    plain, mtp = ModelCache(cfg, shape, device="cpu"), ModelCache(cfg, shape, device="cpu", with_mtp=True)
    layers = len(cfg.linear_attention_layers)
    slot_bytes = state_bytes_per_slot(shapes, layers, torch.float32, torch.float32, cfg.hidden_size)
    assert slot_bytes - state_bytes_per_slot(shapes, layers, torch.float32, torch.float32) == cfg.hidden_size * 4
    assert mtp.nbytes() - plain.nbytes() == kv_bytes_per_page(shapes, 4, torch.float32, num_layers=1) * 2 + \
        cfg.hidden_size * 4 * 3
    assert plain.mtp_hidden is None and mtp.mtp_hidden.shape == (3, cfg.hidden_size)
    mtp.mtp_hidden.copy_(torch.randn(3, cfg.hidden_size))
    ssm = mtp.gdn(cfg.linear_attention_layers[0]).ssm
    ssm.copy_(torch.randn_like(ssm))
    want_hidden, want_ssm = mtp.mtp_hidden[0].clone(), ssm[0].clone()
    mtp.copy_states(torch.tensor([0]), torch.tensor([2]))
    assert torch.equal(mtp.mtp_hidden[2], want_hidden) and torch.equal(ssm[2], want_ssm)
