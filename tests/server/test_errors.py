"""Bad input gets a 4xx with an OpenAI-style error body naming the field, and the server keeps serving; API keys."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.server.conftest import API_KEY, MAX_MODEL_LEN, MODEL_NAME

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MSG = [{"role": "user", "content": "hi"}]


def _json(obj) -> bytes:
    return json.dumps(obj).encode()


BAD = [
    # (id, route, raw body, status, param the error must name (None: the body as a whole), code or None)
    ("malformed_json", COMPLETIONS, b'{"prompt": "hi", ', 400, None, "invalid_json"),
    ("not_an_object", COMPLETIONS, b'["prompt"]', 400, None, "invalid_json"),
    ("empty_body", CHAT, b"", 400, None, "invalid_json"),
    ("invalid_utf8", COMPLETIONS, b'{"prompt": "caf\xc3(", "max_tokens": 2}', 400, "prompt", "invalid_encoding"),
    ("invalid_utf8_chat", CHAT, b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400,
     "messages.0.content", "invalid_encoding"),
    ("lone_surrogate", COMPLETIONS, b'{"prompt": "a\\ud800b"}', 400, "prompt", "invalid_encoding"),
    ("missing_prompt", COMPLETIONS, _json({"max_tokens": 2}), 400, "prompt", "missing_required_parameter"),
    ("temperature_type", COMPLETIONS, _json({"prompt": "hi", "temperature": "hot"}), 400, "temperature", None),
    ("max_tokens_string", COMPLETIONS, _json({"prompt": "hi", "max_tokens": "5"}), 400, "max_tokens", None),
    ("max_tokens_bool", COMPLETIONS, _json({"prompt": "hi", "max_tokens": True}), 400, "max_tokens", None),
    ("n_float", COMPLETIONS, _json({"prompt": "hi", "n": 1.5}), 400, "n", None),
    ("messages_type", CHAT, _json({"messages": "hi"}), 400, "messages", None),
    ("role_unknown", CHAT, _json({"messages": [{"role": "robot", "content": "x"}]}), 400, "messages.0.role", None),
    ("negative_max_tokens", COMPLETIONS, _json({"prompt": "hi", "max_tokens": -1}), 400, "max_tokens", None),
    ("zero_max_completion_tokens", CHAT, _json({"messages": MSG, "max_completion_tokens": 0}), 400,
     "max_completion_tokens", None),
    ("negative_temperature", CHAT, _json({"messages": MSG, "temperature": -0.5}), 400, "temperature", None),
    ("top_p_over_1", CHAT, _json({"messages": MSG, "top_p": 1.5}), 400, "top_p", None),
    ("n_zero", CHAT, _json({"messages": MSG, "n": 0}), 400, "n", None),
    ("presence_penalty_range", CHAT, _json({"messages": MSG, "presence_penalty": 3}), 400, "presence_penalty", None),
    ("top_k_range", COMPLETIONS, _json({"prompt": "hi", "top_k": -5}), 400, "top_k", None),
    ("logprobs_range", COMPLETIONS, _json({"prompt": "hi", "logprobs": 50}), 400, "logprobs", None),
    ("top_logprobs_range", CHAT, _json({"messages": MSG, "logprobs": True, "top_logprobs": 30}), 400,
     "top_logprobs", None),
    ("top_logprobs_without_logprobs", CHAT, _json({"messages": MSG, "top_logprobs": 2}), 400, "top_logprobs", None),
    ("logit_bias_key", CHAT, _json({"messages": MSG, "logit_bias": {"abc": 1}}), 400, "logit_bias", None),
    ("logit_bias_id", CHAT, _json({"messages": MSG, "logit_bias": {"100000": 1}}), 400, "logit_bias", None),
    ("logit_bias_value", CHAT, _json({"messages": MSG, "logit_bias": {"5": 500}}), 400, "logit_bias", None),
    ("prompt_too_long", COMPLETIONS, _json({"prompt": [65] * (MAX_MODEL_LEN + 10)}), 400, "prompt",
     "context_length_exceeded"),
    ("chat_too_long", CHAT, _json({"messages": [{"role": "user", "content": "x" * (MAX_MODEL_LEN + 10)}]}), 400,
     "messages", "context_length_exceeded"),
    ("max_tokens_past_context", COMPLETIONS, _json({"prompt": "hi", "max_tokens": MAX_MODEL_LEN}), 400,
     "max_tokens", "context_length_exceeded"),
    ("token_id_out_of_vocab", COMPLETIONS, _json({"prompt": [1, 99999]}), 400, "prompt", None),
    ("empty_prompt", COMPLETIONS, _json({"prompt": []}), 400, "prompt", None),
    ("empty_messages", CHAT, _json({"messages": []}), 400, "messages", None),
    ("image_part", CHAT, _json({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}), 400,
     "messages.0.content.0.type", None),
    ("bad_tool_arguments", CHAT, _json({"messages": [
        {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{oops"}}]}]}),
     400, "messages.0.tool_calls.0.function.arguments", None),
    ("unknown_tool_choice", CHAT, _json({"messages": MSG, "tools": [{"type": "function", "function": {"name": "f"}}],
                                         "tool_choice": {"type": "function", "function": {"name": "g"}}}),
     400, "tool_choice.function.name", None),
    ("tool_choice_without_tools", CHAT, _json({"messages": MSG, "tool_choice": "required"}), 400, "tool_choice", None),
    ("unenforceable_json_schema", CHAT, _json({"messages": MSG, "response_format": {"type": "json_schema",
                                               "json_schema": {"name": "x", "schema": {"type": "strng"}}}}), 400,
     "response_format.json_schema.schema", "invalid_structured_output"),
    ("reserved_template_kwarg", CHAT, _json({"messages": MSG, "chat_template_kwargs": {"tokenize": True}}), 400,
     "chat_template_kwargs", None),
    ("unknown_model", COMPLETIONS, _json({"prompt": "hi", "model": "gpt-9"}), 404, "model", "model_not_found"),
    ("unknown_model_chat", CHAT, _json({"messages": MSG, "model": "gpt-9"}), 404, "model", "model_not_found"),
]


@pytest.mark.parametrize("route,body,status,param,code", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_gets_4xx_naming_the_field_and_server_keeps_serving(http, route, body, status, param, code):
    r = http.post(route, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param, err
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert err["message"] and (param is None or param.split(".")[0] in err["message"]), err
    if code is not None:
        assert err["code"] == code
    ok = http.post(COMPLETIONS, json={"prompt": "hi", "max_tokens": 2, "model": MODEL_NAME})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_bad_streaming_request_is_rejected_before_streaming(http):
    r = http.post(CHAT, json={"messages": MSG, "stream": True, "temperature": -1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"


def test_api_key_required(server):
    with httpx.Client(base_url=server.url, timeout=30) as anon:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
            r = anon.post(COMPLETIONS, json={"prompt": "hi", "max_tokens": 2}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert r.headers["www-authenticate"] == "Bearer"  # RFC 6750: says which scheme to use
            # the docs pages map the whole API, and /metrics shows traffic: both behind the key (no --public-metrics)
            for path in ("/v1/models", "/v1/models/" + MODEL_NAME, "/metrics", "/docs", "/redoc", "/openapi.json"):
                denied = anon.get(path, headers=headers)
                assert denied.status_code == 401 and denied.headers["www-authenticate"] == "Bearer", path
        assert anon.get("/health").status_code == 200  # probes need no key
        assert anon.get("/version").status_code == 200
        key = {"Authorization": f"Bearer {API_KEY}"}
        for path in ("/v1/models", "/metrics", "/docs", "/redoc"):
            assert anon.get(path, headers=key).status_code == 200, path
        assert anon.get("/openapi.json", headers=key).json()["info"]["title"] == "deltaserve"


def test_openai_client_raises_typed_errors(client, server):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME, messages=MSG, temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_unknown_route_and_method(http):
    r = http.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = http.get(COMPLETIONS)
    assert r.status_code == 405 and "error" in r.json()
