"""`deltaserve serve`: bind the port, load the model, check its chat template, serve until a signal.

The order matters to an operator: a busy port or a bad option fails in a second, before minutes of weight loading;
a model whose chat template cannot render a plain conversation fails at start with the template's error, instead
of failing every chat request with a 400 that blames the client.
"""

from __future__ import annotations

import argparse
import logging
import socket

import uvicorn

from deltaserve.engine.async_engine import AsyncLLM
from deltaserve.parallel.launch import is_worker_process, run_worker_from_env
from deltaserve.server.app import build_app
from deltaserve.server.args import ServerConfig, ServerConfigError, engine_args_from, resolve_model, server_config_from
from deltaserve.server.connections import guarded_protocol
from deltaserve.server.lifecycle import GracefulServer
from deltaserve.server.state import ServerState, template_limits
from deltaserve.server.templates import PROBE, TemplateRenderer, TemplateRenderError

log = logging.getLogger("deltaserve.server")

_BACKLOG = 2048
_KEEP_ALIVE_S = 30


def run(args: argparse.Namespace) -> int:
    model = resolve_model(args)
    config = server_config_from(args, model)
    _setup_logging(config.log_level)
    # a torchrun-style launch, on another rank than 0: run rank 0's steps instead of serving HTTP
    if is_worker_process(getattr(args, "tensor_parallel_size", 1)):
        return run_worker_from_env(engine_args_from(args, model).create_engine_config())
    sock = bind_socket(config.host, config.port)
    templates = TemplateRenderer(template_limits(config))
    templates.start()  # the workers import while the weights load
    try:
        engine_args = engine_args_from(args, model)
        log.info("loading %s on %s", model, engine_args.device)
        engine = AsyncLLM(engine_args)
        try:
            app = build_app(engine, config, templates=templates)
            state: ServerState = app.state.server
            check_chat_template(state, model)
            server = GracefulServer(_uvicorn_config(app, config), state)
            server.run(sockets=[sock])
            if server.forced:
                log.warning("a second signal stopped the server: %d request(s) aborted unfinished", server.unfinished)
        finally:
            engine.shutdown()
    finally:
        templates.close()
        sock.close()
    return 1 if server.forced else 0


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket, before anything slow happens (a busy port is then a one-line error in a second)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise ServerConfigError(f"--host {host!r} cannot be used: {e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(_BACKLOG)
    except OSError as e:
        sock.close()
        raise ServerConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port "
                                "(or stop what is using it)") from None
    sock.set_inheritable(True)
    return sock


def check_chat_template(state: ServerState, model: str) -> None:
    """Render a one-message conversation with each of the model's templates; a failure stops the server."""
    tokenizer = state.tokenizer
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if not template:
        log.info("the model has no chat template: /v1/chat/completions will answer 400")
        return
    sources = template.items() if isinstance(template, dict) else [("chat_template", template)]
    for name, source in sources:
        try:
            state.templates.render(source, PROBE, tools=None, add_generation_prompt=True,
                                   kwargs=dict(state.special_tokens))
        except TemplateRenderError as e:
            raise ServerConfigError(f"the chat template ({name}) of {model} cannot render a one-message chat: "
                                    f"{e.message}; fix the template (tokenizer_config.json or "
                                    "chat_template.jinja)") from None


def _uvicorn_config(app, config: ServerConfig) -> uvicorn.Config:  # type: ignore[no-untyped-def]
    return uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                          access_log=config.log_level in ("debug", "trace"),
                          timeout_graceful_shutdown=config.shutdown_timeout + 10,  # type: ignore[arg-type]
                          timeout_keep_alive=_KEEP_ALIVE_S,
                          http=guarded_protocol(config.header_timeout, config.max_connections))


def _setup_logging(level: str) -> None:
    numeric = logging.DEBUG if level == "trace" else getattr(logging, level.upper())
    logging.basicConfig(level=numeric, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("deltaserve").setLevel(numeric)
