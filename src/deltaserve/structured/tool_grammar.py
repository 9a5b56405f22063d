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
below; every other value is JSON (`%json`), which the parser converts back.

Raw text may hold the closing tags as text, as the parser reads them: a closing tag ends a value only where the
format's next tag follows it. So a text value may not hold `</tool_call>`, `</parameter>` followed (after whitespace,
as Python's str.lstrip reads it) by `<parameter=`, `</function>` or `</tool_call>`, nor `</function>` followed by
`</tool_call>` or `<function=`, nor `<parameter=` at the start of a line (the parser pairs such a header with the
next closing tag, and the grammar cannot count pairs); anything else it may, e.g. "</parameter>\n</parameter>",
"</function> x" or "a <parameter=b>". What the grammar allows, the parser reads back as written.

llguidance's lexemes are greedy (a lexeme ends only where it cannot go on), so free text cannot be a lexeme
followed by its delimiter: text that may hold "\n</parameter>\n<" would swallow the next tag's start. Each text
lexeme therefore takes the delimiter and the next tag's opening with it (`"\n</parameter>\n<parameter="` or
`"\n</parameter>\n</function>"`, `TEXT "<tool_call>"`), which the text cannot hold, so no lexeme is the start of a
longer one and each ends exactly there. A parameter after a text value thus starts at its name.

"required" and a named function: only tool calls (after the reasoning block, if open); one call for a named
function or parallel_tool_calls=false, else one or more. "auto": free text in which any call follows the grammar
(strict tools' arguments their schema, other tools' arguments free), at most one call with parallel_tool_calls=false.
"""

from __future__ import annotations

import json
from typing import Any

from deltaserve.server.tool_parser import NAME, is_string_schema, parameter_schema, reads_back_whole, schema_types
from deltaserve.structured.grammars import Markup, inline_json, lark_string, regex_terminal, with_prefix
from deltaserve.structured.spec import StructuredError

# the whitespace str.lstrip skips (Unicode White_Space and \x1c-\x1f), which the parser skips after a closing tag
_WS = r"[\s\x1c-\x1f]*"
# text the parser would not read back as one value: a closing tag the format's next tag follows, or </tool_call>, or
# a line-start header (the value's text starts a line)
_AMBIGUOUS = (r"~/(?s:.*)(<\/parameter>" + _WS + r"(<parameter=|<\/function>|<\/tool_call>)|<\/function>" + _WS
              + r"(<\/tool_call>|<function=)|<\/tool_call>)(?s:.*)|((?s:.*)\n)?<parameter=(?s:.*)/")
_FREE_TEXT = f"/(?s:.*)/ & {_AMBIGUOUS}"
_THEN_PARAM = r'"\n</parameter>\n<parameter="'  # a text value, its closing tag and the next parameter's opening
_THEN_END = r'"\n</parameter>\n</function>"'  # a text value, its closing tag and the function's
_VALUE_END = r'"\n</parameter>\n"'
_ANNOTATIONS = frozenset({"description", "title", "default", "examples"})
_STRING_KEYWORDS = frozenset({"type", "description", "title", "default", "examples", "enum", "const", "pattern",
                              "minLength", "maxLength", "format", "nullable", "anyOf", "oneOf"})
# keywords no string can fail (the parser always writes a text value as a JSON string): annotations, and those that
# apply to numbers, arrays and objects only; accepted and left out, as llguidance does on JSON values
_VACUOUS_ON_TEXT = frozenset({
    "$comment", "$id", "$anchor", "deprecated", "readOnly", "writeOnly", "contentMediaType", "contentEncoding",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "items", "prefixItems", "minItems",
    "maxItems", "uniqueItems", "contains", "minContains", "maxContains", "properties", "additionalProperties",
    "patternProperties", "required", "minProperties", "maxProperties", "propertyNames"})
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
            params = self._declared_params(i, name, schema, _required(schema, name))
        elif enforce and schema.get("additionalProperties") is False:
            params = '"</function>"'  # a function without parameters
        else:
            params = self._free_params()
        rule = f"fn_{i}"
        self.rules.append(f'{rule}: {lark_string(f"<function={name}>" + chr(10))} {params}')
        return rule

    def _free_params(self) -> str:
        """Any parameters, then </function>: `free_rest` from a tag on, `free_keys` after "<parameter=" (which a
        text value's lexeme takes along)."""
        if not self._has_free_value:
            self.rules += ['free_rest: "<parameter=" free_keys | "</function>"',
                           'free_keys: /[^<>\\s]+/ ">\\n" (VALUE_TEXT_P free_keys | VALUE_TEXT_F)',
                           f"VALUE_TEXT_P: ({_FREE_TEXT}) {_THEN_PARAM}", f"VALUE_TEXT_F: ({_FREE_TEXT}) {_THEN_END}"]
            self._has_free_value = True
        return "free_rest"

    def _declared_params(self, i: int, fn_name: str, schema: dict[str, Any], required: set[str]) -> str:
        properties = schema["properties"]
        # a JSON value is compiled on its own: it takes the definitions its $refs point into along
        defs = {k: schema[k] for k in ("$defs", "definitions") if k in schema}
        unknown = sorted(required - set(properties))
        if unknown:
            raise StructuredError(f"function {fn_name!r}: required parameters {unknown} are not in 'properties'")
        values = []
        for j, (key, prop) in enumerate(properties.items()):
            _checked_name(key, f"function {fn_name!r} parameter name")
            prop = prop if isinstance(prop, dict) else {}
            values.append(self._value(f"{i}_{j}", prop, parameter_schema(schema, key) or {}, defs, f"{fn_name}.{key}"))
        return self._sequence(i, list(properties), values, required)

    def _sequence(self, i: int, keys: list[str], values: list[str | tuple[str, str]], required: set[str]) -> str:
        """The parameters in order (optional ones may be skipped), then </function>. rest_I_J: parameters J.. from a
        tag on; keys_I_J: the same after "<parameter=", which a text value's lexeme takes along."""
        n = len(keys)
        may_end = [not required.intersection(keys[j:]) for j in range(n + 1)]  # </function> may come at j
        needed_rests = {0}
        for j, (key, value) in enumerate(zip(keys, values)):
            if isinstance(value, str):  # JSON: its closing tag, then the rest from a tag on
                body = f"{value} rest_{i}_{j + 1}"
                needed_rests.add(j + 1)
            else:
                body = " | ".join([*([f"{value[0]} keys_{i}_{j + 1}"] if j + 1 < n else []),
                                   *([value[1]] if may_end[j + 1] else [])])
            skip = f" | keys_{i}_{j + 1}" if key not in required and j + 1 < n else ""
            self.rules.append(f"keys_{i}_{j}: {lark_string(key + '>' + chr(10))} ({body}){skip}")
        for j in sorted(needed_rests):
            self.rules.append(f"rest_{i}_{j}: " + " | ".join([*([f'"<parameter=" keys_{i}_{j}'] if j < n else []),
                                                            *(['"</function>"'] if may_end[j] else [])]))
        return f"rest_{i}_0"

    def _value(self, suffix: str, schema: dict[str, Any], resolved: dict[str, Any], defs: dict[str, Any],
               where: str) -> str | tuple[str, str]:
        """A JSON value and its "</parameter>" line (a rule body), or the two terminals of a text value: the text,
        its closing tag and then "<parameter=", or then "</function>". resolved: the schema with its $refs resolved
        as far as the parser's typing goes (tool_parser.parameter_schema), which decides text or JSON as it does."""
        if not is_string_schema(resolved):
            return f"{inline_json({**defs, **schema})} {_VALUE_END}"
        terminal, text = f"V_{suffix.upper()}", _string_terminal(_string_branch(resolved), where)
        self.rules += [f"{terminal}_P: ({text}) {_THEN_PARAM}", f"{terminal}_F: ({text}) {_THEN_END}"]
        return f"{terminal}_P", f"{terminal}_F"


def _required(schema: dict[str, Any], fn_name: str) -> set[str]:
    required = schema.get("required") or []
    if not isinstance(required, list) or not all(isinstance(k, str) for k in required):
        raise StructuredError(f"function {fn_name!r}: 'required' must be a list of parameter names, got "
                              f"{required!r}")
    return set(required)


def _length(schema: dict[str, Any], key: str, where: str) -> int | None:
    """minLength / maxLength: a non-negative integer (JSON Schema's rule), or None when absent."""
    value = schema.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != int(value):
        raise StructuredError(f"parameter {where!r}: {key!r} must be a non-negative integer, got {value!r}")
    return int(value)


def _checked_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise StructuredError(f"{what} {name!r} cannot be written as a Qwen3-Coder tool call; use a name without "
                              "whitespace, '<' or '>'")
    return name


def _string_branch(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema a raw text value is held to: the first anyOf / oneOf branch that allows strings (typed as strings,
    or untyped), with the keywords beside it (the schema's own type, maxLength, ...), down to one without branches."""
    for key in ("anyOf", "oneOf"):
        branches = schema.get(key)
        if not branches:
            continue
        for branch in branches if isinstance(branches, list) else []:
            types = schema_types(branch)
            if isinstance(branch, dict) and (not types or "string" in types):
                rest = {k: v for k, v in schema.items() if k != key}
                both = sorted(k for k in set(rest) & set(branch) - _ANNOTATIONS - {"type"} if rest[k] != branch[k])
                if both:
                    raise StructuredError(f"keywords {both} are set both beside '{key}' and in its branch for text "
                                          "values; keep one of each")
                return _string_branch({**rest, **branch})  # the branch's type is narrower (it allows strings)
        raise StructuredError(f"no '{key}' branch of {json.dumps(schema)[:120]} takes a text value")
    return schema


def _string_terminal(schema: dict[str, Any], where: str) -> str:
    """A Lark terminal for a raw text value: the string keywords intersected with 'no end tag'."""
    unsupported = sorted(k for k in set(schema) - _STRING_KEYWORDS - _VACUOUS_ON_TEXT if not k.startswith("x-"))
    if unsupported:
        raise StructuredError(f"parameter {where!r}: keywords {unsupported} are not supported on a text value of a "
                              "constrained tool call; remove them")
    choices = schema["enum"] if "enum" in schema else [schema["const"]] if "const" in schema else None
    if choices is not None:
        if not choices or not all(isinstance(c, str) and c for c in choices):
            raise StructuredError(f"parameter {where!r}: an enum of text values needs non-empty strings (give "
                                  "other values a 'type', the tool-call parser reads untyped values as text)")
        if not any(reads_back_whole(c) for c in choices):
            raise StructuredError(f"parameter {where!r}: no choice of its enum can be written as a tool-call value: "
                                  f"{choices!r} each hold a closing tag followed by the format's next tag (or "
                                  "</tool_call>), where the parser would end the value, or '<parameter=' at a line's "
                                  "start, which the parser reads as a nested parameter")
        return f"({' | '.join(lark_string(c) for c in choices)}) & {_AMBIGUOUS}"
    parts = []
    if "pattern" in schema:
        parts.append(regex_terminal(_whole_match(schema["pattern"]), "dw"))
    if "format" in schema:
        if not isinstance(schema["format"], str) or schema["format"] not in _FORMATS:
            raise StructuredError(f"parameter {where!r}: format {schema['format']!r} cannot be enforced on a tool "
                                  f"call's text value (supported: {sorted(_FORMATS)}); use 'pattern' instead")
        parts.append("/" + _FORMATS[schema["format"]] + "/")
    low, high = _length(schema, "minLength", where) or 0, _length(schema, "maxLength", where)
    if low or high is not None:
        parts.append(f"/(?s:.){{{low},{'' if high is None else high}}}/")
    return " & ".join([*parts, _FREE_TEXT])


def _whole_match(pattern: str) -> str:
    """JSON Schema patterns search; the value must match as a whole, so an unanchored end gets `.*`."""
    if not isinstance(pattern, str):
        raise StructuredError(f"'pattern' must be a string, got {pattern!r}")
    anchored_start = pattern.startswith("^")
    body = pattern[1:] if anchored_start else pattern
    anchored_end = body.endswith("$") and not body.endswith("\\$")
    body = body[:-1] if anchored_end else body
    return f"{'' if anchored_start else '(?s:.*)'}(?:{body}){'' if anchored_end else '(?s:.*)'}"
