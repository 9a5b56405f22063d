"""Server options: a frozen, validated ServerConfig, and the argparse options of `deltaserve serve`.

The CLI adds MODEL, its engine options and --log-level (cli.add_model_and_engine_options) and `add_server_options`;
`add_serve_args` does both for `python -m deltaserve.server`. `run_server` reads the namespace with getattr and
defaults, so a namespace missing an option still works.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltaserve.config import EngineArgs

REASONING_PARSERS = ("qwen3", "none")
TOOL_CALL_PARSERS = ("qwen3_coder", "none")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's names
# CORS lists (vLLM's options, values and defaults), with the example each one's error shows
CORS_LISTS = {"allowed_origins": '["https://app.example.com"]', "allowed_methods": '["GET", "POST"]',
              "allowed_headers": '["Authorization", "Content-Type"]'}


class ServerConfigError(ValueError):
    """An invalid server option; the message names the option and a valid value."""


@dataclass(frozen=True)
class ServerConfig:
    """How the HTTP front behaves (the engine's own options are EngineArgs)."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_names: tuple[str, ...] = ("deltaserve",)
    model_path: str = ""
    reasoning_parser: str = "qwen3"
    tool_call_parser: str = "qwen3_coder"
    exclude_tools_when_tool_choice_none: bool = False  # vLLM's option of that name
    shutdown_timeout: float = 30.0
    log_level: str = "warning"
    # Hardening: what one client may cost the server (README, "Limits")
    max_request_bytes: int = 16 * 1024 * 1024
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    max_connections: int = 1024
    chat_template_timeout: float = 10.0
    trust_request_chat_template: bool = False
    public_metrics: bool = False
    # CORS, as vLLM's OpenAI server (its names and defaults): which browser pages, on other origins, may call it
    allowed_origins: tuple[str, ...] = ("*",)
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False

    def __post_init__(self) -> None:
        _require(0 <= self.port <= 65535, f"--port {self.port} is invalid: use 0-65535 (0 picks a free port)")
        _check_api_key(self.api_key)
        _require(len(self.served_model_names) > 0 and all(self.served_model_names),
                 "--served-model-name needs at least one non-empty name")
        _require(self.reasoning_parser in REASONING_PARSERS,
                 f"--reasoning-parser {self.reasoning_parser!r} is unknown: use one of {REASONING_PARSERS}")
        _require(self.tool_call_parser in TOOL_CALL_PARSERS,
                 f"--tool-call-parser {self.tool_call_parser!r} is unknown: use one of {TOOL_CALL_PARSERS}")
        _require(self.shutdown_timeout >= 0, f"--shutdown-timeout {self.shutdown_timeout} must be >= 0 seconds")
        _require(self.log_level in LOG_LEVELS, f"--log-level {self.log_level!r} is unknown: use one of {LOG_LEVELS}")
        _require(self.max_request_bytes >= 1024, f"--max-request-bytes {self.max_request_bytes} is too small: "
                 "use at least 1024 bytes")
        for name in ("header_timeout", "body_timeout", "chat_template_timeout"):
            value = getattr(self, name)
            _require(math.isfinite(value) and value > 0,
                     f"--{name.replace('_', '-')} {value} is invalid: use a number of seconds > 0")
        _require(self.max_connections >= 1, f"--max-connections {self.max_connections} must be >= 1")
        for name in CORS_LISTS:
            value = getattr(self, name)
            _require(_is_strings(value), f"--{name.replace('_', '-')} {_cors_error(name, value)}")
        _require(isinstance(self.allow_credentials, bool),
                 f"--allow-credentials is a switch: give it or leave it out (got {self.allow_credentials!r})")


def _is_strings(value: object) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(s, str) for s in value)


def _cors_error(name: str, got: object) -> str:
    flag = "--" + name.replace("_", "-")
    return f"must be a JSON list of strings, e.g. {flag} '{CORS_LISTS[name]}' (got {got!r})"


def _json_strings(name: str) -> Callable[[str], tuple[str, ...]]:
    """argparse type of a CORS list: JSON, as vLLM takes it; anything else is a usage error naming the option."""
    def parse(text: str) -> tuple[str, ...]:
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        if not _is_strings(value):
            raise argparse.ArgumentTypeError(_cors_error(name, text))
        return tuple(value)
    return parse


def _check_api_key(key: str | None) -> None:
    """The key travels in an HTTP header, which carries ASCII only; a key a client cannot send locks everyone out."""
    if key is None:
        return
    _require(len(key) > 0, "--api-key is empty: give a key or leave it out")
    bad = next((c for c in key if not " " <= c <= "~"), None)
    _require(bad is None, f"--api-key contains {bad!r}: use printable ASCII characters only (HTTP headers cannot "
             "carry others)")
    _require(key == key.strip(), "--api-key starts or ends with a space: remove it")


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ServerConfigError(message)


def add_serve_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Every option of `deltaserve serve`: the CLI's engine options (MODEL, --device, ..., --log-level) and the
    server's own."""
    from deltaserve.cli import add_model_and_engine_options

    add_model_and_engine_options(parser)
    add_server_options(parser)
    return parser


def add_server_options(parser: argparse.ArgumentParser) -> None:
    """The server's own options (the CLI adds the engine options and --log-level)."""
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; 0.0.0.0 for all interfaces)")
    g.add_argument("--port", type=int, default=8000,
                   help="TCP port (default 8000; 0: any free port, the log says which)")
    g.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every route but /health and "
                                                    "/version (docs pages and /metrics included)")
    g.add_argument("--served-model-name", nargs="+", default=None,
                   help="model name(s) clients send in 'model' (default: the model directory's name)")
    g.add_argument("--reasoning-parser", choices=REASONING_PARSERS, default="qwen3",
                   help="qwen3: <think>...</think> goes to reasoning_content (default); none: left in content")
    g.add_argument("--tool-call-parser", choices=TOOL_CALL_PARSERS, default="qwen3_coder",
                   help="qwen3_coder: <tool_call> blocks become OpenAI tool_calls (default); none: left in content")
    g.add_argument("--exclude-tools-when-tool-choice-none", action="store_true",
                   help="leave the request's tools out of the prompt when tool_choice is 'none' (by default they are "
                        "listed, as in vLLM, and the model is only not asked to call them)")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds in-flight requests may run before they are aborted (default 30)")
    _add_limit_options(parser.add_argument_group("server limits"))
    _add_cors_options(parser.add_argument_group("server CORS (browser pages on other origins)"))


def _add_limit_options(g: argparse._ArgumentGroup) -> None:
    d = ServerConfig()
    g.add_argument("--max-request-bytes", type=int, default=d.max_request_bytes,
                   help=f"largest request body accepted; larger ones get 413 (default {d.max_request_bytes})")
    g.add_argument("--header-timeout", type=float, default=d.header_timeout,
                   help=f"seconds a client may take to send a request's headers (default {d.header_timeout:g})")
    g.add_argument("--body-timeout", type=float, default=d.body_timeout,
                   help=f"seconds a client may take to send a request's body; then 408 (default {d.body_timeout:g})")
    g.add_argument("--max-connections", type=int, default=d.max_connections,
                   help="open connections at most; past it the longest-idle connection is closed (default "
                        f"{d.max_connections})")
    g.add_argument("--chat-template-timeout", type=float, default=d.chat_template_timeout,
                   help=f"seconds one chat template rendering may take; then 400 (default {d.chat_template_timeout:g})")
    g.add_argument("--trust-request-chat-template", action="store_true",
                   help="let requests bring their own chat template (chat_template / chat_template_kwargs."
                        "chat_template); off by default: a template is code the server runs")
    g.add_argument("--public-metrics", action="store_true",
                   help="with --api-key: serve /metrics without the key (for scrapers); docs pages stay protected")


def _add_cors_options(g: argparse._ArgumentGroup) -> None:
    for name, what in (("allowed_origins", "origins (scheme://host[:port]) whose pages may call the server"),
                       ("allowed_methods", "HTTP methods those pages may use"),
                       ("allowed_headers", "request headers those pages may send")):
        g.add_argument("--" + name.replace("_", "-"), type=_json_strings(name), default=("*",),
                       help=f"{what}, as a JSON list, e.g. '{CORS_LISTS[name]}' (default '[\"*\"]': any)")
    g.add_argument("--allow-credentials", action="store_true",
                   help="let those pages send cookies and HTTP authentication (Access-Control-Allow-Credentials)")


def resolve_model(args: argparse.Namespace) -> str:
    model = getattr(args, "model", None)
    if model:
        return str(model)
    from deltaserve.demo import demo_model_dir

    return str(demo_model_dir())


def engine_args_from(args: argparse.Namespace, model: str) -> EngineArgs:
    """EngineArgs from whichever engine options the namespace has (absent ones keep their defaults), with the
    device resolved (the log names it)."""
    from deltaserve.config import engine_args_from as from_namespace
    from deltaserve.llm import default_device

    return from_namespace(args, model, device=getattr(args, "device", None) or default_device())


def server_config_from(args: argparse.Namespace, model: str) -> ServerConfig:
    """A ServerConfig from whichever options the namespace has (same names as the fields); absent or None ones keep
    the defaults."""
    names = getattr(args, "served_model_name", None)
    if isinstance(names, str):
        names = [names]
    # the directory's name as the path spells it: '.' and 'x/..' made '' and '..' (abspath, unlike resolve, keeps a
    # symlinked directory's own name)
    default_name = Path(os.path.abspath(model)).name or model if getattr(args, "model", None) else "deltaserve-demo"
    given: dict[str, Any] = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServerConfig)
                             if getattr(args, f.name, None) is not None}
    given.update(served_model_names=tuple(names or [default_name]), model_path=model)
    given["log_level"] = str(given.get("log_level") or ServerConfig.log_level).lower()
    return ServerConfig(**given)
