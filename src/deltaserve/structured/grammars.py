"""StructuredSpec -> the grammar text llguidance compiles (its Lark dialect, with `%json { schema }` inlined).

JSON is written as `json.dumps` writes it: one line, ", " and ": " as separators, no other whitespace. Free
whitespace lets a model loop on newlines until max_tokens (a known failure of flexible JSON grammars).

Markup such as `</think>` or `<tool_call>` is a special token in some tokenizers (the demo's) and plain text in
others (Qwen3.5's own). A grammar must say which: a special token is written `<name>` and matches only that token,
text is written as a string literal and matches its bytes. `Markup` decides from the tokenizer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from deltaserve.structured.spec import StructuredError, StructuredKind, StructuredSpec

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
REASONING_END = "</think>"
# after </think> Qwen templates and models write a blank line before the answer; bounded so it cannot loop
_AFTER_REASONING = r'/[ \n]{0,4}/'


@dataclass(frozen=True)
class Markup:
    """The tokenizer's special tokens: how a grammar must write each piece of markup."""

    special_tokens: frozenset[str]

    def __call__(self, text: str) -> str:
        return f"<{text[1:-1]}>" if self.by_name(text) else lark_string(text)

    def sequence(self, text: str) -> str:
        """Text that may hold special tokens among plain text: each special token by name, the rest as strings
        ("" for no text)."""
        if not text:
            return ""
        names = sorted((t for t in self.special_tokens if _is_tag(t) and t in text), key=len, reverse=True)
        if not names:
            return lark_string(text)
        pieces = re.split("(" + "|".join(map(re.escape, names)) + ")", text)
        return " ".join(self(p) for p in pieces if p)

    def leading_special(self, text: str) -> str | None:
        """The special token (written by name) that text starts with, the longest if several do."""
        return max((t for t in self.special_tokens if _is_tag(t) and text.startswith(t)), key=len, default=None)

    def holds_special(self, text: str) -> bool:
        return any(_is_tag(t) and t in text for t in self.special_tokens)

    def by_name(self, text: str) -> bool:
        """Whether a grammar writes this text as a special token's name (matching that one token only)."""
        return text in self.special_tokens and _is_tag(text)

    def is_special(self, text: str) -> bool:
        return text in self.special_tokens


def _is_tag(text: str) -> bool:
    return text.startswith("<") and text.endswith(">") and len(text) > 2


def lark_string(text: str) -> str:
    """A Lark string literal (JSON escapes are valid in llguidance's string syntax)."""
    return json.dumps(text, ensure_ascii=False)


def inline_json(schema: Any) -> str:
    """`%json { ... }` with this module's JSON options (a schema's own x-guidance keys win)."""
    if schema is True:
        schema = {}
    if schema is False:
        raise StructuredError("the JSON schema is `false`, which no value satisfies; send a schema a value can meet")
    if not isinstance(schema, dict):
        raise StructuredError(f"a JSON schema must be an object (or true/false), got {json.dumps(schema)[:80]}")
    own = schema.get("x-guidance") or {}
    if not isinstance(own, dict):
        raise StructuredError(f"the schema's 'x-guidance' must be an object of llguidance's JSON options, got "
                              f"{json.dumps(own)[:80]}")
    options = {**JSON_OPTIONS, **own}
    return "%json " + json.dumps({**schema, "x-guidance": options}, ensure_ascii=False)


def regex_terminal(pattern: str, use_ascii: str = "") -> str:
    """A regex as a Lark terminal body (`/.../`, slashes escaped). use_ascii "dw": JSON Schema's ASCII \\d and \\w."""
    import llguidance

    return "/" + llguidance.regex_to_lark(pattern, use_ascii) + "/"


def reasoning_prefix(markup: Markup) -> str:
    """Rules that consume an open reasoning block up to and including `</think>` and the blank line after it."""
    if markup.is_special(REASONING_END):
        # the reasoning parser reads text: `</think>` spelt with plain tokens would end the block there
        return (f"reasoning: REASONING_TEXT {markup(REASONING_END)} {_AFTER_REASONING}\n"
                "REASONING_TEXT: /(?s:.*)/ & ~/(?s:.*)<\\/think>(?s:.*)/\n")
    # text markup: lazy, so the block ends at the first </think>
    return f"reasoning: reasoning_text {_AFTER_REASONING}\nreasoning_text[lazy]: /(?s:.*)<\\/think>/\n"


def with_prefix(body_rules: str, reasoning: bool, markup: Markup) -> str:
    """A Lark grammar whose start is `body` (defined in body_rules), after the reasoning block if there is one."""
    if not reasoning:
        return f"start: body\n{body_rules}"
    return f"start: reasoning body\n{reasoning_prefix(markup)}{body_rules}"


def build_grammar(spec: StructuredSpec, markup: Markup) -> str:
    """The llguidance grammar text of a spec. StructuredError for a spec that is malformed before compiling."""
    return _BUILDERS[spec.kind](spec, markup)


def _json(spec: StructuredSpec, markup: Markup) -> str:
    return with_prefix(f"body: {inline_json(json.loads(spec.spec))}\n", spec.reasoning, markup)


def _json_object(spec: StructuredSpec, markup: Markup) -> str:
    return with_prefix(f"body: {inline_json({'type': 'object'})}\n", spec.reasoning, markup)


def _regex(spec: StructuredSpec, markup: Markup) -> str:
    return with_prefix(f"body: {regex_terminal(spec.spec)}\n", spec.reasoning, markup)


def _choice(spec: StructuredSpec, markup: Markup) -> str:
    choices = json.loads(spec.spec)
    return with_prefix("body: " + " | ".join(lark_string(c) for c in choices) + "\n", spec.reasoning, markup)


# Lark text: a start rule, possibly with Lark's `?` (inline) or `!` (keep tokens) modifier, or llguidance's
# directive. llguidance's own test misses the modifiers and would read `?start:` grammars as GBNF. `start ::=` is
# a GBNF rule, not Lark's.
_LARK = re.compile(r"(?m)^\s*(%llguidance\b|[?!]?start\s*:(?!:=))")


def _grammar(spec: StructuredSpec, markup: Markup) -> str:
    from llguidance.gbnf_to_lark import GbnfToLarkError, gbnf_to_lark

    try:
        # GBNF (llama.cpp, vLLM's EBNF examples) becomes Lark; Lark stays
        lark = spec.spec if _LARK.search(spec.spec) else gbnf_to_lark(spec.spec)
    except (GbnfToLarkError, ValueError) as e:
        raise StructuredError(f"the grammar is not Lark (it has no `start:` rule) and could not be read as GBNF "
                              f"(`root ::= ...`): {e}") from None
    except Exception as e:  # noqa: BLE001 - the converter raises a bare Exception for a missing or duplicate rule
        hint = " (the conversion names `root` `start`: rename the rule 'start')" if "'start'" in str(e) else ""
        raise StructuredError(f"the GBNF grammar cannot be converted: {e}{hint}") from None
    if not spec.reasoning:
        return lark
    # The client's grammar keeps its own rule names: it becomes a subgrammar behind the reasoning block.
    top = f"start: reasoning @body\n{reasoning_prefix(markup)}"
    return json.dumps({"grammars": [{"lark_grammar": top}, {"name": "body", "lark_grammar": lark}]})


def _tool_calls(spec: StructuredSpec, markup: Markup) -> str:
    from deltaserve.structured.tool_grammar import tool_call_grammar

    body = json.loads(spec.spec)
    return tool_call_grammar(body["tools"], body["choice"], parallel=body["parallel"], reasoning=spec.reasoning,
                             markup=markup)


def _structural_tag(spec: StructuredSpec, markup: Markup) -> str:
    """Free text, then any number of structures each followed by free text. Free text never holds a trigger's
    text, so writing one enters a structure: the first trigger to complete ends the free text, and a structure
    belongs to the shortest trigger its begin starts with. A trigger that starts with a special token is matched
    by that token's name (free text cannot hold a special token either); one with a special token further in is
    refused."""
    body = json.loads(spec.spec)
    triggers = body["triggers"]
    alternatives = "|".join(_RUST_META.sub(r"\\\g<0>", t) for t in triggers)
    rules = [f"TEXT: /(?s:.*)/ & ~{regex_terminal(f'(?s:.*)({alternatives})(?s:.*)')}"]
    for i, s in enumerate(body["structures"]):
        trigger = min((t for t in triggers if s["begin"].startswith(t)), key=len)
        lead = markup.leading_special(trigger)
        if markup.holds_special(trigger[len(lead or ""):]):
            raise StructuredError(f"the trigger {trigger!r} holds a special token after its start; a special token "
                                  "can only start a trigger (or be one): split the trigger there")
        rest = " ".join(filter(None, [markup.sequence(s["begin"][len(lead or trigger):]), inline_json(s["schema"]),
                                      markup.sequence(s["end"])]))
        if lead:
            rules.append(f"tag_{i}: TEXT {markup(lead)} {rest}")
        else:  # one lexeme: the free text and the trigger after it
            rules += [f"tag_{i}_trigger[lazy]: TEXT {lark_string(trigger)}", f"tag_{i}: tag_{i}_trigger {rest}"]
    tags = " | ".join(f"tag_{i}" for i in range(len(body["structures"])))
    return with_prefix(f"body: ({tags})* TEXT\n" + "\n".join(rules) + "\n", spec.reasoning, markup)


_RUST_META = re.compile(r"[\\.+*?()|\[\]{}^$#&\-~]")  # what the regex crate reads as syntax (re.escape differs)


_BUILDERS: dict[StructuredKind, Callable[[StructuredSpec, Markup], str]] = {
    StructuredKind.JSON: _json, StructuredKind.JSON_OBJECT: _json_object, StructuredKind.REGEX: _regex,
    StructuredKind.CHOICE: _choice, StructuredKind.GRAMMAR: _grammar, StructuredKind.TOOL_CALLS: _tool_calls,
    StructuredKind.STRUCTURAL_TAG: _structural_tag,
}
