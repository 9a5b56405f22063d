"""How a chat request's messages become the prompt: the shipped demo model's app, in this process, rendering through
/v1/tokenize (and /v1/detokenize to read the prompt back) and /v1/chat/completions. Requests may bring their own
template here (--trust-request-chat-template), so each case can show exactly what the template was given."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from deltaserve.demo import SHIPPED_DEMO_DIR

# Shows each message's role, content and reasoning as the template sees them.
SHOW = "{% for m in messages %}[{{ m.role }}|{{ m.content }}|{{ m.reasoning_content }}]{% endfor %}"
USER = {"role": "user", "content": "hi"}


class App:
    """The app and one event loop for the whole module (the template workers outlive single requests)."""

    def __init__(self) -> None:
        from deltaserve.config import EngineArgs
        from deltaserve.engine.async_engine import AsyncLLM
        from deltaserve.server.app import build_app
        from deltaserve.server.args import ServerConfig

        self.engine = AsyncLLM(EngineArgs(model=str(SHIPPED_DEMO_DIR), device="cpu", dtype="float32",
                                          max_model_len=512))
        self.app = build_app(self.engine, ServerConfig(served_model_names=("m",), trust_request_chat_template=True),
                             shutdown_engine=False)
        self.loop = asyncio.new_event_loop()

    def post(self, route: str, body: dict[str, Any]) -> httpx.Response:
        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as c:
                return await c.post(route, json=body)
        return self.loop.run_until_complete(go())

    def prompt(self, **body: Any) -> str:
        """The rendered prompt's text."""
        r = self.post("/v1/tokenize", body)
        assert r.status_code == 200, r.text
        return self.post("/v1/detokenize", {"tokens": r.json()["tokens"]}).json()["prompt"]

    def close(self) -> None:
        self.app.state.server.templates.close()
        self.engine.shutdown()
        self.loop.close()


@pytest.fixture(scope="module")
def app() -> Iterator[App]:
    a = App()
    yield a
    a.close()


def _error(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 400, r.text
    return r.json()["error"]


def test_reasoning_sent_back_under_either_name_reaches_the_template(app):
    # the server answers with both reasoning_content and reasoning; a client may echo either
    for name in ("reasoning_content", "reasoning"):
        reply = {"role": "assistant", "content": "yo", name: "R"}
        assert app.prompt(messages=[USER, reply], chat_template=SHOW) == "[user|hi|][assistant|yo|R]"
    both = {"role": "assistant", "content": "yo", "reasoning": "R", "reasoning_content": "R"}
    assert app.prompt(messages=[USER, both], chat_template=SHOW) == "[user|hi|][assistant|yo|R]"
    differ = {"role": "assistant", "content": "yo", "reasoning": "R", "reasoning_content": "S"}
    err = _error(app.post("/v1/tokenize", {"messages": [USER, differ], "chat_template": SHOW}))
    assert err["param"] == "messages.1.reasoning" and "differ" in err["message"]


def test_assistant_refusal_part_is_its_text(app):
    # OpenAI's assistant content may be [{"type": "refusal", "refusal": ...}] (a reply that declined)
    reply = {"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't."}]}
    assert app.prompt(messages=[USER, reply], chat_template=SHOW) == "[user|hi|][assistant|I can't.|]"
    err = _error(app.post("/v1/tokenize", {"messages": [USER, {"role": "assistant", "content": [
        {"type": "refusal"}]}]}))
    assert err["param"] == "messages.1.content.0.refusal" and err["code"] == "missing_required_parameter"
    # only an assistant refuses: elsewhere it is an unsupported part, named
    err = _error(app.post("/v1/tokenize", {"messages": [{"role": "user", "content": [
        {"type": "refusal", "refusal": "x"}]}]}))
    assert err["param"] == "messages.0.content.0.type" and "'refusal'" in err["message"]


@pytest.mark.parametrize("template, shown", [
    ("{{ messages[0].content + 1 }}", "TypeError: can only concatenate str"),
    ("{% for k, v in messages[0].content|items %}{% endfor %}", "TypeError: Can only get item pairs from a mapping"),
    ("{{ 1 / 0 }}", "ZeroDivisionError: division by zero"),
])
def test_template_code_failing_on_the_messages_is_a_400_with_its_message(app, template, shown):
    for route in ("/v1/tokenize", "/v1/chat/completions"):
        err = _error(app.post(route, {"messages": [USER], "chat_template": template, "max_tokens": 1}))
        assert shown in err["message"] and err["param"] == "messages", err


def test_template_that_renders_nothing_is_named(app):
    err = _error(app.post("/v1/chat/completions", {"messages": [USER], "chat_template": "{# nothing #}",
                                                   "max_tokens": 1}))
    assert "rendered these messages to an empty prompt" in err["message"] and err["param"] == "messages"


def test_documents_reach_the_template(app):
    # vLLM's `documents` field, for templates that render retrieval documents; it was dropped without a word
    docs = "{% for d in documents or [] %}<{{ d.title }}:{{ d.text }}>{% endfor %}{{ messages[0].content }}"
    documents = [{"title": "T", "text": "X"}]
    assert app.prompt(messages=[USER], documents=documents, chat_template=docs) == "<T:X>hi"
    r = app.post("/v1/chat/completions", {"messages": [USER], "documents": documents, "max_tokens": 1,
                                          "chat_template": docs + "{{ raise_exception(documents[0].text) }}"})
    assert "X" in _error(r)["message"]  # the chat route passes them too
    err = _error(app.post("/v1/tokenize", {"messages": [USER], "documents": "T"}))
    assert err["param"] == "documents"


def test_text_parts_join_with_newlines_as_in_vllm(app):
    # the model's own template: two text parts render as the string of both, a newline between (vLLM's join)
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    joined = [{"role": "user", "content": "first\nsecond"}]
    assert app.prompt(messages=[{"role": "user", "content": parts}]) == app.prompt(messages=joined)
    tool = [USER, {"role": "tool", "tool_call_id": "c", "content": parts}]
    assert app.prompt(messages=tool, chat_template=SHOW) == "[user|hi|][tool|first\nsecond|]"


@pytest.mark.parametrize("messages, param", [
    ([], "messages"),
    ([USER, {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}}],
     "messages.1.function_call"),
])
def test_tokenize_refuses_the_chats_that_chat_refuses(app, messages, param):
    # /v1/tokenize rendered these (an empty chat; a legacy function_call dropped), counting prompts chat never runs
    for route in ("/v1/tokenize", "/v1/chat/completions"):
        assert _error(app.post(route, {"messages": messages, "max_tokens": 1}))["param"] == param


def test_chat_past_the_context_names_both_lengths(app):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello world " * 300}]
    count = app.post("/v1/tokenize", {"messages": messages}).json()["count"]
    err = _error(app.post("/v1/chat/completions", {"messages": messages, "max_tokens": 1}))
    assert err["code"] == "context_length_exceeded" and err["param"] == "messages"
    assert f"is {count} tokens" in err["message"] and "context is 512 tokens" in err["message"], err


TOOLS = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}} for n in ("f", "g")]


@pytest.mark.parametrize("tool_choice", ["none", {"type": "function", "function": {"name": "g"}}, "auto"])
def test_tokenize_counts_the_tools_chat_lists(app, tool_choice):
    # tokenize lists the tools chat lists, whatever the choice
    body = {"messages": [USER], "tools": TOOLS, "tool_choice": tool_choice}
    chat = app.post("/v1/chat/completions", {**body, "max_tokens": 1})
    assert chat.status_code == 200, chat.text
    assert app.post("/v1/tokenize", body).json()["count"] == chat.json()["usage"]["prompt_tokens"]


def test_a_named_tool_choice_keeps_every_tool_in_the_prompt(app):
    # as vLLM: the grammar forces the call, the prompt is the one "auto" renders. Listing only the named tool changed
    # the prompt from its tools block on, so an agent loop that forces its last call found nothing in the prefix
    # cache, and the history's calls of other tools named tools the prompt no longer listed
    history = [{"role": "system", "content": "You plan trips."}, USER]
    named = {"type": "function", "function": {"name": "g"}}
    assert app.prompt(messages=history, tools=TOOLS, tool_choice=named) == app.prompt(messages=history, tools=TOOLS)
    chat = [app.post("/v1/chat/completions", {"messages": history, "tools": TOOLS, "tool_choice": choice,
                                              "max_tokens": 1}) for choice in ("auto", named)]
    assert chat[1].status_code == 200, chat[1].text
    usage = chat[1].json()["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] > usage["prompt_tokens"] // 2, usage


def test_tool_choice_none_keeps_the_tools_in_the_prompt(app):
    # vLLM renders the tools for "none" too (the model is only not asked to call them); they were dropped.
    # --exclude-tools-when-tool-choice-none drops them, on chat and tokenize alike
    body = {"messages": [USER], "tools": TOOLS, "tool_choice": "none"}
    assert app.prompt(**body) == app.prompt(messages=[USER], tools=TOOLS) != app.prompt(messages=[USER])
    state = app.app.state.server
    default = state.config
    state.config = dataclasses.replace(default, exclude_tools_when_tool_choice_none=True)
    try:
        assert app.prompt(**body) == app.prompt(messages=[USER])
        chat = app.post("/v1/chat/completions", {**body, "max_tokens": 1}).json()
        assert chat["usage"]["prompt_tokens"] == app.post("/v1/tokenize", {"messages": [USER]}).json()["count"]
        assert app.prompt(messages=[USER], tools=TOOLS, tool_choice="auto") != app.prompt(messages=[USER])
    finally:
        state.config = default


def test_template_workers_that_died_while_idle_are_replaced(app):
    # one died between jobs (the OOM killer, a signal) failed every request it was handed, for good: closing it
    # raised BrokenPipeError, so it went back to the pool instead of being replaced
    renderer = app.app.state.server.templates
    app.prompt(messages=[USER])  # the workers are up
    for worker in list(renderer._all):
        worker.proc.kill()
        worker.proc.wait()
    for _ in range(3):
        assert "hi" in app.prompt(messages=[USER])
    assert len(renderer._all) == renderer.limits.workers and all(w.proc.poll() is None for w in renderer._all)


def test_a_renderer_failure_is_a_server_error():
    # the renderer's own failure (kind "internal": a worker that exited or would not start) is not the client's
    from deltaserve.server.chat_prompt import _render_error
    from deltaserve.server.templates import TemplateRenderError

    err = _render_error(TemplateRenderError("internal", "the template worker exited"), "messages")
    assert err.status == 500 and err.code == "chat_template_error"


# Qwen3.5's rule: messages without a user query are refused (so a system message cannot be rendered alone).
NEEDS_USER = ("{% if not (messages | selectattr('role', 'equalto', 'user') | list) %}"
              "{{ raise_exception('No user query found in messages.') }}{% endif %}"
              "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("template", [None, NEEDS_USER])
def test_a_system_message_gets_a_cache_point_where_its_conversations_part(app, template):
    """The prefix cache keeps a GDN state where every conversation opening with the same system message parts: the
    point is the same for different user turns and their prompts agree up to it, also with a template that refuses
    to render a system message alone (as Qwen3.5's does; the point was then never made)."""
    from deltaserve.server.chat_prompt import ChatRequestParts, render_prompt
    from deltaserve.server.protocol import ChatMessage

    state = app.app.state.server
    system = ChatMessage(role="system", content="You are terse.")

    def render(user: str):
        parts = ChatRequestParts([system, ChatMessage(role="user", content=user)], None, True, template, None)
        return app.loop.run_until_complete(render_prompt(state, parts))

    one, two = render("What is 2 + 2?"), render("Name a colour.")
    shared = next(i for i, (x, y) in enumerate(zip(one.ids, two.ids)) if x != y)
    point = max(p for p in one.cache_points if p <= shared)
    assert point in two.cache_points and one.ids[:point] == two.ids[:point]
    assert "You are terse." in state.tokenizer.decode(one.ids[:point])
