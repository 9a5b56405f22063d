"""Schedule -> tensors: one flat varlen batch per step (pure functions)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from deltaserve.engine.scheduler import ScheduledRequest
from deltaserve.layers.meta import ForwardBatch


@dataclass(frozen=True)
class StepBatch:
    """The model inputs of one step and which scheduled entries get a sampled token (rows of the logits)."""

    input_ids: torch.Tensor            # [T] int64
    forward: ForwardBatch
    sampling: tuple[ScheduledRequest, ...]  # in logits-row order


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
    for entry in scheduled:
        ids += entry.new_token_ids
        if entry.samples_token:
            logits_rows.append(len(ids) - 1)
            sampling.append(entry)
    input_ids, forward = ForwardBatch.build_with_ids(
        ids, query_lens=[e.num_new_tokens for e in scheduled], context_lens=[e.num_computed_tokens for e in scheduled],
        state_slots=[e.slot for e in scheduled], block_tables=[e.pages for e in scheduled],
        page_size=page_size, device=device, logits_indices=logits_rows,
        table=block_tables.gather(scheduled) if block_tables is not None else None)
    return StepBatch(input_ids, forward, tuple(sampling))
