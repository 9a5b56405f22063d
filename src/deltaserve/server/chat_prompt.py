"""Messages -> prompt token ids: which chat template may run, rendering it within bounds, tokenizing within the
context window.

A chat template is code. The model's own template is the operator's; one in a request (vLLM's `chat_template`, or
transformers' `chat_template` keyword smuggled through `chat_template_kwargs`) is the client's, and runs only when
the operator allows it (--trust-request-chat-template). Either way it renders out of process, bounded in time, memory
and output size (templates.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from deltaserve.server.chat_inputs import template_messages
from deltaserve.server.errors import APIError, bad_request, server_error
from deltaserve.server.output_parser import prompt_opens_reasoning
from deltaserve.server.protocol import ChatMessage
from deltaserve.server.templates import TemplateRenderError
from deltaserve.server.tokens import encode_prompt

if TYPE_CHECKING:
    from deltaserve.server.state import ServerState

log = logging.getLogger("deltaserve.server")

MAX_REQUEST_TEMPLATE_CHARS = 64 * 1024  # Qwen3.5's template is ~8 KB; the largest public ones ~30 KB
# The renderer's own arguments and what render_jinja_template passes itself: from chat_template_kwargs they would
# clash (a TypeError, not a clear 400) or change what the call means.
_RESERVED_KWARGS = frozenset({"tools", "add_generation_prompt", "tokenize", "conversation", "conversations",
                              "messages", "documents", "return_dict", "continue_final_message",
                              "return_assistant_tokens_mask", "tokenizer_kwargs"})


@dataclass(frozen=True)
class ChatRequestParts:
    """What a chat-shaped request (chat completions, /v1/tokenize with messages) asks to render."""

    messages: list[ChatMessage]
    tools: list[dict[str, Any]] | None
    add_generation_prompt: bool
    chat_template: str | None
    chat_template_kwargs: dict[str, Any] | None
    documents: list[dict[str, Any]] | None = None  # the template's `documents` (render_jinja_template's argument)
    continue_final_message: bool = False  # the prompt ends inside the last message, for the model to continue


@dataclass(frozen=True)
class ChatPrompt:
    ids: list[int]
    opens_reasoning: bool  # the template left a <think> block open for the model
    # where stable prefixes end (the system prompt; the history before the generation prompt): the prefix cache
    # keeps GDN states there, where the next turn or another conversation with this system prompt resumes
    cache_points: tuple[int, ...] = ()


async def render_prompt(state: ServerState, parts: ChatRequestParts, *, prompt_field: str = "messages",
                        keep: int | None = None) -> ChatPrompt:
    """keep: only the rendered prompt's last `keep` tokens (truncate_prompt_tokens; its stable prefixes are then
    gone, so no cache points)."""
    tokenizer = state.tokenizer
    if tokenizer is None:
        raise bad_request("chat needs a tokenizer, but the model directory has no tokenizer.json; use completions "
                          "with token ids", prompt_field)
    kwargs = dict(parts.chat_template_kwargs or {})
    template = _template(state, parts, kwargs.pop("chat_template", None))
    reserved = sorted(set(kwargs) & _RESERVED_KWARGS)
    if reserved:
        raise bad_request(f"'chat_template_kwargs' may not set {reserved}: use the request's own fields",
                          "chat_template_kwargs")
    if parts.documents is not None:
        kwargs["documents"] = parts.documents
    if parts.continue_final_message and parts.add_generation_prompt:
        raise bad_request("'continue_final_message' continues the last message, 'add_generation_prompt' opens a new "
                          "one: send add_generation_prompt: false with it (as vLLM asks)", "continue_final_message")
    messages = template_messages(parts.messages)
    try:
        text = await state.templates.render_async(
            template, messages, tools=parts.tools,
            add_generation_prompt=parts.add_generation_prompt, kwargs={**state.special_tokens, **kwargs})
    except TemplateRenderError as e:
        raise _render_error(e, prompt_field) from None
    if parts.continue_final_message:
        text = _open_final_message(text, messages[-1]["content"])
    ids = await asyncio.to_thread(encode_prompt, tokenizer, text, state.limits.max_model_len - 1, keep,
                                  add_special_tokens=False, field=prompt_field)
    if not ids:  # else the length check would call the (non-empty) messages empty
        raise bad_request("the chat template rendered these messages to an empty prompt; check the template and the "
                          "messages' roles", prompt_field)
    cut = keep is not None and len(ids) == keep
    points = await _cache_points(state, parts, template, kwargs, ids) if parts.add_generation_prompt and not cut else ()
    return ChatPrompt(ids, prompt_opens_reasoning(text), points)


def _open_final_message(text: str, final: str) -> str:
    """The rendered chat cut just after the last message's content (what follows it, its end-of-turn token, is
    dropped), as transformers' continue_final_message cuts it: the template may have trimmed the content's spaces.
    Not delegated to render_jinja_template(continue_final_message=True): its failure (the content not found) is a
    ValueError told from the renderer's own failures only by its text, where here it is a 400 naming the field."""
    core = final.strip()
    at = text.rfind(core) if core else -1
    if at < 0:
        raise bad_request("'continue_final_message': the chat template does not render the last message's content "
                          "as it was sent (it is empty, or the template rewrites it), so there is no end to continue "
                          "from", "continue_final_message")
    kept = final.lstrip()
    return text[:at + len(kept)] if text[at:at + len(kept)] == kept else text[:at + len(core)]


async def _cache_points(state: ServerState, parts: ChatRequestParts, template: str, kwargs: dict[str, Any],
                        ids: list[int]) -> tuple[int, ...]:
    """Token counts of the stable prefixes of the prompt: the messages rendered without the generation prompt, and
    what every conversation that opens with this system message shares. A prefix counts only if its tokens are
    exactly the prompt's first tokens (a BPE merge across the boundary would make it useless for matching)."""
    prefixes = [await _render_ids(state, parts, template, kwargs, parts.messages)]
    if len(parts.messages) > 1 and parts.messages[0].role in ("system", "developer"):
        prefixes.append(await _system_prefix(state, parts, template, kwargs))
    points = {len(p) for p in prefixes if p and len(p) < len(ids) and ids[:len(p)] == p}
    return tuple(sorted(points))


# Two user turns that differ from their first token: what the system message renders to before either is shared by
# every conversation that opens with it.
_PROBES = ("a", "b")
_SYSTEM_PREFIX_CACHE = 64  # system prefixes a server keeps (least recently used dropped)


async def _system_prefix(state: ServerState, parts: ChatRequestParts, template: str,
                         kwargs: dict[str, Any]) -> list[int] | None:
    """The tokens every conversation opening with this system message (and these tools) starts with: the common
    prefix of two renders with different user turns after it. A system message alone will not do: Qwen3.5's own
    template refuses to render messages without a user query."""
    key = json.dumps([template, parts.messages[0].model_dump(), parts.tools, kwargs], sort_keys=True, default=str)
    if key in state.system_prefixes:
        state.system_prefixes.move_to_end(key)
        return state.system_prefixes[key]
    renders = [await _render_ids(state, parts, template, kwargs, [parts.messages[0], ChatMessage(role="user",
                                                                                               content=probe)])
               for probe in _PROBES]
    prefix = None
    if None not in renders:
        a, b = renders
        prefix = a[:next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))]
    state.system_prefixes[key] = prefix
    if len(state.system_prefixes) > _SYSTEM_PREFIX_CACHE:
        state.system_prefixes.popitem(last=False)
    return prefix


async def _render_ids(state: ServerState, parts: ChatRequestParts, template: str, kwargs: dict[str, Any],
                      messages: list[ChatMessage]) -> list[int] | None:
    """`messages` rendered without the generation prompt and tokenized; None where the template cannot render them."""
    try:
        text = await state.templates.render_async(template, template_messages(messages), tools=parts.tools,
                                                  add_generation_prompt=False,
                                                  kwargs={**state.special_tokens, **kwargs})
    except TemplateRenderError:
        return None  # a template that cannot render this prefix: no cache point there
    return await asyncio.to_thread(state.tokenizer.encode, text, add_special_tokens=False)


def _template(state: ServerState, parts: ChatRequestParts, from_kwargs: Any) -> str:
    given = [(name, value) for name, value in (("chat_template", parts.chat_template),
                                               ("chat_template_kwargs.chat_template", from_kwargs))
             if value is not None]
    if given:
        name, value = given[0]
        if not state.config.trust_request_chat_template:
            raise APIError(400, f"'{name}': this server does not run chat templates sent by clients (its operator "
                           "can allow them with --trust-request-chat-template); leave it out to use the model's",
                           param=name, code="chat_template_not_allowed")
        if not isinstance(value, str) or len(value) > MAX_REQUEST_TEMPLATE_CHARS:
            raise bad_request(f"'{name}' must be a template string of at most {MAX_REQUEST_TEMPLATE_CHARS} "
                              "characters", name)
        return value
    try:
        template = state.tokenizer.get_chat_template(None, parts.tools)
    except ValueError:
        template = None
    if not template:
        raise bad_request("the model has no chat template; use completions (plain prompts)", "messages")
    return template


def _render_error(e: TemplateRenderError, field: str) -> APIError:
    if e.kind == "template":  # the template's own words (e.g. "roles must alternate"): meant for the client
        return bad_request(f"the chat template could not render these messages: {e.message}", field)
    if e.kind == "internal":  # the renderer's own failure (a worker that died or would not start): not the client's
        return server_error("the chat template renderer failed", e.message, code="chat_template_error")
    return bad_request(f"the chat template exceeded its bounds: {e.message}", field, code="chat_template_bounds")
