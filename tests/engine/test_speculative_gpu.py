"""GPU tier for MTP speculative decoding (`pytest -m gpu tests/engine/test_speculative_gpu.py`, ~2-3 min, most of it
Triton compiles and graph captures): verify steps
under CUDA graphs against eager, the GPU multistep GDN kernel path against its reference, and the engine with MTP on
CUDA against the CPU reference and against decoding without drafts."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from deltaserve import LLM, SamplingParams
from deltaserve.demo import SHIPPED_DEMO_DIR
from tests.engine.test_speculative import (VOCAB, FirstPassChecker, MTPTrace, Oracle, prompts,  # noqa: F401
                                          tiny, token_ids)

pytestmark = pytest.mark.gpu

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def run(path, ps, params=GREEDY, **kw):
    llm = LLM(str(path), max_model_len=512, max_num_seqs=8, **kw)
    return token_ids(llm.generate(ps, params)), llm


def test_multistep_gdn_on_gpu_matches_the_reference():
    from deltaserve.kernels.gated_delta_rule import ref
    from deltaserve.kernels.gated_delta_rule import triton as gpu

    g = torch.Generator(device="cuda").manual_seed(0)
    n, k, hk, dk, hv, dv, w = 3, 4, 2, 32, 4, 32, 4
    conv_dim = 2 * hk * dk + hv * dv
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    args = dict(mixed_qkv=r(n * k, conv_dim), a=r(n * k, hv), b=r(n * k, hv), A_log=r(hv).abs().log(),
                dt_bias=r(hv), conv_weight=r(conv_dim, w) * 0.3, num_k_heads=hk, head_k_dim=dk, num_v_heads=hv,
                head_v_dim=dv, scale=dk ** -0.5, tokens_per_row=k)
    slots = torch.tensor([2, -1, 0], device="cuda")
    outs = []
    for impl in (ref, gpu):
        conv, ssm = r(4, w - 1, conv_dim) * 0 + 0.1, torch.zeros(4, hv, dk, dv, device="cuda") + 0.01
        conv_out = torch.zeros(n, k, w - 1, conv_dim, device="cuda")
        y_out = torch.zeros(n, k, conv_dim, device="cuda")
        gates_out = torch.zeros(n, k, 2, hv, device="cuda")
        o = impl.fused_gdn_multistep(**args, conv_state=conv, ssm_state=ssm, slots=slots, conv_states_out=conv_out,
                                     y_out=y_out, gates_out=gates_out)
        live = torch.tensor([0, 2], device="cuda")
        impl.replay_kept_states(states=ssm.unsqueeze(0), ys=y_out.unsqueeze(0), gates=gates_out.unsqueeze(0),
                                slots=slots[live], rows=live, num_kept=torch.tensor([3, 4], device="cuda"),
                                num_k_heads=hk, head_k_dim=dk, num_v_heads=hv, head_v_dim=dv)
        outs.append((o, conv_out[live], y_out[live], gates_out[live], conv.clone(), ssm.clone()))
    for x, y in zip(*outs):
        torch.testing.assert_close(x, y, rtol=2e-3, atol=2e-3)


def test_verify_graph_equals_eager(tiny):  # noqa: F811
    """A verify step (1 + K tokens per row, per-position GDN buffers) replayed from its CUDA graph gives the eager
    step's logits and the same per-position buffers (conv windows, post-conv rows, gates)."""
    from deltaserve.engine.device_inputs import build_forward_batch

    llm = LLM(str(tiny["moe"]), dtype="float32", device="cuda", max_model_len=512, speculative_tokens=3,
              max_num_seqs=4, num_pages=64)
    runner = llm.engine.runner
    config = runner.config
    assert runner.graphs is not None and (2, 4) in runner.graphs.graphs, runner.graphs.graphs.keys()
    model = runner.model
    fb = build_forward_batch(query_lens=[4, 4], context_lens=[5, 9], state_slots=[0, 1],
                             block_tables=[[1, 2], [3, 4]], page_size=16, device="cuda",
                             logits_indices=list(range(8)))
    fb = dataclasses.replace(fb, keep_states=True, tokens_per_row=4)
    ids = torch.randint(0, 300, (8,), device="cuda")
    results = []
    for use_graph in (True, False):
        cache = runner.cache
        for i in config.model.linear_attention_layers:
            cache.gdn(i).ssm[:2].fill_(0.01)
            cache.gdn(i).conv[:2].fill_(0.02)
        if use_graph:
            assert runner.graphs.can_run(fb)
            _, logits = runner.graphs.run(ids, fb)
            logits = logits.clone()
        else:
            with torch.no_grad():
                logits = model.compute_logits(model(ids, fb, cache), upcast=False)
        gdn = cache.gdn(config.model.linear_attention_layers[0])
        steps = torch.cat([t[:2].flatten(2) for t in (gdn.conv_steps, gdn.y_steps, gdn.gate_steps)], dim=2).clone()
        results.append((logits, steps))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_gpu_mtp_matches_cpu_reference_and_no_mtp(tiny, kind):  # noqa: F811
    """fp32 on CUDA, graphs on (verify steps replayed): greedy outputs with K = 2 (oracle drafts, so that verify
    steps keep 0..K drafts) equal the GPU run without MTP and the CPU run with MTP."""
    ps = prompts(6, seed=11)
    plain, _ = run(tiny[kind], ps, device="cuda", dtype="float32")
    reference = {tuple(p): r for p, r in zip(ps, plain)}
    llm = LLM(str(tiny[kind]), max_model_len=512, device="cuda", dtype="float32", speculative_tokens=2,
              max_num_seqs=8)
    Oracle(llm, reference)
    assert token_ids(llm.generate(ps, GREEDY)) == plain
    assert llm.engine.spec_counters["spec_accepted_tokens"] > 0
    cpu = LLM(str(tiny[kind]), max_model_len=512, device="cpu", dtype="float32", speculative_tokens=2)
    assert token_ids(cpu.generate(ps, GREEDY)) == plain
    eager = LLM(str(tiny[kind]), max_model_len=512, device="cuda", dtype="float32", speculative_tokens=2,
                enforce_eager=True, max_num_seqs=8)
    Oracle(eager, reference)
    assert token_ids(eager.generate(ps, GREEDY)) == plain


@pytest.mark.parametrize("kind, prefill_graphs", [("dense", 0), ("moe", 0), ("moe", 4096)])
def test_gpu_verify_steps_carrying_prompts_equal_no_mtp(tiny, kind, prefill_graphs):  # noqa: F811
    """Requests arriving while others verify drafts, fp32 on CUDA with decode graphs on; greedy outputs equal the GPU
    run without MTP. Without prefill graphs (`prefill_graph_tokens` 0) their prompts ride in verify steps after the
    verify rows (the multistep GDN kernels on those rows, the chunked ones on the prompts, the varlen attention
    kernel over both); with them, such a step decodes plainly and replays a varlen graph instead."""
    from tests.engine.test_speculative_fuzz import Req
    from tests.engine.test_speculative_fuzz import run as run_steps

    ps = prompts(8, seed=5)
    reqs = [Req(f"r{i}", p, GREEDY, arrival=3 * i) for i, p in enumerate(ps)]
    kw = dict(max_model_len=512, device="cuda", dtype="float32", max_num_seqs=8, prefill_graph_tokens=prefill_graphs)
    plain = run_steps(LLM(str(tiny[kind]), **kw), reqs)
    llm = LLM(str(tiny[kind]), speculative_tokens=2, **kw)
    Oracle(llm, {tuple(p): plain[(f"r{i}", 0)]["tokens"] for i, p in enumerate(ps)})
    runner, mixed = llm.engine.runner, []
    launch = runner.launch
    runner.launch = lambda step: (mixed.append(0 < step.num_verify_rows < step.num_rows), launch(step))[1]
    got = run_steps(llm, reqs)
    assert [got[key]["tokens"] for key in plain] == [r["tokens"] for r in plain.values()]
    assert llm.engine.spec_counters["spec_accepted_tokens"] > 0
    dropped = llm.engine.scheduler.drafts_dropped_for_graph
    if prefill_graphs:
        assert sum(mixed) == 0 and dropped >= 3 and runner.varlen_graphs.replays >= dropped
    else:
        assert sum(mixed) >= 3 and dropped == 0


def test_demo_model_bf16_on_gpu_accepts_drafts():
    llm0 = LLM(str(SHIPPED_DEMO_DIR), max_model_len=1024, device="cuda", max_num_seqs=8)
    ids = llm0.engine.tokenizer.encode((SHIPPED_DEMO_DIR / "heldout.txt").read_text())
    ps = [ids[i * 400: i * 400 + 96] for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    ref = token_ids(llm0.generate(ps, params))
    llm = LLM(str(SHIPPED_DEMO_DIR), max_model_len=1024, device="cuda", speculative_tokens=3, max_num_seqs=8)
    got = token_ids(llm.generate(ps, params))
    # bf16: a verify step's GEMMs see 4x the rows of a decode step, so near-ties may part late; most must agree
    assert sum(a == b for a, b in zip(got, ref)) >= 4
    assert llm.engine.acceptance_length() > 2.0


def test_draft_graphs_propose_what_eager_drafting_proposes():
    """fp32 demo model: the chained draft passes replayed from CUDA graphs give the eager drafts, so acceptance
    counts per position are the same with and without graphs (and outputs equal)."""
    kw = dict(max_model_len=1024, device="cuda", dtype="float32", speculative_tokens=3, max_num_seqs=8)
    graphs = LLM(str(SHIPPED_DEMO_DIR), **kw)
    assert graphs.engine.runner.drafter.graphs is not None
    eager = LLM(str(SHIPPED_DEMO_DIR), enforce_eager=True, **kw)
    ids = graphs.engine.tokenizer.encode((SHIPPED_DEMO_DIR / "heldout.txt").read_text())
    ps = [ids[i * 400: i * 400 + 64] for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    assert token_ids(graphs.generate(ps, params)) == token_ids(eager.generate(ps, params))
    assert graphs.engine.spec_accepted_per_position == eager.engine.spec_accepted_per_position
    assert graphs.engine.runner.drafter.first_graphs.replays > 0  # the first pass was replayed too


@pytest.mark.parametrize("kind", ["demo", "moe"])
def test_first_pass_graphs_equal_eager(tiny, kind):  # noqa: F811
    """fp32, every verify step's first draft pass run both eagerly and from its CUDA graph (row counts 6..1 under
    graphs captured for 8, so most replays pad): the same draft 1 and position, and the same MTP outputs and MTP KV
    (bit for bit without padding rows; within 1e-5 with them, where a GEMM sees more rows). Then the drafter
    proposes from the graphs and greedy outputs equal decoding without MTP."""
    path = SHIPPED_DEMO_DIR if kind == "demo" else tiny[kind]
    kw = dict(max_model_len=1024, device="cuda", dtype="float32", max_num_seqs=8)
    base = LLM(str(path), **kw)
    if kind == "demo":
        ids = base.engine.tokenizer.encode((SHIPPED_DEMO_DIR / "heldout.txt").read_text())
        ps = [ids[i * 400: i * 400 + 64] for i in range(6)]
    else:
        ps = prompts(6, seed=12)
    params = [SamplingParams(temperature=0, max_tokens=12 + 6 * i, ignore_eos=True) for i in range(6)]
    ref = token_ids(base.generate(ps, params))
    llm = LLM(str(path), speculative_tokens=3, **kw)
    graphs = llm.engine.runner.drafter.first_graphs
    assert graphs is not None and sorted(graphs.graphs) == [1, 2, 4, 8], graphs and sorted(graphs.graphs)
    exact = []

    class Checker(FirstPassChecker):
        def __call__(self, step, dev, *args):
            self.tol = 0.0 if step.num_rows in graphs.sizes else 1e-5
            checked = self.checked
            out = super().__call__(step, dev, *args)
            if self.checked > checked:
                exact.append(self.tol == 0.0)
            return out

    checker = Checker(llm, graphs)
    if kind != "demo":  # random tiny heads: oracle drafts, so that every acceptance length occurs
        Oracle(llm, {tuple(p): r for p, r in zip(ps, ref)})
    assert token_ids(llm.generate(ps, params)) == ref
    assert checker.checked > 5 and graphs.replays >= checker.checked and any(exact) and not all(exact), \
        (checker.checked, exact, checker.max_diff)


def test_draft_vocab_graphs_equal_eager():
    """fp32 demo model with a draft vocabulary of half its ids: the graphed draft passes propose what the eager ones
    do (same acceptance per position), every draft lies below the subset, and outputs equal decoding without MTP."""
    kw = dict(max_model_len=1024, device="cuda", dtype="float32", max_num_seqs=8)
    base = LLM(str(SHIPPED_DEMO_DIR), **kw)
    ids = base.engine.tokenizer.encode((SHIPPED_DEMO_DIR / "heldout.txt").read_text())
    ps = [ids[i * 400: i * 400 + 64] for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    ref = token_ids(base.generate(ps, params))
    runs = []
    for eager in (False, True):
        llm = LLM(str(SHIPPED_DEMO_DIR), speculative_tokens=3, speculative_draft_vocab=2048, enforce_eager=eager, **kw)
        drafter = llm.engine.runner.drafter
        assert (drafter.first_graphs is None) == eager and drafter.vocab == 2048
        seen = []
        propose = drafter.propose
        drafter.propose = lambda *a, propose=propose, seen=seen: seen.append(propose(*a)) or seen[-1]
        assert token_ids(llm.generate(ps, params)) == ref
        assert seen and max(int(d.max()) for d in seen) < 2048
        runs.append(llm.engine.spec_accepted_per_position)
    assert runs[0] == runs[1] and runs[0][0] > 0


def test_gpu_resumed_request_has_the_uncached_mtp_kv(tiny):  # noqa: F811
    """On CUDA (fp32, eager: the resume pass runs eagerly either way): a request resumed from a checkpoint whose next
    token differs (39) or that sits on a page boundary (32) has the uncached run's MTP KV at every position, up to the
    kernels' rounding (stale, position p - 1 was off by ~2.5 on CPU), and the same tokens and drafts."""
    g = torch.Generator().manual_seed(11)
    base, tail = torch.randint(1, VOCAB, (40,), generator=g).tolist(), torch.randint(1, VOCAB, (9,), generator=g)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    kw = dict(dtype="float32", device="cuda", max_model_len=512, speculative_tokens=2, enforce_eager=True)
    cached = LLM(str(tiny["dense"]), checkpoint_interval=32, **kw)
    plain = LLM(str(tiny["dense"]), enable_prefix_caching=False, **kw)  # a checkpoint_interval here is refused
    MTPTrace(cached, base, params)
    tail = tail.tolist()
    for prompt, resumed_at in ((base[:39] + [base[39] % (VOCAB - 1) + 1] + tail, 39),
                               (base[:32] + [base[32] % (VOCAB - 1) + 1] + tail, 32)):
        got, want = MTPTrace(cached, prompt, params), MTPTrace(plain, prompt, params)
        assert got.num_cached == resumed_at and got.output == want.output
        assert got.positions_unlike(want, tol=1e-3) == {} and got.drafts == want.drafts
