"""Request bodies of the OpenAI-compatible API (pydantic, strict types) and the parsing that turns raw bytes into them.

Types are strict (no "5" -> 5, no true -> 1): a client sending the wrong type has a bug worth reporting. Value ranges
are checked where the value is used (SamplingParams), so each rule lives in one place. Unknown fields are ignored, as
the OpenAI SDKs send fields this server has no use for (`user`, `metadata`, ...).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.requests import Request

from deltaserve.server.errors import APIError, bad_request, validation_error

_CONFIG = ConfigDict(strict=True, extra="ignore")


class _Model(BaseModel):
    model_config = _CONFIG


class StreamOptions(_Model):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class JsonSchemaFormat(_Model):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JsonSchemaFormat | None = None
    # structural_tag (vLLM's form): [{"begin", "schema", "end"}] and the strings that start them; `format` is
    # xgrammar's later form, refused in server/structured.py
    structures: list[Any] | None = None
    triggers: list[Any] | None = None
    format: Any = None


class _SamplingFields(_Model):
    """Fields shared by completions and chat: the OpenAI sampling set plus vLLM-style extras."""

    # Fields OpenAI's API types "... or null", null meaning the default (vLLM takes null for them too); the OpenAI
    # SDKs send null for an argument given as None. They stay non-optional here: null is dropped before validation.
    NULL_MEANS_DEFAULT: ClassVar[frozenset[str]] = frozenset({"n", "stream"})

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in cls.NULL_MEANS_DEFAULT}
        return data

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
    allowed_token_ids: list[int] | None = None
    truncate_prompt_tokens: int | None = None
    prompt_logprobs: int | None = None
    return_tokens_as_token_ids: bool = False
    bad_words: list[str] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # structured outputs: OpenAI's field, vLLM's current one (an object, read in server/structured.py) and its
    # older guided_* fields
    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | bool | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structural_tag: str | dict[str, Any] | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None


class CompletionRequest(_SamplingFields):
    NULL_MEANS_DEFAULT = _SamplingFields.NULL_MEANS_DEFAULT | {"echo"}

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
    refusal: str | None = None  # OpenAI's "refusal" part, in an assistant message of the history


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
    reasoning: str | None = None  # vLLM's newer name for reasoning_content (this server returns both)
    function_call: Any = None  # legacy (before tool_calls): rejected with a pointer to tool_calls


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


class ChatCompletionRequest(_SamplingFields):
    NULL_MEANS_DEFAULT = _SamplingFields.NULL_MEANS_DEFAULT | {"logprobs", "echo"}

    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: Any = None  # legacy: rejected with a pointer to tools / tool_choice
    function_call: Any = None
    # vLLM-style extras
    chat_template: str | None = None  # only with --trust-request-chat-template
    chat_template_kwargs: dict[str, Any] | None = None
    documents: list[dict[str, Any]] | None = None  # for templates that render retrieval documents (RAG)
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # with add_generation_prompt false: the last message is continued
    echo: bool = False  # the reply's content starts with the last message's, when that has the reply's role
    include_reasoning: bool = True


class TokenizeRequest(_Model):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # which tools chat would list
    add_special_tokens: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    documents: list[dict[str, Any]] | None = None


class DetokenizeRequest(_Model):
    model: str | None = None
    tokens: list[int]


M = TypeVar("M", bound=BaseModel)

MAX_JSON_DEPTH = 64  # far beyond any real request (tool schemas nest ~10 deep); recursion limits stay far away
_OFF_LOOP_BYTES = 64 * 1024  # smaller bodies parse on the loop: a thread hop would cost more than the parse


async def read_json(request: Request, model: type[M]) -> M:
    """The request's JSON body as `model`; a large body is parsed and validated on a worker thread, so other
    streams keep flowing meanwhile."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json" and not (media_type.startswith("application/") and
                                                 media_type.endswith("+json")):
        shown = f"'{media_type}'" if media_type else "none"
        raise APIError(415, f"the request body must be JSON: send the header 'Content-Type: application/json' "
                       f"(got {shown})", param="Content-Type", code="unsupported_media_type")
    raw = await request.body()
    if len(raw) > _OFF_LOOP_BYTES:
        return await asyncio.to_thread(parse_body, raw, model)
    return parse_body(raw, model)


def parse_body(raw: bytes, model: type[M]) -> M:
    """Bytes -> a validated request. Each failure is a 400 that says what was wrong and where."""
    if not raw.strip():
        raise bad_request("the request body is empty; send a JSON object", code="invalid_json")
    text = raw.decode("utf-8", errors="surrogateescape")  # keep bad bytes visible to find the field they are in
    obj = _loads(text)
    if not isinstance(obj, dict):
        raise bad_request(f"the request body must be a JSON object, got a JSON {type(obj).__name__}",
                          code="invalid_json")
    _refuse_unsupported(obj, model)
    bad = find_invalid_text(obj)
    if bad is not None:
        path, why = bad
        raise bad_request(f"'{path}' {why}", param=path, code="invalid_encoding")
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise validation_error(e) from None


# vLLM request fields this server does not implement, with what to do instead. Unknown fields are ignored (the SDKs
# send some), but these change what comes back, so one sent with an active value is refused rather than dropped.
_UNSUPPORTED = {
    "use_beam_search": "beam search is not implemented; sample n choices instead",
    "logits_processors": "use logit_bias, the penalties or structured outputs",
}


def _refuse_unsupported(obj: dict[str, Any], model: type[BaseModel]) -> None:
    if not issubclass(model, _SamplingFields):
        return
    for name, instead in _UNSUPPORTED.items():
        value = obj.get(name)
        inactive = value is None or value is False or value == [] or value == {}  # (0 would be active)
        if name not in model.model_fields and not inactive:
            raise bad_request(f"'{name}' is not supported by this server: {instead}", param=name,
                              code="unsupported_parameter")


class _NotJSON(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise _NotJSON(f"{name} is not a JSON value; send numbers only")


def _loads(text: str) -> Any:
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise bad_request(f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                          code="invalid_json") from None
    except RecursionError:
        raise bad_request(f"the request body nests JSON deeper than {MAX_JSON_DEPTH} levels", code="invalid_json") \
            from None
    except _NotJSON as e:
        raise bad_request(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    except ValueError:  # Python refuses integers of more than 4300 digits
        raise bad_request("the request body has an integer of more than 4300 digits", code="invalid_json") from None


def find_invalid_text(obj: Any) -> tuple[str, str] | None:
    """The first string (key or value) that is not valid Unicode text: undecodable UTF-8 bytes, which
    surrogateescape turned into U+DC80..U+DCFF, or a lone UTF-16 surrogate written as a \\ud800 escape; or a
    container nested deeper than MAX_JSON_DEPTH. Iterative, so no input depth can exhaust the stack."""
    stack: list[tuple[Any, tuple[str, ...]]] = [(obj, ())]
    while stack:
        value, path = stack.pop()
        if len(path) > MAX_JSON_DEPTH:
            return _dotted(path[:MAX_JSON_DEPTH]), f"nests deeper than {MAX_JSON_DEPTH} levels; flatten it"
        if isinstance(value, str):
            why = _text_problem(value)
            if why:
                return _dotted(path), why
        elif isinstance(value, dict):
            for key, item in value.items():
                why = _text_problem(key)
                if why:
                    return _dotted((*path, key)), f"(a key) {why}"
                if isinstance(item, (str, dict, list)):
                    stack.append((item, (*path, key)))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, (str, dict, list)):
                    stack.append((item, (*path, str(i))))
    return None


def _dotted(path: tuple[str, ...]) -> str:
    return ".".join(path) or "body"


def _text_problem(text: str) -> str | None:
    try:
        text.encode("utf-8")  # fast path: fails only on surrogates
        return None
    except UnicodeEncodeError:
        pass
    for ch in text:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:
            return "is not valid UTF-8; send text encoded as UTF-8"
        if 0xD800 <= code <= 0xDFFF:
            return "contains a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape)"
    return None


def require(cond: bool, message: str, param: str, status: int = 400, code: str = "invalid_value") -> None:
    if not cond:
        raise APIError(status, message, param=param, code=code)
