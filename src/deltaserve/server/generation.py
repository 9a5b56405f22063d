"""Running one request on the engine from a route: metrics, the in-flight registry, errors as API errors, and
aborting when the client goes away.

Closing (or cancelling) the async iterator returned by `generate` aborts the engine request, which frees its KV
pages and state slot; every exit path below closes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from starlette.requests import Request

from deltaserve.engine.async_engine import EngineDeadError
from deltaserve.engine.engine import RequestError
from deltaserve.outputs import SequenceDelta
from deltaserve.sampling_params import SamplingParams
from deltaserve.server.errors import REQUEST_START, APIError, server_error
from deltaserve.server.metrics import ServerMetrics
from deltaserve.server.state import ServerState

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client closed the connection before the response was ready; its request was aborted."""


class _RequestTimer:
    """Observes one engine request's latencies and outcome as its deltas pass (metrics.py says what each means)."""

    def __init__(self, metrics: ServerMetrics, num_prompt_tokens: int, n: int) -> None:
        self.metrics = metrics
        now = time.monotonic()
        self.arrival = REQUEST_START.get() or now  # outside an HTTP request (tests): from the hand-over
        self.handed_over = now
        self.first_token: float | None = None
        self.last_token: dict[int, float] = {}
        self.tokens = [0] * n
        self.finished: set[int] = set()
        metrics.queue.observe(now - self.arrival)
        metrics.prompt_tokens.observe(num_prompt_tokens)

    def on_delta(self, delta: SequenceDelta) -> None:
        if delta.token_ids:
            now = time.monotonic()
            if self.first_token is None:
                self.first_token = now
                self.metrics.ttft.observe(now - self.arrival)
            elif delta.index in self.last_token:
                gap = (now - self.last_token[delta.index]) / len(delta.token_ids)
                self.metrics.itl.observe(gap)
                self.metrics.tpot.observe(gap)
            self.last_token[delta.index] = now
            self.tokens[delta.index] += len(delta.token_ids)
        if delta.finished:
            self.finished.add(delta.index)
            success = self.metrics.success.get(delta.finish_reason or "")
            if success is not None:
                success.inc()

    def on_end(self, outcome: str) -> None:
        """Latencies are observed for requests that ran to the end ("ok"). A client that went away ("cancelled")
        aborted its unfinished samples; an abort ("abort", at shutdown) ends every sample at once, but the stream
        closes on the first one's delta, so the others' are never seen here. So does a failure ("error": the
        engine fails every sequence of the step, or its loop died), whose other samples count as failed."""
        m = self.metrics
        unseen = m.success.get({"cancelled": "abort", "abort": "abort", "error": "error"}.get(outcome, ""))
        if unseen is not None:
            unseen.inc(len(self.tokens) - len(self.finished))
        if outcome != "ok":
            return
        now = time.monotonic()
        m.e2e.observe(now - self.arrival)
        m.inference.observe(now - self.handed_over)
        if self.first_token is not None:
            m.prefill.observe(self.first_token - self.handed_over)
            m.decode.observe(now - self.first_token)
        m.generation_tokens.observe(sum(self.tokens))
        m.max_generation_tokens.observe(max(self.tokens))


async def generate(state: ServerState, prompt: list[int], params: SamplingParams, request_id: str,
                   endpoint: str, *, prompt_field: str = "prompt",
                   cache_points: tuple[int, ...] = ()) -> AsyncIterator[SequenceDelta]:
    """The engine's deltas for one prompt, observing the request's latencies as they pass. cache_points: where the
    prompt's stable prefixes end (the prefix cache keeps states there)."""
    timer = _RequestTimer(state.metrics, len(prompt), params.n)
    outcome = "cancelled"  # stays so if the client goes away (the iterator is closed mid-way)
    state.begin(request_id)
    stream = state.engine.generate(prompt, params, request_id, cache_points=cache_points)
    try:
        async for delta in stream:
            timer.on_delta(delta)
            if delta.finished and delta.finish_reason in ("error", "abort"):
                outcome = delta.finish_reason
            yield delta
        if outcome == "cancelled":
            outcome = "ok"
    except RequestError as e:  # the engine's own checks on a request: written for the client
        outcome = "rejected"
        raise APIError(400, str(e), param=prompt_field, code="invalid_request") from None
    except EngineDeadError as e:
        outcome = "error"
        raise server_error("the engine is not running", f"{request_id}: {e}", status=503,
                           code="engine_unavailable") from None
    finally:
        await stream.aclose()
        state.end(request_id)
        timer.on_end(outcome)
        state.metrics.requests.labels(endpoint, outcome, state.metrics.model_name).inc()


async def merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Interleave several streams as items arrive, tagged with the stream's position; closing the merge closes
    them all (aborting their requests)."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                queue.put_nowait((i, item, None))
            queue.put_nowait((i, done, None))
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            queue.put_nowait((i, None, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item, error = await queue.get()
            if error is not None:
                raise error
            if item is done:
                remaining -= 1
                continue
            yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _until_disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and so aborting its engine requests) if the client disconnects first.
    Streaming responses need no such guard: Starlette cancels their body iterator on disconnect."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


def raise_for_failure(delta: SequenceDelta) -> None:
    """A sequence the engine failed (500) or aborted while the client still waited, i.e. at shutdown (503). The
    engine's error text is an exception's: it goes to the log, with the request id the client gets."""
    if delta.finish_reason == "error":
        raise server_error("the engine failed this request", f"{delta.request_id}: {delta.error or 'unknown error'}",
                           code="engine_error")
    if delta.finish_reason == "abort":
        raise APIError(503, "the request was aborted because the server is shutting down; retry it",
                       code="request_aborted")
