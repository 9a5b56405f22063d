"""The step trace (--step-trace): one line per step with the step's rows and prompt chunks, outputs unchanged by it,
a clear error for a path it cannot open, a write error that stops the trace and not the engine, and
benchmarks/step_trace.py's summary of it; on a GPU (`-m gpu`), device and idle times with and without MTP."""

from __future__ import annotations

import json
import logging
import statistics
import time

import pytest

from benchmarks import step_trace as summary
from deltaserve import LLM, SamplingParams
from deltaserve.config import ConfigError
from tests.models.factory import TinySpec, save_servable_checkpoint

PROMPTS = [list(range(10, 50)), list(range(60, 69))]  # 40 and 9 tokens, in steps of at most 16
GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("step_trace")
    save_servable_checkpoint(TinySpec("step_trace", extra={"vocab_size": 320}), path)
    return str(path)


def generate(model_dir: str, llm: LLM | None = None, **options) -> list[list[int]]:
    options = {"dtype": "float32", "device": "cpu", "max_num_batched_tokens": 16, **options}
    llm = llm or LLM(model_dir, max_model_len=64, **options)
    return [list(o.outputs[0].token_ids) for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)]


def read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "async"])
def test_trace_has_a_line_per_step_and_changes_nothing(model_dir, tmp_path, overlap):
    path = tmp_path / "trace.jsonl"
    plain = generate(model_dir, async_scheduling=overlap)
    assert generate(model_dir, async_scheduling=overlap, step_trace=str(path)) == plain
    steps = read(path)
    assert [s["step"] for s in steps] == list(range(len(steps)))
    assert all(s["t_ms"] <= t["t_ms"] for s, t in zip(steps, steps[1:]))
    chunks: dict[str, list[tuple[int, int]]] = {}
    for s in steps:
        assert s["prefill_tokens"] == sum(new for _, new, _ in s["prefill"])
        assert s["prefill_tokens"] + s["decode_rows"] <= 16
        assert s["verify_rows"] == 0
        assert s["device_ms"] is None and s["idle_ms"] is None and s["graph"] is False  # CPU: no events, no graphs
        assert min(s["schedule_ms"], s["launch_ms"], s["wait_ms"]) >= 0
        for rid, new, computed in s["prefill"]:
            chunks.setdefault(rid, []).append((computed, new))
    # each prompt's chunks cover it once, in order; the 40-token prompt took three (16 + 16 + 8, the 9-token one
    # beside its last: 8 + 1)
    for c in chunks.values():
        assert [computed for computed, _ in c] == [sum(n for _, n in c[:i]) for i in range(len(c))]
    assert sorted((sum(n for _, n in c), len(c)) for c in chunks.values()) == [(9, 2), (40, 3)]
    # each request's three decode steps after its prompt (the fourth token comes from the last chunk)
    assert sum(s["decode_rows"] for s in steps) == 2 * 3


def test_summary_of_a_trace(model_dir, tmp_path, monkeypatch, capsys):
    path = tmp_path / "trace.jsonl"
    generate(model_dir, step_trace=str(path))
    monkeypatch.setattr("sys.argv", ["step_trace.py", str(path)])
    summary.main()
    out = capsys.readouterr().out
    rows = {line.split(" | ")[0].strip("| "): line for line in out.splitlines() if line.startswith("| ")}
    assert {"prefill", "decode"} <= set(rows) <= set(summary.KINDS) | {"kind", "---"}
    assert "2 prompts: chunks per prompt mean 2.50 (max 3)" in out
    assert "| request |" not in out  # the per-prompt rows only with --prompts
    monkeypatch.setattr("sys.argv", ["step_trace.py", str(path), "--prompts"])
    summary.main()
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| 0 |")
            or line.startswith("| 1 |")]
    # (prompt tokens, chunks, steps from the first chunk to the last): 16 + 16 + 8 beside 8 + 1, as above
    assert sorted((int(r[1]), int(r[2]), int(r[3])) for r in rows) == [(9, 2, 2), (40, 3, 3)]
    assert all(float(r[4]) >= float(r[7].rstrip(" |")) > 0 and r[5] == r[6] == "" for r in rows)  # CPU: no events
    monkeypatch.setattr("sys.argv", ["step_trace.py", str(path), "--from-step", "10000"])
    with pytest.raises(SystemExit, match="no steps between 10000"):
        summary.main()


def test_summary_counts_launch_bound_steps(tmp_path):
    """A step whose launch took at least 0.9 of its device time counts as launch-bound; CPU steps (no device time)
    never do."""
    def step(i, launch, device, prefill=0):
        return dict(step=i, t_ms=10.0 * i, schedule_ms=0.1, launch_ms=launch, wait_ms=0.0, device_ms=device,
                    idle_ms=0.0, graph=False, rows=1, decode_rows=0 if prefill else 1, verify_rows=0,
                    prefill_tokens=prefill, prefill=[["a", prefill, 0]] if prefill else [])
    steps = [step(0, 95.0, 100.0, 8191), step(1, 60.0, 100.0, 8191), step(2, 1.0, 3.0), step(3, 5.0, None)]
    rows = {line.split(" | ")[0].strip("| "): line for line in summary.kinds_table(steps)}
    assert "launch-bound" in rows["kind"]
    assert rows["prefill"].endswith("| 1/2 |") and rows["decode"].endswith("| 0/2 |")


def test_a_write_error_stops_the_trace_not_the_engine(model_dir, tmp_path, monkeypatch, caplog):
    path = tmp_path / "trace.jsonl"
    llm = LLM(model_dir, dtype="float32", device="cpu", max_model_len=64, max_num_batched_tokens=16,
              step_trace=str(path))
    want = generate(model_dir, llm)
    lines = len(read(path))
    trace = llm.engine.trace

    def full(text):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trace._file, "write", full)
    with caplog.at_level(logging.WARNING):
        assert generate(model_dir, llm) == want
    assert "writing failed ([Errno 28] No space left on device); tracing stops" in caplog.text
    assert len(read(path)) == lines
    llm.engine.shutdown()  # closes the trace; the engine still serves
    assert not llm.engine.trace.enabled and generate(model_dir, llm) == want


def test_unwritable_trace_path_fails_before_the_model_loads(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("deltaserve.engine.engine.build_runner", lambda *a, **k: pytest.fail("the model loaded"))
    missing = tmp_path / "no" / "such" / "dir" / "trace.jsonl"
    with pytest.raises(ConfigError, match=r"'step_trace' is .*trace\.jsonl', which cannot be opened for writing \(No "
                       r"such file or directory\); give a file path in a writable directory"):
        LLM(model_dir, device="cpu", step_trace=str(missing))
    with pytest.raises(ConfigError, match="'step_trace' is ''; give the path of a file"):
        LLM(model_dir, device="cpu", step_trace="")


@pytest.mark.gpu
@pytest.mark.parametrize("mtp", [False, True], ids=["async", "mtp"])
def test_device_and_idle_times_on_gpu(tmp_path_factory, tmp_path, mtp):
    path = tmp_path_factory.mktemp("step_trace_gpu")
    save_servable_checkpoint(TinySpec("step_trace_gpu", extra={"vocab_size": 320}, mtp=mtp), path)
    trace = tmp_path / "trace.jsonl"
    llm = LLM(str(path), dtype="bfloat16", device="cuda", max_model_len=64, max_num_batched_tokens=16,
              gpu_memory_utilization=0.3, speculative_tokens=2 if mtp else 0, step_trace=str(trace))
    generate(str(path), llm)
    first_batch = len(read(trace))  # every line is written once the engine runs out of requests
    generate(str(path), llm)
    llm.engine.shutdown()
    steps = read(trace)
    assert first_batch and all(s["device_ms"] > 0 and s["wait_ms"] >= 0 for s in steps)
    # idle: null for the first step after the engine was without requests, >= 0 for the others
    assert [i for i, s in enumerate(steps) if s["idle_ms"] is None] == [0, first_batch]
    assert all(s["idle_ms"] >= 0 for i, s in enumerate(steps) if i not in (0, first_batch))
    assert any(s["graph"] for s in steps) and any(s["verify_rows"] for s in steps) == mtp


class ClockEvent:
    """Stands in for a CUDA event on a CPU-only machine: a time on a made-up device clock, done once `done` is set
    (what the trace's event logic reads: query, synchronize, elapsed_time); the GPU test above runs real ones."""

    def __init__(self, t: float, done: bool = True) -> None:
        self.t, self.done, self.waited = t, done, False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited = self.done = True

    def elapsed_time(self, other: ClockEvent) -> float:
        assert self.done and other.done
        return other.t - self.t


def test_lines_wait_for_the_gpu_and_idle_restarts_after_a_failure_or_a_drain(tmp_path, monkeypatch):
    from deltaserve.engine import step_trace as st

    path = tmp_path / "trace.jsonl"
    trace = st.StepTrace(str(path))
    trace._device = object()  # as bind() on CUDA: events are recorded
    clock: list[ClockEvent] = []

    def step(start: float, end: float, done: bool = True) -> st.StepMarks:
        marks = st.StepMarks(0.0)
        clock[:] = [ClockEvent(start), ClockEvent(end, done)]
        monkeypatch.setattr(st, "_record", lambda device: clock.pop(0))
        trace.before_launch(marks)
        trace.after_launch(st.SchedulerOutput(scheduled=(), preempted=(), num_batched_tokens=0), marks)
        return marks

    a = step(0, 5)
    trace.collected(a, 0.5)
    b = step(7, 9, done=False)  # launched; its GPU work not finished when its tokens are collected
    trace.collected(b, 0.1)
    assert len(read(path)) == 1  # a only: b's line waits for its end, without waiting on it
    c = step(9.5, 12)
    b.end_event.done = True
    trace.collected(c, 0.2)
    trace.gap()
    d = step(20, 21)
    trace.collected(d, 0.3)
    e = step(30, 31, done=False)  # never collected: the drain writes it anyway, waiting for its end
    trace.drained()
    f = step(50, 52)
    trace.collected(f, None)  # its tokens never came (a failed step)
    trace.close()
    lines = read(path)
    assert [(s["step"], s["device_ms"], s["idle_ms"], s["wait_ms"]) for s in lines] == [
        (0, 5, None, 0.5), (1, 2, 2, 0.1), (2, 2.5, 0.5, 0.2),
        (3, 1, None, 0.3),  # after a failed launch: no idle (the failed step's work is not idle)
        (4, 1, 9, None),
        (5, 2, None, None)]  # after the drain: the time without requests is not idle
    assert e.end_event.waited and not a.end_event.waited


def test_a_cuda_error_in_the_events_stops_the_trace(tmp_path, monkeypatch, caplog):
    from deltaserve.engine import step_trace as st

    class Broken(ClockEvent):
        def query(self) -> bool:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    trace = st.StepTrace(str(tmp_path / "trace.jsonl"))
    trace._device = object()
    events = [ClockEvent(0), Broken(1)]
    monkeypatch.setattr(st, "_record", lambda device: events.pop(0))
    marks = st.StepMarks(0.0)
    trace.before_launch(marks)
    trace.after_launch(st.SchedulerOutput(scheduled=(), preempted=(), num_batched_tokens=0), marks)
    with caplog.at_level(logging.WARNING):
        trace.collected(marks, 0.1)  # does not raise: the engine goes on to fail the step
    assert "reading a step's events failed (CUDA error: an illegal memory access" in caplog.text
    trace.before_launch(st.StepMarks(0.0))  # stopped: records nothing more
    trace.close()
    assert read(tmp_path / "trace.jsonl") == [] and events == []


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "async"])
def test_engine_times_each_step_from_its_launch_to_its_last_queued_work(model_dir, tmp_path, monkeypatch, overlap):
    """With events on the host clock (on CPU a launch runs the whole step), a step's device time is its launch's
    time, not the host work after it (the previous step's outputs, slowed here), which shows as idle time before the
    next step; and an abort of the last request restarts the idle chain as the engine's draining does."""
    from deltaserve.engine import step_trace as st

    monkeypatch.setattr(st, "_record", lambda device: ClockEvent(time.perf_counter() * 1e3))
    path = tmp_path / "trace.jsonl"
    llm = LLM(model_dir, dtype="float32", device="cpu", max_model_len=64, max_num_batched_tokens=16,
              async_scheduling=overlap, step_trace=str(path))
    llm.engine.trace._device = object()
    on_tokens = llm.engine.outputs.on_tokens

    calls = []

    def slow_outputs(*args, **kwargs):  # host work on a step's tokens (detokenizing, stop checks) of 2 ms
        calls.append(time.sleep(0.002))
        return on_tokens(*args, **kwargs)

    monkeypatch.setattr(llm.engine.outputs, "on_tokens", slow_outputs)
    generate(model_dir, llm)
    first = len(read(path))  # every line is written when the engine runs out of requests
    engine, params = llm.engine, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    engine.add_request("aborted", PROMPTS[1], params)
    for _ in range(3):
        engine.step()
    engine.abort_request("aborted")  # the last request: the engine has drained
    second = len(read(path))
    generate(model_dir, llm)
    engine.shutdown()
    steps = read(path)
    assert second - first == 3 and len(steps) > second
    extra = [s["device_ms"] - s["launch_ms"] for s in steps]
    assert statistics.median(extra) < 0.5 and min(extra) >= 0
    # async: the previous step's outputs are made after this step's launch, while the GPU would run it; sync: after
    # its own tokens, before the next launch. Either way their 2 ms fall between two steps' events, as idle time
    # (but for the last step's before each drain)
    assert sum(s["idle_ms"] or 0 for s in steps) >= 0.6 * 2 * len(calls)
    assert [i for i, s in enumerate(steps) if s["idle_ms"] is None] == [0, first, second]
    assert all(s["idle_ms"] >= 0 for s in steps if s["idle_ms"] is not None)
