"""The CLI end to end, as a user runs it (subprocesses)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from deltaserve.demo import write_byte_tokenizer
from tests.models.factory import TinySpec, save_checkpoint


def run(*args: str, stdin: str | None = None, cache: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DELTASERVE_CACHE_DIR": cache}
    return subprocess.run([sys.executable, "-m", "deltaserve.cli", *args], input=stdin, capture_output=True,
                          text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("dscache"))


def test_generate_without_model_uses_the_bundled_demo(cache):
    out = run("generate", "--prompt", "def ", "--max-tokens", "8", "--seed", "1", cache=cache)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("def ")
    again = run("generate", "--prompt", "def ", "--max-tokens", "8", "--seed", "1", cache=cache)
    assert again.stdout == out.stdout  # same seed, same text; the cached demo model is reused


def test_generate_with_model_dir_matches_python_api(cache, tmp_path):
    save_checkpoint(TinySpec("cli", extra={"vocab_size": 320}), tmp_path)
    write_byte_tokenizer(tmp_path)
    out = run("generate", str(tmp_path), "--prompt", "hello", "--max-tokens", "6", "--temperature", "0",
              "--dtype", "float32", cache=cache)
    assert out.returncode == 0, out.stderr
    from deltaserve import LLM, SamplingParams
    ref = LLM(str(tmp_path), dtype="float32", device="cpu").generate(
        "hello", SamplingParams(max_tokens=6, temperature=0))[0].outputs[0].text
    assert out.stdout == "hello" + ref + "\n"


def test_chat_streams_and_exits_on_eof(cache):
    out = run("chat", "--max-tokens", "4", "--temperature", "0", stdin="hi\n/reset\nagain\n", cache=cache)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("> ") == 4  # three inputs read, then EOF at the fourth prompt
    assert "/reset" in out.stderr


def test_chat_skips_empty_lines(cache):
    """A blank line is no message: the prompt comes back without a reply being generated."""
    out = run("chat", "--max-tokens", "4", "--temperature", "0", stdin="\n   \n/exit\n", cache=cache)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "> > > "


def test_chat_answers_an_unknown_command_with_the_commands(cache):
    """/help or a mistyped command is not sent to the model: the commands are listed and no reply is generated."""
    out = run("chat", "--max-tokens", "4", "--temperature", "0", stdin="/help\n/exti\n/exit\n", cache=cache)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "> > > " and out.stderr.count("/reset clears the history") == 3  # banner + two answers


def test_chat_survives_a_turn_longer_than_the_context(cache):
    """A turn the engine refuses (the history outgrew max_model_len) is reported and dropped; the session goes on."""
    out = run("chat", "--max-tokens", "4", "--temperature", "0", "--max-model-len", "64",
              stdin="word " * 100 + "\nHi\n", cache=cache)
    assert out.returncode == 0, out.stderr
    assert "max_model_len is 64" in out.stderr and "/reset" in out.stderr and "Traceback" not in out.stderr
    assert out.stdout.count("> ") == 3  # the long line, "Hi" (answered), then EOF
    assert len(out.stdout.split("> ")[2]) > 1  # "Hi" got a reply


def test_chat_without_a_tokenizer_fails_before_the_first_prompt(cache, tmp_path):
    save_checkpoint(TinySpec("notok"), tmp_path)
    out = run("chat", str(tmp_path), stdin="", cache=cache)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "chat needs a tokenizer" in out.stderr and "> " not in out.stdout


def test_bad_model_dir_is_one_clear_line(cache, tmp_path):
    out = run("generate", str(tmp_path / "missing"), cache=cache)
    assert out.returncode == 2
    assert "no config.json" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("bad,needle", [(("--max-model-len", "0"), "'max_model_len' must be a positive integer"),
                                        (("--gpu-memory-utilization", "nan"), "'gpu_memory_utilization' is nan"),
                                        (("--num-pages", "-3"), "'num_pages' must be a positive integer")])
def test_bad_engine_options_are_one_clear_line(cache, bad, needle):
    out = run("generate", *bad, cache=cache)
    assert out.returncode == 2 and needle in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_bad_sampling_options_fail_before_the_model_loads(cache, tmp_path, command):
    """A bad --temperature is reported before any checkpoint is read (here: a directory with no config.json, which
    loading would report instead), so a large model is not loaded for minutes only to refuse the flag."""
    out = run(command, str(tmp_path / "missing"), "--temperature", "-1", stdin="", cache=cache)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "SamplingParams.temperature=-1.0 is invalid" in out.stderr


def test_truncated_checkpoint_is_one_line_naming_the_file(cache, tmp_path):
    save_checkpoint(TinySpec("trunc"), tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 3])
    out = run("generate", str(tmp_path), cache=cache)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "model.safetensors is truncated or corrupt" in out.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("command", ["generate", "chat", "serve"])
def test_help_documents_every_option(cache, command):
    out = run(command, "--help", cache=cache)
    assert out.returncode == 0
    for option in ("--max-model-len", "--device", "--dtype", "--gpu-memory-utilization", "--max-num-seqs"):
        assert option in out.stdout


def test_serve_names_a_missing_server_dependency(monkeypatch, capsys):
    """Without a module the server imports, `serve --port 8011 ...` says which module is missing (its flags would
    otherwise be reported as unrecognized arguments) and exits 2; other commands still parse."""
    from deltaserve import cli

    monkeypatch.setitem(sys.modules, "deltaserve.server.app", None)  # importing it now raises ModuleNotFoundError
    assert cli.main(["serve", "--port", "8011", "MODEL"]) == 2
    err = capsys.readouterr().err
    assert "a module it imports is missing or too old" in err and "deltaserve.server.app" in err
    assert "pip install -e ." in err
    assert cli.server_import_error(cli.build_parser(), ["generate", "--max-tokens", "1"]) is None

    third_party = argparse.ArgumentParser()
    third_party.add_subparsers().add_parser("serve").set_defaults(
        server_import_error=ModuleNotFoundError("No module named 'httptools'", name="httptools"))
    assert "pip install -U httptools, or reinstall" in cli.server_import_error(third_party, ["serve", "--port", "1"])
