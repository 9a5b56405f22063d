"""Paged attention for the full-attention layers: KV write, varlen causal prefill, single-query decode, and the fused
q/k-norm + partial RoPE + KV write. Triton kernels on CUDA tensors, the references otherwise."""

from __future__ import annotations

from deltaserve.kernels._dispatch import dispatch

from . import ref

_TRITON = "deltaserve.kernels.attention.triton"
write_kv = dispatch(ref.write_kv, _TRITON)
paged_attention_prefill = dispatch(ref.paged_attention_prefill, _TRITON)
paged_attention_decode = dispatch(ref.paged_attention_decode, _TRITON)
qk_norm_rope_write_kv = dispatch(ref.qk_norm_rope_write_kv, _TRITON)

__all__ = ["paged_attention_decode", "paged_attention_prefill", "qk_norm_rope_write_kv", "write_kv"]
