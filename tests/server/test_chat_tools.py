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


def test_parallel_calls_in_one_step_stream_as_openai_does():
    """Several calls in one engine step (MTP, or text a stop string held back): each call's first delta has its
    id, type, name and arguments "", its arguments come in the next chunk, each call has its own index."""
    from itertools import count

    from deltaserve.server.output_parser import OutputParser
    from deltaserve.server.serving_chat import _delta_bodies

    ids = count()
    parser = OutputParser(tools={"a": {}, "b": {}}, parse_tools=True, parse_reasoning=False,
                          id_factory=lambda: f"call_{next(ids)}")
    step = parser.feed("Sure.\n<tool_call>\n<function=a>\n<parameter=x>\n1\n</parameter>\n</function>\n"
                       "</tool_call>\n<tool_call>\n<function=b>\n</function>\n</tool_call>\n<tool_call>\n"
                       "<function=a>\n<parameter=y>\n2")
    step.extend(parser.finish())
    bodies = _delta_bodies(step, show_reasoning=False)
    assert bodies[0]["content"] == "Sure." and all("content" not in b for b in bodies[1:])
    assert all(b["reasoning_content"] is None and b["reasoning"] is None for b in bodies)
    calls = [c for b in bodies for c in b["tool_calls"]]
    assert [(c["index"], c.get("id"), c.get("type"), c["function"].get("name")) for c in calls if "id" in c] == [
        (0, "call_0", "function", "a"), (1, "call_1", "function", "b"), (2, "call_2", "function", "a")]
    assert all(c["function"]["arguments"] == "" for c in calls if "id" in c)
    assert all(set(c) == {"index", "function"} and set(c["function"]) == {"arguments"} for c in calls if "id" not in c)
    args = {i: "".join(c["function"]["arguments"] for c in calls if c["index"] == i) for i in range(3)}
    assert args == {0: '{"x": "1"}', 1: "{}", 2: '{"y": "2"}'}
    for body in bodies:  # a call's arguments never share a chunk with its own header
        headers = {c["index"] for c in body["tool_calls"] if "id" in c}
        assert not any(c["index"] in headers for c in body["tool_calls"] if "id" not in c)
