"""OpenAI-style errors: every failure leaves the server as `{"error": {"message", "type", "param", "code"}}`.

Clients (the official SDKs included) read `error.message` and branch on the HTTP status, so each error names the
offending request field in `param` and says in `message` what a valid value looks like. Server-side failures say
what failed and the request id (also in every response's X-Request-Id header); the details, which may hold internal
exception text, go to the server log under that id only.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

# OpenAI's `type` strings by status; anything else falls back to server_error.
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 408: "invalid_request_error", 409: "conflict_error",
          413: "invalid_request_error", 415: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}

# The id of the HTTP request being handled (set by http_guard.RequestGuard; copied into to_thread workers and the
# tasks a request starts, as contextvars are).
REQUEST_ID: ContextVar[str] = ContextVar("deltaserve_request_id", default="-")
# When the request arrived (time.monotonic()), for the latency metrics; 0.0 outside a request.
REQUEST_START: ContextVar[float] = ContextVar("deltaserve_request_start", default=0.0)


class APIError(Exception):
    """A request failure with its HTTP status; raised anywhere in a handler, rendered by the app's handler."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": _printable(message), "type": _TYPES.get(status, "server_error"),
                      "param": None if param is None else _printable(param), "code": code}}


def _printable(text: str) -> str:
    """Text that encodes as UTF-8: a message may quote a request's undecodable bytes (which parsing turned into
    lone surrogates); they show as U+FFFD."""
    try:
        return text.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="replace")
    except UnicodeEncodeError:  # a surrogate that was never a byte (an escaped \ud800)
        return text.encode("utf-8", errors="replace").decode("utf-8")


def server_error(what: str, details: str, *, status: int = 500, code: str = "internal_error") -> APIError:
    """A failure that is not the client's: logged with its details, answered with what failed and the request id."""
    request_id = REQUEST_ID.get()
    log.error("request %s: %s: %s", request_id, what, details)
    return APIError(status, f"{what} (request id {request_id}; the server log has the details)", code=code)


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def validation_error(exc: ValidationError | RequestValidationError) -> APIError:
    """The first pydantic error, as a 400 naming the field by its dotted path (messages.0.content)."""
    errors = exc.errors()
    if not errors:
        return bad_request("the request is invalid")
    # A union reports one error per alternative, each with the alternative's name in its path ("prompt.str"); the
    # deepest path is the most specific complaint (prompt.1.0, not "prompt is not a string").
    paths = [[str(p) for p in e.get("loc", ()) if p != "body" and not _is_type_tag(str(p))] for e in errors]
    best = max(range(len(errors)), key=lambda i: len(paths[i]))
    err, param = errors[best], ".".join(paths[best]) or None
    if err.get("type") == "missing":
        return APIError(400, f"'{param}' is required but missing from the request", param=param,
                        code="missing_required_parameter")
    value = err.get("input")
    shown = "" if isinstance(value, (dict, list)) or value is None else f" (got {value!r:.80})"
    where = f"'{param}'" if param else "the request body"
    return APIError(400, f"{where} is invalid{shown}: {err.get('msg', 'invalid value')}", param=param,
                    code="invalid_type" if "type" in str(err.get("type", "")) else "invalid_value")


def _is_type_tag(part: str) -> bool:
    return part in {"str", "int", "float", "bool", "list[int]", "list[str]", "list[list[int]]", "dict"} or \
        part.startswith(("list[", "dict[", "literal[", "function-", "constrained-")) or part[:1].isupper()


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception to the OpenAI error shape; unexpected ones become a 500 that names the cause."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = validation_error(exc)
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        if exc.status_code == 404:
            message = f"{message}: no such route; see GET /v1/models, POST /v1/completions, /v1/chat/completions"
        return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(unexpected_error(exc).body(), status_code=500)


def unexpected_error(exc: BaseException) -> APIError:
    """A bug or an unforeseen failure: the traceback goes to the log under the request id, the client gets the id."""
    request_id = REQUEST_ID.get()
    log.error("request %s: unhandled error", request_id, exc_info=exc)
    return APIError(500, f"internal server error (request id {request_id}; the server log has the details)",
                    code="internal_error")
