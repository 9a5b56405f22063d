"""Fixtures for the server tests: the trained chat checkpoint, a live server process on 127.0.0.1, and the greedy
reference (deltaserve's offline LLM on the same checkpoint).

One server process serves most tests (session scope); tests that need their own (SIGTERM) start one with
`ServerProcess`. Every process is bounded in time and killed at the end.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server.chat_model import train_chat_checkpoint

API_KEY = "test-key"
MODEL_NAME = "tiny-chat"
MAX_MODEL_LEN = 512
_LISTENING = re.compile(r"deltaserve listening on (http://\S+?:\d+)")
_START_TIMEOUT_S = 120.0


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory) -> Iterator[None]:
    """Keep the demo model (if any test builds it) out of the user's cache."""
    old = os.environ.get("DELTASERVE_CACHE_DIR")
    os.environ["DELTASERVE_CACHE_DIR"] = str(tmp_path_factory.mktemp("deltaserve_cache"))
    yield
    if old is None:
        os.environ.pop("DELTASERVE_CACHE_DIR", None)
    else:
        os.environ["DELTASERVE_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def chat_ckpt(tmp_path_factory) -> Path:
    return train_chat_checkpoint(tmp_path_factory.mktemp("chat_ckpt"))


def _die_with_parent() -> None:
    """Linux: SIGTERM the server if the test process dies first, so no server outlives a killed test run."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class ServerProcess:
    """`python -m deltaserve.server` in a subprocess on 127.0.0.1 with a port the OS picks."""

    def __init__(self, model: Path, log_path: Path, *extra: str) -> None:
        self.log_path = log_path
        cmd = [sys.executable, "-m", "deltaserve.server", str(model), "--device", "cpu", "--dtype", "float32",
               "--host", "127.0.0.1", "--port", "0", "--served-model-name", MODEL_NAME,
               "--max-model-len", str(MAX_MODEL_LEN), *extra]
        self._log = open(log_path, "w")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     preexec_fn=_die_with_parent)
        self.url = self._wait_listening()

    def _wait_listening(self) -> str:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            m = _LISTENING.search(self.log_path.read_text())
            if m:
                return m.group(1)
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop(kill=True)
        raise RuntimeError(f"the server did not start; its log:\n{self.log_path.read_text()[-4000:]}")

    def log(self) -> str:
        return self.log_path.read_text()

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def stop(self, kill: bool = False, timeout: float = 30.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def server(chat_ckpt, tmp_path_factory) -> Iterator[ServerProcess]:
    srv = ServerProcess(chat_ckpt, tmp_path_factory.mktemp("server") / "server.log", "--api-key", API_KEY)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def reference(chat_ckpt):
    """The offline engine on the same checkpoint: what greedy server output must equal."""
    from deltaserve import LLM

    return LLM(str(chat_ckpt), device="cpu", dtype="float32", max_model_len=MAX_MODEL_LEN)


@pytest.fixture()
def http(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        yield c


@pytest.fixture()
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=API_KEY, timeout=60, max_retries=0)


def engine_stats(http: httpx.Client) -> dict[str, float]:
    """The metrics from /metrics that have no label but model_name (engine gauges, histogram counts and sums)."""
    text = http.get("/metrics").text
    pattern = r'^deltaserve_(\w+)(?:\{model_name="[^"]*"\})? ([-\d.e+]+)$'
    return {m.group(1): float(m.group(2)) for m in re.finditer(pattern, text, re.M)}


def metric_value(http: httpx.Client, name: str, **labels: str) -> float:
    """One labelled sample from /metrics (0 when absent), whatever the order of its labels."""
    for line in http.get("/metrics").text.splitlines():
        m = re.match(r"^deltaserve_(\w+)\{(.*)\} (\S+)$", line)
        if m and m.group(1) == name and dict(re.findall(r'(\w+)="([^"]*)"', m.group(2))).items() >= labels.items():
            return float(m.group(3))
    return 0.0


def wait_pools_free(http: httpx.Client, timeout: float = 20.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        stats = engine_stats(http)
        # pages the prefix cache keeps are not in use by any request (they are reclaimed when pages run short)
        if stats["kv_pages_used"] == stats["kv_pages_cached"] and stats["state_slots_used"] == 0 \
                and stats["num_requests_running"] == 0 and stats["num_requests_waiting"] == 0:
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"pools still in use after {timeout}s: {stats}")
        time.sleep(0.05)


def completion_logprobs(r: httpx.Response, stream: bool) -> tuple[list[str], list[float], list[dict[str, float]]]:
    """A /v1/completions response's (first choice's) legacy logprobs, streamed or not: tokens, their logprobs and
    top_logprobs, one entry per token."""
    assert r.status_code == 200, r.text
    if stream:
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        pieces = [c["logprobs"] for e in events for c in e["choices"] if c["logprobs"]]
    else:
        pieces = [r.json()["choices"][0]["logprobs"]]
    return ([t for p in pieces for t in p["tokens"]], [lp for p in pieces for lp in p["token_logprobs"]],
            [t for p in pieces for t in p["top_logprobs"]])

