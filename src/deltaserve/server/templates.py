"""Chat templates rendered out of process, bounded in time, memory and output size.

A few worker processes (template_worker.py) render with transformers' own renderer; each job gets a deadline, and a
worker that misses it is killed and replaced, so a template that loops or allocates without end costs its request a
400 and nothing else: the event loop, the engine thread and other requests never wait on it (beyond sharing the CPU
for at most the deadline). The server checks the model's own template at start with a probe conversation, so a
broken one stops the server instead of failing every chat request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import select
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from deltaserve.server.template_worker import write_message

log = logging.getLogger("deltaserve.server")

_HEADER = struct.Struct(">I")
_START_TIMEOUT_S = 60.0  # importing transformers' template module; generous for a loaded CI machine
PROBE = [{"role": "user", "content": "Hello"}]


class TemplateRenderError(Exception):
    """kind: "template" (the template's own message), "timeout", "size", "memory", "internal" (details logged)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class TemplateLimits:
    timeout: float  # seconds per rendering
    max_chars: int  # longest rendered prompt
    memory_bytes: int  # a worker's memory beyond its imports
    workers: int = 2


class _Worker:
    """One renderer process; used by one thread at a time (the pool hands it out)."""

    def __init__(self, limits: TemplateLimits) -> None:
        self.limits = limits
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "deltaserve.server.template_worker", str(limits.memory_bytes),
             str(limits.max_chars)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env={**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"})
        self.ready = False

    def render(self, job: dict[str, Any]) -> dict[str, Any]:
        if not self.ready:
            self._read(time.monotonic() + _START_TIMEOUT_S, "start")
            self.ready = True
        try:
            write_message(self.proc.stdin, job)  # type: ignore[arg-type]
        except (BrokenPipeError, OSError):
            raise TemplateRenderError("internal", "the template worker exited") from None
        return self._read(time.monotonic() + self.limits.timeout, "render")

    def _read(self, deadline: float, what: str) -> dict[str, Any]:
        fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
        head = _read_exact(fd, _HEADER.size, deadline, what)
        (size,) = _HEADER.unpack(head)
        return json.loads(_read_exact(fd, size, deadline, what))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:  # a job left in stdin's buffer by a failed write: closing flushes it again
                    pass


def _read_exact(fd: int, n: int, deadline: float, what: str) -> bytes:
    chunks, got = [], 0
    while got < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            raise TemplateRenderError("timeout", f"the template worker did not answer ({what})")
        chunk = os.read(fd, n - got)
        if not chunk:
            raise TemplateRenderError("memory" if what == "render" else "internal",
                                      "the chat template worker died (out of its memory bound, or crashed)")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


class TemplateRenderer:
    """A pool of render workers. `render` blocks (call it from a worker thread); `render_async` from the loop."""

    def __init__(self, limits: TemplateLimits) -> None:
        self.limits = limits
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._all: list[_Worker] = []
        self._lock = threading.Lock()
        self._started = False
        self._slots: asyncio.Semaphore | None = None

    def start(self) -> None:
        """Start the workers now (they import in the background); otherwise the first render starts them."""
        with self._lock:
            if self._started:
                return
            self._started = True
            for _ in range(self.limits.workers):
                self._add_worker()

    def _add_worker(self) -> None:
        worker = _Worker(self.limits)
        self._all.append(worker)
        self._idle.put(worker)

    def render(self, template: str, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None,
               add_generation_prompt: bool, kwargs: dict[str, Any]) -> str:
        self.start()
        job = {"template": template, "messages": messages, "tools": tools,
               "add_generation_prompt": add_generation_prompt, "kwargs": kwargs}
        worker = self._idle.get()
        if worker.proc.poll() is not None:  # it died while idle (the OOM killer, a signal): a fresh one takes the job
            worker = self._respawn(worker)
        try:
            reply = worker.render(job)
        except TemplateRenderError as e:
            self._replace(worker)
            worker = None
            if e.kind == "timeout":
                raise TemplateRenderError("timeout", f"rendering the chat template took longer than "
                                          f"{self.limits.timeout:g} s (the server's --chat-template-timeout)") from None
            raise
        finally:
            if worker is not None:
                self._idle.put(worker)
        if "ok" in reply:
            return reply["ok"]
        raise TemplateRenderError(reply.get("error", "internal"), reply.get("message", "unknown error"))

    async def render_async(self, template: str, messages: list[dict[str, Any]], *,
                           tools: list[dict[str, Any]] | None, add_generation_prompt: bool,
                           kwargs: dict[str, Any]) -> str:
        # At most one waiting thread per worker: the rest wait here, on the loop, not in the thread pool.
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.limits.workers)
        async with self._slots:
            return await asyncio.to_thread(self.render, template, messages, tools=tools,
                                           add_generation_prompt=add_generation_prompt, kwargs=kwargs)

    def _replace(self, worker: _Worker) -> None:
        self._idle.put(self._respawn(worker))

    def _respawn(self, worker: _Worker) -> _Worker:
        """A fresh worker in place of `worker` (closed), not yet idle."""
        worker.close()
        fresh = _Worker(self.limits)
        with self._lock:
            self._all.remove(worker)
            self._all.append(fresh)
        return fresh

    def close(self) -> None:
        with self._lock:
            for worker in self._all:
                worker.close()
            self._all.clear()
            self._idle = queue.Queue()
            self._started = False
