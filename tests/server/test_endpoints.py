"""/health, /metrics, /v1/tokenize, /v1/detokenize, /version, and the options run_server reads."""

from __future__ import annotations

import argparse

import pytest

from tests.server.conftest import MAX_MODEL_LEN, engine_stats


def test_health_and_version(http):
    assert http.get("/health").json() == {"status": "ok"}
    assert "version" in http.get("/version").json()


def test_metrics_count_tokens_and_latencies(http):
    before = engine_stats(http)
    r = http.post("/v1/completions", json={"prompt": "abcd", "max_tokens": 5, "ignore_eos": True})
    assert r.status_code == 200
    after = engine_stats(http)
    assert after["prompt_tokens_total"] - before["prompt_tokens_total"] == 4
    assert after["generation_tokens_total"] - before["generation_tokens_total"] == 5
    assert after["kv_pages_total"] > 0 and after["state_slots_total"] > 0
    assert after["time_to_first_token_seconds_count"] == before.get("time_to_first_token_seconds_count", 0) + 1
    assert after["inter_token_latency_seconds_count"] - before.get("inter_token_latency_seconds_count", 0) == 4
    text = http.get("/metrics").text
    for name in ("num_requests_running", "num_requests_waiting", "kv_pages_used", "state_slots_used",
                 "time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket"):
        assert f"deltaserve_{name}" in text


def test_tokenize_detokenize_round_trip(http):
    r = http.post("/v1/tokenize", json={"prompt": "héllo"}).json()
    assert r["count"] == len(r["tokens"]) == 6 and r["max_model_len"] == MAX_MODEL_LEN  # byte-level: é is 2 bytes
    assert http.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": "héllo"}
    bad = http.post("/v1/detokenize", json={"tokens": [1, -3]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    both = http.post("/v1/tokenize", json={"prompt": "a", "messages": [{"role": "user", "content": "a"}]})
    assert both.status_code == 400


def test_server_options_are_validated_and_defaulted():
    from deltaserve.server.args import ServerConfigError, add_serve_args, engine_args_from, server_config_from

    args = add_serve_args(argparse.ArgumentParser()).parse_args(["/models/Qwen3.5-4B", "--port", "9000",
                                                                 "--max-num-seqs", "8"])
    config = server_config_from(args, args.model)
    assert (config.port, config.served_model_names, config.api_key) == (9000, ("Qwen3.5-4B",), None)
    assert engine_args_from(args, args.model).max_num_seqs == 8
    assert engine_args_from(args, args.model).async_scheduling is None  # the device decides: on for CUDA
    off = add_serve_args(argparse.ArgumentParser()).parse_args(["m", "--no-async-scheduling"])
    assert engine_args_from(off, off.model).async_scheduling is False
    # a namespace without the engine options still works (the CLI may define them differently)
    defaults = engine_args_from(argparse.Namespace(), "m")
    assert defaults.max_num_seqs == 64 and defaults.max_num_batched_tokens is None  # None: by the GPU's memory
    with pytest.raises(ServerConfigError, match="--shutdown-timeout"):
        server_config_from(argparse.Namespace(shutdown_timeout=-1), "m")


@pytest.mark.parametrize("given", [".", "./", "ckpt/.."])
def test_a_relative_model_path_is_served_under_its_directorys_name(tmp_path, monkeypatch, given):
    """`deltaserve serve .` inside a checkpoint directory named the model Path('.').name, '' (and '..' for 'ckpt/..'):
    refused with "--served-model-name needs at least one non-empty name", an option the user never gave."""
    from deltaserve.cli import build_parser
    from deltaserve.server.args import server_config_from

    (tmp_path / "Qwen3.5-4B" / "ckpt").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "Qwen3.5-4B")
    args = build_parser().parse_args(["serve", given])
    assert server_config_from(args, args.model).served_model_names == ("Qwen3.5-4B",)


def test_cli_serve_subcommand_feeds_run_server():
    from deltaserve.cli import build_parser
    from deltaserve.server.args import engine_args_from, server_config_from

    args = build_parser().parse_args(["serve", "/m/Qwen3.5-9B", "--api-key", "k", "--served-model-name", "a", "b",
                                      "--enforce-eager", "--log-level", "INFO", "--tool-call-parser", "none",
                                      "--exclude-tools-when-tool-choice-none"])
    config = server_config_from(args, args.model)
    assert (config.api_key, config.served_model_names, config.log_level) == ("k", ("a", "b"), "info")
    assert config.tool_call_parser == "none" and engine_args_from(args, args.model).enforce_eager
    assert config.exclude_tools_when_tool_choice_none
    assert not server_config_from(build_parser().parse_args(["serve", "m"]), "m").exclude_tools_when_tool_choice_none


def test_limit_options_reach_the_server_config():
    from deltaserve.server.args import ServerConfigError, add_serve_args, server_config_from

    args = add_serve_args(argparse.ArgumentParser()).parse_args([
        "m", "--max-request-bytes", "4096", "--header-timeout", "2.5", "--body-timeout", "7", "--max-connections", "9",
        "--chat-template-timeout", "3", "--trust-request-chat-template", "--public-metrics"])
    config = server_config_from(args, "m")
    assert (config.max_request_bytes, config.header_timeout, config.body_timeout, config.max_connections,
            config.chat_template_timeout) == (4096, 2.5, 7.0, 9, 3.0)
    assert config.trust_request_chat_template and config.public_metrics
    defaults = server_config_from(add_serve_args(argparse.ArgumentParser()).parse_args(["m"]), "m")
    assert not defaults.trust_request_chat_template and not defaults.public_metrics
    for bad, option in ((["--header-timeout", "0"], "--header-timeout"), (["--body-timeout", "nan"], "--body-timeout"),
                        (["--max-connections", "0"], "--max-connections"), (["--api-key", "ключ"], "--api-key"),
                        (["--max-request-bytes", "10"], "--max-request-bytes")):
        with pytest.raises(ServerConfigError, match=option):
            server_config_from(add_serve_args(argparse.ArgumentParser()).parse_args(["m", *bad]), "m")
