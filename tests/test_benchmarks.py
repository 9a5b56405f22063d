"""The benchmark scripts' plumbing on a tiny shape (CPU): they must not be first run on scarce GPU time."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

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


def test_quant_bench_models_on_a_tiny_shape():
    """bench_quant's dummy quantized models build and run (the timing itself needs CUDA graphs)."""
    import torch

    from benchmarks import bench_quant
    from tests.models.simple_runner import SimpleRunner

    for fmt in ("fp8", "fp8-w8a8", "int4"):
        model = bench_quant.load("tiny", fmt, device="cpu", dtype=torch.float32)
        assert model.model.layers[0].mlp.down_proj.method.name.startswith(fmt[:3])
        assert model.model.layers[0].mlp.down_proj.method.name.endswith("w8a8") == (fmt == "fp8-w8a8")
        assert model.model.layers[0].linear_attn.in_proj.method.name.startswith("split(")
        assert torch.isfinite(SimpleRunner(model).step({0: [1, 2, 3]})[0]).all()
    for fmt, name in (("gptq", "int4 g128"), ("gptq-act-order", "int4 g128 act-order")):  # Qwen's GPTQ layout
        model = bench_quant.load("tiny", fmt, device="cpu", dtype=torch.float32)
        assert model.model.layers[0].mlp.down_proj.method.name == name
        assert model.model.layers[0].linear_attn.in_proj.method.name == "unquantized"
        assert torch.isfinite(SimpleRunner(model).step({0: [1, 2, 3]})[0]).all()


def test_quant_bench_labels_the_gemv_pipeline_that_ran():
    """bench_quant's format column names a GEMV pipeline other than the rule even when it is the only one asked for
    (--gemv-pipeline off), so an 'off' run is not read as the default's."""
    from benchmarks import bench_quant

    assert bench_quant.row_format("int4", "f16x4", ["f16x4"], "off", ["off"]) == "int4 gemv-f16x4 pipeline-off"
    assert bench_quant.row_format("int4", "f16x4", ["f16x4"], "rule", ["rule"]) == "int4 gemv-f16x4"
    assert bench_quant.row_format("fp8", "f16", ["f16"], "rule", ["off", "rule"]) == "fp8 gemv-f16 pipeline-rule"
    assert bench_quant.row_format("bf16", "", [""], "rule", ["rule"]) == "bf16"


def test_bench_quant_runs_gemv_pipelines_only_where_the_gemv_runs():
    """--gemv-pipeline off rule: both at the GEMV's row counts (int4 up to 2, fp8 1), one default run elsewhere."""
    from benchmarks import bench_quant

    both = ["off", "rule"]
    assert bench_quant.pipelines_for("int4", 2, both) == both and bench_quant.pipelines_for("fp8", 1, both) == both
    assert bench_quant.pipelines_for("int4", 64, both) == ["rule"] == bench_quant.pipelines_for("fp8", 2, both)
    assert bench_quant.pipelines_for("fp8-w8a8", 1, both) == ["rule"] == bench_quant.pipelines_for("bf16", 1, both)


def test_bench_quant_kernels_takes_one_mode_and_gemv_rows(capsys):
    """--sweep, --moe-tiles and --gemv-pipeline are refused together (one would be ignored), and --gemv-pipeline
    without a row count the GEMV runs at (it would print an empty table)."""
    from benchmarks import bench_quant_kernels

    for argv in (["--sweep", "--gemv-pipeline"], ["--moe-tiles", "--sweep"], ["--gemv-pipeline", "--rows", "16"]):
        with pytest.raises(SystemExit) as exit_:
            bench_quant_kernels.parse_args(argv)
        assert exit_.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    assert bench_quant_kernels.parse_args(["--gemv-pipeline", "--rows", "1", "2"]).gemv_pipeline


def test_profile_engine_plumbing_without_the_model(monkeypatch, capsys):
    from benchmarks import profile_engine

    monkeypatch.setattr("sys.argv", ["profile_engine.py", "--model", "tiny", "--num-prompts", "3", "--input-len", "8",
                                     "--output-len", "4", "--no-model"])
    profile_engine.main()
    out = capsys.readouterr().out
    assert "engine host time without the model" in out and "Triton compiles during it: 0" in out


def test_profile_engine_timeline_with_mtp(monkeypatch, capsys):
    """The per-step phase timeline runs through the engine's step (its finish takes the launch time) and gives
    verify steps a kind of their own."""
    from benchmarks import profile_engine

    monkeypatch.setattr("sys.argv", ["profile_engine.py", "--model", "tiny", "--num-prompts", "2", "--input-len", "8",
                                     "--output-len", "12", "--timeline", "--speculative-tokens", "3",
                                     "--simulated-acceptance", "3.39"])
    profile_engine.main()
    out = capsys.readouterr().out
    assert "verify x2 |" in out and "prefill/mixed |" in out
    from types import SimpleNamespace

    mixed = SimpleNamespace(is_verify=True, num_verify_rows=2, num_rows=3, tokens_per_row=None)
    assert profile_engine.StepTimeline.kind(mixed) == "prefill + verify x2"  # not timed as a verify step


def test_batch_build_plumbing(monkeypatch, capsys):
    from benchmarks import bench_batch_build

    monkeypatch.setattr("sys.argv", ["bench_batch_build.py", "--batch", "4", "--contexts", "40", "--reps", "3"])
    bench_batch_build.main()
    assert "per-slot tables us" in capsys.readouterr().out


def test_accuracy_report_on_the_demo_model(tmp_path, capsys):
    """The accuracy report end to end on the bundled demo model at small sizes: every option against the baseline."""
    from benchmarks import bench_accuracy

    out = tmp_path / "table.md"
    rows = bench_accuracy.main(["--num-seqs", "2", "--prompt-len", "16", "--score-len", "8", "--gen-len", "8",
                                "--device", "cpu", "--out", str(out)])
    assert len(rows) == 8 and [(r["kv_cache_dtype"][:4], r["state_dtype"]) for r in rows][:2] == [
        ("auto", "float32"), ("auto", "bfloat16")]
    base = rows[0]
    assert base["mean KL"] == 0 and base["PPL change"] == "+0.00%" and base["greedy identical"] == "2/2"
    by_kv = {r["kv_cache_dtype"]: r for r in rows if r["state_dtype"] == "float32"}
    assert by_kv["int8"]["mean KL"] < by_kv["int4"]["mean KL"] and by_kv["int4"]["KV B/token"] < by_kv["fp8"][
        "KV B/token"] < base["KV B/token"]
    assert out.read_text().startswith("| kv_cache_dtype |") and "| int4 | bfloat16 |" in capsys.readouterr().out


def test_capacity_arithmetic_from_the_planner():
    from benchmarks import capacity

    rows = {(r["model"], r["kv_cache_dtype"], r["state_dtype"]): r for r in capacity.main(["--models", "27B"])}
    base, fp8 = rows[("27B", "auto", "float32")], rows[("27B", "fp8", "float32")]
    assert base["KV MiB/seq"] == 2048 and fp8["KV MiB/seq"] == 2048 * 260 / 512  # 256 values + a 4-byte scale
    assert 25 <= base["sequences"] < fp8["sequences"] < rows[("27B", "int4", "bfloat16")]["sequences"]


def test_capacity_ratio_is_against_auto_float32_even_when_that_fits_none():
    """At 256k tokens on 70 GiB the 27B's bf16 KV fits no sequence and fp8's one: fp8 was reported as 1.0x
    'auto/float32' (the first option that fit any became the base)."""
    from benchmarks import capacity

    rows = {(r["kv_cache_dtype"], r["state_dtype"]): r for r in capacity.main(
        ["--models", "27B", "--memory-gib", "70", "--context", "262144"])}
    assert rows[("auto", "float32")]["sequences"] == 0 and rows[("fp8", "float32")]["sequences"] == 1
    assert rows[("fp8", "float32")]["vs auto/float32"] == float("inf")
    assert rows[("auto", "float32")]["vs auto/float32"] == rows[("auto", "bfloat16")]["vs auto/float32"] == 0.0


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_capacity_is_what_the_engines_plan_holds(prefix_caching):
    """'sequences' is the largest n for which the engine's planner, with --max-num-seqs n, gives n state slots and the
    pages of n full-length sequences: with prefix caching on (the engine's default) after the checkpoints' share of
    the budget, which the count once ignored (27B at 32k, H200: 34 sequences claimed, 30 planned)."""
    from benchmarks import capacity
    from deltaserve.cache.planner import GiB, plan_memory
    from deltaserve.config.engine import CHECKPOINT_FRACTION

    argv = ["--models", "27B", "--context", "32768"] + ([] if prefix_caching else ["--no-prefix-caching"])
    budget = int(143771 / 1024 * GiB * 0.9) - capacity.weight_bytes("27B") - int(3 * GiB)
    pages_per_seq = 32768 // capacity.PAGE

    def holds(row: dict, n: int) -> bool:
        page = round(row["KV MiB/seq"] * 2**20) // pages_per_seq
        plan = plan_memory(budget_bytes=budget, page_bytes=page, slot_bytes=round(row["state MiB/seq"] * 2**20),
                           page_size=capacity.PAGE, max_num_seqs=n, max_model_len=32768,
                           checkpoint_fraction=CHECKPOINT_FRACTION if prefix_caching else 0.0)
        return plan.num_slots >= n and plan.num_pages >= n * pages_per_seq

    for row in capacity.main(argv):
        n = row["sequences"]
        assert n > 0 and holds(row, n) and not holds(row, n + 1), row


def test_structured_bench_plumbing(monkeypatch, capsys):
    from benchmarks import bench_structured

    monkeypatch.setattr("sys.argv", ["bench_structured.py", "--batch", "8", "--constrained", "4", "--context", "32",
                                     "--steps", "2"])
    bench_structured.main()
    out = capsys.readouterr().out
    assert "4/8 constrained" in out and "mask upload + apply alone" in out


def test_mtp_demo_plumbing_on_cpu():
    from benchmarks import bench_mtp

    rows = bench_mtp.main(["--demo", "--device", "cpu", "--max-tokens", "12", "--num-prompts", "1"])
    assert [r["K"] for r in rows] == [0, 1, 2, 3] and all(r["identical to K=0"] == "1/1" for r in rows)
    assert rows[3]["AL"] > 1


def test_mtp_prompt_step_on_cpu():
    """bench_mtp --prompt-step runs the step that admits a prompt beside verify rows (a mixed verify step) on the
    tiny shape: its logits are those of the verify step and the prompt run apart (fp32: only the matmuls' shapes
    differ)."""
    from benchmarks import bench_mtp

    rows = bench_mtp.main(["--models", "tiny", "--batches", "3", "--k", "2", "--context", "30", "--prompt-step", "70"])
    (row,) = rows
    assert row["max |diff|"] < 1e-4 and row["plain |diff|"] < 1e-4
    assert row["tokens gained"] == pytest.approx(3 * (2.73 - 1))
    assert all(row[f"{label} ms"] > 0 for label in ("prompt alone", "+ decode rows", "+ verify rows"))


def test_tp_projection_counts_each_ranks_bytes():
    """project_tp's per-rank bytes come from the rank's own module shapes: half per rank at TP 2 (up to the
    replicated norms and the embedding rows), KV heads replicated past their count, the all-reduce model's terms."""
    from benchmarks import project_tp

    one, two = (project_tp.rank_bytes("27B", tp, 1, 1024, False) for tp in (1, 2))
    assert 0.49 < two / one < 0.51
    # 27B has 4 KV heads: at TP 8 each rank keeps one (replicated), as at TP 4
    kv8 = project_tp.rank_bytes("27B", 8, 64, 32768, False) - project_tp.rank_bytes("27B", 8, 64, 0, False)
    kv4 = project_tp.rank_bytes("27B", 4, 64, 32768, False) - project_tp.rank_bytes("27B", 4, 64, 0, False)
    assert kv4 == kv8 == 64 * 32768 * project_tp.kv_bytes_per_token(project_tp.model_config("27B")) / 4
    # 129 all-reduces (2 per layer + logits) of one bf16 hidden row at batch 1, latency-bound
    assert abs(project_tp.allreduce_ms("27B", 2, 1, 10.0, 450.0) - 129 * (10e-3 + 10240 / 450e9 * 1e3)) < 1e-9
    assert project_tp.allreduce_ms("27B", 1, 64, 10.0, 450.0) == 0.0


def test_step_budget_bench_plumbing_on_cpu(capsys):
    from benchmarks import bench_step_budget

    rows = bench_step_budget.main(["--model", "tiny", "--device", "cpu", "--decodes", "2", "--decode-prompt-len",
                                   "16", "--prompts", "2", "--prompt-len", "96", "--prompt-output-len", "2",
                                   "--interval", "0", "--max-num-batched-tokens", "64", "--budgets", "off", "1e-6"])
    assert [r["budget ms"] for r in rows] == ["off", 1e-6]
    assert all(r["TTFT p50 ms"] > 0 and r["ITL p50 ms"] > 0 for r in rows)
    assert rows[1]["mixed steps"] > rows[0]["mixed steps"]  # floor-sized chunks: more, smaller mixed steps
    assert "cost model coefficients" in capsys.readouterr().out


def test_profile_resume_plumbing_on_a_tiny_shape(monkeypatch, capsys):
    from benchmarks import profile_resume

    monkeypatch.setattr("sys.argv", ["profile_resume.py", "--model", "tiny", "--turns", "2", "--first-len", "40",
                                     "--turn-len", "8", "--output-len", "3"])
    profile_resume.main()
    out = capsys.readouterr().out
    assert "turn 1: prompt 51 tokens" in out and "checkpoints" in out


def test_moe_paths_plumbing_on_cpu(capsys):
    """bench_kernels --moe-paths on a tiny MoE shape: every path's row (grouped GEMMs have no CPU kernel: its row
    holds the error), the expert-centric and per-pair paths agreeing."""
    from benchmarks import bench_kernels

    shape = {"hidden_size": 32, "moe_intermediate_size": 16, "num_experts": 8, "num_experts_per_tok": 2,
             "shared_expert_intermediate_size": 16}
    rows = bench_kernels.moe_paths("tiny-moe", layers=2, batches=(3,), device="cpu", shape=shape,
                                   bench=lambda fn: fn() and 1.0)
    by_path = {r["path"]: r for r in rows}
    from deltaserve.kernels.moe import midbatch

    from deltaserve.kernels.moe import triton as moe

    # auto, grouped, blocked (also without TMA weights, without half-height blocks), per-pair, mid, then each CONFIGS
    # tile that is not that kernel's default, then the per-pair kernels' alternative tiles (6 pairs: within
    # PAIR_SWEEP_MAX_PAIRS; too few for the blocked tiles)
    alternatives = sum(c != midbatch.GATE_UP_CONFIG for c in midbatch.CONFIGS) + \
        sum(c != midbatch.DOWN_CONFIG for c in midbatch.CONFIGS)
    pair_alternatives = [c for c in bench_kernels.PAIR_GATE_UP_SWEEP if c != moe.GATE_UP_CONFIG]
    pair_alternatives += [c for c in bench_kernels.PAIR_DOWN_SWEEP if c != moe.DOWN_CONFIG]
    assert {"per-pair", "grouped", "blocked", "mid"} <= set(by_path)
    assert len(rows) == 7 + alternatives + len(pair_alternatives)
    assert by_path["per-pair"]["vs mid"] == "ok" and by_path["mid"]["us"] == 500.0
    assert by_path["blocked"]["vs mid"] == "ok"
    assert all(by_path[f"blocked, {what}"]["vs mid"] == "ok"
               for what in ("weights by pointer", "no half-height blocks"))
    assert all(r["vs mid"] == "ok" for r in rows if r["path"].startswith("per-pair "))
    assert "ValueError" in by_path["grouped"]["us"]
    assert "per-pair" in capsys.readouterr().out


def test_accuracy_report_with_one_token_prompts():
    """A one-token prompt is a prefill from position 0 like any other (it was taken for a decode step after the
    scored tokens, past the sequences' pages), and sizes below 1 are refused by name."""
    import pytest

    from benchmarks import bench_accuracy

    rows = bench_accuracy.main(["--num-seqs", "2", "--prompt-len", "1", "--score-len", "20", "--gen-len", "20",
                                "--device", "cpu", "--kv-cache-dtypes", "auto", "int4", "--state-dtypes", "float32"])
    assert len(rows) == 2 and rows[0]["mean KL"] == 0 and rows[1]["mean KL"] > 0
    with pytest.raises(SystemExit):
        bench_accuracy.parse_args(["--gen-len", "0"])


GPU_ONLY = ["bench_attention", "bench_decode", "bench_e2e", "bench_gdn", "bench_kernels", "bench_linear",
            "bench_prefill", "bench_quant", "bench_quant_kernels", "profile_step"]


def test_gpu_only_scripts_say_so_in_one_line_on_cpu(monkeypatch):
    """Without CUDA each GPU-only script stops with one line naming what it needs (it failed deep inside torch with
    "Torch not compiled with CUDA enabled", or on `import fla`); bench_mtp's shapes mode points to its CPU mode."""
    import importlib

    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("the scripts run for real where CUDA is visible")
    for name in GPU_ONLY:
        module = importlib.import_module(f"benchmarks.{name}")
        monkeypatch.setattr("sys.argv", [f"{name}.py", *(["decode"] if name == "profile_step" else [])])
        with pytest.raises(SystemExit) as stop:
            module.main()
        assert str(stop.value) == f"{name}.py needs a CUDA GPU (torch.cuda.is_available() is False here)", name
    from benchmarks import bench_mtp

    hint = r"shapes mode\) needs a CUDA GPU .*; on CPU: bench_mtp.py --demo --device cpu"
    with pytest.raises(SystemExit, match=hint):
        bench_mtp.main(["--models", "9B"])
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench_mtp.main(["--demo", "--device", "cuda"])


def test_compile_check_help_compiles_nothing(capsys):
    """--help prints the usage (it was ignored and the minutes-long compile ran)."""
    import pytest

    from benchmarks import compile_check

    with pytest.raises(SystemExit) as stop:
        compile_check.main(["--help"])
    assert stop.value.code == 0 and "Registers, spills and instruction counts" in capsys.readouterr().out


def test_grammar_comparison_names_a_missing_library_first(capsys):
    """Without xgrammar the comparison stops in one line naming it, before the minutes-long tokenizer build (it
    built the tokenizer, then failed with a traceback)."""
    import importlib.util

    import pytest

    from benchmarks import compare_grammar_libraries

    if importlib.util.find_spec("xgrammar") is not None:
        pytest.skip("xgrammar is installed here")
    with pytest.raises(SystemExit) as stop:
        compare_grammar_libraries.main(["--walks", "1"])
    assert stop.value.code == 1
    assert capsys.readouterr().err.startswith("compare_grammar_libraries.py needs xgrammar: pip install xgrammar")


BAD_ARGUMENTS = [  # each failed deep inside the run (a traceback, or a loop that never ended) before it was refused
    ("bench_prefix", ["--model", "tiny", "--concurrency", "0"], "argument --concurrency: 0 is below 1"),
    ("bench_host_prefix", ["--repeats", "0"], "argument --repeats: 0 is below 1"),
    ("bench_batch_build", ["--reps", "x"], "argument --reps: 'x' is not an integer"),
    ("profile_engine", ["--model", "tiny", "--output-len", "0", "--no-model"], "argument --output-len: 0 is below 1"),
    ("profile_engine", ["--model", "tiny", "--no-model", "--speculative-tokens", "3"],
     "--no-model cannot run with --speculative-tokens"),
    ("profile_resume", ["--model", "tiny", "--turns", "0"], "argument --turns: 0 is below 1"),
    ("project_tp", ["--batches", "0"], "argument --batches: 0 is below 1"),
    ("capacity", ["--models", "7B"], "argument --models: invalid choice: '7B'"),
    ("bench_mtp", ["--demo", "--demo-k", "9"], "argument --demo-k: invalid choice: 9"),
    ("bench_mtp", ["--demo", "--num-prompts", "0"], "argument --num-prompts: 0 is below 1"),
    ("bench_structured", ["--constrained", "9", "--batch", "4"], "--constrained 9: give 0 to --batch (4) rows"),
    ("bench_step_budget", ["--model", "tiny", "--budgets", "abc"], "--budgets 'abc': give milliseconds above 0"),
    # at the default rows (1 16 64 tokens) the layer stays on the decode kernels: "fused" and "before" mislabelled
    ("bench_quant_kernels", ["--moe-prefill", "--rows", "64", "2048"], "--moe-prefill times the prefill path"),
]


def test_bad_arguments_are_argparse_errors(monkeypatch, capsys):
    import importlib

    import pytest

    for name, argv, message in BAD_ARGUMENTS:
        monkeypatch.setattr("sys.argv", [f"{name}.py", *argv])
        with pytest.raises(SystemExit) as stop:
            importlib.import_module(f"benchmarks.{name}").main()
        assert stop.value.code == 2, name
        assert f"{name}.py: error: {message}" in capsys.readouterr().err, name


def test_host_prefix_bench_takes_histories_below_its_warm_up(capsys):
    """The warm-up turn's 256-token history counts in the engine's length limit (a shorter --histories failed with
    'the prompt has 488 tokens but max_model_len is 344')."""
    from benchmarks import bench_host_prefix

    bench_host_prefix.main(["--histories", "16", "--repeats", "1", "--turn-len", "8", "--output-len", "4"])
    row = capsys.readouterr().out.splitlines()[-1].split()
    assert row[:2] == ["16", "19"]  # 16 history + 3 of the reply's 4 tokens cached


def test_gil_bench_plumbing_on_cpu(monkeypatch, capsys):
    """bench_gil: the floor and a real served run (child processes, serve_load's clients) on the narrowed demo model;
    ~7 s, most of it the server's start."""
    from benchmarks import bench_gil

    monkeypatch.setattr("sys.argv", ["bench_gil.py", "--switch-interval-ms", "2", "--repeats", "1", "--concurrency",
                                     "2", "--output-len", "12", "--speculative-tokens", "0"])
    assert bench_gil.main() == 0
    out = capsys.readouterr().out
    served = next(line for line in out.splitlines() if line.startswith("served 2 ms #1"))
    step_ms, on_cpu, _, _, _, loop_cpu = (float(x) for x in served.split("|")[1:7])
    assert step_ms > 0 and on_cpu > 0 and loop_cpu > 0  # the server's engine steps and event loop were seen
    assert "baseline: served 2 ms" in out and "engine alone (floor)" in out


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_load_run_load_takes_the_concurrency_as_the_cli_gives_it():
    """run_load as a library call: parse_args gives --concurrency as a list (a sweep's values) and leaves
    --num-requests to main; run_load failed on `list + int`. Here it runs one value as main does (against a closed
    port: every request fails at once, which still counts them), and refuses what the CLI refuses, naming it."""
    import asyncio

    import pytest

    from benchmarks import serve_load

    argv = ["--url", f"http://127.0.0.1:{_closed_port()}", "--model", "m", "--warmup", "0", "--concurrency"]
    for given, requests in ((["3"], 12), (["3", "--num-requests", "5"], 5)):  # 4 per client unless given
        args = serve_load.parse_args(argv + given)
        results, _, model = asyncio.run(serve_load.run_load(args))
        assert len(results) == requests and not any(r.ok for r in results) and model == "m"
    args = serve_load.parse_args(argv + ["3"])
    for value in (3, "3", [3]):
        args.concurrency, args.num_requests = value, 2
        assert len(asyncio.run(serve_load.run_load(args))[0]) == 2
    for value, words in (([1, 16], "one run"), (0, ">= 1"), (-2, ">= 1"), ("many", "an integer"), (2.5, "an integer"),
                         (True, "an integer"), ([], "one run"), (None, "an integer")):
        args.concurrency = value
        with pytest.raises(ValueError, match="concurrency") as e:
            asyncio.run(serve_load.run_load(args))
        assert words in str(e.value), (value, str(e.value))
    args.concurrency = 2
    for value in (0, -1, "5"):
        args.num_requests = value
        with pytest.raises(ValueError, match="num_requests"):
            asyncio.run(serve_load.run_load(args))


def test_serve_load_reads_the_servers_counters_over_a_run():
    """serve_load reads the preemption, MTP and prefix-cache counters from deltaserve's /metrics (as its server
    renders them) and from vLLM's names alike, not mistaking the per-position MTP counters for the totals; a run's
    figures get their change and the mean acceptance length, and the sweep table the preemptions."""
    from benchmarks import serve_load
    from deltaserve.server.metrics import ServerMetrics

    def page(preempted: int, drafts: int, accepted: int, cached: int) -> str:
        stats = {"preemptions": preempted, "spec_draft_tokens": 3 * drafts, "spec_accepted_tokens": accepted,
                 "spec_drafted_pos_0": drafts, "spec_accepted_pos_0": accepted, "prompt_tokens_cached": cached,
                 "prompt_tokens_queried": 1000, "running": 2}
        return ServerMetrics("m").render(stats).decode()

    before, after = serve_load.parse_counters(page(1, 10, 12, 64)), serve_load.parse_counters(page(4, 110, 252, 96))
    assert before == {"server_preemptions": 1, "server_spec_drafts": 10, "server_spec_accepted_tokens": 12,
                      "server_prefix_cache_hit_tokens": 64}
    vllm = "# TYPE vllm:num_preemptions_total counter\nvllm:num_preemptions_total{model_name=\"m\"} 7.0\n" \
           "vllm:num_preemptions_total{model_name=\"n\"} 1.0\nvllm:num_requests_running{model_name=\"m\"} 3.0\n"
    assert serve_load.parse_counters(vllm) == {"server_preemptions": 8.0}
    change = {k: after[k] - before[k] for k in after}
    ok = serve_load.RequestResult(ok=True, prompt_tokens=8, output_tokens=4, ttft=0.1, latency=0.4, itl=[0.1] * 3)
    stats = serve_load.summarize([ok], 1.0, change)
    assert stats["server_preemptions"] == 3 and stats["server_acceptance_length"] == 1 + 240 / 100
    assert "server_acceptance_length" not in serve_load.summarize([ok], 1.0, {"server_spec_drafts": 0})
    table = serve_load.sweep_table([(16, stats)], 1, "", {})
    assert table.splitlines()[0].endswith("| preemptions |") and table.splitlines()[2].endswith("| 3 |")


def test_results_label_runs_by_date_card_and_command():
    """RESULTS.md's rule: every section headed 'date · card · command', runs named by date, card and tree, never by
    the internal work-session numbers that mean nothing to whoever clones the repo (nor in the code and docs)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    results = (root / "benchmarks" / "RESULTS.md").read_text()
    heads = [line for line in results.splitlines() if line.startswith("## ")]
    assert heads and all(re.match(r"## \d{4}-\d\d-\d\d · [^·]+ · \S", h) for h in heads), \
        [h for h in heads if not re.match(r"## \d{4}-\d\d-\d\d · [^·]+ · \S", h)]
    label = re.compile(r"\bsessions?[ -]\d", re.IGNORECASE)
    files = [root / "README.md", *(p for d in ("src", "tests", "benchmarks", "docs") for p in (root / d).rglob("*")
                                   if p.suffix in (".py", ".md"))]
    found = [f"{p.relative_to(root)}:{n}" for p in files
             for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if label.search(line)]
    assert not found, f"runs labelled by work session (label them by date, card and tree): {found}"


def test_gil_bench_floor_runs_the_served_prompts(monkeypatch):
    """bench_gil's floor (the engine alone) gets the token ids its served run sends, so the two see the same routing."""
    import asyncio

    from benchmarks import bench_gil, serve_load

    args, _ = bench_gil.parse_args(["--concurrency", "3", "--input-len", "5", "--output-len", "2", "--seed", "7"])
    sent = []

    async def one_request(client, path, payload):
        sent.append(payload["prompt"])
        return serve_load.RequestResult(ok=True)
    monkeypatch.setattr(serve_load, "one_request", one_request)
    load = bench_gil.load_args(args, "http://127.0.0.1:1", 1000)
    load.model = "m"  # no /v1/models query
    asyncio.run(serve_load.run_load(load))
    floor = bench_gil.prompts(args, 1000)
    assert sent[2:] == floor and len(floor) == 3 and all(len(p) == 5 and 500 <= min(p) for p in floor)


def test_compile_check_compiles_the_moe_block_kernel():
    """compile_check's row for the quantized MoE block kernel compiles it as _blocks launches it (its arguments
    were renamed for moe.blocked.block_plan; the old names left the pointers as i32 scalars and the whole quant
    table failed to compile)."""
    import json
    import os
    import subprocess
    import sys

    # a process of its own: this one runs the kernels interpreted (conftest), which compile_check cannot compile
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import json; from benchmarks import compile_check as c; print(json.dumps(c.moe_block_row()))"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    row = json.loads(out.stdout.splitlines()[-1])
    assert row["registers"] > 0 and row["mma"] > 0


def test_bench_decode_cuts_a_model_to_its_first_layers():
    """--layers N (a whole-model ratio where the whole model does not fit the card): the first N layers with the
    model's own GDN / attention pattern; a count the model does not have is refused naming the range."""
    from benchmarks.bench_decode import first_layers
    from benchmarks.common import model_config

    cfg = model_config(first_layers("35B-A3B", 20))
    assert cfg.num_hidden_layers == 20 and len(cfg.full_attention_layers) == 5
    assert cfg.layer_types == model_config("35B-A3B").layer_types[:20]
    with pytest.raises(SystemExit, match="35B-A3B has 40 layers; give 1 to 40"):
        first_layers("35B-A3B", 41)


def test_serving_floor_model(capsys):
    """The serving model's arithmetic: at concurrency 1 the TPOT is the decode step and the throughput one request's
    tokens over its prefill and steps; past it c - 1 prefill steps replace decode steps; the 35B-A3B shape on the
    meta device reads more at 16 rows than at 1, and more KV at a longer context."""
    from benchmarks import serving_floor as sf

    assert sf.tpot(10.0, 110.0, 1, 1024) == 10.0
    assert sf.tpot(10.0, 110.0, 16, 1001) == pytest.approx(10.0 + 15 * 100 / 1000)
    assert sf.total_tok_s(100.0, 10.0, 1, 8192, 1024) == pytest.approx(9216 / (0.1 + 1023 * 0.01))
    one, sixteen = sf.floors("35B-A3B", 8192, 1024, [1, 16], copy_tbps=4.0, matmul_tflops=800.0,
                             step_ms=[3.0, 11.0], prefill_ms=130.0)
    assert one["TPOT floor ms"] == one["step floor ms"] == pytest.approx(one["step GB"] / 4.0)
    assert 5 < one["step GB"] < sixteen["step GB"] < 40 and 20 < one["prefill floor ms"] < 120
    assert sixteen["TPOT from parts"] == pytest.approx(sf.tpot(11.0, 130.0, 16, 1024))
    longer = sf.floors("35B-A3B", 16384, 1024, [16], copy_tbps=4.0, matmul_tflops=800.0)[0]
    assert longer["step GB"] > sixteen["step GB"] and longer["prefill floor ms"] > 2 * sixteen["prefill floor ms"]
    # MTP: K drafts verified in one step that yields AL tokens; the verify touches the experts of (1 + K) tokens a
    # row, and each draft reads the MTP layer and the lm_head
    assert sf.tpot(20.0, 110.0, 1, 1024, tokens_per_step=2.5) == 8.0
    mtp = sf.floors("35B-A3B", 8192, 1024, [16], copy_tbps=4.0, matmul_tflops=800.0, drafts=3, acceptance=3.0)[0]
    assert mtp["MTP"] == "K=3, AL 3" and sixteen["step GB"] + 3 * 1.0 < mtp["step GB"] < 4 * sixteen["step GB"]
    assert mtp["TPOT floor ms"] < sixteen["TPOT floor ms"]
    for bad, why in ((["--step-ms", "1"], "one each"), (["--mtp", "3", "--acceptance", "5"], "1 to 4 tokens"),
                     (["--acceptance", "2"], "needs --mtp")):
        with pytest.raises(SystemExit):
            sf.main(["--model", "27B", "--copy-tbps", "4", "--matmul-tflops", "800", *bad])
        assert why in capsys.readouterr().err


def test_serving_simulation_through_the_real_scheduler(capsys):
    """sim_serving: each draft kept with the probability that gives the acceptance length asked; with one client a
    prompt of the whole token budget takes one prefill step (a plain step's time plus the prefill's), and with
    prefix caching, alone, a light step more for the last token after its checkpoint."""
    from benchmarks import sim_serving

    p = sim_serving.keep_probability(3, 3.39)
    assert abs(1 + p + p * p + p ** 3 - 3.39) < 1e-9
    model = sim_serving.StepModel(verify_ms=3.0, decode_ms=1.0, prefill_ms=10.0, budget=64)
    assert (model.ms(0, True), model.ms(32, False), model.ms(32, True)) == (3.0, 6.0, 8.0)
    assert sim_serving.StepModel(3.0, 1.0, 10.0, 64, verify_extra_ms=0.5).ms(32, True) == 6.5
    # eager launches floor a step with prompt tokens that replays no graph: one that verifies, or a large one
    eager = sim_serving.StepModel(3.0, 1.0, 10.0, 64, eager_ms=20.0, graph_tokens=48)
    assert (eager.ms(0, True), eager.ms(32, False, 36, 5), eager.ms(32, True, 44, 5)) == (3.0, 6.0, 20.0)
    assert (eager.ms(32, False, 48, 5), eager.ms(32, False, 36, 17)) == (20.0, 20.0)
    alone = sim_serving.simulate(model, concurrency=1, num_requests=3, input_len=64, output_len=8, k=3,
                                 acceptance=3.39, prefix_caching=False)
    assert alone["TTFT p50 ms"] == alone["TTFT mean ms"] == 11.0
    cached = sim_serving.simulate(model, concurrency=1, num_requests=3, input_len=64, output_len=8, k=3,
                                  acceptance=3.39)
    assert cached["TTFT p50 ms"] == 1.0 + 10.0 * 63 / 64 + 1.0
    busy = sim_serving.simulate(model, concurrency=4, num_requests=8, input_len=64, output_len=8, k=3,
                                acceptance=3.39)
    assert busy["TTFT p50 ms"] > 11.0 and busy["total tok/s"] > 0
    # KV pages for one request (64 + 8 tokens + drafts: 5 pages) of the four clients': they run one at a time
    one_at_a_time = sim_serving.simulate(model, concurrency=4, num_requests=8, input_len=64, output_len=8, k=3,
                                         acceptance=3.39, num_pages=5, num_checkpoints=0)
    assert one_at_a_time["total tok/s"] < busy["total tok/s"] and one_at_a_time["TTFT mean ms"] > busy["TTFT mean ms"]
    # pages for two requests and a half (64 + 32 tokens: 6 or 7 pages each): admitted on the pages free now, the
    # newest are preempted as the others grow; the growth reserve queues them instead
    tight = dict(concurrency=4, num_requests=8, input_len=64, output_len=32, k=3, acceptance=3.39, num_pages=16,
                 num_checkpoints=0)
    greedy = sim_serving.simulate(model, **tight, growth_reserve=False)
    reserved = sim_serving.simulate(model, **tight)
    assert greedy["preemptions"] > 0 == reserved["preemptions"] and reserved["total tok/s"] > greedy["total tok/s"]
    sim_serving.main(["--concurrency", "2", "--num-requests", "3", "--input-len", "64", "--output-len", "8",
                      "--max-num-batched-tokens", "64", "--max-num-seqs", "2", "--num-pages", "12",
                      "--num-checkpoints", "1"])
    assert "TTFT p50 ms" in capsys.readouterr().out
    # short prompts beside verifying rows, eager launches modelled: with prefill graphs the scheduler drops those
    # steps' drafts and they replay; without any (graph_tokens 1) each is launched eagerly with its drafts
    short = dict(concurrency=4, num_requests=12, input_len=16, output_len=24, k=3, acceptance=3.39)
    slow_host = sim_serving.StepModel(3.0, 1.0, 10.0, 64, eager_ms=40.0)
    assert sim_serving.simulate(slow_host, **short)["total tok/s"] > \
        sim_serving.simulate(dataclasses.replace(slow_host, graph_tokens=1), **short)["total tok/s"]


def test_serve_ab_serves_each_tree_in_turn(tmp_path, capsys):
    """serve_ab: a server per tree (here the same tree twice, the tiny shape on CPU), each driven by serve_load, the
    figures side by side with ratios against the first; bad arguments fail before any server starts."""
    from benchmarks import serve_ab

    src = str(Path(__file__).resolve().parent.parent / "src")
    common = ["--model", "tiny", "--max-model-len", "256", "--server-args", "--device cpu --max-num-seqs 2",
              "--port", str(_closed_port()), "--log-dir", str(tmp_path)]
    load = ["--load-args", "--input-len 16 --output-len 4 --concurrency 1 --num-requests 2 --warmup 0"]
    runs = serve_ab.main(["--tree", f"a={src}", "--tree", f"b={src}", *common, *load, "--step-trace",
                          "--json-out", str(tmp_path / "ab.json")])
    assert [(name, i) for name, i, _ in runs] == [("a", 0), ("b", 1)]
    assert all(s["total_tok_s"] > 0 and s["requests_ok"] == 2 for _, _, s in runs)
    out = capsys.readouterr().out
    assert "tok/s ratio" in out and out.count("KV cache (float32)") == 2
    assert out.count("step trace ") == 2 and "| decode |" in out and "2 prompts: chunks per prompt" in out
    # a tree from before --step-trace would refuse the flag: its runs are not traced
    assert serve_ab.trace_path(tmp_path, tmp_path / "server_0_old.log", True) is None
    assert "no --step-trace in this tree" in capsys.readouterr().out
    assert [r["tree"] for r in json.loads((tmp_path / "ab.json").read_text())["runs"]] == ["a", "b"]
    with pytest.raises(SystemExit):
        serve_ab.main(["--tree", f"a={tmp_path}", *common, *load])  # no deltaserve package there
    assert "holds no deltaserve package" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        serve_ab.main(["--tree", f"a={src}", *common, "--load-args", "--concurrency 1 2"])
    assert "needs one --concurrency value" in capsys.readouterr().err


def test_tree_ab_runs_a_command_under_each_tree_and_checks_what_it_imported(tmp_path, capsys):
    """tree_ab: the command once per tree (and back with --rounds 2), each run's matching lines under its tree's name;
    a run whose script put another deltaserve first on sys.path is flagged and fails the command; bad arguments fail
    before any run."""
    from benchmarks import tree_ab

    src = Path(__file__).resolve().parent.parent / "src"
    script = tmp_path / "bench.py"
    script.write_text("import sys\nimport deltaserve\nprint('row', deltaserve.__name__, sys.argv[1:])\nprint('noise')\n")
    runs = tree_ab.main(["--tree", f"a={src}", "--tree", f"b={src}", "--rounds", "2", "--grep", "^row",
                         "--log-dir", str(tmp_path / "logs"), "--", str(script), "--x", "1"])
    assert [(r["tree"], r["exit"], r["own deltaserve"]) for r in runs] == [("a", 0, True), ("b", 0, True),
                                                                           ("b", 0, True), ("a", 0, True)]
    out = capsys.readouterr().out
    assert out.count("row deltaserve ['--x', '1']") == 4 and "noise" not in out
    assert "noise" in (tmp_path / "logs" / "run_3_a.log").read_text()
    fake = tmp_path / "fake"
    (fake / "deltaserve").mkdir(parents=True)
    (fake / "deltaserve" / "__init__.py").write_text("")
    sneaky = tmp_path / "sneaky.py"
    sneaky.write_text(f"import sys\nsys.path.insert(0, {str(src)!r})\nimport deltaserve\n")
    with pytest.raises(SystemExit):
        tree_ab.main(["--tree", f"fake={fake}", "--", str(sneaky)])
    assert "DID NOT RUN THE TREE'S deltaserve" in capsys.readouterr().out
    for bad, says in ((["--tree", f"a={src}"], "give the command after --"),
                      (["--tree", f"a={src}", "--", "no/such.py"], "is not a file"),
                      (["--tree", f"a={src}", "--grep", "(", "--", str(script)], "is not a regular expression")):
        with pytest.raises(SystemExit):
            tree_ab.main(bad)
        assert says in capsys.readouterr().err
