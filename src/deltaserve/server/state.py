"""What every route shares: the engine front, the model's limits, metrics, and the requests in flight."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from deltaserve.engine.async_engine import AsyncLLM
from deltaserve.sampling_params import generation_defaults
from deltaserve.server.args import ServerConfig
from deltaserve.server.errors import APIError, server_error
from deltaserve.server.metrics import ServerMetrics
from deltaserve.server.output_parser import strip_tokens
from deltaserve.server.responses import ID_STRINGS, TokenStrings
from deltaserve.server.sampling import Limits
from deltaserve.server.templates import TemplateLimits, TemplateRenderer

_MiB = 1024 * 1024


def template_limits(config: ServerConfig) -> TemplateLimits:
    """A rendered prompt is about the size of the messages it renders (plus the template's own text), so the
    bounds follow the body limit: twice its size in characters, and memory for a few copies of that."""
    return TemplateLimits(timeout=config.chat_template_timeout, max_chars=2 * config.max_request_bytes + _MiB,
                          memory_bytes=256 * _MiB + 8 * config.max_request_bytes)


@dataclass
class ServerState:
    """Owns the request registry and the draining flag; the engine is owned by AsyncLLM (stopped at shutdown)."""

    engine: AsyncLLM
    config: ServerConfig
    limits: Limits
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    inflight: set[str] = field(default_factory=set)
    draining: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    strip: tuple[str, ...] = ()
    token_strings: TokenStrings = field(default_factory=lambda: TokenStrings(None))  # logprob token texts, cached
    idle: asyncio.Event | None = None  # set whenever nothing is in flight (created on the server's loop)
    templates: TemplateRenderer | None = None  # type: ignore[assignment] - set by create
    special_tokens: dict[str, Any] = field(default_factory=dict)  # bos_token, eos_token, ... for chat templates
    # the token prefix each recently seen system message (with its tools, template, kwargs) opens a prompt with:
    # chat_prompt's cache points; servers see the same few system prompts again and again
    system_prefixes: OrderedDict[str, list[int] | None] = field(default_factory=OrderedDict)
    # generation_config.json's sampling values, for requests that leave those fields out (as vLLM applies them)
    sampling_defaults: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def create(cls, engine: AsyncLLM, config: ServerConfig, templates: TemplateRenderer | None = None
               ) -> ServerState:
        llm_engine = engine.engine
        limits = Limits(max_model_len=llm_engine.max_model_len, vocab_size=llm_engine.model_config.vocab_size)
        tokenizer = engine.tokenizer
        return cls(engine=engine, config=config, limits=limits, token_strings=TokenStrings(tokenizer),
                   strip=strip_tokens(tokenizer) if tokenizer is not None else (),
                   metrics=ServerMetrics(config.served_model_names[0]),
                   templates=templates or TemplateRenderer(template_limits(config)),
                   special_tokens=_special_tokens(tokenizer),
                   sampling_defaults=generation_defaults(llm_engine.model_config.model_dir))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def logprob_strings(self, as_ids: bool) -> TokenStrings:
        """How logprobs name tokens: their text, or with vLLM's return_tokens_as_token_ids "token_id:{id}"."""
        return ID_STRINGS if as_ids else self.token_strings

    def check_model(self, name: str | None) -> str:
        """The served name to echo back; an unknown one is a 404 as in OpenAI's API. None or "" (a client whose
        model setting is unset) is the first served name, as vLLM takes it."""
        if not name or name in self.config.served_model_names:
            return name or self.config.served_model_names[0]
        raise self._unknown_model(name)

    def _unknown_model(self, name: str) -> APIError:
        return APIError(404, f"the model '{name}' does not exist; this server serves "
                        f"{list(self.config.served_model_names)}", param="model", code="model_not_found")

    def check_accepting(self) -> None:
        if self.draining:
            raise APIError(503, "the server is shutting down and accepts no new requests; retry on another replica",
                           code="server_shutting_down")
        if self.engine.dead is not None:  # here, not at the first delta: a stream's 200 would have gone out by then
            raise server_error("the engine is not running", self.engine.dead, status=503, code="engine_unavailable")

    def check_model_name(self, name: str) -> dict[str, Any]:
        """GET /v1/models/{name}: the model card, or the 404 an unknown name gets everywhere."""
        if name not in self.config.served_model_names:
            raise self._unknown_model(name)
        return self.model_card(name)

    def model_card(self, name: str) -> dict[str, Any]:
        # `root` is the served name, not the checkpoint's path: a path tells clients about the server's disk.
        return {"id": name, "object": "model", "created": self.created, "owned_by": "deltaserve", "root": name,
                "parent": None, "max_model_len": self.limits.max_model_len}

    def begin(self, request_id: str) -> None:
        self.inflight.add(request_id)
        if self.idle is not None:
            self.idle.clear()

    def end(self, request_id: str) -> None:
        self.inflight.discard(request_id)
        if not self.inflight and self.idle is not None:
            self.idle.set()


def _special_tokens(tokenizer: Any) -> dict[str, Any]:
    """What apply_chat_template passes every template (bos_token, eos_token, ...), kept to plain strings."""
    specials = getattr(tokenizer, "special_tokens_map", None) or {}
    return {k: v for k, v in specials.items()
            if isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))}
