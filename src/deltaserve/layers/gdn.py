"""Gated DeltaNet (linear attention) layer: in_proj_qkv/z/b/a, causal depthwise conv + SiLU over q,k,v, gated delta
rule recurrence in fp32 on a per-sequence state (stored fp32 or bf16), gated RMSNorm, out_proj."""

from __future__ import annotations

import torch
from torch import nn

from deltaserve.cache.tensors import GDNState
from deltaserve.config import ModelConfig, RankShapes
from deltaserve.kernels.conv1d import causal_conv1d_prefill_qkv
from deltaserve.kernels.gated_delta_rule import (chunk_gated_delta_rule, fused_gdn_decode, fused_gdn_multistep,
                                                 gdn_gating)
from deltaserve.layers.linear import Linear, MergedLinear, new_param
from deltaserve.layers.forward_batch import ForwardBatch
from deltaserve.layers.norm import GatedRMSNorm
from deltaserve.layers.weights import seeded
from deltaserve.parallel import sharding


class GatedDeltaNet(nn.Module):
    """Owns its weights (sized for its rank); its states live in pools passed per call and are addressed by the
    batch's slot indices: conv [S, W-1, conv_dim] (model dtype, pre-conv inputs) and ssm [S, HV, K, V] (fp32 or
    bf16, the state_dtype option)."""

    def __init__(self, config: ModelConfig, shapes: RankShapes, *, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.num_k_heads, self.num_v_heads = shapes.linear_num_key_heads, shapes.linear_num_value_heads
        self.head_k_dim, self.head_v_dim = shapes.linear_key_head_dim, shapes.linear_value_head_dim
        self.key_dim, self.value_dim, self.conv_dim = shapes.key_dim, shapes.value_dim, shapes.conv_dim
        d = config.hidden_size
        # The four input projections as one weight: one GEMM (b and a alone are tiny, launch-bound GEMVs at decode).
        self.in_proj = MergedLinear(d, {"in_proj_qkv": self.conv_dim, "in_proj_z": self.value_dim,
                                        "in_proj_b": self.num_v_heads, "in_proj_a": self.num_v_heads},
                                    dtype=dtype, device=device)
        self.conv1d = nn.Module()
        self.conv1d.weight = new_param(self.conv_dim, 1, shapes.conv_kernel, dtype=dtype, device=device)
        self.dt_bias = new_param(self.num_v_heads, dtype=dtype, device=device)
        self.A_log = new_param(self.num_v_heads, dtype=torch.float32, device=device)  # fp32, as in checkpoints
        self.norm = GatedRMSNorm(self.head_v_dim, config.rms_norm_eps, device=device)
        self.out_proj = Linear(self.value_dim, d, dtype=dtype, device=device)
        # tensor parallelism by heads: the q, k and v channel sections of in_proj_qkv and of the conv weight are split
        # each on its own (the same key heads in both), z / b / a / A_log / dt_bias by value head, out_proj's input
        # columns; the grouped-value mapping stays rank-local because key and value heads split in proportion.
        qkv = sharding.sections(shapes, [self.key_dim, self.key_dim, self.value_dim])
        by_v_head = sharding.split(shapes, self.num_v_heads)
        self.in_proj.tp_shards = {"in_proj_qkv.weight": qkv, "in_proj_z.weight": sharding.split(shapes, self.value_dim),
                                  "in_proj_b.weight": by_v_head, "in_proj_a.weight": by_v_head}
        self.conv1d.tp_shards = {"weight": qkv}
        self.tp_shards = {"A_log": by_v_head, "dt_bias": by_v_head}
        self.out_proj.tp_shards = {"weight": sharding.split(shapes, self.value_dim, dim=1)}

    def init_dummy_weights(self, prefix: str, seed: int) -> None:
        """Decay parameters in the published checkpoints' ranges: A = exp(A_log) in [1, 16], dt_bias in [0, 1]."""
        with torch.no_grad():
            self.A_log.uniform_(1.0, 16.0, generator=seeded(prefix + "A_log", seed, self.A_log.device)).log_()
            self.dt_bias.uniform_(0.0, 1.0, generator=seeded(prefix + "dt_bias", seed, self.dt_bias.device))

    def forward(self, x: torch.Tensor, batch: ForwardBatch, state: GDNState) -> torch.Tensor:
        """x: [T, D] -> [T, D]; reads and writes this layer's conv/ssm state of each sequence in place."""
        T = x.shape[0]
        mixed_qkv, z, b, a = self.in_proj.forward_split(x)  # column views of one GEMM output
        o = self._core(mixed_qkv, a, b, batch, state)
        z = z.view(T, self.num_v_heads, self.head_v_dim)
        return self.out_proj(self.norm(o, z).reshape(T, self.value_dim))

    def _core(self, mixed_qkv: torch.Tensor, a: torch.Tensor, b: torch.Tensor, batch: ForwardBatch,
              state: GDNState) -> torch.Tensor:
        """The kernels for the step's kind: one token per row after an existing state runs the fused decode step
        (conv update, gating, l2-norm and the recurrence on the slot's state in place); anything else the chunked
        path. A verify step (speculative decoding) runs the decode step once per position, keeping what the commit
        needs of each (fused_gdn_multistep); one that carries prefill chunks runs them after, chunked."""
        if batch.keep_states:
            mixed = batch.mixed
            if mixed is None:
                assert batch.tokens_per_row is not None
                return self._verify(mixed_qkv, a, b, batch.state_slots, batch.tokens_per_row, state)
            t = mixed.num_tokens
            head = self._verify(mixed_qkv[:t], a[:t], b[:t], batch.state_slots[:mixed.rows], mixed.width, state)
            return torch.cat([head, self._chunked(mixed_qkv[t:], a[t:], b[t:], mixed.rest, state)])
        if batch.tokens_per_row == 1:
            return fused_gdn_decode(
                mixed_qkv=mixed_qkv, a=a, b=b, A_log=self.A_log, dt_bias=self.dt_bias,
                conv_weight=self.conv1d.weight.squeeze(1), conv_state=state.conv, ssm_state=state.ssm,
                slots=batch.state_slots, num_k_heads=self.num_k_heads, head_k_dim=self.head_k_dim,
                num_v_heads=self.num_v_heads, head_v_dim=self.head_v_dim, scale=self.head_k_dim ** -0.5)
        return self._chunked(mixed_qkv, a, b, batch, state)

    def _verify(self, mixed_qkv: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor, k: int,
                state: GDNState) -> torch.Tensor:
        """k decode steps of each row `slots` (row i in the per-position buffers' row i), the slots left unchanged."""
        assert state.conv_steps is not None and state.y_steps is not None and state.gate_steps is not None
        n = slots.shape[0]
        return fused_gdn_multistep(
            mixed_qkv=mixed_qkv, a=a, b=b, A_log=self.A_log, dt_bias=self.dt_bias,
            conv_weight=self.conv1d.weight.squeeze(1), conv_state=state.conv, ssm_state=state.ssm, slots=slots,
            tokens_per_row=k, num_k_heads=self.num_k_heads, head_k_dim=self.head_k_dim,
            num_v_heads=self.num_v_heads, head_v_dim=self.head_v_dim, scale=self.head_k_dim ** -0.5,
            conv_states_out=state.conv_steps[:n, :k], y_out=state.y_steps[:n, :k], gates_out=state.gate_steps[:n, :k])

    def _chunked(self, mixed_qkv: torch.Tensor, a: torch.Tensor, b: torch.Tensor, batch: ForwardBatch,
                 state: GDNState) -> torch.Tensor:
        """Varlen chunks, each from its slot's state (or zeros); final conv/ssm states written back to the slots."""
        T = mixed_qkv.shape[0]
        # q, k and v come back as contiguous tensors written so by the conv kernel, q and k already L2-normalised
        # there: fla-core needs them contiguous (a column view of one [T, conv_dim] output cost a strided copy per
        # layer, 84 us at 35B-A3B, 8k tokens, H200), and the norm in the conv took the conv and the L2-norm pass
        # from 224 to 198 us there (H100).
        q, k, v = causal_conv1d_prefill_qkv(x=mixed_qkv, weight=self.conv1d.weight.squeeze(1),
                                            conv_state=state.conv, cu_seqlens=batch.cu_seqlens,
                                            slots=batch.state_slots, has_initial_state=batch.has_initial_state,
                                            key_dim=self.key_dim, head_dim=self.head_k_dim)
        # beta is rounded to the activation dtype as in the reference implementation.
        g, beta = gdn_gating(a=a, b=b, A_log=self.A_log, dt_bias=self.dt_bias, beta_dtype=mixed_qkv.dtype)
        cu = batch.cu_seqlens_long if batch.cu_seqlens_long is not None else batch.cu_seqlens
        return chunk_gated_delta_rule(
            q=q.view(T, self.num_k_heads, self.head_k_dim), k=k.view(T, self.num_k_heads, self.head_k_dim),
            v=v.view(T, self.num_v_heads, self.head_v_dim), g=g, beta=beta, state=state.ssm,
            slots=batch.state_slots, cu_seqlens=cu, has_initial_state=batch.has_initial_state,
            scale=self.head_k_dim ** -0.5, use_qk_l2norm=False, chunk_indices=batch.chunk_indices,
            any_padding=batch.any_padding)
