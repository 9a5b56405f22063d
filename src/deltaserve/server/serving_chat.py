"""POST /v1/chat/completions: chat template, n samples, reasoning and tool-call parsing, streamed or not."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import Request

from deltaserve.outputs import SequenceDelta
from deltaserve.sampling_params import SamplingParams
from deltaserve.server.chat_inputs import echoed_text, reject_legacy_functions, reply_role, resolve_tools
from deltaserve.server.chat_prompt import ChatRequestParts, render_prompt
from deltaserve.server.errors import APIError, unexpected_error
from deltaserve.server.generation import ClientDisconnected, generate, raise_for_failure, unless_disconnected
from deltaserve.server.output_parser import OutputParser, ParsedDelta
from deltaserve.server.protocol import ChatCompletionRequest, NamedToolChoice, read_json
from deltaserve.server.responses import (DONE, TokenStrings, chat_logprobs, random_id, sse, sse_error, usage,
                                         vllm_prompt_logprobs)
from deltaserve.server.sampling import chat_params, check_lengths, with_structured
from deltaserve.server.serving_completions import SSE_HEADERS
from deltaserve.server.state import ServerState
from deltaserve.server.structured import chat_spec, compile_spec
from deltaserve.server.tokens import kept_prompt_tokens


@dataclass
class _Choice:
    parser: OutputParser
    message: ParsedDelta = field(default_factory=ParsedDelta)
    num_tokens: int = 0
    reasoning_tokens: int = 0  # tokens generated while the reasoning block was open (its closing tag included)
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    cached_tokens: int = 0  # prompt tokens the prefix cache served (from the first delta)
    named_tool: bool = False  # tool_choice named the function: the call was forced, not the model's choice

    def finish_reason_out(self) -> str | None:
        # OpenAI (and vLLM): "tool_calls" when the model chose to call ("auto", "required"); a call forced by a
        # named tool_choice ends with "stop"
        if self.finish_reason == "stop" and self.parser.num_tool_calls and not self.named_tool:
            return "tool_calls"
        return self.finish_reason


@dataclass
class _Job:
    id: str
    model: str
    created: int
    req: ChatCompletionRequest
    params: SamplingParams
    prompt: list[int]
    new_parser: Callable[[], OutputParser]
    show_reasoning: bool
    cache_points: tuple[int, ...] = ()
    echo: str = ""  # what the reply's content starts with (echo)
    role: str = "assistant"  # the reply message's role (reply_role)

    def stream(self, state: ServerState) -> AsyncIterator[SequenceDelta]:
        return generate(state, self.prompt, self.params, self.id, "chat", prompt_field="messages",
                        cache_points=self.cache_points)

    def new_choices(self) -> list[_Choice]:
        named = isinstance(self.req.tool_choice, NamedToolChoice)
        return [_Choice(self.new_parser(), named_tool=named) for _ in range(self.params.n)]


async def create_chat_completion(state: ServerState, request: Request) -> Response:
    req = await read_json(request, ChatCompletionRequest)
    state.check_accepting()
    model = state.check_model(req.model)
    if not req.messages:
        raise APIError(400, "'messages' is empty; a chat request needs at least one message", param="messages",
                       code="invalid_value")
    reject_legacy_functions(req)
    params = chat_params(req, state.limits, state.sampling_defaults)
    tools = resolve_tools(req, parse=state.config.tool_call_parser != "none",
                          exclude_tools_when_none=state.config.exclude_tools_when_tool_choice_none)
    keep = kept_prompt_tokens(req.truncate_prompt_tokens, state.limits.max_model_len)
    rendered = await render_prompt(state, ChatRequestParts(req.messages, tools.for_template, req.add_generation_prompt,
                                                           req.chat_template, req.chat_template_kwargs,
                                                           req.documents, req.continue_final_message), keep=keep)
    prompt, opens_reasoning = rendered.ids, rendered.opens_reasoning
    max_field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    check_lengths(len(prompt), params, state.limits, prompt_field="messages", max_tokens_field=max_field)
    reasoning = state.config.reasoning_parser != "none"
    # an open <think> block comes first: the constraint starts after the model closes it. Without the reasoning
    # parser the block would be content, so the constraint starts at once (as vLLM's does without one): else a
    # JSON response's content held the reasoning and "</think>" before the JSON
    spec = chat_spec(req, reasoning=opens_reasoning and reasoning)
    params = with_structured(params, await compile_spec(state, spec))
    strip = state.strip if req.skip_special_tokens else ()

    def new_parser() -> OutputParser:
        return OutputParser(parse_reasoning=reasoning, starts_in_reasoning=opens_reasoning, tools=tools.schemas,
                            parse_tools=tools.parse, strip=strip, max_tool_calls=tools.max_calls,
                            constrained=params.structured is not None)

    job = _Job(random_id("chatcmpl"), model, int(time.time()), req, params, prompt, new_parser,
               show_reasoning=reasoning and req.include_reasoning, cache_points=rendered.cache_points,
               echo=echoed_text(req.messages, req.add_generation_prompt) if req.echo else "",
               role=reply_role(req.messages, req.add_generation_prompt))
    if req.stream:
        return StreamingResponse(_stream(state, job), media_type="text/event-stream", headers=SSE_HEADERS)
    try:
        return JSONResponse(await unless_disconnected(request, _complete(state, job)))
    except ClientDisconnected:
        return Response(status_code=499)


def _apply(choice: _Choice, delta: SequenceDelta, strings: TokenStrings | None) -> tuple[ParsedDelta, list | None]:
    """Feed one engine delta to its choice; returns what to show now and this delta's logprobs."""
    if delta.num_cached_tokens is not None:
        choice.cached_tokens = delta.num_cached_tokens
    if choice.parser.in_reasoning:
        choice.reasoning_tokens += len(delta.token_ids)
    parsed = choice.parser.feed(delta.text)
    if delta.finished:
        parsed.extend(choice.parser.finish())
        choice.finish_reason, choice.stop_reason = delta.finish_reason, delta.stop_reason
    choice.message.extend(parsed)
    choice.num_tokens += len(delta.token_ids)
    logprobs = chat_logprobs(delta.logprobs, strings) if strings is not None and delta.logprobs else None
    if logprobs:
        choice.logprobs.extend(logprobs)
    return parsed, logprobs


async def _complete(state: ServerState, job: _Job) -> dict[str, Any]:
    choices = job.new_choices()
    named = state.logprob_strings(job.req.return_tokens_as_token_ids)
    strings = named if job.req.logprobs else None
    scored: dict[str, Any] = {}  # vLLM's top-level prompt_logprobs, when asked for (from the first delta)
    async for delta in job.stream(state):
        raise_for_failure(delta)
        _apply(choices[delta.index], delta, strings)
        if job.req.prompt_logprobs is not None and delta.prompt_logprobs is not None:
            scored["prompt_logprobs"] = vllm_prompt_logprobs(delta.prompt_logprobs, named)
    return {"id": job.id, "object": "chat.completion", "created": job.created, "model": job.model,
            "choices": [{"index": i, "message": _message(c.message, job.show_reasoning, job.echo, job.role),
                         "logprobs": {"content": c.logprobs} if strings is not None else None,
                         "finish_reason": c.finish_reason_out(), "stop_reason": c.stop_reason}
                        for i, c in enumerate(choices)],
            **scored, "usage": _usage(job, choices)}


def _usage(job: _Job, choices: list[_Choice]) -> dict[str, Any]:
    return usage(len(job.prompt), sum(c.num_tokens for c in choices), sum(c.reasoning_tokens for c in choices),
                 cached_tokens=choices[0].cached_tokens)


def _reasoning_fields(text: str, show_reasoning: bool) -> dict[str, str | None]:
    """reasoning_content (DeepSeek's and SGLang's name) and reasoning (vLLM's current one): always both, null when
    there is none, so clients can read either without checking that it exists."""
    value = text if show_reasoning and text else None
    return {"reasoning_content": value, "reasoning": value}


def _message(m: ParsedDelta, show_reasoning: bool, echo: str = "", role: str = "assistant") -> dict[str, Any]:
    content = echo + m.content if echo or m.content or not m.tool_calls else None
    message: dict[str, Any] = {"role": role, "content": content,
                               **_reasoning_fields(m.reasoning, show_reasoning)}
    if m.tool_calls:
        message["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.name, "arguments": c.arguments}} for c in m.tool_calls]
    return message


async def _stream(state: ServerState, job: _Job) -> AsyncIterator[str]:
    choices = job.new_choices()
    strings = state.logprob_strings(job.req.return_tokens_as_token_ids) if job.req.logprobs else None
    head = {"id": job.id, "object": "chat.completion.chunk", "created": job.created, "model": job.model}
    opts = job.req.stream_options
    include_usage = opts is not None and opts.include_usage
    # vLLM's rule: continuous_usage_stats counts only together with include_usage
    continuous = include_usage and opts is not None and opts.continuous_usage_stats

    def chunk(choice: dict[str, Any]) -> str:
        body = {**head, "choices": [choice]}
        if continuous:  # as vLLM: each chunk carries its own choice's usage so far
            c = choices[choice["index"]]
            body["usage"] = usage(len(job.prompt), c.num_tokens, c.reasoning_tokens, cached_tokens=c.cached_tokens)
        elif include_usage:  # OpenAI: with include_usage every chunk has the field, null but on the last
            body["usage"] = None
        return sse(body)

    try:
        for i in range(len(choices)):
            yield chunk({"index": i, "delta": {"role": job.role, "content": "", **_reasoning_fields("", False)},
                         "logprobs": None, "finish_reason": None})
        for i in range(len(choices) if job.echo else 0):  # as vLLM streams it: the echo before any token
            yield chunk({"index": i, "delta": {"content": job.echo, **_reasoning_fields("", False)},
                         "logprobs": None, "finish_reason": None})
        async for delta in job.stream(state):
            raise_for_failure(delta)
            choice = choices[delta.index]
            parsed, logprobs = _apply(choice, delta, strings)
            visible = parsed.content or parsed.tool_calls or (parsed.reasoning and job.show_reasoning)
            if visible or logprobs or delta.finished:
                bodies = _delta_bodies(parsed, job.show_reasoning)
                for k, body in enumerate(bodies):  # the step's logprobs on its first chunk, its end on its last
                    end = delta.finished and k == len(bodies) - 1
                    yield chunk({"index": delta.index, "delta": body,
                                 "logprobs": {"content": logprobs} if logprobs and k == 0 else None,
                                 "finish_reason": choice.finish_reason_out() if end else None,
                                 "stop_reason": choice.stop_reason if end else None})
        if include_usage:
            yield sse({**head, "choices": [], "usage": _usage(job, choices)})
    except APIError as e:
        yield sse_error(e.status, e.message, e.code)
    except Exception as e:  # noqa: BLE001 - a bug: the stream still ends with an error event and [DONE]
        err = unexpected_error(e)
        yield sse_error(err.status, err.message, err.code)
    yield DONE


def _delta_bodies(parsed: ParsedDelta, show_reasoning: bool) -> list[dict[str, Any]]:
    """The deltas of what one engine step produced: one, or one more after each call that starts with arguments in
    the same step (several tokens at once: MTP, text a stop string held back). As OpenAI's stream has it, a call's
    first delta carries its id, type, name and arguments "", the deltas after it only arguments."""
    bodies: list[dict[str, Any]] = [_reasoning_fields(parsed.reasoning, show_reasoning)]
    if parsed.content:
        bodies[0]["content"] = parsed.content
    calls: list[dict[str, Any]] = []
    for c in parsed.tool_calls:
        if c.id is not None:
            calls.append({"index": c.index, "id": c.id, "type": "function",
                          "function": {"name": c.name, "arguments": ""}})
            if not c.arguments:
                continue
            bodies[-1]["tool_calls"], calls = calls, []
            bodies.append(_reasoning_fields("", show_reasoning))
        calls.append({"index": c.index, "function": {"arguments": c.arguments}})
    if calls:
        bodies[-1]["tool_calls"] = calls
    return bodies
