"""Splits a chat model's streamed text into reasoning, content and tool calls (Qwen3.5 markup).

Qwen3.5 thinks inside <think>...</think>. Its chat template usually opens <think> in the prompt itself
(enable_thinking, the default), so the output starts inside the reasoning and only the closing tag appears; with
enable_thinking=false the template writes an empty, closed block. Which case applies is read off the prompt's tail
(`prompt_opens_reasoning`). Tool calls follow as <tool_call> blocks (tool_parser.py).

The chat path asks the engine for text with special tokens kept, since <think> and <tool_call> are special tokens in
some tokenizers (added, non-special ones in Qwen's own): this parser then drops the special tokens that are not
markup (<|im_end|>, <|endoftext|>, ...).

One parser per choice. feed() returns what may be shown now, holding back text that could still turn into a tag;
finish() releases the rest. Results do not depend on how the text was split, so the streamed pieces concatenate
to the non-streamed message. Whitespace that only separates markup (the newlines around </think> and <tool_call>)
is dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum

from deltaserve.server.tool_parser import (TOOL_CALL_START, ToolCallDelta, ToolCallParser, ToolSchemas, ToolStep,
                                           new_call_id)

THINK_START = "<think>"
THINK_END = "</think>"
MARKUP = frozenset({THINK_START, THINK_END, TOOL_CALL_START, "</tool_call>"})


@dataclass
class ParsedDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)

    def extend(self, other: ParsedDelta) -> None:
        self.reasoning += other.reasoning
        self.content += other.content
        for call in other.tool_calls:
            last = self.tool_calls[-1] if self.tool_calls else None
            if last is not None and last.index == call.index and call.id is None:
                last.arguments += call.arguments
            else:
                self.tool_calls.append(ToolCallDelta(call.index, call.id, call.name, call.arguments))


class _Mode(Enum):
    REASONING = "reasoning"
    CONTENT = "content"
    TOOL = "tool"


def strip_tokens(tokenizer) -> tuple[str, ...]:
    """Special tokens to drop from chat text: all of the tokenizer's special tokens except the markup."""
    specials: Iterable[str] = getattr(tokenizer, "all_special_tokens", None) or ()
    return tuple(sorted({t for t in specials if t and t not in MARKUP}, key=len, reverse=True))


def prompt_opens_reasoning(prompt_tail: str) -> bool:
    """Whether the rendered prompt leaves a <think> block open for the model (the text after the last turn start)."""
    turn = prompt_tail.rsplit("<|im_start|>", 1)[-1]
    return turn.rfind(THINK_START) > turn.rfind(THINK_END)


class OutputParser:
    """Owns the text state of one chat choice: mode, held-back text and the tool-call parser."""

    def __init__(self, *, parse_reasoning: bool = True, starts_in_reasoning: bool = False,
                 tools: ToolSchemas | None = None, parse_tools: bool = False, strip: Iterable[str] = (),
                 id_factory: Callable[[], str] = new_call_id, max_tool_calls: int | None = None,
                 constrained: bool = False) -> None:
        self.parse_reasoning = parse_reasoning
        # a grammar wrote the output: after the reasoning block its text is the constraint's (JSON, tool calls),
        # where `<think>` / `</think>` can only be text (the grammar admits no special token there)
        self.constrained = constrained
        self.max_tool_calls = max_tool_calls  # parallel_tool_calls=false: 1; calls past it are dropped
        self.tools = ToolCallParser(tools, id_factory) if parse_tools else None
        self.strip = tuple(strip)
        self.mode = _Mode.REASONING if parse_reasoning and starts_in_reasoning else _Mode.CONTENT
        self._buf = ""
        self._pending_ws = ""  # trailing whitespace of the current segment, shown only if more text follows it
        self._dropped_ws = ""  # whitespace dropped before the last markup (restored if it was not markup)
        self._lstrip = self.mode is _Mode.REASONING  # drop whitespace right after markup
        self._finished = False

    @property
    def in_reasoning(self) -> bool:
        """Inside a reasoning block: text fed now is reasoning (its tokens count as reasoning_tokens)."""
        return self.mode is _Mode.REASONING

    @property
    def num_tool_calls(self) -> int:
        return 0 if self.tools is None else self.tools.count

    def feed(self, text: str) -> ParsedDelta:
        out = ParsedDelta()
        self._buf += text
        self._run(out, final=False)
        return out

    def finish(self) -> ParsedDelta:
        out = ParsedDelta()
        if self._finished:
            return out
        self._finished = True
        self._run(out, final=True)
        while self.mode is _Mode.TOOL:  # each pass consumes a <tool_call>, so this ends
            if not self._after_tool_step(out, self.tools.finish()):  # type: ignore[union-attr]
                self.mode = _Mode.CONTENT  # the open call was closed; nothing is left
                break
            self._run(out, final=True)
        self._put(out, self._pending_ws)
        self._pending_ws = ""
        return out

    # ---- scanning --------------------------------------------------------------------------------------------
    def _markers(self) -> tuple[str, ...]:
        markers = list(self.strip)
        if self.parse_reasoning and (not self.constrained or self.mode is _Mode.REASONING):
            markers += [THINK_START, THINK_END]
        if self.tools is not None and self.mode is _Mode.CONTENT:
            markers.append(TOOL_CALL_START)
        return tuple(markers)

    def _run(self, out: ParsedDelta, final: bool) -> None:
        while True:
            if self.mode is _Mode.TOOL:
                text, self._buf = self._buf, ""
                if not self._after_tool_step(out, self.tools.feed(text)):  # type: ignore[union-attr]
                    return
                continue
            markers = self._markers()
            hit = _first(self._buf, markers)
            if hit is None:
                hold = 0 if final else _partial_len(self._buf, markers)
                self._text(out, self._buf[:len(self._buf) - hold], boundary=False)
                self._buf = self._buf[len(self._buf) - hold:]
                return
            start, marker = hit
            switches = marker in (THINK_START, THINK_END, TOOL_CALL_START)
            self._text(out, self._buf[:start], boundary=switches)
            self._buf = self._buf[start + len(marker):]
            if switches:
                self._on_markup(marker)

    def _on_markup(self, marker: str) -> None:
        if marker == THINK_START:
            self.mode = _Mode.REASONING
        elif marker == THINK_END:
            self.mode = _Mode.CONTENT
        else:
            self.mode = _Mode.TOOL
            self.tools.start_block()  # type: ignore[union-attr]
        self._pending_ws, self._lstrip = "", True

    def _after_tool_step(self, out: ParsedDelta, step: ToolStep) -> bool:
        """Apply a tool-parser step; True when the block ended and scanning goes on in content mode."""
        for call in step.deltas:
            if self.max_tool_calls is None or call.index < self.max_tool_calls:
                out.extend(ParsedDelta(tool_calls=[call]))
        if step.malformed is not None:
            self.mode, self._lstrip = _Mode.CONTENT, False
            self._put(out, self._dropped_ws + TOOL_CALL_START)  # it was not markup after all: restore it
            self._buf = step.malformed + self._buf
            return True
        if step.rest is not None:
            self.mode, self._lstrip = _Mode.CONTENT, True
            self._buf = step.rest + self._buf
            return True
        return False

    def _text(self, out: ParsedDelta, text: str, *, boundary: bool) -> None:
        """Show text in the current mode; whitespace touching markup is dropped, other trailing whitespace waits
        until it is known whether markup follows."""
        if self._lstrip:
            text = text.lstrip()
            self._lstrip = not text
        body = text.rstrip()
        if body:
            self._put(out, self._pending_ws + body)
            self._pending_ws = ""
        ws = self._pending_ws + text[len(body):]
        self._pending_ws, self._dropped_ws = ("", ws) if boundary else (ws, "")

    def _put(self, out: ParsedDelta, text: str) -> None:
        if not text:
            return
        if self.mode is _Mode.REASONING:
            out.reasoning += text
        else:
            out.content += text


def _first(text: str, markers: tuple[str, ...]) -> tuple[int, str] | None:
    best: tuple[int, str] | None = None
    for m in markers:
        i = text.find(m)
        if i >= 0 and (best is None or i < best[0] or (i == best[0] and len(m) > len(best[1]))):
            best = (i, m)
    return best


def _partial_len(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest suffix of text that is a proper prefix of a marker (it may still become one)."""
    if not markers or not text:
        return 0
    starts = {m[0] for m in markers}
    for i in range(max(0, len(text) - max(len(m) for m in markers) + 1), len(text)):
        if text[i] in starts:  # most text has no marker's first character ("<") near its end: nothing to hold
            tail = text[i:]
            if any(len(m) > len(tail) and m.startswith(tail) for m in markers):
                return len(tail)
    return 0
