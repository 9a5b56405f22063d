"""The grammars themselves, under their own masks: random walks through every choice a grammar allows end in text
that validates (jsonschema) or parses as the tool call it should be; errors name the problem."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest

from deltaserve.server.output_parser import OutputParser
from deltaserve.structured import StructuredError, StructuredSpec
from deltaserve.structured.compiler import GrammarCompiler
from tests.structured.schemas import PING, PLACES, SCHEMAS, TOOLS, WEATHER, structural_tag_values, walk

VOCAB = 4096
EOS = {4087, 4089}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from deltaserve.demo import SHIPPED_DEMO_DIR

    return AutoTokenizer.from_pretrained(str(SHIPPED_DEMO_DIR))


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GrammarCompiler(tokenizer, VOCAB, EOS)


def walks(compiler, tokenizer, spec, n: int, seed: int = 0) -> list[str]:
    compiled = compiler.compile(spec)
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        tokens = walk(compiled.new_matcher(), VOCAB, EOS, rng)
        if tokens is not None:
            texts.append(tokenizer.decode(tokens, skip_special_tokens=False))
    assert len(texts) >= n // 2, "most walks should end"
    return texts


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_walk_validates(compiler, tokenizer, name):
    for text in walks(compiler, tokenizer, StructuredSpec.json_schema(SCHEMAS[name]), 40):
        jsonschema.validate(json.loads(text), SCHEMAS[name])


def test_json_is_compact_and_keeps_property_order(compiler, tokenizer):
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "boolean"}},
              "required": ["b", "a"], "additionalProperties": False}
    for text in walks(compiler, tokenizer, StructuredSpec.json_schema(schema), 10):
        assert text == json.dumps(json.loads(text)) and text.index('"b"') < text.index('"a"')


def test_json_object_regex_choice_grammar(compiler, tokenizer):
    for text in walks(compiler, tokenizer, StructuredSpec.json_object(), 20):
        assert isinstance(json.loads(text), dict)
    import re
    for text in walks(compiler, tokenizer, StructuredSpec.regex(r"[a-c]{1,3}-[0-9]{2}"), 20):
        assert re.fullmatch(r"[a-c]{1,3}-[0-9]{2}", text)
    choices = ["yes", 'no "way"', "maybe\n"]
    assert set(walks(compiler, tokenizer, StructuredSpec.choice(choices), 30)) <= set(choices)
    gbnf = 'root ::= "x" digit+\ndigit ::= [0-9]'
    for text in walks(compiler, tokenizer, StructuredSpec.grammar(gbnf), 20):
        assert re.fullmatch(r"x[0-9]+", text)


def test_reasoning_comes_first(compiler, tokenizer):
    spec = StructuredSpec.json_schema(SCHEMAS["nested"], reasoning=True)
    matcher = compiler.compile(spec).new_matcher()
    for token in tokenizer.encode("let me think", add_special_tokens=False) + [tokenizer.convert_tokens_to_ids(
            "</think>")] + tokenizer.encode('\n\n{"id": 5', add_special_tokens=False):
        assert matcher.consume_token(token), matcher.get_error()
    assert not matcher.consume_token(tokenizer.encode("x", add_special_tokens=False)[0])  # JSON is enforced now


def test_reasoning_cannot_spell_its_end_tag_as_text(compiler, tokenizer):
    """`</think>` written with plain tokens ends the block for the reasoning parser (it reads text), so the grammar,
    which waited for the special token, forced the JSON after it: the content was "more</think>{}", not JSON."""
    matcher = compiler.compile(StructuredSpec.json_object(reasoning=True)).new_matcher()
    plain = [t for piece in ("hmm </", "think", ">") for t in tokenizer.encode(piece, add_special_tokens=False)]
    assert tokenizer.decode(plain) == "hmm </think>" and tokenizer.convert_tokens_to_ids("</think>") not in plain
    assert all(matcher.consume_token(t) for t in plain[:-1]), matcher.get_error()
    assert not matcher.consume_token(plain[-1])


def _tool_calls(text: str, schemas):
    parser = OutputParser(parse_reasoning=False, tools=schemas, parse_tools=True)
    parsed = parser.feed(text)
    parsed.extend(parser.finish())
    return parsed


@pytest.mark.parametrize("choice", ["required", {"function": {"name": "get_weather"}}])
def test_tool_call_walks_parse_and_validate(compiler, tokenizer, choice):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    spec = StructuredSpec.tool_calls(TOOLS, choice, parallel=True)
    for text in walks(compiler, tokenizer, spec, 40, seed=1):
        parsed = _tool_calls(text, schemas)
        assert parsed.tool_calls and not parsed.content.strip(), text
        if isinstance(choice, dict):
            assert [c.name for c in parsed.tool_calls] == ["get_weather"]
        for call in parsed.tool_calls:
            jsonschema.validate(json.loads(call.arguments), schemas[call.name])


def test_text_values_take_annotations_and_other_types_keywords(compiler, tokenizer):
    """Keywords that constrain no string (annotations, vendor keys, other types' keywords) are accepted on a text
    value, as llguidance accepts them on JSON values: a valid schema is not refused."""
    tool = {"type": "function", "function": {"name": "note", "parameters": {"type": "object", "properties": {
        "text": {"type": "string", "maxLength": 8, "deprecated": True, "readOnly": False, "$comment": "c",
                 "contentMediaType": "text/plain", "x-order": 1},
        "code": {"type": ["string", "integer"], "maxLength": 4, "minimum": 1, "maxItems": 2}},
        "required": ["text", "code"], "additionalProperties": False}}}
    schemas = {"note": tool["function"]["parameters"]}
    for text in walks(compiler, tokenizer, StructuredSpec.tool_calls([tool], "required", parallel=False), 20):
        (call,) = _tool_calls(text, schemas).tool_calls
        jsonschema.validate(json.loads(call.arguments), schemas["note"])


@pytest.mark.parametrize("prop", [
    {"type": "string", "anyOf": [{"maxLength": 3}, {"pattern": "^a"}]},  # untyped branches were ignored
    {"anyOf": [{"type": "string"}, {"type": "null"}], "maxLength": 4},  # the keywords beside anyOf were dropped
    {"oneOf": [{"type": "integer"}, {"type": "string", "anyOf": [{"maxLength": 2}]}]},
])
def test_text_value_keeps_every_keyword_of_its_branch(compiler, tokenizer, prop):
    tool = {"type": "function", "function": {"name": "note", "parameters": {"type": "object", "properties": {
        "text": prop}, "required": ["text"], "additionalProperties": False}}}
    schemas = {"note": tool["function"]["parameters"]}
    for text in walks(compiler, tokenizer, StructuredSpec.tool_calls([tool], "required", parallel=False), 30):
        (call,) = _tool_calls(text, schemas).tool_calls
        jsonschema.validate(json.loads(call.arguments), schemas["note"])


def test_auto_with_a_strict_tool_allows_text_and_enforces_calls(compiler, tokenizer):
    strict = {"type": "function", "function": {**WEATHER["function"], "strict": True}}
    spec = StructuredSpec.tool_calls([strict, PING], "auto")
    matcher = compiler.compile(spec).new_matcher()
    text = 'Sure.<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n'
    for token in tokenizer.encode(text, add_special_tokens=False):
        assert matcher.consume_token(token), (text, matcher.get_error())
    assert not matcher.consume_token(tokenizer.encode("9", add_special_tokens=False)[0])  # days <= 7


def test_markup_that_is_text_in_the_tokenizer(tmp_path):
    """A tokenizer without a </think> token: the grammar must match the markup as text (bytes)."""
    from transformers import AutoTokenizer

    from deltaserve.demo import write_byte_tokenizer

    write_byte_tokenizer(tmp_path)
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if "think" not in t["content"]]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["extra_special_tokens"] = [t for t in config["extra_special_tokens"] if "think" not in t]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    compiler = GrammarCompiler(tok, 320, [tok.convert_tokens_to_ids("<|im_end|>")])
    assert not compiler.markup.is_special("</think>") and compiler.markup.is_special("<|im_end|>")
    matcher = compiler.compile(StructuredSpec.choice(["ok"], reasoning=True)).new_matcher()
    for token in tok.encode("hmm</think>\n\nok", add_special_tokens=False):
        assert matcher.consume_token(token), matcher.get_error()
    assert matcher.is_accepting()


def _text_tool(keywords: dict, **parameters) -> dict:
    return {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"s": {"type": "string", **keywords}}, **parameters}}}


@pytest.mark.parametrize("spec, words", [
    (StructuredSpec.json_schema({"type": "array", "uniqueItems": True}), "uniqueItems"),
    (StructuredSpec.json_schema({"type": "strng"}), "strng"),
    (StructuredSpec.json_schema({"type": "integer", "minimum": 5, "maximum": 1}), "minimum"),
    (StructuredSpec.json_schema({"$ref": "#/$defs/missing"}), "missing"),
    # oneOf branches a value may match both of: the fix is anyOf, or llguidance's option set in the schema
    (StructuredSpec.json_schema({"oneOf": [{"type": "integer"}, {"type": "number"}]}),
     r'oneOf.*use anyOf.*"x-guidance": \{"coerce_one_of": true\}'),
    (StructuredSpec.regex("(unclosed"), "unclosed"),
    (StructuredSpec.grammar("start: undefined_rule"), "undefined_rule"),
    # GBNF that llguidance's converter refuses with a bare Exception (a 500 before): a clear StructuredError
    (StructuredSpec.grammar("root ::= undefined_rule"), "undefined_rule"),
    (StructuredSpec.grammar('answer ::= "a"'), "root"),
    # a GBNF rule named `start` is GBNF (not Lark's `start:`); its conversion names `root` as `start`
    (StructuredSpec.grammar('root ::= start\nstart ::= "ab"'), "rename the rule 'start'"),
    (StructuredSpec.tool_calls([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"s": {"type": "string", "format": "email"}}}}}], "required"), "email"),
    (StructuredSpec.tool_calls([{"type": "function", "function": {"name": "bad name"}}], "required"), "bad name"),
    (StructuredSpec.tool_calls([PING], {"function": {"name": "nope"}}), "nope"),
    # malformed keywords that raised TypeError / ValueError (a 500 on the server) before
    (StructuredSpec.json_schema({"type": "object", "x-guidance": 5}), "'x-guidance' must be an object"),
    (StructuredSpec.tool_calls([_text_tool({"minLength": "x"})], "required"), "'minLength' must be"),
    (StructuredSpec.tool_calls([_text_tool({"maxLength": 2.5})], "required"), "'maxLength' must be"),
    (StructuredSpec.tool_calls([_text_tool({"format": ["date"]})], "required"), "format \\['date'\\]"),
    (StructuredSpec.tool_calls([_text_tool({}, required=[["s"]])], "required"), "'required' must be a list"),
])
def test_errors_name_the_problem(compiler, spec, words):
    with pytest.raises(StructuredError, match=words):
        compiler.compile(spec)


def test_compiled_once_per_spec(compiler):
    a = compiler.compile(StructuredSpec.json_schema({"type": "object", "properties": {"q": {"type": "integer"}}}))
    b = compiler.compile(StructuredSpec.json_schema('{"type":"object","properties":{"q":{"type":"integer"}}}'))
    assert a is b
    assert a.new_matcher() is not a.new_matcher()


@pytest.mark.parametrize("grammar", ['?start: answer\n?answer: "y" NUM | "z" NUM\nNUM: /[0-9]{1,3}/',
                                     '// a comment first\n!start: ("y" | "z") /[0-9]{1,3}/'])
def test_lark_grammar_with_a_rule_modifier_on_start(compiler, tokenizer, grammar):
    """Lark's `?start:` / `!start:` (vLLM's Lark examples write `?start:`) is Lark, not GBNF to convert."""
    import re
    for text in walks(compiler, tokenizer, StructuredSpec.grammar(grammar), 20):
        assert re.fullmatch(r"[yz][0-9]{1,3}", text), text


def test_tool_call_walks_with_refs_to_defs_validate(compiler, tokenizer):
    """Parameters that refer to $defs (pydantic models as arguments): the grammar resolves them, and the parser
    reads a referenced object as an object, an enum of strings as text."""
    schema = PLACES["function"]["parameters"]
    spec = StructuredSpec.tool_calls([PLACES], "required", parallel=False)
    texts = walks(compiler, tokenizer, spec, 30, seed=2)
    for text in texts:
        calls = _tool_calls(text, {"plan_trip": schema}).tool_calls
        assert len(calls) == 1, text
        jsonschema.validate(json.loads(calls[0].arguments), schema)


def test_auto_without_parallel_calls_allows_one_call(compiler, tokenizer):
    """parallel_tool_calls=false under "auto" with a strict tool: text, at most one call, text."""
    strict = {"type": "function", "function": {**PING["function"], "strict": True}}
    call = "<tool_call>\n<function=ping>\n</function>\n</tool_call>"
    for parallel, second_call_allowed in ((True, True), (False, False)):
        matcher = compiler.compile(StructuredSpec.tool_calls([strict], "auto", parallel=parallel)).new_matcher()
        for token in tokenizer.encode("Sure." + call + " Done.", add_special_tokens=False):
            assert matcher.consume_token(token), matcher.get_error()
        assert matcher.consume_token(tokenizer.convert_tokens_to_ids("<tool_call>")) == second_call_allowed


# properties in the order the grammar writes them; "notes" is optional, so a text value may end the function
WRITE_FILE = {"type": "function", "function": {"name": "write_file", "parameters": {
    "type": "object", "properties": {"content": {"type": "string"}, "meta": {"type": "object"},
                                     "path": {"type": "string"}, "notes": {"type": "string"}},
    "required": ["content", "meta", "path"]}}}
ANY_ARGS = {"type": "function", "function": {"name": "write_file"}}  # no schema: any parameters, kept as text


def _write_file_call(content: str) -> str:
    return ("<tool_call>\n<function=write_file>\n<parameter=content>\n" + content + "\n</parameter>\n"
            '<parameter=meta>\n{"s": "</parameter>"}\n</parameter>\n<parameter=path>\na.xml\n</parameter>\n'
            "</function>\n</tool_call>")


def _consumes(compiler, tokenizer, tool, text: str) -> bool:
    matcher = compiler.compile(StructuredSpec.tool_calls([tool], "required", parallel=False)).new_matcher()
    return all(matcher.consume_token(t) for t in tokenizer.encode(text, add_special_tokens=False)) and \
        matcher.is_accepting()


@pytest.mark.parametrize("tool", [WRITE_FILE, ANY_ARGS], ids=["declared", "free"])
@pytest.mark.parametrize("content", [
    "<a>x</parameter> y</a>",  # the tag inside a line
    "line 1\n</parameter>\nline 2",  # on a line of its own, as the format writes it, then more text
    "a </function> b </parameter>!",  # a literal </function> too
    "ends with the tag </parameter>",  # the last one before the real end
    "</function>\n</parameter>",  # closing tags no tag of the format follows
    "x <parameter=path>\ny",  # a header inside a line
])
def test_forced_text_values_may_hold_closing_tags(compiler, tokenizer, tool, content):
    """A forced call (a code-editing tool writing XML) could not write "</parameter>" in a text value at all; the
    grammar now allows it wherever the parser reads it back as text, and the parser returns the same value."""
    text = _write_file_call(content)
    assert _consumes(compiler, tokenizer, tool, text), text
    meta = {"s": "</parameter>"} if tool is WRITE_FILE else '{"s": "</parameter>"}'
    schemas = {"write_file": tool["function"].get("parameters", {})}
    assert [json.loads(c.arguments) for c in _tool_calls(text, schemas).tool_calls] == [
        {"content": content, "meta": meta, "path": "a.xml"}]


@pytest.mark.parametrize("tool", [WRITE_FILE, ANY_ARGS], ids=["declared", "free"])
@pytest.mark.parametrize("content", [
    "x</parameter>\n<parameter=path>\nb.xml",  # the parser ends the value at the first </parameter>
    "x</parameter>\x1c\u3000</function>",  # whitespace as str.lstrip skips it
    "x</function> <function=ping>",
    "x</tool_call>",
    "</parameter>\n</parameter>\n</function>",  # the second closing tag is followed by one that ends the function
    "x\n<parameter=path>\nb.xml",  # a header at a line's start takes the value's own closing tag
])
def test_forced_text_values_refuse_closing_tags_the_parser_would_end_them_at(compiler, tokenizer, tool, content):
    text = _write_file_call(content)
    schemas = {"write_file": tool["function"].get("parameters", {})}
    calls = _tool_calls(text, schemas).tool_calls
    assert not calls or json.loads(calls[0].arguments).get("content") != content  # the text is ambiguous
    assert not _consumes(compiler, tokenizer, tool, text), text


@pytest.mark.parametrize("tool", [WRITE_FILE, ANY_ARGS], ids=["declared", "free"])
def test_forced_text_values_hold_no_header_at_a_line_start(compiler, tokenizer, tool):
    """The parser pairs a "<parameter=" at a line's start with the next closing tag (vLLM's nesting): the grammar
    cannot count the pairs, so a text value has no such header at all, even where they pair up."""
    for content in ["<parameter=x>\ny\n</parameter>", "a\n<parameter=x>b</parameter> c"]:
        assert not _consumes(compiler, tokenizer, tool, _write_file_call(content)), content


def test_a_text_value_may_end_the_function_when_the_rest_is_optional(compiler, tokenizer):
    text = _write_file_call("c").replace("a.xml\n</parameter>\n", "a.xml\n</parameter>\n<parameter=notes>\n"
                                         "n </function>\n</parameter>\n")
    assert _consumes(compiler, tokenizer, WRITE_FILE, text), text
    args = json.loads(_tool_calls(text, {"write_file": WRITE_FILE["function"]["parameters"]}).tool_calls[0].arguments)
    assert args == {"content": "c", "meta": {"s": "</parameter>"}, "path": "a.xml", "notes": "n </function>"}
    assert not _consumes(compiler, tokenizer, WRITE_FILE, _write_file_call("c").replace("<parameter=path>\na.xml\n"
                                                                                         "</parameter>\n", ""))


def test_an_enum_text_value_the_parser_would_cut_cannot_be_chosen(compiler, tokenizer):
    """Enum choices were not held to the closing-tag rule: a choice holding "</parameter>" and then a tag was
    written, and the parser read it as two parameters."""
    cut, whole = "x</parameter>\n<parameter=path>\nb.xml", "x</parameter> y"
    params = WRITE_FILE["function"]["parameters"]
    tool = {"type": "function", "function": {"name": "write_file", "parameters": {
        **params, "properties": {**params["properties"], "content": {"type": "string", "enum": [cut, whole]}}}}}
    assert not _consumes(compiler, tokenizer, tool, _write_file_call(cut))
    assert _consumes(compiler, tokenizer, tool, _write_file_call(whole))


@pytest.mark.parametrize("choice", ["x</tool_call>", "x\n<parameter=y>\nz\n</parameter>"])
def test_an_enum_whose_every_choice_the_parser_would_cut_is_refused(compiler, choice):
    """It compiled, but no value could ever be finished: the request hung until max_tokens."""
    params = WRITE_FILE["function"]["parameters"]
    tool = {"type": "function", "function": {"name": "write_file", "parameters": {
        **params, "properties": {**params["properties"], "content": {"type": "string", "enum": [choice]}}}}}
    with pytest.raises(StructuredError, match="no choice of its enum can be written as a tool-call value"):
        compiler.compile(StructuredSpec.tool_calls([tool], "required"))


# vLLM's structural tag: a function call of a Llama-style text format, and one opened by a special token
STRUCTURES = [{"begin": "<function=get_weather>", "schema": WEATHER["function"]["parameters"], "end": "</function>"},
              {"begin": "<function=ping>", "end": "</function>",
               "schema": {"type": "object", "properties": {}, "additionalProperties": False}}]
TRIGGERS = ["<function="]


def _walk_after(compiler, tokenizer, spec, prefix_ids: list[int], n: int) -> list[str]:
    """Texts of n random walks that start with prefix_ids (fed first), each ended by an end token."""
    compiled, rng, texts = compiler.compile(spec), random.Random(0), []
    for _ in range(n):
        matcher = compiled.new_matcher()
        for token in prefix_ids:
            assert matcher.consume_token(token), matcher.get_error()
        tokens = walk(matcher, VOCAB, EOS, rng)
        if tokens is not None:
            texts.append(tokenizer.decode(prefix_ids + tokens, skip_special_tokens=False))
    assert len(texts) >= n // 2, "most walks should end"
    return texts


def test_structural_tag_walks_write_each_structure_whole(compiler, tokenizer):
    spec = StructuredSpec.structural_tag(STRUCTURES, TRIGGERS)
    prefix = tokenizer.encode("Let me check. <function=", add_special_tokens=False)
    texts = _walk_after(compiler, tokenizer, spec, prefix, 30)
    names = set()
    for text in texts:
        values = structural_tag_values(text, STRUCTURES, TRIGGERS)
        assert values, text  # the trigger entered a structure
        names.add(text[len("Let me check. <function="):].split(">", 1)[0])
    assert names == {"get_weather", "ping"}  # either structure may follow the shared trigger
    for text in walks(compiler, tokenizer, spec, 20):  # free walks: whatever they write keeps the rules
        structural_tag_values(text, STRUCTURES, TRIGGERS)


def test_structural_tag_refuses_what_no_structure_allows(compiler, tokenizer):
    matcher_of = compiler.compile(StructuredSpec.structural_tag(STRUCTURES, TRIGGERS)).new_matcher

    def feeds(text: str) -> bool:
        matcher = matcher_of()
        return all(matcher.consume_token(t) for t in tokenizer.encode(text, add_special_tokens=False))

    assert feeds('a <function=ping>{}</function> b <function=get_weather>{"city": "Oslo", "days": 2}</function>')
    assert feeds("free text <func")  # a trigger's prefix is text
    assert not feeds("a <function=other>")
    assert not feeds('a <function=get_weather>{"town": "Oslo"}')
    assert not feeds('a <function=ping>{} b')  # the end comes right after the value
    matcher = matcher_of()
    for token in tokenizer.encode("done <function=", add_special_tokens=False):
        assert matcher.consume_token(token)
    assert not matcher.is_accepting()  # an output cannot end on a trigger


def test_structural_tag_opened_by_a_special_token(compiler, tokenizer):
    """<tool_call> and </tool_call> are special tokens of the demo tokenizer: matched by name, never as text."""
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    structures = [{"begin": '<tool_call>\n{"name": "f", "arguments": ', "schema": schema, "end": "}\n</tool_call>"}]
    spec = StructuredSpec.structural_tag(structures, ["<tool_call>"])
    assert "<tool_call>" in compiler.compile(spec).grammar and "</tool_call>" in compiler.compile(spec).grammar
    prefix = tokenizer.encode("Calling.", add_special_tokens=False) + [tokenizer.convert_tokens_to_ids("<tool_call>")]
    for text in _walk_after(compiler, tokenizer, spec, prefix, 20):
        assert len(structural_tag_values(text, structures, ["<tool_call>"])) >= 1


def test_structural_tag_triggers_that_prefix_each_other(compiler, tokenizer):
    """The first trigger to complete ends the free text, so each structure belongs to the shortest trigger its
    begin starts with: both structures stay reachable, and a trigger written in free text still enters one."""
    structures = [{"begin": "<function=get>", "schema": {"type": "integer"}, "end": "</function>"},
                  {"begin": "<fx>", "schema": {"type": "integer"}, "end": "</fx>"}]
    matcher_of = compiler.compile(StructuredSpec.structural_tag(structures, ["<f", "<function="])).new_matcher

    def feeds(text: str) -> bool:
        matcher = matcher_of()
        return all(matcher.consume_token(t) for t in tokenizer.encode(text, add_special_tokens=False))

    assert feeds("a <function=get>1</function>") and feeds("a <fx>1</fx>")
    assert not feeds("a <fy")


def test_structural_tag_trigger_led_by_a_special_token(compiler, tokenizer):
    """A trigger that starts with a special token is entered by that token; its text spelling cannot be free text,
    and a special token further into a trigger is refused."""
    structures = [{"begin": "<tool_call>\n<function=f>", "schema": {"type": "integer"}, "end": "</function>"}]
    spec = StructuredSpec.structural_tag(structures, ["<tool_call>\n<function="])
    matcher = compiler.compile(spec).new_matcher()
    tool_call = tokenizer.convert_tokens_to_ids("<tool_call>")
    for token in tokenizer.encode("ok ", add_special_tokens=False) + [tool_call] + tokenizer.encode(
            "\n<function=f>7</function>", add_special_tokens=False):
        assert matcher.consume_token(token), matcher.get_error()
    assert matcher.is_accepting()
    spelt = compiler.compile(StructuredSpec.structural_tag(structures, ["<tool_call>"])).new_matcher()
    text = [t for piece in ("hi <tool", "_call> x") for t in tokenizer.encode(piece, add_special_tokens=False)]
    assert not all(spelt.consume_token(t) for t in text)  # the trigger's text is no free text
    inner = StructuredSpec.structural_tag([{"begin": "x<tool_call>", "schema": {}, "end": ""}], ["x<tool_call>"])
    with pytest.raises(StructuredError, match="special token after its start"):
        compiler.compile(inner)


@pytest.mark.parametrize("structures, triggers, words", [
    ([{"begin": "<f=a>", "schema": {}, "end": ""}], ["<g="], r"starts with none of the triggers \['<g='\]"),
    ([{"begin": "<f=a>", "schema": {}, "end": "", "extra": 1}], ["<f="], r"exactly 'begin', 'schema' and 'end'"),
    ([{"begin": "<f=a>", "schema": "{oops", "end": ""}], ["<f="], r"structures\[0\].schema' is not valid JSON"),
    ([{"begin": "<f=a>", "schema": [1], "end": ""}], ["<f="], r"schema' must be an object \(or true/false\)"),
    ([], ["<f="], "'structures' must be a non-empty list"),
    ([{"begin": "<f=a>", "schema": {}, "end": ""}], [], "'triggers' must be a non-empty list"),
])
def test_structural_tag_errors_name_the_problem(structures, triggers, words):
    with pytest.raises(StructuredError, match=words):
        StructuredSpec.structural_tag(structures, triggers)


def test_structural_tag_schema_errors_surface_at_compile(compiler):
    spec = StructuredSpec.structural_tag([{"begin": "<f=a>", "schema": {"type": "strng"}, "end": ""}], ["<f="])
    with pytest.raises(StructuredError, match="strng"):
        compiler.compile(spec)
