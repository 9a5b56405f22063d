"""The modules that differ under tensor parallelism beyond their sizes: the vocab-parallel embedding and lm_head, and
the experts of one rank under expert parallelism. The model builds them through the factories below, which return
the single-rank modules at tensor-parallel size 1 (so that path is unchanged)."""

from __future__ import annotations

from collections.abc import Set

import torch
from torch import nn

from deltaserve.config import ModelConfig, RankShapes
from deltaserve.layers.embedding import LMHead, TiedLMHead, VocabEmbedding
from deltaserve.layers.moe import Experts
from deltaserve.layers.weights import WeightSlot
from deltaserve.parallel import group, sharding


class VocabParallelEmbedding(VocabEmbedding):
    """This rank's rows [start, start + V/tp) of the embedding; ids outside them give zeros, and the sum over the
    ranks gives every id its row."""

    def __init__(self, shapes: RankShapes, hidden_size: int, *, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        super().__init__(shapes.vocab_size, hidden_size, dtype=dtype, device=device)
        self.start = shapes.tp_rank * shapes.vocab_size
        self.tp_shards = {"weight": sharding.split(shapes, shapes.vocab_size)}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = nn.functional.embedding(local.masked_fill(outside, 0), self.weight)
        return group.all_reduce(out.masked_fill_(outside.unsqueeze(-1), 0))


class ParallelLMHead(LMHead):
    """This rank's V/tp rows of the lm_head; the logits of all ranks are gathered (every rank gets [M, V])."""

    def __init__(self, shapes: RankShapes, hidden_size: int, *, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        super().__init__(hidden_size, shapes.vocab_size, dtype=dtype, device=device)
        self.tp_shards = {"weight": sharding.split(shapes, shapes.vocab_size)}

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return group.all_gather(super().forward(hidden), dim=-1)


class ParallelTiedLMHead(TiedLMHead):
    """The lm_head tied to a vocab-parallel embedding: the rank's rows, logits gathered."""

    def __init__(self, embedding: VocabParallelEmbedding, shapes: RankShapes) -> None:
        super().__init__(embedding)
        self.tp_shards = {"weight": sharding.split(shapes, shapes.vocab_size)}  # a redundant lm_head.weight: skipped

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return group.all_gather(super().forward(hidden), dim=-1)


def vocab_embedding(config: ModelConfig, shapes: RankShapes, *, dtype: torch.dtype,
                    device: torch.device | str | None = None) -> VocabEmbedding:
    if shapes.tp_size == 1:
        return VocabEmbedding(config.vocab_size, config.hidden_size, dtype=dtype, device=device)
    return VocabParallelEmbedding(shapes, config.hidden_size, dtype=dtype, device=device)


def lm_head(config: ModelConfig, shapes: RankShapes, embedding: VocabEmbedding, *, dtype: torch.dtype,
            device: torch.device | str | None = None) -> nn.Module:
    if shapes.tp_size == 1:
        return (TiedLMHead(embedding) if config.tie_word_embeddings else
                LMHead(config.hidden_size, config.vocab_size, dtype=dtype, device=device))
    if config.tie_word_embeddings:
        assert isinstance(embedding, VocabParallelEmbedding)
        return ParallelTiedLMHead(embedding, shapes)
    return ParallelLMHead(shapes, config.hidden_size, dtype=dtype, device=device)


def reducer(shapes: RankShapes):
    """What a decoder layer applies to the output of its mixer and of its MLP / MoE block: the sum over the ranks
    of their partial outputs (row-parallel o_proj / out_proj / down_proj, this rank's experts); None at TP 1."""
    return group.all_reduce if shapes.tp_size > 1 else None


class ExpertParallelExperts(Experts):
    """Expert parallelism: this rank's contiguous range of whole experts. Every rank sees every token (the hidden
    states are replicated after each all-reduce), so dispatch is local: routing slots whose expert lives on another
    rank get id -1, which the MoE kernels skip; the combine is the decoder layer's all-reduce, which also sums the
    tensor-parallel slices of the shared expert."""

    def __init__(self, shapes: RankShapes, hidden_size: int, *, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        assert shapes.moe_intermediate_size is not None and shapes.num_experts
        super().__init__(shapes.num_experts, hidden_size, shapes.moe_intermediate_size, dtype=dtype, device=device)
        self.expert_offset, self.checkpoint_experts = shapes.expert_offset, shapes.num_experts * shapes.tp_size
        shard = sharding.experts(shapes)
        self.tp_shards = {"gate_up_proj": shard, "down_proj": shard}  # the fused layout

    def weight_layout(self, prefix: str, present: Set[str]) -> dict[str, WeightSlot]:
        """The fused tensors (narrowed to this rank's experts by tp_shards, or by the FP8 method itself), or
        per-expert tensors (`{e}.gate_proj.weight`, or a quantized format's `{e}.gate_proj.qweight`, `.scales`, ...)
        under their global ids, other ranks' experts accepted and not read."""
        layout = super().weight_layout(prefix, present)
        if f"{prefix}gate_up_proj" in layout:
            return layout
        local: dict[tuple[int, str], WeightSlot] = {}
        for name, slot in layout.items():  # named by the checkpoint's expert ids
            expert, _, rest = name[len(prefix):].partition(".")
            local[(int(expert) - self.expert_offset, rest)] = slot
        out: dict[str, WeightSlot] = {}
        for e in range(self.checkpoint_experts):
            for rest in [r for (le, r) in local if le == 0]:
                le = e - self.expert_offset
                if 0 <= le < self.num_experts:
                    out[f"{prefix}{e}.{rest}"] = local[(le, rest)]
                else:
                    out[f"{prefix}{e}.{rest}"] = WeightSlot(local[(0, rest)].shape, lambda source: None,
                                                            optional=True)
        return out

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, **kw) -> torch.Tensor:
        local = topk_ids - self.expert_offset
        local = local.masked_fill((local < 0) | (local >= self.num_experts), -1)
        return super().forward(x, topk_weights, local, **kw)
