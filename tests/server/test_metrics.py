"""/metrics against what happened, on the demo model in this process: finish reasons (an engine failure too),
token totals with n > 1, the latency histograms' counts, vLLM's older TPOT name, and Prometheus text format."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from deltaserve.demo import SHIPPED_DEMO_DIR


@pytest.fixture(scope="module")
def faulty_app():
    """The real engine; its runner fails the next step when `fail` is set (the step's requests end with 'error')."""
    from deltaserve.config import EngineArgs
    from deltaserve.engine.async_engine import AsyncLLM
    from deltaserve.server.app import build_app
    from deltaserve.server.args import ServerConfig

    engine = AsyncLLM(EngineArgs(model=str(SHIPPED_DEMO_DIR), device="cpu", dtype="float32", max_model_len=512))
    runner = engine.engine.runner
    real_launch = runner.launch
    fail = threading.Event()

    def launch(*args, **kwargs):
        if fail.is_set():
            fail.clear()
            raise RuntimeError("injected device fault")
        return real_launch(*args, **kwargs)

    runner.launch = launch
    app = build_app(engine, ServerConfig(served_model_names=("m",)), shutdown_engine=False)
    yield app, fail
    engine.shutdown()


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample, keyed by name and labels other than model_name; parsing rejects malformed exposition text."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            assert s.labels.get("model_name") == "m", s
            out[s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))] = s.value
    return out


def _run(app, body: dict) -> tuple[httpx.Response, dict[str, float]]:
    """POST body to /v1/completions; returns the response and how each sample changed."""
    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as c:
            before = _samples((await c.get("/metrics")).text)
            r = await c.post("/v1/completions", json=body)
            after = _samples((await c.get("/metrics")).text)
            return r, {name + "".join(f"[{v}]" for _, v in labels): value - before.get((name, labels), 0.0)
                       for (name, labels), value in after.items()}
    return asyncio.run(main())


def test_n_samples_counted_per_sequence_and_per_request(faulty_app):
    app, _ = faulty_app
    r, d = _run(app, {"prompt": "def f", "max_tokens": 4, "n": 3, "ignore_eos": True, "temperature": 1,
                      "stream": True})
    assert r.status_code == 200 and r.text.rstrip().endswith("[DONE]")
    assert d["deltaserve_request_success_total[length]"] == 3
    assert d["deltaserve_prompt_tokens_total"] == 2  # the prompt is computed once for its 3 samples
    assert d["deltaserve_generation_tokens_total"] == 12
    assert d["deltaserve_request_generation_tokens_sum"] == 12 and d["deltaserve_request_generation_tokens_count"] == 1
    assert d["deltaserve_request_max_num_generation_tokens_sum"] == 4
    assert d["deltaserve_time_to_first_token_seconds_count"] == 1
    assert d["deltaserve_e2e_request_latency_seconds_count"] == 1
    assert d["deltaserve_inter_token_latency_seconds_count"] == 9  # 3 gaps in each of 3 samples
    for stat in ("count", "sum"):  # vLLM's older name carries the same observations
        names = ("time_per_output_token", "inter_token_latency")
        tpot, itl = (d[f"deltaserve_{name}_seconds_{stat}"] for name in names)
        assert tpot == itl
    assert d["deltaserve_requests_total[completions][ok]"] == 1


def test_a_sequence_the_engine_failed_counts_as_finish_reason_error(faulty_app):
    app, fail = faulty_app
    fail.set()
    r, d = _run(app, {"prompt": "def f", "max_tokens": 4})
    assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error"
    assert d["deltaserve_request_success_total[error]"] == 1  # before: counted under no finished_reason at all
    assert d["deltaserve_requests_total[completions][error]"] == 1
    assert sum(v for k, v in d.items() if k.startswith("deltaserve_request_success_total[")) == 1


def test_kv_cache_usage_counts_pages_requests_hold_not_the_prefix_caches(faulty_app):
    app, _ = faulty_app
    prompt = list(range(1, 200))  # 13 pages of 16 tokens, kept by the prompt's checkpoint after the request ends
    r, _ = _run(app, {"prompt": prompt, "max_tokens": 2})
    assert r.status_code == 200

    async def scrape():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return _samples((await c.get("/metrics")).text)

    m = {name: v for (name, labels), v in asyncio.run(scrape()).items() if not labels}
    assert m["deltaserve_kv_pages_cached"] >= 12 and m["deltaserve_num_requests_running"] == 0
    # before: the cached pages counted as used, so an idle server with a warm cache read as filling up
    assert m["deltaserve_kv_cache_usage_perc"] == 0


def test_every_sample_of_a_request_aborted_at_shutdown_counts_as_aborted(faulty_app):
    app, _ = faulty_app
    state = app.state.server

    async def abort_when_running():
        while not state.inflight:  # httpx's ASGI transport returns the body whole: abort from beside it
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        for request_id in list(state.inflight):  # as the drain does when its time is up
            state.engine.abort(request_id)

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as c:
            before = _samples((await c.get("/metrics")).text)
            body = {"prompt": "def f", "max_tokens": 400, "n": 3, "ignore_eos": True, "temperature": 1,
                    "stream": True}
            r, _ = await asyncio.gather(c.post("/v1/completions", json=body), abort_when_running())
            after = _samples((await c.get("/metrics")).text)
            return r, {key: after[key] - before.get(key, 0.0) for key in after}

    r, d = asyncio.run(main())
    events = [line for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and "request_aborted" in events[-2]
    assert d["deltaserve_request_success_total", (("finished_reason", "abort"),)] == 3  # before: 1, the first seen
    assert d["deltaserve_requests_total", (("endpoint", "completions"), ("outcome", "abort"))] == 1


def test_prefix_cache_hits_and_queries_count_tokens_under_vllms_names(faulty_app):
    """vLLM's prefix_cache_queries / prefix_cache_hits count prompt tokens looked up / served from the cache, so a
    dashboard's hit rate is hits / queries (before: prefix_cache_hits counted requests, and the tokens went under
    names of our own)."""
    app, _ = faulty_app
    prompt = list(range(300, 399))  # 99 tokens no other test sends
    body = {"prompt": prompt, "max_tokens": 2, "n": 8, "temperature": 1}
    _run(app, body)
    r, d = _run(app, body)  # every sample resumes from the prompt's checkpoint
    cached = r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert 0 < cached < 99
    assert d["deltaserve_prompt_tokens_total"] == 99  # the prompt once, as in usage
    assert d["deltaserve_prefix_cache_hits_total"] == 8 * cached  # but each sample hits
    assert d["deltaserve_prefix_cache_queries_total"] == 8 * 99

    async def scrape():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return (await c.get("/metrics")).text

    text = asyncio.run(scrape())
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("deltaserve_prefix_cache_hits", "deltaserve_prefix_cache_queries"):
        assert families[name].type == "counter" and "tokens" in families[name].documentation
    m = {name: v for (name, labels), v in _samples(text).items() if not labels}
    rate = m["deltaserve_prefix_cache_hit_rate"]
    assert 0 < rate <= 1  # hit tokens over prompt_tokens_total would pass 1 here
    assert rate == m["deltaserve_prefix_cache_hits_total"] / m["deltaserve_prefix_cache_queries_total"]


def test_every_sample_of_a_request_the_engine_failed_counts_as_error(faulty_app):
    app, fail = faulty_app
    fail.set()
    r, d = _run(app, {"prompt": "def f", "max_tokens": 4, "n": 3, "temperature": 1})
    assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error"
    assert d["deltaserve_request_success_total[error]"] == 3  # before: 1, the first sample's seen
    assert sum(v for k, v in d.items() if k.startswith("deltaserve_request_success_total[")) == 3
