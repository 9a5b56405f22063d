"""Reasoning and tool calls end to end: a model trained to write Qwen3.5 markup, served, parsed into
reasoning_content / content / tool_calls, streaming and not."""

from __future__ import annotations

import json

from tests.server.chat_model import NO_THINK_CHAT, THINK_CHAT, TOOL_CHAT, Chat
from tests.server.conftest import MODEL_NAME


def _create(client, chat: Chat, **kw):
    body = chat.request()
    extra = {"chat_template_kwargs": body["chat_template_kwargs"]} if "chat_template_kwargs" in body else {}
    extra.update(kw.pop("extra_body", {}))
    kw.setdefault("max_tokens", 200)
    return client.chat.completions.create(model=MODEL_NAME, messages=body["messages"], tools=body.get("tools"),
                                          temperature=0, extra_body=extra or None, **kw)


def _collect_stream(stream) -> tuple[str, str, dict[int, dict], str | None, int]:
    reasoning = content = ""
    calls: dict[int, dict] = {}
    finish = None
    arg_pieces = 0
    for chunk in stream:
        for c in chunk.choices:
            d = c.delta
            reasoning += getattr(d, "reasoning_content", None) or ""
            content += d.content or ""
            for tc in d.tool_calls or []:
                call = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
                if tc.id:
                    assert call["id"] is None, "a call's id is sent once, in its first delta"
                    call["id"], call["name"] = tc.id, tc.function.name
                if tc.function and tc.function.arguments:
                    call["arguments"] += tc.function.arguments
                    arg_pieces += 1
            finish = c.finish_reason or finish
    return reasoning, content, calls, finish, arg_pieces


def test_tool_call_non_streaming(client):
    out = _create(client, TOOL_CHAT)
    m = out.choices[0].message
    assert m.reasoning_content == "The user asks about Paris."
    assert m.content == "Let me check."
    assert len(m.tool_calls) == 1 and m.tool_calls[0].type == "function"
    assert m.tool_calls[0].function.name == "get_weather" and m.tool_calls[0].id.startswith("call_")
    assert json.loads(m.tool_calls[0].function.arguments) == {"city": "Paris", "days": 3}  # days typed as integer
    assert out.choices[0].finish_reason == "tool_calls"


def test_tool_call_streaming_matches_non_streaming(client):
    full = _create(client, TOOL_CHAT).choices[0].message
    reasoning, content, calls, finish, arg_pieces = _collect_stream(_create(client, TOOL_CHAT, stream=True))
    assert (reasoning, content, finish) == (full.reasoning_content, full.content, "tool_calls")
    assert list(calls) == [0] and calls[0]["name"] == "get_weather"
    assert calls[0]["arguments"] == full.tool_calls[0].function.arguments
    assert arg_pieces > 3  # arguments streamed as the model wrote them, not in one piece at the end


def test_reasoning_with_template_opened_think(client, reference):
    from deltaserve import SamplingParams

    raw = reference.chat(THINK_CHAT.request()["messages"], SamplingParams(temperature=0, max_tokens=200,
                                                                         skip_special_tokens=False))
    assert raw[0].outputs[0].text == "Greet them.\n</think>\n\nHello there!"  # what the engine writes
    m = _create(client, THINK_CHAT).choices[0].message
    assert (m.reasoning_content, m.content, m.tool_calls) == ("Greet them.", "Hello there!", None)
    reasoning, content, calls, finish, _ = _collect_stream(_create(client, THINK_CHAT, stream=True))
    assert (reasoning, content, calls, finish) == ("Greet them.", "Hello there!", {}, "stop")


def test_thinking_disabled_is_all_content(client):
    m = _create(client, NO_THINK_CHAT).choices[0].message
    assert (m.reasoning_content, m.content) == (None, "Hi!")


def test_include_reasoning_false_hides_it(client):
    m = _create(client, THINK_CHAT, extra_body={"include_reasoning": False}).choices[0].message
    assert m.content == "Hello there!" and getattr(m, "reasoning_content", None) is None


def test_named_tool_choice_and_tool_choice_none(client):
    forced = _create(client, TOOL_CHAT, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert forced.choices[0].message.tool_calls[0].function.name == "get_weather"
    # "none": the template still lists the tools (as in vLLM), so the prompt is the one "auto" renders and the model
    # writes its call anyway; nothing is parsed as a call: the markup is content, and the reply ends with "stop"
    none = _create(client, TOOL_CHAT, tool_choice="none").choices[0]
    assert none.message.tool_calls is None and none.finish_reason == "stop"
    assert none.message.content == ("Let me check.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n"
                                    "</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>")


def test_tokenize_chat_lists_the_tools(http):
    body = TOOL_CHAT.request()
    with_tools = http.post("/v1/tokenize", json={"messages": body["messages"], "tools": body["tools"]}).json()
    without = http.post("/v1/tokenize", json={"messages": body["messages"]}).json()
    text = http.post("/v1/detokenize", json={"tokens": with_tools["tokens"]}).json()["prompt"]
    assert "tools: get_weather" in text and text.endswith("<|im_start|>assistant\n<think>\n")
    assert with_tools["count"] > without["count"]


def test_streamed_tool_call_deltas_follow_openai_with_n_choices(client):
    """OpenAI's stream: a call's first delta carries its id, type, name and arguments "", the deltas after it only
    arguments, each choice numbering its own calls from 0, and each choice ends with finish_reason "tool_calls".
    The header and the first arguments arrived in one engine delta (here: the stop string holds back
    "<function=get_weather>\\n<parameter=city>\\n", a prefix of it, until "P" breaks the match; MTP's multi-token
    steps do the same), and that first delta carried arguments '{"city": "P' with the name."""
    stop = "<function=get_weather>\n<parameter=city>\nLondon"
    full = _create(client, TOOL_CHAT, stop=[stop]).choices[0].message
    deltas: dict[int, list] = {0: [], 1: []}
    finish = {}
    for chunk in _create(client, TOOL_CHAT, stream=True, n=2, stop=[stop]):
        for c in chunk.choices:
            deltas[c.index] += c.delta.tool_calls or []
            finish[c.index] = c.finish_reason or finish.get(c.index)
    assert finish == {0: "tool_calls", 1: "tool_calls"}
    for choice in (0, 1):
        first, *rest = deltas[choice]
        assert (first.index, first.type, first.function.name, first.function.arguments) == (0, "function",
                                                                                              "get_weather", "")
        assert first.id.startswith("call_") and rest
        assert all(d.index == 0 and d.id is None and d.type is None and d.function.name is None for d in rest)
        assert "".join(d.function.arguments for d in rest) == full.tool_calls[0].function.arguments
    assert deltas[0][0].id != deltas[1][0].id
