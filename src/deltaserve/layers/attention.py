"""Gated full attention: per-head [query | gate] q_proj, q/k zero-centred RMSNorm, partial RoPE, GQA over paged KV,
sigmoid output gate before o_proj."""

from __future__ import annotations

import torch
from torch import nn

from deltaserve.cache.tensors import KVPages
from deltaserve.config import ModelConfig, RankShapes, env_flag
from deltaserve.kernels.activation import sigmoid_gate_mul
from deltaserve.kernels.attention import paged_attention_decode, paged_attention_prefill, qk_norm_rope_write_kv
from deltaserve.layers.linear import Linear, MergedLinear
from deltaserve.layers.forward_batch import ForwardBatch, QueryRows
from deltaserve.layers.norm import RMSNorm
from deltaserve.parallel import sharding

# Rows of k > 1 new tokens each (batch.tokens_per_row = k, the verify steps of speculative decoding): "decode" runs
# them through the split-KV decode kernel (the k queries of a whole GQA group as one tile's rows, each KV page read
# once, a causal mask per query), "prefill" through the causal varlen kernel as before. Module-level so a benchmark
# can A/B the two (set it before CUDA graphs are captured); DELTASERVE_VERIFY_ATTENTION=prefill sets it at import.
VERIFY_ATTENTION = env_flag("DELTASERVE_VERIFY_ATTENTION", "decode")
# The decode kernel takes such rows while k x (q heads per KV head) is at most this (its tile's rows; the fp32
# accumulator alone is that many rows x head_dim over the warps' registers): 27B (6 per KV head) up to k = 10.
MAX_VERIFY_TILE_ROWS = 64


class GatedAttention(nn.Module):
    """Owns its projection weights (sized for its rank); its K/V pages ([P, page_size, Hkv, D] each, or quantized
    pages with their scales) are passed in per call."""

    def __init__(self, config: ModelConfig, shapes: RankShapes, *, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = shapes.num_heads, shapes.num_kv_heads, shapes.head_dim
        self.rotary_dim, self.rope_theta = config.rotary_dim, config.rope_theta
        self.scale = self.head_dim ** -0.5
        d, q_out, kv_out = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = MergedLinear(d, {"q_proj": 2 * q_out, "k_proj": kv_out, "v_proj": kv_out}, dtype=dtype,
                                     device=device)
        self.o_proj = Linear(q_out, d, dtype=dtype, device=device)
        # tensor parallelism: this rank's query heads (each with its gate rows) and KV heads, o_proj's input columns
        kv = sharding.kv_heads(shapes)
        self.qkv_proj.tp_shards = {"q_proj.weight": sharding.split(shapes, 2 * q_out), "k_proj.weight": kv,
                                   "v_proj.weight": kv}
        self.o_proj.tp_shards = {"weight": sharding.split(shapes, q_out, dim=1)}
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype=dtype, device=device)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, kv: KVPages,
                rows: QueryRows | None = None) -> torch.Tensor:
        """x: [T, D] -> [T, D], or [R, D] for the tokens `rows` picks (every token's K/V is written either way)."""
        q, gate = self.write_kv(x, batch, kv)
        if rows is None:
            o = self._attend(q, batch, kv)
        else:
            q, gate = q[rows.index], gate[rows.index]
            o = paged_attention_decode(q=q, k_cache=kv.k, v_cache=kv.v, seq_lens=rows.seq_lens,
                                       block_tables=rows.block_tables, scale=self.scale, k_scale=kv.k_scale,
                                       v_scale=kv.v_scale)
        n = q.shape[0]
        return self.o_proj(sigmoid_gate_mul(x=o.reshape(n, self.num_heads, self.head_dim), gate=gate).view(n, -1))

    def write_kv(self, x: torch.Tensor, batch: ForwardBatch, kv: KVPages) -> tuple[torch.Tensor, torch.Tensor]:
        """Every token's K/V into its page; returns its (q [T, Hq, hd] normed and rotated, gate [T, Hq, hd])."""
        T = x.shape[0]
        q_gate, k, v = self.qkv_proj.forward_split(x)
        # q_proj rows are per head [query(hd) | gate(hd)], not [all queries | all gates].
        q, gate = q_gate.view(T, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        # q/k zero-centred RMSNorm, partial RoPE, K/V into their pages: one fused op on GPU.
        q, _ = qk_norm_rope_write_kv(q=q, k=k, v=v, q_weight=self.q_norm.weight,
                                     k_weight=self.k_norm.weight, eps=self.q_norm.eps, positions=batch.positions,
                                     rotary_dim=self.rotary_dim, theta=self.rope_theta, k_cache=kv.k,
                                     v_cache=kv.v, slot_mapping=batch.slot_mapping, k_scale=kv.k_scale,
                                     v_scale=kv.v_scale)
        return q, gate

    def _attend(self, q: torch.Tensor, batch: ForwardBatch, kv: KVPages) -> torch.Tensor:
        """The kernel for the step's kind: the split-KV decode kernel when every row has one new token, or k new
        tokens (a verify step: VERIFY_ATTENTION), else the causal varlen kernel over each row's cached prefix and new
        tokens."""
        common = dict(k_cache=kv.k, v_cache=kv.v, seq_lens=batch.seq_lens, block_tables=batch.block_tables,
                      scale=self.scale, k_scale=kv.k_scale, v_scale=kv.v_scale)
        k = batch.tokens_per_row
        if k == 1:
            return paged_attention_decode(q=q, **common)
        if k is not None and use_decode_kernel(k, self.num_heads // self.num_kv_heads):
            return paged_attention_decode(q=q, tokens_per_row=k, **common)
        return paged_attention_prefill(q=q, cu_seqlens_q=batch.cu_seqlens, **common)


def use_decode_kernel(tokens_per_row: int, group: int) -> bool:
    """Whether rows of tokens_per_row > 1 new tokens (GQA group of `group` q heads) take the decode kernel."""
    if VERIFY_ATTENTION not in ("decode", "prefill"):
        raise ValueError(f"VERIFY_ATTENTION must be 'decode' or 'prefill', got {VERIFY_ATTENTION!r}")
    return VERIFY_ATTENTION == "decode" and tokens_per_row * group <= MAX_VERIFY_TILE_ROWS
