"""OpenAI tools + tool_choice -> a Lark grammar of Qwen3-Coder XML tool calls, the form the chat templates write
and server/tool_parser.py reads back:

    <tool_call>
    <function=NAME>
    <parameter=KEY>
    VALUE
    </parameter>
    </function>
    </tool_call>

Parameters come in the schema's property order (required ones present). A value whose schema the parser keeps as
text (strings, and untyped values: tool_parser.is_string_schema) is raw text, constrained by the string keywords
below; every other value is JSON (`%json`), which the parser converts back. Raw text may not contain
`</parameter>`, `</function>` or `</tool_call>` (the parser keeps such text in a value where no tag of the format
follows it, but the simple rule keeps each text lexeme ending at its delimiter, as below).

llguidance's lexemes are greedy (a lexeme ends only where it cannot go on), so free text cannot be a lexeme
followed by its delimiter: text that may hold "\n</par" would swallow the delimiter's start. Each text lexeme
therefore ends with its delimiter (`VALUE "\n</parameter>\n"`, `TEXT "<tool_call>"`), which it cannot contain
anywhere else, so it ends exactly there.

"required" and a named function: only tool calls (after the reasoning block, if open); one call for a named
function or parallel_tool_calls=false, else one or more. "auto": free text in which any call follows the grammar
(strict tools' arguments their schema, other tools' arguments free), at most one call with parallel_tool_calls=false.
"""

from __future__ import annotations

from typing import Any

from deltaserve.server.tool_parser import NAME, is_string_schema, parameter_schema, schema_types
from deltaserve.structured.grammars import Markup, inline_json, lark_string, regex_terminal, with_prefix
from deltaserve.structured.spec import StructuredError

_NO_END_TAG = r"~/(?s:.*)<\/(parameter|function|tool_call)>(?s:.*)/"
_FREE_TEXT = f"/(?s:.*)/ & {_NO_END_TAG}"
_VALUE_END = r'"\n</parameter>\n"'
_STRING_KEYWORDS = frozenset({"type", "description", "title", "default", "examples", "enum", "const", "pattern",
                              "minLength", "maxLength", "format", "nullable", "anyOf", "oneOf"})
# the formats a raw string value can be held to (JSON Schema's definitions, ASCII digits)
_FORMATS = {
    "date": r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])",
    "time": r"([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])",
    "date-time": r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])[Tt]([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]"
                 r"|60)(\.[0-9]+)?([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])",
    "uuid": r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
}


def tool_call_grammar(tools: list[dict[str, Any]], choice: str | dict[str, Any], *, parallel: bool,
                      reasoning: bool, markup: Markup) -> str:
    builder = _Builder(markup)
    functions = [t.get("function") or {} for t in tools]
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        functions = [f for f in functions if f.get("name") == name]
        if not functions:
            raise StructuredError(f"tool_choice names function {name!r}, which is not in 'tools'")
    elif choice not in ("required", "auto"):
        raise StructuredError(f"tool_choice {choice!r} needs no constraint; use 'required', 'auto' or a function")
    enforce_all = choice != "auto"
    fns = [builder.function(i, f, enforce=enforce_all or bool(f.get("strict"))) for i, f in enumerate(functions)]
    rest = f"\"\\n\" ({' | '.join(fns)}) \"\\n\" {markup('</tool_call>')}"
    builder.rules += [f"call: {markup('<tool_call>')} call_rest", f"call_rest: {rest}"]
    if choice == "auto":
        builder.rules.append(_auto_text(markup))
        calls = "*" if parallel else "?"  # parallel_tool_calls=false: at most one call
        body = (f"body: TEXT (call TEXT){calls}" if markup.is_special("<tool_call>")
                else f"body: (TEXT_OPEN call_rest){calls} TEXT")
    elif parallel and not isinstance(choice, dict):
        body = 'body: call ("\\n" call)*'
    else:
        body = "body: call"
    return with_prefix("\n".join([body, *builder.rules]) + "\n", reasoning, markup)


def _auto_text(markup: Markup) -> str:
    """Free text between calls. A special <tool_call> token cannot be part of text; text markup can, so there the
    text before a call is one lexeme ending with the first "<tool_call>" (TEXT_OPEN)."""
    text = "/(?s:.*)/ & ~/(?s:.*)<tool_call>(?s:.*)/"
    if markup.is_special("<tool_call>"):
        return f"TEXT: {text}"
    return f'TEXT: {text}\nTEXT_OPEN: ({text}) "<tool_call>"'


class _Builder:
    """Collects the rules of one grammar; names rules by function and parameter index."""

    def __init__(self, markup: Markup) -> None:
        self.markup = markup
        self.rules: list[str] = []
        self._has_free_value = False

    def function(self, i: int, fn: dict[str, Any], *, enforce: bool) -> str:
        name = _checked_name(fn.get("name"), "function name")
        schema = fn.get("parameters") or {}
        if not isinstance(schema, dict) or (schema.get("type") not in (None, "object")):
            raise StructuredError(f"function {name!r}: 'parameters' must be an object schema")
        properties = schema.get("properties")
        if enforce and isinstance(properties, dict) and properties:
            params = self._declared_params(i, name, schema, set(schema.get("required") or ()))
        elif enforce and schema.get("additionalProperties") is False:
            params = ""  # a function without parameters
        else:
            params = self._free_params(i)
        rule = f"fn_{i}"
        self.rules.append(f'{rule}: {lark_string(f"<function={name}>" + chr(10))} {params} "</function>"')
        return rule

    def _free_params(self, i: int) -> str:
        self.rules.append(f'param_any_{i}: "<parameter=" /[^<>\\s]+/ ">\\n" VALUE_TEXT')
        if not self._has_free_value:
            self.rules.append(f"VALUE_TEXT: ({_FREE_TEXT}) {_VALUE_END}")
            self._has_free_value = True
        return f"param_any_{i}*"

    def _declared_params(self, i: int, fn_name: str, schema: dict[str, Any], required: set[str]) -> str:
        properties = schema["properties"]
        # a JSON value is compiled on its own: it takes the definitions its $refs point into along
        defs = {k: schema[k] for k in ("$defs", "definitions") if k in schema}
        unknown = sorted(required - set(properties))
        if unknown:
            raise StructuredError(f"function {fn_name!r}: required parameters {unknown} are not in 'properties'")
        parts = []
        for j, (key, prop) in enumerate(properties.items()):
            _checked_name(key, f"function {fn_name!r} parameter name")
            rule = f"param_{i}_{j}"
            prop = prop if isinstance(prop, dict) else {}
            value = self._value(f"{i}_{j}", prop, parameter_schema(schema, key) or {}, defs, f"{fn_name}.{key}")
            self.rules.append(f'{rule}: {lark_string(f"<parameter={key}>" + chr(10))} {value}')
            parts.append(rule if key in required else f"{rule}?")
        return " ".join(parts)

    def _value(self, suffix: str, schema: dict[str, Any], resolved: dict[str, Any], defs: dict[str, Any],
               where: str) -> str:
        """The value and the "</parameter>" line after it. resolved: the schema with its $refs resolved as far as
        the parser's typing goes (tool_parser.parameter_schema), which decides text or JSON as the parser does."""
        if not is_string_schema(resolved):
            return f"{inline_json({**defs, **schema})} {_VALUE_END}"
        terminal = f"V_{suffix.upper()}"
        self.rules.append(f"{terminal}: ({_string_terminal(_string_branch(resolved), where)}) {_VALUE_END}")
        return terminal


def _checked_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise StructuredError(f"{what} {name!r} cannot be written as a Qwen3-Coder tool call; use a name without "
                              "whitespace, '<' or '>'")
    return name


def _string_branch(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema a raw text value is held to: the first anyOf / oneOf branch that allows strings, if any."""
    for key in ("anyOf", "oneOf"):
        for branch in schema.get(key) or []:
            if isinstance(branch, dict) and "string" in schema_types(branch):
                return branch
    return schema


def _string_terminal(schema: dict[str, Any], where: str) -> str:
    """A Lark terminal for a raw text value: the string keywords intersected with 'no end tag'."""
    unsupported = sorted(set(schema) - _STRING_KEYWORDS)
    if unsupported:
        raise StructuredError(f"parameter {where!r}: keywords {unsupported} are not supported on a text value of a "
                              "constrained tool call; remove them")
    choices = schema["enum"] if "enum" in schema else [schema["const"]] if "const" in schema else None
    if choices is not None:
        if not choices or not all(isinstance(c, str) and c for c in choices):
            raise StructuredError(f"parameter {where!r}: an enum of text values needs non-empty strings (give "
                                  "other values a 'type', the tool-call parser reads untyped values as text)")
        return " | ".join(lark_string(c) for c in choices)
    parts = []
    if "pattern" in schema:
        parts.append(regex_terminal(_whole_match(schema["pattern"]), "dw"))
    if "format" in schema:
        if schema["format"] not in _FORMATS:
            raise StructuredError(f"parameter {where!r}: format {schema['format']!r} cannot be enforced on a tool "
                                  f"call's text value (supported: {sorted(_FORMATS)}); use 'pattern' instead")
        parts.append("/" + _FORMATS[schema["format"]] + "/")
    low, high = schema.get("minLength", 0), schema.get("maxLength")
    if low or high is not None:
        parts.append(f"/(?s:.){{{int(low)},{'' if high is None else int(high)}}}/")
    return " & ".join([*parts, "/(?s:.*)/", _NO_END_TAG])


def _whole_match(pattern: str) -> str:
    """JSON Schema patterns search; the value must match as a whole, so an unanchored end gets `.*`."""
    if not isinstance(pattern, str):
        raise StructuredError(f"'pattern' must be a string, got {pattern!r}")
    anchored_start = pattern.startswith("^")
    body = pattern[1:] if anchored_start else pattern
    anchored_end = body.endswith("$") and not body.endswith("\\$")
    body = body[:-1] if anchored_end else body
    return f"{'' if anchored_start else '(?s:.*)'}(?:{body}){'' if anchored_end else '(?s:.*)'}"
