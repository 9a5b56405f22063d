"""Per-step batch metadata passed explicitly to every layer (no module globals)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ForwardBatch:
    """One flat varlen batch of N sequences, T tokens in total.

    positions:         [T] int64   position of each token in its sequence
    cu_seqlens:        [N+1] int32 token offsets of the sequences in the flat batch
    seq_lens:          [N] int32   KV length of each sequence after this step (cached prefix + new tokens)
    state_slots:       [N] int64   GDN state slot of each sequence (< 0: padding row, skipped)
    has_initial_state: [N] bool    False: the sequence starts here, its GDN state starts from zeros
    block_tables:      [N, max_pages] int32  KV pages of each sequence (full-attention layers)
    slot_mapping:      [T] int64   KV slot (page * page_size + offset) each new token writes (< 0: skipped)
    logits_indices:    [M] int64   rows of the flat batch whose logits are wanted
    is_decode:         every sequence has exactly one new token (lets layers take single-step kernels)
    """

    positions: torch.Tensor
    cu_seqlens: torch.Tensor
    seq_lens: torch.Tensor
    state_slots: torch.Tensor
    has_initial_state: torch.Tensor
    block_tables: torch.Tensor
    slot_mapping: torch.Tensor
    logits_indices: torch.Tensor
    is_decode: bool

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[0]

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @staticmethod
    def build(*, query_lens: list[int], context_lens: list[int], state_slots: list[int],
              block_tables: Sequence[Sequence[int]], page_size: int, device: torch.device | str = "cpu",
              logits_indices: list[int] | None = None, table: np.ndarray | None = None) -> ForwardBatch:
        """Build the tensors from per-sequence Python lists (the engine's batch.py and tests use this).

        query_lens[n] new tokens of sequence n follow its context_lens[n] already computed tokens.
        By default the last token of every sequence gets logits. `table`: the block tables already laid out as an
        int32 [N, width] array (zero-padded), instead of building them from `block_tables`.
        """
        positions: list[int] = []
        slot_mapping: list[int] = []
        cu = [0]
        for qlen, ctx, pages in zip(query_lens, context_lens, block_tables):
            for pos in range(ctx, ctx + qlen):
                positions.append(pos)
                slot_mapping.append(pages[pos // page_size] * page_size + pos % page_size)
            cu.append(cu[-1] + qlen)
        if logits_indices is None:
            logits_indices = [end - 1 for end in cu[1:]]
        if table is None:
            width = max((len(p) for p in block_tables), default=0) or 1
            table = np.zeros((len(block_tables), width), dtype=np.int32)
            for row, pages in zip(table, block_tables):
                row[:len(pages)] = pages

        def t(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        return ForwardBatch(
            positions=t(positions, torch.int64), cu_seqlens=t(cu, torch.int32),
            seq_lens=t([c + q for c, q in zip(context_lens, query_lens)], torch.int32),
            state_slots=t(state_slots, torch.int64), has_initial_state=t([c > 0 for c in context_lens], torch.bool),
            block_tables=torch.from_numpy(np.ascontiguousarray(table, dtype=np.int32)).to(device),
            slot_mapping=t(slot_mapping, torch.int64), logits_indices=t(logits_indices, torch.int64),
            is_decode=bool(query_lens) and all(q == 1 for q in query_lens) and all(c > 0 for c in context_lens),
        )
