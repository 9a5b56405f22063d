"""Async front of the engine for the server: a background thread runs the step loop, callers await per-token deltas.

The engine itself is single-threaded; every engine call happens on the loop thread. Callers talk to it through a
command queue, and it answers through one asyncio queue per request (thread-safe hand-over via call_soon_threadsafe).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Callable

from deltaserve.engine.engine import EngineArgs, LLMEngine, RequestError
from deltaserve.outputs import SequenceDelta
from deltaserve.sampling_params import SamplingParams

log = logging.getLogger(__name__)
STATS_INTERVAL_S = 10.0


class EngineDeadError(RuntimeError):
    """The engine loop stopped (shutdown or a fatal error); no new requests are accepted."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    remaining: int  # samples not finished yet


class AsyncLLM:
    """Owns an LLMEngine and the thread that steps it."""

    def __init__(self, args: EngineArgs | None = None, *, engine: LLMEngine | None = None,
                 hold_synchronous_deltas: bool | None = None) -> None:
        """hold_synchronous_deltas: deliver a synchronous step's deltas once the next step is launched (_step);
        None: on a CUDA engine, whose launches return before the device is done. On CPU the launch runs the whole
        forward, so holding would delay every token by a step and overlap nothing."""
        self.engine = engine if engine is not None else LLMEngine(args)  # type: ignore[arg-type]
        self._hold_sync = (self.engine.runner.device.type == "cuda" if hold_synchronous_deltas is None
                           else hold_synchronous_deltas)
        self._commands: queue.Queue[tuple[Callable[[], Any], ...]] = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._stopping = threading.Event()
        self._dead: str | None = None
        self._calls: set[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = set()  # call()s not answered yet
        self._held: list[SequenceDelta] = []  # a synchronous step's deltas, delivered once the next step is launched
        self._thread = threading.Thread(target=self._run_loop, name="deltaserve-engine", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    # ---- caller side (any event loop) ----------------------------------------------------------------------------
    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str, *,
                       cache_points: tuple[int, ...] = ()) -> AsyncIterator[SequenceDelta]:
        """Yield the request's deltas until every sample finished. Cancelling the iteration aborts the request.
        Raises the engine's RequestError for a request it cannot serve. cache_points: see LLMEngine.add_request."""
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), params.n)
        if self._streams.setdefault(request_id, stream) is not stream:
            # replacing the live stream would strand its caller, and this one's cleanup would abort its request
            raise RequestError(f"request id {request_id!r} is already in use by a running stream; give each request "
                               "a unique id")
        if self._dead is not None:  # the loop stopped after the check above: its last sweep may have missed us
            self._streams.pop(request_id, None)
            raise EngineDeadError(self._dead)
        self._commands.put((self._add, request_id, list(prompt_token_ids), params, tuple(cache_points)))
        finished = False
        try:
            while stream.remaining > 0:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    stream.remaining -= 1
                yield item
            finished = True
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._commands.put((self.engine.abort_request, request_id))

    def abort(self, request_id: str) -> None:
        self._commands.put((self._abort, request_id))

    def call(self, fn: Callable[[], Any]) -> "asyncio.Future[Any]":
        """Run fn() on the engine thread (e.g. to read stats consistently) and await its result. Fails with
        EngineDeadError at once when the loop has stopped (a queued command would never run)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        pending = (loop, fut)
        self._calls.add(pending)

        def answer(result: Any = None, error: BaseException | None = None) -> None:
            self._calls.discard(pending)
            if not fut.done():
                fut.set_result(result) if error is None else fut.set_exception(error)

        def task() -> None:
            self._calls.discard(pending)  # answered from here on (or nobody waits): the dying sweep need not
            try:
                outcome: tuple[Any, BaseException | None] = (fn(), None)
            except Exception as e:  # noqa: BLE001 - handed to the awaiting caller
                outcome = (None, e)
            with contextlib.suppress(RuntimeError):  # the caller's event loop is closed: nobody waits for this
                loop.call_soon_threadsafe(answer, *outcome)
        self._commands.put((task,))
        if self._dead is not None:  # after registering: either this sees it or the dying loop fails the call
            answer(None, EngineDeadError(self._dead))
        return fut

    @property
    def dead(self) -> str | None:
        """Why the engine loop stopped (None while it runs)."""
        return self._dead

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort everything in flight and stop the loop thread."""
        self._stopping.set()
        self._commands.put((lambda: None,))
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.engine.shutdown()  # tensor-parallel workers stop with the engine

    # ---- engine thread -------------------------------------------------------------------------------------------
    def _add(self, request_id: str, prompt: list[int], params: SamplingParams,
             cache_points: tuple[int, ...] = ()) -> None:
        try:
            self.engine.add_request(request_id, prompt, params, cache_points=cache_points)
        except Exception as e:  # noqa: BLE001 - a bad request fails that request only
            self._deliver(request_id, e)

    def _abort(self, request_id: str) -> None:
        self._deliver_held()  # the request's last tokens before its abort
        for delta in self.engine.abort_request(request_id):
            self._deliver(request_id, delta)

    def _deliver(self, request_id: str, item: SequenceDelta | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            return
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
        except RuntimeError:  # the caller's event loop was closed under a running request: nobody will read it,
            # and raising here would end the engine loop for every other caller
            self._streams.pop(request_id, None)
            self._commands.put((self.engine.abort_request, request_id))  # queued: this may be mid-step or dying

    def _deliver_held(self) -> None:
        held, self._held = self._held, []
        for delta in held:
            self._deliver(delta.request_id, delta)

    def _drain_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            fn, *args = command
            fn(*args)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _step(self) -> None:
        """One engine step. On CUDA the deltas of a synchronous step (its tokens waited for: speculative decoding)
        are held until the next step is launched: the event loop then streams them while the GPU runs, instead of
        taking the GIL from the host work that launches the next step (the engine thread waited ~1 ms a step for
        the GIL at 16 streams; benchmarks/RESULTS.md 2026-12-06, bench_gil.py). The deltas of an
        asynchronous step's predecessor go out at once: the GPU is already busy with the step."""
        # a callback only while something is held: the engine then asks the runner where to call it, each step
        deltas = self.engine.step(on_launch=self._deliver_held if self._held else None)
        self._deliver_held()  # if the step failed before calling it
        if not self._hold_sync or self.engine.step_in_flight or not self.engine.has_unfinished():
            for delta in deltas:
                self._deliver(delta.request_id, delta)
        else:
            self._held = deltas

    def _run_loop(self) -> None:
        stats = StatsLog(self.engine.stats)
        try:
            while not self._stopping.is_set():
                self._drain_commands(block=not self.engine.has_unfinished())
                if self.engine.has_unfinished():
                    self._step()
                else:  # a command (a client's cancel) ended the last request: no launch will deliver what is held
                    self._deliver_held()
                stats.maybe_log()
        except Exception as e:  # noqa: BLE001 - fatal: fail every waiting caller with the reason
            log.exception("engine loop died")
            self._dead = f"engine loop died: {type(e).__name__}: {e}"
        finally:
            self._dead = self._dead or "engine was shut down"
            self._deliver_held()
            for request_id in list(self._streams):
                self._deliver(request_id, EngineDeadError(self._dead))  # first: a broken engine may fail to abort
                try:
                    self.engine.abort_request(request_id)
                except Exception:  # noqa: BLE001 - the engine is gone either way; its caller already has the error
                    log.debug("aborting %s in a stopped engine failed", request_id, exc_info=True)
            for loop, fut in list(self._calls):  # their commands will never run
                with contextlib.suppress(RuntimeError):  # that caller's event loop is closed: nobody waits
                    loop.call_soon_threadsafe(lambda f=fut, why=self._dead: f.done() or
                                              f.set_exception(EngineDeadError(why)))


class StatsLog:
    """A log line every STATS_INTERVAL_S seconds while the engine works: load, KV use, prefix-cache hits, checkpoints,
    evictions and throughput since the last line (engine thread only)."""

    def __init__(self, read: Callable[[], dict[str, int]]) -> None:
        self.read, self.last_time, self.last = read, time.monotonic(), read()

    def maybe_log(self) -> None:
        now = time.monotonic()
        if now - self.last_time < STATS_INTERVAL_S:
            return
        s, prev, dt = self.read(), self.last, now - self.last_time
        self.last_time, self.last = now, s
        if s == prev:
            return  # idle: nothing new to say
        prompt = s["prompt_tokens"] - prev["prompt_tokens"]
        cached = s.get("prompt_tokens_cached", 0) - prev.get("prompt_tokens_cached", 0)
        queried = s.get("prompt_tokens_queried", 0) - prev.get("prompt_tokens_queried", 0)
        in_requests = s["pages_used"] - s.get("pages_cached", 0)  # as kv_cache_usage_perc: cache-only pages are free
        log.info("running %d, waiting %d; KV %.0f%% used by requests; prompt %.0f tok/s, generation %.0f tok/s; prefix "
                 "cache: %.0f%% of prompt tokens hit, %d/%d checkpoints, %d evictions", s["running"], s["waiting"],
                 100 * in_requests / max(s["pages_total"], 1), prompt / dt,
                 (s["generation_tokens"] - prev["generation_tokens"]) / dt, 100 * cached / max(queried, 1),
                 s.get("checkpoints_used", 0), s.get("checkpoints_total", 0), s.get("checkpoint_evictions", 0))
