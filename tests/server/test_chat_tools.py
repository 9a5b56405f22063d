"""tool_choice against the server's tool-call parser, without a server: what resolve_tools accepts and refuses."""

from __future__ import annotations

import pytest

from deltaserve.server.chat_inputs import resolve_tools
from deltaserve.server.errors import APIError
from deltaserve.server.protocol import ChatCompletionRequest
from tests.structured.schemas import PING, WEATHER


def _request(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], tools=[WEATHER, PING],
                                 **kw)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "ping"}}])
def test_forced_tool_calls_need_the_parser(choice):
    """Without the tool-call parser a forced call would reach the client as raw markup in `content`: refused."""
    with pytest.raises(APIError, match="--tool-call-parser") as e:
        resolve_tools(_request(tool_choice=choice), parse=False)
    assert e.value.status == 400 and e.value.param == "tool_choice"
    assert resolve_tools(_request(tool_choice=choice), parse=True).parse


@pytest.mark.parametrize("choice", [None, "auto", "none"])
def test_unforced_tool_choices_do_not_need_it(choice):
    plan = resolve_tools(_request(tool_choice=choice), parse=False)
    assert not plan.parse and [t["function"]["name"] for t in plan.for_template] == ["get_weather", "ping"]


def test_tool_choice_none_lists_the_tools_but_parses_no_call():
    # as vLLM: the prompt still shows the tools (the model only is not asked to call them), unless the server
    # runs with --exclude-tools-when-tool-choice-none; either way a call the model writes stays content
    plan = resolve_tools(_request(tool_choice="none"), parse=True)
    assert [t["function"]["name"] for t in plan.for_template] == ["get_weather", "ping"]
    assert not plan.parse and plan.schemas is None
    hidden = resolve_tools(_request(tool_choice="none"), parse=True, exclude_tools_when_none=True)
    assert hidden.for_template is None and not hidden.parse
    # the server option hides nothing for the other choices
    assert resolve_tools(_request(tool_choice="auto"), parse=True, exclude_tools_when_none=True).for_template


@pytest.mark.parametrize("parallel, most", [(None, None), (True, None), (False, 1)])
def test_parallel_tool_calls_false_allows_one_call(parallel, most):
    assert resolve_tools(_request(parallel_tool_calls=parallel), parse=True).max_calls == most


@pytest.mark.parametrize("choice", [None, "none", "required"])
def test_duplicate_tool_names_are_a_400_naming_the_second(choice):
    # the model calls a tool by its name: a second tool of that name was listed in the prompt, but its call was
    # parsed (and, when forced, constrained) by either schema, so its arguments could fit neither
    other = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], tools=[WEATHER, PING, other],
                                tool_choice=choice)
    with pytest.raises(APIError, match="'get_weather' is also the name of tools.0") as e:
        resolve_tools(req, parse=True)
    assert e.value.status == 400 and e.value.param == "tools.2.function.name"
