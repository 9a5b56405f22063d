"""Prefix caching is exact: every workload gives the same tokens (and logprobs within the fp32 tolerance) with the
cache as without it, on tiny dense and MoE checkpoints; the cache is really hit; nothing leaks."""

from __future__ import annotations

import math

import pytest
import torch

from deltaserve import LLM, SamplingParams
from tests.models.factory import TinySpec, save_checkpoint

VOCAB = 160


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    paths = {}
    for kind in ("dense", "moe"):
        paths[kind] = tmp_path_factory.mktemp(f"prefix_{kind}")
        save_checkpoint(TinySpec(kind, moe=kind == "moe"), paths[kind], seed=7)
    return paths


# Every workload runs on the dense checkpoint, the cheaper ones on the MoE one too (CI time).
@pytest.fixture(scope="module", params=["dense", "moe"])
def ckpt(request, checkpoints):
    return checkpoints[request.param]


@pytest.fixture(scope="module")
def dense(checkpoints):
    return checkpoints["dense"]


def make(path, cached: bool, **kw) -> LLM:
    """The cached engine checkpoints every 64 tokens; the uncached one is given no checkpoint option (refused there)."""
    kw.setdefault("max_model_len", 1280)
    checkpoints = dict(checkpoint_interval=64) if cached else {}
    return LLM(str(path), dtype="float32", device="cpu", enable_prefix_caching=cached, **checkpoints, **kw)


@pytest.fixture(scope="module")
def engines(ckpt):
    return make(ckpt, True), make(ckpt, False)


@pytest.fixture(scope="module")
def dense_engines(dense):
    return make(dense, True), make(dense, False)


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)


def same(a, b) -> None:
    """Identical tokens; logprobs equal within the fp32 tolerance of a differently chunked computation."""
    for x, y in zip(a, b):
        for ox, oy in zip(x.outputs, y.outputs):
            assert ox.token_ids == oy.token_ids
            assert all(math.isclose(p.logprob, q.logprob, abs_tol=1e-4) for p, q in zip(ox.logprobs, oy.logprobs))


def run(engines, prompts, params=GREEDY):
    with_cache, without = engines
    got = with_cache.generate(prompts, params)
    same(got, without.generate(prompts, params))
    return got


def clean(llm: LLM) -> None:
    """Nothing held but checkpoints; after a reset, the pools are full."""
    cache = llm.engine.cache
    assert cache.is_empty() and not llm.engine.has_unfinished()
    llm.engine.reset_prefix_cache()
    assert cache.num_free_pages == cache.num_pages and cache.num_checkpoints == 0


def test_same_prompt_again_and_longer_prompts_resume_from_the_cache(engines):
    base = tokens(200, 1)
    first = run(engines, [base])[0]
    assert first.num_cached_tokens == 0
    again = run(engines, [base])[0]
    assert again.num_cached_tokens == 199  # everything but the last token, whose logits are needed
    for extra in (1, 63, 64, 65, 1000):
        out = run(engines, [base + tokens(extra, extra)])[0]
        assert out.num_cached_tokens >= 199, extra
    clean(engines[0])


def test_a_prompt_logprobs_request_is_computed_whole_not_resumed(dense_engines):
    """A cached prefix would skip the positions it covers, leaving them unscored (prompt_logprobs came back None):
    such a request computes its prompt whole and gets every prompt token's score, as without the cache."""
    with_cache, without = dense_engines
    prompt = tokens(40, 4)
    with_cache.generate([prompt], GREEDY)  # leaves a checkpoint the next request could resume from
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, logprobs=0, prompt_logprobs=1)
    got, want = with_cache.generate([prompt], params)[0], without.generate([prompt], params)[0]
    assert got.num_cached_tokens == 0 and got.prompt_logprobs is not None
    assert len(got.prompt_logprobs) == len(prompt) and got.prompt_logprobs[0] is None
    for p, q in zip(got.prompt_logprobs[1:], want.prompt_logprobs[1:]):
        assert p.token_id == q.token_id and math.isclose(p.logprob, q.logprob, abs_tol=1e-4)
    assert with_cache.generate([prompt], GREEDY)[0].num_cached_tokens == len(prompt) - 1  # the cache still serves
    clean(with_cache)


def test_branching_conversations_share_their_common_part(engines):
    trunk = tokens(150, 2)
    outs = [run(engines, [trunk + tokens(40, 10 + i)])[0] for i in range(3)]
    # the first branch finds nothing; the second the checkpoints along the trunk (every 64 tokens); the third also
    # the branch point the second one planted where it left the first one's path
    assert outs[0].num_cached_tokens == 0 and outs[1].num_cached_tokens == 128
    assert outs[2].num_cached_tokens == 144  # page-aligned branch point, 150 rounded down to 16
    clean(engines[0])


def test_multi_turn_chat_resumes_from_the_end_of_the_previous_generation(dense_engines):
    engines = dense_engines
    history = tokens(90, 3)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=0)
    for turn in range(3):
        out = run(engines, [history], params)[0]
        if turn:
            assert out.num_cached_tokens >= len(history) - 8 - 1  # last turn's prompt + reply, less a new message
        history = history + out.outputs[0].token_ids + tokens(8, 30 + turn)  # the reply, then the next message
    clean(engines[0])


def test_requests_arriving_while_the_prefix_is_prefilled_and_n_siblings(dense):
    shared = tokens(300, 4)
    params = SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=8, ignore_eos=True, logprobs=0)
    prompts = [shared + tokens(5, 40 + i) for i in range(4)]
    # one generate call: all arrive together, chunked prefill (budget 64) interleaves them
    small = make(dense, True, max_num_batched_tokens=64)
    plain = make(dense, False, max_num_batched_tokens=64)
    same(small.generate(prompts, params), plain.generate(prompts, params))
    later = small.generate([shared + tokens(5, 50)], params)[0]
    assert later.num_cached_tokens >= 256
    same([later], plain.generate([shared + tokens(5, 50)], params))
    clean(small)


def test_eviction_preemption_and_aborts_stay_exact_and_leak_nothing(dense):
    """Tight pools: 3 checkpoints, 40 pages for 5 running requests of up to ~170 tokens: checkpoints are evicted
    for pages, requests are preempted, some aborted mid-way; outputs equal the uncached engine's."""
    kw = dict(num_pages=40, max_num_batched_tokens=96, max_num_seqs=5, max_model_len=256, growth_reserve=False)
    cached, plain = make(dense, True, num_checkpoints=3, **kw), make(dense, False, **kw)
    trunks = [tokens(100, 60 + i) for i in range(3)]
    prompts = [trunks[i % 3] + tokens(20 + 7 * i, 70 + i) for i in range(8)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=0)
    preempted: list[str] = []
    real = cached.engine.scheduler.schedule
    cached.engine.scheduler.schedule = lambda: (out := real(), preempted.extend(out.preempted))[0]
    same(cached.generate(prompts, params), plain.generate(prompts, params))
    stats = cached.engine.cache.stats()
    assert preempted and stats["checkpoint_evictions"] > 0 and stats["prefix_hits"] > 0
    engine = cached.engine
    for i, p in enumerate(prompts[:4]):
        engine.add_request(f"x{i}", p, params)
    for _ in range(6):
        engine.step()
    engine.abort_request("x1")
    engine.abort_request("x3")
    while engine.has_unfinished():
        engine.step()
    clean(cached)



def test_a_resume_blocked_only_by_its_own_checkpoint_computes_the_prompt_instead(dense):
    """A pool of exactly max_model_len tokens, all of it held by the checkpoint at a 127-token prompt's last position
    (its full pages and its partial one): the same prompt again cannot resume there (the copy of the partial page
    needs a page besides the checkpoint's, and nothing runs that could free one). It once waited forever, the engine
    stepping idle; it computes the prompt from the start instead, evicting the checkpoint, with the same tokens."""
    kw = dict(max_model_len=128, num_pages=8)
    prompt, params = tokens(127, 21), SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, logprobs=0)
    want = make(dense, False, **kw).generate([prompt], params)[0]
    cached = make(dense, True, **kw)
    same([cached.generate([prompt], params)[0]], [want])
    assert cached.engine.cache.num_free_pages == 0, "the checkpoint holds the whole pool"
    engine = cached.engine
    engine.add_request("again", prompt, params)
    deltas = [d for _ in range(8) if engine.has_unfinished() for d in engine.step()]
    assert not engine.has_unfinished(), "still waiting after 8 steps"
    assert [t for d in deltas for t in d.token_ids] == want.outputs[0].token_ids
    clean(cached)

def test_prefix_caching_off_keeps_no_checkpoint(dense):
    llm = make(dense, False)
    out = llm.generate([tokens(100, 9)] * 2, GREEDY)
    assert [o.num_cached_tokens for o in out] == [0, 0] and llm.engine.cache.num_checkpoints == 0
    assert llm.engine.runner.plan.num_checkpoints == 0


def test_the_periodic_log_line_reports_the_prefix_cache(dense, caplog, monkeypatch):
    import logging

    from deltaserve.engine import async_engine

    monkeypatch.setattr(async_engine, "STATS_INTERVAL_S", 0.0)
    llm = make(dense, True)
    stats = async_engine.StatsLog(llm.engine.stats)
    base = tokens(100, 11)
    llm.generate([base], GREEDY)
    llm.generate([base + tokens(30, 12)], GREEDY)  # after the first: it resumes from its checkpoint
    with caplog.at_level(logging.INFO, logger="deltaserve.engine.async_engine"):
        stats.maybe_log()
    line = caplog.records[-1].getMessage()
    assert "prefix cache:" in line and "% of prompt tokens hit" in line and "checkpoints" in line
    hit = llm.engine.stats()["prompt_tokens_cached"] / llm.engine.stats()["prompt_tokens"]
    assert f"{100 * hit:.0f}% of prompt tokens hit" in line and hit > 0.3
    # idle, with pages only the cache holds: they count as free, as in kv_cache_usage_perc (they read as used)
    assert llm.engine.stats()["pages_cached"] > 0 and "KV 0% used by requests" in line


@pytest.mark.gpu
def test_prefix_cache_on_the_gpu_matches_the_uncached_run(dense):
    """On CUDA (fp32, so only the chunking differs): resumed prompts give the uncached engine's tokens."""
    kw = dict(device="cuda", dtype="float32", max_model_len=1280)
    cached = LLM(str(dense), enable_prefix_caching=True, checkpoint_interval=64, **kw)
    plain = LLM(str(dense), enable_prefix_caching=False, **kw)  # a checkpoint_interval here is refused
    base = tokens(300, 13)
    prompts = [base, base, base + tokens(65, 14), base[:200] + tokens(100, 15)]
    for p in prompts:
        a, b = cached.generate([p], GREEDY)[0], plain.generate([p], GREEDY)[0]
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert all(math.isclose(x.logprob, y.logprob, abs_tol=2e-3)
                   for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs))
    assert cached.engine.cache.stats()["prefix_hits"] >= 3


def test_queries_count_only_prompts_looked_up(dense):
    """vLLM counts prefix-cache queries (and hits) only where a lookup takes place: with prefix caching off, or for
    a request that asks for prompt logprobs (its prompt is computed whole), the counters stay put; they counted
    every prompt, diluting the hit rate."""
    prompt = list(range(1, 40))
    params = SamplingParams(temperature=0, max_tokens=2)
    off = make(dense, False)
    off.generate([prompt], params)
    assert off.engine.stats()["prompt_tokens_queried"] == 0
    on = make(dense, True)
    on.generate([prompt], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1))
    assert on.engine.stats()["prompt_tokens_queried"] == 0
    on.generate([prompt], params)
    assert on.engine.stats()["prompt_tokens_queried"] == len(prompt)
