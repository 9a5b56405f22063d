"""What every route shares: the engine front, the model's limits, metrics, and the requests in flight."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from deltaserve.engine.async_engine import AsyncLLM
from deltaserve.server.args import ServerConfig
from deltaserve.server.errors import APIError
from deltaserve.server.metrics import ServerMetrics
from deltaserve.server.output_parser import strip_tokens
from deltaserve.server.responses import TokenStrings
from deltaserve.server.sampling import Limits


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

    @classmethod
    def create(cls, engine: AsyncLLM, config: ServerConfig) -> ServerState:
        llm_engine = engine.engine
        limits = Limits(max_model_len=llm_engine.max_model_len, vocab_size=llm_engine.model_config.vocab_size)
        tokenizer = engine.tokenizer
        return cls(engine=engine, config=config, limits=limits, token_strings=TokenStrings(tokenizer),
                   strip=strip_tokens(tokenizer) if tokenizer is not None else ())

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def check_model(self, name: str | None) -> str:
        """The served name to echo back; an unknown one is a 404 as in OpenAI's API."""
        if name is None or name in self.config.served_model_names:
            return name or self.config.served_model_names[0]
        raise APIError(404, f"the model '{name}' does not exist; this server serves "
                       f"{list(self.config.served_model_names)}", param="model", code="model_not_found")

    def check_accepting(self) -> None:
        if self.draining:
            raise APIError(503, "the server is shutting down and accepts no new requests; retry on another replica",
                           code="server_shutting_down")

    def begin(self, request_id: str) -> None:
        self.inflight.add(request_id)
        if self.idle is not None:
            self.idle.clear()

    def end(self, request_id: str) -> None:
        self.inflight.discard(request_id)
        if not self.inflight and self.idle is not None:
            self.idle.set()
