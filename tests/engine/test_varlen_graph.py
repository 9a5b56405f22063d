"""Short varlen steps padded to a CUDA graph's fixed shapes (engine/varlen_graph.py) compute the real rows exactly as
the unpadded step: checked here by running the padded batch eagerly on CPU through the reference kernels (the GPU
tier replays the graphs: test_engine_gpu.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deltaserve.cache.tensors import CacheShape, ModelCache
from deltaserve.config import ModelConfig
from deltaserve.engine.device_inputs import upload_arrays, upload_step
from deltaserve.engine.step_input import SamplingRequest, StepInput
from deltaserve.sampling_params import SamplingParams
from deltaserve.engine.memory import graphed_share, prefill_graph_tokens
from deltaserve.engine.varlen_graph import (VarlenGraphs, chunk_capacity, full_step_tokens, padded_arrays, padded_batch,
                                            token_sizes)
from deltaserve.models.loader import load_model
from tests.models.factory import TinySpec, text_kwargs
from tests.tolerances import TOLERANCES

PAGE, WIDTH = 16, 24


def tiny_model(moe: bool):
    kw = text_kwargs(TinySpec("varlen", moe=moe))
    arch = "Qwen3_5MoeForCausalLM" if moe else "Qwen3_5ForCausalLM"
    config = ModelConfig.from_dict({**kw, "architectures": [arch], "dtype": "float32"})
    return load_model(config, load_format="dummy", dtype=torch.float32)


def step_of(query_lens, context_lens, slots, logits_rows) -> StepInput:
    q = np.array(query_lens, np.int32)
    ctx = np.array(context_lens, np.int32)
    pages = -(-(q + ctx) // PAGE)
    table = np.zeros((len(q), max(pages)), np.int32)
    first = 1  # page 0 stays unused by real rows: padding rows point at it
    for row, n in enumerate(pages):
        table[row, :n] = np.arange(first, first + n)
        first += n
    ids = np.random.default_rng(0).integers(1, 150, int(q.sum()))
    return StepInput(input_ids=ids, query_lens=q, context_lens=ctx, state_slots=np.array(slots, np.int64),
                     has_initial_state=ctx > 0, block_table=table, logits_rows=np.array(logits_rows, np.int64),
                     sampling=())


def test_padded_arrays_keep_the_key_shapes_and_send_padding_nowhere() -> None:
    step = step_of([70, 1], [5, 40], [3, 1], [69, 70])
    ids, pos, mapping, cu, cu64, lens, slots, init, table, chunks, logits = padded_arrays(step, 4, 128, WIDTH, PAGE)
    assert ids.shape == pos.shape == mapping.shape == (128,)
    assert cu.tolist() == [0, 70, 71, 128, 128, 128, 128] and cu64.dtype == np.int64
    assert (mapping[71:] == -1).all() and (mapping[:71] >= PAGE).all()
    assert slots.tolist() == [3, 1, -1, -1, -1, -1] and init.tolist() == [True, True, False, False, False, False]
    assert lens.tolist() == [75, 41, 57, 0, 0, 0] and table.shape == (6, WIDTH) and not table[2:].any()
    assert chunks.shape == (chunk_capacity(4, 128), 2)
    assert chunks[:4].tolist() == [[0, 0], [0, 1], [1, 0], [2, 0]] and (chunks[4:] == [2, 0]).all()
    assert logits.tolist() == [69, 70, 0, 0]
    assert token_sizes(512) == [64, 128, 256, 512] and token_sizes(100) == [64]
    # with the scheduler's step size: powers of two below a full step, then the full step plus its padding row
    assert token_sizes(4096, 2048) == [64, 128, 256, 512, 1024, 2048, 2112]
    assert token_sizes(512, 2048) == [64, 128, 256, 512]  # the full step is above the limit: it runs eagerly
    assert token_sizes(4096, 256) == [64, 128, 256, 320] and token_sizes(4096, 255) == [64, 128, 256]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_padded_step_computes_the_real_rows_exactly(moe: bool, device: str) -> None:
    """A prefill chunk after a cached context, a fresh prompt and a decode row, padded to 4 rows x 128 tokens, run
    eagerly (on CUDA: fla-core's chunked kernels over the padding rows and the repeated chunks)."""
    torch.manual_seed(0)
    model = tiny_model(moe).to(device)
    # fp32 on CPU, but the padded GEMMs have more rows, so BLAS may block (and sum) differently: two fp32 runs, each
    # within the fp32 tolerance of the exact result (tests/tolerances.py), differ by at most twice it; tf32 on CUDA
    atol, rtol = TOLERANCES[torch.float32]
    tol = dict(rtol=2 * rtol, atol=2 * atol) if device == "cpu" else dict(rtol=2e-3, atol=2e-3)
    results = []
    for padded in (False, True):
        cache = ModelCache(model.config, CacheShape(num_pages=64, page_size=PAGE, num_slots=4,
                                                    kv_dtype=torch.float32, conv_dtype=torch.float32), device=device)
        torch.manual_seed(1)  # the same earlier context in both caches
        for pages in cache._kv.values():
            pages.k.normal_()
            pages.v.normal_()
        cache._conv.normal_()
        cache._ssm.normal_()
        step = step_of([37, 20, 1], [50, 0, 33], [2, 0, 3], [36, 56, 57])
        with torch.no_grad():
            if padded:
                views = upload_arrays(padded_arrays(step, 4, 128, WIDTH, PAGE), device)
                ids, batch = padded_batch(views)
                hidden = model(ids, batch, cache)[:58]
                logits = model.compute_logits(hidden[batch.logits_indices[:3]])
            else:
                dev = upload_step(step, page_size=PAGE, device=device)
                hidden = model(dev.input_ids, dev.batch, cache)
                logits = model.compute_logits(hidden[dev.batch.logits_indices])
        states = [(cache._conv.clone(), cache._ssm.clone())]
        kv = [(p.k.clone(), p.v.clone()) for p in cache._kv.values()]
        results.append((hidden, logits, states, kv))
    (h0, l0, s0, kv0), (h1, l1, s1, kv1) = results
    torch.testing.assert_close(h1, h0, **tol)
    torch.testing.assert_close(l1, l0, **tol)
    for (c0, r0), (c1, r1) in zip(s0, s1):  # slots written alike, the unused slot untouched
        torch.testing.assert_close(c1, c0, **tol)
        torch.testing.assert_close(r1, r0, **tol)
    for (k0, v0), (k1, v1) in zip(kv0, kv1):  # page 0 (the padding rows' table) never written
        assert torch.equal(k1[0], k0[0]) and torch.equal(v1[0], v0[0])
        torch.testing.assert_close(k1, k0, **tol)
        torch.testing.assert_close(v1, v0, **tol)


def test_chunk_list_keeps_fla_core_positions() -> None:
    """fla-core reads a chunk's state at its position in the list and writes it at the row's chunk offset plus the
    chunk's index: the two agree for every real and padding chunk, and the repeated entries come after them."""
    rng = np.random.default_rng(5)
    for _ in range(200):
        n = int(rng.integers(0, 5))
        lens = rng.integers(1, 70, n) if n else np.zeros(0, np.int64)
        tokens = next(t for t in token_sizes(1024) if t > lens.sum())
        ctx = rng.integers(0, 40, n)
        step = step_of(lens.tolist(), ctx.tolist(), list(range(n)), []) if n else VarlenGraphs._empty_step(None)
        arrays = padded_arrays(step, 4, tokens, 64, PAGE)
        cu, chunks = arrays[3], arrays[9]
        sizes = np.diff(cu)
        offsets = np.concatenate([[0], np.cumsum(-(-sizes // 64))])
        real = int(offsets[-1])
        assert real <= chunk_capacity(4, tokens) == len(chunks)
        for pos, (row, j) in enumerate(chunks[:real]):
            assert offsets[row] + j == pos and j * 64 < sizes[row]
        assert (chunks[real:] == [n, 0]).all() and sizes[n] >= 1  # the padding row is never empty


def test_keys_fit_steps_and_leave_the_rest_eager() -> None:
    graphs = VarlenGraphs(None, None, max_tokens=512, max_rows=8, max_pages=WIDTH, page_size=PAGE,  # type: ignore
                          device=torch.device("cpu"))
    graphs.graphs = {key: None for key in graphs.keys}  # type: ignore[misc]
    assert graphs.row_sizes == [1, 4, 8] and graphs.width == 512 // PAGE  # the padding row's 511 positions
    assert graphs.key_for(step_of([200], [100], [0], [199])) == (1, 256)
    assert graphs.key_for(step_of([126, 1], [0, 5], [0, 1], [125, 126])) == (4, 128)
    assert graphs.key_for(step_of([128], [0], [0], [127])) == (1, 256)  # a bucket keeps one padding token
    assert graphs.key_for(step_of([512], [0], [0], [511])) is None  # too long
    assert graphs.key_for(step_of([1, 1], [3, 4], [0, 1], [0, 1])) is None  # decode: the uniform graphs
    assert graphs.key_for(step_of([9] * 5, [0] * 5, range(5), [8])) == (8, 64)  # max_num_seqs = 8 is a bucket
    assert graphs.key_for(step_of([9] * 9, [0] * 9, range(9), [8])) is None  # more rows than any key
    assert graphs.key_for(step_of([100], [300], [0], [99])) is None  # more pages than max_model_len allows
    assert graphs.key_for(step_of([3, 3], [5, 9], [0, 1], [2, 5])) == (4, 64)  # equal chunks: not a verify step
    verify = step_of([3], [5], [0], [0, 1, 2])
    object.__setattr__(verify, "sampling", (SamplingRequest("a", SamplingParams(), 1, draft_token_ids=(4, 5)),))
    assert verify.is_verify and graphs.key_for(verify) is None
    scored = step_of([30], [0], [0], [29])
    object.__setattr__(scored, "prompt_logprobs", ("a",))
    assert graphs.key_for(scored) is None
    del graphs.graphs[(1, 256)]  # a key whose capture failed: its steps run eagerly
    assert graphs.key_for(step_of([200], [100], [0], [199])) is None


def _seeded_cache(model, device: str) -> ModelCache:
    cache = ModelCache(model.config, CacheShape(num_pages=64, page_size=PAGE, num_slots=4, kv_dtype=torch.float32,
                                                conv_dtype=torch.float32), device=device)
    torch.manual_seed(1)
    for pages in cache._kv.values():
        pages.k.normal_()
        pages.v.normal_()
    cache._conv.normal_()
    cache._ssm.normal_()
    return cache


@pytest.mark.gpu
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_graph_replays_equal_eager_steps(moe: bool) -> None:
    """Three different steps (rows, lengths, contexts, fresh and continued states) replayed from captured keys (token
    buckets 64 and 128) give the eager step's hidden states, logits, GDN states and KV pages."""
    model = tiny_model(moe).cuda()
    eager_cache, graph_cache = _seeded_cache(model, "cuda"), _seeded_cache(model, "cuda")
    graphs = VarlenGraphs(model, graph_cache, max_tokens=128, max_rows=4, max_pages=WIDTH, page_size=PAGE,
                          device=torch.device("cuda"))
    graphs.capture()
    tol = dict(rtol=2e-3, atol=2e-3)
    steps = [step_of([37, 20, 1], [50, 0, 33], [2, 0, 3], [36, 56, 57]), step_of([90], [87], [2], [89]),
             step_of([5, 1, 60], [0, 58, 140], [1, 3, 0], [4, 5])]
    for step in steps:
        key = graphs.key_for(step)
        # the smallest captured bucket above the step: rows {1, 4}, tokens > t (the padding row takes at least one)
        assert key == (1 if step.num_rows == 1 else 4, 64 if step.query_lens.sum() < 64 else 128)
        with torch.no_grad():
            dev = upload_step(step, page_size=PAGE, device="cuda")
            want_h = model(dev.input_ids, dev.batch, eager_cache)
            want_l = model.compute_logits(want_h[dev.batch.logits_indices], upcast=False)
        got_h, got_l = graphs.run(key, step, dev.input_ids)
        torch.testing.assert_close(got_h, want_h, **tol)
        torch.testing.assert_close(got_l, want_l, **tol)
        torch.testing.assert_close(graph_cache._ssm, eager_cache._ssm, **tol)
        torch.testing.assert_close(graph_cache._conv, eager_cache._conv, **tol)
        for a, b in zip(graph_cache._kv.values(), eager_cache._kv.values()):
            torch.testing.assert_close(a.k, b.k, **tol)
            torch.testing.assert_close(a.v, b.v, **tol)
    assert graphs.replays == 3


def test_a_full_step_replays_its_own_bucket_and_the_planner_reserves_the_pool() -> None:
    from types import SimpleNamespace

    from deltaserve.config.engine import RunnerConfig, SchedulerConfig

    graphs = VarlenGraphs(None, None, max_tokens=4096, max_rows=4, max_pages=4096 // PAGE, page_size=PAGE,  # type: ignore
                          device=torch.device("cpu"), step_tokens=2048)
    graphs.graphs = {key: None for key in graphs.keys}  # type: ignore[misc]
    assert graphs.key_for(step_of([2048], [0], [0], [2047])) == (1, 2112)  # a whole prompt chunk
    assert graphs.key_for(step_of([1500], [0], [0], [1499])) == (1, 2048)

    def config(**runner) -> SimpleNamespace:
        sched = SchedulerConfig(max_model_len=8192, max_num_batched_tokens=2048)
        return SimpleNamespace(runner=RunnerConfig(**runner), scheduler=sched)

    assert graphed_share(config(), 4096) == 2112 / 2048 and graphed_share(config(), 512) == 0.25
    assert graphed_share(config(), 0) == 0.0 and graphed_share(config(enforce_eager=True), 4096) == 0.0
    short = SimpleNamespace(runner=RunnerConfig(), scheduler=SchedulerConfig(max_model_len=1024,
                                                                             max_num_batched_tokens=2048))
    assert graphed_share(short, 4096) == 2112 / 1024  # the profiled step stops at max_model_len: a larger pool


def test_default_prefill_graphs_reach_the_full_step_where_their_pool_costs_little_memory() -> None:
    """prefill_graph_tokens None: the full step's bucket (8,193 tokens to a multiple of 64) where its graphs' pool
    takes at most 10% of the cache memory more than the pool up to 4,096 tokens (~half an 8k step's peak more here),
    4,096 otherwise; a given value is kept; a token budget whose full step is no larger than 4,096 keeps 4,096;
    without graphs (enforce_eager) the plan says 0."""
    from types import SimpleNamespace

    from deltaserve.config.engine import RunnerConfig, SchedulerConfig

    def tokens(budget_gib: float, step_tokens: int = 8192, **runner) -> int:
        sched = SchedulerConfig(max_model_len=10240, max_num_batched_tokens=step_tokens)
        config = SimpleNamespace(runner=RunnerConfig(**runner), scheduler=sched)
        return prefill_graph_tokens(config, peak=4 << 30, budget=int(budget_gib * 2**30))  # type: ignore[arg-type]

    assert tokens(100.0) == 8256 and tokens(21.0) == 8256  # 2.03 GiB more: 2% / 9.7% of the cache memory
    assert tokens(20.0) == 4096 and tokens(4.2) == 4096    # 4.2: 35B-A3B's bf16 weights on an 80 GB card
    assert tokens(4.2, prefill_graph_tokens=8256) == 8256 and tokens(100.0, prefill_graph_tokens=0) == 0
    assert tokens(100.0, step_tokens=2048) == 4096 and tokens(100.0, enforce_eager=True) == 0
    assert full_step_tokens(8192) == 8256 and full_step_tokens(2047) == 2048 and full_step_tokens(2048) == 2112


def test_replays_graph_agrees_with_the_graphs_the_step_would_replay() -> None:
    """ModelRunner.replays_graph, asked on the host before the launch (LLMEngine.step places on_launch by it), says
    what execute_model does with the uploaded step: decode and verify steps that fit the captured batch sizes replay
    a decode graph, short varlen steps a varlen graph; a batch past the largest graph, a uniform step that is not a
    verify step, a long prefill, or a runner without graphs (enforce_eager) run eagerly. The graph sets are built on
    CPU with their keys filled in (capturing needs CUDA)."""
    from types import SimpleNamespace

    from deltaserve.engine.cuda_graph import StepGraphs
    from deltaserve.engine.runner import ModelRunner

    decode = StepGraphs(None, None, max_batch=4, max_pages=WIDTH, device=torch.device("cpu"),  # type: ignore[arg-type]
                        tokens_per_row=(1, 3), max_verify_batch=2)
    decode.graphs = {(bs, k): None for k in decode.tokens_per_row for bs in decode._sizes(k)}  # type: ignore
    varlen = VarlenGraphs(None, None, max_tokens=128, max_rows=4, max_pages=WIDTH, page_size=PAGE,  # type: ignore
                          device=torch.device("cpu"), step_tokens=256)
    varlen.graphs = {key: None for key in varlen.keys}  # type: ignore[misc]

    def verify(n: int) -> StepInput:
        s = step_of([3] * n, [10] * n, list(range(n)), list(range(3 * n)))
        drafts = tuple(SamplingRequest(f"r{i}", SamplingParams(temperature=0), 1, (7, 8)) for i in range(n))
        return StepInput(**{**s.__dict__, "sampling": drafts})
    steps = {"decode 4": (step_of([1] * 4, [9] * 4, [0, 1, 2, 3], [0, 1, 2, 3]), "decode"),
             "decode 5": (step_of([1] * 5, [9] * 5, [0, 1, 2, 3, 4], [0, 1, 2, 3, 4]), None),
             "verify 2": (verify(2), "decode"), "verify 3": (verify(3), None),
             "equal chunks": (step_of([3, 3], [10, 10], [0, 1], [5]), "varlen"),
             "short prefill": (step_of([40, 1], [0, 9], [0, 1], [39, 40]), "varlen"),
             "long prefill": (step_of([300], [0], [0], [299]), None)}
    for graphed in (True, False):
        runner = SimpleNamespace(graphs=decode if graphed else None, varlen_graphs=varlen if graphed else None)
        for name, (step, replays) in steps.items():
            batch = upload_step(step, page_size=PAGE, device="cpu").batch
            ran = "decode" if graphed and decode.can_run(batch) else (
                "varlen" if graphed and varlen.key_for(step) is not None else None)
            assert ran == (replays if graphed else None), name
            assert ModelRunner.replays_graph(runner, step) == (ran is not None), name  # type: ignore[arg-type]
