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

import logging

import numpy as np
import torch

from deltaserve.cache.tensors import ModelCache
from deltaserve.engine.device_inputs import DeviceStep, upload_arrays
from deltaserve.engine.step_input import PENDING, StepInput
from deltaserve.layers.forward_batch import ForwardBatch

log = logging.getLogger(__name__)


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
        self.graphs: ChainGraphs | None = None  # set by capture() (CUDA, graphs on)

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
        if self.k == 1:
            return draft.unsqueeze(1)
        positions = batch.positions[at]
        if self.graphs is not None and self.graphs.can_run(r, width):
            rest = self.graphs.run(draft, x, positions, table_d, limit)
        else:
            rest = chain_drafts(self.model, self.cache, draft, x, positions, table_d, limit, k=self.k, page_size=ps)
        return torch.cat([draft.unsqueeze(1), rest], dim=1)

    def capture(self, *, max_rows: int, max_pages: int) -> None:
        """CUDA graphs of the chained draft passes (row counts up to max_rows); on failure they stay eager."""
        if self.k < 2 or self.device.type != "cuda":
            return
        graphs = ChainGraphs(self.model, self.cache, k=self.k, page_size=self.page_size, max_rows=max_rows,
                             max_pages=max_pages, device=self.device)
        try:
            graphs.capture()
        except Exception as e:  # noqa: BLE001 - an eager draft is slower, never wrong
            log.warning("CUDA graph capture of the MTP draft passes failed (%s: %s); they run eagerly",
                        type(e).__name__, e)
            return
        self.graphs = graphs


def chain_drafts(model: torch.nn.Module, cache: ModelCache, draft: torch.Tensor, x: torch.Tensor,
                 positions: torch.Tensor, table: torch.Tensor, limit: torch.Tensor, *, k: int,
                 page_size: int) -> torch.Tensor:
    """Drafts 2..k: the MTP head chained on its own output, one token per row at positions + 1, + 2, ...

    draft [R] (draft 1), x [R, D] (the MTP output that gave it), positions [R] (of x), table [R, W] int32 page
    table, limit [R] int64 (no KV is written at positions >= limit). Returns [R, k - 1] int64."""
    r, ps, width = draft.shape[0], page_size, table.shape[1]
    device = draft.device
    rows = torch.arange(r, device=device)
    cu = torch.arange(r + 1, dtype=torch.int32, device=device)
    has_state = torch.ones(r, dtype=torch.bool, device=device)
    drafts = []
    for j in range(1, k):
        pos = positions + j
        page = table[rows, (pos // ps).clamp(max=width - 1)].long()
        mapping = torch.where(pos < limit, page * ps + pos % ps, torch.full_like(pos, -1))
        chain = ForwardBatch(positions=pos, cu_seqlens=cu, seq_lens=(pos + 1).to(torch.int32), state_slots=rows,
                             has_initial_state=has_state, block_tables=table, slot_mapping=mapping,
                             logits_indices=rows, tokens_per_row=1, any_padding=False)
        x = model.mtp_forward(draft, x, chain, cache)
        draft = model.compute_logits(x, upcast=False).argmax(dim=-1)
        drafts.append(draft)
    return torch.stack(drafts, dim=1)


class ChainGraphs:
    """CUDA graphs of `chain_drafts`, one per padded row count, over static input buffers. Padding rows write no KV
    (limit 0) and their drafts are dropped."""

    def __init__(self, model: torch.nn.Module, cache: ModelCache, *, k: int, page_size: int, max_rows: int,
                 max_pages: int, device: torch.device) -> None:
        from deltaserve.engine.cuda_graph import capture_sizes

        self.model, self.cache, self.k, self.page_size, self.device = model, cache, k, page_size, device
        self.sizes = capture_sizes(max_rows)
        n, d = self.sizes[-1], model.config.hidden_size
        dtype = model.model.embed_tokens.weight.dtype
        self.draft = torch.zeros(n, dtype=torch.long, device=device)
        self.x = torch.zeros(n, d, dtype=dtype, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.table = torch.zeros(n, max(1, max_pages), dtype=torch.int32, device=device)
        self.limit = torch.zeros(n, dtype=torch.long, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _run(self, r: int) -> torch.Tensor:
        return chain_drafts(self.model, self.cache, self.draft[:r], self.x[:r], self.positions[:r], self.table[:r],
                            self.limit[:r], k=self.k, page_size=self.page_size)

    @torch.no_grad()
    def capture(self) -> None:
        pool = None
        for r in reversed(self.sizes):  # limit 0: the captures write no KV
            for _ in range(2):
                self._run(r)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._run(r)
            pool = graph.pool()
            self.graphs[r] = (graph, out)
        torch.cuda.synchronize(self.device)

    def can_run(self, rows: int, width: int) -> bool:
        return rows <= self.sizes[-1] and width <= self.table.shape[1]

    def run(self, draft: torch.Tensor, x: torch.Tensor, positions: torch.Tensor, table: torch.Tensor,
            limit: torch.Tensor) -> torch.Tensor:
        n, w = draft.shape[0], table.shape[1]
        r = next(s for s in self.sizes if s >= n)
        self.draft[:n].copy_(draft)
        self.x[:n].copy_(x)
        self.positions[:n].copy_(positions)
        self.table[:n, :w].copy_(table)
        self.table[:n, w:].zero_()
        self.limit[:n].copy_(limit)
        self.limit[n:].zero_()
        self.positions[n:].zero_()
        graph, out = self.graphs[r]
        graph.replay()
        return out[:n].clone()


def _rows_of_requests(step: StepInput) -> np.ndarray:
    """[R] the batch row of each sampling request (the row holding its last logits row)."""
    cu = np.cumsum(step.query_lens.astype(np.int64))
    last = np.cumsum([s.num_logits_rows for s in step.sampling], dtype=np.int64) - 1
    return np.searchsorted(cu, step.logits_rows[last], side="right")
