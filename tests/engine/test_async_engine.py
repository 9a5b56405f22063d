"""AsyncLLM: concurrent streams equal the offline API, cancellation aborts and frees, bad requests fail alone."""

from __future__ import annotations

import asyncio
import threading

import pytest

from deltaserve import SamplingParams
from deltaserve.engine.async_engine import AsyncLLM
from deltaserve.engine.engine import RequestError
from tests.engine.test_engine import ckpt, make_llm, pools_full, prompts  # noqa: F401 (fixture)


@pytest.fixture()
def engines(ckpt):  # noqa: F811
    llm = make_llm(ckpt[0])
    alng = AsyncLLM(engine=make_llm(ckpt[0]).engine)
    yield llm, alng
    alng.shutdown()


@pytest.fixture()
def holding_eager(ckpt):  # noqa: F811
    """An AsyncLLM that holds synchronous steps' deltas as a CUDA engine does (on CPU it delivers them at once)."""
    llm = make_llm(ckpt[0])
    alng = AsyncLLM(engine=make_llm(ckpt[0]).engine, hold_synchronous_deltas=True)
    yield llm, alng
    alng.shutdown()


@pytest.fixture()
def holding(holding_eager):
    """As holding_eager, with a runner that replays decode steps as CUDA graphs, as a CUDA runner does (a CPU runner
    captures none: its answer is set here, its launches stay real)."""
    holding_eager[1].engine.runner.replays_graph = lambda step: step.tokens_per_row == 1
    return holding_eager


async def collect(alng: AsyncLLM, rid: str, prompt: list[int], params: SamplingParams):
    tokens: dict[int, list[int]] = {}
    async for d in alng.generate(prompt, params, rid):
        tokens.setdefault(d.index, []).extend(d.token_ids)
    return tokens


def test_concurrent_streams_match_offline(engines):
    llm, alng = engines
    ps = prompts(8, seed=30)
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in llm.generate(ps, sp)]

    async def main():
        return await asyncio.gather(*(collect(alng, f"r{i}", p, sp) for i, p in enumerate(ps)))
    got = asyncio.run(main())
    assert [g[0] for g in got] == expected


def test_cancel_mid_stream_frees_pools(engines):
    _, alng = engines
    sp = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def main():
        agen = alng.generate(prompts(1, 31)[0], sp, "x")
        n = 0
        async for _ in agen:
            n += 1
            if n == 3:
                break
        await agen.aclose()
        for _ in range(100):
            await asyncio.sleep(0.02)
            if await alng.call(lambda: pools_full(type("L", (), {"engine": alng.engine})())):
                return True
        return False
    assert asyncio.run(main())


def test_bad_request_raises_and_engine_keeps_serving(engines):
    _, alng = engines
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

    async def main():
        with pytest.raises(RequestError, match="max_model_len"):
            await collect(alng, "long", list(range(1, 600)), sp)
        return await collect(alng, "ok", [1, 2, 3], sp)
    assert len(asyncio.run(main())[0]) == 4


def test_duplicate_request_id_is_refused_and_the_first_stream_finishes(engines):
    """A second stream under a live request's id is refused; the first one still gets all its tokens (replacing its
    stream left its caller waiting forever, and the refused one's cleanup aborted the first request)."""
    _, alng = engines
    sp = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)

    async def main():
        first = asyncio.create_task(collect(alng, "same", [1, 2, 3], sp))
        await asyncio.sleep(0.05)  # the first stream is registered and running
        with pytest.raises(RequestError, match="already in use"):
            await collect(alng, "same", [4, 5, 6], sp)
        return await asyncio.wait_for(first, 30)
    assert len(asyncio.run(main())[0]) == 30


def test_shutdown_fails_waiting_callers(ckpt):  # noqa: F811
    alng = AsyncLLM(engine=make_llm(ckpt[0]).engine)
    alng.shutdown()
    with pytest.raises(Exception, match="shut down"):
        asyncio.run(collect(alng, "late", [1, 2], SamplingParams(max_tokens=2)))


def test_call_hands_an_exception_to_the_awaiting_caller(engines):
    """A function run on the engine thread that raises: the caller gets that exception (not a hang)."""
    _, alng = engines

    def boom():
        raise KeyError("no such stat")

    async def main():
        with pytest.raises(KeyError, match="no such stat"):
            await asyncio.wait_for(alng.call(boom), 10)
        return await asyncio.wait_for(alng.call(lambda: 42), 10)
    assert asyncio.run(main()) == 42


def _spy_events(alng: AsyncLLM) -> list[tuple[str, object]]:
    """Record the engine thread's launches and deliveries in order (the real ones still run)."""
    events: list[tuple[str, object]] = []
    launch, deliver = alng.engine.runner.launch, alng._deliver
    alng.engine.runner.launch = lambda *a, **k: (events.append(("L", None)), launch(*a, **k))[1]
    alng._deliver = lambda rid, item: (events.append(("D", item)), deliver(rid, item))[1]
    return events


def test_cpu_steps_stream_their_tokens_at_once(engines):
    """On CPU the launch runs the whole forward: holding a step's deltas would delay each token by a step and overlap
    nothing, so by default they go out as the step returns."""
    llm, alng = engines
    events = _spy_events(alng)
    sp = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    got = asyncio.run(collect(alng, "one", [5, 6, 7], sp))
    assert got[0] == llm.generate([[5, 6, 7]], sp)[0].outputs[0].token_ids
    assert "".join(kind for kind, _ in events) == "LD" * 5


def test_synchronous_steps_stream_their_tokens_once_the_next_step_is_launched(holding):
    """Holding (CUDA's default): every step here waits for its own tokens; their deltas go out after the next step's
    launch (so the event loop streams them while that step runs), the last ones at once, and the tokens are those of
    the offline API."""
    llm, alng = holding
    assert not alng.engine.async_scheduling
    events = _spy_events(alng)
    sp = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    got = asyncio.run(collect(alng, "one", [5, 6, 7], sp))
    assert got[0] == llm.generate([[5, 6, 7]], sp)[0].outputs[0].token_ids
    assert "".join(kind for kind, _ in events) == "LLDLDLDLDD"
    assert [len(d.token_ids) for kind, d in events if kind == "D"] == [1] * 5


def test_abort_delivers_held_tokens_before_the_abort(holding):
    """An abort between two steps: the held deltas of the aborted request go out before its finishing one."""
    _, alng = holding
    events = _spy_events(alng)
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)

    async def main():
        other = asyncio.create_task(collect(alng, "other", [1, 2, 3], sp))
        agen = alng.generate([4, 5, 6], sp, "victim")
        first = await agen.__anext__()
        alng.abort("victim")
        rest = [d async for d in agen]
        await other
        return [first, *rest]
    got = asyncio.run(main())
    assert got[-1].finished and not any(d.finished for d in got[:-1])
    victim = [d for kind, d in events if kind == "D" and d.request_id == "victim"]
    assert victim[-1].finished and not any(d.finished for d in victim[:-1])


def test_held_final_delta_goes_out_when_a_cancel_ends_the_last_running_request(holding):
    """A finishes in a synchronous step while B runs (A's final delta is held for the next launch); B's client then
    goes away, its queued abort leaves nothing to run, so no step launches: A's final delta must still go out (it was
    held until a new request came, A's stream hung)."""
    _, alng = holding
    step, finished_a, release = alng.engine.step, threading.Event(), threading.Event()

    def gated_step(*args, **kwargs):  # the engine thread waits after A's last step until B's client has gone
        deltas = step(*args, **kwargs)
        if any(d.request_id == "A" and d.finished for d in deltas):
            finished_a.set()
            release.wait(10)
        return deltas
    alng.engine.step = gated_step

    async def main():
        b = alng.generate([4, 5, 6], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True), "B")
        await b.__anext__()
        a = asyncio.create_task(collect(alng, "A", [1, 2, 3], SamplingParams(temperature=0, max_tokens=3,
                                                                             ignore_eos=True)))
        assert await asyncio.get_running_loop().run_in_executor(None, finished_a.wait, 30)
        await b.aclose()  # queues B's abort: the last running request
        release.set()
        return await asyncio.wait_for(a, 10)
    assert len(asyncio.run(main())[0]) == 3


def test_held_deltas_go_out_before_a_slow_launch(holding):
    """A held delta waits for the next launch only where that launch is quick (the runner replays a graph: here a
    uniform decode step); before a prefill or mixed step, which launches the whole model from Python, it goes out
    first. B is queued while A still decodes (the engine thread waits for it), so A's prefill and decode steps and
    the mixed step of B's prefill with A's decode all occur."""
    _, alng = holding
    events: list[tuple[str, object]] = []
    launch, deliver, step = alng.engine.runner.launch, alng._deliver, alng.engine.step
    quick, b_queued = alng.engine.runner.replays_graph, threading.Event()
    alng.engine.runner.launch = lambda s, *a, **k: (events.append(("L", (quick(s), s.num_rows))), launch(s, *a, **k))[1]
    alng._deliver = lambda rid, item: (events.append(("D", item)), deliver(rid, item))[1]

    def gated_step(*args, **kwargs):  # from A's third step on, wait until B's request is queued
        if sum(kind == "L" for kind, _ in events) == 2:
            assert b_queued.wait(10)
        out = step(*args, **kwargs)
        events.append(("R", out))
        return out
    alng.engine.step = gated_step
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

    async def main():
        a = alng.generate([1, 2, 3], sp, "A")
        await a.__anext__()
        b = asyncio.create_task(collect(alng, "B", [4, 5, 6, 7], sp))
        await asyncio.sleep(0)  # B's generate runs up to its first wait: its request is queued
        b_queued.set()
        rest = [d async for d in a]
        return rest, await b
    asyncio.run(main())
    launches = [item for kind, item in events if kind == "L"]  # per launch: (the runner replays a graph, rows)
    produced: dict[int, int] = {}  # id(delta) -> the index of the launch after the step that made it
    late = before_mixed = launched = 0
    for kind, item in events:
        if kind == "L":
            launched += 1
        elif kind == "R":
            produced.update((id(d), launched) for d in item)
        elif produced[id(item)] < launched:  # delivered after the next launch: only a quick one may hold it
            assert launches[produced[id(item)]][0], "a delta waited for a prefill / mixed step's launch"
            late += 1
        elif launched < len(launches) and launches[launched] == (False, 2):  # out before the mixed step's launch
            before_mixed += 1
    assert late > 0 and before_mixed > 0  # held past quick launches, and out before the mixed step's


def test_held_deltas_do_not_wait_for_an_eager_decode_launch(holding_eager):
    """A runner that replays no graph (enforce_eager, a failed capture, or CPU as here) launches a decode step
    from Python, the whole model's host time: a held delta goes out before that launch, not after it."""
    llm, alng = holding_eager
    assert alng.engine.runner.graphs is None
    events = _spy_events(alng)
    sp = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    got = asyncio.run(collect(alng, "one", [5, 6, 7], sp))
    assert got[0] == llm.generate([[5, 6, 7]], sp)[0].outputs[0].token_ids
    assert "".join(kind for kind, _ in events) == "LD" * 5
