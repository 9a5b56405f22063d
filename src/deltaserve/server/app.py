"""The OpenAI-compatible HTTP server: FastAPI routes over AsyncLLM, and `run_server` (what `deltaserve serve` runs).

Routes: GET /v1/models, GET /v1/models/{model}, POST /v1/completions, POST /v1/chat/completions, POST /v1/tokenize,
POST /v1/detokenize (also without /v1), GET|HEAD /health, GET /metrics (Prometheus), GET /version, and the docs pages
(/docs, /redoc, /openapi.json). With an API key, every route but /health and /version needs
`Authorization: Bearer KEY` (/metrics too, unless --public-metrics). Browser pages on other origins get CORS headers
(--allowed-origins, --allowed-methods, --allowed-headers, --allow-credentials, as in vLLM).
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
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import JSONResponse, Response
from starlette.middleware.cors import CORSMiddleware

from deltaserve import __version__
from deltaserve.engine.async_engine import AsyncLLM
from deltaserve.engine.tokenizer import TokenizerError, require_tokenizer
from deltaserve.server.args import ServerConfig, add_server_options
from deltaserve.server.chat_inputs import resolve_tools
from deltaserve.server.chat_prompt import ChatRequestParts, render_prompt
from deltaserve.server.errors import APIError, bad_request, install_error_handlers
from deltaserve.server.http_guard import RequestGuard
from deltaserve.server.metrics import CONTENT_TYPE
from deltaserve.server.protocol import DetokenizeRequest, TokenizeRequest, read_json
from deltaserve.server.sampling import check_token_ids
from deltaserve.server.serving_chat import create_chat_completion
from deltaserve.server.serving_completions import create_completion
from deltaserve.server.state import ServerState
from deltaserve.server.templates import TemplateRenderer
from deltaserve.server.tokens import encode_bounded

log = logging.getLogger("deltaserve.server")

__all__ = ["add_server_options", "build_app", "run_server"]

_ENGINE_PROBE_TIMEOUT_S = 10.0


def build_app(engine: AsyncLLM, config: ServerConfig, *, shutdown_engine: bool = True,
              templates: TemplateRenderer | None = None) -> FastAPI:
    """The ASGI app serving `engine`. With shutdown_engine, the app's shutdown stops the engine thread."""
    state = ServerState.create(engine, config, templates)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.idle = asyncio.Event()
        state.idle.set()
        warm = asyncio.create_task(asyncio.to_thread(_warm_grammar_tokenizer, engine))
        yield
        warm.cancel()
        state.draining = True
        await asyncio.to_thread(state.templates.close)
        if shutdown_engine:
            await asyncio.to_thread(engine.shutdown)

    # The docs pages are served by _docs_router, behind the key when there is one.
    app = FastAPI(title="deltaserve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.server = state
    install_error_handlers(app)
    app.include_router(_api_router(state))
    app.include_router(_docs_router(app, config.api_key))
    app.include_router(_open_router(state))
    app.add_middleware(RequestGuard, max_body_bytes=config.max_request_bytes, body_timeout=config.body_timeout)
    # added last, so outermost: a preflight is answered before the key check (browsers send it without the key), and
    # every response, the guard's 408/413 and a 401 included, carries what the page needs to read it
    # the request id (errors name it) readable by a page's script too, so a browser client can report it
    app.add_middleware(CORSMiddleware, allow_origins=config.allowed_origins, allow_methods=config.allowed_methods,
                       allow_headers=config.allowed_headers, allow_credentials=config.allow_credentials,
                       expose_headers=["X-Request-Id"])
    return app


def _warm_grammar_tokenizer(engine: AsyncLLM) -> None:
    """Build the structured-output tokenizer trie now (seconds for a large vocabulary), not on the first
    constrained request. A model without a tokenizer has none to build; its constrained requests get a 400."""
    try:
        engine.engine.structured.compiler.ll_tokenizer
    except Exception as e:  # noqa: BLE001 - reported again, to the client, by the first constrained request
        log.info("structured outputs unavailable: %s", e)


def _api_router(state: ServerState) -> APIRouter:
    router = APIRouter(dependencies=[Depends(_auth(state.config.api_key))])

    @router.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [state.model_card(name) for name in state.config.served_model_names]}

    @router.get("/v1/models/{model:path}")  # :path: served names may contain "/" (org/model)
    async def model(model: str) -> dict[str, Any]:
        return state.check_model_name(model)

    @router.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await create_completion(state, request)

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await create_chat_completion(state, request)

    @router.post("/v1/tokenize")
    @router.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        req = await read_json(request, TokenizeRequest)
        state.check_model(req.model)
        ids = await _tokenize(state, req)
        return {"count": len(ids), "max_model_len": state.limits.max_model_len, "tokens": ids}

    @router.post("/v1/detokenize")
    @router.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        req = await read_json(request, DetokenizeRequest)
        state.check_model(req.model)
        check_token_ids(req.tokens, state.limits.vocab_size, "tokens")
        tok = _tokenizer(state, "tokens")
        return {"prompt": await asyncio.to_thread(tok.decode, req.tokens, skip_special_tokens=False)}

    if state.config.api_key is not None and not state.config.public_metrics:
        router.add_api_route("/metrics", _metrics_route(state), methods=["GET"])
    return router


def _docs_router(app: FastAPI, api_key: str | None) -> APIRouter:
    """/openapi.json, /docs and /redoc; with an API key they need it too (the schema maps the whole surface)."""
    router = APIRouter(dependencies=[Depends(_auth(api_key))], include_in_schema=False)

    @router.get("/openapi.json")
    async def openapi() -> dict[str, Any]:
        return app.openapi()

    @router.get("/docs")
    async def docs() -> Response:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="deltaserve")

    @router.get("/redoc")
    async def redoc() -> Response:
        return get_redoc_html(openapi_url="/openapi.json", title="deltaserve")

    return router


def _open_router(state: ServerState) -> APIRouter:
    router = APIRouter()

    @router.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> Response:
        if state.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        if state.engine.dead is not None:  # for good: the log has the cause (logged once, when it died)
            return JSONResponse({"status": "engine dead"}, status_code=503)
        try:
            await asyncio.wait_for(state.engine.call(lambda: True), _ENGINE_PROBE_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - any failure to answer means unhealthy
            log.warning("/health: the engine did not answer within %.0fs", _ENGINE_PROBE_TIMEOUT_S, exc_info=True)
            return JSONResponse({"status": "engine not responding"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @router.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    if state.config.api_key is None or state.config.public_metrics:
        router.add_api_route("/metrics", _metrics_route(state), methods=["GET"])
    return router


def _metrics_route(state: ServerState):
    async def metrics() -> Response:
        try:
            stats = await asyncio.wait_for(state.engine.call(state.engine.engine.stats), _ENGINE_PROBE_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - still serve the server-side metrics
            stats = {}
        return Response(state.metrics.render(stats), media_type=CONTENT_TYPE)

    return metrics


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


async def _tokenize(state: ServerState, req: TokenizeRequest) -> list[int]:
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("give exactly one of 'prompt' (text) or 'messages' (a chat)", "prompt")
    if req.messages is None:
        tok = _tokenizer(state, "prompt")
        return await asyncio.to_thread(encode_bounded, tok, req.prompt or "", state.limits.max_model_len - 1,
                                       add_special_tokens=req.add_special_tokens, field="prompt")
    # the tools chat would list for this tool_choice (and chat's refusals: a forced call without a tool parser)
    tools = resolve_tools(req, parse=state.config.tool_call_parser != "none",
                          exclude_tools_when_none=state.config.exclude_tools_when_tool_choice_none).for_template
    parts = ChatRequestParts(req.messages, tools, req.add_generation_prompt, req.chat_template,
                             req.chat_template_kwargs, req.documents, req.continue_final_message)
    return (await render_prompt(state, parts)).ids


def run_server(args: argparse.Namespace) -> int:
    """Serve the model the parsed `deltaserve serve` options name until SIGTERM/SIGINT (startup.py). Blocks;
    returns 0 after a graceful shutdown, 1 after a second signal cut it short."""
    from deltaserve.server.startup import run

    return run(args)
