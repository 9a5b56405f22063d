"""Graceful shutdown of a real server process on SIGTERM, and an engine failure that fails one request only."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest

from tests.server.conftest import API_KEY, ServerProcess

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


class _Stream(threading.Thread):
    """Reads one streaming completion in the background; records its events."""

    def __init__(self, url: str, body: dict) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, {**body, "stream": True, "ignore_eos": True}
        self.events: list[dict | str] = []
        self.error: BaseException | None = None
        self.started_streaming = threading.Event()

    def run(self) -> None:
        try:
            with httpx.stream("POST", self.url + "/v1/completions", json=self.body, headers=HEADERS,
                              timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.events.append("[DONE]" if line == "data: [DONE]" else json.loads(line[6:]))
                        self.started_streaming.set()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e
            self.started_streaming.set()

    def finish_reason(self) -> str | None:
        return next((c["finish_reason"] for e in self.events if isinstance(e, dict)
                     for c in e.get("choices", []) if c.get("finish_reason")), None)


def test_sigterm_finishes_short_requests_aborts_long_ones_and_exits_cleanly(chat_ckpt, tmp_path):
    srv = ServerProcess(chat_ckpt, tmp_path / "server.log", "--api-key", API_KEY, "--shutdown-timeout", "4",
                        "--max-model-len", "8192")
    try:
        long = _Stream(srv.url, {"prompt": "a long one", "max_tokens": 8000})
        long.start()
        assert long.started_streaming.wait(30)
        short = _Stream(srv.url, {"prompt": "a short one", "max_tokens": 12})
        short.start()
        assert short.started_streaming.wait(30)
        srv.terminate()
        time.sleep(0.3)  # the drain starts on uvicorn's next tick (0.1 s)
        try:  # while draining: refused (503) or, once the socket closed, not connected at all
            late = httpx.post(srv.url + "/v1/completions", json={"prompt": "late", "max_tokens": 2}, headers=HEADERS,
                              timeout=10)
            assert late.status_code == 503 and late.json()["error"]["code"] == "server_shutting_down"
        except httpx.ConnectError:
            pass
        short.join(30)
        long.join(30)
        assert srv.proc.wait(30) == 0
    finally:
        srv.stop(kill=True)
    assert short.error is None and short.events[-1] == "[DONE]" and short.finish_reason() == "length"
    assert long.error is None and long.events[-1] == "[DONE]"
    aborted = long.events[-2]
    assert aborted["error"]["code"] == "request_aborted", aborted  # a clean error event, not a cut connection
    log = srv.log()
    assert "aborting 1 request(s)" in log and "Traceback" not in log


@pytest.fixture()
def app_with_faulty_engine(chat_ckpt):
    """The real engine in this process, its runner made to fail the next step on demand."""
    from deltaserve.engine.async_engine import AsyncLLM
    from deltaserve.config import EngineArgs
    from deltaserve.server.app import build_app
    from deltaserve.server.args import ServerConfig

    engine = AsyncLLM(EngineArgs(model=str(chat_ckpt), device="cpu", dtype="float32", max_model_len=512))
    runner = engine.engine.runner
    real_execute = runner.execute_model
    fail = threading.Event()

    def execute(*args, **kwargs):
        if fail.is_set():
            fail.clear()
            raise RuntimeError("injected device fault")
        return real_execute(*args, **kwargs)

    runner.execute_model = execute
    app = build_app(engine, ServerConfig(served_model_names=("m",)), shutdown_engine=False)
    yield app, fail
    engine.shutdown()


def test_engine_error_fails_one_request_with_500_and_server_goes_on(app_with_faulty_engine, caplog):
    app, fail = app_with_faulty_engine

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as c:
            fail.set()
            bad = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 4})
            fail.set()
            stream = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                                "max_tokens": 4, "stream": True})
            ok = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 4, "ignore_eos": True})
            return bad, stream, ok

    bad, stream, ok = asyncio.run(main())
    assert bad.status_code == 500
    err = bad.json()["error"]
    assert err["type"] == "server_error" and err["code"] == "engine_error"
    # the body says what failed and gives the request id; the exception text goes to the log under that id only
    request_id = bad.headers["x-request-id"]
    assert request_id in err["message"] and "injected" not in err["message"] and "RuntimeError" not in err["message"]
    logged = [r.getMessage() for r in caplog.records if request_id in r.getMessage()]
    assert any("injected device fault" in line for line in logged), logged
    events = [line[6:] for line in stream.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "engine_error"
    assert "injected" not in events[-2]
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4
