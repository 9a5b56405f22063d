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
    stats = main(args)
    assert stats["requests_ok"] == 8 and stats["requests_failed"] == 0
    # both rates divide token counts by one duration: equal ratio up to float rounding of the two divisions
    assert stats["output_tok_s"] > 0 and stats["input_tok_s"] == pytest.approx(stats["output_tok_s"] * 16 / 6, rel=1e-12)
    assert 0 < stats["ttft_ms_p50"] <= stats["e2e_ms_p99"] and stats["itl_ms_p50"] > 0
    printed = capsys.readouterr().out
    assert "card: cpu" in printed and "ttft_ms_p99" in printed
    chat = main(args[:-2] + ["--endpoint", "chat", "--baseline", str(out)])
    assert chat["requests_ok"] == 8
    assert "ratio" in capsys.readouterr().out
    assert json.loads(out.read_text())["stats"]["requests_ok"] == 8
