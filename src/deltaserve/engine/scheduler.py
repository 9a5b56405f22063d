"""Continuous-batching scheduler: which requests compute how many tokens each step.

Pure Python, never imports torch. There are no prefill and decode phases: each step, every scheduled request gets
`num_new_tokens` so that its `num_computed_tokens` catches up with its `num_tokens` (a decode is a 1-token chunk, a
long prompt is split over several steps by the token budget, and a request with draft tokens computes its last token
plus the drafts, to verify them). Memory comes from the CacheManager: a request holds KV pages (full-attention
layers) and one GDN state slot while it runs; when pages run out the newest running request is preempted by
recompute: it gives everything back and later recomputes prompt + outputs from scratch.

The step protocol for the engine:
    out = scheduler.schedule()                 # asks the cache manager for pages/slots, may preempt
    ... build the step input from out.scheduled, launch the model and the sampler ...
    scheduler.commit_step(out)                 # the step is launched: positions computed, samples pending
    ... later, once the step's tokens reached the host ...
    got = scheduler.resolve_step(out, {request_id: [tokens]})   # appends them; rejected drafts roll back
    ... check stop conditions on `got`, call finish_request(...) for those that are done ...
An engine that overlaps steps schedules and launches step n+1 between commit_step(n) and resolve_step(n) (a pending
token is the input of its next position: the engine takes it from the device). `update_from_step` is commit then
resolve, for callers that do not overlap. abort_request/finish_request may be called at any time: freed pages and
slots are handed out again only by the next schedule(), and device work runs in launch order, so a step in flight
that still writes them harms nobody.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from deltaserve.cache.manager import (NO_MATCH, CacheManager, PageCopy, PendingCheckpoint, PrefixMatch, StateCopy,
                                      StateSource)
from deltaserve.config import SchedulerConfig
from deltaserve.engine.prefix_plan import checkpoint_positions, next_checkpoint, without_tail
from deltaserve.engine.request import Request, RequestStatus
from deltaserve.engine.step_cost import StepCostModel, StepShape


@dataclass(frozen=True)
class ScheduledRequest:
    """One request's work in one step: positions [num_computed_tokens, num_computed_tokens + num_new_tokens).

    With draft tokens the last len(draft_token_ids) positions are the drafts (proposed, not yet part of the
    request) and the step samples at each of the last 1 + len(drafts) positions to verify them.
    """

    request: Request
    num_new_tokens: int
    num_computed_tokens: int   # before this step: the position of the first new token
    pages: tuple[int, ...]     # block table after this step's allocation; covers every position computed so far
    slot: int                  # GDN state slot: where the step writes the state
    state_source: StateSource  # where the step's state starts from
    samples_token: bool        # the chunk reaches the last token (a pending one included): the engine samples
    draft_token_ids: tuple[int, ...] = ()
    # the drafts are placeholders (PLACEHOLDER_DRAFT): the request had none it could verify but rides in a verify
    # step beside requests that do; none of them is kept (the step keeps the token sampled at its last known position)
    placeholder_drafts: bool = False

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_samples(self) -> int:
        """Tokens this step may produce for the request: 1 + the drafts when it samples, else 0."""
        return 1 + len(self.draft_token_ids) if self.samples_token else 0

    @property
    def new_token_ids(self) -> list[int]:
        """The known ids of the chunk: a pending last token is left out (the engine reads it on the device), and
        the drafts are not part of it (see draft_token_ids)."""
        start = self.num_computed_tokens
        return self.request.token_ids(start, start + self.num_new_tokens - len(self.draft_token_ids))


@dataclass(frozen=True)
class SchedulerOutput:
    """The result of one schedule(): scheduled work in batch order, the ids preempted during this call, and the
    cache copies around the step (see the fields)."""

    scheduled: tuple[ScheduledRequest, ...]
    preempted: tuple[str, ...]
    num_batched_tokens: int
    state_copies: tuple[StateCopy, ...] = ()   # before the step: matched checkpoints into requests' slots
    page_copies: tuple[PageCopy, ...] = ()     # before the step: matched partial pages into requests' pages
    checkpoints: tuple[PendingCheckpoint, ...] = ()  # after the step: snapshots of slots into checkpoints
    # MTP: draft for the next step (False while more requests run than verify steps take: the drafts would be
    # dropped, and drafting reads the MTP head and the lm_head K times)
    propose_drafts: bool = True

    @property
    def state_snapshots(self) -> tuple[StateCopy, ...]:
        return tuple(c.snapshot for c in self.checkpoints)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


# The token id given to a verify row's placeholder drafts (any id would do: none of them is ever kept).
PLACEHOLDER_DRAFT = 0

# A waiting request defers to a running one that is computing at least this many more tokens of its prefix.
WAIT_FOR_PREFIX_TOKENS = 64


def _tokens_to_compute(request: Request) -> int:
    """Positions a running request's next step would compute before the token budget cuts them: the rest of its
    tokens, a pending one included; 0 while it waits: nothing is left (a token resolve_step never got), its pending
    token is the last one the length limit allows, or drafts are in flight (the next position depends on how many
    are kept)."""
    if request.reached_max_output or request.num_pending_drafts:
        return 0
    return max(request.num_tokens_with_pending - request.num_computed_tokens, 0)


def _scores_prompt(request: Request) -> bool:
    """The request asks for prompt logprobs: its prompt is computed whole, never resumed from the prefix cache (the
    positions a match skips would never be scored)."""
    return getattr(request.sampling_params, "prompt_logprobs", None) is not None


def _placeholders_pay(placeholders: int, rows: int) -> bool:
    """A verify step with this many placeholder rows out of `rows` is worth running: some row verifies real drafts
    and at least half do (each placeholder row waits a whole verify step for its one token)."""
    return placeholders < rows and 2 * placeholders <= rows


# Admission keeps KV pages free for the growth of the requests running (SchedulerConfig.growth_reserve; SGLang
# reserves alike): each of them, and the one admitted, is expected to write GROWTH of the output it may still write,
# counted up to GROWTH_CLIP tokens. GROWTH is learnt from the requests that end: each moves it by GROWTH_WEIGHT
# toward the share of its room (its output limit, up to GROWTH_CLIP tokens) it wrote, so clients that stop early
# leave room for more requests and those that run to their limit get it kept. It starts at GROWTH_START and goes
# back up to it at a preemption. Beside that expected growth, the tokens sure to come are kept room for as well: the
# rest of a prompt past the chunk a step gives it, or of a preempted request's recompute (without them, one
# re-admitted on its first chunk alone was preempted again at its next, over and over: 37 preemptions in one served
# H100 run). Admitting on the pages free now alone made a server whose memory holds fewer requests than run preempt,
# and recompute from the start, ~1.4 requests per request served (27B on an 80 GB H100; both in
# benchmarks/RESULTS.md, 2026-12-07).
GROWTH_START, GROWTH_WEIGHT, GROWTH_CLIP = 0.7, 0.1, 4096


def _is_decode_row(request: Request) -> bool:
    """A running request whose next step computes one token (its last, or a pending one's successor)."""
    return _tokens_to_compute(request) == 1


class Scheduler:
    """Owns the Requests it was given and asks the CacheManager for their memory; never touches device tensors.

    Policy per step (token budget `max_num_batched_tokens`):
    1. Running requests in admission order, each min(remaining tokens, budget left) (plus its drafts when it has
       budget for them), except that a prefill chunk leaves their tokens for every decode row (a request with one
       token left to compute) scheduled after it, so a long prompt ahead of them never costs them their token. A
       request that cannot get the pages for its chunk preempts the newest running request (possibly itself)
       until it can.
    2. If nothing was preempted: admit waiting requests strictly FCFS (preempted ones sit at the front) while
       there is budget, a free slot, fewer than `max_num_seqs` running, and free pages for the first chunk. With
       prefix caching a chunk ends at the request's planned checkpoints, except that a prompt whose rest fits the
       step (its first chunk at admission, or a later last one) while others wait that could run beside it drops
       the unmarked ones within a page of its end (prefix_plan.without_tail; the points the prompt's renderer
       marked stay), unless one of those waiting has the same prompt: under a queue its first token then comes
       with this step instead of a step later, beside the next prompt's whole chunk. For the same reason an
       admitted prompt (or a long prompt's last chunk, with no decode row behind it) whose rest fits the budget
       once the step's decode rows are not counted goes whole (`_whole_prompt`), dropping its unmarked tail
       checkpoints as a queued one does (unless its twin waits): the step goes past the budget by at most the
       decode rows' tokens (one each, or 1 + the drafts each in a verify step), and only when the prompt then ends.
    3. With MTP, the decode rows verify their drafts and come first in the step (see __init__).

    With a per-step time budget (`max_step_ms`) and running decode rows (requests with one token left to
    compute), the decode rows are counted first: their tokens are reserved from the token budget and their cost is
    predicted by `step_cost`. Each prefill chunk (of a running prompt, then of an admitted one) then gets the most
    tokens that keep the step's predicted time within the budget, except that the step's prefill chunks together
    get at least `min_prefill_chunk` tokens (max_num_batched_tokens / 16) when a prompt waits for them, so a long
    prompt always progresses. A step without decode rows keeps the whole token budget.
    """

    def __init__(self, config: SchedulerConfig, cache: CacheManager, *, checkpoint_interval: int = 4096,
                 speculative_tokens: int = 0, speculative_max_batch: int = 0,
                 step_cost: StepCostModel | None = None,
                 varlen_step_replays: Callable[[int, int], bool] | None = None) -> None:
        """checkpoint_interval: with prefix caching, a GDN state checkpoint every this many tokens along long
        prompts (besides the prompt's own cache points and branch points).

        speculative_tokens (K > 0: MTP speculative decoding): drafts are verified in steps where every decode row (a
        running request with one token to compute) verifies the same number of drafts (the GDN layers keep
        per-position buffers for such rows) while at most speculative_max_batch requests run; any other step strips
        the drafts. The verify rows come first in the step; prefill chunks (a running prompt's, an admitted one's)
        ride after them, so that a new prompt's step still gives each decode row its accepted drafts (one token
        otherwise: with 16 rows and 8k-token prompts, about 16 such steps in each request's life). A decode row with
        no draft it could verify (a constrained request never gets any; a request one token short of its length
        limit can verify none) rides in a verify step with placeholder drafts, none of which is kept, as long as
        another row verifies real ones. Each sampling request also gets pages for K - 1 positions past its step,
        where the drafter writes the MTP head's KV.

        varlen_step_replays(rows, tokens): whether a plain varlen step of that shape replays a CUDA graph (the
        runner's). A verify step carrying prompt chunks runs eagerly; where the same step without its drafts would
        replay a graph, it goes without them (_drafts_cost_a_graph). None: no graphs (CPU, enforce_eager).

        step_cost: the step-time model consulted under `config.max_step_ms` (default: one with the generic prior;
        the engine passes one with a prior from the model's size and feeds it measured steps)."""
        self._config = config
        self._max_step_ms = config.step_budget_ms
        self.step_cost = step_cost if step_cost is not None else StepCostModel()
        self._shape: StepShape | None = None  # this step's planned composition, while the time budget applies
        self._prefill_given = 0                # prefill tokens this step has given so far
        self._decode_given = 0                 # tokens this step has given decode rows so far (1 + drafts each)
        self._owed: set[str] = set()           # decode rows of this step not scheduled yet (each owed its tokens)
        self._row_width = 1                    # tokens each decode row takes this step (1 + its drafts)
        self._spec_k = speculative_tokens
        self._spec_max_batch = speculative_max_batch
        self._varlen_step_replays = varlen_step_replays
        self.drafts_dropped_for_graph = 0  # verify steps with prompt chunks that decoded plainly to replay a graph
        self.spec_turned_down = 0  # steps that ran without verifying because the batch was too large
        self.cache = cache
        self._checkpoint_interval = checkpoint_interval
        # A lone request must always fit, or it would preempt itself forever.
        if cache.num_pages * cache.page_size < config.max_model_len:
            raise ValueError(f"the KV pool holds {cache.num_pages} pages x {cache.page_size} tokens = "
                             f"{cache.num_pages * cache.page_size} tokens, fewer than max_model_len "
                             f"({config.max_model_len}); raise num_pages or lower max_model_len")
        self._requests: dict[str, Request] = {}
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []  # admission order: the last one is the first to be preempted
        self._next_arrival = 0
        self._growth = GROWTH_START  # the share of their remaining output requests are expected to write (GROWTH_*)

    # ---- read-only views ---------------------------------------------------------------------------------------
    @property
    def config(self) -> SchedulerConfig:
        return self._config

    @property
    def max_step_ms(self) -> float | None:
        """The per-step time budget in force (None: off)."""
        return self._max_step_ms

    def set_max_step_ms(self, ms: float | None) -> None:
        """Change the per-step time budget (None or 0: off); benchmarks sweep it on one engine. The cost model and
        what it learned are kept."""
        self._max_step_ms = SchedulerConfig(max_step_ms=ms).step_budget_ms  # validated as the option is

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> tuple[Request, ...]:
        return tuple(self._running)

    @property
    def waiting(self) -> tuple[Request, ...]:
        return tuple(self._waiting)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def get_request(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    # ---- request life cycle ------------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queue a fresh request at the back of the waiting queue. ValueError (state unchanged) if it can never run."""
        self.check_new(request)
        request.arrival_index = self._next_arrival
        self._next_arrival += 1
        self._requests[request.request_id] = request
        self._waiting.append(request)

    def check_new(self, request: Request) -> None:
        """ValueError naming the problem if `request` cannot be added (changes nothing)."""
        rid = request.request_id
        if rid in self._requests:
            raise ValueError(f"request id {rid!r} is already in the scheduler; ids of unfinished requests must be "
                             "unique")
        if request.status is not RequestStatus.WAITING or request.num_computed_tokens or \
                self.cache.allocation(rid) is not None:
            raise ValueError(f"request {rid!r} is not fresh (status {request.status.value}, "
                             f"{request.num_computed_tokens} computed tokens); pass a new Request")
        if request.num_prompt_tokens == 0:
            raise ValueError(f"request {rid!r} has an empty prompt; at least one prompt token is needed")
        if request.num_tokens > self._config.max_model_len:
            raise ValueError(f"request {rid!r} has {request.num_tokens} tokens, more than max_model_len "
                             f"({self._config.max_model_len}); shorten the prompt")
        # No separate "more pages than the pool" check: __init__ guarantees the pool holds max_model_len tokens.

    def abort_request(self, request_id: str) -> Request | None:
        """Abort a waiting, preempted or running request; returns it, or None if the id is unknown or finished."""
        if request_id not in self._requests:
            return None
        return self.finish_request(request_id, RequestStatus.FINISHED_ABORTED)

    def finish_request(self, request_id: str, status: RequestStatus, reason: str | None = None) -> Request:
        """End a request (stop condition, length, abort, error): free its pages and slot and forget it.

        `reason` defaults to the status's OpenAI-style finish_reason. KeyError for an unknown or finished id.
        """
        if not status.is_finished:
            raise ValueError(f"finish_request needs a FINISHED_* status, got {status}")
        request = self._requests.pop(request_id, None)
        if request is None:
            raise KeyError(f"no unfinished request with id {request_id!r}")
        ran = request.status is RequestStatus.RUNNING
        if ran:
            self._running.remove(request)
        else:
            self._waiting.remove(request)
        self.cache.free(request_id)
        if ran and status is not RequestStatus.FINISHED_ABORTED:  # what it wrote of its room teaches the growth
            wrote = request.num_output_tokens / max(1, self._output_room(request, 0))
            self._growth += GROWTH_WEIGHT * (min(wrote, 1.0) - self._growth)
        request.status = status
        request.finish_reason = reason if reason is not None else status.default_finish_reason
        return request

    # ---- one step ----------------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Decide this step's work; allocates pages and slots and may preempt (see the class docstring)."""
        max_tokens = self._config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[str] = []
        self._owed.clear()
        rows = self._decode_rows()
        uniform = self._uniform_drafts(max_tokens, rows) if self._spec_k else None
        self._owed.update(r.request_id for r in rows)
        self._row_width = 1 + uniform[0] if uniform else 1
        self._shape = self._decode_shape(rows, self._row_width) if self._max_step_ms is not None else None
        self._prefill_given = self._decode_given = 0
        budget = self._schedule_running(max_tokens, scheduled, preempted, uniform)
        # After a preemption memory is tight: admitting now would likely just re-admit the victim and thrash.
        if not preempted:
            budget = self._admit_waiting(budget, scheduled)
        if preempted:
            self._growth = max(self._growth, GROWTH_START)
        elif uniform and uniform[0] and self._drafts_cost_a_graph(scheduled):
            self.drafts_dropped_for_graph += 1
            budget += self._drop_drafts(scheduled)
        self.cache.tick += 1
        self._shape = None
        self._owed.clear()
        scheduled.sort(key=lambda s: not s.draft_token_ids)  # the rows that verify drafts first (stable)
        state_copies, page_copies = self._take_copies(scheduled)
        checkpoints = tuple(c for c in (self._checkpoint(s) for s in scheduled) if c is not None)
        return SchedulerOutput(tuple(scheduled), tuple(preempted), max_tokens - budget, state_copies, page_copies,
                               checkpoints, propose_drafts=len(self._running) <= self._spec_max_batch)

    def _schedule_running(self, budget: int, scheduled: list[ScheduledRequest], preempted: list[str],
                          uniform: tuple[int, frozenset[str]] | None) -> int:
        i = 0
        while i < len(self._running) and budget > 0:
            request = self._running[i]
            remaining = _tokens_to_compute(request)
            if remaining == 0:
                i += 1
                continue
            num_new = min(remaining, budget)
            prefill = not _is_decode_row(request)
            timed_chunk = prefill and self._shape is not None  # a prefill chunk under the time budget
            if timed_chunk:
                num_new = self._prefill_chunk(request.num_computed_tokens, num_new, budget)
            elif prefill and self._owed:
                num_new = min(num_new, budget - self._owed_tokens())  # the decode rows behind it keep their tokens
            elif prefill:  # a long prompt's last chunk goes whole, as an admitted prompt's (_whole_prompt)
                num_new = min(remaining, self._whole_prompt(remaining, budget))
            if num_new <= 0:
                i += 1
                continue
            num_new = self._cap_at_checkpoint(request, num_new, over=num_new > budget)
            if num_new > budget and request.num_computed_tokens + num_new < request.num_tokens:
                # over the budget only to end the prompt: a kept checkpoint cut it short, so the budget holds
                num_new = next_checkpoint(request.checkpoint_positions, request.num_computed_tokens,
                                          budget) - request.num_computed_tokens
            placeholder = False
            if uniform is None:
                drafts = self._drafts_for(request, num_new, budget)
            else:
                k, placeholders = uniform
                placeholder = request.request_id in placeholders
                drafts = (PLACEHOLDER_DRAFT,) * k if placeholder else tuple(request.draft_token_ids[:k])
            request.draft_token_ids = []  # proposals are for one step: used now or stale
            if not self._allocate_or_preempt(request, num_new + len(drafts), preempted):
                break  # it preempted itself, so it was the last running request
            if timed_chunk:
                self._add_chunk(num_new, request.num_computed_tokens)
            self._decode_given += 0 if prefill else 1 + len(drafts)
            self._owed.discard(request.request_id)
            scheduled.append(self._entry(request, num_new, drafts, placeholder=placeholder))
            budget -= num_new + len(drafts)
            i += 1
        if uniform is not None and uniform[1] and preempted:
            budget += self._drop_unpaid_placeholders(scheduled)
        return budget

    def _drop_unpaid_placeholders(self, scheduled: list[ScheduledRequest]) -> int:
        """After a preemption in a verify step with placeholder rows (the victims may be the rows with real drafts):
        if the rows left no longer meet _uniform_drafts's rule (some real drafts, at least half the rows), the step
        decodes plainly, every row without drafts (a verify step must stay uniform). Returns the tokens freed."""
        if _placeholders_pay(sum(s.placeholder_drafts for s in scheduled), len(scheduled)):
            return 0
        return self._drop_drafts(scheduled)

    def _drop_drafts(self, scheduled: list[ScheduledRequest]) -> int:
        """Every row of the step decodes plainly, without its drafts; returns the tokens freed."""
        freed = 0
        for j, s in enumerate(scheduled):
            if s.draft_token_ids:
                freed += len(s.draft_token_ids)
                scheduled[j] = self._entry(s.request, s.num_new_tokens - len(s.draft_token_ids), ())
        return freed

    def _drafts_cost_a_graph(self, scheduled: list[ScheduledRequest]) -> bool:
        """A verify step that carries prompt chunks, which would replay a varlen CUDA graph without its drafts. No
        graph is keyed by such a step: launched from Python it costs the host ~35 ms more than its kernels on
        35B-A3B (a 1,024-token chunk, H100) and more on 27B, while its drafts save the batch about 0.7 of a verify
        step (~20 ms; 1 - 1 / the acceptance length of 3.39). Served on 27B (H100, 512-token prompts, 16 clients),
        dropping them gave +16% throughput (benchmarks/RESULTS.md, 2026-12-07). Long chunks run eagerly either way
        and keep their drafts. (Prompt logprobs also run eagerly: such a step keeps them too.)"""
        if self._varlen_step_replays is None:
            return False
        chunks = [s for s in scheduled if not s.draft_token_ids]
        if not chunks or any(getattr(s.request.sampling_params, "prompt_logprobs", None) is not None
                             for s in chunks):
            return False
        tokens = sum(s.num_new_tokens - len(s.draft_token_ids) for s in scheduled)
        return self._varlen_step_replays(len(scheduled), tokens)

    # ---- the per-step time budget -------------------------------------------------------------------------------
    def _decode_rows(self) -> list[Request]:
        """Running requests this step will give one token (their last, or a pending one's successor)."""
        return [r for r in self._running if _is_decode_row(r)]

    @staticmethod
    def _decode_shape(rows: list[Request], width: int) -> StepShape | None:
        """The composition of this step's decode rows, `width` tokens each (1 + the drafts of a verify step), or None
        when there are none (no time budget then)."""
        if not rows:
            return None
        shape = StepShape()
        for r in rows:
            shape = shape.with_decode(r.num_computed_tokens, width)
        return shape

    def _owed_tokens(self) -> int:
        """Tokens the decode rows not scheduled yet keep of the budget: 1 each, 1 + the drafts in a verify step."""
        return len(self._owed) * self._row_width

    def _prefill_chunk(self, context: int, wanted: int, budget: int) -> int:
        """Tokens for a prefill chunk of up to `wanted` after `context` ones under the time budget: what keeps the
        step's predicted time within max_step_ms, raised to what the step still owes of min_prefill_chunk; the
        decode rows not scheduled yet keep their tokens of `budget` (_owed_tokens)."""
        assert self._shape is not None and self._max_step_ms is not None
        limit = min(wanted, budget - self._owed_tokens())
        fits = self.step_cost.largest_chunk(self._shape, context, limit, self._max_step_ms)
        floor = self._config.min_prefill_chunk - self._prefill_given
        return max(min(max(fits, floor), limit), 0)

    def _add_chunk(self, tokens: int, context: int) -> None:
        assert self._shape is not None
        self._shape = self._shape.with_chunk(tokens, context)
        self._prefill_given += tokens

    def _drafts_for(self, request: Request, num_new: int, budget: int) -> tuple[int, ...]:
        """The request's proposed drafts this step can verify: only on a one-token step (the last token is all that
        is left to compute), within the budget, the length limit and max_model_len."""
        if not request.draft_token_ids or num_new != 1:
            return ()
        room = min(budget - 1, self._config.max_model_len - request.num_tokens_with_pending)
        if request.max_output_tokens is not None:
            room = min(room, request.max_output_tokens - request.num_output_tokens - request.num_pending_tokens - 1)
        return tuple(request.draft_token_ids[:max(room, 0)])

    def _uniform_drafts(self, budget: int, rows: list[Request]) -> tuple[int, frozenset[str]]:
        """With speculative decoding: the drafts k every decode row (`rows`) verifies this step (0: a step without
        drafts; see __init__), and the rows that carry k placeholder drafts instead (no draft they could verify:
        none proposed, or none within their length limit). A step verifies only if some row has real drafts, and
        at least half the rows do; a placeholder row needs room for k positions within max_model_len (its KV is
        written there, then rolled back). Prefill chunks (running prompts, admissions) ride in the step after the
        verify rows, with the budget the verify rows leave."""
        if len(self._running) > self._spec_max_batch:
            self.spec_turned_down += 1  # (and the runner proposes no drafts: SchedulerOutput.propose_drafts)
            return 0, frozenset()
        if not rows or not any(r.draft_token_ids for r in rows):
            return 0, frozenset()
        k = min(budget // len(rows) - 1, self._spec_k)
        verifiable = [len(self._drafts_for(r, 1, k + 1)) for r in rows]
        placeholders = [r for r, n in zip(rows, verifiable) if n == 0]
        if k <= 0 or not _placeholders_pay(len(placeholders), len(rows)):
            return 0, frozenset()
        k = min([k, *(n for n in verifiable if n),
                 *(self._config.max_model_len - r.num_tokens_with_pending for r in placeholders)])
        if k <= 0:
            return 0, frozenset()
        return k, frozenset(r.request_id for r in placeholders)

    def _span(self, request: Request, end: int) -> int:
        """The positions [0, span) to hold pages for when a step computes the request up to `end`: with MTP and a step
        that samples, K - 1 more (the drafter's chained passes write the head's KV there and attend to it), within
        max_model_len."""
        if not self._spec_k or end < request.num_tokens_with_pending:
            return end
        return max(end, min(end + self._spec_k - 1, self._config.max_model_len))

    def _allocate_or_preempt(self, request: Request, num_new: int, preempted: list[str]) -> bool:
        """Give `request` the pages for `num_new` more tokens (and the drafter's positions after them, `_span`),
        preempting newest-first; False if it was preempted."""
        total = self._span(request, request.num_computed_tokens + num_new)
        if self.cache.pages_needed(total) > self.cache.num_pages:
            raise RuntimeError(f"request {request.request_id!r} needs {self.cache.pages_needed(total)} KV pages, "
                               f"more than the pool ({self.cache.num_pages}); the engine must finish requests at "
                               "max_model_len")
        while not self.cache.grow(request.request_id, total):
            # Victims come from the back, and everything already scheduled this step is in front of `request`.
            victim = self._running[-1]
            self._preempt(victim)
            preempted.append(victim.request_id)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self._running.remove(request)
        self.cache.free(request.request_id)
        # Recompute from scratch: outputs stay in num_tokens, so the resumed request sees the same sequence.
        request.num_computed_tokens = 0
        request.draft_token_ids = []  # for the step it no longer takes: its recompute samples the next token
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self._waiting.appendleft(request)

    def _admit_waiting(self, budget: int, scheduled: list[ScheduledRequest]) -> int:
        """FCFS, except that a request whose prompt shares a prefix that a running request is computing right now
        waits for that prefix's checkpoint (it then resumes there instead of computing it a second time)."""
        for request in list(self._waiting):
            if budget <= 0 or len(self._running) >= self._config.max_num_seqs:
                break
            if request.num_pending_tokens:
                # Preempted with a token in flight (admission is skipped in the schedule that preempts, and the
                # engine resolves the token before the next one, so this is a guard): recompute once it is known.
                break
            tokens = request.token_ids(0, request.num_tokens)
            if _scores_prompt(request):
                match = NO_MATCH  # every prompt position must run through the model to be scored
            else:
                match = self.cache.match_prefix(tokens, request.request_id)
                if self.cache.claimed_position(tokens, request.request_id) >= \
                        match.num_tokens + WAIT_FOR_PREFIX_TOKENS:
                    continue
            limit = self._whole_prompt(request.num_tokens - match.num_tokens, budget)
            if self._shape is not None:
                limit = self._prefill_chunk(match.num_tokens, min(request.num_tokens - match.num_tokens, budget),
                                            budget)
                if limit <= 0:
                    break  # strict FCFS, as below
            num_new = self._admission_chunk(request, tokens, match.num_tokens, limit, over=limit > budget)
            if num_new > budget and match.num_tokens + num_new < request.num_tokens:
                # over the budget only to end the prompt: a kept checkpoint cut it short, so the budget holds
                num_new = self._admission_chunk(request, tokens, match.num_tokens, budget)
            span = self._span(request, match.num_tokens + num_new)
            if not self.cache.can_admit(span, match, self._growth_reserve(request, match.num_tokens + num_new)):
                if not self._blocked_by_own_match(match):
                    break  # strict FCFS: nobody overtakes the head of the queue
                # resuming needs more pages than the pool has besides the matched checkpoint's (admission keeps it),
                # and nothing runs that would free one: waiting would be forever, computing from the start is not
                match = NO_MATCH  # (with nothing running there are no decode rows: `limit` is the whole budget)
                num_new = self._admission_chunk(request, tokens, 0, limit)
                if not self.cache.can_admit(self._span(request, num_new)):
                    break
            self._waiting.remove(request)
            self.cache.admit(request.request_id, self._span(request, match.num_tokens + num_new), match)
            self._on_admitted(request, tokens, match.num_tokens)
            if self._shape is not None:
                self._add_chunk(num_new, match.num_tokens)
            scheduled.append(self._entry(request, num_new, ()))
            budget -= num_new
        return budget

    def _growth_reserve(self, candidate: Request, candidate_end: int) -> int:
        """KV pages to leave free when admitting `candidate` with pages up to position `candidate_end`: the tokens
        the running requests and it are sure to compute past the positions they have computed or are given now (the
        rest of a prompt, or of a preempted request's recompute), and the expected growth (GROWTH_*) of their
        outputs; none while nothing runs (a lone request is admitted whenever it fits)."""
        if not self._config.growth_reserve or not self._running:
            return 0
        cache = self.cache
        known = sum(max(cache.pages_needed(r.num_tokens) - len(cache.allocation(r.request_id).pages), 0)
                    for r in self._running)
        known += max(cache.pages_needed(candidate.num_tokens) - cache.pages_needed(candidate_end), 0)
        rows = (*self._running, candidate)
        expected = sum(int(self._growth * self._output_room(r, r.num_output_tokens)) for r in rows)
        return known + -(-expected // cache.page_size)

    def _output_room(self, request: Request, written: int) -> int:
        """Output tokens `request` may still write once it has written `written`, counted up to GROWTH_CLIP."""
        rest = self._config.max_model_len - request.num_prompt_tokens - written
        if request.max_output_tokens is not None:
            rest = min(rest, request.max_output_tokens - written)
        return min(max(rest, 0), GROWTH_CLIP)

    def _blocked_by_own_match(self, match: PrefixMatch) -> bool:
        """A resume from `match` that does not fit never will: nothing runs, so every page but the matched
        checkpoint's is free or evictable already."""
        return match.checkpoint is not None and not self._running

    def _admission_chunk(self, request: Request, tokens: list[int], matched: int, budget: int, *,
                         over: bool = False) -> int:
        """over: `budget` is past the token budget (_whole_prompt), so that the prompt ends this step."""
        request.checkpoint_positions = self._plan_checkpoints(request, tokens, matched)
        num_new = min(request.num_tokens - matched, budget)
        if matched + num_new == request.num_tokens and (self._queued_behind(request, admitting=True) or
                                                        over and not self._twin_waits(request)):
            # the rest of the prompt fits this step and others wait, or it goes past the budget to end now: its
            # first token now, not a step later (before the positions are claimed, below)
            request.checkpoint_positions = without_tail(request.checkpoint_positions, request.num_prompt_tokens,
                                                        self.cache.page_size, keep=request.cache_points)
        return next_checkpoint(request.checkpoint_positions, matched, num_new) - matched

    def _waits_on_a_claim(self) -> bool:
        """A waiting request shares a prefix that a running request has claimed (it may wait for that checkpoint)."""
        return any(self.cache.claimed_position(r.token_ids(0, r.num_tokens), r.request_id) > 0 for r in self._waiting)

    def _whole_prompt(self, rest: int, budget: int) -> int:
        """A prompt chunk's limit: the budget left, or the prompt's whole rest where that fits the token budget once
        this step's decode rows (those scheduled before it) are not counted. A prompt of max_num_batched_tokens
        (the published 8,192-token workload) would otherwise lose its last few tokens to the decode rows running
        beside it and sample its first token a step later, under a queue beside the next prompt's whole chunk.
        The callers keep a chunk over the budget only when it then ends the prompt (a checkpoint it keeps may cut it
        short). The step goes past max_num_batched_tokens by at most its decode rows' tokens (one each, 1 + the
        drafts in a verify step: 64 for 16 rows of 3 drafts): within the activation margin of the memory plan (10%)
        for budgets of a few thousand tokens; a step of up to 16 plain decode rows still fits the prefill graphs'
        full-step bucket (budget + 1 rounded up to 64) unless the budget is 1 to 15 tokens below a multiple of 64,
        where such a step runs eagerly (a verify step with a prefill chunk always does)."""
        return rest if budget < rest <= budget + self._decode_given else budget

    def _queued_behind(self, request: Request, admitting: bool) -> bool:
        """Another request waits that could run beside it (a sequence and a slot are free for it besides this one,
        which takes its own when `admitting`), and none has the same prompt (it would resume at the tail
        checkpoint)."""
        need = 2 if admitting else 1
        if len(self._waiting) < need or len(self._running) + need > self._config.max_num_seqs \
                or self.cache.num_free_slots < need:
            return False
        return not self._twin_waits(request)

    def _twin_waits(self, request: Request) -> bool:
        """A waiting request has the same prompt (it would resume at the prompt's tail checkpoint)."""
        key = request.prompt_key
        return any(r.prompt_key == key for r in self._waiting if r is not request)

    def _on_admitted(self, request: Request, tokens: list[int], matched: int) -> None:
        request.num_computed_tokens = matched
        request.status = RequestStatus.RUNNING
        self._running.append(request)
        self.cache.claim_prefixes(request.request_id, tokens, request.checkpoint_positions)
        if request.num_cached_tokens is None:  # the first admission is the one users see
            request.num_cached_tokens = matched
            if self.cache.prefix_caching and not _scores_prompt(request):  # a lookup took place (as vLLM counts)
                self.cache.counters["prompt_tokens_cached"] += matched
                self.cache.counters["prompt_tokens_queried"] += len(tokens)  # per sequence, as hits: n > 1 counts n

    def _entry(self, request: Request, num_new: int, drafts: tuple[int, ...], *,
               placeholder: bool = False) -> ScheduledRequest:
        allocation = self.cache.allocation(request.request_id)
        assert allocation is not None
        computed = request.num_computed_tokens
        fresh = computed == 0 and allocation.state_copy is None
        return ScheduledRequest(request=request, num_new_tokens=num_new + len(drafts), num_computed_tokens=computed,
                                pages=tuple(allocation.pages), slot=allocation.slot,
                                state_source=StateSource.ZEROS if fresh else StateSource.SLOT,
                                samples_token=computed + num_new == request.num_tokens_with_pending,
                                draft_token_ids=drafts, placeholder_drafts=placeholder)

    def _take_copies(self, scheduled: list[ScheduledRequest]) -> tuple[tuple[StateCopy, ...], tuple[PageCopy, ...]]:
        """The copies a matched prefix brings, taken once (by the request's first step after admission)."""
        states, pages = [], []
        for s in scheduled:
            allocation = self.cache.allocation(s.request_id)
            if allocation.state_copy is not None:  # type: ignore[union-attr]
                states.append(allocation.state_copy)  # type: ignore[union-attr]
            if allocation.page_copy is not None:  # type: ignore[union-attr]
                pages.append(allocation.page_copy)  # type: ignore[union-attr]
            allocation.state_copy = allocation.page_copy = None  # type: ignore[union-attr]
        return tuple(states), tuple(pages)

    # ---- prefix checkpoints --------------------------------------------------------------------------------------
    def _plan_checkpoints(self, request: Request, tokens: list[int], matched: int) -> list[int]:
        if not self.cache.prefix_caching:
            return []
        branch = self.cache.branch_position(tokens, request.num_tokens - 1, request.request_id)
        return checkpoint_positions(request, matched, branch, self._checkpoint_interval, self.cache.page_size)

    def _cap_at_checkpoint(self, request: Request, num_new: int, *, over: bool = False) -> int:
        """A chunk ends at the next planned checkpoint position, so the state there is a step's end state; the last
        chunk of a long prompt under a queue (or past the budget to end now: `over`) first drops the unmarked tail
        positions, as an admission would (_admission_chunk), and gives back their claims, unless a waiting request
        waits for a claimed prefix (it may be one of these: a prompt extending this one)."""
        computed = request.num_computed_tokens
        if computed + num_new == request.num_tokens:  # the last chunk: the queue checks only if it has a tail to drop
            kept = without_tail(request.checkpoint_positions, request.num_prompt_tokens, self.cache.page_size,
                                keep=request.cache_points)
            dropped = [p for p in request.checkpoint_positions if p not in kept and p > computed]
            ends_now = self._queued_behind(request, admitting=False) or over and not self._twin_waits(request)
            if dropped and ends_now and not self._waits_on_a_claim():
                self.cache.unclaim(request.request_id, request.token_ids(0, request.num_prompt_tokens), dropped)
                request.checkpoint_positions = [p for p in request.checkpoint_positions if p not in dropped]
        return next_checkpoint(request.checkpoint_positions, computed, num_new) - computed

    def _checkpoint(self, entry: ScheduledRequest) -> PendingCheckpoint | None:
        end = entry.num_computed_tokens + entry.num_new_tokens - len(entry.draft_token_ids)
        request = entry.request
        if end not in request.checkpoint_positions or end > request.num_tokens:
            return None
        return self.cache.reserve_checkpoint(request.request_id, request.token_ids(0, end), end)

    def checkpoint_finished(self, request_id: str) -> StateCopy | None:
        """A request that ends normally leaves a checkpoint of its whole sequence (the next turn of a conversation
        resumes there). The copy is to apply now: the request's slot holds the state of every position it computed,
        its in-flight steps included, and device work runs in order."""
        request = self._requests.get(request_id)
        if request is None or request.status is not RequestStatus.RUNNING or \
                request.num_computed_tokens > request.num_tokens:
            return None
        pending = self.cache.reserve_checkpoint(request_id, request.token_ids(0, request.num_computed_tokens),
                                                request.num_computed_tokens, generated=True)
        if pending is None:
            return None
        self.cache.publish(pending)
        return pending.snapshot

    def roll_back(self, request_id: str, num: int) -> None:
        """A running request's last `num` computed positions no longer count, like rejected drafts' (its output
        ended before the tokens its verify step computed there). KeyError for an id that is not running."""
        request = self._requests.get(request_id)
        if request is None or request.status is not RequestStatus.RUNNING:
            raise KeyError(f"no running request with id {request_id!r}")
        if not 0 <= num <= request.num_computed_tokens:
            raise ValueError(f"cannot roll back {num} of the {request.num_computed_tokens} positions request "
                             f"{request_id!r} computed")
        request.num_computed_tokens -= num

    def abandon(self, output: SchedulerOutput) -> None:
        """A scheduled step that will never run: give back its checkpoint reservations."""
        for pending in output.checkpoints:
            self.cache.cancel(pending)

    def update_from_step(self, output: SchedulerOutput, sampled: Mapping[str, Sequence[int] | int | None]
                         ) -> list[Request]:
        """Apply a finished step: commit_step then resolve_step (see those)."""
        self._check_sampled(output, sampled)
        self.commit_step(output)
        return self.resolve_step(output, sampled)

    def commit_step(self, output: SchedulerOutput) -> None:
        """The step's work is launched: advance num_computed_tokens; each token it may sample becomes pending.

        Entries whose request ended since schedule() are skipped. Validates before changing anything.
        """
        live = [s for s in output.scheduled if s.request.status is RequestStatus.RUNNING]
        for s in live:
            if s.request.num_computed_tokens != s.num_computed_tokens:
                raise RuntimeError(f"request {s.request_id!r} has {s.request.num_computed_tokens} computed tokens, "
                                   f"the output expected {s.num_computed_tokens}: stale or twice-applied output")
        for s in live:
            s.request.num_computed_tokens += s.num_new_tokens
            s.request.num_pending_tokens += s.num_samples
            s.request.num_pending_drafts += len(s.draft_token_ids)
        for pending in output.checkpoints:  # the snapshots run with the step: matchable from now on
            self.cache.publish(pending)

    def resolve_step(self, output: SchedulerOutput, sampled: Mapping[str, Sequence[int] | int | None]
                     ) -> list[Request]:
        """The committed step's tokens reached the host: append each request's list (`sampled`: request id -> the
        tokens it kept, 1 to 1 + drafts of them, for every entry with `samples_token`; a bare int is one token).
        Rejected drafts roll the request's computed positions back (their K/V is overwritten later, the GDN state
        was committed by the runner at the last kept token). A request preempted since the commit keeps its tokens
        (it recomputes them); one that ended drops them. Returns the requests that got tokens (running or
        preempted), in batch order, for the engine's stop checks."""
        self._check_sampled(output, sampled)
        appended: list[Request] = []
        for s in output.scheduled:
            request = s.request
            if not s.samples_token or request.num_pending_tokens < s.num_samples:
                continue
            request.num_pending_tokens -= s.num_samples
            request.num_pending_drafts -= len(s.draft_token_ids)
            if request.status.is_finished:
                continue
            tokens = _as_list(sampled[s.request_id])
            rejected = s.num_samples - len(tokens)
            if request.status is RequestStatus.RUNNING:
                request.num_computed_tokens -= rejected
            request.output_token_ids.extend(tokens)
            appended.append(request)
        return appended

    @staticmethod
    def _check_sampled(output: SchedulerOutput, sampled: Mapping[str, Sequence[int] | int | None]) -> None:
        for s in output.scheduled:
            if not s.samples_token or s.request.status.is_finished:
                continue
            tokens = sampled.get(s.request_id)
            most = 1 if s.placeholder_drafts else s.num_samples  # a placeholder draft is never kept
            ok = isinstance(tokens, int) or (
                isinstance(tokens, (list, tuple)) and 1 <= len(tokens) <= most
                and all(isinstance(t, int) for t in tokens))
            if not ok:
                raise ValueError(f"request {s.request_id!r} reached its last token this step but `sampled` has "
                                 f"no valid tokens for it (got {tokens!r}; expected 1 to {most} ints)")


def _as_list(tokens: Sequence[int] | int | None) -> list[int]:
    return [tokens] if isinstance(tokens, int) else list(tokens)  # type: ignore[arg-type]
