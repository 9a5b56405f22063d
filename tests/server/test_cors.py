"""CORS, with vLLM's options and defaults (--allowed-origins, --allowed-methods, --allowed-headers: JSON lists, ["*"];
--allow-credentials: off): a browser page on another origin can call the server, a restricted list admits only its
origins, and a value that is not a JSON list of strings stops `deltaserve serve` at start, naming the option."""

from __future__ import annotations

import argparse
import asyncio

import httpx
import pytest

from deltaserve.demo import SHIPPED_DEMO_DIR

KEY = "k"
PAGE = "http://localhost:3000"
APP_ORIGIN = "https://app.example.com"


def _preflight(origin: str, method: str = "POST") -> tuple[str, str, dict[str, str]]:
    """What a browser sends before a cross-origin POST with a bearer key and a JSON body (without the key itself)."""
    return "OPTIONS", "/v1/chat/completions", {"Origin": origin, "Access-Control-Request-Method": method,
                                               "Access-Control-Request-Headers": "authorization,content-type"}


def _get(origin: str, path: str = "/v1/models", key: str | None = KEY) -> tuple[str, str, dict[str, str]]:
    return "GET", path, {"Origin": origin, **({"Authorization": f"Bearer {key}"} if key else {})}


@pytest.fixture(scope="module")
def engine():
    from deltaserve.config import EngineArgs
    from deltaserve.engine.async_engine import AsyncLLM

    engine = AsyncLLM(EngineArgs(model=str(SHIPPED_DEMO_DIR), device="cpu", dtype="float32", max_model_len=512))
    yield engine
    engine.shutdown()


def _config(*flags: str):
    """The ServerConfig `deltaserve serve m --api-key k FLAGS` builds."""
    from deltaserve.server.args import add_serve_args, server_config_from

    return server_config_from(add_serve_args(argparse.ArgumentParser()).parse_args(["m", "--api-key", KEY, *flags]),
                              "m")


def _send(engine, config, *requests: tuple) -> list[httpx.Response]:
    """Each request: (method, path, headers) or (method, path, headers, body)."""
    from deltaserve.server.app import build_app

    app = build_app(engine, config, shutdown_engine=False)

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60) as c:
            return [await c.request(*request[:2], headers=request[2], content=request[3] if len(request) > 3 else None)
                    for request in requests]

    return asyncio.run(main())


def test_by_default_any_origin_may_call(engine):
    """Preflights are answered without the key (browsers send none with them); responses, a 401 and the guard's 413
    too, carry the header that lets the page read them."""
    too_big = ("POST", "/v1/completions", {**_get(PAGE)[2], "Content-Type": "application/json"}, b"{" + b" " * 2048)
    pre, models, unauthorized, refused = _send(engine, _config("--max-request-bytes", "1024"), _preflight(PAGE),
                                               _get(PAGE), _get(PAGE, key=None), too_big)
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "*"
    assert "POST" in pre.headers["access-control-allow-methods"]
    assert pre.headers["access-control-allow-headers"].lower() == "authorization,content-type"
    assert "access-control-allow-credentials" not in pre.headers
    assert models.status_code == 200 and models.headers["access-control-allow-origin"] == "*"
    assert models.json()["data"][0]["id"] == "m"
    # the page's script may read the request id (errors name it; it was hidden from cross-origin scripts)
    assert models.headers["access-control-expose-headers"].lower() == "x-request-id" and models.headers["x-request-id"]
    assert unauthorized.status_code == 401 and unauthorized.headers["access-control-allow-origin"] == "*"
    assert refused.status_code == 413 and refused.headers["access-control-allow-origin"] == "*"


def test_a_restricted_list_admits_only_its_origins_and_methods(engine):
    config = _config("--allowed-origins", f'["{APP_ORIGIN}"]', "--allowed-methods", '["GET", "POST"]',
                     "--allowed-headers", '["Authorization", "Content-Type"]', "--allow-credentials")
    assert (config.allowed_origins, config.allowed_methods) == ((APP_ORIGIN,), ("GET", "POST"))
    ok, other, delete, models, other_models = _send(engine, config, _preflight(APP_ORIGIN), _preflight(PAGE),
                                                    _preflight(APP_ORIGIN, "DELETE"), _get(APP_ORIGIN), _get(PAGE))
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == APP_ORIGIN
    assert ok.headers["access-control-allow-credentials"] == "true"
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    assert delete.status_code == 400 and "method" in delete.text.lower()
    assert models.status_code == 200 and models.headers["access-control-allow-origin"] == APP_ORIGIN
    # served (CORS is the browser's check), but without the header the browser would need to hand it to the page
    assert other_models.status_code == 200 and "access-control-allow-origin" not in other_models.headers


@pytest.mark.parametrize("value", ["*", "http://a.example", '"*"', "[1]", '["a", null]', '{"origins": ["a"]}', "[a]"])
@pytest.mark.parametrize("flag", ["--allowed-origins", "--allowed-methods", "--allowed-headers"])
def test_a_value_that_is_not_a_json_list_of_strings_stops_serve_at_start(capsys, flag, value):
    from deltaserve import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--device", "cpu", flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: must be a JSON list of strings, e.g. {flag} '[" in err, err
    assert repr(value) in err and "Traceback" not in err


def test_the_server_config_refuses_what_the_flags_cannot_express():
    """ServerConfig built in Python (not from the flags) is held to the same rule."""
    from deltaserve.server.args import ServerConfig, ServerConfigError

    with pytest.raises(ServerConfigError, match=r"--allowed-origins must be a JSON list of strings, e\.g\."):
        ServerConfig(allowed_origins="*")  # type: ignore[arg-type]
    with pytest.raises(ServerConfigError, match="--allowed-headers"):
        ServerConfig(allowed_headers=("Authorization", 3))  # type: ignore[arg-type]
    with pytest.raises(ServerConfigError, match="--allow-credentials"):
        ServerConfig(allow_credentials="yes")  # type: ignore[arg-type]
    assert ServerConfig(allowed_origins=()).allowed_origins == ()  # no origin: cross-origin calls all refused


def test_the_served_process_answers_a_preflight(server):
    """The real `python -m deltaserve.server` (session server, started with --api-key and no CORS flags)."""
    method, path, headers = _preflight(PAGE)
    r = httpx.request(method, server.url + path, headers=headers, timeout=30)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
