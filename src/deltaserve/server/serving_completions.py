"""POST /v1/completions: text or token-id prompts (one or several), n samples each, streamed or not."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import Request

from deltaserve.engine.tokenizer import TokenizerError, require_tokenizer
from deltaserve.outputs import SequenceDelta
from deltaserve.sampling_params import SamplingParams
from deltaserve.server.errors import APIError, bad_request, unexpected_error
from deltaserve.server.generation import ClientDisconnected, generate, merge, raise_for_failure, unless_disconnected
from deltaserve.server.protocol import CompletionRequest, read_json
from deltaserve.server.responses import (DONE, TokenStrings, completion_logprobs, merge_completion_logprobs,
                                         prompt_completion_logprobs, random_id, sse, sse_error, usage,
                                         vllm_prompt_logprobs)
from deltaserve.server.sampling import check_lengths, check_token_ids, completion_params, echo_only, with_structured
from deltaserve.server.state import ServerState
from deltaserve.server.structured import compile_spec, output_spec
from deltaserve.server.tokens import encode_prompt, kept_prompt_tokens

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class _Prompt:
    text: str | None
    ids: list[int]


@dataclass
class _Choice:
    text: str = ""
    num_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    offset: int = 0  # text_offset of the next logprobs token
    cached_tokens: int = 0  # prompt tokens the prefix cache served (from the first delta)
    prompt_logprobs: list | None = None  # vLLM's prompt_logprobs answer (from the first delta), when asked for


@dataclass
class _Job:
    """One completions request, validated and tokenized."""

    id: str
    model: str
    created: int
    req: CompletionRequest
    params: SamplingParams
    prompts: list[_Prompt]
    echo_only: bool = False  # echo with max_tokens=0: the generated token is dropped

    def streams(self, state: ServerState) -> list[AsyncIterator[SequenceDelta]]:
        return [generate(state, p.ids, self.params, self.id if len(self.prompts) == 1 else f"{self.id}-{i}",
                         "completions") for i, p in enumerate(self.prompts)]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p.ids) for p in self.prompts)


async def create_completion(state: ServerState, request: Request) -> Response:
    req = await read_json(request, CompletionRequest)
    state.check_accepting()
    model = state.check_model(req.model)
    params = completion_params(req, state.limits, state.sampling_defaults)
    params = with_structured(params, await compile_spec(state, output_spec(req, reasoning=False)))
    prompts = await asyncio.to_thread(_prompts, state, req, params)  # large prompts: off the event loop
    job = _Job(random_id("cmpl"), model, int(time.time()), req, params, prompts, echo_only(req))
    if req.stream:
        return StreamingResponse(_stream(state, job), media_type="text/event-stream", headers=SSE_HEADERS)
    try:
        return JSONResponse(await unless_disconnected(request, _complete(state, job)))
    except ClientDisconnected:
        return Response(status_code=499)


def _prompts(state: ServerState, req: CompletionRequest, params: SamplingParams) -> list[_Prompt]:
    """Tokenized and checked prompts: ids in the vocabulary, lengths within the context."""
    prompts = _tokenize(state, req)
    for i, p in enumerate(prompts):
        field_name = "prompt" if len(prompts) == 1 else f"prompt.{i}"
        check_token_ids(p.ids, state.limits.vocab_size, field_name)
        check_lengths(len(p.ids), params, state.limits, prompt_field=field_name, max_tokens_field="max_tokens")
    return prompts


def _tokenize(state: ServerState, req: CompletionRequest) -> list[_Prompt]:
    prompt = req.prompt
    items: list[str | list[int]]
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
        items = [prompt]  # type: ignore[list-item]
    else:
        items = list(prompt)  # type: ignore[arg-type]
    if not items:
        raise bad_request("'prompt' is empty; give a string, a list of token ids, or a list of either", "prompt")
    keep = kept_prompt_tokens(req.truncate_prompt_tokens, state.limits.max_model_len)
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            try:
                tok = require_tokenizer(state.tokenizer, "a text prompt")
            except TokenizerError as e:
                raise bad_request(str(e), "prompt") from None
            field_name = "prompt" if len(items) == 1 else f"prompt.{i}"
            ids = encode_prompt(tok, item, state.limits.max_model_len - 1, keep,
                                add_special_tokens=req.add_special_tokens, field=field_name)
            whole = keep is None or len(ids) < keep  # else echo decodes the ids that stayed
            out.append(_Prompt(item if whole else None, ids))
        else:
            out.append(_Prompt(None, list(item) if keep is None else list(item)[-keep:]))
    return out


def _prompt_text(state: ServerState, prompt: _Prompt) -> str:
    if prompt.text is not None:
        return prompt.text
    tok = state.tokenizer
    return "" if tok is None else tok.decode(prompt.ids, skip_special_tokens=False)


async def _complete(state: ServerState, job: _Job) -> dict[str, Any]:
    n = job.params.n
    choices = [_Choice() for _ in range(len(job.prompts) * n)]
    strings = state.logprob_strings(job.req.return_tokens_as_token_ids)
    if job.req.echo:
        for i, p in enumerate(job.prompts):
            for s in range(n):
                choices[i * n + s].text = choices[i * n + s].text + _prompt_text(state, p)
    async for i, delta in merge(job.streams(state)):
        raise_for_failure(delta)
        choice = choices[i * n + delta.index]
        if _echo_with_logprobs(job):
            _echo_logprobs(choice, job.prompts[i], delta, strings)
        _apply(choice, _dropped(delta) if job.echo_only else delta, strings, job.req.logprobs)
        _keep_prompt_logprobs(choice, job, delta, strings)
    return {"id": job.id, "object": "text_completion", "created": job.created, "model": job.model,
            "choices": [{"index": k, "text": c.text, "logprobs": merge_completion_logprobs(c.logprobs),
                         "finish_reason": c.finish_reason, "stop_reason": c.stop_reason, **_prompt_field(job, c)}
                        for k, c in enumerate(choices)],
            "usage": _usage(job, choices)}


def _echo_with_logprobs(job: _Job) -> bool:
    """OpenAI's legacy form: the echoed prompt's tokens lead the choice's logprobs."""
    return job.req.echo and job.req.logprobs is not None


def _keep_prompt_logprobs(choice: _Choice, job: _Job, delta: SequenceDelta, strings: TokenStrings) -> bool:
    """vLLM's form (`prompt_logprobs`): kept on the choice from the sample's first delta; True for that delta."""
    if job.req.prompt_logprobs is None or delta.prompt_logprobs is None:
        return False
    choice.prompt_logprobs = vllm_prompt_logprobs(delta.prompt_logprobs, strings)
    return True


def _prompt_field(job: _Job, choice: _Choice) -> dict[str, Any]:
    return {"prompt_logprobs": choice.prompt_logprobs} if job.req.prompt_logprobs is not None else {}


def _echo_logprobs(choice: _Choice, prompt: _Prompt, delta: SequenceDelta, strings: TokenStrings) -> dict | None:
    """With echo and logprobs the first delta brings the prompt's logprobs: they lead the choice's logprobs, and
    the generated tokens' offsets start after the prompt. Returns that piece (None for other deltas)."""
    if delta.prompt_logprobs is None:
        return None
    piece, choice.offset = prompt_completion_logprobs(prompt.ids, delta.prompt_logprobs, strings)
    choice.logprobs.insert(0, piece)
    return piece


def _dropped(delta: SequenceDelta) -> SequenceDelta:
    """An echo-only request's delta without its generated token: max_tokens=0 ends it at once, by length."""
    return dataclasses.replace(delta, token_ids=(), text="", logprobs=None,
                               finish_reason="length" if delta.finished else None, stop_reason=None)


def _apply(choice: _Choice, delta: SequenceDelta, strings: TokenStrings, logprobs: int | None) -> dict | None:
    """Accumulate one delta into its choice; returns this delta's logprobs piece (None without logprobs)."""
    choice.text += delta.text
    choice.num_tokens += len(delta.token_ids)
    if delta.num_cached_tokens is not None:
        choice.cached_tokens = delta.num_cached_tokens
    piece = None
    if logprobs is not None and delta.logprobs:
        piece, choice.offset = completion_logprobs(delta.logprobs, strings, choice.offset)
        choice.logprobs.append(piece)
    if delta.finished:
        choice.finish_reason, choice.stop_reason = delta.finish_reason, delta.stop_reason
    return piece


async def _stream(state: ServerState, job: _Job) -> AsyncIterator[str]:
    n = job.params.n
    choices = [_Choice() for _ in range(len(job.prompts) * n)]
    strings = state.logprob_strings(job.req.return_tokens_as_token_ids)
    head = {"id": job.id, "object": "text_completion", "created": job.created, "model": job.model}
    opts = job.req.stream_options
    include_usage = opts is not None and opts.include_usage
    # vLLM's rule: continuous_usage_stats counts only together with include_usage
    continuous = include_usage and opts is not None and opts.continuous_usage_stats

    def chunk(choice: dict[str, Any]) -> str:
        body = {**head, "choices": [choice]}
        if continuous:  # as vLLM: each chunk carries its own choice's usage so far (its prompt's tokens)
            k = choice["index"]
            c = choices[k]
            body["usage"] = usage(len(job.prompts[k // n].ids), c.num_tokens, cached_tokens=c.cached_tokens)
        elif include_usage:  # OpenAI: with include_usage every chunk has the field, null but on the last
            body["usage"] = None
        return sse(body)

    echo_with_logprobs = _echo_with_logprobs(job)
    try:
        if job.req.echo and not echo_with_logprobs:
            for k in range(len(choices)):
                yield chunk(_chunk_choice(k, _prompt_text(state, job.prompts[k // n]), None, None, None))
        async for i, delta in merge(job.streams(state)):
            raise_for_failure(delta)
            k = i * n + delta.index
            prompt_piece = _echo_logprobs(choices[k], job.prompts[i], delta, strings) if echo_with_logprobs else None
            if prompt_piece is not None:  # the echo chunk waits for the prompt's logprobs
                yield chunk(_chunk_choice(k, _prompt_text(state, job.prompts[i]), prompt_piece, None, None))
            if job.echo_only:
                delta = _dropped(delta)
            piece = _apply(choices[k], delta, strings, job.req.logprobs)
            scored = _keep_prompt_logprobs(choices[k], job, delta, strings)
            if delta.text or piece is not None or delta.finished or scored:
                yield chunk({**_chunk_choice(k, delta.text, piece, delta.finish_reason if delta.finished else None,
                                             delta.stop_reason), **(_prompt_field(job, choices[k]) if scored else {})})
        if include_usage:
            yield sse({**head, "choices": [], "usage": _usage(job, choices)})
    except APIError as e:
        yield sse_error(e.status, e.message, e.code)
    except Exception as e:  # noqa: BLE001 - a bug: the stream still ends with an error event and [DONE]
        err = unexpected_error(e)
        yield sse_error(err.status, err.message, err.code)
    yield DONE


def _usage(job: _Job, choices: list[_Choice]) -> dict[str, Any]:
    """Usage over every prompt; each prompt's cached tokens counted once (its first sample's)."""
    n = job.params.n
    return usage(job.prompt_tokens, sum(c.num_tokens for c in choices),
                 cached_tokens=sum(choices[i * n].cached_tokens for i in range(len(job.prompts))))


def _chunk_choice(index: int, text: str, logprobs: dict | None, finish_reason: str | None,
                  stop_reason: str | int | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason,
            "stop_reason": stop_reason}
