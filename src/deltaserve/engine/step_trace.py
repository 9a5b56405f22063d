"""The step trace (`--step-trace FILE`): one JSON line per launched engine step, so that served time can be split into
what the device computes, how long it sits idle between steps, and what the host spends. Under tensor parallelism the
device times are rank 0's.

Each line holds:
  step          the step's number among launched steps (0 first)
  t_ms          host clock when the step was scheduled, ms since the trace opened
  schedule_ms   host: scheduling the step and building its input
  launch_ms     host: runner.launch (a CUDA graph replay, or the whole model from Python); the server's streaming
                callback, run before a launch that is not a replay, is in neither this field nor schedule_ms
  wait_ms       host: blocked collecting the step's tokens; null when they were never collected (a failed step)
  device_ms     CUDA: from the step's start to its end on the stream: its kernels, sampling and MTP drafting (for a
                step with constrained rows, also the GPU's wait for the host's grammar masks)
  idle_ms       CUDA: between the previous step's end and this step's start, time the GPU had no step of the
                engine's queued (copies the engine queues between steps count here); null for the first step after the
                engine ran out of requests, or after a failed launch
  graph         whether the step replayed a CUDA graph
  rows, decode_rows, verify_rows (rows carrying MTP drafts, placeholders included), prefill_tokens
  prefill       [request id, new tokens, tokens computed before] of each prompt chunk (or preempted request's
                recomputation) in the step

Lines are written in step order, each once its step's GPU work has finished and its tokens were collected, without
making the host wait for either (so a line may come a step or two late); when the engine runs out of requests, and on
shutdown, every pending line is written. A write error, or a CUDA error met while reading the events, stops the trace
(with a warning), never the engine. `benchmarks/step_trace.py FILE` summarizes a trace by step kind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, TextIO

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
    start_event: torch.cuda.Event | None = None
    end_event: torch.cuda.Event | None = None
    collected: bool = False


class NoTrace:
    """What the engine holds without --step-trace: every call does nothing."""

    enabled = False

    def bind(self, device: torch.device) -> None: ...
    def before_launch(self, marks: StepMarks) -> None: ...
    def end(self, marks: StepMarks) -> None: ...
    def after_launch(self, out: SchedulerOutput, marks: StepMarks) -> None: ...
    def gap(self) -> None: ...
    def collected(self, marks: StepMarks, wait_ms: float | None) -> None: ...
    def drained(self) -> None: ...
    def close(self) -> None: ...


class StepTrace(NoTrace):
    """Writes the step trace; one per engine. Around each launch the engine calls before_launch, end (once the
    step's work is all queued: right after the launch, or after a constrained step's sampling) and after_launch;
    collected once the step's tokens are in (or will never come); gap after a failed launch; drained when it has no
    request left."""

    enabled = True

    def __init__(self, path: str) -> None:
        try:
            self._file: TextIO | None = open(path, "w", buffering=1)  # line-buffered: a killed server keeps its lines
        except OSError as e:
            raise ConfigError(f"'step_trace' is {path!r}, which cannot be opened for writing ({e.strerror}); give a "
                              "file path in a writable directory") from None
        self._path = path
        self._device: torch.device | None = None  # set by bind(): CUDA events on its current stream
        self._origin = time.perf_counter()
        self._count = 0
        self._pending: deque[StepMarks | None] = deque()  # None: a gap (the idle chain restarts)
        self._last_end: torch.cuda.Event | None = None

    def bind(self, device: torch.device) -> None:
        """The device the engine's steps run on (the file is opened before the model loads, so that a path that
        cannot be written fails first)."""
        self._device = device if device.type == "cuda" else None

    def before_launch(self, marks: StepMarks) -> None:
        if self._device is not None and self._file is not None:
            marks.start_event = _record(self._device)

    def end(self, marks: StepMarks) -> None:
        if marks.start_event is not None and marks.end_event is None:
            marks.end_event = _record(self._device)

    def after_launch(self, out: SchedulerOutput, marks: StepMarks) -> None:
        """Queue the step's line (written once its end has passed and its tokens are collected)."""
        if self._file is None:
            return
        self.end(marks)
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

    def gap(self) -> None:
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
        self._stop()

    def _flush(self, wait: bool) -> None:
        try:
            while self._pending:
                marks = self._pending[0]
                if marks is None:
                    self._last_end = None
                elif not self._ready(marks, wait):
                    return
                else:
                    self._write(marks)
                    if self._file is None:  # the write failed: _stop dropped what was pending
                        return
                self._pending.popleft()
        except RuntimeError as e:  # a CUDA error of the step's kernels: the engine fails the step, the trace stops
            log.warning("step trace %s: reading a step's events failed (%s); tracing stops", self._path, e)
            self._stop()

    def _ready(self, marks: StepMarks, wait: bool) -> bool:
        end = marks.end_event
        if wait:
            if end is not None:
                end.synchronize()
            return True
        return marks.collected and (end is None or end.query())

    def _write(self, marks: StepMarks) -> None:
        line = marks.line
        if marks.end_event is not None:
            line["device_ms"] = round(marks.start_event.elapsed_time(marks.end_event), 3)
            if self._last_end is not None:
                line["idle_ms"] = round(self._last_end.elapsed_time(marks.start_event), 3)
            self._last_end = marks.end_event
        try:
            self._file.write(json.dumps(line) + "\n")
        except OSError as e:  # a full disk must not fail the step whose tokens are in hand: stop tracing instead
            log.warning("step trace %s: writing failed (%s); tracing stops", self._path, e)
            self._stop()

    def _stop(self) -> None:
        """No more lines: close the file (quietly: it may be what failed) and drop what is pending."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
        self._file = None
        self._pending.clear()
        self._last_end = None


def _record(device: torch.device) -> torch.cuda.Event:
    event = torch.cuda.Event(enable_timing=True)
    event.record(torch.cuda.current_stream(device))  # the stream the runner launches on, read at each record
    return event
