"""Connection-level limits that uvicorn lacks: a deadline for a request's headers, and a cap on open connections
that idle sockets cannot exhaust.

uvicorn leaves a fresh connection open for as long as the client sends nothing, and a keep-alive connection that
sends one byte of a new request cancels its keep-alive timer, so a few hundred such sockets would keep every file
descriptor busy. Here each request must complete its headers within `header_timeout` of its first byte (of the
connection's start, for a first request); at `max_connections`, a new connection closes the connection that has
waited longest without a request in progress, so a real client's request is still heard. Only when every connection
is busy with a request is the new one refused (503). Slow bodies are bounded by http_guard.RequestGuard.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from deltaserve.server.errors import error_body

log = logging.getLogger("deltaserve.server")


def _raw_response(status: int, reason: str, message: str, code: str) -> bytes:
    body = json.dumps(error_body(status, message, code=code)).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode()
    return head + body


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus the header deadline and the connection cap (set by `guarded_protocol`)."""

    header_timeout: float = 10.0
    max_connections: int = 1024

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        self._idle_since = time.monotonic()
        self._partial_request = False  # bytes of a request arrived, its headers are not complete yet
        super().connection_made(transport)
        self._arm_header_timer()
        if len(self.connections) > self.max_connections:
            self._make_room()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._waiting_for_request():
            if self._header_timer is None:
                self._arm_header_timer()  # the first byte of the next request on a kept-alive connection
            self._partial_request = True
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._disarm_header_timer()
        self._partial_request = False
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        self._idle_since = time.monotonic()
        super().on_response_complete()

    # ---- helpers ---------------------------------------------------------------------------------------------
    def _waiting_for_request(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout, self._on_header_timeout)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or not self._waiting_for_request():
            return
        log.debug("closing a connection from %s: no complete request headers within %.1fs", self.client,
                  self.header_timeout)
        if self._partial_request:  # a connection that sent nothing gets no answer: a client's pool might take a
            # 408 there for the answer to the request it sends next
            self.transport.write(_raw_response(408, "Request Timeout", f"the request headers did not arrive within "
                                               f"{self.header_timeout:g} s (the server's --header-timeout)",
                                               "request_timeout"))
        self.transport.close()

    def _make_room(self) -> None:
        """Close the connection idle the longest (no request in progress); with none idle, refuse this one."""
        idle = [c for c in self.connections if c is not self and isinstance(c, GuardedHttpToolsProtocol)
                and c._waiting_for_request() and not c.transport.is_closing()]
        if idle:
            victim = min(idle, key=lambda c: c._idle_since)
            log.debug("at --max-connections %d: closing the idle connection from %s", self.max_connections,
                      victim.client)
            victim.transport.close()
            return
        log.warning("at --max-connections %d with every connection busy: refusing a connection from %s",
                    self.max_connections, self.client)
        self.transport.write(_raw_response(503, "Service Unavailable", "the server has too many open connections "
                                           "(its --max-connections); retry shortly", "too_many_connections"))
        self.transport.close()


def guarded_protocol(header_timeout: float, max_connections: int) -> type[GuardedHttpToolsProtocol]:
    """The protocol class to hand uvicorn.Config(http=...), carrying this server's limits."""
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,),
                {"header_timeout": header_timeout, "max_connections": max_connections})
