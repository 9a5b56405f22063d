"""Request fields -> the output constraint (server/structured.py), without a server."""

from __future__ import annotations

import json

from deltaserve.server.protocol import CompletionRequest
from deltaserve.server.structured import output_spec

NESTED = {"type": "object", "properties": {
    "a": {"type": "object", "properties": {"b": {"type": "integer"}}},
    "c": {"type": "array", "items": {"type": "object", "properties": {"d": {"type": "string"}}}},
    "open": {"type": "object", "properties": {"e": {"type": "integer"}}, "additionalProperties": True},
    "properties": {"type": "object", "default": {"properties": {}}}},
    "$defs": {"X": {"type": "object", "properties": {"f": {"type": "boolean"}}}}}


def _schema(options: dict) -> dict:
    req = CompletionRequest(model="m", prompt="p", structured_outputs=options)
    spec, field = output_spec(req, reasoning=False)
    assert field == "structured_outputs.json"
    return json.loads(spec.spec)


def test_disable_additional_properties_closes_every_object_the_schema_leaves_open():
    """vLLM's structured_outputs.disable_additional_properties: objects without 'additionalProperties' take no
    other keys; one that says so itself keeps its choice."""
    closed = _schema({"json": NESTED, "disable_additional_properties": True})
    assert closed["additionalProperties"] is False
    assert closed["properties"]["a"]["additionalProperties"] is False
    assert closed["properties"]["c"]["items"]["additionalProperties"] is False
    assert closed["properties"]["open"]["additionalProperties"] is True
    assert closed["$defs"]["X"]["additionalProperties"] is False
    # a property named "properties" is a property, and a default is a value, not a schema
    assert "additionalProperties" not in closed["properties"]
    assert closed["properties"]["properties"] == {"type": "object", "default": {"properties": {}},
                                                  "additionalProperties": False}
    assert _schema({"json": json.dumps(NESTED), "disable_additional_properties": True}) == closed
    assert _schema({"json": NESTED, "disable_additional_properties": False}) == NESTED
