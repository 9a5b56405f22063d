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
    cu_seqlens_cpu:    host copy of cu_seqlens, when the builder has one (kernels that need the sequence bounds on
                       the host read it instead of syncing)
    any_padding:       some state slot may be < 0 (False only when the builder knows every slot is real)
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
    cu_seqlens_cpu: torch.Tensor | None = None
    any_padding: bool = True

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
        return ForwardBatch.build_with_ids(
            [], query_lens=query_lens, context_lens=context_lens, state_slots=state_slots, block_tables=block_tables,
            page_size=page_size, device=device, logits_indices=logits_indices, table=table)[1]

    @staticmethod
    def build_with_ids(input_ids: Sequence[int], *, query_lens: list[int], context_lens: list[int],
                       state_slots: list[int], block_tables: Sequence[Sequence[int]], page_size: int,
                       device: torch.device | str = "cpu", logits_indices: list[int] | None = None,
                       table: np.ndarray | None = None, extra: Sequence[np.ndarray] = (),
                       ) -> tuple[torch.Tensor, ForwardBatch, list[torch.Tensor]]:
        """build() plus the step's token ids as an int64 tensor, all sent to the device in one transfer with the
        caller's `extra` arrays (returned third, as device tensors in their order)."""
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
        cu_host = np.array(cu, dtype=np.int32)
        ids, pos, cu_t, lens, slots, init, tables, mapping, logits, *extra_dev = upload_arrays([
            np.array(input_ids, dtype=np.int64), np.array(positions, dtype=np.int64), cu_host,
            np.array([c + q for c, q in zip(context_lens, query_lens)], dtype=np.int32),
            np.array(state_slots, dtype=np.int64), np.array([c > 0 for c in context_lens], dtype=np.bool_),
            np.ascontiguousarray(table, dtype=np.int32), np.array(slot_mapping, dtype=np.int64),
            np.array(logits_indices, dtype=np.int64), *extra], device)
        return ids, ForwardBatch(
            positions=pos, cu_seqlens=cu_t, seq_lens=lens, state_slots=slots, has_initial_state=init,
            block_tables=tables, slot_mapping=mapping, logits_indices=logits,
            is_decode=bool(query_lens) and all(q == 1 for q in query_lens) and all(c > 0 for c in context_lens),
            cu_seqlens_cpu=torch.from_numpy(cu_host), any_padding=any(s < 0 for s in state_slots),
        ), extra_dev


_TORCH_DTYPES = {np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32, np.dtype(np.bool_): torch.bool}


def upload_arrays(arrays: Sequence[np.ndarray], device: torch.device | str) -> list[torch.Tensor]:
    """Small host arrays -> device tensors in one copy: packed into one byte buffer at 16-byte aligned offsets and
    viewed back on the device. A step's metadata is ~10 arrays; one transfer each cost ~10-20 us of host time.
    16, not 8: Triton specialises a kernel on whether each pointer is 16-byte aligned, so with 8-byte offsets a
    step whose token count is odd would compile a second copy of every kernel reading the metadata mid-run.

    On CUDA the buffer is pinned (torch's caching host allocator keeps it until the copy is done): a copy from
    pageable memory waits for the stream to drain first, which would stall an engine that builds the next step
    while the current one runs."""
    offsets, total = [], 0
    for a in arrays:
        offsets.append(total)
        total += -(-a.nbytes // 16) * 16
    on_cuda = torch.device(device).type == "cuda"
    host = torch.empty(max(total, 16), dtype=torch.uint8, pin_memory=on_cuda)
    buf = host.numpy()
    for a, off in zip(arrays, offsets):
        buf[off:off + a.nbytes] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    dev = host.to(device, non_blocking=on_cuda)
    return [dev[off:off + a.nbytes].view(_TORCH_DTYPES[a.dtype]).view(a.shape) for a, off in zip(arrays, offsets)]
