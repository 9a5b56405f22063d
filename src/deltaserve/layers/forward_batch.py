"""The per-step batch metadata every layer receives explicitly (no module globals). Built on the device by the
runner from a StepInput (engine/device_inputs.py); layers only read it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

GDN_CHUNK_SIZE = 64  # the chunked delta rule's chunk: chunk_indices are built for it


@dataclass(frozen=True)
class ForwardBatch:
    """One flat varlen batch of N sequences (rows), T tokens in total.

    positions:         [T] int64   position of each token in its sequence
    cu_seqlens:        [N+1] int32 token offsets of the sequences in the flat batch
    seq_lens:          [N] int32   KV length of each sequence after this step (cached prefix + new tokens)
    state_slots:       [N] int64   GDN state slot of each sequence (< 0: padding row, skipped)
    has_initial_state: [N] bool    False: the sequence starts here, its GDN state starts from zeros
    block_tables:      [N, max_pages] int32  KV pages of each sequence (full-attention layers)
    slot_mapping:      [T] int64   KV slot (page * page_size + offset) each new token writes (< 0: skipped)
    logits_indices:    [M] int64   rows of the flat batch whose logits are wanted
    tokens_per_row:    k when every row carries exactly k new tokens after an existing state (1: a plain decode
                       step, which layers run with single-token kernels); None for a varlen step
    chunk_indices:     [C, 2] int64 (sequence, chunk) of every GDN_CHUNK_SIZE-token chunk, built on the host (the
                       chunked delta rule's kernels would otherwise derive it with a host sync); None when unused
    cu_seqlens_long:   [N+1] int64 copy of cu_seqlens for the chunked delta rule; None when unused
    any_padding:       some state slot may be < 0 (False only when the builder knows every slot is real)
    keep_states:       a verify step (speculative decoding; tokens_per_row = 1 + drafts): GDN layers leave the
                       slots unchanged and keep, per position, the conv window and the recurrence's inputs in the
                       cache's per-position buffers (row i in buffer row i); after sampling the runner commits the
                       states after the last kept position (the recurrent one replayed)
    mixed:             a verify step that carries other rows after its verify rows (prefill chunks): keep_states
                       applies to its verify rows only (MixedVerify); tokens_per_row is None
    """

    positions: torch.Tensor
    cu_seqlens: torch.Tensor
    seq_lens: torch.Tensor
    state_slots: torch.Tensor
    has_initial_state: torch.Tensor
    block_tables: torch.Tensor
    slot_mapping: torch.Tensor
    logits_indices: torch.Tensor
    tokens_per_row: int | None
    chunk_indices: torch.Tensor | None = None
    cu_seqlens_long: torch.Tensor | None = None
    any_padding: bool = True
    keep_states: bool = False
    mixed: MixedVerify | None = None

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[0]

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]


@dataclass(frozen=True)
class MixedVerify:
    """The split of a verify step that also carries prefill chunks: its first `rows` rows verify drafts, `width`
    tokens each (tokens [0, rows * width)), and `rest` is the batch of the rows after them (its positions, offsets and
    GDN chunk indices relative to its first token), which the GDN layers run through the chunked path."""

    rows: int
    width: int
    rest: ForwardBatch

    @property
    def num_tokens(self) -> int:
        """Tokens of the verify rows (the rest's start in the flat batch)."""
        return self.rows * self.width


@dataclass(frozen=True)
class QueryRows:
    """The tokens of a step whose outputs a full-attention layer is asked for, when it writes the KV of every token
    but needs the outputs of a few (the MTP head: a draft reads its output at one position per request, and the
    rest of the step only its KV). Each attends as a one-query decode row over its sequence's pages. R = 0: no
    outputs, the KV only.

    index:        [R] int64  rows of the flat batch
    seq_lens:     [R] int32  KV length each one attends to: its position + 1 (0 for a padding row: zeros out)
    block_tables: [R, max_pages] int32  its sequence's KV pages
    """

    index: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor

    @classmethod
    def at(cls, batch: ForwardBatch, index: torch.Tensor, seqs: torch.Tensor) -> QueryRows:
        """Tokens `index` [R] of `batch`, in its sequences `seqs` [R] (a padding sequence, KV length 0, stays
        one)."""
        seq_lens = torch.where(batch.seq_lens[seqs] > 0, batch.positions[index] + 1, 0).to(torch.int32)
        return cls(index, seq_lens, batch.block_tables[seqs])

    @classmethod
    def none(cls, batch: ForwardBatch) -> QueryRows:
        """No outputs: the layer writes the step's KV and computes nothing else."""
        empty = batch.positions[:0]
        return cls(empty, empty.to(torch.int32), batch.block_tables[:0])

    @property
    def kv_only(self) -> bool:
        return self.index.shape[0] == 0
