"""Continuous-batching scheduler: which requests compute how many tokens each step.

Pure Python, never imports torch. There are no prefill and decode phases: each step, every scheduled request gets
`num_new_tokens` so that its `num_computed_tokens` catches up with its `num_tokens` (a decode is a 1-token chunk, a
long prompt is split over several steps by the token budget). Memory is a pool of KV pages (full-attention layers)
and a pool of GDN state slots (one per running request); when pages run out the newest running request is
preempted by recompute: it gives everything back and later recomputes prompt + outputs from scratch.

The step protocol for the engine:
    out = scheduler.schedule()             # allocates pages/slots, may preempt
    ... build the batch from out.scheduled, run the model, sample for entries with samples_token ...
    got = scheduler.update_from_step(out, {request_id: token})   # advances, appends sampled tokens
    ... check stop conditions on `got`, call finish_request(...) for those that are done ...
update_from_step is commit_step (advance; each sampled token becomes pending) then resolve_step (append the
tokens). An engine that overlaps steps commits step n at launch, schedules and launches step n+1 (a pending token
is the input of its next position: the engine takes it from the device), and resolves step n after that.
abort_request/finish_request may be called at any time: freed pages and slots are handed out again only by the
next schedule(), and device work runs in launch order, so a step in flight that still writes them harms nobody.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from deltaserve.cache.allocator import PageAllocator, SlotAllocator
from deltaserve.config import SchedulerConfig
from deltaserve.engine.request import Request, RequestStatus


@dataclass(frozen=True)
class ScheduledRequest:
    """One request's work in one step: positions [num_computed_tokens, num_computed_tokens + num_new_tokens)."""

    request: Request
    num_new_tokens: int
    num_computed_tokens: int   # before this step: the position of the first new token
    pages: tuple[int, ...]     # block table after this step's allocation; covers every position computed so far
    slot: int                  # GDN state slot
    starts_fresh: bool         # nothing computed before: the GDN state (and conv state) must start from zeros
    samples_token: bool        # the chunk reaches the last token (a pending one included): the engine samples

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def new_token_ids(self) -> list[int]:
        """The known ids of the chunk: a pending last token is left out (the engine reads it on the device)."""
        start = self.num_computed_tokens
        return self.request.token_ids(start, start + self.num_new_tokens)


@dataclass(frozen=True)
class SchedulerOutput:
    """The result of one schedule(): scheduled work in batch order, and ids preempted during this call."""

    scheduled: tuple[ScheduledRequest, ...]
    preempted: tuple[str, ...]
    num_batched_tokens: int

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """Owns the Requests it was given and the page and slot allocators; never touches device tensors.

    Policy per step (token budget `max_num_batched_tokens`):
    1. Running requests in admission order, each min(remaining tokens, budget left). A request that cannot get
       the pages for its chunk preempts the newest running request (possibly itself) until it can.
    2. If nothing was preempted: admit waiting requests strictly FCFS (preempted ones sit at the front) while
       there is budget, a free slot, fewer than `max_num_seqs` running, and free pages for the first chunk.
    """

    def __init__(self, config: SchedulerConfig, *, page_size: int, num_pages: int, num_slots: int) -> None:
        if not isinstance(page_size, int) or page_size <= 0:
            raise ValueError(f"page_size must be a positive integer, got {page_size!r}")
        self._config = config
        self._page_size = page_size
        self._pages = PageAllocator(num_pages)
        self._slots = SlotAllocator(num_slots)
        # A lone request must always fit, or it would preempt itself forever.
        if num_pages * page_size < config.max_model_len:
            raise ValueError(f"the KV pool holds {num_pages} pages x {page_size} tokens = {num_pages * page_size} "
                             f"tokens, fewer than max_model_len ({config.max_model_len}); raise num_pages or "
                             f"lower max_model_len")
        self._requests: dict[str, Request] = {}
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []  # admission order: the last one is the first to be preempted
        self._next_arrival = 0

    # ---- read-only views ---------------------------------------------------------------------------------------
    @property
    def config(self) -> SchedulerConfig:
        return self._config

    @property
    def page_size(self) -> int:
        return self._page_size

    @property
    def page_allocator(self) -> PageAllocator:
        return self._pages

    @property
    def slot_allocator(self) -> SlotAllocator:
        return self._slots

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

    def pages_needed(self, num_tokens: int) -> int:
        """Pages that hold K/V for positions [0, num_tokens)."""
        return -(-num_tokens // self._page_size)

    # ---- request life cycle ------------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queue a fresh request at the back of the waiting queue. ValueError (state unchanged) if it can never run."""
        self._check_new(request)
        request.arrival_index = self._next_arrival
        self._next_arrival += 1
        self._requests[request.request_id] = request
        self._waiting.append(request)

    def _check_new(self, request: Request) -> None:
        rid = request.request_id
        if rid in self._requests:
            raise ValueError(f"request id {rid!r} is already in the scheduler; ids of unfinished requests must be "
                             "unique")
        if (request.status is not RequestStatus.WAITING or request.num_computed_tokens or request.pages
                or request.slot is not None):
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
        if request.status is RequestStatus.RUNNING:
            self._running.remove(request)
        else:
            self._waiting.remove(request)
        self._release(request)
        request.status = status
        request.finish_reason = reason if reason is not None else status.default_finish_reason
        return request

    def _release(self, request: Request) -> None:
        self._pages.free(request.pages)
        request.pages = []
        if request.slot is not None:
            self._slots.free(request.slot)
            request.slot = None

    # ---- one step ----------------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Decide this step's work; allocates pages and slots and may preempt (see the class docstring)."""
        max_tokens = self._config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[str] = []
        budget = self._schedule_running(max_tokens, scheduled, preempted)
        # After a preemption memory is tight: admitting now would likely just re-admit the victim and thrash.
        if not preempted:
            budget = self._admit_waiting(budget, scheduled)
        return SchedulerOutput(tuple(scheduled), tuple(preempted), max_tokens - budget)

    def _schedule_running(self, budget: int, scheduled: list[ScheduledRequest], preempted: list[str]) -> int:
        i = 0
        while i < len(self._running) and budget > 0:
            request = self._running[i]
            num_new = min(request.num_tokens_with_pending - request.num_computed_tokens, budget)
            # Nothing to compute (waiting for a token that update_from_step never got), or the pending token is
            # the last one the length limit allows.
            if num_new <= 0 or request.reached_max_output:
                i += 1
                continue
            if not self._allocate_or_preempt(request, num_new, preempted):
                break  # it preempted itself, so it was the last running request
            scheduled.append(self._entry(request, num_new))
            budget -= num_new
            i += 1
        return budget

    def _allocate_or_preempt(self, request: Request, num_new: int, preempted: list[str]) -> bool:
        """Give `request` the pages for `num_new` more tokens, preempting newest-first; False if it was preempted."""
        total = self.pages_needed(request.num_computed_tokens + num_new)
        if total > self._pages.num_total:
            raise RuntimeError(f"request {request.request_id!r} needs {total} KV pages, more than the pool "
                               f"({self._pages.num_total}); the engine must finish requests at max_model_len")
        need = total - len(request.pages)
        while need > self._pages.num_free:
            # Victims come from the back, and everything already scheduled this step is in front of `request`.
            victim = self._running[-1]
            self._preempt(victim)
            preempted.append(victim.request_id)
            if victim is request:
                return False
        request.pages.extend(self._pages.allocate(need))
        return True

    def _preempt(self, request: Request) -> None:
        self._running.remove(request)
        self._release(request)
        # Recompute from scratch: outputs stay in num_tokens, so the resumed request sees the same sequence.
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self._waiting.appendleft(request)

    def _admit_waiting(self, budget: int, scheduled: list[ScheduledRequest]) -> int:
        while (self._waiting and budget > 0 and len(self._running) < self._config.max_num_seqs
               and self._slots.num_free > 0):
            request = self._waiting[0]
            if request.num_pending_tokens:
                # Preempted with a token in flight (admission is skipped in the schedule that preempts, and the
                # engine resolves the token before the next one, so this is a guard): recompute once it is known.
                break
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            need = self.pages_needed(request.num_computed_tokens + num_new)
            if need > self._pages.num_free:
                break  # strict FCFS: nobody overtakes the head of the queue
            self._waiting.popleft()
            request.slot = self._slots.allocate()
            request.pages = self._pages.allocate(need)
            request.status = RequestStatus.RUNNING
            self._running.append(request)
            scheduled.append(self._entry(request, num_new))
            budget -= num_new
        return budget

    def _entry(self, request: Request, num_new: int) -> ScheduledRequest:
        assert request.slot is not None
        computed = request.num_computed_tokens
        return ScheduledRequest(request=request, num_new_tokens=num_new, num_computed_tokens=computed,
                                pages=tuple(request.pages), slot=request.slot, starts_fresh=computed == 0,
                                samples_token=computed + num_new == request.num_tokens_with_pending)

    def update_from_step(self, output: SchedulerOutput, sampled: Mapping[str, int | None]) -> list[Request]:
        """Apply a finished step: commit_step then resolve_step (see those)."""
        self._check_sampled(output, sampled)
        self.commit_step(output)
        return self.resolve_step(output, sampled)

    def commit_step(self, output: SchedulerOutput) -> None:
        """The step's work is launched: advance num_computed_tokens; each sampled token becomes pending.

        Entries whose request ended since schedule() are skipped. Validates before changing anything.
        """
        live = [s for s in output.scheduled if s.request.status is RequestStatus.RUNNING]
        for s in live:
            if s.request.num_computed_tokens != s.num_computed_tokens:
                raise RuntimeError(f"request {s.request_id!r} has {s.request.num_computed_tokens} computed tokens, "
                                   f"the output expected {s.num_computed_tokens}: stale or twice-applied output")
        for s in live:
            s.request.num_computed_tokens += s.num_new_tokens
            if s.samples_token:
                s.request.num_pending_tokens += 1

    def resolve_step(self, output: SchedulerOutput, sampled: Mapping[str, int | None]) -> list[Request]:
        """The committed step's tokens reached the host: append each (`sampled`: request id -> token for every
        entry with `samples_token`). A request preempted since the commit keeps its token (it recomputes it);
        one that ended drops it. Returns the requests that got a token (running or preempted), in batch order, for
        the engine's stop checks."""
        self._check_sampled(output, sampled)
        appended: list[Request] = []
        for s in output.scheduled:
            request = s.request
            if not s.samples_token or request.num_pending_tokens == 0:
                continue
            request.num_pending_tokens -= 1
            if request.status.is_finished:
                continue
            request.append_output_token(sampled[s.request_id])  # type: ignore[arg-type]
            appended.append(request)
        return appended

    @staticmethod
    def _check_sampled(output: SchedulerOutput, sampled: Mapping[str, int | None]) -> None:
        for s in output.scheduled:
            if s.samples_token and not s.request.status.is_finished and not isinstance(sampled.get(s.request_id), int):
                raise ValueError(f"request {s.request_id!r} reached its last token this step but `sampled` has "
                                 f"no token for it (got {sampled.get(s.request_id)!r})")
