"""Request fields -> SamplingParams, with errors that name the field as the client wrote it.

SamplingParams is the one place value ranges are checked; its ValueError names its own field, which is mapped back
to the request's (chat's `top_logprobs` is SamplingParams.logprobs, `max_completion_tokens` is max_tokens, ...).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from deltaserve.sampling_params import GENERATION_CONFIG_KEYS, SamplingParams
from deltaserve.structured import StructuredSpec
from deltaserve.server.errors import APIError, bad_request
from deltaserve.server.protocol import ChatCompletionRequest, CompletionRequest, _SamplingFields
from deltaserve.server.tokens import context_exceeded

LOGIT_BIAS_RANGE = 100.0  # OpenAI's documented range
MAX_N = 128  # OpenAI's limit on choices per request
MAX_TEMPERATURE = 2.0  # OpenAI's documented range is [0, 2]
MAX_STOP_STRINGS = 16  # OpenAI allows 4; vLLM clients send a few more
MAX_STOP_STRING_CHARS = 1024
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # seeds reach torch.Generator as int64
_DECIMAL_ID = re.compile(r"[0-9]{1,10}")  # int() would also take " 5", "+5", "5_0" and non-ASCII digits

_FIELD_RE = re.compile(r"^SamplingParams\.(\w+)=(.*?) is invalid: (.*)$", re.S)
_SAMPLING_FIELDS = (*GENERATION_CONFIG_KEYS, "presence_penalty", "frequency_penalty")


@dataclass(frozen=True)
class Limits:
    """What the engine can serve; the server checks requests against it before the engine sees them."""

    max_model_len: int
    vocab_size: int


def echo_only(req: CompletionRequest) -> bool:
    """echo with max_tokens=0: the prompt comes back (scored, with logprobs) and nothing is generated, as OpenAI's
    legacy API and vLLM answer; the engine runs one token, which is dropped."""
    return req.echo and req.max_tokens == 0


def completion_params(req: CompletionRequest, limits: Limits,
                      defaults: Mapping[str, Any] | None = None) -> SamplingParams:
    """defaults: values (generation_defaults) for the sampling fields the request leaves out."""
    _reject_unsupported_completion(req)
    max_tokens = 1 if echo_only(req) else req.max_tokens
    params = _build(req, max_tokens=max_tokens, max_tokens_field="max_tokens", logprobs=req.logprobs,
                    logprobs_field="logprobs", limits=limits, skip_special_tokens=req.skip_special_tokens,
                    defaults=defaults or {})
    if req.echo and req.logprobs is not None:  # the echoed prompt's tokens get logprobs too (the first: null)
        if req.prompt_logprobs not in (None, req.logprobs):
            raise bad_request(f"'prompt_logprobs' ({req.prompt_logprobs}) and echo with 'logprobs' ({req.logprobs}) "
                              "both score the prompt, with different top counts; give one, or the same number",
                              param="prompt_logprobs")
        params = dataclasses.replace(params, prompt_logprobs=req.logprobs)
    return params


def chat_params(req: ChatCompletionRequest, limits: Limits,
                defaults: Mapping[str, Any] | None = None) -> SamplingParams:
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    max_field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    if req.prompt_logprobs is not None and req.stream:
        raise bad_request("'prompt_logprobs' is not available when streaming chat (as in vLLM); send stream: false",
                          param="prompt_logprobs")
    # The reasoning and tool parsers need <think>/<tool_call> in the text; special tokens that are not markup are
    # stripped by the output parser instead (see output_parser.strip_tokens).
    return _build(req, max_tokens=max_tokens, max_tokens_field=max_field, logprobs=logprobs,
                  logprobs_field="top_logprobs", limits=limits, skip_special_tokens=False, defaults=defaults or {})


def with_structured(params: SamplingParams, spec: StructuredSpec | None) -> SamplingParams:
    """params constrained by spec (server/structured.py), with the conflicts named by their request fields."""
    if spec is None:
        return params
    for name, bad in (("ignore_eos", params.ignore_eos), ("min_tokens", params.min_tokens > 0)):
        if bad:
            raise bad_request(f"'{name}' cannot be combined with a structured output constraint: the constraint ends "
                              "the output with the end token once the structure is complete; leave it out", name)
    return dataclasses.replace(params, structured=spec)


def _reject_unsupported_completion(req: CompletionRequest) -> None:
    if req.suffix:
        raise bad_request("'suffix' (fill-in-the-middle) is not supported", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("'best_of' other than n is not supported; use n", param="best_of")


def _build(req: _SamplingFields, *, max_tokens: int | None, max_tokens_field: str, logprobs: int | None,
           logprobs_field: str, limits: Limits, skip_special_tokens: bool,
           defaults: Mapping[str, Any]) -> SamplingParams:
    _check_edge(req, limits)
    kwargs: dict[str, Any] = dict(
        n=req.n, max_tokens=max_tokens, logprobs=logprobs, seed=req.seed, stop=[] if req.stop is None else req.stop,
        stop_token_ids=req.stop_token_ids or [], ignore_eos=req.ignore_eos, min_tokens=req.min_tokens,
        logit_bias=_logit_bias(req.logit_bias, limits.vocab_size), allowed_token_ids=req.allowed_token_ids,
        prompt_logprobs=req.prompt_logprobs, bad_words=req.bad_words or [],
        skip_special_tokens=skip_special_tokens,
        include_stop_str_in_output=req.include_stop_str_in_output)
    for name in _SAMPLING_FIELDS:
        value = getattr(req, name)
        if value is None:
            value = defaults.get(name)
        if value is not None:
            kwargs[name] = value
    names = {"max_tokens": max_tokens_field, "logprobs": logprobs_field}
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:
        raise _field_error(e, names) from None


def _check_edge(req: _SamplingFields, limits: Limits) -> None:
    """The bounds of this server and of OpenAI's API, beyond SamplingParams' own: no value that passes here can make
    the engine's sampler fail (top_k past the vocabulary, a seed past int64), nor cost more than it is worth."""
    if not 1 <= req.n <= MAX_N:
        raise bad_request(f"'n' must be between 1 and {MAX_N} (got {req.n})", param="n")
    if req.stream_options is not None and not req.stream:
        raise bad_request("'stream_options' is only allowed with 'stream': true", param="stream_options")
    if req.temperature is not None and req.temperature > MAX_TEMPERATURE:
        raise bad_request(f"'temperature' must be between 0 and {MAX_TEMPERATURE:g} (got {req.temperature})",
                          param="temperature")
    if req.top_k is not None and req.top_k > limits.vocab_size:
        raise bad_request(f"'top_k' is {req.top_k} but the vocabulary has {limits.vocab_size} tokens; use at most "
                          f"{limits.vocab_size}, or 0 / -1 for no top-k", param="top_k")
    if req.seed is not None and not INT64_MIN <= req.seed <= INT64_MAX - (req.n - 1):
        raise bad_request(f"'seed' must be a 64-bit signed integer (sample i uses seed + i, so at most "
                          f"{INT64_MAX - (req.n - 1)} with n={req.n}); got {req.seed}", param="seed")
    if req.stop_token_ids:
        check_token_ids(req.stop_token_ids, limits.vocab_size, "stop_token_ids")
    if req.allowed_token_ids:
        check_token_ids(req.allowed_token_ids, limits.vocab_size, "allowed_token_ids")
    _check_stops(req.stop)


def _check_stops(stop: str | list[str] | None) -> None:
    stops = [stop] if isinstance(stop, str) else stop or []
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(f"'stop' has {len(stops)} strings; at most {MAX_STOP_STRINGS} are allowed", param="stop")
    for i, s in enumerate(stops):
        if len(s) > MAX_STOP_STRING_CHARS:
            param = "stop" if isinstance(stop, str) else f"stop.{i}"
            raise bad_request(f"'{param}' is {len(s)} characters long; stop strings may have at most "
                              f"{MAX_STOP_STRING_CHARS}", param=param)


def _field_error(e: ValueError, names: dict[str, str]) -> APIError:
    m = _FIELD_RE.match(str(e))
    if m is None:
        return bad_request(str(e))
    field, value, expected = m.groups()
    param = names.get(field, field)
    return bad_request(f"'{param}' is invalid (got {value}): {expected}", param=param)


def _logit_bias(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float] | None:
    if not bias:
        return None
    out: dict[int, float] = {}
    for key, value in bias.items():
        if not _DECIMAL_ID.fullmatch(key):
            raise bad_request(f"'logit_bias' keys must be token ids written as plain decimal integers (\"1234\"), "
                              f"got {key[:40]!r}", param="logit_bias")
        token_id = int(key)
        if not 0 <= token_id < vocab_size:
            raise bad_request(f"'logit_bias' token id {token_id} is outside the vocabulary [0, {vocab_size})",
                              param="logit_bias")
        if not -LOGIT_BIAS_RANGE <= value <= LOGIT_BIAS_RANGE:
            raise bad_request(f"'logit_bias' value {value} for token {token_id} must be in "
                              f"[-{LOGIT_BIAS_RANGE:g}, {LOGIT_BIAS_RANGE:g}]", param="logit_bias")
        out[token_id] = value
    return out


def check_lengths(prompt_len: int, params: SamplingParams, limits: Limits, *, prompt_field: str,
                  max_tokens_field: str) -> None:
    """The engine's context limit, as the 400 OpenAI gives (context_length_exceeded), before queueing anything."""
    if prompt_len == 0:
        raise bad_request(f"'{prompt_field}' is empty; give at least one token", param=prompt_field)
    if prompt_len >= limits.max_model_len:
        raise context_exceeded(prompt_field, str(prompt_len), limits.max_model_len)
    if params.max_tokens is not None and prompt_len + params.max_tokens > limits.max_model_len:
        raise bad_request(f"this model's context is {limits.max_model_len} tokens, but {prompt_len} prompt tokens "
                          f"+ {max_tokens_field}={params.max_tokens} exceed it; lower {max_tokens_field}",
                          param=max_tokens_field, code="context_length_exceeded")
    if prompt_len + params.min_tokens > limits.max_model_len:
        raise bad_request(f"'min_tokens' is {params.min_tokens}, but only {limits.max_model_len - prompt_len} "
                          f"tokens fit after the {prompt_len} prompt tokens in this model's context",
                          param="min_tokens", code="context_length_exceeded")


def check_token_ids(ids: list[int], vocab_size: int, field: str) -> None:
    if not ids or (0 <= min(ids) and max(ids) < vocab_size):  # C-speed scan; the list may have 10^6 ids
        return
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise bad_request(f"'{field}' has token ids {bad[:5]} outside the vocabulary [0, {vocab_size})",
                          param=field)
