"""Several tokens per request per step: draft tokens scheduled, verified and rolled back by the scheduler (a fake
hybrid model keeps per-position states and commits the last kept one, as the runner will); stop conditions applied
token by token inside a multi-token delta."""

from __future__ import annotations

import random

import pytest

from deltaserve.cache.manager import CacheManager, StateSource
from deltaserve.config import SchedulerConfig
from deltaserve.engine.detokenizer import StopChecker
from deltaserve.engine.request import Request, RequestStatus
from deltaserve.engine.scheduler import Scheduler, SchedulerOutput
from deltaserve.engine.sequence import SequenceState
from deltaserve.outputs import TokenLogprob
from deltaserve.sampling_params import SamplingParams
from tests.engine.test_scheduler import _mix, _next_token, assert_pools_full, generate_alone


def make(max_len: int, budget: int, ps: int, pages: int, slots: int, seqs: int) -> Scheduler:
    """Admission on the pages free now (no growth reserve): these tight pools are there to preempt."""
    config = SchedulerConfig(max_model_len=max_len, max_num_seqs=seqs, max_num_batched_tokens=budget,
                             growth_reserve=False)
    return Scheduler(config, CacheManager(num_pages=pages, num_slots=slots, page_size=ps))


def test_rejected_drafts_roll_back_computed_positions() -> None:
    sched = make(64, 32, 4, 16, 2, 2)
    sched.add_request(Request("a", [5, 6, 7]))
    sched.update_from_step(sched.schedule(), {"a": [11]})
    a = sched.get_request("a")
    assert (a.num_computed_tokens, a.num_tokens) == (3, 4)
    a.draft_token_ids = [21, 22, 23]
    out = sched.schedule()
    sched.commit_step(out)
    assert (a.num_computed_tokens, a.num_pending_tokens, a.num_pending_drafts) == (7, 4, 3)
    assert sched.schedule().is_empty  # nothing is scheduled while drafts are unresolved
    got = sched.resolve_step(out, {"a": [21, 30]})  # the first draft kept, then the model's own token
    assert got == [a] and a.output_token_ids == [11, 21, 30]
    assert (a.num_computed_tokens, a.num_pending_tokens, a.num_pending_drafts) == (5, 0, 0)
    assert [s.num_new_tokens for s in sched.schedule().scheduled] == [1]  # position 5 (token 30) is next
    with pytest.raises(ValueError, match="expected 1 to 1"):
        sched.update_from_step(sched.schedule(), {"a": [1, 2]})  # two tokens from a one-token step


def test_drafts_respect_the_length_limit_and_the_budget() -> None:
    sched = make(16, 3, 4, 8, 1, 1)
    request = Request("a", [1, 2, 3])
    request.max_output_tokens = 3
    sched.add_request(request)
    sched.update_from_step(sched.schedule(), {"a": [4]})
    request.draft_token_ids = [5, 6, 7, 8]
    (entry,) = sched.schedule().scheduled
    assert entry.draft_token_ids == (5,)  # 3 outputs at most: 1 known, 1 draft and the token after it
    assert entry.num_samples == 2
    request.max_output_tokens = 10
    request.draft_token_ids = [5, 6, 7, 8]
    sched2 = make(16, 3, 4, 8, 1, 1)
    assert sched2.config.max_num_batched_tokens - 1 == 2  # the budget leaves room for 2 drafts


class DraftingFakeModel:
    """A recurrent state per slot plus paged K/V, as tests/engine/test_scheduler.py's fake, verifying drafts: it
    runs every position, samples at the last 1 + k, keeps drafts while they equal its own next token, and leaves
    the slot at the state after the last kept position (what the runner's state commit does)."""

    def __init__(self, num_pages: int, page_size: int, num_slots: int) -> None:
        self.page_size = page_size
        self.kv: list[list[tuple[int, int] | None]] = [[None] * page_size for _ in range(num_pages)]
        self.state: list[int | None] = [None] * num_slots
        self.kept_drafts = self.rejected_drafts = 0

    def _ctx(self, pages: tuple[int, ...], n: int) -> list[tuple[int, int]]:
        return [self.kv[pages[p // self.page_size]][p % self.page_size] for p in range(n)]  # type: ignore[misc]

    def step(self, out: SchedulerOutput) -> dict[str, list[int]]:
        ps, sampled = self.page_size, {}
        for s in out.scheduled:
            state = 0 if s.state_source is StateSource.ZEROS else self.state[s.slot]
            assert state is not None
            states = []
            for pos, tok in enumerate(s.new_token_ids + list(s.draft_token_ids), start=s.num_computed_tokens):
                self.kv[s.pages[pos // ps]][pos % ps] = (tok, pos)
                state = _mix(state, tok)
                states.append(state)
            if not s.samples_token:
                self.state[s.slot] = state
                continue
            first = s.num_computed_tokens + s.num_new_tokens - len(s.draft_token_ids) - 1  # the last known position
            kept: list[int] = []
            for j in range(len(s.draft_token_ids) + 1):
                pos = first + j
                tok = _next_token(states[pos - s.num_computed_tokens], self._ctx(s.pages, pos + 1))
                kept.append(tok)
                if j == len(s.draft_token_ids) or s.draft_token_ids[j] != tok:
                    break
            self.kept_drafts += len(kept) - 1
            self.rejected_drafts += len(s.draft_token_ids) - (len(kept) - 1)
            self.state[s.slot] = states[first + len(kept) - 1 - s.num_computed_tokens]
            sampled[s.request_id] = kept
        return sampled


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_workload_with_drafts_matches_requests_run_alone(seed: int) -> None:
    """Drafts right and wrong, over tight pools (preemption) and aborts: every output equals the request run alone,
    and the pools are full at the end."""
    max_len, ps, pages, slots = 64, 4, 20, 4
    rng = random.Random(seed)
    sched = make(max_len, 20, ps, pages, slots, 4)
    model = DraftingFakeModel(pages, ps, slots)
    todo = [Request(f"r{i}", [rng.randrange(1, 50) for _ in range(rng.randint(1, 40))]) for i in range(40)]
    max_new = {r.request_id: rng.randint(1, 30) for r in todo}
    truth = {r.request_id: generate_alone(r.prompt_token_ids, max_new[r.request_id], max_len) for r in todo}
    for r in todo:
        r.max_output_tokens = min(max_new[r.request_id], max_len - r.num_prompt_tokens)
    ended: list[Request] = []
    for _ in range(3000):
        for _ in range(rng.choice([0, 1, 1, 2])):
            if todo:
                sched.add_request(todo.pop(0))
        for r in sched.running:  # the "drafter": the true continuation, corrupted at a random point
            future = truth[r.request_id][r.num_output_tokens:]
            drafts = future[:rng.randint(0, 4)]
            if drafts and rng.random() < 0.4:
                drafts[rng.randrange(len(drafts))] += 1
            r.draft_token_ids = drafts
        out = sched.schedule()
        sampled = model.step(out)
        for r in sched.update_from_step(out, sampled):
            stop_at = next((i for i, t in enumerate(r.output_token_ids) if t == 0), None)
            if stop_at is not None:
                del r.output_token_ids[stop_at + 1:]  # the engine drops tokens after a stop
                ended.append(sched.finish_request(r.request_id, RequestStatus.FINISHED_STOPPED))
            elif r.num_output_tokens >= max_new[r.request_id] or r.num_tokens >= max_len:
                del r.output_token_ids[max_new[r.request_id]:]
                ended.append(sched.finish_request(r.request_id, RequestStatus.FINISHED_LENGTH))
        live = [r.request_id for r in sched.running + sched.waiting]
        if live and rng.random() < 0.02:
            ended.append(sched.abort_request(rng.choice(live)))
        if not todo and not sched.has_unfinished():
            break
    assert not todo and not sched.has_unfinished()
    assert_pools_full(sched)
    for r in ended:
        expected = truth[r.request_id]
        got = r.output_token_ids[:len(expected)] if r.status is RequestStatus.FINISHED_ABORTED else r.output_token_ids
        assert got == expected[:len(got)] and (r.status is RequestStatus.FINISHED_ABORTED or got == expected)
    assert model.kept_drafts > 50 and model.rejected_drafts > 20
    assert sum(r.num_preemptions for r in ended) > 0


# ---- stops inside a multi-token delta ------------------------------------------------------------------------------
class CharTokenizer:
    """Token i decodes to chr(i): enough to place stop strings exactly."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)


def sequence(params: SamplingParams, prompt_len: int = 3, max_model_len: int = 100) -> SequenceState:
    from deltaserve.engine.detokenizer import IncrementalDetokenizer

    request = Request("r", list(range(65, 65 + prompt_len)), sampling_params=params)
    return SequenceState(request=request, parent_id="p", index=0, params=params, eos_ids=frozenset({0}),
                         max_model_len=max_model_len, detokenizer=IncrementalDetokenizer(CharTokenizer()),
                         stop_checker=StopChecker(params.stop, params.include_stop_str_in_output))


def feed(state: SequenceState, text: str, logprobs: bool = False):
    tokens = [ord(c) for c in text]
    state.request.output_token_ids.extend(tokens)  # the scheduler appends before the output side looks
    lp = [TokenLogprob(t, -1.0) for t in tokens] if logprobs else None
    return state.on_tokens(tokens, lp)


def test_stop_string_inside_a_multi_token_delta_is_cut_at_the_right_place() -> None:
    state = sequence(SamplingParams(stop=["XY"], max_tokens=50, logprobs=0))
    first = feed(state, "abX", logprobs=True)
    assert (first.text, first.finished) == ("ab", False)  # "X" is held back: it may start the stop string
    delta = feed(state, "cdXYef", logprobs=True)  # the stop string completes in the middle of the run
    assert delta.finished and delta.finish_reason == "stop" and delta.stop_reason == "XY"
    assert delta.text == "Xcd"  # the held "X" turned out not to start the stop string; "XY" itself is cut
    assert [chr(t) for t in delta.token_ids] == list("cdXY")  # tokens after the one that completed it are dropped
    assert len(delta.logprobs) == 4 and "".join(map(chr, state.request.output_token_ids)) == "abXcdXY"


def test_stop_token_and_length_inside_a_multi_token_delta() -> None:
    state = sequence(SamplingParams(max_tokens=50, stop_token_ids=[ord("!")]))
    delta = feed(state, "hi!more")
    assert delta.finished and delta.stop_reason == ord("!") and delta.text == "hi"
    assert "".join(map(chr, delta.token_ids)) == "hi!"
    state = sequence(SamplingParams(max_tokens=4))
    assert feed(state, "ab").text == "ab"
    delta = feed(state, "cdef")
    assert delta.finish_reason == "length" and "".join(map(chr, delta.token_ids)) == "cd" and delta.text == "cd"
    state = sequence(SamplingParams(max_tokens=50), prompt_len=3, max_model_len=6)  # room for 3 outputs
    assert feed(state, "wxyz").token_ids == tuple(map(ord, "wxy"))


def test_min_tokens_holds_inside_a_multi_token_delta() -> None:
    state = sequence(SamplingParams(max_tokens=50, min_tokens=3, stop_token_ids=[ord("!")]))
    delta = feed(state, "a!b!c")  # the first "!" is output 2 (< min_tokens): it does not stop
    assert delta.finished and "".join(map(chr, delta.token_ids)) == "a!b!"


def test_rows_without_drafts_ride_a_verify_step_with_placeholders() -> None:
    """With speculative decoding on, a decode row with no draft it can verify (none proposed: a constrained
    request; or one token short of its length limit) gets K placeholder drafts in a step where other rows verify
    real ones (at least half of the rows), so the step stays uniform; it may keep only its first token, and its
    positions roll back as for rejected drafts. With fewer real drafts, or none, the step decodes plainly."""
    from deltaserve.engine.scheduler import PLACEHOLDER_DRAFT

    config = SchedulerConfig(max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32, growth_reserve=False)
    sched = Scheduler(config, CacheManager(num_pages=32, num_slots=4, page_size=4), speculative_tokens=2,
                      speculative_max_batch=4)
    a, b, c, d = Request("a", [1, 2, 3]), Request("b", [4, 5]), Request("c", [6, 7, 8, 9]), Request("d", [10, 11])
    c.max_output_tokens = 4
    for r in (a, b, c, d):
        sched.add_request(r)
    first = {"a": [11], "b": [12], "c": [13], "d": [14]}
    sched.update_from_step(sched.schedule(), first)
    out = sched.schedule()
    assert all(not s.draft_token_ids for s in out.scheduled)  # nobody has drafts: a plain step
    sched.update_from_step(out, first)
    a.draft_token_ids = [21, 22, 23]
    out = sched.schedule()  # one row of four with real drafts: a plain step
    assert all(not s.draft_token_ids and not s.placeholder_drafts for s in out.scheduled)
    sched.update_from_step(out, {"a": [11], "b": [12], "c": [13], "d": [14]})
    a.draft_token_ids, c.draft_token_ids, d.draft_token_ids = [21, 22, 23], [31, 32], [41, 42]
    out = sched.schedule()  # two of four: b (none proposed) and c (1 output left: no draft fits) ride as placeholders
    entries = {s.request_id: s for s in out.scheduled}
    assert entries["a"].draft_token_ids == (21, 22) and not entries["a"].placeholder_drafts
    assert entries["d"].draft_token_ids == (41, 42) and not entries["d"].placeholder_drafts
    for rid in ("b", "c"):
        assert entries[rid].draft_token_ids == (PLACEHOLDER_DRAFT,) * 2 and entries[rid].placeholder_drafts
        assert entries[rid].num_new_tokens == 3 and entries[rid].num_samples == 3
    with pytest.raises(ValueError, match="expected 1 to 1 ints"):
        sched.update_from_step(out, {"a": [21, 22, 40], "b": [14, 15], "c": [16], "d": [43]})  # a placeholder kept
    got = sched.update_from_step(out, {"a": [21, 22, 40], "b": [14], "c": [16], "d": [41, 44]})
    assert got == [a, b, c, d] and b.output_token_ids == [12, 12, 12, 14]
    assert a.output_token_ids == [11, 11, 11, 21, 22, 40] and d.output_token_ids == [14, 14, 14, 41, 44]
    assert (b.num_computed_tokens, b.num_tokens) == (5, 6) and b.num_pending_drafts == 0  # rolled back
    assert (c.num_computed_tokens, c.num_tokens) == (7, 8)


def test_a_preemption_that_takes_the_drafted_rows_leaves_a_plain_step() -> None:
    """The drafted row preempts itself for the pages of its drafts: the placeholder row left would wait a whole
    verify step that verifies nothing, so the step decodes it plainly (no drafts, no placeholders)."""
    config = SchedulerConfig(max_model_len=12, max_num_seqs=2, max_num_batched_tokens=32, growth_reserve=False)
    sched = Scheduler(config, CacheManager(num_pages=3, num_slots=2, page_size=4), speculative_tokens=2,
                      speculative_max_batch=4)
    p, r = Request("p", [1, 2, 3]), Request("r", [4, 5, 6])
    for x in (p, r):
        sched.add_request(x)
    sched.update_from_step(sched.schedule(), {"p": [7], "r": [8]})
    r.draft_token_ids = [9, 10]  # p has none (a constrained request): a placeholder row beside r
    out = sched.schedule()
    assert out.preempted == ("r",)
    (entry,) = out.scheduled
    assert entry.request_id == "p" and not entry.draft_token_ids and not entry.placeholder_drafts
    assert entry.num_new_tokens == 1 and out.num_batched_tokens == 1
    assert sched.update_from_step(out, {"p": [11]}) == [p] and (p.num_computed_tokens, p.num_tokens) == (4, 5)


def test_prompt_chunks_ride_a_verify_step_after_its_verify_rows() -> None:
    """With speculative decoding on, a step that computes prompt chunks still verifies the decode rows' drafts: a
    running prompt ahead of a decode row in admission order leaves that row its 1 + k tokens of the budget, the
    verify rows come first in the step, the chunks after them, and nothing else changes: the row keeps its drafts
    as in a step without prompts."""
    config = SchedulerConfig(max_model_len=64, max_num_seqs=4, max_num_batched_tokens=16, growth_reserve=False)
    cache = CacheManager(num_pages=64, num_slots=4, page_size=4, num_checkpoints=4)
    sched = Scheduler(config, cache, speculative_tokens=2, speculative_max_batch=4, checkpoint_interval=8)
    long, a = Request("long", list(range(1, 31))), Request("a", [40, 41, 42])
    sched.add_request(long)
    sched.add_request(a)
    out = sched.schedule()  # the long prompt's chunk ends at its first checkpoint (8), `a` is admitted beside it
    assert [(s.request_id, s.num_new_tokens) for s in out.scheduled] == [("long", 8), ("a", 3)]
    sched.update_from_step(out, {"a": [11]})
    a.draft_token_ids = [21, 22, 23]
    out = sched.schedule()
    assert [(s.request_id, s.num_new_tokens, s.draft_token_ids) for s in out.scheduled] == \
        [("a", 3, (21, 22)), ("long", 8, ())]
    assert out.num_batched_tokens == 11 and [r.request_id for r in sched.running] == ["long", "a"]
    assert sched.update_from_step(out, {"a": [21, 50]}) == [a] and a.output_token_ids == [11, 21, 50]
    assert (a.num_computed_tokens, long.num_computed_tokens) == (5, 16)
    tight = Scheduler(SchedulerConfig(max_model_len=64, max_num_seqs=4, max_num_batched_tokens=10,
                                      growth_reserve=False), CacheManager(num_pages=64, num_slots=4, page_size=4),
                      speculative_tokens=2, speculative_max_batch=4)
    long, a = Request("long", list(range(1, 31))), Request("a", [40, 41, 42])
    tight.add_request(a)
    tight.update_from_step(tight.schedule(), {"a": [11]})
    tight.add_request(long)
    a.draft_token_ids = [21, 22]
    out = tight.schedule()  # the budget left after the verify row's 3 tokens goes to the admitted prompt
    assert [(s.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 3), ("long", 7)]


@pytest.mark.parametrize("graph_tokens, logprobs, kept", [(64, None, False), (8, None, True), (64, 1, True)])
def test_a_short_prompt_step_drops_its_drafts_where_a_graph_would_replay_it(graph_tokens, logprobs, kept) -> None:
    """A verify step carrying prompt chunks runs eagerly (no CUDA graph is keyed by it). Where the step without its
    drafts would replay a varlen graph (here: one for fewer than `graph_tokens` tokens), every row decodes plainly;
    a longer chunk, or one that asks for prompt logprobs (eager either way), keeps them."""
    config = SchedulerConfig(max_model_len=64, max_num_seqs=4, max_num_batched_tokens=16, growth_reserve=False)
    shapes: list[tuple[int, int]] = []

    def replays(rows: int, tokens: int) -> bool:
        shapes.append((rows, tokens))
        return tokens < graph_tokens
    sched = Scheduler(config, CacheManager(num_pages=64, num_slots=4, page_size=4), speculative_tokens=2,
                      speculative_max_batch=4, varlen_step_replays=replays)
    a = Request("a", [40, 41, 42])
    sched.add_request(a)
    sched.update_from_step(sched.schedule(), {"a": [11]})
    sched.add_request(Request("p", [1, 2, 3, 4, 5, 6, 7, 8], sampling_params=SamplingParams(prompt_logprobs=logprobs)))
    a.draft_token_ids = [21, 22]
    out = sched.schedule()
    drafts = (21, 22) if kept else ()
    assert [(s.request_id, s.num_new_tokens, s.draft_token_ids) for s in out.scheduled] == \
        [("a", 1 + len(drafts), drafts), ("p", 8, ())]
    assert out.num_batched_tokens == 9 + len(drafts) and sched.drafts_dropped_for_graph == (not kept)
    assert shapes == ([] if logprobs else [(2, 9)])
    sched.update_from_step(out, {"a": [21, 50] if kept else [30], "p": [12]})
    assert a.output_token_ids == ([11, 21, 50] if kept else [11, 30])
