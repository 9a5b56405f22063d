"""The official openai client against a live server: completions and chat, streaming and not, n > 1, logprobs,
usage, stop; streamed text equals non-streamed text for the same seed; greedy text equals LLM.generate."""

from __future__ import annotations

import math

import pytest

from deltaserve import SamplingParams
from tests.server.chat_model import NO_THINK_CHAT
from tests.server.conftest import MODEL_NAME

PROMPTS = ["Hello world", "The capital of France is", "def f(x):"]


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]


def test_completion_greedy_equals_llm_generate(client, reference):
    expected = reference.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    for prompt, ref in zip(PROMPTS, expected):
        out = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert out.choices[0].text == ref.outputs[0].text
        assert out.choices[0].finish_reason == "length"
        assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ref.prompt_token_ids), 12)
        assert out.usage.total_tokens == len(ref.prompt_token_ids) + 12


def test_completion_token_ids_and_several_prompts(client, reference):
    ids = [[72, 101, 108], [87, 111, 114, 108, 100]]
    expected = reference.generate([{"prompt_token_ids": p} for p in ids],
                                  SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    out = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=6, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert [c.index for c in out.choices] == [0, 1]
    assert [c.text for c in out.choices] == [r.outputs[0].text for r in expected]
    assert out.usage.prompt_tokens == 8 and out.usage.completion_tokens == 12


def test_allowed_token_ids_as_vllm_takes_them(client, reference):
    """vLLM's extra field: every sampled token is one of the ids, greedy or not, as LLM.generate gives them."""
    allowed = [72, 101, 108, 111]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, allowed_token_ids=allowed)
    expected = reference.generate([{"prompt_token_ids": [87, 111]}], params)[0].outputs[0]
    out = client.completions.create(model=MODEL_NAME, prompt=[[87, 111]], max_tokens=8, temperature=0,
                                    extra_body={"ignore_eos": True, "allowed_token_ids": allowed})
    assert out.choices[0].text == expected.text and set(expected.token_ids) <= set(allowed)
    chat = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=8, temperature=1.0, seed=3, logprobs=True,
                                          extra_body={"ignore_eos": True, "allowed_token_ids": allowed})
    assert {t.token for t in chat.choices[0].logprobs.content} <= {chr(i) for i in allowed}


def test_truncate_prompt_tokens_keeps_the_prompts_end(client, reference):
    """vLLM's field: the last k prompt tokens stay (token ids, text longer than the context, chat), as LLM.generate
    answers that end alone; echo returns what stayed."""
    ids = list(range(40, 100))
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    want = reference.generate([{"prompt_token_ids": ids[-9:]}], greedy)[0].outputs[0].text
    out = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=6, temperature=0,
                                    extra_body={"ignore_eos": True, "truncate_prompt_tokens": 9})
    assert out.choices[0].text == want and out.usage.prompt_tokens == 9
    text = "abc " * 600  # past the 512-token context: refused whole, kept at its end when truncated
    tail = reference.get_tokenizer().encode(text)[-20:]
    want = reference.generate([{"prompt_token_ids": tail}], greedy)[0].outputs[0].text
    out = client.completions.create(model=MODEL_NAME, prompt=text, max_tokens=6, temperature=0, echo=True,
                                    extra_body={"ignore_eos": True, "truncate_prompt_tokens": 20})
    assert out.choices[0].text == reference.get_tokenizer().decode(tail) + want and out.usage.prompt_tokens == 20
    chat = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": text}],
                                          max_tokens=4, temperature=0, extra_body={"truncate_prompt_tokens": 30})
    assert chat.usage.prompt_tokens == 30


def _stream_completion(client, **kw) -> tuple[dict[int, str], dict[int, str], object]:
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    usage = None
    for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    return texts, finish, usage


def test_completion_stream_equals_non_stream_same_seed(client):
    kw = dict(model=MODEL_NAME, prompt="Once upon a time", max_tokens=16, temperature=1.0, seed=1234, n=3)
    full = client.completions.create(**kw)
    texts, finish, usage = _stream_completion(client, **kw)
    assert texts == {c.index: c.text for c in full.choices}
    assert finish == {c.index: c.finish_reason for c in full.choices}
    assert usage.completion_tokens == full.usage.completion_tokens
    assert usage.prompt_tokens == full.usage.prompt_tokens == len("Once upon a time")
    assert len(set(texts.values())) > 1  # n samples with seed, seed + 1, ... differ


def test_chat_stream_equals_non_stream_same_seed(client):
    kw = dict(model=MODEL_NAME, messages=[{"role": "user", "content": "Tell me something"}], max_tokens=20,
              temperature=0.9, seed=7, n=2)
    full = client.chat.completions.create(**kw)
    content: dict[int, str] = {}
    reasoning: dict[int, str] = {}
    usage = None
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        usage = chunk.usage or usage
        for c in chunk.choices:
            content[c.index] = content.get(c.index, "") + (c.delta.content or "")
            reasoning[c.index] = reasoning.get(c.index, "") + (getattr(c.delta, "reasoning_content", None) or "")
    for c in full.choices:
        assert content[c.index] == (c.message.content or "")
        assert reasoning[c.index] == (getattr(c.message, "reasoning_content", None) or "")
    assert usage.completion_tokens == full.usage.completion_tokens
    assert usage.prompt_tokens == full.usage.prompt_tokens


def test_seed_reproduces_and_n_samples(client):
    kw = dict(model=MODEL_NAME, prompt="abc", max_tokens=10, temperature=1.0, seed=99, n=2,
              extra_body={"ignore_eos": True})
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.usage.completion_tokens == 20


def test_completion_logprobs(client):
    out = client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=5, temperature=0, logprobs=3,
                                    extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= 3 and chosen <= 0
        assert math.isclose(chosen, max(top.values()), abs_tol=1e-4)  # greedy picks the most likely


def test_chat_logprobs_and_usage(client):
    body = NO_THINK_CHAT.request()
    out = client.chat.completions.create(model=MODEL_NAME, max_tokens=10, temperature=0, logprobs=True,
                                         top_logprobs=2, messages=body["messages"],
                                         extra_body={"chat_template_kwargs": body["chat_template_kwargs"]})
    choice = out.choices[0]
    assert choice.message.content == "Hi!" and choice.finish_reason == "stop"
    entries = choice.logprobs.content
    assert bytes(b for e in entries[:3] for b in e.bytes).decode() == "Hi!"
    assert entries[-1].token == "<|im_end|>"  # the stop token is generated, so it has a logprob too
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
               for e in entries)
    assert out.usage.completion_tokens == len(entries) == 4


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings(client, reference, stream):
    ref = reference.generate(["Hello world"], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    text = ref[0].outputs[0].text
    stop = text[4:6]
    assert stop and stop not in text[:4]
    kw = dict(model=MODEL_NAME, prompt="Hello world", max_tokens=12, temperature=0, stop=[stop],
              extra_body={"ignore_eos": True})
    if stream:
        texts, finish, _ = _stream_completion(client, **kw)
        got, reason = texts[0], finish[0]
    else:
        out = client.completions.create(**kw)
        got, reason = out.choices[0].text, out.choices[0].finish_reason
    assert (got, reason) == (text[:4], "stop")


@pytest.mark.parametrize("stream", [False, True])
def test_min_tokens_defers_stop_strings(client, reference, stream):
    """As in vLLM, a stop string completed by one of the first min_tokens output tokens ends nothing: the first
    match that completes after output token min_tokens does."""
    ref = reference.generate(["Hello world"], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    ids, text = ref[0].outputs[0].token_ids, ref[0].outputs[0].text
    tok = reference.get_tokenizer()
    ends = [len(tok.decode(ids[:j + 1])) for j in range(len(ids))]  # text length after each output token
    stop, min_tokens = text[:2], 4
    matches = [i for i in range(len(text)) if text.startswith(stop, i)]
    assert matches[0] == 0 and len(matches) > 1, f"the test needs a stop string that recurs: {text!r}"
    first_counted = next(i for i in matches if next(j for j, e in enumerate(ends) if e >= i + len(stop)) + 1 >
                         min_tokens)
    kw = dict(model=MODEL_NAME, prompt="Hello world", max_tokens=16, temperature=0, stop=[stop],
              extra_body={"ignore_eos": True, "min_tokens": min_tokens})
    if stream:
        texts, finish, usage = _stream_completion(client, **kw)
        got, reason = texts[0], finish[0]
    else:
        out = client.completions.create(**kw)
        got, reason, usage = out.choices[0].text, out.choices[0].finish_reason, out.usage
    assert (got, reason) == (text[:first_counted], "stop")
    assert usage.completion_tokens >= min_tokens


def test_chat_max_completion_tokens_and_stop(client):
    body = NO_THINK_CHAT.request()
    kw = dict(model=MODEL_NAME, messages=body["messages"], temperature=0,
              extra_body={"chat_template_kwargs": body["chat_template_kwargs"]})
    cut = client.chat.completions.create(max_completion_tokens=2, **kw)
    assert (cut.choices[0].message.content, cut.choices[0].finish_reason) == ("Hi", "length")
    stopped = client.chat.completions.create(stop=["!"], **kw)
    assert (stopped.choices[0].message.content, stopped.choices[0].finish_reason) == ("Hi", "stop")
