"""uvicorn's server with a drain phase, so SIGTERM never cuts a stream mid-token.

On the first SIGTERM (or SIGINT): new requests get 503 and /health turns 503; requests in flight may finish for up
to `shutdown_timeout` seconds; whatever is still running then is aborted in the engine, so its client gets a clean
error (a 503 body, or an error event and [DONE] on a stream); then uvicorn closes the connections and the app's
shutdown stops the engine. A second signal skips the wait: everything in flight is aborted at once (clients still get
their clean error) and the process exits with status 1. A third one stops without any cleanup.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType

import uvicorn

from deltaserve.server.state import ServerState

log = logging.getLogger("deltaserve.server")

_ABORT_GRACE_S = 5.0  # after aborting, how long the aborted streams get to send their last event


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self._drain_requested = False
        self._draining: asyncio.Task | None = None
        self.forced = False  # a second signal cut the drain short: the process exits non-zero
        self.unfinished = 0  # requests in flight when it came

    async def startup(self, sockets=None) -> None:  # type: ignore[no-untyped-def]
        await super().startup(sockets=sockets)
        for server in getattr(self, "servers", []):
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                # Printed whatever the log level: the one line an operator (or a script started with --port 0)
                # needs. Keep its shape: tests parse it.
                print(f"deltaserve listening on http://{host}:{port} serving "
                      f"{', '.join(self.state.config.served_model_names)}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # Unlike uvicorn's, does not re-raise the signal after shutdown: a drained server exits with status 0.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Signal handlers only set flags; the drain task starts on uvicorn's next tick (every 0.1 s).
        if self.forced:
            self.should_exit = self.force_exit = True  # uvicorn then cancels what is left, tracebacks and all
        elif self._drain_requested or self.should_exit:
            self.forced = True
        self._drain_requested = True

    async def on_tick(self, counter: int) -> bool:
        if self._drain_requested and self._draining is None:
            self._draining = asyncio.create_task(self.drain())
        if self.forced and not self.should_exit:
            # Aborting lets each request end the normal way (its error event, its finally blocks), so nothing is
            # cancelled mid-flight and the shutdown below finds no task to kill.
            self.unfinished = len(self.state.inflight)
            self.state.draining = True
            for request_id in list(self.state.inflight):
                self.state.engine.abort(request_id)
            await _wait_idle(self.state, _ABORT_GRACE_S)
            self.should_exit = True
        return await super().on_tick(counter)

    async def drain(self) -> None:
        state = self.state
        state.draining = True
        timeout = state.config.shutdown_timeout
        log.info("shutting down: %d request(s) in flight, waiting up to %.1fs", len(state.inflight), timeout)
        if not await _wait_idle(state, timeout):
            log.warning("aborting %d request(s) still running after %.1fs", len(state.inflight), timeout)
            for request_id in list(state.inflight):
                state.engine.abort(request_id)
            await _wait_idle(state, _ABORT_GRACE_S)
        self.should_exit = True


async def _wait_idle(state: ServerState, timeout: float) -> bool:
    if not state.inflight or state.idle is None:
        return True
    try:
        await asyncio.wait_for(state.idle.wait(), timeout)
        return True
    except asyncio.TimeoutError:
        return False
