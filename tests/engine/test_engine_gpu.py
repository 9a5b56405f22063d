"""GPU tier (`pytest -m gpu` on the GPU machine): the engine on CUDA against the CPU reference path, CUDA graphs
against eager, bf16 against fp32."""

from __future__ import annotations

import pytest
import torch

from deltaserve import LLM, SamplingParams
from tests.engine.test_engine import ckpt, prompts  # noqa: F401 (fixture)

pytestmark = pytest.mark.gpu

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=5)


def run(path, ps, **kw):
    llm = LLM(str(path), max_model_len=512, **kw)
    outs = llm.generate(ps, GREEDY)
    return [o.outputs[0] for o in outs], llm


@pytest.fixture(scope="module")
def cpu_ref(ckpt):  # noqa: F811
    ps = prompts(8, seed=40)
    outs, _ = run(ckpt[0], ps, device="cpu", dtype="float32")
    return ps, outs


def test_fp32_gpu_matches_cpu_reference(ckpt, cpu_ref):  # noqa: F811
    ps, ref = cpu_ref
    outs, _ = run(ckpt[0], ps, device="cuda", dtype="float32")
    for got, exp in zip(outs, ref):
        assert got.token_ids == exp.token_ids
        for a, b in zip(got.logprobs, exp.logprobs):
            assert abs(a.logprob - b.logprob) < 2e-3  # tf32 matmuls on GPU


# every KV format and both state dtypes, in three engines (each compiles its own kernel variants at startup)
CACHE_OPTIONS = [dict(kv_cache_dtype=kv, state_dtype=st) for kv, st in
                 (("fp8", "float32"), ("int8", "bfloat16"), ("int4", "float32"))]


@pytest.mark.parametrize("options", CACHE_OPTIONS, ids=lambda o: f"{o['kv_cache_dtype']}-{o['state_dtype']}")
def test_compressed_caches_on_gpu_match_the_cpu_reference(ckpt, options):  # noqa: F811
    """The Triton kernels (quantizing KV write, quantized-page attention, bf16-state GDN decode and prefill) against
    the references with the same options. A value near a rounding boundary quantizes one step apart when the GPU's
    activations differ from the CPU's in the last bits (int4 steps are large), so a few sequences may part late and
    logprobs move a little; the bounds are estimates, not yet measured on a GPU."""
    int4 = options["kv_cache_dtype"] == "int4"
    ps = prompts(8, seed=46)
    ref, _ = run(ckpt[0], ps, device="cpu", dtype="float32", **options)
    outs, llm = run(ckpt[0], ps, device="cuda", dtype="float32", **options)
    assert llm.engine.runner.cache.attention(llm.engine.runner.config.model.full_attention_layers[0]).k.is_cuda
    identical = sum(a.token_ids == b.token_ids for a, b in zip(outs, ref))
    assert identical >= (4 if int4 else 6), f"{identical} of 8 sequences identical"
    for got, exp in zip(outs, ref):
        assert abs(got.logprobs[0].logprob - exp.logprobs[0].logprob) < (5e-2 if int4 else 2e-2)


@pytest.mark.parametrize("moe_path", ["pairs", "mid"])
@pytest.mark.parametrize("options", [{}, dict(kv_cache_dtype="int4", state_dtype="bfloat16")], ids=["auto", "int4"])
def test_cuda_graphs_give_the_same_tokens_as_eager(ckpt, options, moe_path, monkeypatch):  # noqa: F811
    """Decode graphs and the short-prefill graphs (the first round's batched prompts; the second round's turns that
    resume from prefix-cache checkpoints with a few new tokens, alone and batched).

    The MoE path is pinned: by default it is picked by the routed pairs a call holds, which in a graph are those of
    the padded shape and in eager those of the real rows, so a step can run the per-pair kernels eagerly and the
    expert-centric ones in its graph. The two round differently in bf16, enough to flip a near tie (H100, 2026-12-05:
    unpinned, one resumed sequence parted at its 16th token; pinned to either path, every token equal)."""
    from deltaserve.kernels.moe import gpu as moe_gpu

    monkeypatch.setattr(moe_gpu, "FORCE_PATH", moe_path)
    ps = prompts(12, seed=41)
    outs = {}
    for eager in (False, True):
        llm = LLM(str(ckpt[0]), max_model_len=512, device="cuda", dtype="bfloat16", enforce_eager=eager, **options)
        first = [o.outputs[0] for o in llm.generate(ps, GREEDY)]
        follow = [p + o.token_ids + [9, 8, 7] for p, o in zip(ps[:4], first)]
        second = [o.outputs[0] for o in llm.generate(follow[:1], GREEDY)]  # alone: a one-row graph
        second += [o.outputs[0] for o in llm.generate(follow[1:], GREEDY)]
        outs[eager] = [o.token_ids for o in first + second]
        runner = llm.engine.runner
        if eager:
            assert runner.graphs is None and runner.varlen_graphs is None
        else:
            assert runner.graphs is not None, "decode graphs were not captured"
            assert runner.varlen_graphs is not None and runner.varlen_graphs.replays >= 2
            assert llm.engine.stats()["prompt_tokens_cached"] > 0
        del llm
    assert outs[False] == outs[True]


def test_bf16_gpu_logprobs_close_to_fp32(ckpt, cpu_ref):  # noqa: F811
    ps, ref = cpu_ref
    outs, _ = run(ckpt[0], ps[:1], device="cuda", dtype="bfloat16")
    first = outs[0].logprobs[0]
    exp = ref[0].logprobs[0]
    assert abs(first.logprob - exp.logprob) < 5e-2


def test_moe_cuda_matches_reference():
    from deltaserve.kernels.moe import grouped as cuda, ref
    g = torch.Generator(device="cuda").manual_seed(0)
    T, D, I, E, k = 67, 256, 128, 16, 4
    x = torch.randn(T, D, device="cuda", generator=g).bfloat16()
    w13 = (torch.randn(E, 2 * I, D, device="cuda", generator=g) * D ** -0.5).bfloat16()
    w2 = (torch.randn(E, D, I, device="cuda", generator=g) * I ** -0.5).bfloat16()
    w, ids = ref.moe_topk_softmax(router_logits=torch.randn(T, E, device="cuda", generator=g), top_k=k)
    got = cuda.fused_moe(x=x, w13=w13, w2=w2, topk_weights=w, topk_ids=ids).float()
    exp = ref.fused_moe(x=x.float(), w13=w13.float(), w2=w2.float(), topk_weights=w, topk_ids=ids)
    assert (got - exp).norm() / exp.norm() < 1e-2


def _mixed_params():
    return [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
            SamplingParams(temperature=1.0, top_p=0.9, top_k=30, seed=5, max_tokens=9, ignore_eos=True),
            SamplingParams(temperature=0.7, max_tokens=14, logprobs=2, stop=["x"])]


@pytest.mark.parametrize("options", [{}, dict(kv_cache_dtype="fp8", state_dtype="bfloat16")], ids=["auto", "fp8"])
def test_no_triton_compile_after_startup(ckpt, options):  # noqa: F811
    """Startup (the activation-peak prefill and the decode graph capture) compiles every kernel the engine uses:
    steps with other token counts, sequence counts and chunk mixes compile nothing (a compile mid-run stalls a
    step for up to seconds). A kernel that specialises on a per-step integer fails this test."""
    import triton

    llm = LLM(str(ckpt[0]), max_model_len=512, device="cuda", dtype="bfloat16", max_num_batched_tokens=96,
              **options)
    compiled = []
    runtime = triton.knobs.runtime
    previous = runtime.jit_post_compile_hook
    runtime.jit_post_compile_hook = lambda *, fn, **_: compiled.append(fn.name)
    try:
        ps = prompts(11, seed=44) + [[7], [3] * 33, [5] * 96]
        llm.generate(ps, [_mixed_params()[i % 3] for i in range(len(ps))])
    finally:
        runtime.jit_post_compile_hook = previous
    assert not compiled, f"kernels compiled after startup: {sorted(set(compiled))}"


def test_async_engine_waits_on_the_device_only_for_tokens(ckpt):  # noqa: F811
    """With async scheduling nothing in a step may synchronise with the device (a sync would serialise the host
    work the overlap hides); the only wait is on the event of the previous step's tokens, which sync debug mode
    does not count."""
    llm = LLM(str(ckpt[0]), max_model_len=512, device="cuda", dtype="bfloat16")
    assert llm.engine.async_scheduling  # on by default on CUDA
    ps = prompts(9, seed=45)
    params = [_mixed_params()[i % 3] for i in range(len(ps))]
    llm.generate(ps, params)  # warm-up: first-use allocations and pinned host blocks
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = llm.generate(ps, params)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # a sync raises inside the step, which fails its requests: every request must have ended normally
    ended_well = [o.outputs[0].finish_reason in ("length", "stop") and bool(o.outputs[0].token_ids) for o in outs]
    assert ended_well == [True] * 9


def test_default_prefill_graphs_replay_a_full_step(ckpt):  # noqa: F811
    """With prefill_graph_tokens left out the planner captures buckets up to the full step (a tiny model's pool is
    far under 10% of the cache memory): an 8,300-token prompt's first step of 8,192 tokens (the token budget, and the
    checkpoint interval) replays the 8,256-token graph where with graphs up to 4,096 tokens it runs eagerly; its
    other steps (107 tokens to the tail checkpoint, then the last token) take the same graphs either way; the tokens
    are the same."""
    g = torch.Generator().manual_seed(47)
    ps = [torch.randint(1, 256, (8300,), generator=g).tolist()]
    kw = dict(max_model_len=8704, max_num_batched_tokens=8192, device="cuda", dtype="float32")
    tokens, replays = {}, {}
    for option in (None, 4096):
        llm = LLM(str(ckpt[0]), prefill_graph_tokens=option, **kw)
        runner = llm.engine.runner
        tokens[option] = llm.generate(ps, GREEDY)[0].outputs[0].token_ids
        replays[option] = runner.varlen_graphs.replays
        assert runner.plan.prefill_graph_tokens == (8256 if option is None else 4096)
        assert ((1, 8256) in runner.varlen_graphs.graphs) == (option is None)
        del llm, runner
    assert replays[None] == replays[4096] + 1
    assert tokens[None] == tokens[4096]
