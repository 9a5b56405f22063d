"""Reasoning and tool-call parsing on scripted model outputs: one-shot equals every way of streaming the same text,
arguments are typed by the schema, malformed markup degrades to content."""

from __future__ import annotations

import json
import random
from itertools import count

import pytest

from deltaserve.server.output_parser import OutputParser, ParsedDelta, prompt_opens_reasoning, strip_tokens
from deltaserve.server.tool_parser import convert_param, is_string_schema

SCHEMAS = {
    "get_weather": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"},
        "temp": {"type": "number"}, "opts": {"type": "object"}, "tags": {"type": "array"},
        "note": {"type": ["string", "null"]}, "unit": {"enum": ["c", "f"]}}},
    "noop": {"type": "object", "properties": {}},
}
STRIP = ("<|im_end|>", "<|endoftext|>")

TOOL_TEXT = ("Need the forecast.\n</think>\n\nLet me check.\n<tool_call>\n<function=get_weather>\n"
             "<parameter=city>\nSão \"Paulo\"\n</parameter>\n<parameter=days>\n3\n</parameter>\n"
             "<parameter=metric>\nTrue\n</parameter>\n<parameter=temp>\n21.5\n</parameter>\n"
             "<parameter=opts>\n{\"a\": [1, 2]}\n</parameter>\n<parameter=tags>\n['x', 'y']\n</parameter>\n"
             "<parameter=note>\nline1\nline2\n</parameter>\n<parameter=unit>\nc\n</parameter>\n</function>\n"
             "</tool_call>\n<tool_call>\n<function=noop>\n</function>\n</tool_call><|im_end|>")


def make(**kw) -> OutputParser:
    ids = count()
    kw.setdefault("tools", SCHEMAS)
    kw.setdefault("parse_tools", True)
    kw.setdefault("strip", STRIP)
    return OutputParser(id_factory=lambda: f"call_{next(ids)}", **kw)


def run(text_chunks: list[str], **kw) -> ParsedDelta:
    parser = make(**kw)
    out = ParsedDelta()
    for chunk in text_chunks:
        out.extend(parser.feed(chunk))
    out.extend(parser.finish())
    return out


def splits(text: str, seed: int, trials: int = 200):
    rnd = random.Random(seed)
    yield list(text)  # one character at a time
    for _ in range(trials):
        cuts = sorted(rnd.sample(range(1, len(text)), min(len(text) - 1, rnd.randint(1, 30))))
        yield [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def test_reasoning_content_and_typed_tool_calls():
    out = run([TOOL_TEXT], starts_in_reasoning=True)
    assert out.reasoning == "Need the forecast."
    assert out.content == "Let me check."
    assert [(c.index, c.id, c.name) for c in out.tool_calls] == [(0, "call_0", "get_weather"), (1, "call_1", "noop")]
    args = json.loads(out.tool_calls[0].arguments)
    assert args == {"city": 'São "Paulo"', "days": 3, "metric": True, "temp": 21.5, "opts": {"a": [1, 2]},
                    "tags": ["x", "y"], "note": "line1\nline2", "unit": "c"}
    assert out.tool_calls[0].arguments == json.dumps(args, ensure_ascii=False)  # exactly what json.dumps writes
    assert out.tool_calls[1].arguments == "{}"


@pytest.mark.parametrize("text,kw", [
    (TOOL_TEXT, dict(starts_in_reasoning=True)),
    ("<think>\nplan\n</think>\n\nanswer <b>bold</b> a<|im_end|>", dict()),
    ("partial <tool_call>\n<function=get_weather>\n<parameter=city>\nRo", dict()),
    ("text <tool_call>not a call</tool_call> more <tool_cal", dict()),
    ("<tool_call>\n{\"name\": \"noop\", \"arguments\": {\"k\": 1}}\n</tool_call>", dict()),
], ids=["full", "think_tags_in_output", "cut_mid_value", "malformed", "json_form"])
def test_streaming_in_any_split_equals_one_shot(text, kw):
    one_shot = run([text], **kw)
    for i, chunks in enumerate(splits(text, seed=len(text))):
        assert run(chunks, **kw) == one_shot, f"split {i}: {chunks}"


def test_streamed_string_arguments_flow_before_the_value_ends():
    parser = make()
    parser.feed("<tool_call>\n<function=get_weather>\n<parameter=city>\nNew")
    got = parser.feed(" York")
    assert [c.arguments for c in got.tool_calls] == [" York"]
    rest = parser.feed("\n</parameter>\n</function>\n</tool_call>")
    assert rest.tool_calls[0].arguments == '"}'


def test_prompt_opened_think_versus_disabled_thinking():
    assert prompt_opens_reasoning("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not prompt_opens_reasoning("<|im_start|>assistant\n")
    # enable_thinking=false: the output is all content, even if it mentions </think> literally later
    out = run(["Hi!"], starts_in_reasoning=False)
    assert (out.reasoning, out.content) == ("", "Hi!")
    out = run(["still thinking"], starts_in_reasoning=True)  # cut before </think>
    assert (out.reasoning, out.content) == ("still thinking", "")


def test_no_parsers_keeps_the_text_but_strips_special_tokens():
    text = "<think>x</think> <tool_call>y</tool_call><|im_end|>"
    out = run([text], parse_reasoning=False, parse_tools=False)
    assert out.content == "<think>x</think> <tool_call>y</tool_call>" and not out.tool_calls


def test_tool_markup_inside_reasoning_stays_reasoning():
    out = run(["<tool_call>\n<function=noop>\n</function>\n</tool_call>\n</think>\nok"], starts_in_reasoning=True)
    assert out.tool_calls == [] and out.content == "ok" and out.reasoning.startswith("<tool_call>")


def test_call_cut_short_is_closed_and_unknown_function_kept_untyped():
    out = run(["<tool_call>\n<function=other>\n<parameter=n>\n5"])
    assert out.tool_calls[0].name == "other" and json.loads(out.tool_calls[0].arguments) == {"n": "5"}


@pytest.mark.parametrize("raw,schema,expected", [
    ("42", {"type": "integer"}, 42), ("4.0", {"type": "number"}, 4.0), ("4", {"type": "number"}, 4),
    ("false", {"type": "boolean"}, False), ("null", {"type": "integer"}, None), ("x", {"type": "integer"}, "x"),
    ("[1, 2]", {"type": "array"}, [1, 2]), ("{'a': 1}", {"type": "object"}, {"a": 1}),
    ("7", {"anyOf": [{"type": "integer"}, {"type": "null"}]}, 7), ("[1", {"type": "array"}, "[1"),
])
def test_convert_param(raw, schema, expected):
    assert not is_string_schema(schema)
    got = convert_param(raw, schema)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("starts_in_reasoning", [True, False])
def test_constrained_content_is_text_even_where_it_spells_markup(starts_in_reasoning):
    """A constrained output's content is what its grammar allowed: a JSON string holding "<think>" or "</think>"
    (written with plain tokens: the grammar admits no special token there) is not markup. The JSON was split into
    content and reasoning before."""
    answer = '{"a": "<think>x</think> y"}'
    text = ("why</think>\n\n" if starts_in_reasoning else "") + answer
    for chunks in ([text], list(text)):
        out = run(chunks, starts_in_reasoning=starts_in_reasoning, parse_tools=False, constrained=True)
        assert out.content == answer and out.reasoning == ("why" if starts_in_reasoning else "")


def _strict_json(text: str):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("raw, expected", [("12345678901234567890", 12345678901234567890), ("1e400", float("inf")),
                                           ("-2E+999", float("-inf")), ("2.5e3", 2500.0)])
def test_a_number_parameter_is_kept_exactly_and_as_json(raw, expected):
    """A JSON number the grammar allows (any size) comes back as valid JSON with its value: an integer past a
    double's precision was rounded (12345678901234567168), one past its range was written as `Infinity`."""
    out = run([f"<tool_call>\n<function=get_weather>\n<parameter=temp>\n{raw}\n</parameter>\n</function>\n"
               "</tool_call>"])
    got = _strict_json(out.tool_calls[0].arguments)["temp"]
    assert got == expected and type(got) is type(expected)


def test_strip_tokens_for_both_tokenizer_kinds(tmp_path):
    """The demo tokenizer marks <think>/<tool_call> special; Qwen's own tokenizer adds them as non-special added
    tokens. Either way the markup reaches the parser and only the chat-control tokens are dropped."""
    from transformers import AutoTokenizer

    from deltaserve.demo import write_byte_tokenizer

    write_byte_tokenizer(tmp_path / "demo")
    demo = AutoTokenizer.from_pretrained(str(tmp_path / "demo"))
    qwen_like = _qwen_style(tmp_path / "qwen")
    for tok in (demo, qwen_like):
        strip = strip_tokens(tok)
        assert "<|im_end|>" in strip and "<think>" not in strip and "<tool_call>" not in strip
        text = "<think>" + "a</think>b<tool_call>\n<function=noop>\n</function>\n</tool_call><|im_end|>"
        decoded = tok.decode(tok.encode(text, add_special_tokens=False), skip_special_tokens=False)
        out = run([decoded[len("<think>"):]], starts_in_reasoning=True, strip=strip)
        assert (out.reasoning, out.content, out.tool_calls[0].name) == ("a", "b", "noop")


def _qwen_style(path):
    """A byte-level tokenizer where only <|...|> tokens are special, as in Qwen's tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.add_special_tokens({"additional_special_tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]})
    fast.add_tokens(["<think>", "</think>", "<tool_call>", "</tool_call>"], special_tokens=False)
    fast.eos_token = "<|im_end|>"
    fast.save_pretrained(path)
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(path))
    assert "<think>" not in loaded.all_special_tokens
    assert "<think>" in loaded.decode(loaded.encode("<think>", add_special_tokens=False), skip_special_tokens=True)
    return loaded


@pytest.mark.parametrize("text", [
    "<tool_call>\n<function=get_weather\n<parameter=city>\nRome\n</parameter>\n</function>\n</tool_call>",
    "<tool_call>\n<function=>\n</function>\n</tool_call>",
    "<tool_call>\n<function=get weather>\n</function>\n</tool_call>",
    '<tool_call>\n{"name": "noop", "arguments": [1, 2]}\n</tool_call>',
    '<tool_call>\n{"name": "noop", "arguments": "not json"}\n</tool_call>',
    '<tool_call>\n{"name": "", "arguments": {}}\n</tool_call>',
], ids=["header_without_close", "empty_name", "name_with_space", "args_array", "args_not_json", "json_empty_name"])
def test_malformed_call_headers_and_arguments_come_back_as_content(text):
    """A call whose function name could not be a name, or whose arguments are not a JSON object, is not a call:
    the client gets the model's text as content (never a call it cannot use), streamed or not."""
    one_shot = run(["Sure. " + text])
    assert one_shot.tool_calls == [] and one_shot.content == "Sure. " + text
    for chunks in splits("Sure. " + text, seed=1, trials=30):
        assert run(chunks) == one_shot


def test_parameters_referring_to_defs_are_typed_by_their_target():
    from tests.structured.schemas import PLACES

    text = ("<tool_call>\n<function=plan_trip>\n<parameter=start>\n{\"city\": \"Rome\", \"stars\": 4}\n</parameter>\n"
            "<parameter=mode>\ntrain\n</parameter>\n<parameter=back>\nnull\n</parameter>\n</function>\n</tool_call>")
    out = run([text], tools={"plan_trip": PLACES["function"]["parameters"]})
    assert json.loads(out.tool_calls[0].arguments) == {"start": {"city": "Rome", "stars": 4}, "mode": "train",
                                                       "back": None}


def test_parallel_tool_calls_false_keeps_the_first_call_only():
    """parallel_tool_calls=false (vLLM drops the calls after the first, as here): one call reaches the client,
    streamed or not, and the text around the calls is kept."""
    text = TOOL_TEXT + " after"
    one_shot = run([text], starts_in_reasoning=True, max_tool_calls=1)
    assert [c.name for c in one_shot.tool_calls] == ["get_weather"] and one_shot.content == "Let me check.after"
    assert json.loads(one_shot.tool_calls[0].arguments)["days"] == 3
    for chunks in splits(text, seed=3, trials=50):
        assert run(chunks, starts_in_reasoning=True, max_tool_calls=1) == one_shot


@pytest.mark.parametrize("header", ["<parameter=city\nParis\n</parameter>", "<parameter=>\nParis\n</parameter>"],
                         ids=["missing_close", "empty_name"])
def test_a_malformed_parameter_is_skipped_and_the_next_one_kept(header):
    """A parameter header that is not one (its '>' missing, its name empty) would make a key of the text up to the
    next '>' and swallow the parameter after it: it is skipped instead."""
    text = (f"<tool_call>\n<function=get_weather>\n{header}\n<parameter=days>\n3\n</parameter>\n</function>\n"
            "</tool_call>")
    one_shot = run([text])
    assert [(c.name, json.loads(c.arguments)) for c in one_shot.tool_calls] == [("get_weather", {"days": 3})]
    for chunks in splits(text, seed=4, trials=30):
        assert run(chunks) == one_shot


WRITE_FILE = {"write_file": {"type": "object", "properties": {"path": {"type": "string"},
                                                              "content": {"type": "string"},
                                                              "meta": {"type": "object"}}}}


@pytest.mark.parametrize("value", [
    "<a>x</parameter> y</a>",           # the tag inside a line
    "line 1\n</parameter>\nline 2",     # on a line of its own, as the format writes it, then more text
    "a </function> b </parameter>!",    # a literal </function> too
    "ends with the tag </parameter>",   # the last one before the real end
], ids=["inline", "own_line", "function_end", "at_the_end"])
def test_a_closing_tag_inside_a_string_value_is_text(value):
    """A value that holds the text "</parameter>" (an agent writing XML, or this very format) was cut at it and the
    rest dropped. A closing tag ends the value only where the format's next tag (<parameter=, </function>,
    </tool_call>) or the end of the output follows it, as vLLM's qwen3_coder parser decides; streamed or not."""
    text = ("<tool_call>\n<function=write_file>\n<parameter=content>\n" + value + "\n</parameter>\n"
            "<parameter=meta>\n{\"s\": \"</parameter>\", \"n\": 1}\n</parameter>\n<parameter=path>\na.xml\n"
            "</parameter>\n</function>\n</tool_call> after")
    one_shot = run([text], tools=WRITE_FILE)
    assert [(c.name, json.loads(c.arguments)) for c in one_shot.tool_calls] == [
        ("write_file", {"content": value, "meta": {"s": "</parameter>", "n": 1}, "path": "a.xml"})]
    assert one_shot.content == "after"
    for i, chunks in enumerate(splits(text, seed=5, trials=60)):
        assert run(chunks, tools=WRITE_FILE) == one_shot, f"split {i}: {chunks}"


@pytest.mark.parametrize("text, args", [
    ("<parameter=content>\nx\n</parameter>", {"content": "x"}),  # cut after the value: the tag closed it
    ("<parameter=content>\nx</parameter>y", {"content": "x</parameter>y"}),  # cut after literal text
    ("<parameter=content>\nx\n</function>\n</tool_call>", {"content": "x"}),  # </parameter> missing
    ("<parameter=content>\nx\n</function>", {"content": "x"}),
], ids=["cut_after_close", "cut_after_literal", "missing_close", "missing_close_cut"])
def test_where_a_value_ends_without_what_follows_its_tag(text, args):
    text = "<tool_call>\n<function=write_file>\n" + text
    one_shot = run([text], tools=WRITE_FILE)
    assert [json.loads(c.arguments) for c in one_shot.tool_calls] == [args] and one_shot.content == ""
    for chunks in splits(text, seed=6, trials=30):
        assert run(chunks, tools=WRITE_FILE) == one_shot


ANY_ARGS = {"write_file": {}}  # no schema: every parameter name is one the tool may have


@pytest.mark.parametrize("tools", [WRITE_FILE, ANY_ARGS], ids=["declared", "no_schema"])
@pytest.mark.parametrize("body, args", [
    # text after a closing tag on its own line, then the next parameter: the value ends where that one starts
    ("<parameter=content>\nx\n</parameter>\njunk\n<parameter=path>\na.xml\n</parameter>\n",
     {"content": "x\n</parameter>\njunk", "path": "a.xml"}),
    # the same with a parameter after it that closes properly
    ("<parameter=content>\nx\n</parameter>\njunk\n<parameter=path>\na.xml\n</parameter>\n<parameter=meta>\n{}\n"
     "</parameter>\n", {"content": "x\n</parameter>\njunk", "path": "a.xml", "meta": {}}),
    # </parameter> missing before the next parameter's line
    ("<parameter=content>\nx\n<parameter=path>\na.xml\n</parameter>\n", {"content": "x", "path": "a.xml"}),
    # a closing tag the format's next tag follows after all: it ends the value, which keeps the line-start header
    ("<parameter=content>\nx\n</parameter>\njunk\n<parameter=path>\na\n</parameter>\n</parameter>\n",
     {"content": "x\n</parameter>\njunk\n<parameter=path>\na\n</parameter>"}),
    # not on a line of its own, the header is text of the value (vLLM's qwen3coder_tool_parser reads it so too)
    ("<parameter=content>\nx</parameter> junk <parameter=path>a.xml</parameter>\n",
     {"content": "x</parameter> junk <parameter=path>a.xml"}),
], ids=["junk_line", "junk_line_then_more", "missing_close", "later_close_wins", "inline_junk"])
def test_text_after_a_closing_tag_does_not_swallow_the_next_parameter(tools, body, args):
    """A model that wrote text after a </parameter> (malformed markup) got the parameters after it swallowed into
    the value: the closing tag did not end it, and the next parameter's own </parameter> then did. As vLLM's
    qwen3coder_tool_parser does, a <parameter=NAME> at a line's start inside a value pairs with a </parameter>, and
    a value no closing tag ends stops at the first such header of a parameter the tool has; streamed or not."""
    text = "<tool_call>\n<function=write_file>\n" + body + "</function>\n</tool_call> after"
    one_shot = run([text], tools=tools)
    if tools is ANY_ARGS:
        args = {k: json.dumps(v) if isinstance(v, dict) else v for k, v in args.items()}
    assert [json.loads(c.arguments) for c in one_shot.tool_calls] == [args] and one_shot.content == "after"
    for i, chunks in enumerate(splits(text, seed=7, trials=60)):
        assert run(chunks, tools=tools) == one_shot, f"split {i}: {chunks}"


def test_a_header_of_a_parameter_the_tool_lacks_does_not_end_a_value():
    text = ("<tool_call>\n<function=write_file>\n<parameter=content>\nx\n</parameter>\njunk\n<parameter=typo>\n2\n"
            "</parameter>\n</function>\n</tool_call>")
    out = run([text], tools=WRITE_FILE)
    assert [json.loads(c.arguments) for c in out.tool_calls] == [
        {"content": "x\n</parameter>\njunk\n<parameter=typo>\n2\n</parameter>"}]
