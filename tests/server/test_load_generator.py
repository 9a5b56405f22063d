"""benchmarks/serve_load.py runs against the live server and reports what it measured."""

from __future__ import annotations

import json

import pytest

from benchmarks.serve_load import main
from tests.server.conftest import API_KEY


def test_load_generator_against_the_server(server, tmp_path, capsys):
    out = tmp_path / "run.json"
    args = ["--url", server.url, "--api-key", API_KEY, "--concurrency", "4", "--num-requests", "8",
            "--input-len", "16", "--output-len", "6", "--min-token-id", "32", "--max-token-id", "127",
            "--card", "cpu", "--json-out", str(out)]
    [stats] = main(args)
    assert stats["requests_ok"] == 8 and stats["requests_failed"] == 0
    # both rates divide token counts by one duration: equal ratio up to float rounding of the two divisions
    assert stats["output_tok_s"] > 0 and stats["input_tok_s"] == pytest.approx(stats["output_tok_s"] * 16 / 6, rel=1e-12)
    assert 0 < stats["ttft_ms_p50"] <= stats["e2e_ms_p99"] and stats["itl_ms_p50"] > 0
    printed = capsys.readouterr().out
    assert "card: cpu" in printed and "ttft_ms_p99" in printed
    [chat] = main(args[:-2] + ["--endpoint", "chat", "--baseline", str(out)])
    assert chat["requests_ok"] == 8
    assert "ratio" in capsys.readouterr().out
    assert json.loads(out.read_text())["stats"]["requests_ok"] == 8


def test_a_sweep_beside_the_published_cells(server, tmp_path, capsys):
    png, out = tmp_path / "sweep.png", tmp_path / "sweep.json"
    runs = main(["--url", server.url, "--api-key", API_KEY, "--preset", "published-8k1k", "--concurrency", "1", "16",
                 "--num-requests", "2", "--input-len", "12", "--output-len", "4", "--min-token-id", "32",
                 "--max-token-id", "127", "--card", "NVIDIA H200", "--published", "27B", "--plot", str(png),
                 "--json-out", str(out)])
    assert [r["requests_ok"] for r in runs] == [2, 2]
    printed = capsys.readouterr().out
    assert "SGLang 0.5.16 published, H200 27B bf16: TTFT / TPOT / tok/s" in printed
    row16 = next(line for line in printed.splitlines() if line.startswith("| 16 |"))
    assert row16.endswith("| 1,198 / 17.28 / 7,083 (LL) |")  # the published cell, as published
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads(out.read_text())
    assert [r["concurrency"] for r in record["runs"]] == [1, 16]
    for run in record["runs"]:  # every request's timeline, in the order sent
        reqs = run["requests"]
        assert len(reqs) == 2 and reqs[0]["sent_ms"] == 0 and reqs[1]["sent_ms"] >= 0
        assert all(r["ok"] and 0 < r["ttft_ms"] <= r["e2e_ms"] and r["output_tokens"] == 4 for r in reqs)


def test_the_preset_sets_the_published_lengths_and_unknown_models_are_named():
    from benchmarks.serve_load import parse_args, requests_for

    args = parse_args(["--preset", "published-8k1k"])
    assert (args.input_len, args.output_len, args.concurrency) == (8192, 1024, [1, 16, 64])
    assert [requests_for(args, c) for c in args.concurrency] == [8, 64, 128]
    with pytest.raises(SystemExit):
        parse_args(["--published", "9B"])


def test_no_prompt_repeats_across_warmup_timed_requests_and_sweep_runs():
    """A repeated prompt would be a prefix-cache hit (a TTFT of a few ms for 8k tokens): the warm-up prompts, the timed
    ones and each concurrency's prompts are all distinct."""
    from benchmarks.serve_load import make_payloads, parse_args

    seen = []
    for c in (1, 16):
        args = parse_args(["--input-len", "32", "--output-len", "4", "--num-requests", "4", "--concurrency", str(c)])
        args.concurrency = c  # as the sweep sets it per run
        timed, warmup = make_payloads(args, "m")
        assert len(timed) == 4 and len(warmup) == args.warmup
        seen += [tuple(p["prompt"]) for p in timed + warmup]
    assert len(set(seen)) == len(seen)


def test_default_prompt_ids_fit_a_small_vocabulary(server, capsys):
    """Without --min/--max-token-id the random prompts stay inside the served vocabulary (320 tokens here): the
    default range [1000, 100000) made every request to a small model fail with a 400."""
    from benchmarks.serve_load import vocab_size
    from tests.server.chat_model import CONFIG

    headers = {"Authorization": f"Bearer {API_KEY}"}
    assert vocab_size(server.url, headers, 100000) == CONFIG["vocab_size"] == 320
    assert vocab_size(server.url, headers, 200) == 200  # a vocabulary above the cap keeps the cap
    [stats] = main(["--url", server.url, "--api-key", API_KEY, "--concurrency", "2", "--num-requests", "2",
                    "--input-len", "8", "--output-len", "3", "--warmup", "0", "--card", "cpu"])
    assert stats["requests_ok"] == 2 and stats["requests_failed"] == 0
    assert "prompt token ids drawn from [160, 320)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--min-token-id 400 is not below the server's vocabulary size 320"):
        main(["--url", server.url, "--api-key", API_KEY, "--min-token-id", "400", "--num-requests", "1"])
