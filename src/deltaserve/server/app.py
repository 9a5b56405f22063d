"""The OpenAI-compatible HTTP server: FastAPI routes over AsyncLLM, and `run_server` (what `deltaserve serve` runs).

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, POST /v1/tokenize, POST /v1/detokenize
(also without /v1), GET /health, GET /metrics (Prometheus), GET /version. With an API key, every route but
/health, /metrics and /version needs `Authorization: Bearer KEY`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from deltaserve import __version__
from deltaserve.engine.async_engine import AsyncLLM
from deltaserve.engine.tokenizer import TokenizerError, render_chat, require_tokenizer
from deltaserve.server.args import (ServerConfig, add_server_options, engine_args_from, resolve_model,
                                    server_config_from)
from deltaserve.server.chat_inputs import template_messages
from deltaserve.server.errors import APIError, bad_request, install_error_handlers
from deltaserve.server.metrics import CONTENT_TYPE
from deltaserve.server.protocol import DetokenizeRequest, TokenizeRequest, parse_body
from deltaserve.server.sampling import check_token_ids
from deltaserve.server.serving_chat import create_chat_completion
from deltaserve.server.serving_completions import create_completion
from deltaserve.server.state import ServerState

log = logging.getLogger("deltaserve.server")

__all__ = ["add_server_options", "build_app", "run_server"]

_ENGINE_PROBE_TIMEOUT_S = 10.0


def build_app(engine: AsyncLLM, config: ServerConfig, *, shutdown_engine: bool = True) -> FastAPI:
    """The ASGI app serving `engine`. With shutdown_engine, the app's shutdown stops the engine thread."""
    state = ServerState.create(engine, config)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.idle = asyncio.Event()
        state.idle.set()
        yield
        state.draining = True
        if shutdown_engine:
            await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="deltaserve", version=__version__, lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app)
    app.include_router(_api_router(state))
    app.include_router(_open_router(state))
    return app


def _api_router(state: ServerState) -> APIRouter:
    router = APIRouter(dependencies=[Depends(_auth(state.config.api_key))])

    @router.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": state.created, "owned_by": "deltaserve",
             "root": state.config.model_path, "parent": None, "max_model_len": state.limits.max_model_len}
            for name in state.config.served_model_names]}

    @router.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await create_completion(state, request)

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await create_chat_completion(state, request)

    @router.post("/v1/tokenize")
    @router.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        req = parse_body(await request.body(), TokenizeRequest)
        state.check_model(req.model)
        ids = await asyncio.to_thread(_tokenize, state, req)
        return {"count": len(ids), "max_model_len": state.limits.max_model_len, "tokens": ids}

    @router.post("/v1/detokenize")
    @router.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        req = parse_body(await request.body(), DetokenizeRequest)
        state.check_model(req.model)
        check_token_ids(req.tokens, state.limits.vocab_size, "tokens")
        tok = _tokenizer(state, "tokens")
        return {"prompt": tok.decode(req.tokens, skip_special_tokens=False)}

    return router


def _open_router(state: ServerState) -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health() -> Response:
        if state.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        try:
            await asyncio.wait_for(state.engine.call(lambda: True), _ENGINE_PROBE_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - any failure to answer means unhealthy
            return JSONResponse({"status": f"engine not responding: {type(e).__name__}"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @router.get("/metrics")
    async def metrics() -> Response:
        try:
            stats = await asyncio.wait_for(state.engine.call(state.engine.engine.stats), _ENGINE_PROBE_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - still serve the server-side metrics
            stats = {}
        return Response(state.metrics.render(stats), media_type=CONTENT_TYPE)

    @router.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    return router


def _auth(api_key: str | None):
    expected = api_key.encode() if api_key else None

    async def check(request: Request) -> None:
        if expected is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), expected):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' with the "
                           "key the server was started with (--api-key)", code="invalid_api_key")
    return check


def _tokenizer(state: ServerState, param: str):
    try:
        return require_tokenizer(state.tokenizer, "tokenizing")
    except TokenizerError as e:
        raise bad_request(str(e), param) from None


def _tokenize(state: ServerState, req: TokenizeRequest) -> list[int]:
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("give exactly one of 'prompt' (text) or 'messages' (a chat)", "prompt")
    tok = _tokenizer(state, "prompt" if req.prompt is not None else "messages")
    if req.prompt is not None:
        return tok.encode(req.prompt, add_special_tokens=req.add_special_tokens)
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    try:
        return render_chat(tok, template_messages(req.messages or []), tools=tools,
                           add_generation_prompt=req.add_generation_prompt,
                           chat_template_kwargs=req.chat_template_kwargs)
    except TokenizerError as e:
        raise bad_request(str(e), "messages") from None


def run_server(args: argparse.Namespace) -> int:
    """Load the engine from the parsed `deltaserve serve` options (cli.add_engine_options + add_server_options) and
    serve until SIGTERM/SIGINT. Blocks; returns 0 after a graceful shutdown."""
    import uvicorn

    from deltaserve.server.lifecycle import GracefulServer

    model = resolve_model(args)
    config = server_config_from(args, model)
    _setup_logging(config.log_level)
    engine_args = engine_args_from(args, model)
    log.info("loading %s on %s", model, engine_args.device)
    engine = AsyncLLM(engine_args)
    app = build_app(engine, config)
    uv_config = uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                               access_log=config.log_level in ("debug", "trace"),
                               timeout_graceful_shutdown=config.shutdown_timeout + 10, timeout_keep_alive=30)
    try:
        GracefulServer(uv_config, app.state.server).run()
    finally:
        engine.shutdown()
    return 0


def _setup_logging(level: str) -> None:
    numeric = logging.DEBUG if level == "trace" else getattr(logging, level.upper())
    logging.basicConfig(level=numeric, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("deltaserve").setLevel(numeric)
