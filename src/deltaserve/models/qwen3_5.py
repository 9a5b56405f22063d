"""The Qwen3.5 / Qwen3.6 text decoder (dense and MoE) with its MTP head, over flat varlen batches.

Layer i is a Gated DeltaNet layer or a gated full-attention layer as `layer_types[i]` says; every layer has a dense
SwiGLU MLP (dense models) or a sparse MoE block (MoE models). Caches are passed in explicitly (`ModelCache`).
"""

from __future__ import annotations

import torch
from torch import nn

from deltaserve.cache.tensors import MTP_LAYER, GDNState, KVPages, ModelCache
from deltaserve.config import ModelConfig, RankShapes
from deltaserve.kernels.linear import linear
from deltaserve.layers.attention import GatedAttention
from deltaserve.layers.embedding import LMHead, TiedLMHead
from deltaserve.layers.forward_batch import ForwardBatch, QueryRows
from deltaserve.layers.gdn import GatedDeltaNet
from deltaserve.layers.linear import Linear
from deltaserve.layers.mlp import MLP
from deltaserve.layers.moe import SparseMoE
from deltaserve.layers.norm import RMSNorm
from deltaserve.parallel.layers import lm_head, reducer, vocab_embedding

__all__ = ["MTP_LAYER", "DecoderLayer", "MTPHead", "Qwen3_5ForCausalLM", "Qwen3_5Model"]


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, shapes: RankShapes, layer_type: str, *, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.layer_type = layer_type
        if layer_type == "linear_attention":
            self.linear_attn = GatedDeltaNet(config, shapes, dtype=dtype, device=device)
        else:
            self.self_attn = GatedAttention(config, shapes, dtype=dtype, device=device)
        if config.is_moe:
            self.mlp: nn.Module = SparseMoE(config, shapes, dtype=dtype, device=device)
        else:
            assert shapes.intermediate_size is not None
            self.mlp = MLP(config.hidden_size, shapes.intermediate_size, dtype=dtype, device=device, shapes=shapes)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)
        self.reduce = reducer(shapes)  # tensor parallelism: sum of the ranks' partial outputs (None at TP 1)

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, batch: ForwardBatch,
                layer_cache: KVPages | GDNState, rows: QueryRows | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's output before its residual add, the residual stream); the next norm fuses the add.
        rows (full attention only): the output at those tokens only, past the attention's KV write."""
        if residual is None:
            x, residual = self.input_layernorm(h), h
        else:
            x, residual = self.input_layernorm(h, residual)
        if self.layer_type == "linear_attention":
            if rows is not None:
                raise ValueError("a Gated DeltaNet layer computes every token: rows is for full-attention layers")
            x = self.linear_attn(x, batch, layer_cache)  # type: ignore[arg-type]
        else:
            x = self.self_attn(x, batch, layer_cache, rows)  # type: ignore[arg-type]
            if rows is not None:
                residual = residual[rows.index]
        if self.reduce is not None:
            x = self.reduce(x)
        x, residual = self.post_attention_layernorm(x, residual)
        x = self.mlp(x)
        return (x if self.reduce is None else self.reduce(x)), residual


class Qwen3_5Model(nn.Module):
    """Embedding, decoder stack and final norm. Parameter names follow the checkpoint's text-model names."""

    def __init__(self, config: ModelConfig, shapes: RankShapes, *, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.embed_tokens = vocab_embedding(config, shapes, dtype=dtype, device=device)
        self.layers = nn.ModuleList(DecoderLayer(config, shapes, t, dtype=dtype, device=device)
                                    for t in config.layer_types)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor, batch: ForwardBatch, cache: ModelCache) -> torch.Tensor:
        """input_ids: [T] -> final-normed hidden states [T, D]."""
        h, residual = self.embed(input_ids), None
        for i, layer in enumerate(self.layers):
            h, residual = layer(h, residual, batch, cache.layer(i))
        h, _ = self.norm(h, residual)
        return h


class MTPHead(nn.Module):
    """Multi-token-prediction head: fc([norm(embed(next token)), norm(hidden)]) -> one full-attention decoder layer
    -> norm. Shares the main model's embedding and lm_head."""

    def __init__(self, config: ModelConfig, shapes: RankShapes, *, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.pre_fc_norm_embedding = RMSNorm(d, eps, dtype=dtype, device=device)
        self.pre_fc_norm_hidden = RMSNorm(d, eps, dtype=dtype, device=device)
        self.fc = Linear(2 * d, d, dtype=dtype, device=device)
        self.layers = nn.ModuleList([DecoderLayer(config, shapes, "full_attention", dtype=dtype, device=device)])
        self.norm = RMSNorm(d, eps, dtype=dtype, device=device)

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, batch: ForwardBatch, cache: ModelCache,
                rows: QueryRows | None = None) -> torch.Tensor:
        """embeds: [T, D] embeddings of the next tokens; hidden: [T, D] final-normed main-model states at the same
        positions -> [T, D] normed MTP states (feed to the lm_head for draft logits), or [R, D] at the tokens `rows`
        picks: the layer writes every token's KV, and its attention, MoE or MLP and norm run for those R only."""
        x = self.fc(torch.cat([self.pre_fc_norm_embedding(embeds), self.pre_fc_norm_hidden(hidden)], dim=-1))
        layer, kv = self.layers[0], cache.attention(MTP_LAYER)
        if rows is not None and rows.kv_only:
            layer.self_attn.write_kv(layer.input_layernorm(x), batch, kv)
            return x[:0]
        h, residual = layer(x, None, batch, kv, rows)
        h, _ = self.norm(h, residual)
        return h


class Qwen3_5ForCausalLM(nn.Module):
    """The served model: decoder, lm_head (or the tied embedding) and, when asked for, the MTP head."""

    def __init__(self, config: ModelConfig, *, dtype: torch.dtype, device: torch.device | str | None = None,
                 with_mtp: bool = False, shapes: RankShapes | None = None) -> None:
        super().__init__()
        self.config = config
        shapes = shapes or RankShapes.for_rank(config)
        self.model = Qwen3_5Model(config, shapes, dtype=dtype, device=device)
        self.lm_head = lm_head(config, shapes, self.model.embed_tokens, dtype=dtype, device=device)
        self.mtp = MTPHead(config, shapes, dtype=dtype, device=device) if with_mtp else None

    def forward(self, input_ids: torch.Tensor, batch: ForwardBatch, cache: ModelCache) -> torch.Tensor:
        """input_ids: [T] -> final-normed hidden states [T, D] (call compute_logits on the rows you need)."""
        return self.model(input_ids, batch, cache)

    def compute_logits(self, hidden: torch.Tensor, *, upcast: bool = True, vocab: int | None = None) -> torch.Tensor:
        """hidden: [M, D] -> logits [M, vocab] in fp32, or with upcast=False in the model dtype (the same values:
        the engine's sampler reads those directly, sparing an [M, vocab] fp32 copy per step). vocab: only the
        logits of token ids 0 .. vocab - 1, from the first rows of the lm_head's weight (a view; the MTP drafter's
        draft vocabulary); None: all of them."""
        logits = self.lm_head(hidden) if vocab is None else linear(x=hidden, weight=self.lm_head_rows(vocab))
        return logits.float() if upcast else logits

    def lm_head_rows(self, n: int) -> torch.Tensor:
        """The first n rows of the lm_head's [vocab, D] weight, a view (a plain or tied lm_head on one rank only)."""
        head = self.lm_head
        weight = getattr(head, "weight", None) if isinstance(head, (LMHead, TiedLMHead)) else None
        if isinstance(head, LMHead) and head.method.name != "unquantized":
            weight = None
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"a draft vocabulary needs a plain model-dtype lm_head weight on one rank; this model's "
                             f"lm_head is {type(head).__name__} ({getattr(getattr(head, 'method', None), 'name', '')})"
                             "; leave speculative_draft_vocab unset")
        if not 1 <= n <= weight.shape[0]:
            raise ValueError(f"a draft vocabulary of {n} token ids: use 1 to {weight.shape[0]} (the lm_head's rows)")
        return weight[:n]

    def mtp_forward(self, next_ids: torch.Tensor, hidden: torch.Tensor, batch: ForwardBatch, cache: ModelCache,
                    rows: QueryRows | None = None) -> torch.Tensor:
        """Draft step: next_ids [T] (token after each position), hidden [T, D] -> MTP hidden [T, D], or [R, D] at
        the tokens `rows` picks (MTPHead.forward)."""
        if self.mtp is None:
            raise RuntimeError("this model was built without its MTP head (no mtp.* tensors in the checkpoint, or "
                               "speculative decoding not enabled)")
        return self.mtp(self.model.embed(next_ids), hidden, batch, cache, rows)
