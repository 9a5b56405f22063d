"""Token embedding and the lm_head (its own [V, D] projection, or the embedding's weight when tied)."""

from __future__ import annotations

from collections.abc import Set

import torch
from torch import nn

from deltaserve.kernels.linear import linear
from deltaserve.layers.linear import Linear, new_param
from deltaserve.layers.weights import WeightSlot, seeded


class VocabEmbedding(nn.Module):
    """weight: [V, D] in the model dtype."""

    def __init__(self, vocab_size: int, hidden_size: int, *, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.weight = new_param(vocab_size, hidden_size, dtype=dtype, device=device)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(input_ids, self.weight)

    def init_dummy_weights(self, prefix: str, seed: int) -> None:
        with torch.no_grad():
            self.weight.normal_(0.0, 0.02, generator=seeded(prefix + "weight", seed, self.weight.device))


class LMHead(Linear):
    """hidden [M, D] -> logits [M, V] through its own [V, D] weight (checkpoint name `lm_head.weight`)."""

    def __init__(self, hidden_size: int, vocab_size: int, *, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        super().__init__(hidden_size, vocab_size, dtype=dtype, device=device)


class TiedLMHead(nn.Module):
    """hidden [M, D] -> logits [M, V] through the embedding's weight, for checkpoints that tie them (a redundant
    `lm_head.weight` in such a checkpoint is accepted and not read)."""

    def __init__(self, embedding: VocabEmbedding) -> None:
        super().__init__()
        self._embedding = [embedding]  # a list: keeps the embedding's weight out of this module's parameters

    @property
    def weight(self) -> torch.Tensor:
        return self._embedding[0].weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(x=hidden, weight=self.weight)

    def weight_layout(self, prefix: str, present: Set[str]) -> dict[str, WeightSlot]:
        return {prefix + "weight": WeightSlot(tuple(self.weight.shape), lambda source: None, optional=True)}
