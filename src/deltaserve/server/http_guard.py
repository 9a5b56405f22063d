"""ASGI middleware in front of every route: a request id, the body size limit, the slow-body timeout, and a 500
without internals for anything that escapes a route.

Every route reads its whole body before acting, so the guard reads it first, within the limits, and hands the app a
body that is already complete: a route can then never hold the event loop on a slow client, nor buffer more than
--max-request-bytes. Headers are bounded by the connection guard (connections.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from deltaserve.server.errors import REQUEST_ID, REQUEST_START, APIError, error_body, unexpected_error

log = logging.getLogger("deltaserve.server")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

REQUEST_ID_HEADER = b"x-request-id"
# A client's own id is echoed (and logged) only when it cannot smuggle anything into a log line or a header.
_CLIENT_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,64}$")
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class RequestGuard:
    """Pure ASGI (not BaseHTTPMiddleware, which would buffer streamed responses)."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, body_timeout: float) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        REQUEST_ID.set(request_id)
        REQUEST_START.set(time.monotonic())
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", []), (REQUEST_ID_HEADER, request_id.encode())]
            await send(message)

        try:
            if scope["method"] in _BODY_METHODS:
                buffered = await self._buffered(scope, receive)
                if buffered is None:
                    return  # the client left before its body arrived: nobody to answer
                receive = buffered
            await self.app(scope, receive, send_with_id)
        except APIError as e:
            if started:
                raise
            await _send_error(send_with_id, e)
        except Exception as e:  # noqa: BLE001 - a bug: logged with the id; the client gets the id, no internals
            if started:
                log.error("request %s: failed after its response started", request_id, exc_info=e)
                return
            await _send_error(send_with_id, unexpected_error(e))

    async def _buffered(self, scope: Scope, receive: Receive) -> Receive | None:
        """Read the whole body (413 past the limit, 408 past the timeout); return a receive that replays it, or
        None if the client disconnected first."""
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            raise _too_large(self.max_body_bytes)
        deadline = time.monotonic() + self.body_timeout
        chunks: list[bytes] = []
        size = 0
        while True:
            remaining = deadline - time.monotonic()
            try:
                message = await asyncio.wait_for(receive(), max(remaining, 0.0))
            except asyncio.TimeoutError:
                raise APIError(408, f"the request body did not arrive within {self.body_timeout:g} s; send it at "
                               "once (the server's --body-timeout)", code="request_timeout") from None
            if message["type"] != "http.request":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _too_large(self.max_body_bytes)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return _replay(b"".join(chunks), receive)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: the disconnect, when it comes

    return replay


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == REQUEST_ID_HEADER and _CLIENT_ID.match(value):
            return value.decode()
    return f"req-{uuid.uuid4().hex[:16]}"


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than this server accepts ({limit} bytes, its "
                    "--max-request-bytes); send a smaller request", code="request_too_large")


async def _send_error(send: Send, error: APIError) -> None:
    body = json.dumps(error_body(error.status, error.message, param=error.param, code=error.code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if error.status in (408, 413):
        headers.append((b"connection", b"close"))  # the rest of the body is not read: the connection is unusable
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
