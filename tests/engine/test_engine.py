"""The whole engine on CPU: batch invariance (chunked prefill, mixed batches, preemption) against each request run
alone and against transformers' generate; sampling, stops, logprobs, n > 1; pools full after every kind of end."""

from __future__ import annotations

import math

import pytest
import torch

from deltaserve import LLM, SamplingParams
from deltaserve.demo import write_byte_tokenizer
from deltaserve.engine.engine import RequestError
from tests.models.factory import TinySpec, save_checkpoint

VOCAB = 320  # the byte tokenizer has 265 ids; the rest are padding rows, as in real checkpoints


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("engine_ckpt")
    spec = TinySpec("engine", moe=True, gva=2, extra={"vocab_size": VOCAB})
    hf = save_checkpoint(spec, path, seed=3)
    write_byte_tokenizer(path)
    (path / "generation_config.json").write_text('{"eos_token_id": [256, 258]}')
    return path, hf


def make_llm(path, **kw) -> LLM:
    kw.setdefault("max_model_len", 512)
    return LLM(str(path), dtype="float32", device="cpu", **kw)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 90, (n,), generator=g).tolist()
    return [torch.randint(1, 256, (L,), generator=g).tolist() for L in lengths]


def pools_full(llm: LLM) -> bool:
    s = llm.engine.scheduler
    return llm.engine.cache.is_empty() and not s.has_unfinished()


GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def alone(ckpt):
    """Each of 16 prompts run alone (one at a time, roomy pools)."""
    llm = make_llm(ckpt[0])
    ps = prompts(16)
    return ps, [llm.generate([p], GREEDY)[0].outputs[0].token_ids for p in ps]


def test_alone_matches_transformers_generate(ckpt, alone):
    _, hf = ckpt
    ps, outs = alone
    for p, got in list(zip(ps, outs))[:6]:
        ref = hf.generate(torch.tensor([p]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                          pad_token_id=0)[0, len(p):].tolist()
        assert got == ref


def test_repetition_penalty_matches_transformers_generate(ckpt):
    """The penalty reads each request's prompt (kept on the device by the engine) and output, as HF's processor
    reads input_ids; a batch with unpenalised company gives the same tokens, and the cached prompts are dropped."""
    path, hf = ckpt
    llm = make_llm(path)
    ps = prompts(3, seed=21)
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, repetition_penalty=1.8)
    outs = llm.generate(ps + prompts(2, seed=22), [sp] * 3 + [GREEDY] * 2)
    for p, out in zip(ps, outs):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                          repetition_penalty=1.8, pad_token_id=0)[0, len(p):].tolist()
        assert out.outputs[0].token_ids == ref
    assert not llm.engine.runner.prompt_tensors and pools_full(llm)
    plain = [o.outputs[0].token_ids for o in llm.generate(ps, SamplingParams(temperature=0, max_tokens=16,
                                                                              ignore_eos=True))]
    assert plain != [o.outputs[0].token_ids for o in outs[:3]], "the penalty changed nothing: a vacuous check"


@pytest.mark.parametrize("kw", [
    dict(),                                                    # everything in one batch
    dict(max_num_batched_tokens=37),                           # chunked prefill, prefill chunks beside decodes
    dict(max_num_batched_tokens=64, max_num_seqs=5),           # few running at once, the rest queue
    dict(num_pages=40, max_num_batched_tokens=128, growth_reserve=False),  # 640 KV tokens for 16: forced preemption
], ids=["one_batch", "chunked", "queued", "preemption"])
def test_batch_invariance(ckpt, alone, kw):
    ps, expected = alone
    llm = make_llm(ckpt[0], **kw)
    outs = llm.generate(ps, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert pools_full(llm)


def test_preemption_actually_happened(ckpt, alone):
    ps, expected = alone
    llm = make_llm(ckpt[0], num_pages=40, max_num_batched_tokens=128, growth_reserve=False)
    preempted = []
    real = llm.engine.scheduler.schedule

    def spy():
        out = real()
        preempted.extend(out.preempted)
        return out
    llm.engine.scheduler.schedule = spy
    outs = llm.generate(ps, GREEDY)
    assert preempted, "the small pool should have forced preemption"
    assert [o.outputs[0].token_ids for o in outs] == expected


def test_seeded_sampling_independent_of_batch_company(ckpt):
    llm = make_llm(ckpt[0])
    p = prompts(1, seed=5)[0]
    sp = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate([p], sp)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=0.8, max_tokens=10 + i, ignore_eos=True) for i in range(5)]
    outs = llm.generate(prompts(5, seed=6) + [p], others + [sp])
    assert outs[-1].outputs[0].token_ids == alone
    unseeded = [llm.generate([p], SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True))[0]
                .outputs[0].token_ids for _ in range(3)]
    assert len({tuple(u) for u in unseeded}) > 1  # unseeded sampling really samples


def test_n_samples_differ_and_are_reproducible(ckpt):
    llm = make_llm(ckpt[0])
    sp = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    a = llm.generate([prompts(1, 8)[0]], sp)[0]
    b = llm.generate([prompts(1, 8)[0]], sp)[0]
    assert len(a.outputs) == 3 and [o.index for o in a.outputs] == [0, 1, 2]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) == 3
    assert pools_full(llm)


def test_max_tokens_and_min_tokens_and_stop_ids(ckpt):
    llm = make_llm(ckpt[0])
    p = prompts(1, 9)[0]
    free = llm.generate([p], GREEDY)[0].outputs[0].token_ids
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=5))[0].outputs[0]
    assert len(out.token_ids) <= 5
    stop_tok = free[6]
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop_tok],
                                           ignore_eos=True))[0].outputs[0]
    first = free.index(stop_tok)
    assert out.token_ids == free[:first + 1] and out.finish_reason == "stop" and out.stop_reason == stop_tok
    # min_tokens suppresses the stop id until it has generated that many
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=24, min_tokens=first + 2,
                                           stop_token_ids=[stop_tok], ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) >= first + 2 and stop_tok not in out.token_ids[:first + 2]


def test_eos_ids_from_config_and_generation_config_stop(ckpt):
    llm = make_llm(ckpt[0])
    assert {256, 258} <= llm.engine.eos_ids  # <|endoftext|> and <|im_end|> of the byte tokenizer
    p = prompts(1, 10)[0]
    free = llm.generate([p], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0].outputs[0].token_ids
    llm.engine.outputs.eos_ids = frozenset({free[3]})  # the output side decides stops
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=30))[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids == free[:free.index(free[3]) + 1]
    assert out.stop_reason is None  # the end token is no stop the request asked for (vLLM gives None too)


def test_stop_strings_across_token_boundaries(ckpt):
    llm = make_llm(ckpt[0])
    tok = llm.get_tokenizer()
    p = prompts(1, 11)[0]
    full = llm.generate([p], GREEDY)[0].outputs[0]
    text = tok.decode(full.token_ids, skip_special_tokens=True)
    assert full.text == text
    # a 3-character window in the middle of the output, usually spanning several byte tokens
    printable = [i for i in range(3, len(text) - 3) if text[i:i + 3].isprintable() and "\ufffd" not in text[i:i + 3]]
    assert printable, "pick another prompt seed: this output has no printable window"
    i = printable[0]
    stop = text[i:i + 3]
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=24, stop=[stop], ignore_eos=True))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[:text.index(stop)]


def test_logprobs_are_a_distribution(ckpt):
    llm = make_llm(ckpt[0])
    out = llm.generate([prompts(1, 12)[0]], SamplingParams(temperature=0, max_tokens=6, logprobs=5))[0].outputs[0]
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids)
    for tok, lp in zip(out.token_ids, out.logprobs):
        vals = [v for _, v in lp.top]
        assert lp.token_id == tok and vals == sorted(vals, reverse=True) and len(vals) == 5
        assert lp.top[0][0] == tok and math.isclose(lp.top[0][1], lp.logprob, abs_tol=1e-5)  # greedy: best is taken
        assert sum(math.exp(v) for v in vals) <= 1 + 1e-5
    assert out.cumulative_logprob == pytest.approx(sum(t.logprob for t in out.logprobs))


def test_too_long_prompt_rejected_without_disturbing_others(ckpt):
    llm = make_llm(ckpt[0], max_model_len=128)
    p = prompts(1, 13)[0]
    before = llm.generate([p], GREEDY)[0].outputs[0].token_ids
    with pytest.raises(RequestError, match="max_model_len is 128"):
        llm.generate([p, list(range(1, 200))], GREEDY)
    assert pools_full(llm)
    assert llm.generate([p], GREEDY)[0].outputs[0].token_ids == before
    with pytest.raises(RequestError, match="outside the vocabulary"):
        llm.generate([[1, 2, VOCAB + 5]], GREEDY)
    with pytest.raises(RequestError, match=rf"logit_bias token ids \[{VOCAB}\] are outside"):  # was dropped
        llm.generate([p], SamplingParams(max_tokens=2, logit_bias={3: 1.0, VOCAB: 5.0}))
    with pytest.raises(RequestError, match=rf"allowed_token_ids \[{VOCAB}\] are outside"):
        llm.generate([p], SamplingParams(max_tokens=2, allowed_token_ids=[3, VOCAB]))
    assert pools_full(llm)


def test_duplicate_and_colliding_request_ids_are_refused_whole(ckpt):
    """A new request whose id (or one of its samples' ids) is in use is a RequestError and adds nothing: the live
    request it collides with finishes exactly as it would have alone."""
    llm = make_llm(ckpt[0])
    eng = llm.engine
    p, q = prompts(2, 17)
    two = SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=12, ignore_eos=True)
    alone = llm.generate([p], two)[0]
    eng.add_request("a", p, two)  # samples "a#0" and "a#1"
    for rid, params in (("a", GREEDY), ("a#0", GREEDY), ("a#1", two)):
        with pytest.raises(RequestError, match="already in use"):
            eng.add_request(rid, q, params)
    eng.add_request("b", q, SamplingParams(n=2, temperature=0, max_tokens=3, ignore_eos=True))  # "b#0", "b#1"
    with pytest.raises(RequestError, match="already in use"):
        eng.add_request("b#1", q, GREEDY)
    got: dict[tuple[str, int], list[int]] = {}
    while eng.has_unfinished():
        for d in eng.step():
            got.setdefault((d.request_id, d.index), []).extend(d.token_ids)
    assert sorted(got) == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    assert [got[("a", i)] for i in range(2)] == [o.token_ids for o in alone.outputs]
    assert pools_full(llm) and eng.outputs.num_live_samples == 0
    eng.add_request("a#0", q, GREEDY)  # free again once "a" has ended
    while eng.has_unfinished():
        eng.step()
    assert pools_full(llm)


@pytest.mark.parametrize("kw", [dict(), dict(max_num_batched_tokens=16, async_scheduling=True)],
                         ids=["one_chunk", "chunked_async"])
def test_prompt_logprobs_match_transformers(ckpt, kw):
    """Each prompt token's logprob (and top alternatives) under the model, as transformers computes it from the same
    prompt; the first is None. Chunked prefill spreads the scores over several steps; they come with the first
    delta. Sampling of the outputs is untouched."""
    path, hf = ckpt
    llm = make_llm(path, **kw)
    p = prompts(1, 23)[0]
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=3))[0]
    plain = llm.generate([p], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
    assert out.outputs[0].token_ids == plain.outputs[0].token_ids and plain.prompt_logprobs is None
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([p])).logits[0].double(), dim=-1)
    got = out.prompt_logprobs
    assert len(got) == len(p) and got[0] is None
    for i, entry in enumerate(got[1:]):
        assert entry.token_id == p[i + 1]
        assert math.isclose(entry.logprob, ref[i, p[i + 1]].item(), abs_tol=1e-4)
        top = ref[i].topk(3)
        assert [t for t, _ in entry.top] == top.indices.tolist()
        assert all(math.isclose(lp, v, abs_tol=1e-4) for (_, lp), v in zip(entry.top, top.values.tolist()))
        assert entry.rank == 1 + int((ref[i] > ref[i, p[i + 1]]).sum())  # vLLM's rank: 1 + the ids ranked above
    assert pools_full(llm)


def test_a_request_whose_sampling_raises_fails_alone(ckpt):
    """Parameters that make the sampler raise (here a top_k that bypassed validation and overflows int64) fail their
    own request only; a greedy request in the same steps gets exactly its tokens."""
    llm = make_llm(ckpt[0])
    p, q = prompts(2, 24)
    alone = llm.generate([q], GREEDY)[0].outputs[0].token_ids
    bad = SamplingParams(temperature=1.0, max_tokens=8)
    object.__setattr__(bad, "top_k", 2 ** 63)
    outs = llm.generate([p, q], [bad, GREEDY])
    assert outs[0].outputs[0].finish_reason == "error" and "overflow" in outs[0].error.lower()
    assert outs[1].outputs[0].token_ids == alone and outs[1].outputs[0].finish_reason == "length"
    assert pools_full(llm)


def test_generation_stops_at_max_model_len(ckpt):
    llm = make_llm(ckpt[0], max_model_len=64)
    out = llm.generate([list(range(1, 60))], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 64 - 59 and out[0].outputs[0].finish_reason == "length"
    assert pools_full(llm)


def test_abort_mid_generation_frees_pools(ckpt):
    llm = make_llm(ckpt[0])
    eng = llm.engine
    for i, p in enumerate(prompts(4, 14)):
        eng.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    for _ in range(3):
        eng.step()
    deltas = eng.abort_request("r1") + eng.abort_request("r3") + eng.abort_request("unknown")
    assert [d.finish_reason for d in deltas] == ["abort", "abort"]
    while eng.has_unfinished():
        eng.step()
    assert pools_full(llm)


def test_an_interrupt_while_reading_a_step_still_ends_the_requests_that_finished_in_it(ckpt):
    """Ends are applied after the whole step's stop checks; a Ctrl-C (or any error) while a later request's tokens
    were read once left an ended request running unseen in the scheduler, holding its slot and pages."""
    llm = make_llm(ckpt[0])
    eng = llm.engine
    real = eng.outputs.on_tokens

    def on_tokens(request, *args):
        if request.request_id == "long":
            raise KeyboardInterrupt
        return real(request, *args)

    eng.add_request("short", [1, 2, 3], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    eng.add_request("long", [4, 5, 6], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    eng.outputs.on_tokens = on_tokens
    with pytest.raises(KeyboardInterrupt):
        eng.step()  # both prompts in one step: "short" ends, then reading "long" raises
    eng.outputs.on_tokens = real
    eng.abort_request("long")
    assert not eng.has_unfinished()
    assert pools_full(llm)


def test_failed_step_fails_its_requests_not_the_engine(ckpt):
    llm = make_llm(ckpt[0])
    eng = llm.engine
    eng.add_request("bad", prompts(1, 15)[0], SamplingParams(temperature=0, max_tokens=4))
    real = eng.runner.execute_model
    eng.runner.execute_model = lambda *a: (_ for _ in ()).throw(RuntimeError("boom"))
    deltas = eng.step()
    assert deltas and deltas[0].finish_reason == "error" and "boom" in deltas[0].error
    eng.runner.execute_model = real
    assert pools_full(llm)
    assert llm.generate([prompts(1, 16)[0]], GREEDY)[0].outputs[0].finish_reason == "length"


def test_chat_renders_template_with_enable_thinking(ckpt):
    llm = make_llm(ckpt[0])
    msgs = [{"role": "user", "content": "hi"}]
    on = llm.chat(msgs, SamplingParams(temperature=0, max_tokens=2))[0]
    off = llm.chat(msgs, SamplingParams(temperature=0, max_tokens=2), chat_template_kwargs={"enable_thinking": False})[0]
    tok = llm.get_tokenizer()
    assert tok.decode(on.prompt_token_ids).endswith("<|im_start|>assistant\n<think>\n")
    assert tok.decode(off.prompt_token_ids).endswith("<think>\n\n</think>\n\n")
    both = llm.chat([msgs, msgs], SamplingParams(temperature=0, max_tokens=2))
    assert [o.outputs[0].token_ids for o in both] == [on.outputs[0].token_ids] * 2
    for bad in ("hello", msgs[0], [], [[]], [msgs, "hi"]):  # each failed deep inside, naming a character or a key
        with pytest.raises(TypeError, match="messages must be a conversation"):
            llm.chat(bad)


# ---- async scheduling (step n+1 launched before step n's tokens are read) -------------------------------------------
def _mixed_workload():
    ps = prompts(10, seed=50)
    params = [
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=30),                                  # may stop at eos
        SamplingParams(temperature=1.0, top_p=0.9, seed=3, max_tokens=25, ignore_eos=True),
        SamplingParams(temperature=0.8, top_k=20, seed=4, max_tokens=12, min_tokens=8),
        SamplingParams(temperature=0, max_tokens=40, stop=["a", "e"]),                 # stop strings
        SamplingParams(n=2, temperature=1.0, seed=9, max_tokens=15, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=18, ignore_eos=True, logprobs=3),
        SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=33, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, repetition_penalty=1.5),  # forces sync steps
    ]
    return ps, params


def _summary(outs):
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason,
              [round(lp.logprob, 4) for lp in (c.logprobs or [])]) for c in o.outputs] for o in outs]


@pytest.mark.parametrize("kw", [dict(), dict(num_pages=20, max_model_len=160, max_num_batched_tokens=40,
                                           growth_reserve=False)],
                         ids=["roomy", "preemption"])
def test_async_scheduling_gives_the_same_outputs(ckpt, kw):
    ps, params = _mixed_workload()
    sync = make_llm(ckpt[0], async_scheduling=False, **kw)
    overlapped = make_llm(ckpt[0], async_scheduling=True, **kw)
    assert overlapped.engine.async_scheduling and not sync.engine.async_scheduling
    preempted = []
    real = overlapped.engine.scheduler.schedule
    overlapped.engine.scheduler.schedule = lambda: (out := real(), preempted.extend(out.preempted))[0]
    expected = _summary(sync.generate(ps, params))
    assert _summary(overlapped.generate(ps, params)) == expected
    assert bool(preempted) == ("num_pages" in kw)
    assert _summary(overlapped.generate(ps[:9], params[:9])) == expected[:9]  # no penalised request: all overlapped
    assert pools_full(overlapped)


def test_async_step_returns_the_previous_steps_tokens_and_wastes_no_row(ckpt):
    # without prefix caching: a prompt that ends in the middle of a chunk is not cut at its checkpoint position
    llm = make_llm(ckpt[0], async_scheduling=True, enable_prefix_caching=False)
    eng = llm.engine
    rows = []
    real = eng.runner.execute_model

    def counting(dev, step):
        rows.append(step.num_rows)
        return real(dev, step)
    eng.runner.execute_model = counting
    eng.add_request("a", prompts(1, 51)[0], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert eng.step() == []                      # the prefill is launched; its token is read by the next step
    got = [len(d.token_ids) for d in eng.step()]
    assert got == [1] and eng._inflight is not None
    while eng.has_unfinished():
        eng.step()
    # 1 prefill + 4 decodes: the step for the 5th token's successor is never launched
    assert rows == [1] * 5 and pools_full(llm)
    eng.add_request("b", prompts(1, 52)[0], SamplingParams(temperature=0, max_tokens=5, repetition_penalty=1.3))
    assert len(eng.step()) == 1, "a penalised request makes each step wait for its own token"


def test_no_step_is_left_in_flight_after_generate(ckpt):
    """A request that ends on a stop string had one more decode launched; generate waits for it before returning
    (nothing of a finished call may still run on the device)."""
    llm = make_llm(ckpt[0], async_scheduling=True)
    outs = llm.generate(prompts(3, seed=53), SamplingParams(temperature=0, max_tokens=40, stop=["a", "e", "o"]))
    assert any(o.outputs[0].finish_reason == "stop" for o in outs)
    assert llm.engine._inflight is None and pools_full(llm)


def test_a_device_error_seen_when_reading_tokens_fails_that_step_only(ckpt):
    """On CUDA a fault in a step's kernels surfaces when the host waits for its tokens (the ready event): that
    step's requests end with an error, the engine goes on. The event is replaced by one that raises as a faulted
    CUDA event does, since a CPU run has none."""
    import dataclasses

    class FaultedEvent:
        def synchronize(self):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    llm = make_llm(ckpt[0], async_scheduling=True)
    eng = llm.engine
    real = eng.runner.launch
    eng.runner.launch = lambda step: dataclasses.replace(real(step), ready=FaultedEvent())
    eng.add_request("x", prompts(1, 54)[0], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    deltas = []
    while eng.has_unfinished():
        deltas += eng.step()
    assert [d.finish_reason for d in deltas] == ["error"] and "illegal memory access" in deltas[0].error
    eng.runner.launch = real
    assert pools_full(llm) and eng._inflight is None
    assert llm.generate([prompts(1, 55)[0]], GREEDY)[0].outputs[0].finish_reason == "length"


def test_generate_names_mistyped_sampling_params(ckpt):
    """A dict (vLLM-style kwargs) or a list holding something else is a TypeError naming sampling_params, before
    any request is queued (a dict was read as a list of its keys: AttributeError "'str' object has no attribute
    'n'"); a list of the wrong length still says how many were given."""
    llm = make_llm(ckpt[0])
    with pytest.raises(TypeError, match="sampling_params must be a SamplingParams or a list of them, got dict"):
        llm.generate([1, 2, 3], {"max_tokens": 3})
    with pytest.raises(TypeError, match="the list holds NoneType"):
        llm.generate([[1, 2, 3]], [None])
    with pytest.raises(ValueError, match="got 1 SamplingParams for 2 prompts"):
        llm.generate([[1, 2], [3]], [SamplingParams(max_tokens=2)])
    assert pools_full(llm)
    assert len(llm.generate([[1, 2], [3]], [GREEDY, GREEDY])) == 2


@pytest.mark.parametrize("layer", ["full_attention", "linear_attention"])
def test_a_model_of_one_layer_kind_matches_transformers(tmp_path, layer):
    """Without GDN layers a state slot takes no memory, without attention layers a page takes none: the memory plan
    divided by those sizes. Greedy tokens match transformers' own forward, a prefix-cache hit included."""
    hf = save_checkpoint(TinySpec(layer, layer_types=(layer,) * 2, extra={"vocab_size": VOCAB}), tmp_path, seed=3)
    prompt = prompts(1, seed=5)[0] + list(range(1, 40))
    seq = list(prompt)
    with torch.no_grad():  # transformers' generate() fails on a cache of linear layers only: a full forward per token
        for _ in range(6):
            seq.append(int(hf.float()(torch.tensor([seq]), use_cache=False).logits[0, -1].argmax()))
    llm = make_llm(tmp_path, max_model_len=128)
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    first, hit = (llm.generate([prompt], greedy)[0] for _ in range(2))
    assert hit.num_cached_tokens == len(prompt) - 1
    assert first.outputs[0].token_ids == hit.outputs[0].token_ids == seq[len(prompt):]
