"""Edge validation (issue 20, items 6, 8, 9, 10, 11, 13): every value that could hurt the engine, the sampler or the
server is refused at the edge with a 4xx naming the field, and neither the server nor a stream running meanwhile
notices."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from deltaserve import SamplingParams
from tests.server.conftest import API_KEY

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MSG = [{"role": "user", "content": "hi"}]
VOCAB = 320  # the test checkpoint's (tests/server/chat_model.py)


def _json(obj) -> bytes:
    return json.dumps(obj).encode()


def _nested(depth: int) -> bytes:
    return b'{"prompt": "hi", "extra": ' + b"[" * depth + b"]" * depth + b"}"


BAD = [
    # (id, route, raw body, status, param, code or None)
    ("stream_options_without_stream", CHAT, _json({"messages": MSG, "stream_options": {"include_usage": True}}),
     400, "stream_options", None),
    ("stop_token_id_out_of_vocab", COMPLETIONS, _json({"prompt": "hi", "stop_token_ids": [5, VOCAB]}), 400,
     "stop_token_ids", None),
    ("stop_token_id_negative", COMPLETIONS, _json({"prompt": "hi", "stop_token_ids": [-1]}), 400, "stop_token_ids",
     None),
    ("seed_past_int64", COMPLETIONS, _json({"prompt": "hi", "seed": 2**63}), 400, "seed", None),
    ("seed_below_int64", COMPLETIONS, _json({"prompt": "hi", "seed": -(2**63) - 1}), 400, "seed", None),
    ("seed_plus_n_past_int64", COMPLETIONS, _json({"prompt": "hi", "seed": 2**63 - 1, "n": 2}), 400, "seed", None),
    ("temperature_over_2", CHAT, _json({"messages": MSG, "temperature": 2.5}), 400, "temperature", None),
    ("temperature_huge", CHAT, _json({"messages": MSG, "temperature": 1e308}), 400, "temperature", None),
    ("top_k_2_pow_63", COMPLETIONS, _json({"prompt": "hi", "top_k": 2**63}), 400, "top_k", None),
    ("top_k_past_vocab", COMPLETIONS, _json({"prompt": "hi", "top_k": VOCAB + 1}), 400, "top_k", None),
    ("logit_bias_key_spaces", CHAT, _json({"messages": MSG, "logit_bias": {" 5": 1}}), 400, "logit_bias", None),
    ("logit_bias_key_plus", CHAT, _json({"messages": MSG, "logit_bias": {"+5": 1}}), 400, "logit_bias", None),
    ("logit_bias_key_newline", CHAT, _json({"messages": MSG, "logit_bias": {"5\n": 1}}), 400, "logit_bias", None),
    ("logit_bias_key_underscore", CHAT, _json({"messages": MSG, "logit_bias": {"1_0": 1}}), 400, "logit_bias", None),
    ("logit_bias_key_arabic_digit", CHAT, _json({"messages": MSG, "logit_bias": {"\u0665": 1}}), 400, "logit_bias",
     None),
    ("legacy_functions", CHAT, _json({"messages": MSG, "functions": [{"name": "f", "parameters": {}}]}), 400,
     "functions", None),
    ("legacy_function_call", CHAT, _json({"messages": MSG, "function_call": "auto"}), 400, "function_call", None),
    ("legacy_message_function_call", CHAT, _json({"messages": [
        {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}}]}), 400,
     "messages.0.function_call", None),
    ("text_part_without_text", CHAT, _json({"messages": [{"role": "user", "content": [{"type": "text"}]}]}), 400,
     "messages.0.content.0.text", "missing_required_parameter"),
    ("repetition_penalty_tiny", COMPLETIONS, _json({"prompt": "hi", "repetition_penalty": 1e-300}), 400,
     "repetition_penalty", None),
    ("repetition_penalty_huge", COMPLETIONS, _json({"prompt": "hi", "repetition_penalty": 1e300}), 400,
     "repetition_penalty", None),
    ("frequency_penalty_huge", COMPLETIONS, _json({"prompt": "hi", "frequency_penalty": 1e300}), 400,
     "frequency_penalty", None),
    ("nan_literal", COMPLETIONS, b'{"prompt": "hi", "temperature": NaN}', 400, None, "invalid_json"),
    ("integer_of_5000_digits", COMPLETIONS, b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}", 400, None,
     "invalid_json"),
    ("too_many_stop_strings", COMPLETIONS, _json({"prompt": "hi", "stop": [f"s{i}" for i in range(17)]}), 400,
     "stop", None),
    ("empty_stop_string", COMPLETIONS, _json({"prompt": "hi", "stop": ""}), 400, "stop", None),
    ("stop_string_too_long", COMPLETIONS, _json({"prompt": "hi", "stop": ["ok", "x" * 1025]}), 400, "stop.1", None),
    ("min_tokens_past_context", COMPLETIONS, _json({"prompt": "hi", "max_tokens": None, "min_tokens": 2**62}), 400,
     "min_tokens", "context_length_exceeded"),
    ("nested_100_deep", COMPLETIONS, _nested(100), 400, "extra" + ".0" * 63, None),
    ("nested_100000_deep", COMPLETIONS, _nested(100_000), 400, None, "invalid_json"),
    ("invalid_utf8_key", COMPLETIONS, b'{"prompt": "hi", "k\xff": 1}', 400, "k\ufffd", "invalid_encoding"),
    ("request_chat_template", CHAT, _json({"messages": MSG, "chat_template": "{{ 'x' * 999999999 }}"}), 400,
     "chat_template", "chat_template_not_allowed"),
    ("chat_template_in_kwargs", CHAT, _json({"messages": MSG, "chat_template_kwargs": {"chat_template": "{{ 1 }}"}}),
     400, "chat_template_kwargs.chat_template", "chat_template_not_allowed"),
    ("tokenize_chat_template", "/v1/tokenize", _json({"messages": MSG, "chat_template": "{{ 1 }}"}), 400,
     "chat_template", "chat_template_not_allowed"),
    # vLLM fields that change the output and that this server does not implement: refused, never dropped
    ("bad_words_blank", COMPLETIONS, _json({"prompt": "hi", "bad_words": ["The", " "]}), 400, "bad_words", None),
    ("allowed_token_ids_outside_vocab", CHAT, _json({"messages": MSG, "allowed_token_ids": [5, 10**9]}), 400,
     "allowed_token_ids", None),
    ("allowed_token_ids_empty", COMPLETIONS, _json({"prompt": "hi", "allowed_token_ids": []}), 400,
     "allowed_token_ids", None),
    ("truncate_prompt_tokens_0", COMPLETIONS, _json({"prompt": "hi", "truncate_prompt_tokens": 0}), 400,
     "truncate_prompt_tokens", None),
    ("truncate_prompt_tokens_past_context", CHAT, _json({"messages": MSG, "truncate_prompt_tokens": 10**6}), 400,
     "truncate_prompt_tokens", None),
    ("prompt_logprobs_past_20", COMPLETIONS, _json({"prompt": "hi", "prompt_logprobs": 21}), 400, "prompt_logprobs",
     None),
    ("prompt_logprobs_against_echo", COMPLETIONS, _json({"prompt": "hi", "echo": True, "logprobs": 2,
                                                         "prompt_logprobs": 3}), 400, "prompt_logprobs", None),
    ("continue_final_message_with_generation_prompt", CHAT, _json({"messages": MSG, "continue_final_message": True}),
     400, "continue_final_message", None),
    ("prompt_logprobs_streamed_chat", CHAT, _json({"messages": MSG, "prompt_logprobs": 0, "stream": True}), 400,
     "prompt_logprobs", None),
    ("beam_search", COMPLETIONS, _json({"prompt": "hi", "use_beam_search": True}), 400, "use_beam_search",
     "unsupported_parameter"),
]


def _check_error(r: httpx.Response, status: int, param: str | None, code: str | None) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param, err
    assert err["type"] == "invalid_request_error" and err["message"]
    if param is not None:
        assert param.split(".")[0].split("\ufffd")[0] in err["message"], err
    if code is not None:
        assert err["code"] == code, err
    assert "Traceback" not in r.text and "Error:" not in err["message"]  # no Python exception text


@pytest.mark.parametrize("route,body,status,param,code", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_edge_validation_names_the_field(http, route, body, status, param, code):
    r = http.post(route, content=body, headers={"Content-Type": "application/json"})
    _check_error(r, status, param, code)


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
def test_a_body_that_is_not_json_gets_415(server, content_type):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    if content_type:
        headers["Content-Type"] = content_type
    r = httpx.post(server.url + COMPLETIONS, content=_json({"prompt": "hi", "max_tokens": 2}), headers=headers)
    _check_error(r, 415, "Content-Type", "unsupported_media_type")
    assert "application/json" in r.json()["error"]["message"]
    ok = httpx.post(server.url + COMPLETIONS, content=_json({"prompt": "hi", "max_tokens": 2}),
                    headers={**headers, "Content-Type": "application/json; charset=utf-8"})
    assert ok.status_code == 200


# Every integer a request carries, at values a 64-bit tensor cannot hold: none may reach the engine.
_INT_FIELDS = [(COMPLETIONS, {"prompt": "hi"}, "n"), (COMPLETIONS, {"prompt": "hi"}, "max_tokens"),
               (COMPLETIONS, {"prompt": "hi"}, "top_k"), (COMPLETIONS, {"prompt": "hi"}, "seed"),
               (COMPLETIONS, {"prompt": "hi"}, "logprobs"), (COMPLETIONS, {"prompt": "hi"}, "min_tokens"),
               (COMPLETIONS, {"prompt": "hi"}, "best_of"), (CHAT, {"messages": MSG, "logprobs": True}, "top_logprobs"),
               (CHAT, {"messages": MSG}, "max_completion_tokens")]


def _int_cases():
    for route, base, name in _INT_FIELDS:
        for value in (2**63, 2**64 + 1, -(2**63) - 1):
            yield route, {**base, name: value}, name
    for value in (2**63, -(2**63) - 1):
        yield COMPLETIONS, {"prompt": [1, value]}, "prompt"
        yield COMPLETIONS, {"prompt": "hi", "stop_token_ids": [value]}, "stop_token_ids"
        yield CHAT, {"messages": MSG, "logit_bias": {str(value): 1}}, "logit_bias"


def test_no_integer_past_int64_reaches_the_engine(http):
    for route, body, name in _int_cases():
        r = http.post(route, json=body)
        assert 400 <= r.status_code < 500, (body, r.text)
        assert r.json()["error"]["param"].split(".")[0] == name, (body, r.json())
    ok = http.post(COMPLETIONS, json={"prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200


def test_valid_edges_are_accepted(http):
    """The bounds are inclusive where OpenAI's are: temperature 2, top_k = vocabulary size, int64 seeds; the
    unsupported vLLM fields pass at their inactive values (completions' own echo is supported)."""
    for extra in ({"temperature": 2.0}, {"top_k": VOCAB}, {"seed": 2**63 - 1}, {"seed": -(2**63)},
                  {"logit_bias": {"0005": 1.5}}, {"repetition_penalty": 100.0}, {"stop": ["a"] * 16},
                  {"echo": True}, {"bad_words": []}, {"use_beam_search": False}, {"truncate_prompt_tokens": None},
                  {"length_penalty": 1.0}):
        r = http.post(COMPLETIONS, json={"prompt": "hi", "max_tokens": 3, **extra})
        assert r.status_code == 200, (extra, r.text)


def test_tiny_temperature_is_greedy(http, reference):
    """1e-46 once underflowed to NaN and emitted token 0; now anything below 1e-5 is greedy."""
    expected = reference.generate(["Hello"], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    for temperature in (1e-46, 5e-324, 9e-6):
        r = http.post(COMPLETIONS, json={"prompt": "Hello", "max_tokens": 10, "temperature": temperature,
                                         "ignore_eos": True})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected[0].outputs[0].text


async def _greedy_stream(client: httpx.AsyncClient, max_tokens: int) -> str:
    body = {"prompt": "Once", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    text = ""
    async with client.stream("POST", COMPLETIONS, json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                assert "error" not in event, event
                text += event["choices"][0]["text"]
    return text


def test_bad_requests_never_disturb_a_concurrent_stream(server, reference):
    """Item 8 at the edge: while a stream runs, every bad body above is refused; the stream's tokens are exactly
    the offline engine's, so no engine step it was in failed."""
    expected = reference.generate(["Once"], SamplingParams(temperature=0, max_tokens=120, ignore_eos=True))

    async def main():
        headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=120) as c:
            stream = asyncio.create_task(_greedy_stream(c, 120))
            statuses = []
            for _, route, body, status, _, _ in BAD:
                statuses.append(((await c.post(route, content=body)).status_code, status))
            for route, body, _ in _int_cases():
                statuses.append(((await c.post(route, json=body)).status_code, 400))
            return await stream, statuses

    text, statuses = asyncio.run(main())
    assert all(got == want for got, want in statuses), statuses
    assert text == expected[0].outputs[0].text
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
