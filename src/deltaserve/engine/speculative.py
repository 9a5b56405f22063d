"""MTP speculative decoding on the worker side: which drafts a verify step keeps, and the next drafts.

A verify step runs the target model over 1 + K tokens per row (the last kept token and K drafts) and samples at every
one of those positions exactly as K + 1 plain decode steps would (same logits processors, same seeded noise for the
same output index). Drafts are greedy (the MTP head's argmax), so the draft distribution q is a point mass on the
draft d, and the textbook rejection test "accept d with probability min(1, p(d) / q(d)), else sample from the
normalised residual max(p - q, 0)" reduces to: sample t ~ p (the processed target distribution) and accept d iff
t == d; on rejection t is the correction token, a sample of p restricted to tokens != d, i.e. the residual. Coupling
the test to the sampler's own draw keeps the output distribution exactly that of decoding without drafts, with any
temperature, top-k/top-p/min-p, penalties or logit bias (they shape p; q needs no processing), and makes seeded
requests give the very tokens they give without MTP, whatever the batch. With a draft vocabulary
(`speculative_draft_vocab` N) the argmax runs over token ids below N only: q is still the point mass on the draft
(zero outside the subset, whose other tokens are never proposed), so the same test stays exact.

Drafting (`MTPDrafter.propose`): the MTP head runs once over every token of the step (its own KV written at the
same positions: position i takes the target's final-normed hidden state at i and the token at i + 1, i.e. the next
input, the sampled token at a sampling position, or the known prompt token after a prefill chunk), then K - 1 more
times one token per request, chained on its own output, from the last kept position. Past its KV write, that first
pass computes each request's last kept position only (`QueryRows`): no other output is read, and a verify step of
1 + K tokens a row, or a prompt, would otherwise run the head's attention and MoE or MLP over all of them.
Positions past the last kept one get KV that the next step's first pass overwrites before anything reads it.

Prefix caching: a request resuming from a checkpoint at position p keeps the head's KV below p, but the entry at p - 1
was computed from the token at p of the checkpoint's own request, which may not be this one's. So each slot keeps the
target's hidden state at its last computed position (`ModelCache.mtp_hidden`, copied with the GDN state into and out
of checkpoints), and the resumed request's first step computes the head's KV at p - 1 again from it and its own token
at p (`rewrite_resume_kv`), into its own copy of that page (the cache manager's `rewrites_last`).

On CUDA both parts replay CUDA graphs when one fits: the first pass of a verify step with draft 1
(`FirstPassGraphs`, keyed by padded rows at the width 1 + K) and the K - 1 chained passes (`ChainGraphs`, keyed by
padded rows); other steps (prefill chunks, plain decode steps, verify steps with fewer drafts) run the first pass
eagerly.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from deltaserve.cache.tensors import ModelCache
from deltaserve.engine.device_inputs import DeviceStep, upload_arrays, upload_step
from deltaserve.engine.step_input import PENDING, StepInput
from deltaserve.layers.forward_batch import ForwardBatch, QueryRows

log = logging.getLogger(__name__)


def kept_counts(step: StepInput, input_ids: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """[R] int64 tokens each sampling request keeps: 1 + the drafts that match the tokens sampled before them (a
    verify row: k = 1 + drafts logits rows, its inputs [last token, drafts...]); a request whose drafts are
    placeholders, or that verifies none (a prefill chunk after the verify rows), keeps 1."""
    r, v = len(step.sampling), step.num_verify_rows
    kept = torch.ones(r, dtype=torch.long, device=token_ids.device)
    if not v:
        return kept
    k = 1 + step.num_drafts
    sampled = token_ids[:v * k].view(v, k)
    drafts = input_ids[:v * k].view(v, k)[:, 1:]
    match = sampled[:, :-1] == drafts
    real = real_draft_rows(step, token_ids.device)
    if real is not None:
        match &= real
    kept[:v] += match.long().cumprod(dim=1).sum(dim=1)
    return kept


def real_draft_rows(step: StepInput, device: torch.device) -> torch.Tensor | None:
    """[V, 1] bool on the device, False for the verify rows whose drafts are placeholders (SamplingRequest);
    None when there are none (nothing to mask, nothing uploaded)."""
    placeholders = [s.placeholder_drafts for s in step.sampling[:step.num_verify_rows]]
    if not any(placeholders):
        return None
    (real,) = upload_arrays([~np.array(placeholders, dtype=np.bool_).reshape(-1, 1)], device)
    return real


def acceptance_probability(mean_tokens: float, k: int) -> float:
    """p such that a verify step of k drafts, each accepted with probability p once every draft before it was, keeps
    mean_tokens tokens on average: 1 + p + p^2 + ... + p^k = mean_tokens (bisection: the sum rises with p)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(mid ** j for j in range(k + 1)) < mean_tokens else (lo, mid)
    return (lo + hi) / 2


class SimulatedAcceptance:
    """Benchmarks with dummy weights only: a verify step accepts its drafts at random, as if they had matched, so
    that serving can be timed at a chosen acceptance length (random weights draft nothing the target accepts). Each
    draft is accepted with the probability p of `acceptance_probability` once all before it were; an accepted draft
    replaces the target's sample at its position, so the kept tokens are [d1 .. da, the target's token after da],
    whose KV and GDN states the verify forward computed: the engine stays consistent, only the text is the drafts'.
    What the sampler enforces does not bind a forced draft (logit bias, min_tokens, a stop id's suppression), and the
    logprobs reported at its position stay those of the target's own sample. A step with fewer drafts than K (near a
    length limit) keeps fewer tokens on average, as real acceptance would. Requests with a grammar never get drafts
    (engine.py): in a verify step their rows carry placeholder drafts, which are never forced, so no forced draft
    can break a grammar. Seeded: the same run accepts the same drafts."""

    def __init__(self, mean_tokens: float, k: int, device: torch.device, seed: int = 0) -> None:
        self.p = acceptance_probability(mean_tokens, k)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.device = device

    def force(self, step: StepInput, input_ids: torch.Tensor, token_ids: torch.Tensor) -> None:
        """Overwrite, in place, the sampled tokens of a verify step's accepted draft positions with the drafts."""
        v = step.num_verify_rows
        if not v:
            return
        k = 1 + step.num_drafts
        draws = torch.rand(v, k - 1, generator=self.generator, device=self.device)
        accept = (draws < self.p).cumprod(dim=1).bool()
        real = real_draft_rows(step, self.device)
        if real is not None:
            accept &= real  # a placeholder draft is never forced
        sampled = token_ids[:v * k].view(v, k)
        sampled[:, :-1] = torch.where(accept, input_ids[:v * k].view(v, k)[:, 1:], sampled[:, :-1])


def first_logits_rows(step: StepInput) -> np.ndarray:
    """[R] index of each sampling request's first logits row."""
    counts = np.fromiter((s.num_logits_rows for s in step.sampling), dtype=np.int64, count=len(step.sampling))
    return np.cumsum(counts) - counts


class MTPDrafter:
    """Proposes K greedy drafts per sampling request with the model's MTP head (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, cache: ModelCache, *, num_tokens: int, page_size: int,
                 device: torch.device, draft_vocab: int | None = None) -> None:
        """draft_vocab N: drafts are the argmax over token ids 0 .. N - 1 only (logits from the first N rows of the
        lm_head's weight); None: the whole vocabulary. Either way a draft is one token (q one-hot), so verification
        stays exact."""
        if getattr(model, "mtp", None) is None:
            raise RuntimeError("speculative decoding needs the model's MTP head (load it with with_mtp=True)")
        if draft_vocab is not None:
            model.lm_head_rows(draft_vocab)  # raises now if this lm_head cannot be sliced, or N is out of range
        self.model, self.cache, self.k, self.page_size, self.device = model, cache, num_tokens, page_size, device
        self.vocab = draft_vocab
        self.graphs: ChainGraphs | None = None  # set by capture() (CUDA, graphs on)
        self.first_graphs: FirstPassGraphs | None = None  # likewise

    @torch.no_grad()
    def write_kv(self, step: StepInput, dev: DeviceStep, input_ids: torch.Tensor, hidden: torch.Tensor,
                 token_ids: torch.Tensor | None) -> None:
        """The MTP head's KV at every token of a step that drafts nothing (as `first_pass`, no outputs)."""
        self.first_pass(step, dev, input_ids, hidden, token_ids, QueryRows.none(dev.batch))

    @torch.no_grad()
    def first_pass(self, step: StepInput, dev: DeviceStep, input_ids: torch.Tensor, hidden: torch.Tensor,
                   token_ids: torch.Tensor | None, rows: QueryRows) -> torch.Tensor:
        """The MTP head over the step (writing its KV at every token); token_ids [M]: the sampled tokens of the
        sampling logits rows (None when nothing samples). Returns its [R, D] output at the tokens `rows` picks."""
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
        return self.model.mtp_forward(nxt, hidden, batch, self.cache, rows)

    @torch.no_grad()
    def rewrite_resume_kv(self, step: StepInput, input_ids: torch.Tensor) -> None:
        """The head's KV at position p - 1 of each row that resumes from a prefix-cache checkpoint at p this step
        (its slot is the destination of one of the step's state copies), from the hidden state the checkpoint kept
        and the row's first input (its token at p). input_ids [T] on the device. Before anything reads that KV."""
        if not step.state_copies:  # no resume this step (most steps)
            return
        copied = np.array([c.dst for c in step.state_copies], dtype=np.int64)
        rows = np.flatnonzero(np.isin(step.state_slots, copied) & (step.context_lens > 0))
        if rows.size == 0:
            return
        r, pos = rows.size, step.context_lens[rows] - 1
        first = (np.cumsum(step.query_lens.astype(np.int64)) - step.query_lens)[rows]
        one_token = StepInput(input_ids=np.zeros(r, np.int64), query_lens=np.ones(r, np.int32), context_lens=pos,
                              state_slots=np.arange(r, dtype=np.int64), has_initial_state=np.ones(r, np.bool_),
                              block_table=np.ascontiguousarray(step.block_table[rows]),
                              logits_rows=np.arange(r, dtype=np.int64), sampling=())
        batch = upload_step(one_token, page_size=self.page_size, device=self.device).batch
        first_d, slots_d = upload_arrays([first, step.state_slots[rows].astype(np.int64)], self.device)
        self.model.mtp_forward(input_ids[first_d], self.cache.mtp_hidden[slots_d], batch, self.cache,
                               QueryRows.none(batch))

    @torch.no_grad()
    def keep_hidden(self, step: StepInput, dev: DeviceStep, hidden: torch.Tensor) -> None:
        """Each row's slot keeps the target's hidden state at the row's last token (a verify step's: at the last
        kept one, `keep_kept_hidden` once sampled)."""
        batch = dev.batch
        last, slots = batch.cu_seqlens[1:].long() - 1, batch.state_slots
        if batch.any_padding:
            (real,) = upload_arrays([np.flatnonzero(step.state_slots >= 0)], self.device)
            last, slots = last[real], slots[real]
        self.cache.mtp_hidden.index_copy_(0, slots, hidden[last])

    @torch.no_grad()
    def keep_kept_hidden(self, dev: DeviceStep, hidden: torch.Tensor, last_rows: torch.Tensor) -> None:
        """After a verify step: each verify row's slot keeps the hidden state at its last kept position (last_rows
        [V]: its logits row; the verify rows are the step's first sampling requests)."""
        slots = dev.sample_slots[:last_rows.shape[0]]
        self.cache.mtp_hidden.index_copy_(0, slots, hidden[dev.batch.logits_indices[last_rows]])

    @torch.no_grad()
    def propose(self, step: StepInput, dev: DeviceStep, input_ids: torch.Tensor, hidden: torch.Tensor,
                token_ids: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """[R, K] int64 drafts for the step's sampling requests, on the device.

        input_ids [T] (pending ones filled), hidden [T, D] the target's final-normed states, token_ids [M] the
        sampled tokens of the M sampling logits rows, kept [R] from kept_counts."""
        first_row, table, limit = self.chain_inputs(step)
        draft, x, positions = self.first_drafts(step, dev, input_ids, hidden, token_ids, kept, first_row)
        if self.k == 1:
            return draft.unsqueeze(1).clone()  # (a graph's output buffer otherwise: the next replay rewrites it)
        rest = self.chain(draft, x, positions, table, limit)
        return torch.cat([draft.unsqueeze(1), rest], dim=1)

    def chain_inputs(self, step: StepInput) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """On the device: [R] each sampling request's first logits row, and for the chained passes the [R, W] int32
        page table and [R] int64 KV limit of its row (every small array of this call, sent in one copy)."""
        n, r, ps = step.num_rows, len(step.sampling), self.page_size
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
        return first_row, table_d, limit

    @torch.no_grad()
    def first_drafts(self, step: StepInput, dev: DeviceStep, input_ids: torch.Tensor, hidden: torch.Tensor,
                     token_ids: torch.Tensor, kept: torch.Tensor,
                     first_row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The first pass (writing the MTP head's KV) and draft 1: ([R] draft 1, [R, D] the MTP output at each
        request's last kept position, [R] that position). Replayed from a CUDA graph when one fits the step (a
        verify step of at most the captured rows), else eager; both compute the same thing."""
        graphs = self.first_graphs
        if graphs is not None and graphs.can_run(step):
            return graphs.run(dev.batch, hidden, token_ids, kept)
        batch = dev.batch
        # the last kept position of each request: its MTP output gives draft 1 (the rest of the step: KV only)
        at = batch.logits_indices[first_row + kept - 1]
        seqs = torch.searchsorted(batch.cu_seqlens[1:], at, right=True)  # each one's row, on the device
        x = self.first_pass(step, dev, input_ids, hidden, token_ids, QueryRows.at(batch, at, seqs))
        return self.model.compute_logits(x, upcast=False, vocab=self.vocab).argmax(dim=-1), x, batch.positions[at]

    @torch.no_grad()
    def chain(self, draft: torch.Tensor, x: torch.Tensor, positions: torch.Tensor, table: torch.Tensor,
              limit: torch.Tensor) -> torch.Tensor:
        """Drafts 2..K ([R, K - 1]), replayed from CUDA graphs when they fit, else eager (`chain_drafts`)."""
        if self.graphs is not None and self.graphs.can_run(draft.shape[0], table.shape[1]):
            return self.graphs.run(draft, x, positions, table, limit)
        return chain_drafts(self.model, self.cache, draft, x, positions, table, limit, k=self.k,
                            page_size=self.page_size, vocab=self.vocab)

    def capture(self, *, max_rows: int, max_pages: int, max_verify_rows: int | None = None) -> None:
        """CUDA graphs of the first pass of verify steps (up to max_verify_rows rows, default the cache's verify
        rows) and of the chained draft passes (row counts up to max_rows); what fails to capture stays eager."""
        if self.device.type != "cuda":
            return
        verify_rows = min(max_rows, self.cache.verify_rows if max_verify_rows is None else max_verify_rows)
        if verify_rows > 0:
            first = FirstPassGraphs(self.model, self.cache, width=1 + self.k, max_rows=verify_rows,
                                    max_pages=max_pages, device=self.device, vocab=self.vocab)
            try:
                first.capture()
            except Exception as e:  # noqa: BLE001 - an eager first pass is slower, never wrong
                log.warning("CUDA graph capture of the MTP first draft pass failed (%s: %s); it runs eagerly",
                            type(e).__name__, e)
            else:
                self.first_graphs = first
        if self.k < 2:
            return
        graphs = ChainGraphs(self.model, self.cache, k=self.k, page_size=self.page_size, max_rows=max_rows,
                             max_pages=max_pages, device=self.device, vocab=self.vocab)
        try:
            graphs.capture()
        except Exception as e:  # noqa: BLE001 - an eager draft is slower, never wrong
            log.warning("CUDA graph capture of the MTP draft passes failed (%s: %s); they run eagerly",
                        type(e).__name__, e)
            return
        self.graphs = graphs


def chain_drafts(model: torch.nn.Module, cache: ModelCache, draft: torch.Tensor, x: torch.Tensor,
                 positions: torch.Tensor, table: torch.Tensor, limit: torch.Tensor, *, k: int,
                 page_size: int, vocab: int | None = None) -> torch.Tensor:
    """Drafts 2..k: the MTP head chained on its own output, one token per row at positions + 1, + 2, ...

    draft [R] (draft 1), x [R, D] (the MTP output that gave it), positions [R] (of x), table [R, W] int32 page
    table, limit [R] int64 (no KV is written at positions >= limit), vocab the draft vocabulary (None: all).
    Returns [R, k - 1] int64."""
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
        draft = model.compute_logits(x, upcast=False, vocab=vocab).argmax(dim=-1)
        drafts.append(draft)
    return torch.stack(drafts, dim=1)


@torch.no_grad()
def capture_by_rows(sizes: list[int], body, device: torch.device) -> dict:
    """One CUDA graph of body(r) per row count r, largest first so the smaller ones reuse its memory pool; each body
    runs twice before its capture (Triton compiles and autotunes outside it). Returns {r: (graph, body's outputs)}."""
    graphs, pool = {}, None
    for r in reversed(sizes):
        for _ in range(2):
            body(r)
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = body(r)
        pool = graph.pool()
        graphs[r] = (graph, out)
    torch.cuda.synchronize(device)
    return graphs


class FirstPassGraphs:
    """CUDA graphs of a verify step's first draft pass and draft 1 (`MTPDrafter.first_drafts`), one per padded row
    count, over static input buffers, for the step width w = 1 + K.

    Every token of a verify step is a sampling position, so the token after position i is the one sampled there:
    the MTP head reads the sampled tokens and the target's hidden states, and draft 1 is the lm_head argmax of its
    output at each row's last kept position (row * w + kept - 1). Padding rows are as in StepGraphs (KV slot -1,
    KV length 0: they write no KV, their outputs are dropped). The MTP layer is full attention: it reads no GDN state
    slot, so the buffers hold none."""

    def __init__(self, model: torch.nn.Module, cache: ModelCache, *, width: int, max_rows: int, max_pages: int,
                 device: torch.device, vocab: int | None = None) -> None:
        from deltaserve.engine.cuda_graph import capture_sizes

        self.model, self.cache, self.width, self.device, self.vocab = model, cache, width, device, vocab
        self.sizes = capture_sizes(max_rows)
        n, d = self.sizes[-1], model.config.hidden_size
        t = n * width
        i64, i32 = torch.int64, torch.int32
        self.token_ids = torch.zeros(t, dtype=i64, device=device)
        self.hidden = torch.zeros(t, d, dtype=model.model.embed_tokens.weight.dtype, device=device)
        self.positions = torch.zeros(t, dtype=i64, device=device)
        self.slot_mapping = torch.full((t,), -1, dtype=i64, device=device)
        self.tokens = torch.arange(t, dtype=i64, device=device)
        self.rows = torch.arange(n, dtype=i64, device=device)
        self.cu_seqlens = torch.arange(0, width * (n + 1), width, dtype=i32, device=device)
        self.seq_lens = torch.zeros(n, dtype=i32, device=device)
        self.slots = torch.full((n,), -1, dtype=i64, device=device)
        self.has_state = torch.ones(n, dtype=torch.bool, device=device)
        self.block_tables = torch.zeros(n, max(1, max_pages), dtype=i32, device=device)
        self.kept = torch.ones(n, dtype=i64, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        self.replays = 0

    def _batch(self, r: int) -> ForwardBatch:
        t = r * self.width
        return ForwardBatch(positions=self.positions[:t], cu_seqlens=self.cu_seqlens[:r + 1],
                            seq_lens=self.seq_lens[:r], state_slots=self.slots[:r],
                            has_initial_state=self.has_state[:r], block_tables=self.block_tables[:r],
                            slot_mapping=self.slot_mapping[:t], logits_indices=self.tokens[:t],
                            tokens_per_row=self.width, any_padding=True, keep_states=True)

    def _forward(self, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The captured body over the first r rows of the buffers: (draft 1 [r], MTP output [r, D], positions [r])."""
        t, batch = r * self.width, self._batch(r)
        at = self.rows[:r] * self.width + self.kept[:r] - 1
        x = self.model.mtp_forward(self.token_ids[:t], self.hidden[:t], batch, self.cache,
                                   QueryRows.at(batch, at, self.rows[:r]))
        return self.model.compute_logits(x, upcast=False, vocab=self.vocab).argmax(dim=-1), x, self.positions[:t][at]

    def capture(self) -> None:
        self.graphs.update(capture_by_rows(self.sizes, self._forward, self.device))  # every slot -1: no KV written

    def can_run(self, step: StepInput) -> bool:
        """A verify step of this width, rows and page-table width within the buffers, whose logits rows are all of
        its tokens in order (no prompt logprobs)."""
        t = step.num_tokens
        return (step.is_verify and step.tokens_per_row == self.width and step.num_rows <= self.sizes[-1]
                and step.block_table.shape[1] <= self.block_tables.shape[1]
                and step.prompt_logits_rows.shape[0] == 0 and step.logits_rows.shape[0] == t
                and bool((step.logits_rows == np.arange(t)).all()))

    def load(self, batch: ForwardBatch, hidden: torch.Tensor, token_ids: torch.Tensor, kept: torch.Tensor) -> int:
        """Copy a verify step's inputs into the buffers; returns the padded row count whose graph to replay."""
        n, w = batch.num_seqs, self.width
        t = n * w
        r = next(s for s in self.sizes if s >= n)
        self.token_ids[:t].copy_(token_ids)
        self.hidden[:t].copy_(hidden[:t])
        self.positions[:t].copy_(batch.positions)
        self.slot_mapping[:t].copy_(batch.slot_mapping)
        self.seq_lens[:n].copy_(batch.seq_lens)
        self.block_tables[:n, :batch.block_tables.shape[1]].copy_(batch.block_tables)
        self.kept[:n].copy_(kept)
        if r > n:  # padding rows (a larger step may have left real values there): no KV written, nothing read
            self.slot_mapping[t:r * w].fill_(-1)
            self.seq_lens[n:r].zero_()
        return r

    def run(self, batch: ForwardBatch, hidden: torch.Tensor, token_ids: torch.Tensor,
            kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Replay the smallest graph that fits: (draft 1 [R], MTP output [R, D], positions [R]), views of the
        graph's output buffers (valid until its next replay)."""
        n = batch.num_seqs
        draft, x, positions = self._replay(self.load(batch, hidden, token_ids, kept))
        return draft[:n], x[:n], positions[:n]

    def _replay(self, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        graph, out = self.graphs[r]
        graph.replay()
        self.replays += 1
        return out


class ChainGraphs:
    """CUDA graphs of `chain_drafts`, one per padded row count, over static input buffers. Padding rows write no KV
    (limit 0) and their drafts are dropped."""

    def __init__(self, model: torch.nn.Module, cache: ModelCache, *, k: int, page_size: int, max_rows: int,
                 max_pages: int, device: torch.device, vocab: int | None = None) -> None:
        from deltaserve.engine.cuda_graph import capture_sizes

        self.model, self.cache, self.k, self.page_size, self.device = model, cache, k, page_size, device
        self.vocab = vocab
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
                            self.limit[:r], k=self.k, page_size=self.page_size, vocab=self.vocab)

    def capture(self) -> None:
        self.graphs.update(capture_by_rows(self.sizes, self._run, self.device))  # limit 0: no KV written

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
