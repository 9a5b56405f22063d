"""Incremental parser for Qwen3.5 tool calls (Qwen3-Coder XML) into OpenAI tool_calls with JSON arguments.

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    </function>
    </tool_call>

Arguments are typed by the tool's JSON schema (integer, number, boolean, object, array, null are parsed; strings
kept). The JSON arguments string is built as the text streams in: string values flow out character by character,
other values once their closing tag arrives. The fragments concatenate to exactly json.dumps(arguments), so a
streaming client and a non-streaming one see the same arguments. A closing tag ends a value only where the
format's next tag (or the end of the output) follows it, as vLLM's qwen3coder_tool_parser reads it: a value may hold
the text "</parameter>" (though not "</parameter>" then "<parameter=", which reads as two). As there, a
"<parameter=" at the start of a line inside a value opens a nested parameter whose "</parameter>" is text, and a
value that no closing tag ends (text after its "</parameter>", or that tag missing) stops at the first such line of
a parameter the tool has ("<parameter=NAME>", any name for a tool without properties), so malformed markup does not
swallow the parameters after it. Older Qwen3 JSON bodies (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`)
are accepted too.

Every decision depends only on the text seen so far, never on how it was split into deltas.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
_FUNCTION = "<function="
_FUNCTION_END = "</function>"
_PARAMETER = "<parameter="
_PARAMETER_END = "</parameter>"
_VALUE_ENDS = (_PARAMETER_END, _FUNCTION_END, TOOL_CALL_END)  # a missing </parameter> still ends the value
# a value's text ending in a prefix of one of these may be at its end, or at a line-start parameter header
_PARTIAL_ENDS = [*("\n" + t for t in (*_VALUE_ENDS, _PARAMETER)), *_VALUE_ENDS, _PARAMETER]
_FALLBACK = "fallback"  # _scan_value's tag for a value that ends where a later parameter's header starts
# What the format writes after a closing tag (whitespace aside): a closing tag followed by anything else is text of
# the value, such as a file an agent writes that holds "</parameter>". </tool_call> always ends it.
_FOLLOWERS = {_PARAMETER_END: (_PARAMETER, _FUNCTION_END, TOOL_CALL_END), _FUNCTION_END: (TOOL_CALL_END, _FUNCTION)}
_MAX_TAG = 512  # a tag name longer than this is not a tag: give the text back as content
NAME = re.compile(r"[^<>\s]+")  # a function or parameter name: a call whose name is not one is not a call

ToolSchemas = dict[str, dict[str, Any]]  # function name -> JSON schema of its parameters ("properties" inside)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCallDelta:
    """One streamed piece of a tool call: the first piece of a call carries id and name."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class ToolStep:
    """What one feed produced: deltas, and, when the <tool_call> block ended, the text after it (`rest`), or,
    when the block turned out not to be a tool call, its raw text to show as content (`malformed`)."""

    deltas: list[ToolCallDelta] = field(default_factory=list)
    rest: str | None = None
    malformed: str | None = None


@dataclass
class _ValueScan:
    """How much of the text of the parameter value being read is decided (the parser's buffer holds that text)."""

    pos: int = 0  # the text before pos holds no tag that ends the value
    depth: int = 0  # line-start "<parameter=" in the value whose "</parameter>" has not come: that one is text
    fallback: int | None = None  # the first line-start header of a parameter the tool has: a value no tag ends stops
    sent: int = 0  # characters of a text value already streamed


class _State(Enum):
    HEADER = "header"  # before <function=NAME>
    BODY = "body"      # between parameters
    VALUE = "value"    # inside <parameter=NAME> ... </parameter>
    TAIL = "tail"      # after </function>, before </tool_call>
    JSON = "json"      # Qwen3 JSON body


class ToolCallParser:
    """Parses the inside of <tool_call> blocks (one block at a time; call `start_block` after each <tool_call>).
    Owns the running tool-call index of one choice."""

    def __init__(self, schemas: ToolSchemas | None, id_factory: Callable[[], str] = new_call_id) -> None:
        self.schemas = schemas or {}
        self.id_factory = id_factory
        self.count = 0  # tool calls started in this choice
        self.start_block()

    def start_block(self) -> None:
        self._state = _State.HEADER
        self._buf = ""
        self._raw = ""  # everything fed in this block, returned as content if it is not a tool call
        self._function: str | None = None
        self._calls_in_block = 0
        self._num_params = 0
        self._param_schema: dict[str, Any] | None = None
        self._value_started = False
        self._scan = _ValueScan()

    # ---- public ----------------------------------------------------------------------------------------------
    def feed(self, text: str) -> ToolStep:
        self._buf += text
        self._raw += text
        step = ToolStep()
        while step.rest is None and step.malformed is None and self._advance(step, final=False):
            pass
        return step

    def finish(self) -> ToolStep:
        """The output ended inside the block: close what is open (a call whose header was complete is kept)."""
        step = ToolStep()
        while step.rest is None and step.malformed is None and self._advance(step, final=True):
            pass
        if step.malformed is None and self._state is not _State.HEADER and self._function is not None:
            if self._state is _State.VALUE:
                self._end_value(step, self._buf)
            self._close_function(step)
        elif self._state is _State.HEADER and step.malformed is None and step.rest is None:
            self._give_back(step, self._buf.lstrip())  # ended before a function name: show the text as it was
        return step

    # ---- the state machine: each step consumes a prefix of _buf, or returns False to wait for more --------------
    def _advance(self, step: ToolStep, final: bool) -> bool:
        if self._state is _State.HEADER:
            return self._header(step, final)
        if self._state is _State.BODY:
            return self._body(step, final)
        if self._state is _State.VALUE:
            return self._value_step(step, final)
        if self._state is _State.TAIL:
            return self._tail(step, final)
        return self._json(step, final)

    def _header(self, step: ToolStep, final: bool) -> bool:
        s = self._buf.lstrip()
        if not s:
            return False
        if s.startswith("{"):
            self._state = _State.JSON
            return True
        if s.startswith(_FUNCTION):
            end = s.find(">")
            if end < 0:
                if len(s) > _MAX_TAG or final:
                    self._give_back(step, s)
                return False
            name = s[len(_FUNCTION):end].strip()
            if not NAME.fullmatch(name):  # e.g. a header missing its ">": the name runs into the next tag
                self._give_back(step, s)
                return False
            self._start_function(step, name)
            self._buf = s[end + 1:]
            return True
        if _FUNCTION.startswith(s) and not final:
            return False
        self._give_back(step, s)
        return False

    def _give_back(self, step: ToolStep, s: str) -> None:
        """Not a tool call after all: the whole block is content, or, after a complete call in this block, the
        rest of it is."""
        if self._calls_in_block:
            step.rest = s
        else:
            step.malformed = self._raw

    def _start_function(self, step: ToolStep, name: str) -> None:
        self._function, self._num_params = name, 0
        step.deltas.append(ToolCallDelta(self.count, id=self.id_factory(), name=name))
        self.count += 1
        self._calls_in_block += 1
        self._state = _State.BODY

    def _body(self, step: ToolStep, final: bool) -> bool:
        s = self._buf.lstrip()
        self._buf = s
        if not s:
            return False
        if s.startswith(_PARAMETER):
            end = s.find(">")
            if end < 0:
                return False
            name = s[len(_PARAMETER):end].strip()
            if NAME.fullmatch(name):
                self._start_param(step, name)
                self._buf = s[end + 1:]
                return True
            # not a header (its ">" missing, or no name): skipped below like other text between parameters
        for tag in (_FUNCTION_END, TOOL_CALL_END):
            if s.startswith(tag):
                self._close_function(step)
                self._buf = s[len(_FUNCTION_END):] if tag == _FUNCTION_END else s
                return True
        if not final and any(t.startswith(s) for t in (_PARAMETER, _FUNCTION_END, TOOL_CALL_END)):
            return False
        nxt = s.find("<", 1)  # text between parameters is not part of the call: skip it
        self._buf = s[nxt:] if nxt > 0 else ""
        return nxt > 0

    def _start_param(self, step: ToolStep, name: str) -> None:
        self._param_schema = parameter_schema(self.schemas.get(self._function or ""), name)
        sep = "{" if self._num_params == 0 else ", "
        self._num_params += 1
        opening = '"' if is_string_schema(self._param_schema) else ""
        self._emit(step, f"{sep}{json.dumps(name, ensure_ascii=False)}: {opening}")
        self._state, self._value_started, self._scan = _State.VALUE, False, _ValueScan()

    def _value_step(self, step: ToolStep, final: bool) -> bool:
        """The buffer holds the value's text from its start (a string value streams from it as it is decided)."""
        if not self._value_started:
            if not self._buf:
                return False
            self._value_started = True
            if self._buf.startswith("\n"):  # the format puts the value on its own line
                self._buf = self._buf[1:]
        i, tag = _scan_value(self._buf, self._scan, final, self._has_parameter)
        if tag is not None:
            value, rest = self._buf[:i], self._buf[i + len(tag):] if tag == _PARAMETER_END else self._buf[i:]
            self._end_value(step, value)
            self._buf, self._state = rest, _State.BODY
            return True
        if is_string_schema(self._param_schema) and not final:
            if i and self._buf[i - 1] == "\n":  # the format's newline, if the value ends after it
                i -= 1
            if i > self._scan.sent:
                self._emit(step, _json_chars(self._buf[self._scan.sent:i]))
                self._scan.sent = i
        return False

    def _has_parameter(self, name: str) -> bool:
        """Whether the function has a parameter of this name (any name, for a function without properties)."""
        schema = self.schemas.get(self._function or "")
        properties = schema.get("properties") if isinstance(schema, dict) else None
        return bool(NAME.fullmatch(name)) and (not isinstance(properties, dict) or not properties or name in properties)

    def _end_value(self, step: ToolStep, text: str) -> None:
        if text.endswith("\n"):
            text = text[:-1]
        if is_string_schema(self._param_schema):
            self._emit(step, _json_chars(text[self._scan.sent:]) + '"')
        else:
            self._emit(step, _json_text(convert_param(text, self._param_schema), text))
        self._buf = ""

    def _close_function(self, step: ToolStep) -> None:
        self._emit(step, "{}" if self._num_params == 0 else "}")
        self._state, self._function = _State.TAIL, None

    def _tail(self, step: ToolStep, final: bool) -> bool:
        s = self._buf.lstrip()
        self._buf = s
        if s.startswith(TOOL_CALL_END):
            step.rest = s[len(TOOL_CALL_END):]
            return False
        if s.startswith(_FUNCTION):  # several functions in one block: each is its own call
            self._state = _State.HEADER
            return True
        if not s or (not final and any(t.startswith(s) for t in (TOOL_CALL_END, _FUNCTION))):
            return False
        step.rest = s  # a missing </tool_call>: what follows is content again
        return False

    def _json(self, step: ToolStep, final: bool) -> bool:
        end = self._buf.find(TOOL_CALL_END)
        if end < 0 and not final:
            return False
        body = self._buf if end < 0 else self._buf[:end]
        call = _parse_json_call(body)
        if call is None:
            step.malformed = self._raw
            return False
        name, arguments = call
        step.deltas.append(ToolCallDelta(self.count, id=self.id_factory(), name=name, arguments=arguments))
        self.count += 1
        self._calls_in_block += 1
        self._state = _State.TAIL
        self._buf = self._buf[end:] if end >= 0 else ""
        return True

    def _emit(self, step: ToolStep, arguments: str) -> None:
        if not arguments:
            return
        last = step.deltas[-1] if step.deltas else None
        if last is not None and last.index == self.count - 1:
            last.arguments += arguments
        else:
            step.deltas.append(ToolCallDelta(self.count - 1, arguments=arguments))


def reads_back_whole(value: str) -> bool:
    """Whether a text value written as a parameter (then its closing tag and the next parameter) is read back whole
    and holds no line-start "<parameter=": False where a closing tag inside it would end it first, or where such a
    header would take a closing tag as its own (even a value whose headers pair up: the grammar cannot count)."""
    end, tag = _scan_value(value + "\n" + _PARAMETER_END + "\n" + _PARAMETER, _ValueScan(), True, lambda _: False)
    return tag == _PARAMETER_END and end == len(value) + 1 and not _line_start_header(value)


def _line_start_header(value: str) -> bool:
    return value.startswith(_PARAMETER) or "\n" + _PARAMETER in value


def _scan_value(text: str, scan: _ValueScan, final: bool, has_parameter: Callable[[str], bool]
                ) -> tuple[int, str | None]:
    """Where a value's text ends: (index, tag) once decided, tag the closing tag there or _FALLBACK (the value ends
    where a later parameter's header starts); else (index, None) with text[:index] surely the value's. Resumes at
    scan.pos and moves scan past what is decided, so each feed reads only the new text."""
    while True:
        found = [(i, t) for t in (*_VALUE_ENDS, _PARAMETER) if (i := text.find(t, scan.pos)) >= 0]
        if not found:
            break
        i, tag = min(found)
        if tag == _PARAMETER:
            if not _read_header(text, i, scan, final, has_parameter):
                return _held(i, scan), None
        elif tag == _PARAMETER_END and scan.depth:
            scan.depth -= 1  # the closing tag of a header in the value
        else:
            closes = _closes(tag, text[i + len(tag):], final)
            if closes is None:
                return _held(i, scan), None
            if closes:  # only a </parameter> of its own ends a value at a later parameter's header
                return (i, tag) if tag == _PARAMETER_END or scan.fallback is None else (scan.fallback, _FALLBACK)
        scan.pos = i + len(tag)
    if final:
        return (len(text), None) if scan.fallback is None else (scan.fallback, _FALLBACK)
    return _held(len(text) - _partial_len(text, _PARTIAL_ENDS), scan), None


def _read_header(text: str, i: int, scan: _ValueScan, final: bool, has_parameter: Callable[[str], bool]) -> bool:
    """A "<parameter=" at text[i] inside a value: at a line's start it opens a nested parameter (as vLLM reads it,
    whatever its name), and the first one naming a parameter of the function is where a value that no closing tag
    ends stops. False while its name is still to come."""
    if i > 0 and text[i - 1] != "\n":
        return True  # inside a line: text
    if scan.fallback is None:
        end = text.find(">", i)
        if end < 0 and not final and len(text) - i <= _MAX_TAG:
            return False
        if end >= 0 and has_parameter(text[i + len(_PARAMETER):end].strip()):
            scan.fallback = i
    scan.depth += 1
    return True


def _held(i: int, scan: _ValueScan) -> int:
    """Text from a later parameter's header on may be that parameter's: not the value's until that is decided."""
    return i if scan.fallback is None else min(i, scan.fallback)


def _closes(tag: str, after: str, final: bool) -> bool | None:
    """Whether a closing tag ends the value, by the text after it; None while that text cannot tell yet."""
    followers = _FOLLOWERS.get(tag)
    if followers is None:
        return True
    s = after.lstrip()
    if not s:
        return True if final else None  # the output ended after the tag: it closed the value
    if s.startswith(followers):
        return True
    return None if not final and any(f.startswith(s) for f in followers) else False


def _json_chars(text: str) -> str:
    """JSON string escaping of `text` without the quotes; escaping is per character, so pieces concatenate."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


def _partial_len(text: str, tags: list[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of one of tags."""
    longest = max(len(t) for t in tags)
    starts = {t[0] for t in tags}
    for k in range(min(len(text), longest - 1), 0, -1):
        if text[-k] not in starts:  # most suffixes: no tag starts with their first character
            continue
        tail = text[-k:]
        if any(t.startswith(tail) and len(t) > k for t in tags):
            return k
    return 0


def _parse_json_call(body: str) -> tuple[str, str] | None:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not NAME.fullmatch(obj["name"]):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # arguments already encoded as a JSON string: kept if they hold an object
        try:
            return (obj["name"], args) if isinstance(json.loads(args), dict) else None
        except json.JSONDecodeError:
            return None
    return (obj["name"], json.dumps(args, ensure_ascii=False)) if isinstance(args, dict) else None


def parameter_schema(parameters: dict[str, Any] | None, name: str) -> dict[str, Any] | None:
    """The schema of one parameter of a function, with its local `$ref`s (pydantic's models and enums in `$defs`)
    resolved as far as its type needs: the reference itself and those of its anyOf / oneOf branches."""
    properties = parameters.get("properties") if isinstance(parameters, dict) else None
    schema = properties.get(name) if isinstance(properties, dict) else None
    return _resolved(schema, parameters, _MAX_REF_DEPTH) if isinstance(schema, dict) else None


_MAX_REF_DEPTH = 8  # a recursive model refers to itself: its type is known long before this


def _resolved(schema: Any, root: Any, depth: int) -> Any:
    if not isinstance(schema, dict) or depth <= 0:
        return schema
    target = _local_ref(root, schema.get("$ref"))
    if target is not None:  # the reference's own siblings (description, default) stay beside its target
        schema = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
        return _resolved(schema, root, depth - 1)
    branches = {key: [_resolved(b, root, depth - 1) for b in schema[key]]
                for key in ("anyOf", "oneOf") if isinstance(schema.get(key), list)}
    return {**schema, **branches}


def _local_ref(root: Any, ref: Any) -> dict[str, Any] | None:
    """The target of a JSON pointer into the parameters schema ("#/$defs/Place"), None if it is not one."""
    if not isinstance(ref, str) or not ref.startswith("#/"):
        return None
    node = root
    for part in ref[2:].split("/"):
        node = node.get(part.replace("~1", "/").replace("~0", "~")) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else None


def schema_types(schema: dict[str, Any] | None) -> set[str]:
    if not isinstance(schema, dict):
        return set()
    kind = schema.get("type")
    types = set(kind) if isinstance(kind, list) else ({kind} if isinstance(kind, str) else set())
    for key in ("anyOf", "oneOf"):
        for sub in schema.get(key) or []:
            types |= schema_types(sub)
    if not types and "enum" in schema and all(isinstance(v, str) for v in schema["enum"]):
        types.add("string")
    return types


def is_string_schema(schema: dict[str, Any] | None) -> bool:
    """Strings (and parameters the schema does not describe) are kept as text, as the model wrote them."""
    types = schema_types(schema)
    return not types or "string" in types


def convert_param(raw: str, schema: dict[str, Any] | None) -> Any:
    """A parameter's text as the JSON value its schema asks for; text that does not parse is kept as a string."""
    types = schema_types(schema)
    text = raw.strip()
    if text.lower() == "null":
        return None
    for kind in ("integer", "number", "boolean", "object", "array"):
        if kind in types:
            value = _convert(text, kind)
            if value is not _NO:
                return value
    return raw


_NO = object()


def _json_text(value: Any, raw: str) -> str:
    """A converted value as JSON. A number past a double's range (1e400) would be written `Infinity`, which is not
    JSON: the model's text stays as written where it is JSON (as the grammar makes it), else it is a string."""
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except ValueError:
        text = raw.strip()
        try:
            json.loads(text)
        except ValueError:
            return json.dumps(text, ensure_ascii=False)
        return text


def _convert(text: str, kind: str) -> Any:
    try:
        if kind == "integer":
            return int(text)
        if kind == "number":  # an integer literal exactly (a float rounds past 2**53)
            return float(text) if any(c in text for c in ".eE") else int(text)
        if kind == "boolean":
            return {"true": True, "false": False}.get(text.lower(), _NO)
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = ast.literal_eval(text)  # Python-style dicts/lists ({'a': 1}) that models sometimes write
        ok = isinstance(value, dict) if kind == "object" else isinstance(value, list)
        return value if ok else _NO
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return _NO
