"""MTP speculative decoding on the worker side: which drafts a verify step keeps, and the next drafts.

A verify step runs the target model over 1 + K tokens per row (the last kept token and K drafts) and samples at every
one of those positions exactly as K + 1 plain decode steps would (same logits processors, same seeded noise for the
same output index). Drafts are greedy (the MTP head's argmax), so the draft distribution q is a point mass on the
draft d, and the textbook rejection test "accept d with probability min(1, p(d) / q(d)), else sample from the
normalised residual max(p - q, 0)" reduces to: sample t ~ p (the processed target distribution) and accept d iff
t == d; on rejection t is the correction token, a sample of p restricted to tokens != d, i.e. the residual. Coupling
the test to the sampler's own draw keeps the output distribution exactly that of decoding without drafts, with any
temperature, top-k/top-p/min-p, penalties or logit bias (they shape p; q needs no processing), and makes seeded
requests give the very tokens they give without MTP, whatever the batch.

Drafting (`MTPDrafter.propose`): the MTP head runs once over every token of the step (its own KV written at the
same positions: position i takes the target's final-normed hidden state at i and the token at i + 1, i.e. the next
input, the sampled token at a sampling position, or the known prompt token after a prefill chunk), then K - 1 more
times one token per request, chained on its own output, from the last kept position. Positions past the last kept
one get KV that the next step's first pass overwrites before anything reads it.
"""

from __future__ import annotations

import numpy as np
import torch

from deltaserve.cache.tensors import ModelCache
from deltaserve.engine.device_inputs import DeviceStep, upload_arrays
from deltaserve.engine.step_input import PENDING, StepInput
from deltaserve.layers.forward_batch import ForwardBatch


def kept_counts(step: StepInput, input_ids: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """[R] int64 tokens each sampling request keeps: 1 + the drafts that match the tokens sampled before them (a
    verify step: every request has k = 1 + drafts logits rows, its row's inputs are [last token, drafts...])."""
    r = len(step.sampling)
    if not step.is_verify:
        return torch.ones(r, dtype=torch.long, device=token_ids.device)
    k = 1 + step.num_drafts
    sampled = token_ids.view(r, k)
    drafts = input_ids.view(r, k)[:, 1:]
    match = (sampled[:, :-1] == drafts).long()
    return 1 + match.cumprod(dim=1).sum(dim=1)


def first_logits_rows(step: StepInput) -> np.ndarray:
    """[R] index of each sampling request's first logits row."""
    counts = np.fromiter((s.num_logits_rows for s in step.sampling), dtype=np.int64, count=len(step.sampling))
    return np.cumsum(counts) - counts


class MTPDrafter:
    """Proposes K greedy drafts per sampling request with the model's MTP head (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, cache: ModelCache, *, num_tokens: int, page_size: int,
                 device: torch.device) -> None:
        if getattr(model, "mtp", None) is None:
            raise RuntimeError("speculative decoding needs the model's MTP head (load it with with_mtp=True)")
        self.model, self.cache, self.k, self.page_size, self.device = model, cache, num_tokens, page_size, device

    @torch.no_grad()
    def first_pass(self, step: StepInput, dev: DeviceStep, input_ids: torch.Tensor, hidden: torch.Tensor,
                   token_ids: torch.Tensor | None) -> torch.Tensor:
        """The MTP head over every token of the step (writing its KV); token_ids [M]: the sampled tokens of the
        sampling logits rows (None when nothing samples). Returns its [T, D] output."""
        batch = dev.batch
        next_ids = step.next_token_ids if step.next_token_ids is not None else np.full(step.num_rows, PENDING)
        last_pos = np.cumsum(step.query_lens.astype(np.int64)) - 1
        next_known, last_tok = upload_arrays([np.where(next_ids == PENDING, 0, next_ids).astype(np.int64), last_pos],
                                             self.device)
        nxt = torch.empty_like(input_ids)
        nxt[:-1] = input_ids[1:]
        nxt[last_tok] = next_known
        if token_ids is not None:
            nxt[batch.logits_indices[:token_ids.shape[0]]] = token_ids
        return self.model.mtp_forward(nxt, hidden, batch, self.cache)

    @torch.no_grad()
    def propose(self, step: StepInput, dev: DeviceStep, input_ids: torch.Tensor, hidden: torch.Tensor,
                token_ids: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """[R, K] int64 drafts for the step's sampling requests, on the device.

        input_ids [T] (pending ones filled), hidden [T, D] the target's final-normed states, token_ids [M] the
        sampled tokens of the M sampling logits rows, kept [R] from kept_counts."""
        batch = dev.batch
        n, r, ps = step.num_rows, len(step.sampling), self.page_size
        # host side: every small array of this call, sent in one copy
        row_of_request = _rows_of_requests(step)
        ends = (step.context_lens + step.query_lens).astype(np.int64)
        width = -(-int(ends[row_of_request].max() + self.k) // ps)
        table = np.zeros((r, width), dtype=np.int32)
        src = step.block_table[row_of_request]
        table[:, :min(width, src.shape[1])] = src[:, :width]
        pages = step.page_counts if step.page_counts is not None else \
            np.full(n, step.block_table.shape[1], np.int32)
        host = [first_logits_rows(step), table, (pages[row_of_request].astype(np.int64) * ps)]
        first_row, table_d, limit = upload_arrays(host, self.device)
        h = self.first_pass(step, dev, input_ids, hidden, token_ids)
        # the last kept position of each request: its MTP output gives draft 1
        at = batch.logits_indices[first_row + kept - 1]
        x = h[at]
        draft = self.model.compute_logits(x, upcast=False).argmax(dim=-1)
        drafts = [draft]
        positions = batch.positions[at]
        rows = torch.arange(r, device=self.device)
        cu = torch.arange(r + 1, dtype=torch.int32, device=self.device)
        has_state = torch.ones(r, dtype=torch.bool, device=self.device)
        for j in range(1, self.k):
            pos = positions + j
            page = table_d[rows, (pos // ps).clamp(max=width - 1)].long()
            mapping = torch.where(pos < limit, page * ps + pos % ps, torch.full_like(pos, -1))
            chain = ForwardBatch(positions=pos, cu_seqlens=cu, seq_lens=(pos + 1).to(torch.int32),
                                 state_slots=rows, has_initial_state=has_state,
                                 block_tables=table_d, slot_mapping=mapping, logits_indices=rows, tokens_per_row=1,
                                 any_padding=False)
            x = self.model.mtp_forward(draft, x, chain, self.cache)
            draft = self.model.compute_logits(x, upcast=False).argmax(dim=-1)
            drafts.append(draft)
        return torch.stack(drafts, dim=1)


def _rows_of_requests(step: StepInput) -> np.ndarray:
    """[R] the batch row of each sampling request (the row holding its last logits row)."""
    cu = np.cumsum(step.query_lens.astype(np.int64))
    last = np.cumsum([s.num_logits_rows for s in step.sampling], dtype=np.int64) - 1
    return np.searchsorted(cu, step.logits_rows[last], side="right")
