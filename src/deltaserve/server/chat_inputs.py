"""Chat request fields -> what the chat template sees: messages and tools in the shape Qwen chat templates expect,
tool_choice, and the checks on message shapes (chat_prompt.py renders them)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from deltaserve.server.errors import bad_request
from deltaserve.server.protocol import (ChatCompletionRequest, ChatMessage, ContentPart, NamedToolChoice,
                                        TokenizeRequest, Tool)
from deltaserve.server.tool_parser import ToolSchemas


@dataclass(frozen=True)
class ToolsPlan:
    """Which tools the template lists, the schemas that type parsed arguments, whether to parse at all, and how
    many calls a reply may make (1 with parallel_tool_calls=false: later ones are dropped, as vLLM does)."""

    for_template: list[dict[str, Any]] | None
    schemas: ToolSchemas | None
    parse: bool
    max_calls: int | None = None


def resolve_tools(req: ChatCompletionRequest | TokenizeRequest, *, parse: bool,
                  exclude_tools_when_none: bool = False) -> ToolsPlan:
    """tool_choice: "none" parses nothing (a call the model writes stays content) but, as in vLLM, still lists the
    tools, so that the prompt, and its cached prefix, is the one the other choices render; the server option
    --exclude-tools-when-tool-choice-none (exclude_tools_when_none) leaves them out. The other choices list them all,
    a named function too, as vLLM does (server/structured.py enforces "required", a named function and strict
    tools)."""
    tools = req.tools or []
    choice = req.tool_choice
    _check_unique_names(tools)
    if not tools:
        if choice not in (None, "none"):
            raise bad_request("'tool_choice' needs 'tools'; list the tools the model may call", "tool_choice")
        return ToolsPlan(None, None, False)
    if choice == "none":
        return ToolsPlan(None if exclude_tools_when_none else [_tool_dict(t) for t in tools], None, False)
    if not parse and (choice == "required" or isinstance(choice, NamedToolChoice)):
        # the call would be forced, then reach the client as raw markup in `content`
        raise bad_request("a forced tool call (tool_choice 'required' or a named function) needs the tool-call parser, "
                          "and this server runs with --tool-call-parser none; send tool_choice 'auto' or 'none', or "
                          "restart the server with --tool-call-parser qwen3_coder", "tool_choice")
    if isinstance(choice, NamedToolChoice) and not any(t.function.name == choice.function.name for t in tools):
        raise bad_request(f"'tool_choice' names function {choice.function.name!r}, which is not in 'tools'",
                          "tool_choice.function.name")
    schemas = {t.function.name: t.function.parameters or {} for t in tools}
    one_call = getattr(req, "parallel_tool_calls", None) is False  # (a tokenize request has no such field)
    return ToolsPlan([_tool_dict(t) for t in tools], schemas, parse, 1 if one_call else None)


def _check_unique_names(tools: list[Tool]) -> None:
    """A call names its tool: with two tools of one name its arguments were read (and, when forced, constrained) by
    either schema. OpenAI's and other providers' APIs refuse such requests too."""
    first: dict[str, int] = {}
    for j, tool in enumerate(tools):
        i = first.setdefault(tool.function.name, j)
        if i != j:
            param = f"tools.{j}.function.name"
            raise bad_request(f"'{param}': {tool.function.name!r} is also the name of tools.{i}; tool names must be "
                              "unique (the model calls a tool by its name): rename one or send it once", param)


def _tool_dict(tool: Tool) -> dict[str, Any]:
    fn = tool.function.model_dump(exclude_none=True)
    return {"type": "function", "function": fn}


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The messages as the template sees them. Checked here, where every chat-shaped route (chat completions,
    /v1/tokenize) passes, so that tokenize counts only prompts that chat would run."""
    if not messages:
        raise bad_request("'messages' is empty; a chat request needs at least one message", "messages")
    return [_message_dict(m, i) for i, m in enumerate(messages)]


def reply_role(messages: list[ChatMessage], add_generation_prompt: bool) -> str:
    """The role the reply's message carries (vLLM's rule): the assistant's when the prompt opens a new assistant
    turn; with add_generation_prompt false the output continues the last message, so it has that message's role."""
    return "assistant" if add_generation_prompt else messages[-1].role


def echoed_text(messages: list[ChatMessage], add_generation_prompt: bool) -> str:
    """Chat's echo (vLLM's): the last message's text when it has the reply's role (`reply_role`), else ""."""
    last = messages[-1]
    return _text(last, len(messages) - 1) if last.role == reply_role(messages, add_generation_prompt) else ""


def _message_dict(m: ChatMessage, i: int) -> dict[str, Any]:
    if m.function_call is not None:
        param = f"messages.{i}.function_call"
        raise bad_request(f"'{param}' (legacy function calling) is not supported; send 'tool_calls' instead", param)
    # Qwen templates know system/user/assistant/tool; OpenAI's "developer" is their system role.
    out: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": _text(m, i)}
    if m.name is not None:
        out["name"] = m.name
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    reasoning = _reasoning(m, i)
    if reasoning is not None:
        out["reasoning_content"] = reasoning  # the name Qwen templates read
    if m.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function",
                              "function": {"name": c.function.name,
                                           "arguments": _arguments(c.function.arguments, i, j)}}
                             for j, c in enumerate(m.tool_calls)]
    return out


def _reasoning(m: ChatMessage, i: int) -> str | None:
    """A reply's reasoning sent back in the history, under either name (the server answers with both)."""
    if m.reasoning is not None and m.reasoning_content is not None and m.reasoning != m.reasoning_content:
        param = f"messages.{i}.reasoning"
        raise bad_request(f"'messages.{i}.reasoning_content' and '{param}' differ; they are two names for the same "
                          "text: send one of them", param)
    return m.reasoning_content if m.reasoning_content is not None else m.reasoning


def _text(m: ChatMessage, i: int) -> str:
    if m.content is None:
        return ""
    if isinstance(m.content, str):
        return m.content
    parts = []
    for j, part in enumerate(m.content):
        if part.type == "refusal" and m.role == "assistant":  # an earlier reply that declined: its words
            part = _refusal_text(part, i, j)
        if part.type != "text":
            param = f"messages.{i}.content.{j}.type"
            raise bad_request(f"'{param}': content part type {part.type!r} is not supported (this server serves text "
                              "models); send {\"type\": \"text\", \"text\": ...} parts", param)
        if part.text is None:
            param = f"messages.{i}.content.{j}.text"
            raise bad_request(f"'{param}' is missing: a content part of type 'text' needs its 'text' string", param,
                              code="missing_required_parameter")
        parts.append(part.text)
    # vLLM joins a message's text parts with newlines before a template that takes string content (as Qwen3.5's
    # does: it iterates content only inside its render_content macro, which vLLM's detection does not count)
    return "\n".join(parts)


def _refusal_text(part: ContentPart, i: int, j: int) -> ContentPart:
    if part.refusal is None:
        param = f"messages.{i}.content.{j}.refusal"
        raise bad_request(f"'{param}' is missing: a content part of type 'refusal' needs its 'refusal' string", param,
                          code="missing_required_parameter")
    return ContentPart(type="text", text=part.refusal)


def _arguments(arguments: str | dict[str, Any], i: int, j: int) -> dict[str, Any]:
    """OpenAI sends arguments as a JSON string; Qwen templates iterate them as a mapping."""
    if isinstance(arguments, dict):
        return arguments
    param = f"messages.{i}.tool_calls.{j}.function.arguments"
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError as e:
        raise bad_request(f"'{param}' is not valid JSON ({e.msg}); send a JSON object as a string", param) from None
    if not isinstance(value, dict):
        raise bad_request(f"'{param}' must be a JSON object", param)
    return value


def reject_legacy_functions(req: ChatCompletionRequest) -> None:
    """The pre-tools function-calling fields: answering them as tool_calls would break a client that reads
    message.function_call, so they get a 400 that points to the current fields (a message's function_call: in
    template_messages)."""
    for name, new in (("functions", "tools"), ("function_call", "tool_choice")):
        if getattr(req, name) is not None:
            raise bad_request(f"'{name}' (legacy function calling) is not supported; send '{new}' instead", name)
