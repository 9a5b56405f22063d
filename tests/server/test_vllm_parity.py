"""Response details where this server follows vLLM and OpenAI: finish_reason of a forced tool call, stop_reason on
the end token, the legacy completions top_logprobs, when continuous usage stats are sent, vLLM's prompt_logprobs,
return_tokens_as_token_ids, continue_final_message and bad_words."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.server.chat_model import NO_THINK_CHAT, TOOL_CHAT
from tests.server.conftest import completion_logprobs

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
IM_END = 258  # <|im_end|>, one of the chat model's end tokens (generation_config eos_token_id)


def _events(r: httpx.Response) -> list[dict]:
    assert r.status_code == 200, r.text
    return [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]


def _finals(r: httpx.Response, stream: bool) -> list[dict]:
    """The choices that carry a finish_reason: the response's, or the streamed chunks'."""
    if not stream:
        assert r.status_code == 200, r.text
        return r.json()["choices"]
    return [c for e in _events(r) for c in e["choices"] if c["finish_reason"] is not None]


@pytest.mark.parametrize("stream", [False, True])
def test_forced_named_tool_call_ends_with_stop(http, stream):
    """OpenAI and vLLM: "tool_calls" when the model chose to call a tool, "stop" when tool_choice named it."""
    body = {**TOOL_CHAT.request(), "max_tokens": 200, "temperature": 0, "stream": stream}
    named = {"type": "function", "function": {"name": "get_weather"}}
    forced = _finals(http.post(CHAT, json={**body, "tool_choice": named}), stream)
    chosen = _finals(http.post(CHAT, json=body), stream)
    assert [c["finish_reason"] for c in forced] == ["stop"]
    assert [c["finish_reason"] for c in chosen] == ["tool_calls"]
    if not stream:
        assert forced[0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"


@pytest.mark.parametrize("stream", [False, True])
def test_stop_reason_is_null_on_the_end_token(http, stream):
    """stop_reason names a stop the request asked for; ending on the model's end token gives null (vLLM)."""
    body = {**NO_THINK_CHAT.request(), "max_tokens": 10, "temperature": 0, "stream": stream}
    plain = _finals(http.post(CHAT, json=body), stream)
    asked = _finals(http.post(CHAT, json={**body, "stop_token_ids": [IM_END]}), stream)
    assert [(c["finish_reason"], c["stop_reason"]) for c in plain] == [("stop", None)]
    assert [(c["finish_reason"], c["stop_reason"]) for c in asked] == [("stop", IM_END)]


@pytest.mark.parametrize("stream", [False, True])
def test_completion_top_logprobs_include_the_sampled_token(http, stream):
    """logprobs=k: each token's top_logprobs holds its k alternatives and the sampled token itself, so k + 1
    entries when the sample was not among the k (OpenAI's legacy API, vLLM)."""
    body = {"prompt": "Hello", "max_tokens": 40, "temperature": 2.0, "seed": 3, "logprobs": 1, "ignore_eos": True,
            "stream": stream}
    tokens, chosen, tops = completion_logprobs(http.post(COMPLETIONS, json=body), stream)
    assert len(tokens) == len(tops) == 40
    unlikely = 0
    for token, logprob, top in zip(tokens, chosen, tops):
        assert token in top and top[token] == logprob and 1 <= len(top) <= 2
        if logprob < max(top.values()):  # sampled below the most likely token: both are listed
            unlikely += 1
            assert len(top) == 2
    assert unlikely > 0, "the test needs a sample outside the top 1; raise the temperature or change the seed"


@pytest.mark.parametrize("route,body", [
    (COMPLETIONS, {"prompt": "abc", "max_tokens": 6, "n": 2, "ignore_eos": True}),
    (CHAT, {**NO_THINK_CHAT.request(), "max_tokens": 6, "temperature": 0})])
def test_continuous_usage_stats_needs_include_usage(http, route, body):
    """vLLM sends per-chunk usage only when include_usage is on too; continuous_usage_stats alone sends none."""
    events = _events(http.post(route, json={**body, "stream": True,
                                            "stream_options": {"continuous_usage_stats": True}}))
    assert events and all("usage" not in e for e in events)


@pytest.mark.parametrize("route,body", [
    (COMPLETIONS, {"prompt": "abc", "max_tokens": 6, "n": 2, "ignore_eos": True}),
    (CHAT, {**NO_THINK_CHAT.request(), "max_tokens": 6, "temperature": 0})])
def test_include_usage_puts_a_null_usage_on_every_other_chunk(http, route, body):
    """OpenAI's stream_options.include_usage: the last chunk (no choices) has the usage, every other chunk a
    usage field that is null."""
    events = _events(http.post(route, json={**body, "stream": True, "stream_options": {"include_usage": True}}))
    assert len(events) > 2 and all("usage" in e for e in events)
    assert all(e["usage"] is None and e["choices"] for e in events[:-1])
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize("stream", [False, True])
def test_echo_with_max_tokens_zero_returns_the_scored_prompt(http, stream):
    """OpenAI's legacy API and vLLM: echo with max_tokens=0 scores the prompt and generates nothing."""
    prompt = "Hello world"
    body = {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1, "stream": stream,
            "stream_options": {"include_usage": True} if stream else None}
    r = http.post(COMPLETIONS, json=body)
    if stream:
        events = _events(r)
        chunks = [c for e in events for c in e["choices"]]
        text, usage = "".join(c["text"] for c in chunks), events[-1]["usage"]
        pieces = [c["logprobs"] for c in chunks if c["logprobs"]]
    else:
        assert r.status_code == 200, r.text
        chunks, usage = r.json()["choices"], r.json()["usage"]
        text, pieces = chunks[0]["text"], [chunks[0]["logprobs"]]
    tokens = [t for p in pieces for t in p["tokens"]]
    assert text == prompt and "".join(tokens) == prompt and len(tokens) == usage["prompt_tokens"]
    assert [c["finish_reason"] for c in chunks if c["finish_reason"]] == ["length"]
    assert usage["completion_tokens"] == 0


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_logprobs_as_vllm_answers_them(http, reference, stream):
    """vLLM's prompt_logprobs on completions (per choice; streamed with the first chunk that has them) and chat (the
    response's, not streamed): per prompt token, null first, then {"id": {logprob, rank, decoded_token}} for the
    token and its k most likely alternatives (ranks 1..k), the token's logprob and rank as LLM.generate scores it."""
    from deltaserve import SamplingParams

    ids = [87, 111, 114, 108, 100, 33]
    want = reference.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0, max_tokens=2,
                                                                            prompt_logprobs=2))[0].prompt_logprobs
    body = {"prompt": ids, "max_tokens": 2, "temperature": 0, "prompt_logprobs": 2, "stream": stream}
    r = http.post(COMPLETIONS, json=body)
    if stream:
        got = [c["prompt_logprobs"] for e in _events(r) for c in e["choices"] if "prompt_logprobs" in c]
        assert len(got) == 1
        got = got[0]
    else:
        assert r.status_code == 200, r.text
        got = r.json()["choices"][0]["prompt_logprobs"]
    assert len(got) == len(ids) and got[0] is None
    for token_id, entry, ref in zip(ids[1:], got[1:], want[1:]):
        mine = entry[str(token_id)]
        assert abs(mine["logprob"] - ref.logprob) < 1e-4 and mine["rank"] == ref.rank
        assert sorted(entry[str(t)]["rank"] for t, _ in ref.top) == [1, 2]
        assert len(entry) == 2 + (ref.rank > 2)
    if not stream:
        chat = http.post(CHAT, json={**NO_THINK_CHAT.request(), "max_tokens": 2, "prompt_logprobs": 0})
        assert chat.status_code == 200, chat.text
        scored = chat.json()["prompt_logprobs"]
        assert len(scored) == chat.json()["usage"]["prompt_tokens"] and scored[0] is None
        assert all(len(e) == 1 and next(iter(e.values()))["rank"] >= 1 for e in scored[1:])


def test_return_tokens_as_token_ids_names_logprob_tokens_by_id(http):
    """vLLM's field: every token a logprobs answer names (sampled, alternatives, the echoed prompt's) reads
    "token_id:{id}", the same tokens as the plain answer names by their text."""
    ids = [87, 111, 114]
    body = {"prompt": ids, "max_tokens": 3, "temperature": 0, "logprobs": 2, "echo": True}
    plain = http.post(COMPLETIONS, json=body).json()["choices"][0]["logprobs"]
    named = http.post(COMPLETIONS, json={**body, "return_tokens_as_token_ids": True}).json()["choices"][0]["logprobs"]
    assert named["tokens"][:3] == [f"token_id:{t}" for t in ids] and len(named["tokens"]) == len(plain["tokens"])
    assert all(k.startswith("token_id:") for top in named["top_logprobs"][1:] for k in top)
    assert named["token_logprobs"] == plain["token_logprobs"]
    chat = {**NO_THINK_CHAT.request(), "max_tokens": 3, "temperature": 0, "logprobs": True, "top_logprobs": 1}
    content = http.post(CHAT, json={**chat, "return_tokens_as_token_ids": True}).json()["choices"][0]["logprobs"]
    tokens = [c["token"] for c in content["content"]] + [t["token"] for c in content["content"] for t in
                                                           c["top_logprobs"]]
    assert tokens and all(t.startswith("token_id:") and t[9:].isdigit() for t in tokens)


def test_continue_final_message_continues_the_last_message(http, reference):
    """vLLM's field (with add_generation_prompt false): the prompt ends inside the last message, its end-of-turn
    token cut, and the model continues it; /v1/tokenize renders the same prompt. Both flags at once: a 400."""
    from deltaserve import SamplingParams

    msgs = [{"role": "user", "content": "Say hello"}, {"role": "assistant", "content": "Hello, wor"}]
    body = {"messages": msgs, "add_generation_prompt": False, "continue_final_message": True}
    ids = http.post("/v1/tokenize", json=body).json()["tokens"]
    plain = http.post("/v1/tokenize", json={"messages": msgs, "add_generation_prompt": False}).json()["tokens"]
    assert reference.get_tokenizer().decode(ids).endswith("Hello, wor")
    assert len(ids) < len(plain) and ids == plain[:len(ids)]  # the plain render goes on past the content
    want = reference.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0, max_tokens=5,
                                                                            ignore_eos=True))[0].outputs[0]
    r = http.post(CHAT, json={**body, "max_tokens": 5, "temperature": 0, "ignore_eos": True, "logprobs": True,
                              "return_tokens_as_token_ids": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(ids)
    assert [c["token"] for c in r.json()["choices"][0]["logprobs"]["content"]] == \
        [f"token_id:{t}" for t in want.token_ids]
    both = http.post(CHAT, json={**body, "add_generation_prompt": True})
    assert both.status_code == 400 and both.json()["error"]["param"] == "continue_final_message"


@pytest.mark.parametrize("stream", [False, True])
def test_chat_echo_starts_the_content_with_the_continued_message(http, stream):
    """vLLM's chat echo: with continue_final_message the reply's content is the last message's text and then the
    continuation (streamed first, before any token); a last message of another role than the reply's adds nothing."""
    msgs = [{"role": "user", "content": "Say hello"}, {"role": "assistant", "content": "Hello, wor"}]
    body = {"messages": msgs, "add_generation_prompt": False, "continue_final_message": True, "max_tokens": 5,
            "temperature": 0, "ignore_eos": True, "stream": stream}

    def content(**extra) -> str:
        r = http.post(CHAT, json={**body, **extra})
        assert r.status_code == 200, r.text
        if not stream:
            return r.json()["choices"][0]["message"]["content"]
        deltas = [e["choices"][0]["delta"] for e in _events(r) if e.get("choices")]
        if extra.get("echo") and extra.get("add_generation_prompt") is None:
            assert deltas[1]["content"] == "Hello, wor"  # the chunk after the role's
        return "".join(d.get("content") or "" for d in deltas)

    plain = content()
    assert content(echo=True) == "Hello, wor" + plain
    user_last = {"messages": msgs[:1], "add_generation_prompt": True, "continue_final_message": False}
    assert content(echo=True, **user_last) == content(**user_last)


@pytest.mark.parametrize("stream", [False, True])
def test_reply_role_is_the_continued_messages_with_add_generation_prompt_false(http, stream):
    """vLLM's rule: a reply that opens an assistant turn has the assistant's role; with add_generation_prompt false
    the output continues the last message, so the reply carries that message's role (streamed: the first chunk)."""
    def role(msgs: list[dict], add: bool) -> str:
        r = http.post(CHAT, json={"messages": msgs, "add_generation_prompt": add, "max_tokens": 2,
                                  "temperature": 0, "stream": stream})
        assert r.status_code == 200, r.text
        if stream:
            return next(e for e in _events(r) if e.get("choices"))["choices"][0]["delta"]["role"]
        return r.json()["choices"][0]["message"]["role"]

    user = [{"role": "user", "content": "Say hello"}]
    assert role(user, True) == "assistant"
    assert role(user, False) == "user"
    assert role(user + [{"role": "assistant", "content": "Hel"}], False) == "assistant"


def test_bad_words_as_vllm_bans_them(http, reference):
    """vLLM's field: the word is tokenized (as written and after a space); its last token is never sampled right
    after the rest of it, so a greedy output that would complete the word takes another token there, and the
    output before it is unchanged."""
    from deltaserve import SamplingParams

    ids = [87, 111, 114, 108, 100]
    greedy = dict(temperature=0, max_tokens=6, ignore_eos=True)
    out = reference.generate([{"prompt_token_ids": ids}], SamplingParams(**greedy))[0].outputs[0].token_ids
    tok = reference.get_tokenizer()
    word = tok.decode(out[1:3])
    assert tok.encode(word.lstrip(), add_special_tokens=False) == out[1:3]  # the byte tokenizer maps it back

    def tokens(body: dict) -> list[int]:
        r = http.post(COMPLETIONS, json={"prompt": ids, **greedy, "logprobs": 0, "return_tokens_as_token_ids": True,
                                         **body})
        assert r.status_code == 200, r.text
        return [int(t[9:]) for t in r.json()["choices"][0]["logprobs"]["tokens"]]

    assert tokens({}) == out
    banned = tokens({"bad_words": [word]})
    assert banned[:2] == out[:2] and banned[2] != out[2]
