"""Paged attention for the full-attention layers: KV write, varlen causal prefill, single-query decode."""

from __future__ import annotations

from .ref import paged_attention_decode, paged_attention_prefill, write_kv

__all__ = ["paged_attention_decode", "paged_attention_prefill", "write_kv"]
