"""POST /v1/chat/completions: chat template, n samples, reasoning and tool-call parsing, streamed or not."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import Request

from deltaserve.outputs import SequenceDelta
from deltaserve.sampling_params import SamplingParams
from deltaserve.server.chat_inputs import render_prompt, resolve_tools
from deltaserve.server.errors import APIError
from deltaserve.server.generation import ClientDisconnected, generate, raise_for_failure, unless_disconnected
from deltaserve.server.output_parser import OutputParser, ParsedDelta
from deltaserve.server.protocol import ChatCompletionRequest, parse_body
from deltaserve.server.responses import DONE, TokenStrings, chat_logprobs, random_id, sse, sse_error, usage
from deltaserve.server.sampling import chat_params, check_lengths
from deltaserve.server.serving_completions import SSE_HEADERS
from deltaserve.server.state import ServerState


@dataclass
class _Choice:
    parser: OutputParser
    message: ParsedDelta = field(default_factory=ParsedDelta)
    num_tokens: int = 0
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    def finish_reason_out(self) -> str | None:
        if self.finish_reason == "stop" and self.parser.num_tool_calls:
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

    def stream(self, state: ServerState) -> AsyncIterator[SequenceDelta]:
        return generate(state, self.prompt, self.params, self.id, "chat", prompt_field="messages")


async def create_chat_completion(state: ServerState, request: Request) -> Response:
    req = parse_body(await request.body(), ChatCompletionRequest)
    state.check_accepting()
    model = state.check_model(req.model)
    if not req.messages:
        raise APIError(400, "'messages' is empty; a chat request needs at least one message", param="messages",
                       code="invalid_value")
    params = chat_params(req, state.limits)
    tools = resolve_tools(req, parse=state.config.tool_call_parser != "none")
    prompt, opens_reasoning = await asyncio.to_thread(render_prompt, state.tokenizer, req, tools.for_template)
    max_field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    check_lengths(len(prompt), params, state.limits, prompt_field="messages", max_tokens_field=max_field)
    reasoning = state.config.reasoning_parser != "none"
    strip = state.strip if req.skip_special_tokens else ()

    def new_parser() -> OutputParser:
        return OutputParser(parse_reasoning=reasoning, starts_in_reasoning=opens_reasoning, tools=tools.schemas,
                            parse_tools=tools.parse, strip=strip)

    job = _Job(random_id("chatcmpl"), model, int(time.time()), req, params, prompt, new_parser,
               show_reasoning=reasoning and req.include_reasoning)
    if req.stream:
        return StreamingResponse(_stream(state, job), media_type="text/event-stream", headers=SSE_HEADERS)
    try:
        return JSONResponse(await unless_disconnected(request, _complete(state, job)))
    except ClientDisconnected:
        return Response(status_code=499)


def _apply(choice: _Choice, delta: SequenceDelta, strings: TokenStrings | None) -> tuple[ParsedDelta, list | None]:
    """Feed one engine delta to its choice; returns what to show now and this delta's logprobs."""
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
    choices = [_Choice(job.new_parser()) for _ in range(job.params.n)]
    strings = state.token_strings if job.req.logprobs else None
    async for delta in job.stream(state):
        raise_for_failure(delta)
        _apply(choices[delta.index], delta, strings)
    return {"id": job.id, "object": "chat.completion", "created": job.created, "model": job.model,
            "choices": [{"index": i, "message": _message(c.message, job.show_reasoning),
                         "logprobs": {"content": c.logprobs} if strings is not None else None,
                         "finish_reason": c.finish_reason_out(), "stop_reason": c.stop_reason}
                        for i, c in enumerate(choices)],
            "usage": usage(len(job.prompt), sum(c.num_tokens for c in choices))}


def _message(m: ParsedDelta, show_reasoning: bool) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": m.content if m.content or not m.tool_calls else None}
    if show_reasoning:
        message["reasoning_content"] = m.reasoning or None
    if m.tool_calls:
        message["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.name, "arguments": c.arguments}} for c in m.tool_calls]
    return message


async def _stream(state: ServerState, job: _Job) -> AsyncIterator[str]:
    choices = [_Choice(job.new_parser()) for _ in range(job.params.n)]
    strings = state.token_strings if job.req.logprobs else None
    head = {"id": job.id, "object": "chat.completion.chunk", "created": job.created, "model": job.model}
    try:
        for i in range(len(choices)):
            yield sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]})
        async for delta in job.stream(state):
            raise_for_failure(delta)
            choice = choices[delta.index]
            parsed, logprobs = _apply(choice, delta, strings)
            body = _delta_body(parsed, job.show_reasoning)
            if body or logprobs or delta.finished:
                yield sse({**head, "choices": [{
                    "index": delta.index, "delta": body,
                    "logprobs": {"content": logprobs} if logprobs else None,
                    "finish_reason": choice.finish_reason_out() if delta.finished else None,
                    "stop_reason": choice.stop_reason if delta.finished else None}]})
        opts = job.req.stream_options
        if opts is not None and opts.include_usage:
            yield sse({**head, "choices": [],
                       "usage": usage(len(job.prompt), sum(c.num_tokens for c in choices))})
    except APIError as e:
        yield sse_error(e.status, e.message, e.code)
    yield DONE


def _delta_body(parsed: ParsedDelta, show_reasoning: bool) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if parsed.reasoning and show_reasoning:
        body["reasoning_content"] = parsed.reasoning
    if parsed.content:
        body["content"] = parsed.content
    if parsed.tool_calls:
        calls = []
        for c in parsed.tool_calls:
            call: dict[str, Any] = {"index": c.index}
            if c.id is not None:
                call.update(id=c.id, type="function", function={"name": c.name, "arguments": c.arguments})
            else:
                call["function"] = {"arguments": c.arguments}
            calls.append(call)
        body["tool_calls"] = calls
    return body
