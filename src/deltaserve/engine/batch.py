"""Schedule -> tensors: one flat varlen batch per step (pure functions)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deltaserve.engine.scheduler import ScheduledRequest
from deltaserve.layers.meta import ForwardBatch


@dataclass(frozen=True)
class StepBatch:
    """The model inputs of one step and which scheduled entries get a sampled token (rows of the logits)."""

    input_ids: torch.Tensor            # [T] int64
    forward: ForwardBatch
    sampling: tuple[ScheduledRequest, ...]  # in logits-row order


def build_step_batch(scheduled: tuple[ScheduledRequest, ...] | list[ScheduledRequest], *, page_size: int,
                     device: torch.device | str) -> StepBatch:
    """Concatenate each request's new tokens; logits only for the last token of requests that sample this step."""
    ids: list[int] = []
    logits_rows: list[int] = []
    sampling: list[ScheduledRequest] = []
    for entry in scheduled:
        ids += entry.new_token_ids
        if entry.samples_token:
            logits_rows.append(len(ids) - 1)
            sampling.append(entry)
    forward = ForwardBatch.build(
        query_lens=[e.num_new_tokens for e in scheduled], context_lens=[e.num_computed_tokens for e in scheduled],
        state_slots=[e.slot for e in scheduled], block_tables=[list(e.pages) for e in scheduled],
        page_size=page_size, device=device, logits_indices=logits_rows)
    return StepBatch(torch.tensor(ids, dtype=torch.long, device=device), forward, tuple(sampling))
