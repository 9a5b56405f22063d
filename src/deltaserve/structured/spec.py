"""What a request constrains its output to, as a small frozen value: the key of the compiled-grammar cache and a
field of SamplingParams. Pure Python (no grammar library, no torch): the scheduler and the server import it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from typing import Any


class StructuredError(ValueError):
    """A constraint that cannot be enforced (bad schema, unsupported keyword, grammar that does not compile); the
    message names the problem and, where there is one, the fix."""


class StructuredKind(str, Enum):
    JSON = "json"                # spec: a JSON schema (canonical JSON text)
    JSON_OBJECT = "json_object"  # spec: "" (any JSON object)
    REGEX = "regex"              # spec: a regular expression the whole output matches
    CHOICE = "choice"            # spec: a JSON list of the allowed strings
    GRAMMAR = "grammar"          # spec: a Lark grammar (llguidance's dialect) or GBNF (llama.cpp's)
    TOOL_CALLS = "tool_calls"    # spec: canonical JSON {"tools": [...], "choice": ..., "parallel": bool}
    STRUCTURAL_TAG = "structural_tag"  # spec: canonical JSON {"structures": [{begin, schema, end}], "triggers": [...]}


@dataclass(frozen=True)
class StructuredSpec:
    """A constraint on one request's output. `reasoning`: the output starts inside an open reasoning block (the
    chat template left `<think>` open): the constraint applies after the model closes it with `</think>`.

    Build with the classmethods, which canonicalise `spec` so that equal constraints share one compiled grammar.
    """

    kind: StructuredKind
    spec: str = ""
    reasoning: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.kind, StructuredKind):
            raise StructuredError(f"StructuredSpec.kind={self.kind!r} is invalid: expected one of "
                                  f"{[k.value for k in StructuredKind]}")
        if not isinstance(self.spec, str):
            raise StructuredError(f"StructuredSpec.spec must be a string, got {type(self.spec).__name__}")

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | bool | str, *, reasoning: bool = False) -> StructuredSpec:
        return cls(StructuredKind.JSON, canonical_json(_schema(schema, "the JSON schema")), reasoning)

    @classmethod
    def json_object(cls, *, reasoning: bool = False) -> StructuredSpec:
        return cls(StructuredKind.JSON_OBJECT, "", reasoning)

    @classmethod
    def regex(cls, pattern: str, *, reasoning: bool = False) -> StructuredSpec:
        _require_text(pattern, "regex")
        return cls(StructuredKind.REGEX, pattern, reasoning)

    @classmethod
    def choice(cls, choices: list[str], *, reasoning: bool = False) -> StructuredSpec:
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
            raise StructuredError("a choice constraint needs a non-empty list of non-empty strings")
        return cls(StructuredKind.CHOICE, canonical_json(choices), reasoning)

    @classmethod
    def grammar(cls, grammar: str, *, reasoning: bool = False) -> StructuredSpec:
        _require_text(grammar, "grammar")
        return cls(StructuredKind.GRAMMAR, grammar, reasoning)

    @classmethod
    def tool_calls(cls, tools: list[dict[str, Any]], choice: str | dict[str, Any], *, parallel: bool = True,
                   reasoning: bool = False) -> StructuredSpec:
        """tools: OpenAI function tools ({"type": "function", "function": {name, parameters, strict}});
        choice: "required", "auto" (only strict tools are enforced) or {"function": {"name": ...}}."""
        body = {"tools": tools, "choice": choice, "parallel": bool(parallel)}
        return cls(StructuredKind.TOOL_CALLS, canonical_json(body), reasoning)

    @classmethod
    def structural_tag(cls, structures: list[dict[str, Any]], triggers: list[str], *,
                       reasoning: bool = False) -> StructuredSpec:
        """vLLM's structural tag: free text in which a trigger starts one of the structures whose `begin` starts
        with it, written whole: its `begin`, a JSON value its `schema` allows, its `end`. Text outside the
        structures never holds a trigger. structures: [{"begin": str, "schema": JSON schema, "end": str}]."""
        if not isinstance(triggers, list) or not triggers or not all(isinstance(t, str) and t for t in triggers):
            raise StructuredError("'triggers' must be a non-empty list of non-empty strings")
        if not isinstance(structures, list) or not structures:
            raise StructuredError("'structures' must be a non-empty list of {\"begin\", \"schema\", \"end\"} objects")
        return cls(StructuredKind.STRUCTURAL_TAG, canonical_json(
            {"structures": [_structure(s, i, triggers) for i, s in enumerate(structures)], "triggers": triggers}),
            reasoning)

    def describe(self) -> str:
        """A short label for logs and errors."""
        return f"{self.kind.value}{' after reasoning' if self.reasoning else ''}"


def canonical_json(value: Any) -> str:
    """The value as compact JSON text, the cache key. Keys keep their order: a schema's property order is the
    order the output writes them in."""
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise StructuredError(f"the constraint is not JSON-serialisable: {e}") from None


def _structure(structure: Any, index: int, triggers: list[str]) -> dict[str, Any]:
    """One structure of a structural tag, checked, with its schema decoded when sent as JSON text."""
    where = f"structures[{index}]"
    if not isinstance(structure, dict) or set(structure) != {"begin", "schema", "end"}:
        got = sorted(structure) if isinstance(structure, dict) else type(structure).__name__
        raise StructuredError(f"'{where}' must be an object of exactly 'begin', 'schema' and 'end', got {got}")
    begin, end, schema = structure["begin"], structure["end"], structure["schema"]
    if not isinstance(begin, str) or not isinstance(end, str):
        raise StructuredError(f"'{where}.begin' and '{where}.end' must be strings")
    if not any(begin.startswith(t) for t in triggers):
        raise StructuredError(f"'{where}.begin' ({begin!r}) starts with none of the triggers {triggers}: a structure "
                              "is entered only through a trigger, so begin with one")
    return {"begin": begin, "schema": _schema(schema, f"'{where}.schema'"), "end": end}


def _schema(schema: Any, name: str) -> dict[str, Any] | bool:
    """A JSON schema, decoded when sent as JSON text; StructuredError unless it is an object or true/false."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise StructuredError(f"{name} is not valid JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(schema, (dict, bool)):
        raise StructuredError(f"{name} must be an object (or true/false), got a {type(schema).__name__}")
    return schema


def _require_text(value: Any, what: str) -> None:
    if not isinstance(value, str) or not value:
        raise StructuredError(f"a {what} constraint needs a non-empty string")
