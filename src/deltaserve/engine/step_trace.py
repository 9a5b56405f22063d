"""The step trace (`--step-trace FILE`): one JSON line per launched engine step, so that served time can be split into
what the device computes, how long it sits idle between steps, and what the host spends.

Each line holds:
  step          the step's number among launched steps (0 first)
  t_ms          host clock when the step was scheduled, ms since the trace opened
  schedule_ms   host: scheduling the step and building its input
  launch_ms     host: runner.launch (a CUDA graph replay, or the whole model from Python); the server's streaming
                callback, run before a launch that is not a replay, is in neither
  wait_ms       host: blocked collecting the step's tokens; null when they were never collected (a failed step)
  device_ms     CUDA: from the step's first kernel to its last (sampling and MTP drafting included)
  idle_ms       CUDA: between the previous step's end and this step's start, time the GPU had nothing of the engine's
                queued; null for the first step after the engine was idle (no request) or after a failed launch
  graph         whether the step replayed a CUDA graph
  rows, decode_rows, verify_rows (rows carrying MTP drafts), prefill_tokens
  prefill       [request id, new tokens, tokens computed before] of each prompt chunk (or preempted request's
                recomputation) in the step

Lines are written once the step's GPU work has finished and its tokens were collected, without making the host
wait for either (a step's line may come a step later); when the engine runs out of requests, and on shutdown, every
pending line is written. `benchmarks/step_trace.py FILE` summarizes a trace by step kind.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from deltaserve.config.common import ConfigError
from deltaserve.engine.scheduler import SchedulerOutput

log = logging.getLogger(__name__)


@dataclass
class StepMarks:
    """Host clock marks of one step, carried from its launch to its collection; with a trace, also its line and
    CUDA events until the line is written."""

    start: float                 # time.perf_counter() before scheduling
    schedule_ms: float = 0.0     # scheduling + building the step input
    launch_ms: float = 0.0       # runner.launch
    graph: bool | None = None    # whether it replays a CUDA graph (asked when a trace or a streaming callback needs it)
    line: dict[str, Any] = field(default_factory=dict)
    events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None  # (start, end) on the engine's stream
    collected: bool = False


class StepTrace:
    """Writes the step trace; one per engine. The engine calls before_launch / after_launch around each launch,
    collected once the step's tokens are in (or will never come), and drained when it has no request left."""

    def __init__(self, path: str) -> None:
        try:
            self._file = open(path, "w", buffering=1)  # line-buffered: a killed server keeps every written line
        except OSError as e:
            raise ConfigError(f"'step_trace' is {path!r}, which cannot be opened for writing ({e.strerror}); give a "
                              "file path in a writable directory") from None
        self._path = path
        self._stream: torch.cuda.Stream | None = None  # set by bind()
        self._origin = time.perf_counter()
        self._count = 0
        self._pending: deque[StepMarks | None] = deque()  # None: a failed launch (the idle chain restarts)
        self._last_end: torch.cuda.Event | None = None

    def bind(self, device: torch.device) -> None:
        """The device the engine's steps run on (the file is opened before the model loads, so that a path that
        cannot be written fails first); on CUDA, steps are timed on its current stream."""
        self._stream = torch.cuda.current_stream(device) if device.type == "cuda" else None

    def before_launch(self, marks: StepMarks) -> None:
        if self._stream is not None:
            marks.events = (_record(self._stream), None)  # type: ignore[assignment]

    def after_launch(self, out: SchedulerOutput, marks: StepMarks) -> None:
        """The step's work is all queued (a constrained step's sampling too): mark its end, queue its line."""
        if marks.events is not None:
            marks.events = (marks.events[0], _record(self._stream))
        chunks = [s for s in out.scheduled if s.num_computed_tokens < s.request.num_prompt_tokens
                  or s.num_new_tokens > 1 + len(s.draft_token_ids)]
        marks.line = {
            "step": self._count,
            "t_ms": round((marks.start - self._origin) * 1e3, 3),
            "schedule_ms": round(marks.schedule_ms, 3),
            "launch_ms": round(marks.launch_ms, 3),
            "wait_ms": None, "device_ms": None, "idle_ms": None,
            "graph": marks.graph,
            "rows": len(out.scheduled),
            "decode_rows": len(out.scheduled) - len(chunks),
            "verify_rows": sum(1 for s in out.scheduled if s.draft_token_ids),
            "prefill_tokens": sum(s.num_new_tokens for s in chunks),
            "prefill": [[s.request_id, s.num_new_tokens, s.num_computed_tokens] for s in chunks],
        }
        self._count += 1
        self._pending.append(marks)

    def launch_failed(self) -> None:
        self._pending.append(None)

    def collected(self, marks: StepMarks, wait_ms: float | None) -> None:
        marks.line["wait_ms"] = None if wait_ms is None else round(wait_ms, 3)
        marks.collected = True
        self._flush(wait=False)

    def drained(self) -> None:
        """No request left: write every pending line (waiting for the GPU if need be); the next step's idle time
        would be the time without requests, so it is not counted."""
        self._flush(wait=True)
        self._last_end = None

    def close(self) -> None:
        self.drained()
        if self._file is not None:
            self._file.close()
            self._file = None

    def _flush(self, wait: bool) -> None:
        while self._pending:
            marks = self._pending[0]
            if marks is not None:
                end = marks.events[1] if marks.events is not None else None
                if not wait and (not marks.collected or (end is not None and not end.query())):
                    return
                if wait and end is not None:
                    end.synchronize()
                self._write(marks)
            else:
                self._last_end = None
            self._pending.popleft()

    def _write(self, marks: StepMarks) -> None:
        line = marks.line
        if marks.events is not None:
            start, end = marks.events
            line["device_ms"] = round(start.elapsed_time(end), 3)
            if self._last_end is not None:
                line["idle_ms"] = round(self._last_end.elapsed_time(start), 3)
            self._last_end = end
        if self._file is None:
            return
        try:
            self._file.write(json.dumps(line) + "\n")
        except OSError as e:  # a full disk must not fail the step whose tokens are in hand: stop tracing instead
            log.warning("step trace %s: writing failed (%s); tracing stops", self._path, e)
            self._file = None


def _record(stream: torch.cuda.Stream) -> torch.cuda.Event:
    event = torch.cuda.Event(enable_timing=True)
    event.record(stream)
    return event
