"""Request fields -> the output constraint (a StructuredSpec), compiled before the request reaches the engine.

Sources, at most one per request: OpenAI's `response_format` (json_object, json_schema; vLLM's structural_tag);
vLLM's `structured_outputs` object (json, regex, choice, grammar, json_object, structural_tag) and its older
`guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`, `structural_tag`; on chat, `tool_choice`
"required" or a named function (a Qwen3-Coder tool call whose arguments follow the function's schema), and "auto"
when a tool is `strict` (calls of strict tools follow their schemas).
Compiling runs on a worker thread; a constraint that cannot be enforced is a 400 naming the field and the problem.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from deltaserve.server.errors import APIError, bad_request
from deltaserve.server.protocol import ChatCompletionRequest, NamedToolChoice, _SamplingFields
from deltaserve.server.state import ServerState
from deltaserve.server.tool_parser import NAME
from deltaserve.structured import StructuredError, StructuredKind, StructuredSpec
from deltaserve.structured.compiler import GrammarCompiler

_STRUCTURED_OUTPUTS_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
# vLLM options of structured_outputs that change nothing here (the backend is llguidance, JSON is compact), and
# disable_additional_properties, which changes the schema (_closed_objects)
_IGNORED_OPTIONS = frozenset({"backend", "disable_fallback", "disable_any_whitespace"})
_OPTIONS = _IGNORED_OPTIONS | {"disable_additional_properties"}
# keys whose value maps names to schemas, and keys whose value is a JSON value rather than a schema
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})
_VALUE_KEYS = frozenset({"enum", "const", "default", "examples", "x-guidance"})


def output_spec(req: _SamplingFields, *, reasoning: bool) -> tuple[StructuredSpec, str] | None:
    """The constraint from response_format / structured_outputs / guided_*, and the field it came from."""
    found = [c for c in (_response_format(req, reasoning), *_structured_outputs(req, reasoning),
                         *_guided(req, reasoning)) if c is not None]
    if len(found) > 1:
        raise bad_request(f"'{found[0][1]}' and '{found[1][1]}' both constrain the output; send only one",
                          found[1][1])
    if req.guided_whitespace_pattern is not None:
        raise bad_request("'guided_whitespace_pattern' is not supported: JSON is written compactly (', ' and ': ' "
                          "separators); leave it out", "guided_whitespace_pattern")
    return found[0] if found else None


def tool_spec(req: ChatCompletionRequest, *, reasoning: bool) -> tuple[StructuredSpec, str] | None:
    """The tool-call constraint of a chat request: "required", a named function, or "auto" with a strict tool."""
    choice, tools = req.tool_choice, req.tools or []
    if not tools or choice == "none":
        return None
    dumped = [{"type": "function", "function": t.function.model_dump(exclude_none=True)} for t in tools]
    parallel = req.parallel_tool_calls is not False
    if isinstance(choice, NamedToolChoice):
        spec = StructuredSpec.tool_calls(dumped, {"function": {"name": choice.function.name}}, parallel=False,
                                         reasoning=reasoning)
        return spec, "tool_choice"
    if choice == "required":
        return StructuredSpec.tool_calls(dumped, "required", parallel=parallel, reasoning=reasoning), "tool_choice"
    if any(t.function.strict for t in tools):
        return StructuredSpec.tool_calls(dumped, "auto", parallel=parallel, reasoning=reasoning), "tools"
    return None


def chat_spec(req: ChatCompletionRequest, *, reasoning: bool) -> tuple[StructuredSpec, str] | None:
    output, tools = output_spec(req, reasoning=reasoning), tool_spec(req, reasoning=reasoning)
    if output is not None and tools is not None:
        raise bad_request(f"'{output[1]}' and '{tools[1]}' both constrain the output (a response format and "
                          "enforced tool calls); send one, or use tool_choice 'auto' with tools that are not strict",
                          output[1])
    return output or tools


async def compile_spec(state: ServerState, found: tuple[StructuredSpec, str] | None) -> StructuredSpec | None:
    """Compile (or find in the cache) on a worker thread: the engine thread then only copies a matcher."""
    if found is None:
        return None
    spec, field = found
    compiler = state.engine.engine.structured.compiler
    if compiler.cached(spec) is None:
        await asyncio.to_thread(_compile, compiler, spec, field)
    return spec


def _compile(compiler: GrammarCompiler, spec: StructuredSpec, field: str) -> None:
    try:
        compiler.compile(spec)
    except StructuredError as e:
        culprit = _failing_tool(compiler, spec, field) if spec.kind is StructuredKind.TOOL_CALLS else None
        raise culprit or APIError(400, f"'{field}' cannot be enforced: {e}", param=field,
                                  code="invalid_structured_output") from None


def _failing_tool(compiler: GrammarCompiler, spec: StructuredSpec, field: str) -> APIError | None:
    """The first enforced tool whose call does not compile on its own: the error names it (its index in 'tools'),
    not only the field that asked for enforcement. Runs only once the whole constraint failed."""
    body = json.loads(spec.spec)
    choice = body["choice"]
    for i, tool in enumerate(body["tools"]):
        fn = tool.get("function") or {}
        name = fn.get("name")
        if (choice == "auto" and not fn.get("strict")) or (isinstance(choice, dict) and
                                                          name != choice["function"]["name"]):
            continue  # not enforced by this request
        try:
            compiler.compile(StructuredSpec.tool_calls([tool], {"function": {"name": name}}, parallel=False))
        except StructuredError as e:
            param = f"tools.{i}.function.{'parameters' if NAME.fullmatch(str(name)) else 'name'}"
            why = "it is strict" if field == "tools" else "'tool_choice' asks for its calls"
            return APIError(400, f"'{param}' (function {name!r}) cannot be enforced, as {why}: {e}", param=param,
                            code="invalid_structured_output")
    return None


def _response_format(req: _SamplingFields, reasoning: bool) -> tuple[StructuredSpec, str] | None:
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return StructuredSpec.json_object(reasoning=reasoning), "response_format"
    if fmt.type == "structural_tag":
        return _structural_tag(fmt.model_dump(exclude={"type", "json_schema"}), "response_format", reasoning)
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise bad_request("response_format of type 'json_schema' needs 'json_schema': {\"name\": ..., \"schema\": "
                          "{...}}", "response_format.json_schema.schema", code="missing_required_parameter")
    return _spec(lambda: StructuredSpec.json_schema(fmt.json_schema.schema_, reasoning=reasoning),
                 "response_format.json_schema.schema")


def _structured_outputs(req: _SamplingFields, reasoning: bool) -> list[tuple[StructuredSpec, str] | None]:
    options = req.structured_outputs
    if options is None:
        return []
    unknown = sorted(set(options) - set(_STRUCTURED_OUTPUTS_KINDS) - _OPTIONS)
    if unknown:
        raise bad_request(f"'structured_outputs' has fields this server does not support: {unknown}; supported: "
                          f"{list(_STRUCTURED_OUTPUTS_KINDS)}", f"structured_outputs.{unknown[0]}")
    given = [k for k in _STRUCTURED_OUTPUTS_KINDS if options.get(k) not in (None, False)]
    close = bool(options.get("disable_additional_properties"))
    return [_one_kind(k, _closed_schema(options[k]) if close and k == "json" else options[k],
                      f"structured_outputs.{k}", reasoning) for k in given]


def _closed_schema(schema: Any) -> Any:
    """vLLM's disable_additional_properties: every object schema that does not say whether it takes other keys
    takes none. Text that is not JSON is left for the schema's own error."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError:
            return schema
    return _closed_objects(schema)


def _closed_objects(schema: Any) -> Any:
    if isinstance(schema, list):  # anyOf, allOf, prefixItems, ...
        return [_closed_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: _closed_objects(sub) for name, sub in value.items()}
        else:
            out[key] = value if key in _VALUE_KEYS else _closed_objects(value)
    if (schema.get("type") == "object" or "properties" in schema) and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    return out


def _guided(req: _SamplingFields, reasoning: bool) -> list[tuple[StructuredSpec, str] | None]:
    pairs = (("json", req.guided_json), ("regex", req.guided_regex), ("choice", req.guided_choice),
             ("grammar", req.guided_grammar))
    found = [_one_kind(kind, value, f"guided_{kind}", reasoning) for kind, value in pairs if value is not None]
    if req.structural_tag is not None:
        found.append(_structural_tag(req.structural_tag, "structural_tag", reasoning))
    return found


def _one_kind(kind: str, value: Any, field: str, reasoning: bool) -> tuple[StructuredSpec, str]:
    if kind == "json_object":
        return StructuredSpec.json_object(reasoning=reasoning), field
    if kind == "structural_tag":
        return _structural_tag(value, field, reasoning)
    builders = {"json": StructuredSpec.json_schema, "regex": StructuredSpec.regex, "choice": StructuredSpec.choice,
                "grammar": StructuredSpec.grammar}
    return _spec(lambda: builders[kind](value, reasoning=reasoning), field)


def _structural_tag(value: Any, field: str, reasoning: bool) -> tuple[StructuredSpec, str]:
    """vLLM's structural tag, as an object or its JSON text: {"structures": [...], "triggers": [...]} (a "type":
    "structural_tag" key, as vLLM forwards response_format, is allowed). xgrammar's later form ("format") is not."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise bad_request(f"'{field}' is not valid JSON: {e.msg} at column {e.colno}", field,
                              code="invalid_structured_output") from None
    if not isinstance(value, dict):
        raise bad_request(f"'{field}' must be an object {{\"structures\": [...], \"triggers\": [...]}}", field,
                          code="invalid_structured_output")
    if value.get("format") is not None:
        raise bad_request(f"'{field}' uses xgrammar's structural-tag 'format', which this server does not support; "
                          "send 'structures' ([{\"begin\", \"schema\", \"end\"}]) and 'triggers' instead", field,
                          code="invalid_structured_output")
    unknown = sorted(set(value) - {"structures", "triggers", "type", "format"})
    if unknown or value.get("type", "structural_tag") != "structural_tag":
        what = f"fields {unknown}" if unknown else f"type {value.get('type')!r}"
        raise bad_request(f"'{field}' has {what}; a structural tag takes 'structures' and 'triggers'", field,
                          code="invalid_structured_output")
    return _spec(lambda: StructuredSpec.structural_tag(value.get("structures"), value.get("triggers"),
                                                       reasoning=reasoning), field)


def _spec(build, field: str) -> tuple[StructuredSpec, str]:
    try:
        return build(), field
    except StructuredError as e:
        raise APIError(400, f"'{field}' is invalid: {e}", param=field, code="invalid_structured_output") from None
