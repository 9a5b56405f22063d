"""The worker boundary: a step as plain host data (numpy arrays, tuples, SamplingParams), built by the engine from
the scheduler's output and handed to the runner, which owns everything on the device. Nothing here holds a live
Request or a tensor, so a StepInput pickles (under tensor parallelism it is what rank 0 broadcasts).

Vocabulary: T flat tokens of N rows (scheduled requests), M logits rows; a row's tokens are its new positions
[context_len, context_len + query_len). An input id of PENDING is a token sampled by a step still in flight: only the
device has it (the runner keeps the last token it sampled for each state slot). Likewise `device_draft(j)` is a
row's draft j (from 0) that only the device has: the MTP drafts the step before proposed, which the host does not
wait for (the runner keeps them by state slot beside the last token).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import NamedTuple

import numpy as np

from deltaserve.cache.manager import PageCopy, StateCopy, StateSource
from deltaserve.engine.scheduler import ScheduledRequest, SchedulerOutput
from deltaserve.sampling_params import SamplingParams

PENDING = -1


def device_draft(j: int) -> int:
    """The input id of draft j (from 0) of a row whose drafts only the device has: PENDING - 1 - j, so that every
    id below 0 reads column -1 - id of its slot's row in the runner's carried tokens (column 0 the last token)."""
    return PENDING - 1 - j


def carried_column(ids: np.ndarray) -> np.ndarray:
    """The column of the runner's carried tokens each negative input id reads (PENDING: 0; device_draft(j): 1 + j)."""
    return -1 - ids


class SamplingRequest(NamedTuple):
    """A request that samples this step: 1 + len(draft_token_ids) consecutive logits rows (the last positions of its
    row). num_output_tokens counts its outputs before this step, pending ones included: the position its seeded
    noise and min_tokens read. The histories are sent only when a penalty reads them (None otherwise). A NamedTuple:
    one is built per sampling row per step, and a frozen dataclass costs several times more to build.

    placeholder_drafts: its drafts only give a verify step's row its uniform width (the request had none to
    verify): it keeps exactly the token sampled at its first logits row, as a plain decode step would sample it,
    and nothing computed at the later positions (the KV there is overwritten later, the GDN state is committed at
    the first). Such drafts are neither verified nor counted."""

    request_id: str
    params: SamplingParams
    num_output_tokens: int
    draft_token_ids: tuple[int, ...] = ()
    prompt_token_ids: Sequence[int] | None = None
    output_token_ids: Sequence[int] | None = None
    placeholder_drafts: bool = False

    @property
    def num_logits_rows(self) -> int:
        return 1 + len(self.draft_token_ids)


class GrammarMask(NamedTuple):
    """The tokens each constrained logits row of a step may take (structured outputs): one bit per vocabulary id,
    int32 words, bit b of word w is id 32 * w + b. Built by the engine from its matchers once the tokens before
    the step are known; the runner applies it before sampling. Rows not listed are unconstrained.

    rows:    [R] int64        logits rows (indices into the step's sampling rows)
    bitmask: [R, ceil(V/32)] int32
    """

    rows: np.ndarray
    bitmask: np.ndarray


def needs_grammar(step: StepInput) -> bool:
    """Whether a request sampling in this step constrains its output: its sampling waits for a GrammarMask."""
    return any(s.params.structured is not None for s in step.sampling)


class PromptLogprobsRequest(NamedTuple):
    """A request that wants the logprobs of the prompt tokens this step covers: the logits at positions
    first_position, first_position + 1, ... (consecutive prompt_logits_rows) score target_ids, the prompt tokens
    that follow them; num_top alternatives each."""

    request_id: str
    first_position: int
    target_ids: tuple[int, ...]
    num_top: int


@dataclass(frozen=True)
class StepInput:
    """One step, host side.

    input_ids:         [T] int64   token ids, PENDING / device_draft(j) where only the device knows the token
    query_lens:        [N] int32   new tokens of each row
    context_lens:      [N] int32   tokens each row computed before this step
    state_slots:       [N] int64   GDN state slot each row reads and writes
    has_initial_state: [N] bool    False: the row's state starts from zeros (StateSource.ZEROS)
    block_table:       [N, W] int32  KV pages of each row (zero-padded)
    logits_rows:       [M] int64   rows of the flat batch whose logits are sampled
    sampling:          the requests that sample, in logits-row order
    state_copies:      GDN state copies the runner applies before the step runs (matched checkpoints)
    page_copies:       KV page copies it applies before the step runs (matched partial pages)
    state_snapshots:   GDN state copies it applies after the step ran (new checkpoints)
    prompt_logits_rows: [R] int64  rows whose logits score the next prompt token (prompt logprobs)
    prompt_logprobs:   the requests those rows belong to, in row order
    next_token_ids:    [N] int64   the known token after each row's last new token (a prefill chunk that does not
                       reach the end), PENDING for rows that sample it (read by the MTP drafter)
    page_counts:       [N] int32   KV pages each row holds (the drafter writes no KV past them)
    propose_drafts:    MTP: the runner drafts for the next step (else it only writes the MTP head's KV)
    """

    input_ids: np.ndarray
    query_lens: np.ndarray
    context_lens: np.ndarray
    state_slots: np.ndarray
    has_initial_state: np.ndarray
    block_table: np.ndarray
    logits_rows: np.ndarray
    sampling: tuple[SamplingRequest, ...]
    state_copies: tuple[StateCopy, ...] = ()
    page_copies: tuple[PageCopy, ...] = ()
    state_snapshots: tuple[StateCopy, ...] = ()
    prompt_logits_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    prompt_logprobs: tuple[PromptLogprobsRequest, ...] = ()
    next_token_ids: np.ndarray | None = None
    page_counts: np.ndarray | None = None
    propose_drafts: bool = True

    @property
    def num_drafts(self) -> int:
        """Drafts each row verifies (a verify step gives every row the same number; 0: no drafts)."""
        return len(self.sampling[0].draft_token_ids) if self.sampling else 0

    @property
    def is_verify(self) -> bool:
        """A verify step: its first rows (num_verify_rows, all of them or followed by prefill chunks) sample at
        1 + num_drafts positions each, num_drafts > 0."""
        return self.num_verify_rows > 0

    @cached_property
    def num_verify_rows(self) -> int:
        """Rows that verify drafts (0: none): the step's first rows, each its last token plus num_drafts drafts,
        sampled at every position. Rows after them (a verify step carrying prefill chunks) verify nothing. Counted
        once per step (the upload, the runner, the sampler's acceptance all read it)."""
        return sum(1 for s in self.sampling if s.draft_token_ids)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_rows(self) -> int:
        return int(self.query_lens.shape[0])

    @property
    def tokens_per_row(self) -> int | None:
        """k when every row carries exactly k new tokens after an existing state (k = 1: a plain decode step) and,
        in a verify step, every row verifies; None for a varlen step (prefill chunks, mixed batches)."""
        if self.num_rows == 0 or not self.has_initial_state.all():
            return None
        k = int(self.query_lens[0])
        if not (self.query_lens == k).all() or self.is_verify and self.num_verify_rows < self.num_rows:
            return None
        return k


class BlockTables:
    """Host copy of the running requests' block tables, one row per GDN state slot (a slot serves one request at a
    time). Each step writes only the pages added since the last one, instead of rebuilding [N, max_pages] from lists
    (at batch 64 that rebuild was ~0.3 ms of host time per step). Entries past a row's pages are 0. Engine-side
    state: the engine owns it, the step input carries the gathered rows."""

    def __init__(self, num_slots: int, max_pages: int) -> None:
        self.rows = np.zeros((num_slots, max(1, max_pages)), dtype=np.int32)
        self._owner: list[tuple[object, int] | None] = [None] * num_slots  # (request, its preemption count)
        self._length = [0] * num_slots

    def gather(self, scheduled: Sequence[ScheduledRequest]) -> np.ndarray:
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


def table_from_lists(scheduled: Sequence[ScheduledRequest]) -> np.ndarray:
    """The [N, width] zero-padded block table built from the entries' page lists (BlockTables gives the same)."""
    width = max([len(e.pages) for e in scheduled] + [1])
    table = np.zeros((len(scheduled), width), dtype=np.int32)
    for row, e in zip(table, scheduled):
        row[:len(e.pages)] = e.pages
    return table


def build_step_input(out: SchedulerOutput, *, block_tables: BlockTables | None = None) -> StepInput:
    """Concatenate each entry's new tokens (known ids, PENDING for a token in flight, then its drafts); logits rows
    for the last 1 + len(drafts) positions of entries that sample."""
    ids: list[int] = []
    logits_rows: list[int] = []
    sampling: list[SamplingRequest] = []
    prompt_rows: list[int] = []
    prompt_logprobs: list[PromptLogprobsRequest] = []
    next_ids: list[int] = []
    for entry in out.scheduled:
        known = entry.new_token_ids
        scored = _prompt_logprobs_request(entry)
        if scored is not None:
            prompt_rows += range(len(ids), len(ids) + len(scored.target_ids))
            prompt_logprobs.append(scored)
        ids += known
        ids += [PENDING] * (entry.num_new_tokens - len(known) - len(entry.draft_token_ids))
        ids += entry.draft_token_ids
        if entry.samples_token:
            logits_rows += range(len(ids) - 1 - len(entry.draft_token_ids), len(ids))
            sampling.append(_sampling_request(entry))
            next_ids.append(PENDING)
        else:  # a chunk short of the end: the token after it is known
            end = entry.num_computed_tokens + entry.num_new_tokens
            after = entry.request.token_ids(end, end + 1)
            next_ids.append(after[0] if after else PENDING)
    scheduled = out.scheduled
    table = block_tables.gather(scheduled) if block_tables is not None else table_from_lists(scheduled)
    return StepInput(
        input_ids=np.array(ids, dtype=np.int64),
        query_lens=np.array([e.num_new_tokens for e in scheduled], dtype=np.int32),
        context_lens=np.array([e.num_computed_tokens for e in scheduled], dtype=np.int32),
        state_slots=np.array([e.slot for e in scheduled], dtype=np.int64),
        has_initial_state=np.array([e.state_source is StateSource.SLOT for e in scheduled], dtype=np.bool_),
        block_table=np.ascontiguousarray(table, dtype=np.int32),
        logits_rows=np.array(logits_rows, dtype=np.int64),
        sampling=tuple(sampling), state_copies=out.state_copies, page_copies=out.page_copies,
        state_snapshots=out.state_snapshots,
        prompt_logits_rows=np.array(prompt_rows, dtype=np.int64), prompt_logprobs=tuple(prompt_logprobs),
        next_token_ids=np.array(next_ids, dtype=np.int64),
        page_counts=np.array([len(e.pages) for e in scheduled], dtype=np.int32), propose_drafts=out.propose_drafts)


def _prompt_logprobs_request(entry: ScheduledRequest) -> PromptLogprobsRequest | None:
    """The prompt positions of this chunk whose next token is a prompt token, when the request asks for prompt
    logprobs (a recomputed chunk after preemption asks again; the output side keeps the first answer)."""
    request = entry.request
    params = request.sampling_params
    if not isinstance(params, SamplingParams) or params.prompt_logprobs is None:
        return None
    start = entry.num_computed_tokens
    stop = min(start + entry.num_new_tokens, request.num_prompt_tokens - 1)
    if stop <= start:
        return None
    targets = tuple(request.prompt_token_ids[start + 1:stop + 1])
    return PromptLogprobsRequest(request.request_id, start, targets, params.prompt_logprobs)


def _sampling_request(entry: ScheduledRequest) -> SamplingRequest:
    request = entry.request
    params = request.sampling_params if isinstance(request.sampling_params, SamplingParams) else _DEFAULT_PARAMS
    reads_outputs = params.reads_outputs
    return SamplingRequest(
        request_id=request.request_id, params=params,
        num_output_tokens=request.num_output_tokens + request.num_pending_tokens,
        draft_token_ids=entry.draft_token_ids, placeholder_drafts=entry.placeholder_drafts,
        # references, not copies: in one process nothing is serialised; a broadcast copies them
        prompt_token_ids=request.prompt_token_ids if params.repetition_penalty != 1.0 else None,
        output_token_ids=request.output_token_ids if reads_outputs else None)


_DEFAULT_PARAMS = SamplingParams()  # for a Request built without parameters (tests driving the scheduler)
