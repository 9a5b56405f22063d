"""What one client may cost the server (issue 20, items 4 with --reasoning-parser none, 10, 11, 12, 14, 15): a server
started with small limits refuses big bodies, cuts off slow headers and bodies, keeps serving real clients past
hundreds of idle sockets, bounds request-supplied chat templates, and fails fast on a busy port."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from deltaserve import SamplingParams
from tests.server.chat_model import THINK_CHAT
from tests.server.conftest import API_KEY, ServerProcess

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
MAX_BODY = 64 * 1024
MAX_CONNECTIONS = 24


@pytest.fixture(scope="module")
def strict(chat_ckpt, tmp_path_factory) -> Iterator[ServerProcess]:
    srv = ServerProcess(chat_ckpt, tmp_path_factory.mktemp("strict") / "server.log", "--api-key", API_KEY,
                        "--public-metrics", "--reasoning-parser", "none", "--trust-request-chat-template",
                        "--max-request-bytes", str(MAX_BODY), "--header-timeout", "1", "--body-timeout", "2",
                        "--max-connections", str(MAX_CONNECTIONS), "--chat-template-timeout", "2")
    yield srv
    srv.stop()
    assert "Traceback" not in srv.log()


@pytest.fixture()
def client(strict) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=strict.url, headers=HEADERS, timeout=60) as c:
        yield c


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def _read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    start = time.monotonic()
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data, time.monotonic() - start


def _assert_serving(client: httpx.Client) -> None:
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_body_over_the_limit_gets_413(client):
    big = json.dumps({"prompt": "x" * MAX_BODY}).encode()
    r = client.post("/v1/completions", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert str(MAX_BODY) in r.json()["error"]["message"] and r.headers["x-request-id"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while the body streams in
        for i in range(0, len(big), 4096):
            yield big[i:i + 4096]

    r = client.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    # just under the limit: parsed, and refused for its length without tokenizing all of it
    under = client.post("/v1/completions", json={"prompt": "x" * (MAX_BODY - 100)})
    assert under.status_code == 400 and under.json()["error"]["code"] == "context_length_exceeded"
    _assert_serving(client)


def test_slow_body_gets_408(strict, client):
    with socket.create_connection(_address(strict.url)) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"prompt\": ".encode())
        data, took = _read_until_closed(sock, 10)
    assert data.startswith(b"HTTP/1.1 408") and b"request_timeout" in data and 1.5 < took < 6
    _assert_serving(client)


def test_slow_headers_are_cut_off(strict, client):
    with socket.create_connection(_address(strict.url)) as partial, \
            socket.create_connection(_address(strict.url)) as silent:
        partial.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        data, took = _read_until_closed(partial, 10)
        assert data.startswith(b"HTTP/1.1 408") and 0.5 < took < 5
        _, took = _read_until_closed(silent, 10)  # a connection that never sends a byte is closed as well
        assert took < 5
    _assert_serving(client)


def test_idle_sockets_cannot_lock_out_clients(strict, client, reference):
    expected = reference.generate(["Once"], SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))
    result: dict[str, str] = {}

    def stream() -> None:
        body = {"prompt": "Once", "max_tokens": 60, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", strict.url + "/v1/completions", json=body, headers=HEADERS, timeout=60) as r:
            result["text"] = "".join(json.loads(line[6:])["choices"][0]["text"] for line in r.iter_lines()
                                     if line.startswith("data: {"))

    runner = threading.Thread(target=stream)
    runner.start()
    idle = [socket.create_connection(_address(strict.url)) for _ in range(10 * MAX_CONNECTIONS)]
    try:
        _assert_serving(client)  # served at once, although 10x the cap of idle sockets came first
        closed = 0
        for sock in idle:
            sock.settimeout(5)
            try:
                closed += sock.recv(1) == b""
            except (TimeoutError, ConnectionResetError):
                closed += 1
        assert closed >= len(idle) - MAX_CONNECTIONS
    finally:
        for sock in idle:
            sock.close()
    runner.join(60)
    assert result.get("text") == expected[0].outputs[0].text  # the busy connection was never the one closed


def test_busy_connections_are_not_evicted_and_the_newcomer_gets_503(strict, client):
    busy = []
    try:
        for _ in range(MAX_CONNECTIONS + 2):  # headers done, body pending: a request in progress on each
            sock = socket.create_connection(_address(strict.url))
            sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
                         "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n".encode())
            busy.append(sock)
        answers = [_read_until_closed(sock, 10)[0] for sock in busy]
    finally:
        for sock in busy:
            sock.close()
    assert any(a.startswith(b"HTTP/1.1 503") and b"too_many_connections" in a for a in answers)
    assert sum(a.startswith(b"HTTP/1.1 408") for a in answers) >= MAX_CONNECTIONS - 2  # their own body timeout
    _assert_serving(client)


def test_public_metrics_keep_docs_behind_the_key(strict):
    assert httpx.get(strict.url + "/metrics").status_code == 200
    assert httpx.get(strict.url + "/docs").status_code == 401
    assert httpx.get(strict.url + "/v1/models").status_code == 401


def test_reasoning_parser_none_still_sends_null_reasoning_fields(client):
    body = {**THINK_CHAT.request(), "max_tokens": 50, "temperature": 0}
    out = client.post("/v1/chat/completions", json=body).json()
    msg = out["choices"][0]["message"]
    assert msg["reasoning_content"] is None and msg["reasoning"] is None
    assert msg["content"].startswith("Greet them.") and msg["content"].endswith("Hello there!")
    assert out["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0
    stream = client.post("/v1/chat/completions", json={**body, "stream": True})
    deltas = [c["delta"] for line in stream.text.splitlines() if line.startswith("data: {")
              for c in json.loads(line[6:])["choices"]]
    assert deltas and all(d["reasoning_content"] is None and d["reasoning"] is None for d in deltas)


def test_reasoning_parser_none_constrains_from_the_first_token(client):
    """Without the parser the open <think> block would be content: a JSON response format starts at once, so the
    content is JSON (it held the reasoning and '</think>' before the JSON when the constraint waited for it)."""
    body = {**THINK_CHAT.request(), "max_tokens": 60, "temperature": 0, "response_format": {"type": "json_object"}}
    c = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert c["message"]["content"].lstrip().startswith("{") and "</think>" not in c["message"]["content"]
    if c["finish_reason"] == "stop":
        assert isinstance(json.loads(c["message"]["content"]), dict)


def test_trusted_request_template_renders(client):
    template = "{% for m in messages %}<<{{ m.content }}>>{% endfor %}"
    r = client.post("/v1/tokenize", json={"messages": [{"role": "user", "content": "hi"}], "chat_template": template})
    assert r.status_code == 200
    assert client.post("/v1/detokenize", json={"tokens": r.json()["tokens"]}).json()["prompt"] == "<<hi>>"
    kwargs = {"chat_template": template}
    chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                     "chat_template_kwargs": kwargs, "max_tokens": 3})
    assert chat.status_code == 200


BOMBS = [("memory", "{{ 'x' * 10000000000 }}"),
         ("size", "{% for i in range(100000) %}xxxxxxxxxxxxxxxxxxxx{% endfor %}"),
         ("time", "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")]


async def _timed_stream(c: httpx.AsyncClient, max_tokens: int) -> tuple[str, float]:
    body = {"prompt": "Once", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    text, gaps, last = "", [0.0], None
    async with c.stream("POST", "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                now = time.monotonic()
                gaps.append(0.0 if last is None else now - last)
                last = now
                text += json.loads(line[6:])["choices"][0]["text"]
    return text, max(gaps)


def test_template_bombs_cost_their_request_only(strict, client, reference):
    expected = reference.generate(["Once"], SamplingParams(temperature=0, max_tokens=150, ignore_eos=True))

    async def main():
        async with httpx.AsyncClient(base_url=strict.url, headers=HEADERS, timeout=60) as c:
            stream = asyncio.create_task(_timed_stream(c, 150))
            answers = []
            for _, template in BOMBS:
                t0 = time.monotonic()
                r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                               "chat_template": template, "max_tokens": 2})
                answers.append((r, time.monotonic() - t0))
            return answers, await stream

    answers, (text, max_gap) = asyncio.run(main())
    for (kind, _), (r, took) in zip(BOMBS, answers):
        assert r.status_code == 400 and r.json()["error"]["code"] == "chat_template_bounds", (kind, r.text)
        assert took < 8, (kind, took)
    assert "--chat-template-timeout" in answers[2][0].json()["error"]["message"]
    assert text == expected[0].outputs[0].text and max_gap < 2.0  # the stream never waited on a template
    ok = client.post("/v1/chat/completions", json={**THINK_CHAT.request(), "max_tokens": 5})
    assert ok.status_code == 200  # the killed workers were replaced


def test_a_busy_port_fails_in_seconds_before_loading(strict, chat_ckpt):
    port = str(_address(strict.url)[1])
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "deltaserve.server", str(chat_ckpt), "--device", "cpu",
                           "--port", port], capture_output=True, text=True, timeout=60)
    out = done.stdout + done.stderr
    assert done.returncode != 0 and f"cannot listen on 127.0.0.1:{port}" in out, out
    assert "loading" not in out and "Traceback" not in out and time.monotonic() - t0 < 30
    assert httpx.get(strict.url + "/health").status_code == 200
