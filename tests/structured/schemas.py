"""Schemas and tools the structured-output tests share, and a random walk under a grammar's own mask."""

from __future__ import annotations

import random

import numpy as np

SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 1, "maximum": 999},
            "status": {"enum": ["pending", "shipped", "delivered"]},
            "customer": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                                          "vip": {"type": "boolean"}},
                         "required": ["name", "vip"], "additionalProperties": False},
        },
        "required": ["id", "status", "customer"], "additionalProperties": False},
    "arrays": {
        "type": "object",
        "properties": {"scores": {"type": "array", "items": {"type": "number", "minimum": -1.5, "maximum": 2.5},
                                  "minItems": 1, "maxItems": 3},
                       "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 4}},
        "required": ["scores"], "additionalProperties": False},
    "ranges": {
        "type": "object",
        "properties": {"x": {"type": "integer", "exclusiveMinimum": -5, "maximum": 5},
                       "p": {"type": "number", "minimum": 0, "maximum": 1},
                       "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"},
                       "note": {"type": ["string", "null"], "maxLength": 6}},
        "required": ["x", "p", "code"], "additionalProperties": False},
    "bounded": {
        "type": "object",
        "properties": {"n": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 50},
                             "maxItems": 4},
                       "flag": {"type": "boolean"}, "kind": {"enum": ["x", "y", None]}},
        "required": ["n", "flag", "kind"], "additionalProperties": False},
    "refs": {
        "$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer", "minimum": 0, "maximum": 9},
                                                            "kids": {"type": "array", "maxItems": 2,
                                                                     "items": {"$ref": "#/$defs/node"}}},
                           "required": ["v"], "additionalProperties": False}},
        "$ref": "#/$defs/node"},
}

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather forecast for a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "when": {"type": "string", "format": "date"},
        "hours": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 23}, "maxItems": 3}},
        "required": ["city", "days"], "additionalProperties": False}}}
PING = {"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {},
                                                                        "additionalProperties": False}}}
TOOLS = [WEATHER, PING]
# as pydantic writes a function whose arguments are models: $defs, $ref, Optional[...] as anyOf with null
PLACES = {"type": "function", "function": {"name": "plan_trip", "parameters": {
    "$defs": {"Place": {"title": "Place", "type": "object",
                        "properties": {"city": {"title": "City", "type": "string", "maxLength": 10},
                                       "stars": {"title": "Stars", "type": "integer", "minimum": 1, "maximum": 5}},
                        "required": ["city", "stars"], "additionalProperties": False},
              "Mode": {"title": "Mode", "type": "string", "enum": ["train", "car"]}},
    "title": "plan_trip", "type": "object",
    "properties": {"start": {"$ref": "#/$defs/Place"},
                   "stops": {"title": "Stops", "type": "array", "items": {"$ref": "#/$defs/Place"}, "maxItems": 2},
                   "mode": {"$ref": "#/$defs/Mode"},
                   "back": {"anyOf": [{"$ref": "#/$defs/Place"}, {"type": "null"}], "default": None}},
    "required": ["start", "stops", "mode"], "additionalProperties": False}}}


def allowed(bitmask_row: np.ndarray, vocab: int) -> np.ndarray:
    return np.flatnonzero(np.unpackbits(bitmask_row.view(np.uint8), bitorder="little")[:vocab])


def walk(matcher, vocab: int, eos: set[int], rng: random.Random, max_steps: int = 400) -> list[int] | None:
    """Uniform choices among the allowed tokens (an end token with probability 1/2 when allowed); the tokens
    before the end token, or None if the walk did not end in max_steps."""
    import llguidance.numpy as lnp

    tokens: list[int] = []
    bitmask = np.zeros((1, (vocab + 31) // 32), dtype=np.int32)
    for _ in range(max_steps):
        lnp.fill_next_token_bitmask(matcher, bitmask, 0)
        ids = allowed(bitmask[0], vocab)
        ends = [int(i) for i in ids if int(i) in eos]
        token = ends[0] if ends and rng.random() < 0.5 else int(ids[rng.randrange(len(ids))])
        assert matcher.consume_token(token), matcher.get_error()
        if token in eos:
            return tokens
        tokens.append(token)
    return None


def structural_tag_values(text: str, structures: list[dict], triggers: list[str], *,
                          complete: bool = True) -> list[object]:
    """The JSON values of the structures in `text`, checked against vLLM's structural-tag rules, written out
    directly: free text holds no trigger; at each trigger one of the structures whose begin starts with it is
    written whole (its begin, a value its schema allows, its end). complete=False: the text may stop inside the
    last structure (a length cut)."""
    import json

    import jsonschema

    values, pos = [], 0
    while True:
        hits = [(text.find(t, pos), t) for t in triggers if text.find(t, pos) >= 0]
        if not hits:
            return values
        start = min(hits)[0]
        for s in structures:
            begin, end = s["begin"], s["end"]
            if not text.startswith(begin, start) and not (not complete and begin.startswith(text[start:])):
                continue
            if not complete and len(text) <= start + len(begin):
                return values
            try:
                value, after = json.JSONDecoder().raw_decode(text, start + len(begin))
            except json.JSONDecodeError:
                assert not complete, f"no JSON value after {begin!r}: {text[start:]!r}"
                return values
            jsonschema.validate(value, s["schema"])
            if not complete and len(text) < after + len(end) and end.startswith(text[after:]):
                return values + [value]
            assert text.startswith(end, after), f"{end!r} should follow the value: {text[after:]!r}"
            values.append(value)
            pos = after + len(end)
            break
        else:
            raise AssertionError(f"a trigger starts no structure: {text[start:start + 40]!r}")
