"""Many streaming clients at once get the same tokens as the offline engine; a client that goes away mid-request
has its request aborted, and the engine's KV pages and state slots are all free again."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time

import httpx

from deltaserve import SamplingParams
from tests.server.conftest import API_KEY, engine_stats, metric_value, wait_pools_free

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


async def _stream_tokens(client: httpx.AsyncClient, prompt: list[int], max_tokens: int) -> tuple[str, str, bool]:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    text, finish, done = "", "", False
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            choice = json.loads(line[6:])["choices"][0]
            text += choice["text"]
            finish = choice["finish_reason"] or finish
    return text, finish, done


def test_64_concurrent_streams_match_offline_greedy(server, http, reference):
    rnd = random.Random(64)
    prompts = [[rnd.randrange(32, 127) for _ in range(rnd.randint(3, 40))] for _ in range(64)]
    expected = reference.generate([{"prompt_token_ids": p} for p in prompts],
                                  SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))

    async def main():
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=server.url, headers=HEADERS, timeout=120, limits=limits) as c:
            return await asyncio.gather(*(_stream_tokens(c, p, 8) for p in prompts))

    results = asyncio.run(main())
    assert [r[0] for r in results] == [e.outputs[0].text for e in expected]
    assert all(finish == "length" and done for _, finish, done in results)
    wait_pools_free(http)


def _raw_request(url: str, path: str, body: dict) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    payload = json.dumps(body).encode()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {API_KEY}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


def _cancelled_count(http: httpx.Client, endpoint: str) -> float:
    return metric_value(http, "requests_total", endpoint=endpoint, outcome="cancelled")


def test_disconnect_mid_stream_frees_pages_and_slot(server, http):
    before = _cancelled_count(http, "chat")
    sock = _raw_request(server.url, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "write a long story"}], "max_tokens": 450, "ignore_eos": True,
        "stream": True})
    received = b""
    while received.count(b"data: ") < 4:  # the role chunk and a few tokens
        received += sock.recv(65536)
    stats = engine_stats(http)
    assert stats["kv_pages_used"] > stats["kv_pages_cached"]  # the request holds memory while it runs
    sock.close()
    t0 = time.monotonic()
    wait_pools_free(http)
    assert time.monotonic() - t0 < 10
    assert _cancelled_count(http, "chat") == before + 1


def test_disconnect_while_waiting_for_a_non_streamed_reply(server, http):
    before = _cancelled_count(http, "completions")
    sock = _raw_request(server.url, "/v1/completions", {"prompt": "tell me", "max_tokens": 480, "ignore_eos": True})
    deadline = time.monotonic() + 10
    while engine_stats(http)["num_requests_running"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    sock.close()
    wait_pools_free(http)
    assert _cancelled_count(http, "completions") == before + 1
