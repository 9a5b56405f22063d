"""The benchmark scripts' plumbing on a tiny shape (CPU): they must not be first run on scarce GPU time."""

from __future__ import annotations

from benchmarks import bench_e2e
from benchmarks.common import table


def test_e2e_plumbing_on_a_tiny_shape():
    prompts = [[5 + i + j for j in range(24)] for i in range(3)]
    ours = bench_e2e.run_deltaserve("tiny", prompts, 6)
    hf, _ = bench_e2e.run_transformers("tiny", prompts, 6)
    ceiling = bench_e2e.ceiling_tok_s("tiny", 3, 24, 6, bw=3e12, rate=7e14)
    assert ours > 0 and hf > 0 and ceiling > 0
    out = table([{"engine": "deltaserve", "tok/s": ours}, {"engine": "hf", "tok/s": hf}])
    assert "deltaserve" in out and "hf" in out


def test_profile_engine_plumbing_without_the_model(monkeypatch, capsys):
    from benchmarks import profile_engine

    monkeypatch.setattr("sys.argv", ["profile_engine.py", "--model", "tiny", "--num-prompts", "3", "--input-len", "8",
                                     "--output-len", "4", "--no-model"])
    profile_engine.main()
    out = capsys.readouterr().out
    assert "engine host time without the model" in out and "Triton compiles during it: 0" in out


def test_batch_build_plumbing(monkeypatch, capsys):
    from benchmarks import bench_batch_build

    monkeypatch.setattr("sys.argv", ["bench_batch_build.py", "--batch", "4", "--contexts", "40", "--reps", "3"])
    bench_batch_build.main()
    assert "per-slot tables us" in capsys.readouterr().out


def test_structured_bench_plumbing(monkeypatch, capsys):
    from benchmarks import bench_structured

    monkeypatch.setattr("sys.argv", ["bench_structured.py", "--batch", "8", "--constrained", "4", "--context", "32",
                                     "--steps", "2"])
    bench_structured.main()
    out = capsys.readouterr().out
    assert "4/8 constrained" in out and "mask upload + apply alone" in out
