"""The step trace (`--step-trace FILE`): one JSON line per engine step, written when the step's tokens are collected,
so that served time can be split into what the device computes, what it waits for and what the host spends.

Each line holds:
  step          the step's number (0 first)
  t_ms          host clock when the step was scheduled, ms since the trace opened
  schedule_ms   host: scheduling the step and building its input
  launch_ms     host: launching it (a CUDA graph replay, or the whole model from Python)
  wait_ms       host: blocked in collect, waiting for the step's tokens
  device_ms     device (CUDA): from the step's start to the tokens the host waited for (with MTP and no step budget
                the drafting after them is not included); null elsewhere or when the step sampled nothing
  idle_ms       device (CUDA): between the end of the previous step (its drafts included) and this step's start: time
                the GPU had nothing queued, host work the overlap did not hide; null for the first step of a run
  graph         whether the step replayed a CUDA graph
  rows, decode_rows, verify_rows, prefill_tokens
  prefill       [request id, new tokens, tokens computed before] of each prompt chunk in the step

`benchmarks/step_trace.py FILE` summarizes a trace by step kind. The file is line-buffered: a server that is killed
leaves every finished step's line.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TextIO

from deltaserve.config.common import ConfigError
from deltaserve.engine.runner import LaunchedStep, StepResult
from deltaserve.engine.scheduler import SchedulerOutput


@dataclass(frozen=True)
class HostTimes:
    """Host clock marks of one step, carried from its launch to its collection."""

    start: float            # time.perf_counter() before scheduling
    schedule_ms: float      # scheduling + building the step input
    launch_ms: float        # runner.launch
    graph: bool | None = None  # whether it replays a CUDA graph (asked only while a trace is on)


class StepTrace:
    """Writes the step trace; one per engine, closed by the engine's shutdown."""

    def __init__(self, path: str) -> None:
        try:
            self._file: TextIO = open(path, "w", buffering=1)  # noqa: SIM115 (closed by close())
        except OSError as e:
            raise ConfigError(f"'step_trace' is {path!r}, which cannot be opened for writing ({e.strerror}); give a "
                              "file path in a writable directory") from None
        self._origin = time.perf_counter()
        self._count = 0
        self._last_end = None  # the previous step's end event (CUDA), for idle_ms

    def record(self, out: SchedulerOutput, launched: LaunchedStep, result: StepResult, host: HostTimes,
               wait_ms: float) -> None:
        chunks = [s for s in out.scheduled if s.num_computed_tokens < s.request.num_prompt_tokens]
        line = {
            "step": self._count,
            "t_ms": round((host.start - self._origin) * 1e3, 3),
            "schedule_ms": round(host.schedule_ms, 3),
            "launch_ms": round(host.launch_ms, 3),
            "wait_ms": round(wait_ms, 3),
            "device_ms": _round(result.device_ms),
            "idle_ms": _round(self._idle_ms(launched)),
            "graph": host.graph,
            "rows": len(out.scheduled),
            "decode_rows": len(out.scheduled) - len(chunks),
            "verify_rows": launched.step.num_verify_rows if launched.step.is_verify else 0,
            "prefill_tokens": sum(s.num_new_tokens for s in chunks),
            "prefill": [[s.request_id, s.num_new_tokens, s.num_computed_tokens] for s in chunks],
        }
        self._file.write(json.dumps(line) + "\n")
        self._count += 1

    def _idle_ms(self, launched: LaunchedStep) -> float | None:
        """Device time between the previous step's end and this one's start; both events are complete (this step's
        tokens were waited for, and both precede them on the stream)."""
        previous, self._last_end = self._last_end, launched.ready if launched.started is not None else None
        if previous is None or launched.started is None:
            return None
        return previous.elapsed_time(launched.started)

    def close(self) -> None:
        self._file.close()


def _round(ms: float | None) -> float | None:
    return None if ms is None else round(ms, 3)
