"""OpenAI / vLLM compatibility (issue 20, items 2-5, 7, 14): continuous usage stats, models.retrieve, HEAD /health,
reasoning fields and usage details, logprobs 0, vLLM-named metrics, request ids and what /v1/models reveals."""

from __future__ import annotations

import asyncio
import json
import shutil
import time

import httpx
import pytest

from tests.server.chat_model import NO_THINK_CHAT, THINK_CHAT
from tests.server.conftest import (API_KEY, MODEL_NAME, ServerProcess, completion_logprobs, engine_stats,
                                  metric_value)

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"


def _events(r: httpx.Response) -> list[dict]:
    return [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]


@pytest.mark.parametrize("route,body", [
    (COMPLETIONS, {"prompt": "abc", "max_tokens": 6, "n": 2, "ignore_eos": True}),
    (CHAT, {**NO_THINK_CHAT.request(), "max_tokens": 6, "temperature": 0})])
def test_continuous_usage_stats_puts_usage_on_every_chunk(http, route, body):
    r = http.post(route, json={**body, "stream": True,
                               "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    events = _events(r)
    assert r.status_code == 200 and len(events) >= 3
    final = events[-1]
    assert final["choices"] == [] and final["usage"]["completion_tokens"] > 0
    seen: dict[int, list[int]] = {}  # as vLLM: each chunk counts its own choice's tokens so far
    for e in events[:-1]:  # every chunk, the role chunk included
        [choice] = e["choices"]
        seen.setdefault(choice["index"], []).append(e["usage"]["completion_tokens"])
    assert len(seen) == body.get("n", 1) and all(counts == sorted(counts) for counts in seen.values())
    assert sum(counts[-1] for counts in seen.values()) == final["usage"]["completion_tokens"]
    assert all(e["usage"]["prompt_tokens"] == final["usage"]["prompt_tokens"] for e in events)
    plain = _events(http.post(route, json={**body, "stream": True}))  # without stream_options: no usage anywhere
    assert all("usage" not in e for e in plain)


def test_models_retrieve_and_head_health(client, http):
    import openai

    model = client.models.retrieve(MODEL_NAME)
    assert (model.id, model.object, model.owned_by) == (MODEL_NAME, "model", "deltaserve")
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-9")
    assert e.value.body["code"] == "model_not_found"
    head = http.head("/health")
    assert head.status_code == 200 and head.content == b""


@pytest.mark.parametrize("route,body", [(COMPLETIONS, {"prompt": "abc"}), (CHAT, NO_THINK_CHAT.request()),
                                        ("/v1/tokenize", {"prompt": "abc"})])
def test_an_empty_model_name_means_the_served_model(http, route, body):
    """vLLM serves a request whose 'model' is empty with its model, as it does one without the field (clients with
    an unset model setting send ""); it was a 404 "the model '' does not exist"."""
    r = http.post(route, json={**body, "model": "", "max_tokens": 2})
    assert r.status_code == 200, r.text
    if route != "/v1/tokenize":
        assert r.json()["model"] == MODEL_NAME
    assert http.get("/v1/models/").status_code == 404


def test_models_do_not_reveal_the_model_path(http, chat_ckpt):
    text = http.get("/v1/models").text + http.get(f"/v1/models/{MODEL_NAME}").text
    assert str(chat_ckpt) not in text and chat_ckpt.name not in text
    assert http.get("/v1/models").json()["data"][0]["root"] == MODEL_NAME


def _reasoning_tokens(chat_ckpt) -> int:
    """THINK_CHAT's reasoning tokens: generated while the block was open, the closing tag (one special token here)
    included."""
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(str(chat_ckpt)).encode("Greet them.\n</think>"))


def test_reasoning_fields_and_usage_details(client, http, chat_ckpt):
    think = client.chat.completions.create(model=MODEL_NAME, messages=THINK_CHAT.request()["messages"],
                                           max_tokens=50, temperature=0)
    message = think.choices[0].message
    assert message.content == "Hello there!"
    assert message.reasoning_content == message.reasoning == "Greet them."
    assert think.usage.completion_tokens_details.reasoning_tokens == _reasoning_tokens(chat_ckpt) == 13
    assert 0 <= think.usage.prompt_tokens_details.cached_tokens < think.usage.prompt_tokens
    raw = http.post(CHAT, json={**NO_THINK_CHAT.request(), "max_tokens": 10, "temperature": 0}).json()
    msg = raw["choices"][0]["message"]
    assert msg["content"] == "Hi!" and "reasoning_content" in msg and msg["reasoning_content"] is None
    assert "reasoning" in msg and msg["reasoning"] is None
    assert raw["usage"]["completion_tokens_details"] == {"reasoning_tokens": 0}


def test_streamed_deltas_always_carry_reasoning_fields(http, chat_ckpt):
    r = http.post(CHAT, json={**THINK_CHAT.request(), "max_tokens": 50, "temperature": 0, "stream": True,
                              "stream_options": {"include_usage": True}})
    events = _events(r)
    deltas = [c["delta"] for e in events for c in e["choices"]]
    assert deltas and all("reasoning_content" in d and "reasoning" in d for d in deltas)
    assert all(d["reasoning_content"] == d["reasoning"] for d in deltas)
    assert "".join(d["reasoning_content"] or "" for d in deltas) == "Greet them."
    assert "".join(d.get("content") or "" for d in deltas) == "Hello there!"
    assert events[-1]["usage"]["completion_tokens_details"]["reasoning_tokens"] == _reasoning_tokens(chat_ckpt)


@pytest.mark.parametrize("stream", [False, True])
def test_completion_logprobs_zero_gives_the_sampled_token(http, stream):
    body = {"prompt": "Hello", "max_tokens": 5, "temperature": 0, "logprobs": 0, "ignore_eos": True, "stream": stream}
    tokens, chosen, tops = completion_logprobs(http.post(COMPLETIONS, json=body), stream)
    assert len(tokens) == len(tops) == 5
    assert tops == [{token: lp} for token, lp in zip(tokens, chosen)]


@pytest.mark.parametrize("route,body,nulls", [
    (COMPLETIONS, {"prompt": "abc", "max_tokens": 3}, ("n", "stream", "echo")),
    (CHAT, {**NO_THINK_CHAT.request(), "max_tokens": 3}, ("n", "stream", "logprobs"))])
def test_null_means_the_default_where_openai_allows_null(client, http, route, body, nulls):
    """OpenAI's API reference types n, stream, chat's logprobs and completions' echo as "... or null" (vLLM takes
    null too), and the OpenAI SDK sends null for an argument given as None: a 400 broke such clients."""
    body = {**body, "temperature": 0}
    with_nulls = http.post(route, json={**body, **dict.fromkeys(nulls)})
    assert with_nulls.status_code == 200, with_nulls.text
    assert with_nulls.json()["choices"] == http.post(route, json=body).json()["choices"]
    out = client.chat.completions.create(model=MODEL_NAME, messages=NO_THINK_CHAT.request()["messages"], n=None,
                                         stream=None, logprobs=None, max_tokens=3)
    assert len(out.choices) == 1 and out.choices[0].logprobs is None


def test_vllm_named_metrics(http):
    before = engine_stats(http)
    stops = metric_value(http, "request_success_total", finished_reason="length")
    r = http.post(COMPLETIONS, json={"prompt": "abcd", "max_tokens": 5, "n": 2, "ignore_eos": True})
    assert r.status_code == 200
    after = engine_stats(http)
    assert metric_value(http, "request_success_total", finished_reason="length") == stops + 2
    assert 0 <= after["kv_cache_usage_perc"] <= 1
    assert after["prompt_tokens_total"] - before["prompt_tokens_total"] == 4  # the n samples share one prompt
    assert after["generation_tokens_total"] - before["generation_tokens_total"] == 10
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                 "request_prefill_time_seconds", "request_decode_time_seconds", "request_inference_time_seconds",
                 "request_prompt_tokens", "request_generation_tokens"):
        assert after[f"{name}_count"] == before.get(f"{name}_count", 0) + 1, name
    assert after["request_generation_tokens_sum"] - before.get("request_generation_tokens_sum", 0) == 10
    assert after["inter_token_latency_seconds_count"] - before.get("inter_token_latency_seconds_count", 0) == 2 * 4
    text = http.get("/metrics").text
    assert f'deltaserve_request_success_total{{finished_reason="length",model_name="{MODEL_NAME}"}}' in text or \
        f'deltaserve_request_success_total{{model_name="{MODEL_NAME}",finished_reason="length"}}' in text
    assert f'deltaserve_kv_cache_usage_perc{{model_name="{MODEL_NAME}"}}' in text


def test_mtp_metrics_carry_vllms_names():
    """vLLM's dashboards read the acceptance length as 1 + num_accepted_tokens / num_drafts: both exist, per request-
    step (the first position's draft count), beside the per-position counters."""
    from deltaserve.server.metrics import ServerMetrics

    stats = {"spec_draft_tokens": 9, "spec_accepted_tokens": 5, "spec_verify_steps": 2, "spec_drafted_pos_0": 3,
             "spec_drafted_pos_1": 3, "spec_drafted_pos_2": 3, "spec_accepted_pos_0": 3, "spec_accepted_pos_1": 2,
             "spec_accepted_pos_2": 0, "spec_graph_plain_steps": 4}
    text = ServerMetrics("m").render(stats).decode()
    assert 'deltaserve_spec_decode_num_drafts_total{model_name="m"} 3.0' in text
    assert 'deltaserve_spec_decode_num_graph_plain_steps_total{model_name="m"} 4.0' in text
    assert 'deltaserve_spec_decode_num_accepted_tokens_total{model_name="m"} 5.0' in text


def test_every_response_carries_a_request_id(http):
    ok = http.get("/health")
    bad = http.post(COMPLETIONS, json={"prompt": "hi", "temperature": -1})
    ids = {ok.headers["x-request-id"], bad.headers["x-request-id"]}
    assert len(ids) == 2 and all(i.startswith("req-") for i in ids)
    echoed = http.post(COMPLETIONS, json={"prompt": "hi", "max_tokens": 1}, headers={"X-Request-Id": "client-42"})
    assert echoed.headers["x-request-id"] == "client-42"
    unsafe = http.get("/health", headers={"X-Request-Id": "a b\tc"})  # not a token: replaced, never echoed
    assert unsafe.headers["x-request-id"].startswith("req-")


async def _max_gap_while(c: httpx.AsyncClient, during) -> tuple[float, list[httpx.Response], float]:
    """Stream greedily while `during` runs; returns the stream's longest pause between chunks, during's
    responses, and how long they took."""
    body = {"prompt": "Once", "max_tokens": 200, "temperature": 0, "ignore_eos": True, "stream": True}
    gaps: list[float] = []
    started = asyncio.Event()

    async def stream() -> None:
        last = None
        async with c.stream("POST", COMPLETIONS, json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    now = time.monotonic()
                    if last is not None:
                        gaps.append(now - last)
                    last = now
                    started.set()

    task = asyncio.create_task(stream())
    await started.wait()
    t0 = time.monotonic()
    responses = await during(c)
    took = time.monotonic() - t0
    await task
    return max(gaps), responses, took


def test_huge_prompts_are_refused_early_and_off_the_event_loop(server):
    """Item 10: a 12 MB text prompt is refused for its length after tokenizing a prefix (whole, it took ~20 s
    here); a 1.6M-token id list is parsed and checked on a worker thread; a stream running meanwhile keeps going."""
    text_body = json.dumps({"prompt": "hello world " * 1_000_000, "max_tokens": 5}).encode()
    ids_body = json.dumps({"prompt": list(range(32, 127)) * 17_000, "max_tokens": 5}).encode()

    async def during(c: httpx.AsyncClient) -> list[httpx.Response]:
        return [await c.post(COMPLETIONS, content=body, headers={"Content-Type": "application/json"})
                for body in (text_body, ids_body)]

    async def main():
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=120) as c:
            return await _max_gap_while(c, during)

    max_gap, (text_r, ids_r), took = asyncio.run(main())
    for r in (text_r, ids_r):
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text[:300]
    assert "at least" in text_r.json()["error"]["message"]  # counted on a prefix, not the whole text
    assert took < 10 and max_gap < 2.0, (took, max_gap)  # before: ~20 s of tokenizing, streams frozen


@pytest.mark.parametrize("stream", [False, True])
def test_echo_with_logprobs_scores_the_prompt(http, reference, stream):
    """Item 1: echo + logprobs returns the prompt tokens' logprobs first (the first one null), then the generated
    tokens', streamed and not; the values are the engine's own prompt logprobs."""
    from deltaserve import SamplingParams

    prompt = [5, 17, 42, 9, 100, 7]
    body = {"prompt": prompt, "max_tokens": 3, "temperature": 0, "logprobs": 2, "echo": True, "ignore_eos": True,
            "stream": stream}
    r = http.post(COMPLETIONS, json=body)
    assert r.status_code == 200, r.text
    if stream:
        chunks = [c for e in _events(r) for c in e["choices"]]
        pieces = [c["logprobs"] for c in chunks if c["logprobs"]]
        text = "".join(c["text"] for c in chunks)
    else:
        choice = r.json()["choices"][0]
        pieces, text = [choice["logprobs"]], choice["text"]
    merged = {k: [v for p in pieces for v in p[k]] for k in ("tokens", "token_logprobs", "top_logprobs",
                                                                "text_offset")}
    assert len(merged["tokens"]) == len(prompt) + 3
    assert merged["token_logprobs"][0] is None and merged["top_logprobs"][0] is None
    assert all(isinstance(v, float) for v in merged["token_logprobs"][1:])
    assert all(len(t) <= 3 for t in merged["top_logprobs"][1:])  # 2 alternatives (+ the token itself if not in them)
    assert merged["text_offset"] == sorted(merged["text_offset"])
    assert text.startswith("".join(merged["tokens"][:len(prompt)]))
    ref = reference.generate([prompt], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True,
                                                      prompt_logprobs=2))[0]
    expected = [None] + [e.logprob for e in ref.prompt_logprobs[1:]]
    got = merged["token_logprobs"][:len(prompt)]
    assert got[0] is None and all(abs(a - b) < 1e-4 for a, b in zip(got[1:], expected[1:]))


def test_prefix_cache_serves_a_shared_system_prompt_and_the_previous_turn(http):
    """A second conversation with the same system prompt resumes after it (the server marks where it ends); the
    next turn of a conversation resumes after the previous turn's prompt. usage reports the cached tokens, and
    /metrics the hit rate."""
    system = {"role": "system", "content": "You are a careful assistant for a test suite. " * 8}

    def chat(messages):
        r = http.post(CHAT, json={"messages": messages, "max_tokens": 4, "temperature": 0,
                                  "chat_template_kwargs": {"enable_thinking": False}})
        assert r.status_code == 200, r.text
        return r.json()

    first = chat([system, {"role": "user", "content": "First question, about apples."}])
    second = chat([system, {"role": "user", "content": "Another one, about pears and plums."}])
    system_only = http.post("/v1/tokenize", json={"messages": [system], "add_generation_prompt": False}).json()
    # the point is where conversations opening with this system prompt part: after it and the next turn's header
    user_header = http.post("/v1/tokenize", json={"prompt": "<|im_start|>user\n"}).json()
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == system_only["count"] + user_header["count"]
    history = [system, {"role": "user", "content": "First question, about apples."},
               {"role": "assistant", "content": first["choices"][0]["message"]["content"]},
               {"role": "user", "content": "And a follow-up."}]
    third = chat(history)
    first_history = http.post("/v1/tokenize", json={"messages": history[:2], "add_generation_prompt": False}).json()
    assert third["usage"]["prompt_tokens_details"]["cached_tokens"] == first_history["count"]
    metrics = http.get("/metrics").text
    assert "deltaserve_prefix_cache_hit_rate" in metrics and "deltaserve_prefix_cache_checkpoints_used" in metrics


def test_generation_config_sampling_defaults_apply_to_requests_that_leave_them_out(chat_ckpt, tmp_path):
    """vLLM (--generation-config auto, its default) takes temperature, top_p, top_k, min_p and repetition_penalty
    from the checkpoint's generation_config.json for requests that do not set them: Qwen3.5 ships its recommended
    sampling there. With top_k 1 every such request is greedy, whatever its seed; one that sets top_k is not."""
    model = tmp_path / "model"
    shutil.copytree(chat_ckpt, model)
    gen = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**gen, "top_k": 1, "temperature": 1.0}))
    srv = ServerProcess(model, tmp_path / "server.log")
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            for route, body in ((COMPLETIONS, {"prompt": "abc", "ignore_eos": True}),
                                (CHAT, {**NO_THINK_CHAT.request(), "ignore_eos": True})):
                body = {**body, "max_tokens": 24}

                def text(extra: dict) -> str:
                    r = http.post(route, json={**body, **extra})
                    assert r.status_code == 200, r.text
                    choice = r.json()["choices"][0]
                    return choice["text"] if route == COMPLETIONS else choice["message"]["content"]

                greedy = text({"temperature": 0})
                assert [text({"seed": s}) for s in range(4)] == [greedy] * 4
                assert any(text({"seed": s, "top_k": -1}) != greedy for s in range(4)), "the request's top_k wins"
    finally:
        srv.stop()


def test_generation_config_values_the_sampler_refuses_are_left_out(tmp_path):
    from deltaserve.sampling_params import generation_defaults

    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.6, "top_p": 0, "top_k": 20, "min_p": "x", "do_sample": True, "max_new_tokens": 5}))
    assert generation_defaults(str(tmp_path)) == {"temperature": 0.6, "top_k": 20}
    (tmp_path / "generation_config.json").write_text("{not json")
    assert generation_defaults(str(tmp_path)) == {} and generation_defaults(None) == {}
