"""The server and AsyncLLM after the engine loop died (a fault outside a step's own error handling, such as a
tensor-parallel rank gone): in-flight and new requests get a 503, probes answer at once, callers always hear of it;
and what must not end the loop: a caller whose event loop closed under its request."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from deltaserve.demo import SHIPPED_DEMO_DIR


@pytest.fixture()
def dying_app():
    """The demo model in this process; its scheduler raises (outside step()'s handling) once `boom` is set."""
    from deltaserve.config import EngineArgs
    from deltaserve.engine.async_engine import AsyncLLM
    from deltaserve.server.app import build_app
    from deltaserve.server.args import ServerConfig

    engine = AsyncLLM(EngineArgs(model=str(SHIPPED_DEMO_DIR), device="cpu", dtype="float32", max_model_len=512))
    scheduler = engine.engine.scheduler
    real_schedule = scheduler.schedule
    boom = threading.Event()

    def schedule(*args, **kwargs):
        if boom.is_set():
            raise RuntimeError("injected fatal fault")
        return real_schedule(*args, **kwargs)

    scheduler.schedule = schedule
    app = build_app(engine, ServerConfig(served_model_names=("m",)), shutdown_engine=False)
    yield app, engine, boom
    engine.shutdown()


def test_engine_death_fails_requests_and_probes_answer_at_once(dying_app):
    app, engine, boom = dying_app

    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as c:
                running = asyncio.create_task(c.post("/v1/completions", json={
                    "prompt": "def f", "max_tokens": 400, "ignore_eos": True}))
                await asyncio.sleep(0.3)
                boom.set()
                inflight = await running
                timed = []
                for path in ("/health", "/metrics"):
                    t0 = time.monotonic()
                    timed.append((await c.get(path), time.monotonic() - t0))
                late = await c.post("/v1/completions", json={"prompt": "def f", "max_tokens": 2})
                return inflight, timed, late

    inflight, ((health, health_s), (metrics, metrics_s)), late = asyncio.run(main())
    assert engine.dead is not None and "injected fatal fault" in engine.dead
    assert inflight.status_code == late.status_code == 503
    assert inflight.json()["error"]["code"] == late.json()["error"]["code"] == "engine_unavailable"
    # before: both waited for an engine thread that no longer exists (10 s each; a scrape times out first)
    assert health.status_code == 503 and health.json() == {"status": "engine dead"} and health_s < 2
    assert metrics.status_code == 200 and "deltaserve_time_to_first_token_seconds" in metrics.text and metrics_s < 2


def test_a_new_stream_after_engine_death_gets_a_503_not_a_200(dying_app):
    """A stream's 200 goes out before its first delta: after the engine died, a new streaming request got a 200 and
    an error event, not the 503 the README promises (clients and balancers retry on the status)."""
    app, engine, boom = dying_app

    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as c:
                boom.set()
                await c.post("/v1/completions", json={"prompt": "def f", "max_tokens": 2})
                return [await c.post(route, json={**body, "max_tokens": 2, "stream": True}) for route, body in (
                    ("/v1/completions", {"prompt": "def f"}),
                    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}))]

    for r in asyncio.run(main()):
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "engine_unavailable"


def test_async_llm_call_after_death_fails_at_once(dying_app):
    from deltaserve.engine.async_engine import EngineDeadError

    _, engine, _ = dying_app
    engine.shutdown()

    async def main():
        return await asyncio.wait_for(engine.call(lambda: 1), 5)

    with pytest.raises(EngineDeadError, match="shut down"):
        asyncio.run(main())


def test_a_callers_closed_event_loop_does_not_end_the_engine_for_others():
    from deltaserve.config import EngineArgs
    from deltaserve.engine.async_engine import AsyncLLM
    from deltaserve.sampling_params import SamplingParams

    engine = AsyncLLM(EngineArgs(model=str(SHIPPED_DEMO_DIR), device="cpu", dtype="float32", max_model_len=512))
    try:
        loop = asyncio.new_event_loop()
        stream = engine.generate([1, 2, 3], SamplingParams(max_tokens=300, ignore_eos=True), "orphan")
        assert loop.run_until_complete(stream.__anext__()).token_ids
        loop.close()  # a caller's loop gone with its request running (closed without shutdown_asyncgens)

        async def other():
            return [d async for d in engine.generate([1, 2], SamplingParams(max_tokens=3, ignore_eos=True), "b")]

        time.sleep(0.3)  # the engine steps the orphan meanwhile: before, its next delivery ended the engine loop
        assert engine.dead is None
        assert sum(len(d.token_ids) for d in asyncio.run(other())) == 3
        stats = asyncio.run(_stats(engine))
        assert stats["running"] == stats["waiting"] == stats["slots_used"] == 0  # the orphan was aborted
    finally:
        engine.shutdown()


async def _stats(engine):
    return await engine.call(engine.engine.stats)


def test_in_flight_callers_get_the_error_even_when_the_broken_engine_cannot_abort(dying_app):
    from deltaserve.engine.async_engine import EngineDeadError
    from deltaserve.sampling_params import SamplingParams

    _, engine, boom = dying_app

    def abort_fails(*args, **kwargs):
        raise RuntimeError("scheduler state is corrupt")

    engine.engine.scheduler.abort_request = abort_fails

    async def consume():
        async for _ in engine.generate([1, 2, 3], SamplingParams(max_tokens=300, ignore_eos=True), "r"):
            boom.set()

    async def main():
        await asyncio.wait_for(consume(), 10)  # before: the dying loop raised on the abort and never told it

    with pytest.raises(EngineDeadError, match="injected fatal fault"):
        asyncio.run(main())


def test_a_request_registered_while_the_loop_stops_fails_instead_of_waiting_forever():
    from deltaserve.config import EngineArgs
    from deltaserve.engine.async_engine import AsyncLLM, EngineDeadError
    from deltaserve.sampling_params import SamplingParams

    engine = AsyncLLM(EngineArgs(model=str(SHIPPED_DEMO_DIR), device="cpu", dtype="float32", max_model_len=512))

    class StopsMidRegistration(dict):
        def setdefault(self, key, value):
            engine.shutdown()  # the loop ends (and fails the streams it knows) between generate's check and this
            return super().setdefault(key, value)

    engine._streams = StopsMidRegistration()

    async def main():
        await asyncio.wait_for(anext(engine.generate([1, 2], SamplingParams(max_tokens=2), "late")), 10)

    with pytest.raises(EngineDeadError, match="shut down"):
        asyncio.run(main())


def test_a_call_whose_callers_loop_closed_does_not_end_the_engine():
    from deltaserve.config import EngineArgs
    from deltaserve.engine.async_engine import AsyncLLM
    from deltaserve.sampling_params import SamplingParams

    engine = AsyncLLM(EngineArgs(model=str(SHIPPED_DEMO_DIR), device="cpu", dtype="float32", max_model_len=512))
    try:
        started = threading.Event()
        busy = threading.Thread(target=asyncio.run, args=(_slow_call(engine, started),))
        busy.start()  # holds the engine thread for a moment, so the next call is still queued when its loop ends
        assert started.wait(10)

        async def impatient():
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(engine.call(lambda: 1), 0.05)

        asyncio.run(impatient())  # its loop is closed when the engine thread gets to the call
        busy.join()

        async def other():
            return [d async for d in engine.generate([1, 2], SamplingParams(max_tokens=2, ignore_eos=True), "b")]

        assert engine.dead is None  # before: answering the closed loop raised on the engine thread and ended it
        assert sum(len(d.token_ids) for d in asyncio.run(other())) == 2
    finally:
        engine.shutdown()


async def _slow_call(engine, started: threading.Event):
    def slow() -> None:
        started.set()
        time.sleep(0.5)

    await engine.call(slow)
