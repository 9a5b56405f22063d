"""Scheduler and Request: FCFS admission, token budget, chunked prefill, page/slot accounting, preemption, aborts,
and a seeded random workload against a fake hybrid model whose outputs must match each request run alone."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from deltaserve.cache.manager import CacheManager, StateSource
from deltaserve.config import SchedulerConfig
from deltaserve.engine.request import Request, RequestStatus
from deltaserve.engine.scheduler import Scheduler, SchedulerOutput

SRC = Path(__file__).resolve().parents[2] / "src"
RUNNING, WAITING, PREEMPTED = RequestStatus.RUNNING, RequestStatus.WAITING, RequestStatus.PREEMPTED


def make(*, max_model_len: int = 64, max_num_seqs: int = 8, budget: int = 32, page_size: int = 4,
         num_pages: int = 64, num_slots: int = 8, growth_reserve: bool = False) -> Scheduler:
    """growth_reserve off by default: these tests place admission and preemption exactly on the pages free."""
    config = SchedulerConfig(max_model_len=max_model_len, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                             growth_reserve=growth_reserve)
    return Scheduler(config, CacheManager(num_pages=num_pages, num_slots=num_slots, page_size=page_size))


def req(rid: str, n: int, first: int = 1) -> Request:
    return Request(rid, list(range(first, first + n)))


def seq_token(tokens: list[int]) -> int:
    """A deterministic 'model' for the targeted tests: the next token is a function of the whole sequence."""
    return (sum((t + 1) * (p + 3) for p, t in enumerate(tokens)) % 97) + 1


def step(sched: Scheduler, sample: Callable[[Request], int] = lambda r: seq_token(r.all_token_ids)
         ) -> tuple[SchedulerOutput, list[Request]]:
    out = sched.schedule()
    sampled = {s.request_id: sample(s.request) for s in out.scheduled if s.samples_token}
    return out, sched.update_from_step(out, sampled)


def chunks(out: SchedulerOutput) -> dict[str, int]:
    return {s.request_id: s.num_new_tokens for s in out.scheduled}


def assert_pools_full(sched: Scheduler) -> None:
    assert sched.cache.num_free_pages == sched.cache.num_pages
    assert sched.cache.num_free_slots == sched.cache.num_slots
    assert sched.cache.is_empty()
    assert not sched.has_unfinished() and sched.num_running == sched.num_waiting == 0


def fresh(s) -> bool:
    return s.state_source is StateSource.ZEROS


def held(sched: Scheduler, request: Request) -> tuple[list[int], int | None]:
    """(pages, slot) the cache manager holds for a request; ([], None) when it holds nothing."""
    allocation = sched.cache.allocation(request.request_id)
    return (list(allocation.pages), allocation.slot) if allocation is not None else ([], None)


# ---- purity and Request --------------------------------------------------------------------------------------------
def test_modules_do_not_import_torch() -> None:
    code = ("import sys, deltaserve.engine.request, deltaserve.engine.scheduler, deltaserve.cache.allocator, "
            "deltaserve.engine; assert 'torch' not in sys.modules, 'torch was imported'")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_request_tokens_and_status() -> None:
    prompt = [5, 6, 7]
    r = Request("a", prompt)
    prompt.append(99)  # the request keeps its own copy
    r.append_output_token(8)
    r.append_output_token(9)
    assert (r.num_prompt_tokens, r.num_output_tokens, r.num_tokens) == (3, 2, 5)
    assert r.all_token_ids == [5, 6, 7, 8, 9] and r.output_token_ids == [8, 9]
    assert r.token_ids(0, 2) == [5, 6] and r.token_ids(2, 4) == [7, 8] and r.token_ids(3, 5) == [8, 9]
    assert not r.is_finished and r.status is WAITING
    finished = {s for s in RequestStatus if s.is_finished}
    assert finished == {RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_ERROR}
    r.status = RequestStatus.FINISHED_STOPPED
    with pytest.raises(ValueError, match="finished_stopped"):
        r.append_output_token(1)


# ---- admission and budget ------------------------------------------------------------------------------------------
def test_fcfs_admission_order_and_arrival_index() -> None:
    sched = make()
    for rid in "abc":
        sched.add_request(req(rid, 3))
    out, got = step(sched)
    assert [s.request_id for s in out.scheduled] == ["a", "b", "c"]
    assert [r.arrival_index for r in got] == [0, 1, 2]
    assert all(fresh(s) and s.samples_token for s in out.scheduled)
    assert out.num_batched_tokens == 9 and out.preempted == ()


def test_strict_fcfs_head_that_does_not_fit_blocks_admission() -> None:
    sched = make(max_model_len=16, page_size=4, num_pages=5, budget=64)
    sched.add_request(req("a", 12))                  # 3 pages
    out, _ = step(sched)
    sched.add_request(req("big", 12))                # needs 3 pages, only 2 free
    sched.add_request(req("small", 1))               # would fit, but must not overtake
    out, _ = step(sched)
    assert chunks(out) == {"a": 1} and [r.request_id for r in sched.waiting] == ["big", "small"]


def test_decode_first_budget_sharing_and_chunked_prefill() -> None:
    sched = make(budget=10, page_size=4)
    sched.add_request(req("a", 3))
    sched.add_request(req("b", 3))
    sched.add_request(req("c", 20))
    out, got = step(sched)
    assert chunks(out) == {"a": 3, "b": 3, "c": 4} and [r.request_id for r in got] == ["a", "b"]
    out, got = step(sched)
    assert chunks(out) == {"a": 1, "b": 1, "c": 8} and [r.request_id for r in got] == ["a", "b"]
    assert not fresh(out.scheduled[2]) and not out.scheduled[2].samples_token
    sched.add_request(req("d", 5))
    out, got = step(sched)
    assert chunks(out) == {"a": 1, "b": 1, "c": 8} and [r.request_id for r in got] == ["a", "b", "c"]
    out, got = step(sched)                           # three decodes, then all of d
    assert chunks(out) == {"a": 1, "b": 1, "c": 1, "d": 5}


def test_chunked_prefill_chunk_sizes_pages_and_tokens() -> None:
    sched = make(budget=8, page_size=4)
    r = req("a", 21)
    sched.add_request(r)
    seen = []
    for _ in range(4):
        out, got = step(sched)
        (s,) = out.scheduled
        seen.append((s.num_computed_tokens, s.num_new_tokens, len(s.pages), fresh(s), s.samples_token))
        assert s.new_token_ids == r.token_ids(s.num_computed_tokens, s.num_computed_tokens + s.num_new_tokens)
    assert seen == [(0, 8, 2, True, False), (8, 8, 4, False, False), (16, 5, 6, False, True), (21, 1, 6, False, True)]
    assert r.num_computed_tokens == 22 and r.num_output_tokens == 2


def test_max_num_seqs_limits_running() -> None:
    sched = make(max_num_seqs=2, num_slots=8)
    for rid in "abc":
        sched.add_request(req(rid, 2))
    out, _ = step(sched)
    assert list(chunks(out)) == ["a", "b"] and sched.num_waiting == 1
    sched.finish_request("a", RequestStatus.FINISHED_STOPPED)
    out, _ = step(sched)
    assert list(chunks(out)) == ["b", "c"]


def test_slot_limit_and_slot_reuse() -> None:
    sched = make(max_num_seqs=8, num_slots=2)
    for rid in "abc":
        sched.add_request(req(rid, 2))
    out, _ = step(sched)
    assert list(chunks(out)) == ["a", "b"] and {s.slot for s in out.scheduled} == {0, 1}
    freed = held(sched, sched.get_request("a"))[1]
    sched.abort_request("a")
    out, _ = step(sched)
    c = next(s for s in out.scheduled if s.request_id == "c")
    assert c.slot == freed and fresh(c)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_page_counts_at_page_boundaries(k: int) -> None:
    ps = 4
    sched = make(page_size=ps, budget=64)
    exact, over = req("exact", k * ps), req("over", k * ps + 1)
    sched.add_request(exact)
    sched.add_request(over)
    out, _ = step(sched)
    assert {s.request_id: len(s.pages) for s in out.scheduled} == {"exact": k, "over": k + 1}
    out, _ = step(sched)                             # exact computes position k*ps: a new page; over has room
    assert {s.request_id: len(s.pages) for s in out.scheduled} == {"exact": k + 1, "over": k + 1}
    assert sched.cache.stats()["pages_used"] == 2 * k + 2
    assert sched.cache.pages_needed(0) == 0 and sched.cache.pages_needed(ps) == 1 and sched.cache.pages_needed(ps + 1) == 2


# ---- preemption ----------------------------------------------------------------------------------------------------
def alone(prompt: list[int], n: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(seq_token(tokens))
    return tokens[len(prompt):]


def test_preemption_newest_first_then_resume_and_finish() -> None:
    sched = make(max_model_len=8, page_size=2, num_pages=4, budget=16)
    a, b, c = req("a", 3), req("b", 3, first=10), req("c", 2, first=20)
    sched.add_request(a)
    sched.add_request(b)
    step(sched)                                      # a, b: 2 pages each, pool full
    sched.add_request(c)                             # no pages: waits
    out, _ = step(sched)                             # positions 3 fit in the second page
    assert chunks(out) == {"a": 1, "b": 1}
    b.draft_token_ids = [7, 7]                       # MTP drafts for b's next step, which it will not take
    out, _ = step(sched)                             # a needs a third page: preempt b (newest), no admission
    assert chunks(out) == {"a": 1} and out.preempted == ("b",)
    assert (b.status, b.num_computed_tokens, *held(sched, b), b.num_preemptions) == (PREEMPTED, 0, [], None, 1)
    assert b.draft_token_ids == [], "drafts of a preempted request are stale: its recompute samples a new token"
    assert [r.request_id for r in sched.waiting] == ["b", "c"] and b.output_token_ids == alone(b.prompt_token_ids, 2)
    step(sched)
    sched.finish_request("a", RequestStatus.FINISHED_LENGTH)
    assert a.output_token_ids == alone(a.prompt_token_ids, 4) and a.finish_reason == "length"
    out, _ = step(sched)                             # b recomputes prompt + its 2 outputs, then c
    bs = out.scheduled[0]
    assert (bs.request_id, bs.num_new_tokens, fresh(bs), bs.samples_token) == ("b", 5, True, True)
    assert chunks(out) == {"b": 5, "c": 2}
    step(sched)
    assert b.output_token_ids == alone(b.prompt_token_ids, 4)
    sched.finish_request("b", RequestStatus.FINISHED_STOPPED)
    sched.finish_request("c", RequestStatus.FINISHED_STOPPED)
    assert_pools_full(sched)


def test_request_that_is_newest_preempts_itself() -> None:
    sched = make(max_model_len=8, page_size=2, num_pages=4, budget=16)
    a, b = req("a", 3), req("b", 4)
    sched.add_request(a)
    sched.add_request(b)
    step(sched)                                      # b now has 5 tokens, computing position 4 needs a third page
    out, _ = step(sched)
    assert chunks(out) == {"a": 1} and out.preempted == ("b",) and b.status is PREEMPTED
    assert sched.cache.num_free_pages == 2


def run_to_lengths(sched: Scheduler, requests: list[Request], arrivals: dict[int, list[Request]] | None = None
                   ) -> int:
    """Step until every request has its max_output_tokens (each ended there, as the engine ends it); returns the
    preemptions. arrivals: requests added before the given step."""
    preemptions, n = 0, 0
    for r in requests:
        sched.add_request(r)
    while sched.has_unfinished() or arrivals:
        for r in (arrivals or {}).pop(n, []):
            sched.add_request(r)
        out, appended = step(sched)
        preemptions += len(out.preempted)
        for r in appended:
            if r.num_output_tokens >= r.max_output_tokens:
                sched.finish_request(r.request_id, RequestStatus.FINISHED_LENGTH)
        n += 1
        assert n < 500, "did not drain"
    return preemptions


def test_growth_reserve_queues_what_the_pages_cannot_grow_instead_of_preempting() -> None:
    """Six requests of 8 prompt + 16 output tokens (6 pages of 4 each at their end) on 16 pages. Admitted while the
    pages are free (the reserve off), all start and the newest are preempted and recomputed as they grow, over and
    over; with the reserve (GROWTH_START: 0.7 of each one's growth until requests end) three start and the rest
    wait: one preemption against four. The outputs are those of each request alone either way."""
    def workload() -> list[Request]:
        return [Request(f"r{i}", list(range(10 * i + 1, 10 * i + 9)), max_output_tokens=16) for i in range(6)]

    greedy = make(max_model_len=32, num_pages=16, budget=64)
    assert run_to_lengths(greedy, workload()) == 4
    reserved = make(max_model_len=32, num_pages=16, budget=64, growth_reserve=True)
    requests = workload()
    assert run_to_lengths(reserved, requests) == 1
    assert all(r.output_token_ids == alone(r.prompt_token_ids, 16) for r in requests)
    assert_pools_full(reserved)


def test_growth_is_learnt_from_the_requests_that_end() -> None:
    """Requests that stop at a tenth of their output limit pull the expected growth toward a tenth (so more of such
    requests are admitted at once); aborts teach nothing; a preemption puts it back to GROWTH_START."""
    from deltaserve.engine.scheduler import GROWTH_START

    sched = make(max_model_len=64, num_pages=64, budget=64, growth_reserve=True)
    for i in range(60):  # each writes 4 of its 40: the growth moves a tenth of the way to 0.1 at each end
        r = Request(f"r{i}", [1, 2, 3, 4], max_output_tokens=40)
        sched.add_request(r)
        for _ in range(4):
            step(sched)
        sched.finish_request(r.request_id, RequestStatus.FINISHED_STOPPED)
    assert abs(sched._growth - 0.1) < 0.01
    sched.add_request(Request("gone", [1, 2, 3], max_output_tokens=40))
    step(sched)
    before = sched._growth
    sched.finish_request("gone", RequestStatus.FINISHED_ABORTED)
    assert sched._growth == before
    tight = make(max_model_len=8, page_size=2, num_pages=4, budget=16, growth_reserve=True)
    tight._growth = 0.0  # admit both, as the reserve would with nothing learnt to the contrary
    tight.add_request(req("a", 3))
    tight.add_request(req("b", 4))
    step(tight)
    out, _ = step(tight)
    assert out.preempted == ("b",) and tight._growth == GROWTH_START


def test_growth_reserve_counts_the_rest_of_a_prompt_past_the_first_chunk() -> None:
    """A prompt longer than the step's budget is admitted with its first chunk's pages; the rest of it is growth as
    sure as any (a preempted request's recompute likewise, the H100 run's case: re-admitted on its first chunk, it
    was preempted again at its next). With no output growth expected, b (20 tokens: 5 pages, 2 in its first chunk)
    waits while a (2 of the 6 pages) runs, instead of being admitted on 2 free pages and preempted for the rest."""
    sched = make(max_model_len=24, page_size=4, num_pages=6, budget=8, growth_reserve=True)
    sched._growth = 0.0  # (only the known tokens count)
    sched.add_request(Request("a", [1, 2, 3, 4], max_output_tokens=4))
    step(sched)
    sched.add_request(Request("b", list(range(10, 30)), max_output_tokens=1))
    preemptions, admitted_while_a_ran = 0, False
    for _ in range(20):
        a_runs = any(r.request_id == "a" for r in sched.running)
        out, appended = step(sched)
        preemptions += len(out.preempted)
        admitted_while_a_ran |= a_runs and "b" in chunks(out)
        for r in appended:
            if r.num_output_tokens >= r.max_output_tokens:
                sched.finish_request(r.request_id, RequestStatus.FINISHED_LENGTH)
    assert preemptions == 0 and not admitted_while_a_ran
    assert_pools_full(sched)


def test_growth_reserve_never_keeps_a_lone_request_out() -> None:
    """With nothing running the reserve is nothing: a request whose expected growth alone exceeds the pool runs."""
    sched = make(max_model_len=64, num_pages=16, budget=64, growth_reserve=True)
    r = Request("a", [1, 2, 3, 4], max_output_tokens=60)
    out, _ = step(sched)
    sched.add_request(r)
    out, _ = step(sched)
    assert chunks(out) == {"a": 4}


# ---- ends: abort, finish, rejection --------------------------------------------------------------------------------
def test_abort_in_every_state_returns_everything() -> None:
    sched = make(max_model_len=16, page_size=2, num_pages=8, budget=6)
    sched.add_request(req("decode", 3))
    sched.add_request(req("prefill", 12))
    sched.add_request(req("waiting", 2))
    step(sched)                                      # decode done with prefill; prefill mid-way
    step(sched)
    assert sched.get_request("prefill").num_computed_tokens < 12 and sched.get_request("waiting").status is WAITING
    for rid, status in (("prefill", RUNNING), ("decode", RUNNING), ("waiting", WAITING)):
        r = sched.get_request(rid)
        assert r.status is status
        assert sched.abort_request(rid) is r
        assert (r.status, r.finish_reason, *held(sched, r)) == (RequestStatus.FINISHED_ABORTED, "abort", [], None)
    assert sched.abort_request("waiting") is None and sched.abort_request("nope") is None
    # a preempted request, aborted while it waits to be recomputed
    tiny = make(max_model_len=8, page_size=2, num_pages=4, budget=16)
    tiny.add_request(req("a", 3))
    tiny.add_request(req("b", 4))
    step(tiny)
    step(tiny)
    assert tiny.get_request("b").status is PREEMPTED and tiny.abort_request("b") is not None
    tiny.abort_request("a")
    assert_pools_full(tiny)
    assert_pools_full(sched)


def test_finish_request_statuses_and_errors() -> None:
    sched = make()
    sched.add_request(req("a", 2))
    sched.add_request(req("b", 2))
    step(sched)
    with pytest.raises(ValueError, match="FINISHED"):
        sched.finish_request("a", RequestStatus.RUNNING)
    r = sched.finish_request("a", RequestStatus.FINISHED_ERROR, "kernel failed")
    assert (r.status, r.finish_reason) == (RequestStatus.FINISHED_ERROR, "kernel failed")
    with pytest.raises(KeyError):
        sched.finish_request("a", RequestStatus.FINISHED_STOPPED)
    assert sched.finish_request("b", RequestStatus.FINISHED_STOPPED).finish_reason == "stop"
    assert_pools_full(sched)


@pytest.mark.parametrize(("request_", "match"), [
    (Request("e", []), "empty prompt"),
    (req("long", 17), "more than max_model_len"),
    (Request("used", [1], num_computed_tokens=1), "not fresh"),
])
def test_add_request_rejects_and_leaves_state_unchanged(request_: Request, match: str) -> None:
    sched = make(max_model_len=16)
    sched.add_request(req("ok", 16))                 # exactly max_model_len is allowed
    with pytest.raises(ValueError, match=match):
        sched.add_request(request_)
    with pytest.raises(ValueError, match="already"):
        sched.add_request(req("ok", 1))
    assert [r.request_id for r in sched.waiting] == ["ok"] and request_.arrival_index == -1


def test_pool_smaller_than_max_model_len_is_rejected() -> None:
    with pytest.raises(ValueError, match="raise num_pages or lower max_model_len"):
        make(max_model_len=64, page_size=4, num_pages=15)


def test_update_from_step_validates_and_skips_ended_requests() -> None:
    sched = make()
    sched.add_request(req("a", 3))
    sched.add_request(req("b", 3))
    out = sched.schedule()
    with pytest.raises(ValueError, match="no valid tokens"):
        sched.update_from_step(out, {"a": 5})
    assert sched.get_request("a").num_computed_tokens == 0  # nothing applied
    sched.abort_request("b")                         # ended between schedule() and update
    assert [r.request_id for r in sched.update_from_step(out, {"a": 5})] == ["a"]
    with pytest.raises(RuntimeError, match="twice"):
        sched.update_from_step(out, {"a": 5})


# ---- random workload against a fake hybrid model -------------------------------------------------------------------
def _mix(state: int, token: int) -> int:
    return (state * 1_000_003 + token + 1) % (2**61 - 1)


def _next_token(state: int, context: list[tuple[int, int]]) -> int:
    return (state + sum((t + 1) * (p + 7) for t, p in context)) % 50  # token 0 is EOS


class FakeHybridModel:
    """A recurrent state per slot (like GDN) plus paged K/V (like attention); the next token depends on the
    whole sequence through both, so a wrong chunk, a stale or shared slot, or a shared page changes the output."""

    def __init__(self, num_pages: int, page_size: int, num_slots: int) -> None:
        self.page_size = page_size
        self.kv: list[list[tuple[int, int] | None]] = [[None] * page_size for _ in range(num_pages)]
        self.state: list[int | None] = [None] * num_slots
        self.last: list[int | None] = [None] * num_slots  # last token sampled per slot, as the engine keeps it
        self.pending_inputs = 0  # inputs taken from `last` (the host did not know them yet)

    def step(self, out: SchedulerOutput) -> dict[str, int]:
        ps = self.page_size
        for s in out.scheduled:                      # every write lands before any read, as in one batch
            state = 0 if fresh(s) else self.state[s.slot]
            assert state is not None
            ids = s.new_token_ids
            if len(ids) < s.num_new_tokens:          # a pending token: the device has it, the host not yet
                assert len(ids) == s.num_new_tokens - 1 and self.last[s.slot] is not None
                ids = ids + [self.last[s.slot]]
                self.pending_inputs += 1
            for pos, tok in enumerate(ids, start=s.num_computed_tokens):
                self.kv[s.pages[pos // ps]][pos % ps] = (tok, pos)
                state = _mix(state, tok)
            self.state[s.slot] = state
        sampled = {}
        for s in out.scheduled:
            if s.samples_token:
                n = s.num_computed_tokens + s.num_new_tokens
                ctx = [self.kv[s.pages[p // ps]][p % ps] for p in range(n)]
                sampled[s.request_id] = _next_token(self.state[s.slot], ctx)  # type: ignore[arg-type]
                self.last[s.slot] = sampled[s.request_id]
        return sampled


def generate_alone(prompt: list[int], max_new: int, max_len: int) -> list[int]:
    tokens, state = list(prompt), 0
    for t in prompt:
        state = _mix(state, t)
    while True:
        tok = _next_token(state, [(t, p) for p, t in enumerate(tokens)])
        tokens.append(tok)
        state = _mix(state, tok)
        if tok == 0 or len(tokens) - len(prompt) >= max_new or len(tokens) >= max_len:
            return tokens[len(prompt):]


def check_between_steps(sched: Scheduler) -> None:
    cache, cfg = sched.cache, sched.config
    pages = [p for r in sched.running for p in held(sched, r)[0]]
    stats = cache.stats()
    assert len(pages) == len(set(pages)) == stats["pages_used"] and cache.num_free_pages + len(pages) == cache.num_pages
    slots = [held(sched, r)[1] for r in sched.running]
    assert None not in slots and len(slots) == len(set(slots)) == stats["slots_used"]
    assert cache.num_free_slots + stats["slots_used"] == cache.num_slots
    assert sched.num_running <= cfg.max_num_seqs
    for r in sched.running:
        assert r.status is RUNNING and len(held(sched, r)[0]) == cache.pages_needed(r.num_computed_tokens)
    for r in sched.waiting:
        assert r.status in (WAITING, PREEMPTED) and (*held(sched, r), r.num_computed_tokens) == ([], None, 0)


def check_schedule(sched: Scheduler, out: SchedulerOutput) -> None:
    cfg = sched.config
    ids = [s.request_id for s in out.scheduled]
    assert len(ids) == len(set(ids)) <= cfg.max_num_seqs
    assert out.num_batched_tokens == sum(s.num_new_tokens for s in out.scheduled)
    over = out.num_batched_tokens - cfg.max_num_batched_tokens
    if over > 0:  # only an admitted prompt, whole, beside decode rows, by at most one token each
        last = out.scheduled[-1]
        assert last.num_computed_tokens + last.num_new_tokens == last.request.num_tokens and last.samples_token
        assert over <= sum(s.num_new_tokens == 1 and not s.draft_token_ids for s in out.scheduled[:-1])
    running = [r.request_id for r in sched.running]
    assert ids == [rid for rid in running if rid in ids]  # admission order
    for s in out.scheduled:
        assert s.num_new_tokens >= 1 and (list(s.pages), s.slot) == held(sched, s.request)
        assert len(s.pages) == sched.cache.pages_needed(s.num_computed_tokens + s.num_new_tokens)
        assert s.samples_token == (s.num_computed_tokens + s.num_new_tokens == s.request.num_tokens_with_pending)
        assert not s.request.reached_max_output or s.num_computed_tokens + s.num_new_tokens < s.request.num_tokens
    for rid in out.preempted:
        assert sched.get_request(rid).status is PREEMPTED and rid not in ids
    # newest-first victims, each pushed to the front: the queue starts with them in admission order
    assert [r.request_id for r in sched.waiting[:len(out.preempted)]] == list(reversed(out.preempted))
    full = out.num_batched_tokens >= cfg.max_num_batched_tokens
    # nobody running left out with budget left, unless its pending token is the last one it may have
    assert full or all(r.request_id in ids or r.reached_max_output for r in sched.running)
    if sched.waiting and not full and not out.preempted and sched.num_running < cfg.max_num_seqs \
            and sched.cache.num_free_slots:
        head = sched.waiting[0]
        chunk = min(head.num_tokens, cfg.max_num_batched_tokens - out.num_batched_tokens)
        # admission stopped for a reason: no pages, or (growth_reserve) none to spare for the running requests
        assert sched.cache.pages_needed(chunk) > sched.cache.num_free_pages or cfg.growth_reserve


CONFIGS = {  # (max_model_len, max_num_seqs, budget, page_size, num_pages, num_slots)
    "tight": (64, 6, 16, 4, 16, 4),
    "roomy": (128, 8, 64, 16, 64, 8),
    "page1": (32, 5, 12, 1, 40, 5),
}


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_random_workload_matches_requests_run_alone(name: str, seed: int, overlap: bool) -> None:
    """overlap: driven as the engine's async scheduling drives it: step n is committed at launch, step n+1 is
    scheduled and run (reading step n's tokens as pending) before step n's tokens are resolved and checked."""
    max_len, seqs, budget, ps, num_pages, num_slots = CONFIGS[name]
    rng = random.Random(seed)
    sched = make(max_model_len=max_len, max_num_seqs=seqs, budget=budget, page_size=ps, num_pages=num_pages,
                 num_slots=num_slots)
    model = FakeHybridModel(num_pages, ps, num_slots)
    todo = [Request(f"r{i}", [rng.randrange(1, 50) for _ in range(rng.randint(1, max_len))]) for i in range(60)]
    max_new = {r.request_id: rng.randint(1, 40) for r in todo}
    for r in todo:
        r.max_output_tokens = min(max_new[r.request_id], max_len - r.num_prompt_tokens)
    ended: list[Request] = []
    inflight: tuple[SchedulerOutput, dict[str, int]] | None = None
    preempted_pending = 0

    def resolve(out: SchedulerOutput, sampled: dict[str, int], got: list[Request]) -> None:
        for r in got:
            if r.output_token_ids[-1] == 0:
                ended.append(sched.finish_request(r.request_id, RequestStatus.FINISHED_STOPPED))
            elif r.num_output_tokens >= max_new[r.request_id] or r.num_tokens >= max_len:
                ended.append(sched.finish_request(r.request_id, RequestStatus.FINISHED_LENGTH))

    for _ in range(5000):
        for _ in range(rng.choice([0, 0, 1, 2])):
            if todo:
                sched.add_request(todo.pop(0))
        live = [r.request_id for r in sched.running + sched.waiting]
        if live and rng.random() < 0.03:
            ended.append(sched.abort_request(rng.choice(live)))
        out = sched.schedule()
        check_schedule(sched, out)
        sampled = model.step(out)
        if out.scheduled and rng.random() < 0.02:    # abort after the model ran, before update
            aborted = sched.abort_request(rng.choice(out.scheduled).request_id)
            if aborted is not None:
                ended.append(aborted)
        if not overlap:
            resolve(out, sampled, sched.update_from_step(out, sampled))
        else:
            sched.commit_step(out)
            preempted_pending += sum(sched.get_request(rid).num_pending_tokens > 0 for rid in out.preempted)
            if inflight is not None:
                resolve(*inflight, sched.resolve_step(*inflight))
            inflight = (out, sampled)
        check_between_steps(sched)
        if not todo and not sched.has_unfinished():
            break
    assert not todo and not sched.has_unfinished(), "workload did not drain (livelock?)"
    assert_pools_full(sched)
    assert len(ended) == 60 and all(r.is_finished for r in ended)
    for r in ended:
        expected = generate_alone(r.prompt_token_ids, max_new[r.request_id], max_len)
        if r.status is RequestStatus.FINISHED_ABORTED:
            assert r.output_token_ids == expected[:r.num_output_tokens]
        else:
            assert r.output_token_ids == expected
    if name == "tight":
        assert sum(r.num_preemptions for r in ended) > 0, "the tight config should exercise preemption"
    assert (model.pending_inputs > 0) == overlap
    if name == "tight" and overlap:
        assert preempted_pending > 0, "the tight config should preempt requests whose token is in flight"


class CachingHybridModel(FakeHybridModel):
    """The fake model with the prefix cache's copies applied as the runner applies them: matched checkpoints'
    states and partial pages before the step, the step's snapshots after it (checkpoint slots follow the running
    slots)."""

    def __init__(self, num_pages: int, page_size: int, num_slots: int, num_checkpoints: int) -> None:
        super().__init__(num_pages, page_size, num_slots + num_checkpoints)

    def copy_states(self, copies) -> None:
        for c in copies:
            self.state[c.dst] = self.state[c.src]

    def step(self, out: SchedulerOutput) -> dict[str, int]:
        self.copy_states(out.state_copies)
        for c in out.page_copies:
            self.kv[c.dst] = list(self.kv[c.src])
        sampled = super().step(out)
        self.copy_states(out.state_snapshots)
        return sampled


def check_page_refs(cache: CacheManager) -> None:
    """Each page's reference count is the number of its holders (requests, checkpoints, pending snapshots); each
    pool's free list holds each free id once."""
    holders: dict[int, int] = {}
    pages = [a.pages for a in cache._held.values()] + [c.pages for c in cache._index.checkpoints] + \
        [p.checkpoint.pages for p in cache._pending]
    for p in (p for ps in pages for p in ps):
        holders[p] = holders.get(p, 0) + 1
    assert all(cache._pages.ref_count(p) == holders.get(p, 0) for p in range(cache.num_pages))
    for pool in (cache._pages, cache._slots, cache._checkpoint_slots):
        assert len(set(pool._free)) == len(pool._free) == sum(1 for r in pool._refs if r == 0)


def caching_workload(rng: random.Random, max_len: int) -> list[Request]:
    """Prompts cut from three shared bases (plus a tail), repeats of earlier prompts, and unrelated ones."""
    bases = [[rng.randrange(1, 50) for _ in range(rng.randint(1, max_len - 1))] for _ in range(3)]
    todo: list[Request] = []
    for i in range(40):
        kind = rng.random()
        if kind < 0.4:
            base = rng.choice(bases)
            prompt = base[:rng.randint(1, len(base))] + [rng.randrange(1, 50) for _ in range(rng.randint(0, 10))]
        elif kind < 0.6 and todo:
            prompt = list(rng.choice(todo).prompt_token_ids)
        else:
            prompt = [rng.randrange(1, 50) for _ in range(rng.randint(1, max_len - 1))]
        todo.append(Request(f"r{i}", prompt[:max_len - 1]))
    return todo


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
@pytest.mark.parametrize("seed", range(4))
def test_random_workload_with_prefix_caching_matches_requests_run_alone(seed: int, overlap: bool) -> None:
    """Shared prefixes and repeats resume from checkpoints (states and partial pages copied), finished requests
    leave their generation's end and a follow-up turn extends it, the cache is reset now and then, and tight pools
    force preemption and eviction: every output is still the request's output alone, and no page or slot leaks."""
    rng = random.Random(seed)
    max_len, ps, seqs, checkpoints = 48, rng.choice([1, 4, 8]), rng.choice([2, 4]), rng.choice([2, 8])
    num_pages = max_len // ps + rng.choice([0, 4])
    # growth reserve off, as in the other tests of preemption: the tight pools are there to force it
    config = SchedulerConfig(max_model_len=max_len, max_num_seqs=seqs, max_num_batched_tokens=rng.choice([8, 16]),
                             growth_reserve=False)
    cache = CacheManager(num_pages=num_pages, num_slots=seqs, page_size=ps, num_checkpoints=checkpoints)
    sched = Scheduler(config, cache, checkpoint_interval=2 * ps)
    model = CachingHybridModel(num_pages, ps, seqs, checkpoints)
    todo = caching_workload(rng, max_len)
    max_new: dict[str, int] = {}
    ended: list[Request] = []
    inflight = None

    def resolve(got: list[Request]) -> None:
        for r in got:
            done = r.output_token_ids[-1] == 0 or r.num_output_tokens >= max_new[r.request_id] or \
                r.num_tokens >= max_len
            if not done:
                continue
            snapshot = sched.checkpoint_finished(r.request_id)
            model.copy_states([snapshot] if snapshot is not None else [])
            ended.append(sched.finish_request(r.request_id, RequestStatus.FINISHED_LENGTH))
            if len(ended) < 20 and r.num_tokens < max_len - 2:  # the next turn: the whole sequence and more
                todo.append(Request(f"{r.request_id}+", (r.all_token_ids + [7, 8])[:max_len - 1]))

    for _ in range(5000):
        for _ in range(rng.choice([0, 0, 1, 2])):
            if todo:
                r = todo.pop(0)
                max_new[r.request_id] = rng.randint(1, 12)
                r.max_output_tokens = min(max_new[r.request_id], max_len - r.num_prompt_tokens)
                sched.add_request(r)
        live = [r.request_id for r in sched.running + sched.waiting]
        if live and rng.random() < 0.03:
            ended.append(sched.abort_request(rng.choice(live)))
        if rng.random() < 0.01:
            cache.reset_prefix_cache()
        out = sched.schedule()
        sampled = model.step(out)
        if overlap:
            sched.commit_step(out)
            if inflight is not None:
                resolve(sched.resolve_step(*inflight))
            inflight = (out, sampled) if out.scheduled else None
        else:
            resolve(sched.update_from_step(out, sampled))
        check_page_refs(cache)
        if not todo and not sched.has_unfinished():
            break
    assert not todo and not sched.has_unfinished(), "workload did not drain (livelock?)"
    assert cache.is_empty() and cache.counters["prefix_hits"] > 0
    for r in ended:
        expected = generate_alone(r.prompt_token_ids, max_new[r.request_id], max_len)
        aborted = r.status is RequestStatus.FINISHED_ABORTED  # its outputs so far
        assert r.output_token_ids == expected[:r.num_output_tokens if aborted else None]


def caching(*, budget: int = 32, max_num_seqs: int = 8, a: Request | None = None, b: Request | None = None,
            interval: int | None = None, max_model_len: int | None = None) -> Scheduler:
    """A prefix-caching scheduler (pages of 4, by default one checkpoint interval per step) with requests a and b
    queued (by default two different 20-token prompts)."""
    length = max_model_len or 2 * budget
    config = SchedulerConfig(max_model_len=length, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)
    sched = Scheduler(config, CacheManager(num_pages=length, num_slots=8, page_size=4, num_checkpoints=8),
                      checkpoint_interval=interval or budget)
    sched.add_request(a or req("a", 20))
    sched.add_request(b or req("b", 20, first=40))
    return sched


def test_prompt_of_the_whole_budget_is_not_split_for_decode_rows() -> None:
    """Prompts of exactly the token budget arriving while three requests decode: each is admitted whole (the step
    goes past the budget by the decode rows' three tokens) and samples its first token in that step, instead of
    leaving three tokens to ride with the next prompt's chunk a step later."""
    sched = make(budget=32, max_model_len=128, num_pages=128)
    for i in range(3):
        sched.add_request(req(f"d{i}", 4, first=50 + i))
    step(sched)  # the decode rows' prompts
    for rid, first in (("a", 1), ("b", 100), ("c", 200)):
        sched.add_request(req(rid, 32, first=first))
    for rid in "abc":
        out, _ = step(sched)
        assert chunks(out)[rid] == 32 and out.num_batched_tokens == 32 + sum(n == 1 for n in chunks(out).values())
        assert sched.get_request(rid).num_output_tokens == 1
    sched.add_request(req("e", 58, first=300))  # past the budget: chunked, the decode rows keep their tokens ...
    out, _ = step(sched)
    assert out.num_batched_tokens == 32 and chunks(out)["e"] == 32 - 6
    out, _ = step(sched)  # ... and its last chunk, 32 tokens, goes whole too
    assert chunks(out)["e"] == 32 and sched.get_request("e").num_output_tokens == 1


def test_whole_budget_prompt_with_prefix_caching_goes_over_the_budget_only_to_end() -> None:
    """With prefix caching: a prompt that goes past the budget to end now drops its unmarked checkpoint before its
    last token, as a queued one does (else it would end a step later), even alone; a point its renderer marked stays,
    and cut there the prompt would not end, so it keeps to the budget; so does a prompt whose twin waits (the twin
    resumes at that checkpoint). check_schedule holds every over-budget step to ending its prompt."""
    config = SchedulerConfig(max_model_len=128, max_num_seqs=8, max_num_batched_tokens=32, growth_reserve=False)
    sched = Scheduler(config, CacheManager(num_pages=128, num_slots=8, page_size=4, num_checkpoints=8),
                      checkpoint_interval=32)

    def checked_step() -> SchedulerOutput:
        out = sched.schedule()
        check_schedule(sched, out)
        sched.update_from_step(out, {s.request_id: seq_token(s.request.all_token_ids)
                                     for s in out.scheduled if s.samples_token})
        return out

    for i in range(3):
        sched.add_request(req(f"d{i}", 4, first=50 + i))
    checked_step()
    sched.add_request(req("a", 32))
    out = checked_step()
    assert chunks(out)["a"] == 32 and out.num_batched_tokens == 35  # alone, whole: its first token now
    assert sched.get_request("a").num_output_tokens == 1
    sched.add_request(Request("b", list(range(100, 132)), cache_points=(30,)))  # a chat's marked history end
    out = checked_step()
    assert chunks(out)["b"] == 28 and out.num_batched_tokens == 32  # cut at 30 it would not end: the budget holds
    while sched.get_request("b").num_output_tokens == 0:
        checked_step()
    for rid in ("c", "c2"):  # twins: the first keeps the checkpoint the second resumes at
        sched.add_request(Request(rid, list(range(200, 232))))
    out = checked_step()
    assert out.num_batched_tokens <= 32 and chunks(out)["c"] < 32


def test_queued_prompt_skips_its_tail_checkpoint() -> None:
    """Prompts queued together: the first one's rest fits the step and another waits, so its chunk runs to its end
    (no checkpoint before its last token) and it samples its first token in that step; the last one, with nobody
    behind it, keeps the checkpoint before its last token."""
    sched = caching()
    out, _ = step(sched)
    assert chunks(out) == {"a": 20, "b": 12}
    assert sched.get_request("a").num_output_tokens == 1
    out, _ = step(sched)
    assert chunks(out) == {"a": 1, "b": 7}
    out, _ = step(sched)
    assert chunks(out) == {"a": 1, "b": 1}
    assert sched.get_request("b").num_output_tokens == 1


def test_long_prompt_last_chunk_skips_its_tail_checkpoint_under_a_queue() -> None:
    """A prompt longer than a step: its last chunk, with another request queued that can run beside it, runs to the
    prompt's end, and the claim on the dropped position is given back."""
    sched = caching(a=req("a", 40))
    out, _ = step(sched)
    assert chunks(out) == {"a": 32}
    assert sched.cache.claimed_position(list(range(1, 41))) == 36  # a's planned checkpoint at 39, in page 9
    out, _ = step(sched)
    assert chunks(out) == {"a": 8, "b": 19}  # b, with nobody behind it, keeps its own
    assert sched.get_request("a").num_output_tokens == 1
    assert sched.cache.claimed_position(list(range(1, 41))) == 0


def test_long_prompt_keeps_its_tail_checkpoint_for_a_request_waiting_on_it() -> None:
    """A queued prompt extending a long one waits for the long one's claimed checkpoint before its last token: the
    long prompt's last chunk keeps it, and the waiter resumes there (11 tokens to compute, not 210)."""
    a = req("a", 200)
    sched = caching(budget=64, interval=1024, max_model_len=256, a=a, b=Request("b", a.prompt_token_ids + [7] * 10))
    computed_b = 0
    while sched.get_request("b").num_output_tokens == 0:
        computed_b += chunks(step(sched)[0]).get("b", 0)
    assert computed_b == 11


def test_identical_queued_prompt_keeps_the_tail_checkpoint() -> None:
    """A prompt queued behind an identical one: the first keeps its checkpoint before its last token, so the second
    resumes there with one token to compute."""
    sched = caching(budget=128, a=req("a", 100), b=req("b", 100))
    seen = [chunks(step(sched)[0]) for _ in range(2)]
    assert seen == [{"a": 99}, {"a": 1, "b": 1}]  # b waited for a's checkpoint at 99, then resumed there


def test_queued_prompt_keeps_marked_tail_points() -> None:
    """A chat prompt's marked history end (two tokens before its end) is kept even under a queue: the next turn
    resumes there."""
    chat = req("a", 20)
    chat.cache_points = (18,)
    out, _ = step(caching(a=chat))
    assert chunks(out) == {"a": 18, "b": 14}


def test_queue_that_cannot_run_beside_keeps_the_tail_checkpoint() -> None:
    """One sequence at a time: the request queued behind could not run in the next step anyway, so the prompt keeps
    its checkpoint before its last token."""
    out, _ = step(caching(max_num_seqs=1))
    assert chunks(out) == {"a": 19}


@pytest.mark.parametrize("interval, want", [(16, [16, 16, 16, 6, 1]), (32, [32, 22, 1])])
def test_checkpoint_interval_cuts_prefill_chunks(interval: int, want: list[int]) -> None:
    """With prefix caching, a prompt's chunks end at every multiple of checkpoint_interval and before its last
    token (whose logits are needed when the prompt comes again): an interval below the step budget splits steps,
    one of a whole step (the engine's default on large steps) only cuts at the last token."""
    config = SchedulerConfig(max_model_len=64, max_num_seqs=8, max_num_batched_tokens=32)
    cache = CacheManager(num_pages=64, num_slots=8, page_size=4, num_checkpoints=8)
    sched = Scheduler(config, cache, checkpoint_interval=interval)
    sched.add_request(req("a", 55))
    got = []
    while sched.has_unfinished() and len(got) < len(want):
        out, _ = step(sched)
        got.append(chunks(out)["a"])
    assert got == want
