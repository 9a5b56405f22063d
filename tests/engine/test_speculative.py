"""MTP speculative decoding on CPU: outputs with K = 1, 2, 3 draft tokens equal the outputs without drafts (greedy on
tiny dense and MoE checkpoints and on the demo model; seeded sampling token for token), the sampled distribution
is the target's (a chi-square test), stops / limits / logprobs / n > 1 / preemption inside accepted runs, the
options and the metrics; constrained requests riding verify steps with placeholder drafts."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import pytest
import torch

from deltaserve import LLM, SamplingParams
from deltaserve.config import ConfigError, EngineArgs
from deltaserve.demo import SHIPPED_DEMO_DIR, write_byte_tokenizer
from deltaserve.engine.step_input import device_draft
from tests.models.factory import TinySpec, save_checkpoint

VOCAB = 320


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny dense and MoE checkpoints with (random) mtp.* tensors, and one without."""
    out = {}
    for name, spec in (("dense", TinySpec("spec_dense", mtp=True, extra={"vocab_size": VOCAB})),
                       ("moe", TinySpec("spec_moe", moe=True, mtp=True, extra={"vocab_size": VOCAB})),
                       ("no_mtp", TinySpec("spec_plain", extra={"vocab_size": VOCAB}))):
        path = tmp_path_factory.mktemp(name)
        save_checkpoint(spec, path, seed=5)
        write_byte_tokenizer(path)
        out[name] = path
    return out


def make_llm(path, k: int = 0, **kw) -> LLM:
    kw.setdefault("max_model_len", 512)
    return LLM(str(path), dtype="float32", device="cpu", speculative_tokens=k, **kw)


def prompts(n: int, seed: int = 0, hi: int = 256) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 60, (n,), generator=g).tolist()
    return [torch.randint(1, hi, (L,), generator=g).tolist() for L in lengths]


def token_ids(outs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outs]


GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


# ---- options ---------------------------------------------------------------------------------------------------------

def test_options_and_errors(tiny):
    args = EngineArgs(model=str(tiny["dense"]), speculative_tokens=2)
    assert args.create_engine_config().num_speculative_tokens == 2
    args = EngineArgs(model=str(tiny["dense"]), speculative_config='{"method": "mtp", "num_speculative_tokens": 3}')
    assert args.create_engine_config().speculative.num_speculative_tokens == 3
    for bad, match in ((dict(speculative_tokens=5), "1 to 4"),
                       (dict(speculative_config='{"method": "eagle", "num_speculative_tokens": 2}'), "mtp"),
                       (dict(speculative_config="{nope"), "JSON"),
                       # named as the option given, so the CLI's error leads with --speculative-config
                       (dict(speculative_config='{"num_speculative_tokens": 5}'), "^'speculative_config'.*1 to 4"),
                       (dict(speculative_tokens=1, speculative_config='{"num_speculative_tokens": 2}'), "disagree")):
        with pytest.raises(ConfigError, match=match):
            EngineArgs(model=str(tiny["dense"]), **bad).create_engine_config()
    with pytest.raises(ConfigError, match="no MTP head"):
        EngineArgs(model=str(tiny["no_mtp"]), speculative_tokens=1).create_engine_config()
    args = EngineArgs(model=str(tiny["dense"]), speculative_tokens=2, speculative_draft_vocab=VOCAB)
    assert args.create_engine_config().speculative.draft_vocab == VOCAB
    for n in (0, -3, VOCAB + 1):
        with pytest.raises(ConfigError, match=f"'speculative_draft_vocab' is {n}; use 1 to {VOCAB}"):
            EngineArgs(model=str(tiny["dense"]), speculative_tokens=2,
                       speculative_draft_vocab=n).create_engine_config()
    with pytest.raises(ConfigError, match="'speculative_draft_vocab' applies to MTP"):
        EngineArgs(model=str(tiny["dense"]), speculative_draft_vocab=64).create_engine_config()


def test_cli_flags():
    import argparse

    from deltaserve.config import add_engine_options, engine_args_from

    p = argparse.ArgumentParser()
    add_engine_options(p)
    ns = p.parse_args(["--speculative-config", '{"method":"mtp","num_speculative_tokens":2}'])
    assert engine_args_from(ns, "m").speculative_config is not None
    assert p.parse_args(["--speculative-tokens", "3"]).speculative_tokens == 3
    ns = p.parse_args(["--speculative-tokens", "2", "--speculative-draft-vocab", "64"])
    assert engine_args_from(ns, "m").speculative_draft_vocab == 64


# ---- greedy exactness ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_greedy_equals_no_mtp_tiny(tiny, kind):
    ps = prompts(6, seed=1)
    ref = token_ids(make_llm(tiny[kind]).generate(ps, GREEDY))
    for k in (1, 2, 3):
        llm = make_llm(tiny[kind], k)
        assert token_ids(llm.generate(ps, GREEDY)) == ref, f"K={k}"
        assert llm.engine.spec_counters["spec_verify_steps"] > 0


class Oracle:
    """Replaces the MTP drafts by the reference continuation with some tokens wrong, so that every acceptance
    length (0 .. K) occurs: random tiny MTP heads almost never guess right; always_right: none wrong (a verify step
    keeps 1 + K tokens). The MTP head still runs (its KV)."""

    def __init__(self, llm: LLM, reference: dict[tuple[int, ...], list[int]], always_right: bool = False) -> None:
        self.engine, self.reference, self.calls, self.always_right = llm.engine, reference, 0, always_right
        drafter = llm.engine.runner.drafter
        self.propose = drafter.propose
        drafter.propose = self

    def __call__(self, step, dev, input_ids, hidden, token_ids, kept):
        drafts = self.propose(step, dev, input_ids, hidden, token_ids, kept)
        out = drafts.clone()
        for i, (s, n_kept) in enumerate(zip(step.sampling, kept.tolist())):
            request = self.engine.scheduler.get_request(s.request_id)
            ref = self.reference[tuple(request.prompt_token_ids)]
            done = s.num_output_tokens + n_kept
            for j in range(out.shape[1]):
                self.calls += 1
                right = ref[done + j] if done + j < len(ref) else 0
                wrong = not self.always_right and (self.calls * 7919) % 5 >= 3  # 60% right
                out[i, j] = (right + 1) % VOCAB if wrong else right
        return out


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_rollback_with_every_acceptance_length(tiny, kind):
    ps = prompts(5, seed=2)
    ref = token_ids(make_llm(tiny[kind]).generate(ps, GREEDY))
    reference = {tuple(p): r for p, r in zip(ps, ref)}
    for k in (2, 3):
        llm = make_llm(tiny[kind], k)
        Oracle(llm, reference)
        assert token_ids(llm.generate(ps, GREEDY)) == ref, f"K={k}"
        accepted = llm.engine.spec_accepted_per_position
        assert accepted[0] > 0 and accepted[-1] > 0 and accepted[0] < llm.engine.spec_drafted_per_position[0]


def test_drafts_stay_on_the_device_unless_a_penalty_reads_them(tiny):
    """The host does not wait for the drafts: verify steps carry device_draft markers (the upload reads the drafts
    from the slots' carried tokens), with outputs equal to no MTP. A step with a request whose penalties read its
    outputs waits for their values (its next step's sampling rows hold them as outputs), and so does every step
    under a step-time budget (its cost model learns the whole step's time, drafter included)."""
    ps = prompts(4, seed=3)
    penalised = dataclasses.replace(GREEDY, repetition_penalty=1.3)
    for params, markers, options in ((GREEDY, True, {}), (penalised, False, {}), (GREEDY, False, {"max_step_ms": 50})):
        ref = token_ids(make_llm(tiny["dense"]).generate(ps, params))
        llm = make_llm(tiny["dense"], 3, **options)
        Oracle(llm, {tuple(p): r for p, r in zip(ps, ref)})
        runner, verified = llm.engine.runner, []
        launch = runner.launch

        def record(step):
            if step.is_verify:
                verified.extend(step.input_ids.tolist())
            return launch(step)

        runner.launch = record
        assert token_ids(llm.generate(ps, params)) == ref
        assert verified and llm.engine.spec_counters["spec_accepted_tokens"] > 0
        negative = [i for i in verified if i < 0]
        assert (set(negative) == {device_draft(j) for j in range(3)}) if markers else not negative


@pytest.mark.parametrize("kv,state", [("int8", "bfloat16"), ("int4", "float32")])
def test_rollback_with_compressed_caches(tiny, kv, state):
    """Quantized KV pages and a bf16 recurrent state: the verify step writes its positions' KV quantized, and the
    commit replays the kept positions rounding the state to bf16 between them, as decode steps round it; so greedy
    and seeded outputs with every acceptance length are still those of the run without MTP (same cache options)."""
    ps = prompts(4, seed=6)
    params = [SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=4, max_tokens=16, ignore_eos=True)] * 2
    kw = dict(kv_cache_dtype=kv, state_dtype=state)
    ref = token_ids(make_llm(tiny["dense"], **kw).generate(ps, params))
    llm = make_llm(tiny["dense"], 3, **kw)
    Oracle(llm, {tuple(p): r for p, r in zip(ps, ref)})
    assert token_ids(llm.generate(ps, params)) == ref
    c = llm.engine.spec_counters
    assert 0 < c["spec_accepted_tokens"] < c["spec_draft_tokens"]


def emulated_first_pass(runner, max_rows: int):
    """A FirstPassGraphs on the runner's device whose `_replay` runs the captured body eagerly (no CUDA graph)."""
    from deltaserve.cache.allocator import pages_for_tokens
    from deltaserve.engine.speculative import FirstPassGraphs

    class Emulated(FirstPassGraphs):
        def _replay(self, r):
            self.replays += 1
            return self._forward(r)

    config = runner.config
    return Emulated(runner.model, runner.cache, width=1 + runner.num_speculative_tokens, max_rows=max_rows,
                    max_pages=pages_for_tokens(config.scheduler.max_model_len, config.cache.page_size),
                    device=runner.device)


def wide_tables(dev, pages: int):
    """dev with its batch's page tables zero-padded to `pages` columns (pages past a row's length are never read)."""
    tables = dev.batch.block_tables
    wide = torch.zeros(tables.shape[0], pages, dtype=tables.dtype, device=tables.device)
    wide[:, :tables.shape[1]] = tables
    return dataclasses.replace(dev, batch=dataclasses.replace(dev.batch, block_tables=wide))


class FirstPassChecker:
    """Runs the first draft pass of every verify step both eagerly and through `graphs` (a FirstPassGraphs; by
    default one whose captured body runs eagerly from its static buffers, since CPU has no graphs) and checks they
    agree: draft 1 and its position exactly, the MTP output and the MTP head's KV at the step's slots within `tol`
    (0: bit for bit). The drafter then proposes through `graphs`."""

    def __init__(self, llm: LLM, graphs=None, *, max_rows: int = 8, tol: float = 1e-5) -> None:
        runner = llm.engine.runner
        self.drafter, self.checked, self.tol, self.max_diff = runner.drafter, 0, tol, 0.0
        self.graphs = graphs if graphs is not None else emulated_first_pass(runner, max_rows)
        self.drafter.first_graphs = self.graphs
        self.propose = self.drafter.propose
        self.drafter.propose = self

    def __call__(self, step, dev, input_ids, hidden, token_ids, kept):
        from deltaserve.cache.tensors import MTP_LAYER

        if self.graphs.can_run(step):
            first_row, _, _ = self.drafter.chain_inputs(step)
            kv = self.drafter.cache.attention(MTP_LAYER)
            slots = dev.batch.slot_mapping
            results = []
            for graphs in (None, self.graphs):
                self.drafter.first_graphs = graphs
                # the eager pass over a page table as wide as the graphs' buffers: the split-KV attention kernel
                # takes its split count from the table's width, and the same splits give the same sums
                run_dev = dev if graphs is not None else wide_tables(dev, self.graphs.block_tables.shape[1])
                out = self.drafter.first_drafts(step, run_dev, input_ids, hidden, token_ids, kept, first_row)
                written = [c.flatten(0, 1)[slots].clone() for c in (kv.k, kv.v)]
                results.append([t.clone() for t in out] + written)
            (d0, x0, p0, k0, v0), (d1, x1, p1, k1, v1) = results
            assert torch.equal(d0, d1) and torch.equal(p0, p1)
            for a, b in ((x0, x1), (k0, k1), (v0, v1)):
                self.max_diff = max(self.max_diff, float((a.float() - b.float()).abs().max()))
                torch.testing.assert_close(a, b, rtol=self.tol, atol=self.tol)
            self.checked += 1
        return self.propose(step, dev, input_ids, hidden, token_ids, kept)


def test_first_pass_graph_body_equals_eager(tiny):
    """The first-pass graphs' body over static, padded buffers gives the eager first pass (drafts, MTP outputs and
    KV), with every acceptance length (oracle drafts) and row counts that pad (5..1 running, buffers for 8)."""
    ps = prompts(5, seed=6)
    # the last request runs on alone for several steps: verify rows 5..1 (all prompts sample in their first step)
    params = [SamplingParams(temperature=0, max_tokens=8 + 5 * i + 16 * (i == 4), ignore_eos=True) for i in range(5)]
    ref = token_ids(make_llm(tiny["dense"]).generate(ps, params))
    llm = make_llm(tiny["dense"], 3)
    checker = FirstPassChecker(llm, max_rows=8)
    Oracle(llm, {tuple(p): r for p, r in zip(ps, ref)})
    assert token_ids(llm.generate(ps, params)) == ref
    assert checker.checked > 5 and checker.graphs.replays >= checker.checked
    assert llm.engine.spec_accepted_per_position[-1] > 0


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_mtp_head_at_query_rows_equals_the_full_pass(tiny, kind):
    """Asked for a few tokens' outputs (QueryRows: one per drafting request), the MTP head gives the full pass's
    outputs at those tokens and writes the same KV at every token of the step; asked for none, the same KV alone."""
    from deltaserve.cache.tensors import MTP_LAYER
    from deltaserve.config import ModelConfig
    from deltaserve.engine.device_inputs import build_forward_batch
    from deltaserve.layers.forward_batch import QueryRows
    from deltaserve.models.loader import load_model
    from tests.models.simple_runner import SimpleRunner

    model = load_model(ModelConfig.from_hf(tiny[kind]), dtype="float32", with_mtp=True)
    cache = SimpleRunner(model).cache
    kv = cache.attention(MTP_LAYER)
    g = torch.Generator().manual_seed(3)
    kv.k.copy_(torch.randn(kv.k.shape, generator=g))  # the rows' cached prefixes
    kv.v.copy_(torch.randn(kv.v.shape, generator=g))
    before = kv.k.clone(), kv.v.clone()
    # a verify-like step (two rows of 4 tokens after 37 and 5 cached ones) beside a 9-token prompt
    batch = build_forward_batch(query_lens=[4, 4, 9], context_lens=[37, 5, 0], state_slots=[0, 1, 2],
                                block_tables=[[3, 9, 4], [6], [1]], page_size=16, logits_indices=list(range(17)))
    next_ids = torch.randint(1, VOCAB, (17,), generator=g)
    hidden = torch.randn(17, model.config.hidden_size, generator=g)

    def run(rows):
        kv.k.copy_(before[0])
        kv.v.copy_(before[1])
        with torch.no_grad():
            out = model.mtp_forward(next_ids, hidden, batch, cache, rows)
        return out, kv.k.clone(), kv.v.clone()

    full, k_full, v_full = run(None)
    index, seqs = torch.tensor([2, 4, 16]), torch.tensor([0, 1, 2])  # mid-row, a row's first token, a prompt's last
    picked, k_picked, v_picked = run(QueryRows.at(batch, index, seqs))
    torch.testing.assert_close(picked, full[index], rtol=1e-5, atol=1e-5)
    none, k_none, v_none = run(QueryRows.none(batch))
    assert none.shape == (0, model.config.hidden_size) and not torch.equal(k_full, before[0])
    for k, v in ((k_picked, v_picked), (k_none, v_none)):
        assert torch.equal(k, k_full) and torch.equal(v, v_full)
    i = next(i for i, layer in enumerate(model.model.layers) if layer.layer_type == "linear_attention")
    with pytest.raises(ValueError, match="full-attention layers"):
        model.model.layers[i](hidden, None, batch, cache.layer(i), QueryRows.none(batch))


def test_draft_vocab_tiny(tiny):
    """A draft vocabulary of N ids: every draft is below N (the argmax over the lm_head's first N rows), outputs
    equal decoding without MTP."""
    ps = prompts(4, seed=7)
    ref = token_ids(make_llm(tiny["moe"]).generate(ps, GREEDY))
    llm = make_llm(tiny["moe"], 3, speculative_draft_vocab=64)
    drafter = llm.engine.runner.drafter
    assert drafter.vocab == 64
    seen = []
    propose = drafter.propose

    def spy(*args):
        drafts = propose(*args)
        seen.append(drafts)
        return drafts
    drafter.propose = spy
    assert token_ids(llm.generate(ps, GREEDY)) == ref
    assert seen and all(int(d.max()) < 64 for d in seen)
    hidden = torch.randn(3, llm.engine.runner.model.config.hidden_size)
    model = llm.engine.runner.model
    full, sub = model.compute_logits(hidden), model.compute_logits(hidden, vocab=64)
    assert sub.shape == (3, 64) and torch.equal(sub, full[:, :64])
    assert model.lm_head_rows(64).data_ptr() == model.lm_head.weight.data_ptr()  # a view, no copy


# ---- the demo model (it ships a trained MTP head) --------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo():
    llm = LLM(str(SHIPPED_DEMO_DIR), dtype="float32", device="cpu", max_model_len=1024)
    ids = llm.engine.tokenizer.encode((SHIPPED_DEMO_DIR / "heldout.txt").read_text())
    return llm, [ids[i * 400: i * 400 + 96] for i in range(6)]


def test_demo_greedy_equal_and_drafts_accepted(demo):
    base, ps = demo
    ps = ps[:4]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    ref = token_ids(base.generate(ps, params))
    for k in (1, 2, 3):
        llm = LLM(str(SHIPPED_DEMO_DIR), dtype="float32", device="cpu", max_model_len=1024, speculative_tokens=k)
        assert token_ids(llm.generate(ps, params)) == ref, f"K={k}"
        assert llm.engine.acceptance_length() > 1 + 0.5 * k  # measured ~1.9 / 2.6 / 3.2


def test_demo_draft_vocab_exact_greedy_and_seeded(demo):
    """With a draft vocabulary of 1/4 of the demo's ids, greedy and seeded sampled requests give the tokens they
    give without MTP (drafts outside the subset are never proposed; acceptance is still the sampler's own draw), and
    drafts are still accepted."""
    base, ps = demo
    ps = ps[:4]
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
              SamplingParams(temperature=0.8, top_p=0.9, max_tokens=24, seed=3, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
              SamplingParams(temperature=1.0, top_k=20, max_tokens=24, seed=4, ignore_eos=True)]
    ref = token_ids(base.generate(ps, params))
    llm = LLM(str(SHIPPED_DEMO_DIR), dtype="float32", device="cpu", max_model_len=1024, speculative_tokens=3,
              speculative_draft_vocab=1024)
    assert token_ids(llm.generate(ps, params)) == ref
    assert llm.engine.acceptance_length() > 1.5


def test_demo_seeded_sampling_equal_token_for_token(demo):
    """Acceptance is coupled to the sampler's own seeded draw: a seeded request gives the same tokens (and
    logprobs) with drafts as without, whatever the processors."""
    base, ps = demo
    params = [SamplingParams(temperature=0.8, top_k=20 if i % 2 else 0, top_p=0.9, min_p=0.02 * (i % 3),
                             max_tokens=32, seed=100 + i, ignore_eos=True, logprobs=2,
                             repetition_penalty=1.1 if i % 2 else 1.0, frequency_penalty=0.3 if i == 3 else 0.0,
                             presence_penalty=0.2 if i == 4 else 0.0) for i in range(len(ps))]
    ref = base.generate(ps, params)
    llm = LLM(str(SHIPPED_DEMO_DIR), dtype="float32", device="cpu", max_model_len=1024, speculative_tokens=3)
    got = llm.generate(ps, params)
    assert token_ids(got) == token_ids(ref)
    for a, b in zip(ref, got):
        assert len(a.outputs[0].logprobs) == len(b.outputs[0].logprobs) == 32
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert x.token_id == y.token_id and [t for t, _ in x.top] == [t for t, _ in y.top]
            assert abs(x.logprob - y.logprob) < 1e-4
    assert llm.engine.spec_counters["spec_accepted_tokens"] > 0


def test_demo_stops_limits_n_and_streaming(demo):
    base, ps = demo
    kw = dict(temperature=0, ignore_eos=True)
    params = [SamplingParams(max_tokens=7, **kw),  # max_tokens reached inside an accepted run
              SamplingParams(max_tokens=40, stop=["\n"], **kw),
              SamplingParams(max_tokens=40, stop=["(", " = "], include_stop_str_in_output=True, **kw),
              SamplingParams(max_tokens=40, stop_token_ids=[ps[3][5]], **kw),
              SamplingParams(max_tokens=25, n=3, temperature=1.0, seed=7, ignore_eos=True),
              SamplingParams(max_tokens=30, min_tokens=12, stop=["\n"], **kw)]
    ref = base.generate(ps, params)
    llm = LLM(str(SHIPPED_DEMO_DIR), dtype="float32", device="cpu", max_model_len=1024, speculative_tokens=3)
    got = llm.generate(ps, params)
    for a, b in zip(ref, got):
        assert [(o.token_ids, o.text, o.finish_reason) for o in a.outputs] == \
            [(o.token_ids, o.text, o.finish_reason) for o in b.outputs]
    # several tokens per delta when drafts are accepted
    engine = llm.engine
    engine.add_request("s", ps[0], SamplingParams(max_tokens=30, **kw))
    sizes = []
    while engine.has_unfinished():
        sizes += [len(d.token_ids) for d in engine.step() if d.request_id == "s"]
    assert sum(sizes) == 30 and max(sizes) > 1


def test_preemption_recomputes_with_drafts(tiny):
    ps = prompts(8, seed=3)
    ref = token_ids(make_llm(tiny["moe"]).generate(ps, GREEDY))
    reference = {tuple(p): r for p, r in zip(ps, ref)}
    llm = make_llm(tiny["moe"], 2, num_pages=20, page_size=16, max_model_len=256, enable_prefix_caching=False,
                   growth_reserve=False)
    Oracle(llm, reference)
    assert token_ids(llm.generate(ps, GREEDY)) == ref
    assert llm.engine.counters["preemptions"] > 0 and llm.engine.spec_counters["spec_accepted_tokens"] > 0


def test_abort_after_a_verify_step_that_kept_drafts(tiny):
    """A request aborted right after a verify step kept drafts for it (its GDN state commit still deferred): the
    others' outputs are those of the run without MTP, nothing leaks, and the same prompts again (served from the
    prefix cache, the aborted one's slot and pages reused) are exact."""
    ps = prompts(4, seed=9)
    ref = token_ids(make_llm(tiny["dense"]).generate(ps, GREEDY))
    llm = make_llm(tiny["dense"], 2, checkpoint_interval=16, page_size=16)
    Oracle(llm, {tuple(p): r for p, r in zip(ps, ref)})
    engine, out = llm.engine, {str(i): [] for i in range(4)}
    for i, p in enumerate(ps):
        engine.add_request(str(i), p, GREEDY)
    while engine.has_unfinished():
        for d in engine.step():
            out[d.request_id] += d.token_ids
            if d.request_id == "1" and len(d.token_ids) > 1 and not d.finished:
                assert engine.runner.uncommitted is not None
                engine.abort_request("1")
    assert out["1"] == ref[1][:len(out["1"])] and len(out["1"]) < len(ref[1])
    assert [out[str(i)] for i in (0, 2, 3)] == [ref[i] for i in (0, 2, 3)]
    assert engine.cache.is_empty()
    again = llm.generate(ps, GREEDY)
    assert token_ids(again) == ref and any(o.num_cached_tokens for o in again) and engine.cache.is_empty()


def test_verify_steps_run_while_the_queue_waits_for_memory(tiny):
    """KV pages for two of four long requests: two wait while the others decode. Their admission needs memory that
    only a finishing request gives back, so verify steps must go on meanwhile (the scheduler used to turn them off
    for as long as anything waited below max_num_seqs); the waiting ones are admitted once memory frees, and every
    output is that of the run without MTP."""
    g = torch.Generator().manual_seed(15)
    ps = [torch.randint(1, VOCAB, (100,), generator=g).tolist() for _ in range(4)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    kw = dict(page_size=16, num_pages=20, max_model_len=256, enable_prefix_caching=False)
    ref = token_ids(make_llm(tiny["dense"], **kw).generate(ps, params))
    llm = make_llm(tiny["dense"], 2, **kw)
    Oracle(llm, {tuple(p): r for p, r in zip(ps, ref)})
    engine, out = llm.engine, {str(i): [] for i in range(4)}
    for i, p in enumerate(ps):
        engine.add_request(str(i), p, params)
    verified_with_a_queue = 0
    while engine.has_unfinished():
        queued, before = engine.scheduler.num_waiting, engine.spec_counters["spec_verify_steps"]
        for d in engine.step():
            out[d.request_id] += d.token_ids
        verified_with_a_queue += bool(queued) and engine.spec_counters["spec_verify_steps"] > before
    assert [out[str(i)] for i in range(4)] == ref
    assert verified_with_a_queue > 5 and engine.counters["preemptions"] == 0


def test_turn_down_above_max_batch_and_metrics(tiny):
    ps = prompts(6, seed=4)
    params = [SamplingParams(temperature=0, max_tokens=4 + 4 * i, ignore_eos=True) for i in range(6)]
    ref = token_ids(make_llm(tiny["dense"]).generate(ps, params))
    llm = make_llm(tiny["dense"], 2, speculative_max_batch=4)
    assert token_ids(llm.generate(ps, params)) == ref
    stats = llm.engine.stats()
    assert stats["spec_turned_down_steps"] > 0 and stats["spec_verify_steps"] > 0  # 6 running, then fewer
    assert stats["spec_drafted_pos_0"] >= stats["spec_drafted_pos_1"] > 0
    assert stats["spec_graph_plain_steps"] == 0  # no prefill graphs on CPU: prompts ride the verify steps
    from deltaserve.server.metrics import ServerMetrics

    text = ServerMetrics("m").render(stats).decode()
    assert 'spec_decode_num_accepted_tokens_per_pos_total{model_name="m",position="1"}' in text


# ---- prefix caching: the MTP head's KV where a request resumes -------------------------------------------------------

class MTPTrace:
    """Runs one request alone and records what its MTP head saw: after every MTP head call (the real one), the head's
    KV at each position of the sequence; every draft proposed; the prompt tokens the prefix cache served."""

    def __init__(self, llm: LLM, prompt: list[int], params: SamplingParams) -> None:
        runner = llm.engine.runner
        model, drafter = runner.model, runner.drafter
        self.kv, self.drafts = None, []
        mtp_forward, propose = model.mtp_forward, drafter.propose

        def traced_forward(next_ids, hidden, batch, cache, rows=None):
            out = mtp_forward(next_ids, hidden, batch, cache, rows)
            self.kv = self.read_kv(batch, cache)
            return out

        def traced_propose(*args):
            drafts = propose(*args)
            self.drafts.append(drafts.tolist())
            return drafts

        model.mtp_forward, drafter.propose = traced_forward, traced_propose
        try:
            llm.engine.add_request("traced", prompt, params)
            deltas = []
            while llm.engine.has_unfinished():
                deltas += llm.engine.step()
        finally:
            model.mtp_forward, drafter.propose = mtp_forward, propose
        self.output = [t for d in deltas for t in d.token_ids]
        self.num_cached = next(d.num_cached_tokens for d in deltas if d.num_cached_tokens is not None)
        self.num_computed = len(prompt) + len(self.output) - 1  # the last token is sampled, never an input

    @staticmethod
    def read_kv(batch, cache) -> torch.Tensor:
        """[positions, 2, heads * head_dim]: the MTP head's K and V at every position of the batch's one sequence."""
        from deltaserve.cache.tensors import MTP_LAYER

        assert batch.block_tables.shape[0] == 1
        kv, n = cache.attention(MTP_LAYER), int(batch.seq_lens[0])
        pages = batch.block_tables[0, :-(-n // kv.k.shape[1])].long()
        return torch.stack([t[pages].flatten(0, 1)[:n].flatten(1) for t in (kv.k, kv.v)], dim=1).clone()

    def positions_unlike(self, other: "MTPTrace", tol: float = 1e-4) -> dict[int, float]:
        """Positions of the computed sequence whose MTP KV differs by more than tol, with the difference."""
        n = self.num_computed
        diff = (self.kv[:n] - other.kv[:n]).abs().flatten(1).amax(dim=1)
        return {i: round(float(diff[i]), 4) for i in (diff > tol).nonzero().flatten().tolist()}


@pytest.mark.parametrize("step_tokens", [None, 16])
def test_a_resumed_request_has_the_mtp_kv_and_drafts_of_an_uncached_run(tiny, step_tokens):
    """The MTP head's KV at position i is computed from the target's hidden state at i and the token at i + 1. A
    request resuming from a checkpoint at p reuses the KV of positions < p, that at p - 1 first computed from the
    token the checkpoint's own request had at p: at every position it must equal the uncached run's (and so must the
    drafts), whatever token follows p, without touching the pages other requests share. Checkpoints at 32 (the
    interval, a page multiple) and 39 (the last position) of a 40-token prompt, then: the same prompt, a longer one,
    one with another token at 39, one with another token at 32, the same prompt again (its pages up to 32 shared with
    the previous one), the next turn of a chat (from the end of the first generation). Whole prompts in one step, or
    chunked prefill (16 tokens a step)."""
    g = torch.Generator().manual_seed(11)
    base, tail = torch.randint(1, VOCAB, (40,), generator=g).tolist(), torch.randint(1, VOCAB, (9,), generator=g)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    budget = {} if step_tokens is None else {"max_num_batched_tokens": step_tokens}
    cached = make_llm(tiny["dense"], 2, checkpoint_interval=32, **budget)
    plain = make_llm(tiny["dense"], 2, enable_prefix_caching=False, **budget)
    first = MTPTrace(cached, base, params)
    assert first.num_cached == 0 and not first.positions_unlike(MTPTrace(plain, base, params))
    tail = tail.tolist()
    for prompt, resumed_at in ((base, 39), (base + tail, 39), (base[:39] + [base[39] % (VOCAB - 1) + 1] + tail, 39),
                               (base[:32] + [base[32] % (VOCAB - 1) + 1] + tail, 32), (base, 39),
                               (base + first.output + tail, first.num_computed)):
        got, want = MTPTrace(cached, prompt, params), MTPTrace(plain, prompt, params)
        assert got.output == want.output and got.num_cached == resumed_at
        assert got.positions_unlike(want) == {} and got.drafts == want.drafts


def test_the_next_turn_after_accepted_drafts_and_a_stop_token_has_the_uncached_mtp_kv(tiny):
    """A generation whose verify steps kept drafts (oracle drafts), ended by a stop token that was an accepted draft
    (the token sampled after it is dropped, yet the slot's state is past the stop token): the next turn resumes from
    the end of the generation with the uncached run's MTP KV and drafts (the kept hidden state is the last kept
    position's, not the verify row's last)."""
    g = torch.Generator().manual_seed(12)
    prompt, tail = torch.randint(1, VOCAB, (30,), generator=g).tolist(), torch.randint(1, VOCAB, (6,), generator=g)
    ref = token_ids(make_llm(tiny["dense"]).generate([prompt], SamplingParams(temperature=0, max_tokens=16,
                                                                               ignore_eos=True)))[0]
    cached = make_llm(tiny["dense"], 2)
    oracle = Oracle(cached, {tuple(prompt): ref})
    first = MTPTrace(cached, prompt, SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[ref[5]]))
    assert first.output == ref[:6] and cached.engine.spec_counters["spec_accepted_tokens"] > 0
    cached.engine.runner.drafter.propose = oracle.propose
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    turn = prompt + first.output + tail.tolist()
    got, want = MTPTrace(cached, turn, params), MTPTrace(make_llm(tiny["dense"], 2, enable_prefix_caching=False),
                                                         turn, params)
    assert got.output == want.output and got.num_cached == len(prompt) + 6  # the stop token computed too
    assert got.positions_unlike(want) == {} and got.drafts == want.drafts


def test_prompt_logprobs_chunks_write_the_mtp_kv(tiny):
    """A prompt-logprobs request prefilled in chunks (16 tokens a step): its first chunks sample nothing but have
    logits rows (the prompt's scores), and the MTP head must still write its KV there, as it does for a chunk
    without logits: the head's KV at every position and the drafts equal those of the same request without prompt
    logprobs (outputs and prompt scores are those of the run without MTP)."""
    g = torch.Generator().manual_seed(14)
    prompt = torch.randint(1, VOCAB, (40,), generator=g).tolist()
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    scored = dataclasses.replace(greedy, prompt_logprobs=1)
    kw = dict(enable_prefix_caching=False, max_num_batched_tokens=16)
    got, want = MTPTrace(make_llm(tiny["dense"], 2, **kw), prompt, scored), \
        MTPTrace(make_llm(tiny["dense"], 2, **kw), prompt, greedy)
    assert got.output == want.output and got.positions_unlike(want) == {} and got.drafts == want.drafts
    ref = make_llm(tiny["dense"], **kw).generate([prompt], scored)[0]
    out = make_llm(tiny["dense"], 2, **kw).generate([prompt], scored)[0]
    assert [(p.token_id, round(p.logprob, 4)) for p in out.prompt_logprobs[1:]] == \
        [(p.token_id, round(p.logprob, 4)) for p in ref.prompt_logprobs[1:]]


class ChainedKV:
    """Runs one request for its first step (the prompt, whole or in chunks, until it samples) and records, for each
    chained draft pass (one token per row, after the first pass), its positions and whether their KV was written."""

    def __init__(self, llm: LLM, prompt: list[int]) -> None:
        engine, model = llm.engine, llm.engine.runner.model
        self.written: dict[int, bool] = {}
        mtp_forward = model.mtp_forward

        def traced(next_ids, hidden, batch, cache, rows=None):
            if batch.tokens_per_row == 1 and not batch.any_padding and int(batch.positions.min()) >= len(prompt):
                self.written.update(zip(batch.positions.tolist(), (batch.slot_mapping >= 0).tolist()))
            return mtp_forward(next_ids, hidden, batch, cache, rows)

        model.mtp_forward = traced
        engine.add_request("chained", prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        while not any(d.token_ids for d in engine.step()):
            pass
        model.mtp_forward = mtp_forward
        from deltaserve.cache.tensors import MTP_LAYER

        cache, pages = engine.runner.cache, engine.cache.allocation("chained").pages
        kv = cache.attention(MTP_LAYER)
        at = [p for p in sorted(self.written) if p // kv.k.shape[1] < len(pages)]
        self.kv = torch.stack([t[torch.tensor(pages)].flatten(0, 1)[at].flatten(1) for t in (kv.k, kv.v)], dim=1)
        engine.abort_request("chained")


@pytest.mark.parametrize("length", [31, 32])
def test_an_admission_step_that_samples_holds_pages_for_the_chained_drafts(tiny, length):
    """A prompt computed whole in its admission step samples, and the drafter chains K - 1 more MTP passes at the
    positions after the prompt, writing the head's KV there and attending to it: the request must hold pages for
    them, as a running request's last chunk does, or the KV is not written and the chain attends to whatever the
    page table's padding points at. Page 16, K = 3, prompts of 31 and 32 tokens: the chain's positions 32 and 33 lie
    past the prompt's pages; their KV is written, and equals that of a run whose last chunk came after admission."""
    g = torch.Generator().manual_seed(length)
    prompt = torch.randint(1, VOCAB, (length,), generator=g).tolist()
    kw = dict(enable_prefix_caching=False, page_size=16)
    whole = ChainedKV(make_llm(tiny["dense"], 3, **kw), prompt)
    chunked = ChainedKV(make_llm(tiny["dense"], 3, max_num_batched_tokens=16, **kw), prompt)
    assert sorted(whole.written) == sorted(chunked.written) == [length, length + 1]
    assert all(whole.written.values()) and all(chunked.written.values())
    assert torch.allclose(whole.kv, chunked.kv, atol=1e-4)


NEXT_TURN = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.mark.parametrize("end,last", [("stop_token", 1), ("stop_token", 3), ("stop_string", 4), ("length", 4)])
def test_the_end_checkpoint_is_at_an_end_inside_the_kept_tokens(tiny, end, last):
    """A generation ends at output `last` (a stop token, a stop string completed there, or max_tokens) while its
    drafts are all right (K = 2: output 0 comes from the prompt's step, then every verify step keeps 3 tokens, so
    output i is an accepted draft iff i % 3 != 0, and outputs 1 and 4 are followed by two more kept tokens). The next
    turn (prompt + output + 6 tokens) must resume from the end of the generation: where a run without drafts does,
    or one position further when the last token was an accepted draft (computed as the input of the position after
    it), with the GDN state and the MTP head's KV there exact (the uncached run's tokens, MTP KV and drafts). The
    scheduler gives no draft past max_tokens, so a length limit never ends inside the kept tokens."""
    path = tiny["dense"]
    g = torch.Generator().manual_seed(12)
    prompt, tail = torch.randint(1, VOCAB, (30,), generator=g).tolist(), torch.randint(1, VOCAB, (6,), generator=g)
    ref = token_ids(make_llm(path).generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)))[0]
    plain = make_llm(path)
    text = plain.get_tokenizer().decode(ref[1:last + 1])  # output 0 alone decodes to an invalid byte
    params = SamplingParams(**{"temperature": 0, "max_tokens": 16} | {
        "stop_token": dict(stop_token_ids=[ref[last]]), "stop_string": dict(stop=[text]),
        "length": dict(max_tokens=last + 1, ignore_eos=True)}[end])
    assert token_ids(plain.generate([prompt], params))[0] == ref[:last + 1]  # it ends at `last`
    turn = prompt + ref[:last + 1] + tail.tolist()
    without_drafts = plain.generate([turn], NEXT_TURN)[0].num_cached_tokens
    cached = make_llm(path, 2)
    oracle = Oracle(cached, {tuple(prompt): ref}, always_right=True)
    first = MTPTrace(cached, prompt, params)
    assert first.output == ref[:last + 1]
    cached.engine.runner.drafter.propose = oracle.propose
    got, want = MTPTrace(cached, turn, NEXT_TURN), MTPTrace(make_llm(path, 2, enable_prefix_caching=False), turn,
                                                            NEXT_TURN)
    assert got.num_cached == without_drafts + (end != "length" and last % 3 != 0)
    assert got.output == want.output and got.positions_unlike(want) == {} and got.drafts == want.drafts


def test_two_requests_ending_inside_one_verify_step_both_leave_their_end_checkpoint(tiny):
    """Two requests (drafts all right, K = 2) stop in the same verify step, each at an accepted draft followed by two
    kept tokens (the second request's prompt is computed a step later: its outputs 1-3 come with the first's 4-6):
    each next turn resumes from the end of its generation (the stop token computed) with the uncached run's tokens.
    The first end's checkpoint must not commit the other's state past its stop before the other's end is placed."""
    path = tiny["dense"]
    g = torch.Generator().manual_seed(13)
    ps = [torch.randint(1, VOCAB, (30,), generator=g).tolist() for _ in range(2)]
    tail = torch.randint(1, VOCAB, (6,), generator=g).tolist()
    refs = token_ids(make_llm(path).generate(ps, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)))
    lasts = (4, 1)
    assert all(r[i] not in r[:i] for r, i in zip(refs, lasts))
    cached = make_llm(path, 2)
    oracle = Oracle(cached, {tuple(p): r for p, r in zip(ps, refs)}, always_right=True)
    runner, shortened = cached.engine.runner, []
    keep_fewer = runner.keep_fewer

    def recorded(request_id, num):  # the real call; records which verify step it shortened
        shortened.append((request_id, num, id(runner.uncommitted.step)))
        keep_fewer(request_id, num)

    runner.keep_fewer = recorded
    first = token_ids(cached.generate(ps, [SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[r[i]])
                                           for r, i in zip(refs, lasts)]))
    assert first == [r[:i + 1] for r, i in zip(refs, lasts)]
    assert [c[:2] for c in shortened] == [("0", 1), ("1", 1)] and shortened[0][2] == shortened[1][2]
    cached.engine.runner.drafter.propose = oracle.propose
    turns = [p + r[:i + 1] + tail for p, r, i in zip(ps, refs, lasts)]
    got = cached.generate(turns, NEXT_TURN)
    want = make_llm(path, 2, enable_prefix_caching=False).generate(turns, NEXT_TURN)
    assert [o.num_cached_tokens for o in got] == [len(p) + i + 1 for p, i in zip(ps, lasts)]
    assert token_ids(got) == token_ids(want)


# ---- simulated acceptance (benchmarks with dummy weights) -----------------------------------------------------------

def test_acceptance_probability():
    from deltaserve.engine.speculative import acceptance_probability

    assert acceptance_probability(1.0, 3) < 1e-12 and acceptance_probability(4.0, 3) > 1 - 1e-12
    for mean, k in ((3.39, 3), (1.93, 1), (2.5, 4)):
        p = acceptance_probability(mean, k)
        assert math.isclose(sum(p ** j for j in range(k + 1)), mean, rel_tol=1e-12)


def test_simulated_acceptance_forces_a_prefix_of_the_drafts():
    """force() on a verify step's rows [last token, d1 .. dK]: the sampled tokens at accepted positions become the
    drafts, accepted positions form a prefix (d_j only after d_1 .. d_j-1), the last position (the token after the
    last draft) is never touched, and kept_counts then averages the chosen mean; the prefill rows a verify step
    carries after its verify rows (their last tokens sampled) and a plain step are left alone, keeping 1 each."""
    from types import SimpleNamespace

    from deltaserve.engine.speculative import SimulatedAcceptance, kept_counts
    from deltaserve.engine.step_input import SamplingRequest

    rows, k = 20000, 4
    row = SamplingRequest("r", SamplingParams(), 0, draft_token_ids=(0,) * (k - 1))
    prefill = SamplingRequest("p", SamplingParams(), 0)
    step = SimpleNamespace(is_verify=True, num_drafts=k - 1, num_verify_rows=rows,
                           sampling=[row] * rows + [prefill] * 2)
    inputs = torch.arange(rows * k + 2) + 1  # drafts: columns 1 .. K of each verify row; then the prefill rows' own
    for mean in (1.0, 2.5, 4.0):
        tokens = -torch.arange(rows * k + 2)  # nothing matches a draft by chance
        SimulatedAcceptance(mean, k - 1, torch.device("cpu")).force(step, inputs, tokens)
        sampled = tokens[:rows * k].view(rows, k)
        forced = sampled[:, :-1] == inputs[:rows * k].view(rows, k)[:, 1:]
        assert torch.equal(forced, forced.long().cumprod(dim=1).bool())  # a prefix
        assert torch.equal(sampled[:, -1], -torch.arange(rows * k).view(rows, k)[:, -1])
        assert tokens[rows * k:].tolist() == [-rows * k, -rows * k - 1]
        kept = kept_counts(step, inputs, tokens)
        assert kept[rows:].tolist() == [1, 1]
        assert abs(float(kept[:rows].double().mean()) - mean) < 0.03, (mean, float(kept[:rows].double().mean()))
    plain = SimpleNamespace(is_verify=False, num_drafts=0, num_verify_rows=0, sampling=[None] * 2)
    tokens = torch.tensor([7, 9])
    SimulatedAcceptance(4.0, 3, torch.device("cpu")).force(plain, torch.tensor([1, 2]), tokens)
    assert tokens.tolist() == [7, 9]


def test_simulated_acceptance_options(tiny):
    dense = str(tiny["dense"])
    cfg = EngineArgs(model=dense, speculative_tokens=3, speculative_simulated_acceptance=3.39,
                     load_format="dummy").create_engine_config()
    assert cfg.speculative.simulated_acceptance == 3.39
    for bad, match in ((dict(speculative_tokens=3, speculative_simulated_acceptance=4.5, load_format="dummy"),
                        "is 4.5; use a mean number of tokens a verify step keeps, 1 to 4"),
                       (dict(speculative_simulated_acceptance=2.0, load_format="dummy"), "speculative decoding, which "
                        "is off"),
                       (dict(speculative_tokens=2, speculative_simulated_acceptance=2.0), "needs load_format 'dummy'")):
        with pytest.raises(ConfigError, match=match):
            EngineArgs(model=dense, **bad).create_engine_config()


class ForcedPositions:
    """Records, for each prompt, the output positions whose token a verify step's simulated acceptance replaced by
    a draft (every draft is accepted at a mean of 1 + K)."""

    def __init__(self, llm: LLM) -> None:
        self.engine, self.forced = llm.engine, {}
        simulated = llm.engine.runner.simulated
        self.force, simulated.force = simulated.force, self

    def __call__(self, step, input_ids, token_ids):
        self.force(step, input_ids, token_ids)
        for s in step.sampling if step.is_verify else ():
            prompt = tuple(self.engine.scheduler.get_request(s.request_id).prompt_token_ids)
            self.forced.setdefault(prompt, set()).update(s.num_output_tokens + j for j in range(step.num_drafts))


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_simulated_acceptance_keeps_the_engine_consistent(tiny, kind):
    """Every draft accepted (mean 1 + K): each verify step keeps its drafts and the target's token after them. Every
    token that is not a draft must be what the model without drafts picks after the same tokens (the KV and GDN
    states the verify forward left are those of the kept tokens). Then a mean of 2.5: the tokens kept per verify
    step average near it."""
    ps, n = prompts(3, seed=6), 17
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    llm = make_llm(tiny[kind], 3, load_format="dummy", speculative_simulated_acceptance=4.0)
    forced = ForcedPositions(llm)
    outs = token_ids(llm.generate(ps, params))
    counters = llm.engine.spec_counters
    assert counters["spec_accepted_tokens"] == counters["spec_draft_tokens"] >= 3 * len(ps) * 3
    targets = [(p + o[:t], o[t]) for p, o in zip(ps, outs) for t in range(n) if t not in forced.forced[tuple(p)]]
    assert len(targets) >= len(ps) * 4
    plain = make_llm(tiny[kind], load_format="dummy")
    first = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    assert token_ids(plain.generate([prefix for prefix, _ in targets], first)) == [[t] for _, t in targets]

    llm = make_llm(tiny[kind], 3, load_format="dummy", speculative_simulated_acceptance=2.5)
    llm.generate(prompts(6, seed=7), SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    drafted, accepted = llm.engine.spec_drafted_per_position, llm.engine.spec_accepted_per_position
    rows = drafted[0]  # verify rows: every one has a first draft
    mean = 1 + sum(accepted) / rows
    assert rows > 60 and abs(mean - 2.5) < 0.4, (rows, mean)


# ---- the sampled distribution ----------------------------------------------------------------------------------------

def _chi2_pvalue(observed: list[int], expected: list[float]) -> float:
    """Pearson's chi-square goodness of fit; cells expected below 5 are pooled."""
    obs, exp, pool_o, pool_e = [], [], 0, 0.0
    for o, e in zip(observed, expected):
        if e < 5:
            pool_o, pool_e = pool_o + o, pool_e + e
        else:
            obs.append(o)
            exp.append(e)
    if pool_e > 0:
        obs.append(pool_o)
        exp.append(pool_e)
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    df = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


class BestGuess:
    """Drafts the most likely next token under the exact distribution (when known, else token 0), so that most
    drafts are accepted and the acceptance and correction paths both run often."""

    def __init__(self, llm: LLM, best: dict[tuple[int, ...], int]) -> None:
        self.engine, self.best = llm.engine, best
        drafter = llm.engine.runner.drafter
        self.propose = drafter.propose
        drafter.propose = self

    def __call__(self, step, dev, input_ids, hidden, token_ids, kept):
        from deltaserve.engine.speculative import first_logits_rows

        drafts = self.propose(step, dev, input_ids, hidden, token_ids, kept).clone()
        firsts = first_logits_rows(step)
        for i, (s, n_kept) in enumerate(zip(step.sampling, kept.tolist())):
            request = self.engine.scheduler.get_request(s.request_id)
            prefix = tuple(request.output_token_ids) + tuple(token_ids[firsts[i]:firsts[i] + n_kept].tolist())
            for j in range(drafts.shape[1]):
                d = self.best.get(prefix, 0)
                drafts[i, j] = d
                prefix += (d,)
        return drafts


def test_sampled_distribution_is_the_targets(tiny):
    """3 tokens at temperature 1 with top_k = 3 (3 candidates per position, 27 sequences), 2000 samples (seeds
    12345 + i) with K = 2 drafts, against the exact probabilities computed from the model's logprobs: Pearson's
    chi-square, p-value threshold 0.001 (fixed seeds: deterministic). Drafts are the most likely tokens, so ~2/3 of
    them are accepted and both the acceptance and the correction path run."""
    path = tiny["dense"]
    base = make_llm(path)
    prompt = prompts(1, seed=9)[0]
    top = SamplingParams(temperature=0, max_tokens=1, logprobs=3)

    def dist(prefix):
        (entry,) = base.generate([prompt + list(prefix)], top)[0].outputs[0].logprobs
        ids, lps = zip(*entry.top)
        w = torch.tensor(lps, dtype=torch.float64).exp()
        return dict(zip(ids, (w / w.sum()).tolist()))

    exact: dict[tuple[int, ...], float] = {}
    best: dict[tuple[int, ...], int] = {}
    first = dist(())
    best[()] = max(first, key=first.get)
    for a, pa in first.items():
        second = dist((a,))
        best[(a,)] = max(second, key=second.get)
        for b, pb in second.items():
            third = dist((a, b))
            best[(a, b)] = max(third, key=third.get)
            for c, pc in third.items():
                exact[(a, b, c)] = pa * pb * pc
    assert math.isclose(sum(exact.values()), 1.0, rel_tol=1e-9)
    n = 2000
    llm = make_llm(path, 2, max_num_seqs=128, speculative_max_batch=128, max_num_batched_tokens=4096)
    BestGuess(llm, best)
    params = SamplingParams(temperature=1.0, top_k=3, max_tokens=3, n=n, seed=12345, ignore_eos=True)
    (out,) = llm.generate([prompt], params)
    counts = Counter(tuple(o.token_ids) for o in out.outputs)
    assert set(counts) <= set(exact)
    keys = sorted(exact)
    p = _chi2_pvalue([counts[k] for k in keys], [n * exact[k] for k in keys])
    assert p > 1e-3, p
    c = llm.engine.spec_counters
    assert c["spec_draft_tokens"] > 0 and 0.2 < c["spec_accepted_tokens"] / c["spec_draft_tokens"] < 0.95


# ---- constrained requests in verify steps ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_eos(tmp_path_factory):
    """A tiny MoE checkpoint with an MTP head and end tokens (a grammar needs them to end)."""
    path = tmp_path_factory.mktemp("spec_structured")
    save_checkpoint(TinySpec("spec_structured", moe=True, mtp=True, extra={"vocab_size": VOCAB}), path, seed=5)
    write_byte_tokenizer(path)
    (path / "generation_config.json").write_text('{"eos_token_id": [256, 258]}')
    return path


class VerifyRows:
    """Records each verify step's sampling rows as (request id, placeholder drafts?, constrained?), and the drafts
    its real rows verify."""

    def __init__(self, llm: LLM) -> None:
        runner = llm.engine.runner
        self.launch, runner.launch, self.steps, self.real_drafts = runner.launch, self, [], 0

    def __call__(self, step):
        if step.is_verify:
            self.steps.append([(s.request_id, s.placeholder_drafts, s.params.structured is not None)
                               for s in step.sampling])
            self.real_drafts += sum(len(s.draft_token_ids) for s in step.sampling if not s.placeholder_drafts)
        return self.launch(step)


class BatchSamplingFails:
    """A sampler that fails on any batch wider than one request's verify rows: the runner then samples request by
    request, each constrained request with its own rows of the grammar mask."""

    def __init__(self, llm: LLM, rows: int) -> None:
        runner = llm.engine.runner
        self.sampler, self.rows, runner.sampler = runner.sampler, rows, self

    def __call__(self, logits, rows, grammar=None):
        if len(rows) > self.rows:
            raise RuntimeError("a batch the test refuses")
        return self.sampler(logits, rows, grammar)


def mixed_params() -> list[SamplingParams]:
    from deltaserve.structured import StructuredSpec
    from tests.structured.schemas import SCHEMAS

    bounded = StructuredSpec.json_schema(SCHEMAS["bounded"])
    return [SamplingParams(structured=StructuredSpec.regex(r"[a-z]{2,6}\([0-9]{1,3}(, [0-9]{1,3}){0,4}\)"),
                           temperature=0, max_tokens=24, logprobs=2),
            SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=1),
            SamplingParams(structured=bounded, temperature=1.0, seed=3, repetition_penalty=1.2, max_tokens=24,
                           logprobs=1),
            SamplingParams(temperature=0.9, top_k=20, seed=4, max_tokens=24, ignore_eos=True, logprobs=2),
            SamplingParams(structured=bounded, temperature=0, presence_penalty=0.5, max_tokens=24),
            SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)]


@pytest.mark.parametrize("row_by_row", [False, True], ids=["batch", "row_by_row"])
def test_constrained_requests_ride_verify_steps_with_placeholder_drafts(tiny_eos, row_by_row):
    """Regex- and json_schema-constrained requests (greedy, seeded with penalties, logprobs) batched with plain
    ones: with MTP every output (tokens, logprobs, finish) is that of the run without MTP, verify steps run while the
    constrained requests do (their rows carry placeholder drafts), and the metrics count only the real drafts. With
    `row_by_row` the sampler refuses whole batches, so each request samples alone with its rows of the mask."""
    k = 3
    ps, params = prompts(6, seed=11), mixed_params()
    ref = make_llm(tiny_eos).generate(ps, params)
    llm = make_llm(tiny_eos, k)
    Oracle(llm, {tuple(p): list(o.outputs[0].token_ids) for p, o in zip(ps, ref)})  # plain rows' drafts: 60% right
    rows = VerifyRows(llm)
    if row_by_row:
        BatchSamplingFails(llm, 1 + k)
    got = llm.generate(ps, params)
    for a, b in zip(ref, got):
        x, y = a.outputs[0], b.outputs[0]
        assert (x.token_ids, x.text, x.finish_reason) == (y.token_ids, y.text, y.finish_reason)
        assert (x.logprobs is None) == (y.logprobs is None)
        for u, v in zip(x.logprobs or (), y.logprobs or ()):
            assert u.token_id == v.token_id and [t for t, _ in u.top] == [t for t, _ in v.top]
            assert abs(u.logprob - v.logprob) < 1e-5
            assert all(abs(p - q) < 1e-5 for (_, p), (_, q) in zip(u.top, v.top))
    assert any(o.outputs[0].finish_reason == "stop" for o, p in zip(got, params) if p.structured is not None)
    # verify steps ran beside constrained requests, whose rows had placeholder drafts (so had the rows of plain
    # requests one token short of max_tokens, which can verify no draft)
    mixed = [step for step in rows.steps if any(constrained for _, _, constrained in step)]
    assert len(mixed) >= 3
    assert all(placeholder for step in rows.steps for _, placeholder, constrained in step if constrained)
    real = sum(not placeholder for step in rows.steps for _, placeholder, _ in step)
    stats = llm.engine.stats()
    assert stats["spec_verify_steps"] == len(rows.steps)
    assert stats["spec_draft_tokens"] == rows.real_drafts and stats["spec_drafted_pos_0"] == real
    assert 0 < stats["spec_accepted_tokens"] < stats["spec_draft_tokens"]


def test_simulated_acceptance_never_forces_a_placeholder(tiny_eos):
    """Every real draft accepted (mean 1 + K) with dummy weights: the constrained requests' outputs are still those
    the model gives without MTP under their grammars, and drafted = accepted (placeholders count as neither)."""
    from deltaserve.structured import StructuredSpec

    ps = prompts(4, seed=12)
    regex = SamplingParams(structured=StructuredSpec.regex(r"[a-z]{3,8}=[0-9]{1,4};"), temperature=0, max_tokens=16)
    params = [regex, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)] * 2
    ref = make_llm(tiny_eos, load_format="dummy").generate(ps, params)
    llm = make_llm(tiny_eos, 3, load_format="dummy", speculative_simulated_acceptance=4.0)
    rows = VerifyRows(llm)
    got = llm.generate(ps, params)
    for i in (0, 2):
        assert got[i].outputs[0].token_ids == ref[i].outputs[0].token_ids
    assert any(constrained for step in rows.steps for _, _, constrained in step)
    c = llm.engine.spec_counters
    assert c["spec_accepted_tokens"] == c["spec_draft_tokens"] > 0


def test_demo_constrained_and_plain_requests_equal_no_mtp(demo):
    """The demo model (a trained MTP head: real acceptance), json_schema / regex constrained requests beside plain
    ones: every output and logprob as without MTP, verify steps while the constrained requests run, drafts
    accepted, placeholders not counted."""
    from deltaserve.structured import StructuredSpec
    from tests.structured.schemas import SCHEMAS

    base, ps = demo
    params = [SamplingParams(structured=StructuredSpec.json_schema(SCHEMAS["bounded"]), seed=1, temperature=1.0,
                             logprobs=2, max_tokens=40),
              SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=1),
              SamplingParams(structured=StructuredSpec.regex(r"[a-z_]{2,10}\([0-9]{1,3}(, [0-9]{1,3}){0,3}\)"),
                             temperature=0, max_tokens=30, logprobs=1),
              SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_tokens=32, ignore_eos=True, logprobs=2),
              SamplingParams(structured=StructuredSpec.json_schema(SCHEMAS["nested"]), seed=2, temperature=0.7,
                             repetition_penalty=1.1, max_tokens=40),
              SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)]
    ref = base.generate(ps, params)
    llm = LLM(str(SHIPPED_DEMO_DIR), dtype="float32", device="cpu", max_model_len=1024, speculative_tokens=3)
    rows = VerifyRows(llm)
    got = llm.generate(ps, params)
    for a, b in zip(ref, got):
        x, y = a.outputs[0], b.outputs[0]
        assert (x.token_ids, x.text, x.finish_reason) == (y.token_ids, y.text, y.finish_reason)
        for u, v in zip(x.logprobs or (), y.logprobs or ()):
            assert u.token_id == v.token_id and abs(u.logprob - v.logprob) < 1e-4
    assert sum(any(c for _, _, c in step) for step in rows.steps) >= 5
    assert llm.engine.spec_counters["spec_draft_tokens"] == rows.real_drafts
    assert llm.engine.acceptance_length() > 1.5
