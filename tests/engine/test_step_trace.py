"""The step trace (--step-trace): one line per step with the step's rows and prompt chunks, outputs unchanged by it,
a clear error for a path it cannot write, and benchmarks/step_trace.py's summary of it."""

from __future__ import annotations

import json

import pytest

from benchmarks import step_trace as summary
from deltaserve import LLM, SamplingParams
from deltaserve.config import ConfigError
from deltaserve.demo import write_byte_tokenizer
from tests.models.factory import TinySpec, save_checkpoint

PROMPTS = [list(range(10, 50)), list(range(60, 69))]  # 40 and 9 tokens, in steps of at most 16
GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("step_trace")
    save_checkpoint(TinySpec("step_trace", extra={"vocab_size": 320}), path)
    write_byte_tokenizer(path)
    return str(path)


def generate(model_dir: str, **options) -> list[list[int]]:
    llm = LLM(model_dir, dtype="float32", device="cpu", max_model_len=64, max_num_batched_tokens=16, **options)
    return [list(o.outputs[0].token_ids) for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)]


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "async"])
def test_trace_has_a_line_per_step_and_changes_nothing(model_dir, tmp_path, overlap):
    path = tmp_path / "trace.jsonl"
    plain = generate(model_dir, async_scheduling=overlap)
    assert generate(model_dir, async_scheduling=overlap, step_trace=str(path)) == plain
    steps = [json.loads(line) for line in path.read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(len(steps)))
    assert all(s["t_ms"] <= t["t_ms"] for s, t in zip(steps, steps[1:]))
    chunks: dict[str, list[tuple[int, int]]] = {}
    for s in steps:
        assert s["prefill_tokens"] == sum(new for _, new, _ in s["prefill"]) <= 16 + s["decode_rows"]
        assert s["rows"] == s["decode_rows"] + len(s["prefill"]) and s["verify_rows"] == 0
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
    monkeypatch.setattr("sys.argv", ["step_trace.py", str(path), "--from-step", "10000"])
    with pytest.raises(SystemExit, match="no steps between 10000"):
        summary.main()


def test_unwritable_trace_path_fails_before_the_model_loads(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("deltaserve.engine.engine.build_runner", lambda *a, **k: pytest.fail("the model loaded"))
    missing = tmp_path / "no" / "such" / "dir" / "trace.jsonl"
    with pytest.raises(ConfigError, match=r"'step_trace' is .*trace\.jsonl', which cannot be opened for writing \(No "
                       r"such file or directory\); give a file path in a writable directory"):
        LLM(model_dir, device="cpu", step_trace=str(missing))
    with pytest.raises(ConfigError, match="'step_trace' is ''; give the path of a file"):
        LLM(model_dir, device="cpu", step_trace="")
