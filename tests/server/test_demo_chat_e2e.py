"""The shipped demo model through the real server: what a new user sees with no model download. Its reasoning goes
to reasoning_content and its Qwen3-Coder XML call to tool_calls (the model learnt the markup in
tools/finetune_demo_chat.py; tests/test_demo_model.py checks the same replies offline)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from deltaserve.demo import SHIPPED_DEMO_DIR
from tests.server.conftest import MODEL_NAME, ServerProcess
from tools.demo_chat_data import TOOLS_BY_NAME


@pytest.fixture(scope="module")
def demo_client(tmp_path_factory) -> Iterator:
    from openai import OpenAI

    srv = ServerProcess(SHIPPED_DEMO_DIR, tmp_path_factory.mktemp("demo_server") / "server.log")
    try:
        yield OpenAI(base_url=srv.url + "/v1", api_key="unused", timeout=60, max_retries=0)
    finally:
        srv.stop()


def test_demo_model_calls_a_tool_through_the_server(demo_client):
    tools = [TOOLS_BY_NAME[n].schema() for n in ("run_python", "get_weather")]
    ask = "Could you look up the current conditions in Chennai?"
    out = demo_client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": ask}],
                                              tools=tools, temperature=0, max_tokens=128)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.reasoning_content, "the thinking block should reach reasoning_content"
    call = choice.message.tool_calls[0].function
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Chennai"}


def test_demo_model_thinks_then_answers_through_the_server(demo_client):
    out = demo_client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Please say the words marble violin back to me."}],
        temperature=0, max_tokens=128)
    choice = out.choices[0]
    assert choice.finish_reason == "stop" and choice.message.reasoning_content and choice.message.content, choice
    assert "<think>" not in choice.message.content and "</think>" not in choice.message.content
