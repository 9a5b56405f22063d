"""MTP speculative decoding: what a verify step (1 + K tokens per row) and the K draft passes cost against a plain
decode step, at real shapes with dummy weights, and the time per output token that follows at the published
acceptance lengths (derived, not measured); `--demo` measures the demo model's acceptance length and time per output
token with and without MTP.

python benchmarks/bench_mtp.py [--models 9B 27B] [--batches 1 8 32] [--k 3] [--context 1024]   # GPU, ~2 min
python benchmarks/bench_mtp.py --demo [--device cuda|cpu] [--demo-k 1 2 3]                       # ~20 s on a GPU
python benchmarks/bench_mtp.py --models 27B --batches 1 8 --k 3 --gdn-layer   # + one GDN layer's verify and replay
python benchmarks/bench_mtp.py --models 35B-A3B --batches 16 --k 3 --context 8192 --prompt-step 8192

Both modes take --draft-vocab N [N ...]: rows with the drafts scoring only the first N token ids
(speculative_draft_vocab) besides the rows with the whole vocabulary ("draft vocab": all). In --demo mode that
shows what the subset costs in acceptance length; in shapes mode what it saves in draft time (TPOT@AL and speedup
there still use the published full-vocabulary AL: an upper bound for a subset, read with the --demo figures).

Shapes mode, per (model, batch): the plain decode step and the verify step are CUDA graph replays (the engine's
StepGraphs, keys (batch, 1) and (batch, 1 + K)); "commit" installs the kept GDN states (outside the graph, as in
the engine); the draft passes (the MTP head over the 1 + K verified tokens, then K - 1 chained one-token passes, each
with the lm_head's argmax, all replayed from CUDA graphs) as the engine runs them ("drafts"; "drafts eager": the same
without graphs). The drafts are split into "prep" (the host-side inputs of the chained passes, one upload), "first"
(the first pass with draft 1) and "chain" (the K - 1 chained passes), each timed alone, with graphs and eager
("drafts" ~ prep + first + chain). "step" = verify + commit + drafts. TPOT at
acceptance length AL = step / AL: AL is the mean number of tokens a step keeps, 1.93 / 2.73 / 3.39 / 3.97 at
K = 1 / 2 / 3 / 4 (published for Qwen3.5-397B-A17B with vLLM's MTP, SPEED-Bench coding prompts, thinking on:
SemiAnalysisAI/InferenceX on GitHub, golden_al_distribution/qwen3.5_mtp.yaml).

--prompt-step N (also on CPU, with --models tiny): the step that admits a new prompt of N tokens beside the batch's
rows, eager as the engine runs it: the prompt alone, with the rows as plain decode rows (a step with a prompt
verified nothing before 2026-12-07) and as verify rows of 1 + K tokens; "verify extra" is what verifying there costs
over decoding, against the tokens it gains (batch x (AL - 1)). "max |diff|" compares that step's logits with the
verify step and the prompt each run alone; "plain |diff|" the decode rows' step with the prompt against the decode
step and the prompt alone: the rounding any change of batch shape brings (in bf16 an MoE token's experts can
change with it), the floor the first is read against.
"""

from __future__ import annotations

import argparse
import gc
import time

import numpy as np
import torch

from benchmarks.common import SHAPES, header, model_config, positive_int, require_cuda, table

PAGE = 16
PUBLISHED_AL = {1: 1.93, 2: 2.73, 3: 3.39, 4: 3.97}


def _time(fn, *, warmup: int = 5, reps: int = 30) -> float:
    """Median milliseconds of fn() (CUDA events around each call; the wall clock without a GPU)."""
    return _time_each({"": fn}, warmup=warmup, reps=reps)[""]


def _time_each(fns: dict, *, warmup: int = 5, reps: int = 30) -> dict:
    """Median milliseconds of each fn(), timed in turns (a call of each per round), so that a drift of the card's
    clocks or of the host over the run weighs on every one alike."""
    for fn in fns.values():
        for _ in range(warmup if torch.cuda.is_available() else 1):
            fn()
    times: dict = {label: [] for label in fns}
    for _ in range(reps):
        for label, fn in fns.items():
            times[label].append(_once(fn))
    return {label: float(np.median(t)) for label, t in times.items()}


def _once(fn) -> float:
    """Milliseconds of one fn() call: CUDA events around it (the GPU idle before), the wall clock without a GPU."""
    if not torch.cuda.is_available():
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _print_kernel_tables(model, cache, steps: dict) -> None:
    """steps: label -> (input ids, ForwardBatch); prints each eager step's kernels by time (profile_step's table)."""
    from benchmarks.profile_step import kernel_table

    for label, (ids, batch) in steps.items():
        def step(ids=ids, batch=batch) -> None:
            with torch.no_grad():
                model.compute_logits(model(ids, batch, cache), upcast=False)

        total, text = kernel_table(step, calls=3, top=15)
        print(f"{label} step, eager, kernels per step ({total:.0f} µs):\n{text}", flush=True)


def bench_shape(name: str, model, batch: int, k: int, context: int, draft_vocab: int | None = None,
                profile: bool = False) -> dict:
    from deltaserve.cache.tensors import CacheShape, ModelCache
    from deltaserve.engine.cuda_graph import StepGraphs
    from deltaserve.engine.device_inputs import build_forward_batch, upload_step
    from deltaserve.engine.speculative import MTPDrafter
    from deltaserve.engine.step_input import SamplingRequest, StepInput
    from deltaserve.sampling_params import SamplingParams

    cfg = model.config
    dev = torch.device("cuda")
    pages_per_seq = -(-(context + 2 * k + 2) // PAGE)
    shape = CacheShape(num_pages=batch * pages_per_seq + 1, page_size=PAGE, num_slots=batch,
                       kv_dtype=torch.bfloat16, conv_dtype=torch.bfloat16, state_dtype=torch.float32)
    cache = ModelCache(cfg, shape, device=dev, with_mtp=True, verify_rows=batch, verify_positions=1 + k)
    for i in cfg.linear_attention_layers:
        cache.gdn(i).ssm.normal_(0, 0.01)
    tables = [list(range(1 + s * pages_per_seq, 1 + (s + 1) * pages_per_seq)) for s in range(batch)]
    slots = list(range(batch))
    decode = build_forward_batch(query_lens=[1] * batch, context_lens=[context] * batch, state_slots=slots,
                                 block_tables=tables, page_size=PAGE, device=dev)
    graphs = StepGraphs(model, cache, max_batch=batch, max_pages=pages_per_seq, device=dev,
                        tokens_per_row=(1, 1 + k), max_verify_batch=batch)
    graphs.sizes, graphs.verify_sizes = [batch], [batch]
    graphs.capture()
    ids1 = torch.randint(0, cfg.vocab_size, (batch,), device=dev)
    ms_decode = _time(lambda: graphs.run(ids1, decode))

    # the verify step as the engine builds it: a StepInput whose rows carry the last token and K drafts
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, batch * (1 + k))
    table_np = np.array(tables, dtype=np.int32)
    params = SamplingParams(temperature=0)
    step = StepInput(input_ids=ids.astype(np.int64), query_lens=np.full(batch, 1 + k, np.int32),
                     context_lens=np.full(batch, context, np.int32), state_slots=np.arange(batch, dtype=np.int64),
                     has_initial_state=np.ones(batch, np.bool_), block_table=table_np,
                     logits_rows=np.arange(batch * (1 + k), dtype=np.int64),
                     sampling=tuple(SamplingRequest(str(i), params, 5, tuple(int(t) for t in ids[i * (1 + k) + 1:
                                                                                             (i + 1) * (1 + k)]))
                                    for i in range(batch)),
                     next_token_ids=np.full(batch, -1, np.int64), page_counts=np.full(batch, pages_per_seq, np.int32))
    dstep = upload_step(step, page_size=PAGE, device=dev)
    assert dstep.batch.keep_states and graphs.can_run(dstep.batch)
    idsk = dstep.input_ids
    ms_verify = _time(lambda: graphs.run(idsk, dstep.batch))
    hidden, logits = graphs.run(idsk, dstep.batch)
    with torch.no_grad():
        eager_logits = model.compute_logits(model(idsk, dstep.batch, cache), upcast=False)
    graph_vs_eager = float((logits.float() - eager_logits.float()).abs().max())
    if profile:  # where a verify step's extra time goes: the kernels of both steps, eager
        _print_kernel_tables(model, cache, {"decode": (ids1, decode), f"verify (1 + {k})": (idsk, dstep.batch)})
    kept = torch.randint(1, 2 + k, (batch,), device=dev)
    ms_commit = _time(lambda: cache.commit_verified(dstep.batch.state_slots, kept))
    drafter = MTPDrafter(model, cache, num_tokens=k, page_size=PAGE, device=dev, draft_vocab=draft_vocab)
    hidden = hidden.clone()
    tokens = logits.argmax(dim=-1)
    propose = lambda: drafter.propose(step, dstep, idsk, hidden, tokens, kept)  # noqa: E731
    # the parts of propose: host-side inputs of the chained passes (one upload), the first pass with draft 1, the
    # K - 1 chained passes (fed draft 1 of a first pass, as propose feeds them)
    first_row, table, limit = drafter.chain_inputs(step)
    first = lambda: drafter.first_drafts(step, dstep, idsk, hidden, tokens, kept, first_row)  # noqa: E731
    draft1, x1, pos1 = (t.clone() for t in first())
    chain = (lambda: drafter.chain(draft1, x1, pos1, table, limit)) if k > 1 else None

    def parts() -> tuple[float, float, float, float]:
        return (_time(propose, reps=20), _time(lambda: drafter.chain_inputs(step), reps=20), _time(first, reps=20),
                _time(chain, reps=20) if chain is not None else 0.0)

    ms_draft_eager, ms_prep, ms_first_eager, ms_chain_eager = parts()
    eager_drafts = propose()
    drafter.capture(max_rows=batch, max_pages=pages_per_seq)  # first pass and chained passes as the engine runs them
    ms_draft, _, ms_first, ms_chain = parts()
    captured = drafter.graphs is not None or drafter.first_graphs is not None
    same_drafts = bool((propose() == eager_drafts).all()) if captured else None
    step_ms = ms_verify + ms_commit + ms_draft
    al = PUBLISHED_AL[k]
    # graphs and cache go with this frame
    gc.collect()
    torch.cuda.empty_cache()
    return {"model": name, "batch": batch, "K": k, "draft vocab": draft_vocab or "all", "decode ms": ms_decode,
            "verify ms": ms_verify,
            "verify/decode": ms_verify / ms_decode, "commit ms": ms_commit, "drafts ms": ms_draft,
            "drafts eager ms": ms_draft_eager, "prep ms": ms_prep,
            "first ms": ms_first if drafter.first_graphs is not None else "eager", "first eager ms": ms_first_eager,
            "chain ms": ms_chain if drafter.graphs is not None or k == 1 else "eager", "chain eager ms": ms_chain_eager,
            "step/decode": step_ms / ms_decode, "TPOT@AL ms": step_ms / al, "AL": al,
            "TPOT decode ms": ms_decode, "speedup": ms_decode * al / step_ms, "graph-eager max": graph_vs_eager,
            "draft graphs": {None: "eager", True: "same", False: "DIFFER"}[same_drafts]}


def prompt_step(name: str, model, batch: int, k: int, context: int, prompt_len: int, reps: int = 10) -> dict:
    """The step that admits a prompt of prompt_len tokens beside `batch` rows at `context`: eager forward + logits
    of the prompt alone, with the rows decoding (1 token) and with them verifying (1 + k tokens); see the module
    docstring."""
    from deltaserve.cache.tensors import CacheShape, ModelCache
    from deltaserve.engine.device_inputs import upload_step
    from deltaserve.engine.step_input import SamplingRequest, StepInput
    from deltaserve.sampling_params import SamplingParams

    cfg, dev = model.config, next(model.parameters()).device
    per_row, prompt_pages = -(-(context + k + 1) // PAGE), -(-prompt_len // PAGE)
    shape = CacheShape(num_pages=1 + batch * per_row + prompt_pages, page_size=PAGE, num_slots=batch + 1,
                       kv_dtype=model.model.embed_tokens.weight.dtype, conv_dtype=torch.bfloat16,
                       state_dtype=torch.float32)
    cache = ModelCache(cfg, shape, device=dev, with_mtp=True, verify_rows=batch, verify_positions=1 + k)
    for i in cfg.linear_attention_layers:
        cache.gdn(i).ssm.normal_(0, 0.01)
    width = max(per_row, prompt_pages)
    table_np = np.zeros((batch + 1, width), np.int32)
    for r in range(batch):
        table_np[r, :per_row] = np.arange(1 + r * per_row, 1 + (r + 1) * per_row)
    table_np[batch, :prompt_pages] = np.arange(1 + batch * per_row, 1 + batch * per_row + prompt_pages)
    rng = np.random.default_rng(0)
    row_ids = rng.integers(0, cfg.vocab_size, batch * (1 + k))
    prompt = rng.integers(0, cfg.vocab_size, prompt_len)
    params = SamplingParams(temperature=0)

    def step(rows: range, width: int, with_prompt: bool) -> StepInput:
        """The rows' step at `width` tokens each (1: decode; 1 + k: verify, every position sampled), then the
        prompt."""
        ids, lens, sampled, logits = [], [], [], []
        for r in rows:
            ids.append(row_ids[r * (1 + k):r * (1 + k) + width])
            first = sum(lens)
            lens.append(width)
            logits += range(first, first + width)  # (width 1: its one token)
            sampled.append(SamplingRequest(str(r), params, 5, tuple(int(t) for t in ids[-1][1:])))
        slots, context_lens = list(rows), [context] * len(rows)
        if with_prompt:
            ids.append(prompt)
            lens.append(prompt_len)
            logits.append(sum(lens) - 1)
            sampled.append(SamplingRequest("prompt", params, 0))
            slots.append(batch)
            context_lens.append(0)
        return StepInput(input_ids=np.concatenate(ids).astype(np.int64), query_lens=np.array(lens, np.int32),
                         context_lens=np.array(context_lens, np.int32), state_slots=np.array(slots, np.int64),
                         has_initial_state=np.array(context_lens) > 0,
                         block_table=np.ascontiguousarray(table_np[slots]), logits_rows=np.array(logits, np.int64),
                         sampling=tuple(sampled))

    def forward(s: StepInput):
        d = upload_step(s, page_size=PAGE, device=dev)
        with torch.no_grad():
            hidden = model(d.input_ids, d.batch, cache)
            return model.compute_logits(hidden[d.batch.logits_indices], upcast=False)

    rows = range(batch)
    alone, decoding, verifying = step(range(0), 1, True), step(rows, 1, True), step(rows, 1 + k, True)
    assert upload_step(verifying, page_size=PAGE, device=dev).batch.mixed is not None
    mixed = forward(verifying).float()
    parts = torch.cat([forward(step(rows, 1 + k, False)), forward(alone)]).float()
    states = [(g.ssm, g.conv, g.ssm.clone(), g.conv.clone()) for g in map(cache.gdn, cfg.linear_attention_layers)]

    def from_start(s: StepInput):  # a decode row advances its GDN state in place: each run starts from the same one
        for ssm, conv, ssm0, conv0 in states:
            ssm.copy_(ssm0)
            conv.copy_(conv0)
        return forward(s).float()
    plain = from_start(decoding)
    plain_parts = torch.cat([from_start(step(rows, 1, False)), from_start(alone)])
    ms = _time_each({label: lambda s=s: forward(s) for label, s in (("prompt alone", alone),
                                                                    ("+ decode rows", decoding),
                                                                    ("+ verify rows", verifying))},
                    warmup=2, reps=reps)
    al = PUBLISHED_AL[k]
    extra = ms["+ verify rows"] - ms["+ decode rows"]
    return {"model": name, "batch": batch, "K": k, "context": context, "prompt": prompt_len,
            **{f"{label} ms": v for label, v in ms.items()}, "verify extra ms": extra,
            "tokens gained": batch * (al - 1), "AL": al, "max |diff|": float((mixed - parts).abs().max()),
            "plain |diff|": float((plain - plain_parts).abs().max())}


def demo(device: str, max_tokens: int, num_prompts: int, ks: tuple[int, ...] = (1, 2, 3),
         draft_vocabs: tuple[int | None, ...] = (None,)) -> list[dict]:
    from deltaserve import LLM, SamplingParams
    from deltaserve.demo import SHIPPED_DEMO_DIR

    rows = []
    dtype = "float32" if device == "cpu" else None
    base = None
    for k, vocab in [(0, None)] + [(k, v) for v in draft_vocabs for k in ks if k > 0]:
        llm = LLM(str(SHIPPED_DEMO_DIR), device=device, dtype=dtype, max_model_len=2048, speculative_tokens=k,
                  speculative_draft_vocab=vocab)
        ids = llm.engine.tokenizer.encode((SHIPPED_DEMO_DIR / "heldout.txt").read_text())
        prompts = [ids[i * 600: i * 600 + 256] for i in range(num_prompts)]
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=8))  # warm up
        t = time.perf_counter()
        outs = [llm.generate([p], params)[0] for p in prompts]  # batch 1: one request at a time
        dt = time.perf_counter() - t
        n = sum(len(o.outputs[0].token_ids) for o in outs)
        tokens = [o.outputs[0].token_ids for o in outs]
        base = base or tokens
        row = {"K": k, "draft vocab": vocab or "all", "AL": llm.engine.acceptance_length() if k else 1.0,
               "TPOT ms (batch 1)": dt / n * 1e3,
               "identical to K=0": f"{sum(a == b for a, b in zip(tokens, base))}/{len(base)}"}
        for j in range(3):
            drafted = llm.engine.spec_drafted_per_position[j] if j < k else 0
            row[f"accept@{j + 1}"] = llm.engine.spec_accepted_per_position[j] / drafted if drafted else float("nan")
        rows.append(row)
        print(row, flush=True)
        del llm
        gc.collect()
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["9B", "27B"], choices=sorted(SHAPES))
    ap.add_argument("--batches", nargs="+", type=positive_int, default=[1, 8, 32])
    ap.add_argument("--k", nargs="+", type=int, default=[3], choices=range(1, 5))
    ap.add_argument("--context", type=positive_int, default=1024)
    ap.add_argument("--demo", action="store_true", help="the demo model's acceptance length and TPOT instead")
    ap.add_argument("--device", default=None, choices=["cuda", "cpu"],
                    help="--demo: where the demo model runs (default: cuda when a GPU is visible, else cpu)")
    ap.add_argument("--max-tokens", type=positive_int, default=128)
    ap.add_argument("--num-prompts", type=positive_int, default=8)
    ap.add_argument("--draft-vocab", nargs="+", type=positive_int, default=[],
                    help="also measure with the drafts scoring only the first N token ids (speculative_draft_vocab); "
                         "the whole vocabulary is always measured too")
    ap.add_argument("--profile", action="store_true",
                    help="also print the kernels of the decode and the verify step by time (torch.profiler, eager)")
    ap.add_argument("--demo-k", nargs="+", type=int, default=[1, 2, 3], choices=range(1, 5),
                    help="--demo: the K values (K = 0 is run too)")
    ap.add_argument("--prompt-step", type=positive_int, default=None, metavar="N",
                    help="instead: the step admitting an N-token prompt beside the rows, decoding or verifying "
                         "(eager; --models tiny runs on CPU)")
    ap.add_argument("--gdn-layer", action="store_true",
                    help="also time one GDN layer's verify kernels and the commit's replay (bench_gdn.py "
                         "--multistep's table at these models, batches and 1 + K)")
    args = ap.parse_args(argv)
    vocabs = [None, *args.draft_vocab]
    if args.demo:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cuda":
            require_cuda("bench_mtp.py --demo --device cuda", cpu_alternative="--device cpu")
        rows = demo(device, args.max_tokens, args.num_prompts, tuple(args.demo_k), tuple(vocabs))
        print(header("demo model, held-out text, greedy, batch 1"))
        print(table(rows))
        return rows
    if args.prompt_step is not None:
        return prompt_steps(args)
    require_cuda("bench_mtp.py (shapes mode)", cpu_alternative="bench_mtp.py --demo --device cpu")
    from deltaserve.models.loader import load_model

    rows = []
    for name in args.models:
        model = load_model(model_config(name), load_format="dummy", device="cuda", dtype=torch.bfloat16,
                           with_mtp=True)
        for b in args.batches:
            for k in args.k:
                for vocab in vocabs:
                    try:
                        row = bench_shape(name, model, b, k, args.context, vocab, args.profile)
                    except torch.OutOfMemoryError:
                        row = {"model": name, "batch": b, "K": k, "draft vocab": vocab or "all", "decode ms": "OOM"}
                    gc.collect()
                    torch.cuda.empty_cache()
                    rows.append(row)
                    print(row, flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    print(header(f"context {args.context}, dummy bf16 weights, fp32 GDN state; TPOT@AL derived at the published AL"))
    print(table(rows))
    if args.gdn_layer:
        from benchmarks.bench_gdn import MULTISTEP_MODELS, multistep_table

        models = [m for m in args.models if m in MULTISTEP_MODELS]
        print(header("one GDN layer's verify kernels (1 + K tokens per row), CUDA graph replay, us per layer"))
        print(table(multistep_table(models, args.batches, sorted({1 + k for k in args.k}))))
    return rows


def prompt_steps(args: argparse.Namespace) -> list[dict]:
    from deltaserve.models.loader import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for name in args.models:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        model = load_model(model_config(name), load_format="dummy", device=device, dtype=dtype, with_mtp=True)
        for b in args.batches:
            for k in args.k:
                rows.append(prompt_step(name, model, b, k, args.context, args.prompt_step))
                print(rows[-1], flush=True)
        del model
        gc.collect()
    print(header(f"the step admitting a {args.prompt_step}-token prompt, eager, dummy weights ({device})"))
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
