"""Randomized differential tests of MTP speculative decoding on CPU (tiny random dense and MoE checkpoints with an
MTP head): whatever the batch, the outputs of greedy and seeded sampled requests with K = 1, 2, 3 drafts are those
of the same engine without drafts.

Random weights draft almost nothing the target accepts, so the drafter's proposals are replaced by the reference
continuation (the run without MTP), a seeded share of them wrong, or all right: every acceptance length occurs, and
stops land inside a verify step's kept drafts. The MTP head still runs (its KV), and its own proposals are recorded:
each must equal the one the request gets at the same point when it runs alone (the head's KV is exact under
batching, chunked prefill, preemption and prefix-cache resumes). Each workload mixes stop ids, stop strings of one to
three tokens (shown or not), max_tokens 1, 2, 3, 5 ..., min_tokens, ignore_eos against logits biased towards the end
token, n > 1, seeded top-k / top-p / min-p sampling, repetition / presence / frequency penalties, logit bias, bad
words, allowed ids, logprobs, prompt logprobs; the same prompt twice and prompts extending earlier ones (prefix-cache
hits), requests added while others run, aborts, tight KV pools (preemption), few checkpoints (evictions), small pages
and token budgets, a step-time budget, max_model_len limits, quantized KV and a bf16 recurrent state, draft
vocabularies. A few fixed seeds run by default, 64 more under the `slow` mark. With simulated acceptance (forced
drafts: outputs differ from the run without MTP by design) the invariants are checked instead."""

from __future__ import annotations

import dataclasses
import random

import pytest

from deltaserve import LLM, SamplingParams
# the MTP tests' tiny dense and MoE checkpoints with an MTP head (`tiny`, a fixture) and their CPU engine
from tests.engine.test_speculative import VOCAB, make_llm, tiny  # noqa: F401

ROOMY = 256  # max_model_len of the engines whose options do not set one

# ---- the harness -----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Req:
    rid: str
    prompt: list[int]
    params: SamplingParams
    arrival: int = 0  # the engine step before which it is added


def children(req: Req) -> list[tuple[str, SamplingParams]]:
    """The scheduler requests of a request ((id, params) of each sample, run alone: n = 1, seed + index)."""
    if req.params.n == 1:
        return [(req.rid, req.params)]
    seed = req.params.seed
    return [(f"{req.rid}#{i}", dataclasses.replace(req.params, n=1, seed=None if seed is None else seed + i))
            for i in range(req.params.n)]


class Drafts:
    """Wraps the drafter: records its proposals by (request id, outputs kept so far), then, for requests with a
    reference continuation, proposes that instead, each draft row wrong somewhere with probability `wrong` (seeded)."""

    def __init__(self, llm: LLM, refs: dict[str, list[int]] | None = None, *, wrong: float = 0.0,
                 seed: int = 0) -> None:
        self.refs, self.wrong, self.rng, self.proposed = refs or {}, wrong, random.Random(seed), {}
        drafter = llm.engine.runner.drafter
        self.propose, drafter.propose = drafter.propose, self

    def __call__(self, step, dev, input_ids, hidden, token_ids, kept):
        drafts = self.propose(step, dev, input_ids, hidden, token_ids, kept).clone()
        for i, (s, n_kept) in enumerate(zip(step.sampling, kept.tolist())):
            done = s.num_output_tokens + n_kept
            self.proposed[(s.request_id, done)] = tuple(drafts[i].tolist())
            ref = self.refs.get(s.request_id)
            if ref is None:
                continue
            bad = self.rng.randrange(drafts.shape[1]) if self.rng.random() < self.wrong else -1
            for j in range(drafts.shape[1]):
                right = ref[done + j] if done + j < len(ref) else int(drafts[i, j])
                drafts[i, j] = (right + 1) % VOCAB if j == bad else right
        return drafts


def run(llm: LLM, reqs: list[Req], *, aborts: dict[str, int] | None = None) -> dict[tuple[str, int], dict]:
    """Drive the engine step by step: requests added at their arrival step, `aborts` {request id: m} aborted once
    their first sample has m tokens. Returns each sample's tokens, text, finish and stop reasons, logprobs, prompt
    logprobs and the prompt tokens the prefix cache served it."""
    engine, todo, aborts = llm.engine, sorted(reqs, key=lambda r: r.arrival), dict(aborts or {})
    out = {(r.rid, i): dict(tokens=[], text="", finish=None, stop_reason=None, cached=None, prompt_logprobs=None,
                            logprobs=[] if r.params.logprobs is not None else None)
           for r in reqs for i in range(r.params.n)}
    step = 0
    while todo or engine.has_unfinished():
        while todo and todo[0].arrival <= step:
            r = todo.pop(0)
            engine.add_request(r.rid, r.prompt, r.params)
        deltas = engine.step()
        while deltas:
            for d in deltas:
                o = out[(d.request_id, d.index)]
                o["tokens"] += d.token_ids
                o["text"] += d.text
                if d.logprobs is not None:
                    o["logprobs"] += d.logprobs
                if d.finished:
                    o["finish"], o["stop_reason"] = d.finish_reason, d.stop_reason
                if d.num_cached_tokens is not None:
                    o["cached"] = d.num_cached_tokens
                if d.prompt_logprobs is not None:
                    o["prompt_logprobs"] = d.prompt_logprobs[1:]
            deltas = []
            for rid in [rid for rid, m in aborts.items() if len(out[(rid, 0)]["tokens"]) >= m]:
                del aborts[rid]
                deltas += engine.abort_request(rid)  # (nothing for one that ended already)
        step += 1
        assert step < 3000
    return out


def assert_same(ref: dict, got: dict, aborted: set[str]) -> None:
    """`got` has `ref`'s outputs (logprobs within 1e-4); a sample aborted in `got` has a prefix of its tokens."""
    for key, r in ref.items():
        g = got[key]
        if key[0] in aborted and g["finish"] == "abort":  # (it may have ended before its abort)
            assert g["tokens"] == r["tokens"][:len(g["tokens"])], key
            continue
        assert (g["tokens"], g["finish"], g["stop_reason"], g["text"]) == \
            (r["tokens"], r["finish"], r["stop_reason"], r["text"]), key
        for name in ("logprobs", "prompt_logprobs"):
            assert (r[name] is None) == (g[name] is None) and len(r[name] or ()) == len(g[name] or ()), key
        for x, y in zip((r["logprobs"] or []) + list(r["prompt_logprobs"] or ()),
                        (g["logprobs"] or []) + list(g["prompt_logprobs"] or ())):
            assert x.token_id == y.token_id and [t for t, _ in x.top] == [t for t, _ in y.top], key
            assert abs(x.logprob - y.logprob) < 1e-4 and all(abs(p - q) < 1e-4 for (_, p), (_, q) in zip(x.top, y.top))


def assert_released(llm: LLM) -> None:
    """Nothing held but prefix-cache checkpoints; after reset_prefix_cache every page and slot is free."""
    cache = llm.engine.cache
    assert cache.is_empty()
    llm.engine.reset_prefix_cache()
    assert cache.num_free_pages == cache.num_pages and cache.num_free_slots == cache.num_slots


# ---- random workloads ------------------------------------------------------------------------------------------------

def random_prompt(rng: random.Random, lo: int, hi: int) -> list[int]:
    return [rng.randrange(1, 256) for _ in range(rng.randint(lo, hi))]


def engine_options(rng: random.Random, tight: bool) -> dict:
    """tight: small max_model_len, pages and token budgets (preemption, length limits); else a roomy engine with
    some of those."""
    if tight:
        max_len, page = rng.choice([48, 64, 96]), rng.choice([4, 8, 16])
        kw = dict(max_model_len=max_len, page_size=page, num_pages=max_len // page + rng.choice([0, 1, 2, 5]))
        if rng.random() < 0.5:
            kw["max_num_batched_tokens"] = rng.choice([8, 12, 16, 32])
        if rng.random() < 0.5:
            kw["checkpoint_interval"] = page * rng.choice([1, 2])
    else:
        kw = dict(max_model_len=ROOMY)
        if rng.random() < 0.4:
            kw.update(num_pages=rng.choice([17, 20, 24]), page_size=16)
        if rng.random() < 0.3:
            kw["max_num_batched_tokens"] = rng.choice([16, 32, 64])
        if rng.random() < 0.3:
            kw["checkpoint_interval"] = 32
    if rng.random() < 0.3:
        kw["max_num_seqs"] = rng.choice([2, 3, 4])
    if rng.random() < 0.2:
        kw["speculative_max_batch"] = rng.choice([2, 3])
    if rng.random() < 0.25 and "checkpoint_interval" not in kw:
        kw["enable_prefix_caching"] = False
    elif rng.random() < 0.15:
        kw["num_checkpoints"] = rng.choice([1, 2])  # checkpoints evicted
    if rng.random() < 0.15:
        kw["max_step_ms"] = rng.choice([1.0, 5.0])
    if rng.random() < 0.3:
        kw.update(kv_cache_dtype=rng.choice(["int8", "int4"]), state_dtype=rng.choice(["bfloat16", "float32"]))
    return kw


def random_requests(rng: random.Random, num: int, max_len: int, eos: int,
                    tight: bool) -> tuple[list[list[int]], list[dict]]:
    """Prompts (fresh, repeated, extending an earlier one, long, near max_model_len) and sampling options without
    stops (tight: many to run until max_model_len)."""
    prompts: list[list[int]] = []
    for _ in range(num):
        c = rng.random()
        if prompts and c < 0.15:
            p = list(rng.choice(prompts))
        elif prompts and c < 0.3:
            p = rng.choice(prompts) + random_prompt(rng, 1, 20)
        else:
            p = random_prompt(rng, 70, 110) if c < 0.4 else random_prompt(rng, 1, 60)
        if len(p) >= max_len - 1 or (tight and rng.random() < 0.3):
            p = (p + random_prompt(rng, max_len, max_len))[:max_len - rng.randint(2, 12)]
        prompts.append(p)
    options = []
    for _ in range(num):
        kw: dict = dict(temperature=0)
        if rng.random() < 0.55:
            kw = dict(temperature=rng.choice([0.6, 1.0, 1.5]), seed=rng.randrange(10 ** 6))
            for name, values, p in (("top_k", [5, 40], 0.3), ("top_p", [0.8, 0.95], 0.3), ("min_p", [0.05], 0.2)):
                if rng.random() < p:
                    kw[name] = rng.choice(values)
        kw["max_tokens"] = rng.choice([1, 2, 3, 5, 8, 12, 20, 24] + [None] * (3 * tight))
        if rng.random() < 0.25:
            kw["n"] = rng.choice([2, 3])
        for name, values in (("repetition_penalty", [1.3, 0.8]), ("presence_penalty", [0.7]),
                             ("frequency_penalty", [0.5])):
            if rng.random() < 0.2:
                kw[name] = rng.choice(values)
        if rng.random() < 0.3:
            kw["logprobs"] = rng.choice([0, 2])
        kw["ignore_eos"] = rng.random() < 0.4
        if rng.random() < 0.35:
            kw["logit_bias"] = {eos: rng.choice([3.0, 5.0])}  # the end token comes often (ignore_eos or not)
        if rng.random() < 0.15:
            kw.setdefault("logit_bias", {})[rng.randrange(VOCAB)] = rng.choice([-5.0, 4.0])
        if rng.random() < 0.1:
            kw["allowed_token_ids"] = sorted(rng.sample(range(VOCAB), rng.randint(2, 40)))
        if rng.random() < 0.3 and kw["max_tokens"] is not None:
            kw["min_tokens"] = min(rng.randint(1, 6), kw["max_tokens"])
        if rng.random() < 0.05:
            kw["prompt_logprobs"] = 1
        options.append(kw)
    return prompts, options


def with_stops(rng: random.Random, kw: dict, continuation: list[int], tokenizer) -> SamplingParams:
    """Stops picked from the request's continuation without stops: a token id, a string of one to three tokens'
    text (or its start), a two-token bad word."""
    kw = dict(kw)
    if continuation and rng.random() < 0.4:
        kw["stop_token_ids"] = [rng.choice(continuation)]
    if continuation and rng.random() < 0.4:
        a = rng.randrange(len(continuation))
        text = tokenizer.decode(continuation[a:a + rng.randint(1, 3)])
        if text and "\ufffd" not in text:
            kw["stop"] = [text[:rng.randint(1, len(text))]]
            kw["include_stop_str_in_output"] = rng.random() < 0.5
    if len(continuation) > 2 and rng.random() < 0.15:
        a = rng.randrange(len(continuation) - 1)
        kw["bad_words_token_ids"] = [continuation[a:a + 2]]
    return SamplingParams(**kw)


def sample_workload(rng: random.Random, plain: LLM, tight: bool) -> tuple[list[Req], dict]:
    """Requests with stops, and each sample's continuation without them (by (request id, index))."""
    engine = plain.engine
    prompts, options = random_requests(rng, rng.randint(3, 7), engine.max_model_len, min(engine.eos_ids), tight)
    # each request's continuation without stops (longer, min_tokens and end tokens ignored) gives its stops
    free = [Req(f"c{i}", p, SamplingParams(**(kw | dict(max_tokens=(kw["max_tokens"] or 1000) + 6, min_tokens=0,
                                                        ignore_eos=True))))
            for i, (p, kw) in enumerate(zip(prompts, options))]
    cont = run(plain, free)
    engine.reset_prefix_cache()
    reqs = [Req(f"r{i}", p, with_stops(rng, kw, cont[(f"c{i}", 0)]["tokens"], plain.get_tokenizer()),
                0 if rng.random() < 0.7 else rng.randint(1, 8)) for i, (p, kw) in enumerate(zip(prompts, options))]
    return reqs, {("r" + rid[1:], i): o["tokens"] for (rid, i), o in cont.items()}


# ---- exactness -------------------------------------------------------------------------------------------------------

def check_random_workload(tiny, seed: int, kind: str, tight: bool) -> tuple[dict[str, int], int]:
    """A random workload (see the module docstring) with K drafts, half the draft rows wrong somewhere, against the
    same engine without MTP: every sample's tokens, text, finish and stop reason, logprobs and prompt logprobs are
    equal (an aborted one's tokens a prefix of its reference); the engine holds nothing at the end. Then each sample
    alone, with the head's own drafts: the same tokens, and each proposal of the MTP head in the batched run equals
    the one the sample gets alone at the same point, where it could still be used (within max_model_len).
    Returns the MTP engine's stats and how many proposals were compared."""
    rng = random.Random(seed)
    path, k = tiny[kind], rng.choice([1, 2, 3])
    options = engine_options(rng, tight)
    spec = {"speculative_draft_vocab": rng.choice([64, 200])} if rng.random() < 0.3 else {}
    plain = make_llm(path, **options)
    reqs, continuations = sample_workload(rng, plain, tight)
    ref = run(plain, reqs)
    aborts = {rng.choice(reqs).rid: rng.randint(1, 6)} if rng.random() < 0.4 else {}
    # the drafts' truth: the reference output, then (past a stop) the continuation without stops
    refs = {}
    for r in reqs:
        for i, (cid, _) in enumerate(children(r)):
            tokens = ref[(r.rid, i)]["tokens"]
            refs[cid] = tokens + continuations[(r.rid, i)][len(tokens):]
    llm = make_llm(path, k, **options, **spec)
    if seed % 3 == 1:  # as if prefill graphs existed for steps under 64 tokens: verify steps there drop drafts
        llm.engine.scheduler._varlen_step_replays = lambda rows, tokens: tokens < 64
    drafts = Drafts(llm, refs, wrong=0.5, seed=seed)
    got = run(llm, reqs, aborts=aborts)
    assert_same(ref, got, set(aborts))
    stats = llm.engine.stats()
    assert_released(llm)

    # the head's proposals, against each sample run alone (no batch, no prefix cache, no oracle)
    alone = make_llm(path, k, max_model_len=options["max_model_len"], enable_prefix_caching=False, max_num_seqs=1,
                     **spec, **{o: options[o] for o in ("kv_cache_dtype", "state_dtype") if o in options})
    solo = [Req(cid, r.prompt, p) for r in reqs for cid, p in children(r)]
    own = Drafts(alone)
    by_itself = run(alone, solo)  # (outputs as well: one request at a time, the drafts the head's own)
    assert [by_itself[(cid, 0)]["tokens"] for r in reqs for cid, _ in children(r)] == \
        [ref[(r.rid, i)]["tokens"] for r in reqs for i in range(r.params.n)]
    prompt_len = {r.rid: len(r.prompt) for r in solo}
    room = lambda key: options["max_model_len"] - prompt_len[key[0]] - key[1]  # noqa: E731
    common = [key for key in drafts.proposed if key in own.proposed]
    assert [drafts.proposed[key][:room(key)] for key in common] == [own.proposed[key][:room(key)] for key in common]
    return stats, len(common)


# seeds whose workloads verify drafts and have, between them, stops inside kept drafts (keep_fewer), preemption,
# prefix-cache hits, aborts, n > 1, late arrivals, stop strings, K = 1, 2, 3, quantized KV, a draft vocabulary (the
# slow sweep below runs 64 more)
FUZZ = [(0, "dense", False), (2, "dense", True), (3, "moe", True), (12, "dense", False), (19, "moe", True),
        (28, "dense", False), (33, "moe", False), (35, "moe", True), (38, "dense", True)]


@pytest.mark.parametrize("seed,kind,tight", FUZZ, ids=[f"{k}-{'tight' if t else 'roomy'}-{s}" for s, k, t in FUZZ])
def test_random_workload_equals_no_mtp(tiny, seed, kind, tight):
    stats, compared = check_random_workload(tiny, seed, kind, tight)
    assert stats["spec_accepted_tokens"] > 0 and compared >= 5


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 164))
def test_random_workload_equals_no_mtp_sweep(tiny, seed):
    check_random_workload(tiny, seed, ("dense", "moe")[seed % 2], seed % 4 >= 2)


# ---- stops at every offset of a verify step's kept tokens ------------------------------------------------------------

PRINTABLE = list(range(32, 127))  # printable ASCII bytes: every output decodes to clean text
NEXT_TURN = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_stops_at_every_offset_of_the_kept_drafts(tiny, k):
    """Every draft right: output 0 comes with the prompt, then each verify step keeps 1 + K tokens (outputs 1 .. K + 1,
    K + 2 .. 2K + 2, ...). Requests end at output `last` = 1 .. K + 2, so at every offset of a kept run (an accepted
    draft with 0 .. K - 1 drafts and the target's token after it, or the run's last token), on a stop id (greedy,
    seeded with a repetition penalty and logprobs) or a stop string spanning outputs last - 1 and last (shown or
    not), some with min_tokens = last (the stop id suppressed, a stop string not counted, up to the row before),
    beside requests ending on max_tokens = last + 1: outputs as without MTP, the runner's state commit moved
    back for every dropped count it can be (keep_fewer 1 .. K - 1), and each next turn (prompt + output + 6 tokens,
    resumed from the end checkpoint) as without MTP."""
    path, g = tiny["dense"], random.Random(k)
    lasts = range(1, k + 3)
    prompts = [random_prompt(g, 20, 40) for _ in range(4 * len(lasts))]
    greedy = dict(temperature=0, allowed_token_ids=PRINTABLE, max_tokens=2 * k + 8)
    seeded = dict(temperature=1.0, seed=7, allowed_token_ids=PRINTABLE, max_tokens=2 * k + 8,
                  repetition_penalty=1.2, logprobs=1)
    plain = make_llm(path, max_model_len=ROOMY)
    free = [Req(f"f{i}", p, SamplingParams(ignore_eos=True, **(greedy if i % 4 else seeded)))
            for i, p in enumerate(prompts)]
    cont = {rid: o["tokens"] for (rid, _), o in run(plain, free).items()}
    plain.engine.reset_prefix_cache()
    tok = plain.get_tokenizer()
    reqs = []
    for j, last in enumerate(lasts):
        c = [cont[f"f{4 * j + v}"] for v in range(4)]
        # min_tokens = last: the stop id is suppressed up to output last - 1, a row of the same verify step
        reqs += [Req(f"seeded{last}", prompts[4 * j], SamplingParams(stop_token_ids=[c[0][last]], min_tokens=last,
                                                                     **seeded)),
                 Req(f"id{last}", prompts[4 * j + 1], SamplingParams(stop_token_ids=[c[1][last]],
                                                                    min_tokens=last * (last % 2), **greedy)),
                 Req(f"str{last}", prompts[4 * j + 2], SamplingParams(
                     stop=[tok.decode(c[2][last - 1:last + 1])], include_stop_str_in_output=last % 2 == 1,
                     min_tokens=last * (last % 2 == 0), **greedy)),
                 Req(f"len{last}", prompts[4 * j + 3], SamplingParams(**greedy | dict(max_tokens=last + 1)))]
    llm = make_llm(path, k, max_model_len=ROOMY)
    truth = {r.rid: cont[f.rid] for r, f in zip(reqs, free)}  # (each stops inside its continuation)
    Drafts(llm, truth)
    fewer = []
    keep_fewer = llm.engine.runner.keep_fewer
    llm.engine.runner.keep_fewer = lambda rid, num: (fewer.append(num), keep_fewer(rid, num))
    # the length-limited ones apart: their limits would cut every row's drafts (a verify step's rows have as many)
    batches = [[r for r in reqs if not r.rid.startswith("len")], [r for r in reqs if r.rid.startswith("len")]]
    ref = {}
    for batch in batches:
        want = run(plain, batch)
        assert_same(want, run(llm, batch), set())
        ref |= want
    assert [ref[(f"len{last}", 0)]["finish"] for last in lasts] == ["length"] * len(lasts)
    assert sorted(set(fewer)) == list(range(1, k))
    stats = llm.engine.stats()
    assert stats["spec_accepted_tokens"] == stats["spec_draft_tokens"] > 0
    # the next turns: resumed where each generation ended, as without MTP
    turns = [Req(f"t{r.rid}", r.prompt + ref[(r.rid, 0)]["tokens"] + random_prompt(g, 6, 6), NEXT_TURN)
             for r in reqs]
    want, got = run(plain, turns), run(llm, turns)
    assert_same(want, got, set())
    # where the run without drafts resumes, or one position further (the end token was an accepted draft: computed)
    for r in turns:
        assert want[(r.rid, 0)]["cached"] <= got[(r.rid, 0)]["cached"] <= want[(r.rid, 0)]["cached"] + 1
    assert llm.engine.cache.counters["prompt_tokens_cached"] > 0


# ---- simulated acceptance: invariants --------------------------------------------------------------------------------

def assert_ends_right(reqs: list[Req], out: dict, tokenizer, eos_ids: frozenset[int], max_len: int) -> None:
    """Each sample ended as its parameters say, whatever tokens it got: at its length limit ("length", exactly
    max_tokens or max_model_len tokens), or ("stop") on its last token when that is a stop id (the end token unless
    ignore_eos) from output min_tokens on, or on a stop string completed after output min_tokens, which its text
    ends with (include_stop_str_in_output) or stops just before; no stop id before that from output min_tokens on;
    the text is the tokens' (a stop token's own text only with include_stop_str_in_output); one logprobs entry per
    token."""
    for r in reqs:
        p = r.params
        stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_ids))
        limit = min(p.max_tokens or max_len, max_len - len(r.prompt))
        for i in range(p.n):
            o = out[(r.rid, i)]
            t, finish, reason = o["tokens"], o["finish"], o["stop_reason"]
            assert 0 < len(t) <= limit and not [j for j, x in enumerate(t[:-1], 1) if x in stops and j >= p.min_tokens]
            assert o["logprobs"] is None or len(o["logprobs"]) == len(t)
            if finish == "length":
                assert len(t) == limit and o["text"] == tokenizer.decode(t, skip_special_tokens=True), (r, o)
            elif isinstance(reason, str):  # the text ends where the stop string does, or before it
                full = tokenizer.decode(t, skip_special_tokens=True)
                assert finish == "stop" and reason in p.stop and len(t) > p.min_tokens and full.startswith(o["text"])
                assert o["text"].endswith(reason) if p.include_stop_str_in_output else \
                    full[len(o["text"]):].startswith(reason)
            else:
                assert finish == "stop" and t[-1] in stops and len(t) >= p.min_tokens and reason in (t[-1], None)
                shown = t if p.include_stop_str_in_output else t[:-1]
                assert o["text"] == tokenizer.decode(shown, skip_special_tokens=True)


SIMULATED = [(2, "dense"), (10, "dense"), (35, "moe"), (37, "moe")]  # (preemption, stops inside forced runs)


@pytest.mark.parametrize("seed,kind", SIMULATED)
def test_simulated_acceptance_keeps_every_stop_and_limit(tiny, seed, kind):
    counters = check_simulated(tiny, seed, kind)
    assert counters["spec_accepted_tokens"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 164))
def test_simulated_acceptance_sweep(tiny, seed):
    check_simulated(tiny, seed, ("dense", "moe")[seed % 2])


def check_simulated(tiny, seed: int, kind: str) -> dict[str, int]:
    """Dummy weights, drafts accepted at random (a mean of 1 + K, or less): the outputs are the forced drafts', so no
    run without MTP to compare with, but every sample must end as its parameters say (assert_ends_right), with stop
    ids drawn from a large set and the end token biased up (stops land inside forced runs, also before min_tokens,
    which a forced draft does not obey), beside requests added late, aborts, preemption and prefix-cache hits; the
    engine holds nothing at the end; and the same run again gives the same outputs (the acceptance is seeded)."""
    rng = random.Random(seed)
    k, max_len = rng.choice([1, 2, 3]), rng.choice([64, 96, 256])
    options = dict(load_format="dummy", max_model_len=max_len, speculative_simulated_acceptance=rng.choice(
        [1.0 + k, 1.0 + k, 1.5, 1.0 + k / 2]))
    if rng.random() < 0.5:
        page = rng.choice([4, 8, 16])
        options.update(page_size=page, num_pages=max_len // page + rng.choice([0, 1, 3, 8]))
    if rng.random() < 0.3:
        options["max_num_batched_tokens"] = rng.choice([8, 16, 32])
    if rng.random() < 0.25:
        options["speculative_draft_vocab"] = rng.choice([40, 64, 300])
    llm = make_llm(tiny[kind], k, **options)
    eos = min(llm.engine.eos_ids)
    prompts, reqs = [], []
    for i in range(rng.randint(3, 7)):
        c = rng.random()
        p = list(rng.choice(prompts)) if prompts and c < 0.2 else \
            rng.choice(prompts) + random_prompt(rng, 1, 20) if prompts and c < 0.35 else random_prompt(rng, 1, 80)
        prompts.append(p[:max_len - rng.randint(2, 20)])
        kw = dict(temperature=0) if rng.random() < 0.5 else dict(temperature=1.0, seed=rng.randrange(1000))
        kw["max_tokens"] = rng.choice([1, 2, 3, 4, 5, 7, 16, 30, None])
        if rng.random() < 0.4:
            kw["min_tokens"] = min(rng.randint(1, 8), kw["max_tokens"] or 8)
        kw["ignore_eos"] = rng.random() < 0.4
        if rng.random() < 0.5:
            kw["stop_token_ids"] = rng.sample(range(VOCAB), rng.randint(1, 40))
        if rng.random() < 0.3:
            kw["stop"] = [chr(rng.randrange(33, 127)) for _ in range(rng.randint(1, 3))] + ["ab", "a b"]
            kw["include_stop_str_in_output"] = rng.random() < 0.5
        if rng.random() < 0.3:
            kw["logit_bias"] = {eos: 8.0}
        for name, value, chance in (("logprobs", 1, 0.3), ("n", 2, 0.2), ("repetition_penalty", 1.3, 0.2)):
            if rng.random() < chance:
                kw[name] = value
        reqs.append(Req(f"r{i}", prompts[-1], SamplingParams(**kw), 0 if rng.random() < 0.6 else rng.randint(1, 8)))
    aborts = {rng.choice(reqs).rid: rng.randint(1, 5)} if rng.random() < 0.3 else {}
    out = run(llm, reqs, aborts=aborts)
    assert_ends_right([r for r in reqs if r.rid not in aborts], out, llm.get_tokenizer(), llm.engine.eos_ids, max_len)
    counters = dict(llm.engine.spec_counters)
    assert counters["spec_accepted_tokens"] <= counters["spec_draft_tokens"]
    assert_released(llm)
    assert run(make_llm(tiny[kind], k, **options), reqs, aborts=aborts) == out
    return counters
