"""Server options: a frozen, validated ServerConfig, and the argparse options of `deltaserve serve`.

The CLI adds its engine options (cli.add_engine_options, which include --log-level) and `add_server_options`;
`add_serve_args` does both for `python -m deltaserve.server`. `run_server` reads the namespace with getattr and
defaults, so a namespace missing an option still works.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltaserve.config import EngineArgs

REASONING_PARSERS = ("qwen3", "none")
TOOL_CALL_PARSERS = ("qwen3_coder", "none")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's names


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
    shutdown_timeout: float = 30.0
    log_level: str = "warning"

    def __post_init__(self) -> None:
        _require(0 <= self.port <= 65535, f"--port {self.port} is invalid: use 0-65535 (0 picks a free port)")
        _require(self.api_key is None or len(self.api_key) > 0, "--api-key is empty: give a key or leave it out")
        _require(len(self.served_model_names) > 0 and all(self.served_model_names),
                 "--served-model-name needs at least one non-empty name")
        _require(self.reasoning_parser in REASONING_PARSERS,
                 f"--reasoning-parser {self.reasoning_parser!r} is unknown: use one of {REASONING_PARSERS}")
        _require(self.tool_call_parser in TOOL_CALL_PARSERS,
                 f"--tool-call-parser {self.tool_call_parser!r} is unknown: use one of {TOOL_CALL_PARSERS}")
        _require(self.shutdown_timeout >= 0, f"--shutdown-timeout {self.shutdown_timeout} must be >= 0 seconds")
        _require(self.log_level in LOG_LEVELS, f"--log-level {self.log_level!r} is unknown: use one of {LOG_LEVELS}")


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
    g.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all interfaces)")
    g.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port; the log says which)")
    g.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on the /v1 routes")
    g.add_argument("--served-model-name", nargs="+", default=None,
                   help="model name(s) clients send in 'model' (default: the model directory's name)")
    g.add_argument("--reasoning-parser", choices=REASONING_PARSERS, default="qwen3",
                   help="qwen3: <think>...</think> goes to reasoning_content (default); none: left in content")
    g.add_argument("--tool-call-parser", choices=TOOL_CALL_PARSERS, default="qwen3_coder",
                   help="qwen3_coder: <tool_call> blocks become OpenAI tool_calls (default); none: left in content")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds in-flight requests may run before they are aborted (default 30)")


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
    names = getattr(args, "served_model_name", None)
    if isinstance(names, str):
        names = [names]
    default_name = Path(model).name if getattr(args, "model", None) else "deltaserve-demo"
    d = ServerConfig()
    return ServerConfig(
        host=getattr(args, "host", None) or d.host, port=_or(getattr(args, "port", None), d.port),
        api_key=getattr(args, "api_key", None), served_model_names=tuple(names or [default_name]),
        model_path=model, reasoning_parser=getattr(args, "reasoning_parser", None) or d.reasoning_parser,
        tool_call_parser=getattr(args, "tool_call_parser", None) or d.tool_call_parser,
        shutdown_timeout=_or(getattr(args, "shutdown_timeout", None), d.shutdown_timeout),
        log_level=str(getattr(args, "log_level", None) or d.log_level).lower())


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value
