"""OpenAI-style errors: every failure leaves the server as `{"error": {"message", "type", "param", "code"}}`.

Clients (the official SDKs included) read `error.message` and branch on the HTTP status, so each error names the
offending request field in `param` and says in `message` what a valid value looks like.
"""

from __future__ import annotations

import logging
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
          404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error", 413: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}


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
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


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
        return JSONResponse(exc.body(), status_code=exc.status)

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
        log.exception("unhandled error in a request")
        return JSONResponse(error_body(500, f"internal server error: {type(exc).__name__}: {exc}",
                                       code="internal_error"), status_code=500)
