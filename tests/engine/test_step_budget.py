"""The per-step time budget (max_step_ms): the step cost model's online fit, the scheduler's chunk sizing under a
stream of long prompts with an injected cost model, the option's validation, and outputs unchanged on a tiny model."""

from __future__ import annotations

import random

import pytest

from deltaserve.cache.manager import CacheManager
from deltaserve.config import ConfigError, SchedulerConfig
from deltaserve.engine.request import Request, RequestStatus
from deltaserve.engine.scheduler import Scheduler, SchedulerOutput
from deltaserve.engine.step_cost import StepCostModel, StepShape, chunk_pairs

TRUE = (14.0, 0.11, 0.07, 0.9, 0.03)  # ms: base, per decode token, per prefill token, per M pairs, per k context


def shape_of(out: SchedulerOutput) -> StepShape:
    return StepShape.of((s.num_new_tokens, s.num_computed_tokens, len(s.draft_token_ids)) for s in out.scheduled)


# ---- the cost model --------------------------------------------------------------------------------------------------
def random_shape(rng: random.Random) -> StepShape:
    shape = StepShape()
    for _ in range(rng.randint(0, 48)):
        shape = shape.with_decode(rng.randint(1, 9000))
    for _ in range(rng.randint(0, 2)):
        shape = shape.with_chunk(rng.randint(1, 2048), rng.randint(0, 6000))
    return shape


def test_fit_recovers_known_coefficients() -> None:
    rng = random.Random(0)
    model = StepCostModel(prior=(5.0, 0.01, 0.2, 0.1, 0.1))  # a wrong prior
    truth = StepCostModel(prior=TRUE)
    shapes = [random_shape(rng) for _ in range(400)]
    assert model.predict(shapes[0]) != pytest.approx(truth.predict(shapes[0]), rel=0.05)
    for shape in shapes:
        model.observe(shape, truth.predict(shape) * rng.uniform(0.995, 1.005))
    assert model.fitted and model.num_skipped == 2  # the warm-up steps
    for got, want in zip(model.coefficients, TRUE):
        assert got == pytest.approx(want, rel=0.1)


def test_prior_until_enough_samples_and_outliers_left_out() -> None:
    model = StepCostModel(prior=TRUE, min_samples=4, skip_first=0)
    decode = StepShape().with_decode(1000).with_decode(2000)
    for _ in range(3):
        model.observe(decode, 100.0)
    assert not model.fitted and model.coefficients == TRUE  # the prior alone, until min_samples
    model.observe(decode, 100.0)
    assert model.fitted and model.predict(decode) == pytest.approx(100.0, rel=0.2)
    assert not model.observe(decode, 10_000.0)  # a compile stall: left out
    assert not model.observe(decode, float("nan")) and not model.observe(decode, 0.0)
    assert model.num_samples == 4 and model.num_skipped == 3
    # a direction the data never saw (prefill) stays near the prior
    assert model.coefficients[2] == pytest.approx(TRUE[2], rel=0.5)


def test_coefficients_stay_non_negative() -> None:
    model = StepCostModel(prior=TRUE, min_samples=1, skip_first=0)
    for n in range(1, 60):  # time falling with the prefill tokens: the fit would go negative
        model.observe(StepShape().with_chunk(n * 30, 0), 50.0 - n * 0.5)
    assert all(c >= 0 for c in model.coefficients)


def test_largest_chunk_is_the_largest_within_the_budget() -> None:
    model = StepCostModel(prior=TRUE)
    decode = StepShape()
    for _ in range(16):
        decode = decode.with_decode(8000)
    for context in (0, 4000, 8000):
        n = model.largest_chunk(decode, context, 2048, 50.0)
        assert 0 < n < 2048
        assert model.predict(decode.with_chunk(n, context)) <= 50.0 < model.predict(decode.with_chunk(n + 1, context))
    assert model.largest_chunk(decode, 0, 2048, 10.0) == 0  # the decode rows alone exceed it
    assert model.largest_chunk(decode, 0, 100, 1e6) == 100
    assert chunk_pairs(3, 10) == 3 * 10 + 6


# ---- the scheduler -------------------------------------------------------------------------------------------------
def budget_scheduler(max_step_ms: float | None, *, budget: int = 2048, max_len: int = 12_000) -> Scheduler:
    config = SchedulerConfig(max_model_len=max_len, max_num_seqs=32, max_num_batched_tokens=budget,
                             max_step_ms=max_step_ms)
    cache = CacheManager(num_pages=8192, num_slots=32, page_size=16)
    return Scheduler(config, cache, step_cost=StepCostModel(prior=TRUE, min_samples=10**9))


def run_stream(sched: Scheduler, *, decodes: int = 12, prompts: int = 6, prompt_len: int = 8192,
               every: int = 40) -> dict:
    """`decodes` requests generating long outputs, and a long prompt arriving every `every` steps; checks each
    step as it goes. Returns per-step records."""
    rng = random.Random(1)
    for i in range(decodes):
        r = Request(f"d{i}", [rng.randrange(1, 500) for _ in range(rng.randint(200, 3000))])
        r.max_output_tokens = 100_000
        sched.add_request(r)
    long_ids, steps = [], []
    done: set[str] = set()
    t = 0
    while True:
        if t % every == 0 and len(long_ids) < prompts:
            r = Request(f"p{len(long_ids)}", [rng.randrange(1, 500) for _ in range(prompt_len)])
            r.max_output_tokens = 4
            sched.add_request(r)
            long_ids.append(r.request_id)
        decode_rows = {r.request_id for r in sched.running
                       if r.num_tokens - r.num_computed_tokens == 1 and not r.reached_max_output}
        out = sched.schedule()
        ids = {s.request_id for s in out.scheduled}
        assert decode_rows - set(out.preempted) <= ids, "a running decode was not scheduled"
        prefill = sum(s.num_new_tokens for s in out.scheduled if s.num_new_tokens > 1)
        steps.append({"decode_rows": len(decode_rows), "prefill": prefill,
                      "predicted": sched.step_cost.predict(shape_of(out)), "tokens": out.num_batched_tokens})
        assert out.num_batched_tokens <= sched.config.max_num_batched_tokens
        sampled = {s.request_id: 7 for s in out.scheduled if s.samples_token}
        for r in sched.update_from_step(out, sampled):
            if r.request_id.startswith("p") and r.num_output_tokens >= r.max_output_tokens:
                sched.finish_request(r.request_id, RequestStatus.FINISHED_LENGTH)
                done.add(r.request_id)
        t += 1
        assert t < 5000, "the long prompts did not finish"
        if len(done) == prompts:
            return {"steps": steps, "num_steps": t}


def test_mixed_steps_stay_within_the_budget_and_every_prompt_finishes() -> None:
    sched = budget_scheduler(60.0)
    floor = sched.config.min_prefill_chunk
    assert floor == 128
    rec = run_stream(sched)
    mixed = [s for s in rec["steps"] if s["decode_rows"] and s["prefill"]]
    assert len(mixed) > 50
    for s in mixed:
        # within the budget, or exactly the floor that keeps prompts moving
        assert s["predicted"] <= 60.0 + 1e-9 or s["prefill"] <= floor
    # chunks are sized by the budget, not fixed: they shrink as the prompt's context (attention) grows
    assert len({s["prefill"] for s in mixed}) > 5
    # a step without decode rows keeps the whole token budget
    assert any(not s["decode_rows"] and s["prefill"] == 2048 for s in rec["steps"])

    off = run_stream(budget_scheduler(None))
    mixed_off = [s for s in off["steps"] if s["decode_rows"] and s["prefill"]]
    assert max(s["predicted"] for s in mixed_off) > 150  # what the budget prevents
    assert off["num_steps"] < rec["num_steps"]  # the price: more steps to get the prompts through


def test_a_tight_budget_still_moves_prompts_by_the_floor() -> None:
    sched = budget_scheduler(5.0)  # below what the decode rows alone cost
    rec = run_stream(sched, decodes=4, prompts=2, prompt_len=1024, every=1)
    mixed = [s for s in rec["steps"] if s["decode_rows"] and s["prefill"]]
    assert mixed and all(s["prefill"] <= sched.config.min_prefill_chunk for s in mixed)
    assert sum(s["prefill"] == sched.config.min_prefill_chunk for s in mixed) > len(mixed) // 2


@pytest.mark.parametrize("max_step_ms", [1e6, None])
def test_decodes_behind_a_prefill_keep_their_tokens(max_step_ms) -> None:
    """A decode row that comes after a prefilling prompt in admission order still gets its token, with the time
    budget and without it: the prefill chunk is sized after reserving the decode rows."""
    sched = budget_scheduler(max_step_ms, budget=64)
    sched.add_request(Request("long", list(range(1, 500))))
    sched.add_request(Request("short", [1, 2, 3]))
    out = sched.schedule()  # no decode rows yet: the long prompt takes the whole budget
    assert [s.num_new_tokens for s in out.scheduled] == [64]
    sched.update_from_step(out, {})
    sched._running.append(sched._waiting.popleft())  # noqa: SLF001 - force the order: prefill first, decode next
    short = sched.get_request("short")
    sched.cache.admit("short", 3, sched.cache.match_prefix([1, 2, 3]))
    short.status, short.num_computed_tokens = RequestStatus.RUNNING, 2
    out = sched.schedule()
    assert {s.request_id: s.num_new_tokens for s in out.scheduled} == {"long": 63, "short": 1}


# ---- the option ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "50", True])
def test_option_validates_naming_the_field(bad) -> None:
    with pytest.raises(ConfigError, match="max_step_ms"):
        SchedulerConfig(max_step_ms=bad)


def test_option_off_values_and_generated_flag() -> None:
    import argparse

    from deltaserve.config import add_engine_options

    assert SchedulerConfig(max_step_ms=0).step_budget_ms is None
    assert SchedulerConfig().step_budget_ms is None
    assert SchedulerConfig(max_step_ms=50).step_budget_ms == 50.0
    parser = argparse.ArgumentParser()
    add_engine_options(parser)
    assert parser.parse_args(["--max-step-ms", "42.5"]).max_step_ms == 42.5
    assert parser.parse_args([]).max_step_ms is None


def test_outputs_equal_with_the_budget_on_and_off(tmp_path) -> None:
    """The policy only changes chunking, which is exact: same greedy tokens. A budget of 1e-6 ms (below any
    prediction) forces every mixed step down to the floor chunk (2 tokens at max_num_batched_tokens 32); that run
    also overlaps steps (async scheduling), which is exact too."""
    import torch

    from deltaserve import LLM, SamplingParams
    from tests.models.factory import TinySpec, save_checkpoint

    save_checkpoint(TinySpec("budget", extra={"vocab_size": 320}), tmp_path, seed=5)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 300, (n,), generator=g).tolist() for n in (5, 90, 7, 120, 60)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs, steps = {}, {}
    for budget in (None, 1e-6):
        llm = LLM(str(tmp_path), dtype="float32", device="cpu", max_model_len=256, max_num_batched_tokens=32,
                  max_step_ms=budget, async_scheduling=budget is not None)  # async: the in-flight path too
        outs[budget] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        steps[budget] = llm.engine.cache.tick
        if budget:
            cost = llm.engine.scheduler.step_cost
            assert cost.num_samples + cost.num_skipped > 0  # measured steps reached the model
    assert outs[None] == outs[1e-6]
    assert steps[1e-6] > steps[None]  # the chunks were really smaller
