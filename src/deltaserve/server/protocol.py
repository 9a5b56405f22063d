"""Request bodies of the OpenAI-compatible API (pydantic, strict types) and the parsing that turns raw bytes into them.

Types are strict (no "5" -> 5, no true -> 1): a client sending the wrong type has a bug worth reporting. Value ranges
are checked where the value is used (SamplingParams), so each rule lives in one place. Unknown fields are ignored, as
the OpenAI SDKs send fields this server has no use for (`user`, `metadata`, ...).
"""

from __future__ import annotations

import json
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deltaserve.server.errors import APIError, bad_request, validation_error

_CONFIG = ConfigDict(strict=True, extra="ignore")


class _Model(BaseModel):
    model_config = _CONFIG


class StreamOptions(_Model):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _SamplingFields(_Model):
    """Fields shared by completions and chat: the OpenAI sampling set plus vLLM-style extras."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM-style extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    add_special_tokens: bool = False


class ContentPart(_Model):
    type: str
    text: str | None = None


class FunctionCallIn(_Model):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(_Model):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class FunctionDefinition(_Model):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Model):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Model):
    name: str


class NamedToolChoice(_Model):
    type: Literal["function"] = "function"
    function: NamedFunction


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    # vLLM-style extras
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    include_reasoning: bool = True


class TokenizeRequest(_Model):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[Tool] | None = None
    add_special_tokens: bool = False
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(_Model):
    model: str | None = None
    tokens: list[int]


M = TypeVar("M", bound=BaseModel)


def parse_body(raw: bytes, model: type[M]) -> M:
    """Bytes -> a validated request. Each failure is a 400 that says what was wrong and where."""
    if not raw.strip():
        raise bad_request("the request body is empty; send a JSON object", code="invalid_json")
    text = raw.decode("utf-8", errors="surrogateescape")  # keep bad bytes visible to find the field they are in
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise bad_request(f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                          code="invalid_json") from None
    if not isinstance(obj, dict):
        raise bad_request(f"the request body must be a JSON object, got a JSON {type(obj).__name__}",
                          code="invalid_json")
    bad = find_invalid_text(obj)
    if bad is not None:
        path, why = bad
        raise bad_request(f"'{path}' {why}", param=path, code="invalid_encoding")
    try:
        return model.model_validate_json(text)
    except ValidationError as e:
        raise validation_error(e) from None


def find_invalid_text(obj: Any, path: str = "") -> tuple[str, str] | None:
    """The first string (key or value) that is not valid Unicode text: undecodable UTF-8 bytes, which
    surrogateescape turned into U+DC80..U+DCFF, or a lone UTF-16 surrogate written as a \\ud800 escape."""
    if isinstance(obj, str):
        for ch in obj:
            code = ord(ch)
            if 0xDC80 <= code <= 0xDCFF:
                return path or "body", "is not valid UTF-8; send text encoded as UTF-8"
            if 0xD800 <= code <= 0xDFFF:
                return path or "body", "contains a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape)"
        return None
    if isinstance(obj, dict):
        for key, value in obj.items():
            sub = f"{path}.{key}" if path else str(key)
            found = find_invalid_text(key, sub) or find_invalid_text(value, sub)
            if found:
                return found
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            found = find_invalid_text(value, f"{path}.{i}" if path else str(i))
            if found:
                return found
    return None


def require(cond: bool, message: str, param: str, status: int = 400, code: str = "invalid_value") -> None:
    if not cond:
        raise APIError(status, message, param=param, code=code)
