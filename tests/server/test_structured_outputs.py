"""Structured outputs through the live server: response_format on chat and completions, vLLM's structured_outputs
and guided_* fields, the openai client's parse() with a pydantic model, tool_choice "required" / a named function
always giving a parseable call with valid arguments, and the 400s that name the problem."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from tests.server.chat_model import TOOL_CHAT, WEATHER_TOOL
from tests.server.conftest import MODEL_NAME
from tests.structured.schemas import SCHEMAS, structural_tag_values

NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}
MESSAGES = [{"role": "user", "content": "Describe an order"}]


def chat(client, **kw):
    kw.setdefault("max_tokens", 200)
    return client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, **kw)


@pytest.mark.parametrize("name", ["nested", "bounded"])
def test_chat_json_schema_validates_for_every_choice(client, name):
    out = chat(client, n=6, seed=5, temperature=1.0, extra_body=NO_THINK,
               response_format={"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name],
                                                                       "strict": True}})
    for c in out.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.message.content), SCHEMAS[name])


def test_reasoning_first_then_json(client):
    """With thinking on, the template leaves <think> open: the model reasons freely, then writes the JSON."""
    out = chat(client, seed=1, temperature=1.0, max_tokens=400, response_format={"type": "json_object"})
    c = out.choices[0]
    assert c.finish_reason == "length" or isinstance(json.loads(c.message.content), dict)


def test_parse_with_a_pydantic_model(client):
    from pydantic import BaseModel

    class Item(BaseModel):
        sku: str
        qty: int

    class Order(BaseModel):
        id: int
        express: bool
        items: list[Item]

    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    # a random-ish model: strings and lists are unbounded, so allow a few tries for one that ends in max_tokens
    for seed in range(6):
        out = parse(model=MODEL_NAME, messages=MESSAGES, response_format=Order, max_tokens=300, seed=seed,
                    temperature=0.7, extra_body=NO_THINK)
        if out.choices[0].finish_reason == "stop":
            break
    assert isinstance(out.choices[0].message.parsed, Order)


def test_completions_with_structured_outputs_and_guided_fields(client):
    regex = client.completions.create(model=MODEL_NAME, prompt="Code:", max_tokens=20, seed=2,
                                      extra_body={"structured_outputs": {"regex": "[A-Z]{2}-[0-9]{3}"}})
    assert re.fullmatch(r"[A-Z]{2}-[0-9]{3}", regex.choices[0].text)
    choice = client.completions.create(model=MODEL_NAME, prompt="Answer:", max_tokens=10, n=4, seed=3,
                                       extra_body={"guided_choice": ["yes", "no"]})
    assert {c.text for c in choice.choices} <= {"yes", "no"}
    schema = SCHEMAS["bounded"]
    out = client.completions.create(model=MODEL_NAME, prompt="{", max_tokens=200, n=3, seed=4,
                                    extra_body={"response_format": {"type": "json_schema",
                                                                    "json_schema": {"name": "b", "schema": schema}}})
    for c in out.choices:
        jsonschema.validate(json.loads(c.text), schema)


def test_streamed_json_equals_non_streamed(client):
    kw = dict(seed=9, temperature=1.0, extra_body=NO_THINK,
              response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMAS["nested"]}})
    full = chat(client, **kw).choices[0].message.content
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chat(client, stream=True, **kw)
                       if chunk.choices)
    assert streamed == full and json.loads(full)


def _arguments(call) -> dict:
    return json.loads(call.function.arguments)


@pytest.mark.parametrize("thinking", [False, True])
def test_tool_choice_required_always_gives_a_valid_call(client, thinking):
    schema = WEATHER_TOOL["function"]["parameters"]
    out = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Plan my trip"}], tools=[WEATHER_TOOL],
        tool_choice="required", n=4, seed=11, temperature=1.0, max_tokens=300,
        extra_body={"chat_template_kwargs": {"enable_thinking": thinking}})
    ended = [c for c in out.choices if c.finish_reason != "length"]
    assert ended or thinking  # thinking may use up max_tokens before the call
    for c in ended:
        assert c.finish_reason == "tool_calls" and c.message.tool_calls
        for call in c.message.tool_calls:
            assert call.function.name == "get_weather"
            jsonschema.validate(_arguments(call), schema)


def test_named_function_and_strict_auto(client):
    ping = {"type": "function", "function": {"name": "ping", "parameters": {
        "type": "object", "properties": {"host": {"type": "string", "enum": ["a.example", "b.example"]}},
        "required": ["host"]}}}
    out = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER_TOOL, ping],
        tool_choice={"type": "function", "function": {"name": "ping"}}, seed=1, max_tokens=100, extra_body=NO_THINK)
    calls = out.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["ping"] and _arguments(calls[0])["host"] in ("a.example", "b.example")
    # "auto" stays free: the memorised reply (text, then a call) comes back unchanged, strict or not
    strict = {"type": "function", "function": {**WEATHER_TOOL["function"], "strict": True}}
    replies = [client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user",
                                                                           "content": "Weather in Paris?"}],
                                              tools=[tool], temperature=0, max_tokens=200).choices[0].message
               for tool in (WEATHER_TOOL, strict)]
    assert replies[0].content == replies[1].content and _arguments(replies[1].tool_calls[0]) == {"city": "Paris",
                                                                                                 "days": 3}


def _tool(name: str, properties: dict, **kw) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": properties},
                                             **kw}}


@pytest.mark.parametrize("body, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "uniqueItems": True}}}}, "response_format.json_schema.schema", "uniqueItems"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema", "needs"),
    ({"guided_regex": "(unclosed"}, "guided_regex", "unclosed"),
    ({"structured_outputs": {"grammar": "start: missing_rule"}}, "structured_outputs.grammar", "missing_rule"),
    ({"guided_grammar": "root ::= missing_rule"}, "guided_grammar", "missing_rule"),  # GBNF: was a 500
    ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs.structural_tag", "'triggers' must be"),
    ({"structural_tag": '{"format": {"type": "any_text"}}'}, "structural_tag", "xgrammar"),
    ({"response_format": {"type": "structural_tag", "triggers": ["<b>"],
                          "structures": [{"begin": "<a>", "schema": {}, "end": ""}]}}, "response_format",
     "none of the triggers"),
    ({"response_format": {"type": "structural_tag", "triggers": ["<a>"],
                          "structures": [{"begin": "<a>", "schema": {"type": "strng"}, "end": ""}]}},
     "response_format", "strng"),
    ({"guided_json": {"type": "object"}, "guided_regex": "a"}, "guided_regex", "only one"),
    ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos", "ignore_eos"),
    ({"tools": [WEATHER_TOOL], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format", "both constrain"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "when": {"type": "string", "format": "email"}}}}}], "tool_choice": "required"}, "tools.0.function.parameters",
     "email"),
    # the tool whose schema cannot be enforced is named, whichever field asked to enforce it
    ({"tools": [WEATHER_TOOL, _tool("g", {"n": {"type": "strng"}})], "tool_choice": "required"},
     "tools.1.function.parameters", "function 'g'"),
    ({"tools": [WEATHER_TOOL, _tool("g", {"n": {"type": "integer", "minimum": "x"}})],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tools.1.function.parameters", "minimum"),
    ({"tools": [WEATHER_TOOL, _tool("g", {"n": {"type": "strng"}}, strict=True)]}, "tools.1.function.parameters",
     "strng"),
    ({"tools": [_tool("get weather", {})], "tool_choice": "required"}, "tools.0.function.name", "get weather"),
    # malformed keywords were a 500 (a TypeError / ValueError while building the grammar)
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"x-guidance": 5}}}},
     "response_format.json_schema.schema", "x-guidance"),
    ({"tools": [_tool("g", {"s": {"type": "string", "minLength": "x"}})], "tool_choice": "required"},
     "tools.0.function.parameters", "minLength"),
])
def test_unenforceable_constraints_are_a_400_naming_the_field(http, body, param, words):
    r = http.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": MESSAGES, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_length_before_the_structure_closes(client):
    out = chat(client, max_tokens=3, extra_body=NO_THINK,
               response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMAS["nested"]}})
    assert out.choices[0].finish_reason == "length" and out.choices[0].message.content.startswith("{")


CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"],
        "additionalProperties": False}
# <tool_call> and </tool_call> are special tokens of the test model's tokenizer: matched by name
CALL_TAG = {"structures": [{"begin": "<tool_call>\n<function=get_weather>", "schema": CITY,
                            "end": "</function>\n</tool_call>"}], "triggers": ["<tool_call>"]}


def test_structural_tag_turns_a_written_call_into_the_structure_in_every_form(client):
    """The memorised tool chat writes its call in XML (<parameter=city>...); under a structural tag whose trigger it
    writes (the <tool_call> token), the call becomes the structure: JSON arguments that validate. vLLM's three
    fields give the same."""
    body = {**TOOL_CHAT.request(), "tool_choice": "none", "max_tokens": 300, "temperature": 0}
    messages, rest = body.pop("messages"), body

    def content(**extra) -> str:
        out = client.chat.completions.create(model=MODEL_NAME, messages=messages, extra_body={**rest, **extra})
        assert out.choices[0].finish_reason == "stop"
        return out.choices[0].message.content

    free = content()
    assert "<parameter=city>" in free  # unconstrained, the call is not the structure
    with pytest.raises(AssertionError, match="no JSON value after"):
        structural_tag_values(free, CALL_TAG["structures"], CALL_TAG["triggers"])
    forms = [{"response_format": {"type": "structural_tag", **CALL_TAG}},
             {"structured_outputs": {"structural_tag": json.dumps(CALL_TAG)}},
             {"structural_tag": json.dumps({"type": "structural_tag", **CALL_TAG})}]
    texts = [content(**form) for form in forms]
    assert texts[0] == texts[1] == texts[2]
    values = structural_tag_values(texts[0], CALL_TAG["structures"], CALL_TAG["triggers"])
    assert len(values) == 1 and texts[0].startswith("Let me check.\n<tool_call>\n<function=get_weather>{"), texts[0]
