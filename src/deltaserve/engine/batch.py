"""Schedule -> tensors: one flat varlen batch per step (pure functions)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from deltaserve.engine.scheduler import ScheduledRequest
from deltaserve.layers.meta import ForwardBatch


@dataclass(frozen=True)
class StepBatch:
    """The model inputs of one step and which scheduled entries get a sampled token (rows of the logits).

    A pending token (sampled by a step still in flight) has no id on the host: its input_ids entry is 0 until
    `input_ids_from(last_tokens)` fills it from the device buffer where the sampling step wrote it.
    """

    input_ids: torch.Tensor            # [T] int64
    forward: ForwardBatch
    sampling: tuple[ScheduledRequest, ...]  # in logits-row order
    sample_slots: torch.Tensor         # [len(sampling)] int64 state slot of each logits row
    pending_rows: torch.Tensor         # [P] int64 rows of input_ids that are pending tokens
    pending_slots: torch.Tensor        # [P] int64 state slot whose last sampled token each of them is

    def input_ids_from(self, last_tokens: torch.Tensor | None) -> torch.Tensor:
        """input_ids with the pending tokens read from `last_tokens` ([num_slots] int64, on the device)."""
        if self.pending_rows.numel() == 0:
            return self.input_ids
        if last_tokens is None:
            raise RuntimeError("the batch has pending tokens but no device buffer of last sampled tokens was given")
        if self.pending_rows.numel() == self.input_ids.numel():  # a decode step: every input is pending
            return last_tokens[self.pending_slots]
        ids = self.input_ids.clone()
        ids[self.pending_rows] = last_tokens[self.pending_slots]
        return ids


class BlockTables:
    """Host copy of the running requests' block tables, one row per GDN state slot (a slot serves one request at a
    time). Each step writes only the pages added since the last one, instead of rebuilding [N, max_pages] from lists
    (at batch 64 that rebuild was ~0.3 ms of host time per step). Entries past a row's pages are 0."""

    def __init__(self, num_slots: int, max_pages: int) -> None:
        self.rows = np.zeros((num_slots, max(1, max_pages)), dtype=np.int32)
        self._owner: list[tuple[object, int] | None] = [None] * num_slots  # (request, its preemption count)
        self._length = [0] * num_slots

    def gather(self, scheduled: tuple[ScheduledRequest, ...] | list[ScheduledRequest]) -> np.ndarray:
        """[N, width] block tables of the scheduled entries, width = the longest one (at least 1)."""
        width = 1
        for e in scheduled:
            slot, pages = e.slot, e.pages
            owner = (e.request, e.request.num_preemptions)  # a preempted request comes back with new pages
            known = self._length[slot]
            current = self._owner[slot]
            if current is None or current[0] is not owner[0] or current[1] != owner[1] or known > len(pages):
                self.rows[slot] = 0
                known = 0
                self._owner[slot] = owner
            if len(pages) > known:
                self.rows[slot, known:len(pages)] = pages[known:]
                self._length[slot] = len(pages)
            width = max(width, len(pages))
        return self.rows[[e.slot for e in scheduled], :width]


def build_step_batch(scheduled: tuple[ScheduledRequest, ...] | list[ScheduledRequest], *, page_size: int,
                     device: torch.device | str, block_tables: BlockTables | None = None) -> StepBatch:
    """Concatenate each request's new tokens; logits only for the last token of requests that sample this step.
    With `block_tables` the [N, max_pages] table comes from its persistent rows (same values)."""
    ids: list[int] = []
    logits_rows: list[int] = []
    sampling: list[ScheduledRequest] = []
    pending_rows: list[int] = []
    pending_slots: list[int] = []
    for entry in scheduled:
        known = entry.new_token_ids
        ids += known
        for _ in range(entry.num_new_tokens - len(known)):  # positions of pending tokens
            pending_rows.append(len(ids))
            pending_slots.append(entry.slot)
            ids.append(0)
        if entry.samples_token:
            logits_rows.append(len(ids) - 1)
            sampling.append(entry)
    input_ids, forward, (sample_slots_dev, pending_rows_dev, pending_slots_dev) = ForwardBatch.build_with_ids(
        ids, query_lens=[e.num_new_tokens for e in scheduled], context_lens=[e.num_computed_tokens for e in scheduled],
        state_slots=[e.slot for e in scheduled], block_tables=[e.pages for e in scheduled],
        page_size=page_size, device=device, logits_indices=logits_rows,
        table=block_tables.gather(scheduled) if block_tables is not None else None,
        extra=[np.array([e.slot for e in sampling], dtype=np.int64), np.array(pending_rows, dtype=np.int64),
               np.array(pending_slots, dtype=np.int64)])
    return StepBatch(input_ids, forward, tuple(sampling), sample_slots_dev, pending_rows_dev, pending_slots_dev)
