"""Whole-model prefill time for one prompt at real shapes with dummy weights, against the measured bf16 matmul rate.

python benchmarks/bench_prefill.py [--models 9B 27B] [--lengths 1024 8192 32768] [--formats bf16 fp8 int4]

--formats: the projections stored as bench_quant.py stores them (fp8: Qwen's 128x128 blocks; int4: AWQ-style g128;
fp8-w8a8: fp8 with dynamic fp8 activations; gptq / gptq-act-order: Qwen's GPTQ-Int4 layout, desc_act false / true);
each quantized row reports its rate against the bf16 row of the same model and length (the issue's FP8 target: at
least 80% of the bf16 rate at 8k tokens). FLOPs are counted on the bf16 model, so a quantized row's TFLOP/s needs
bf16 in the list. --graph: each step also captured in one CUDA graph and replayed, beside the eager time (what the
host's launches add to an eager step).
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
import triton.testing

from benchmarks.common import header, measure_matmul_rate, model_config, require_cuda, table
from deltaserve.cache.tensors import CacheShape, ModelCache
from deltaserve.engine.device_inputs import build_forward_batch
from deltaserve.models.loader import load_model

PAGE = 16


def prefill_flops(model, cfg, length: int) -> float:
    """Model FLOPs: 2 x active linear weights x tokens (lm_head for the last token only), causal attention
    (QK^T and PV over L^2/2 pairs), and the chunked delta rule (~5*64*K + 3*K*V MACs per token and v-head)."""
    linear = 0
    for name, p in model.named_parameters():
        if p.dim() < 2 or "embed_tokens" in name or "conv1d" in name or name.startswith("lm_head"):
            continue
        n = p.numel()
        if ".experts." in name:
            n = n * cfg.num_experts_per_tok // cfg.num_experts
        linear += n
    attn = len(cfg.full_attention_layers) * 4 * cfg.num_attention_heads * cfg.head_dim * length * length / 2
    k, v = cfg.linear_key_head_dim, cfg.linear_value_head_dim
    gdn = len(cfg.linear_attention_layers) * cfg.linear_num_value_heads * 2 * (5 * 64 * k + 3 * k * v) * length
    return 2 * linear * length + attn + gdn + 2 * cfg.hidden_size * cfg.vocab_size


def bench_one(name: str, length: int, rate: float, fmt: str = "bf16", bf16_row: dict | None = None,
              graph: bool = False) -> dict:
    cfg = model_config(name)
    if fmt == "bf16":
        model = load_model(cfg, load_format="dummy", device="cuda", dtype=torch.bfloat16, with_mtp=False)
    else:
        from benchmarks.bench_quant import load
        model = load(name, fmt)
    pages = -(-length // PAGE)
    cache = ModelCache(cfg, CacheShape(num_pages=pages, page_size=PAGE, num_slots=1, kv_dtype=torch.bfloat16,
                                       conv_dtype=torch.bfloat16), device="cuda")
    fb = build_forward_batch(query_lens=[length], context_lens=[0], state_slots=[0], block_tables=[list(range(pages))],
                             page_size=PAGE, device="cuda")
    ids = torch.randint(0, cfg.vocab_size, (length,), device="cuda")

    def step():
        with torch.no_grad():
            h = model(ids, fb, cache)
            return model.compute_logits(h[fb.logits_indices])
    # one call first: do_bench sizes its repeats from 5 calls' mean, which a first call's one-off costs (Triton
    # compiles and autotuning, library set-up) can inflate to a single timed repeat. Then a timed call sizes `rep` for
    # at least 10 repeats (it asked for 200 ms: an 8k-token step of ~130 ms was one sample, and runs of the same tree
    # differed by up to 8 ms, RESULTS 2026-12-06 H100). Eager steps: short lengths are host-bound here (35B-A3B 1,024
    # tokens: ~80 ms of launches for 40 ms of kernels, RESULTS 2026-12-05 H100), where the engine replays a varlen
    # CUDA graph
    step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    torch.cuda.synchronize()
    one_ms = (time.perf_counter() - start) * 1e3
    ms = triton.testing.do_bench(step, warmup=2, rep=max(200, 10 * one_ms), return_mode="median")
    graph_ms = graph_step_ms(step, rep=max(200, 10 * one_ms)) if graph else None
    flops = prefill_flops(model, cfg, length) if fmt == "bf16" else bf16_row and bf16_row["flops"]
    del model, cache
    gc.collect()
    torch.cuda.empty_cache()
    row = {"model": name, "format": fmt, "tokens": length, "ms": ms, "tok/s": length / ms * 1e3}
    if graph_ms is not None:
        row.update({"graph ms": graph_ms, "eager / graph": ms / graph_ms})
    if flops:
        row.update({"TFLOP/s": flops / (ms * 1e-3) / 1e12, "of matmul rate": flops / (ms * 1e-3) / rate})
    if bf16_row:
        row["of bf16 rate"] = bf16_row["ms"] / ms
    row["flops"] = flops
    return row


def graph_step_ms(step, rep: float) -> float:
    """The same step captured in one CUDA graph and replayed (median ms): what the eager step's host-side launches
    cost beyond its kernels. The served engine replays such graphs up to --prefill-graph-tokens tokens."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up off the capture stream, as torch.cuda.graph asks
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    ms = triton.testing.do_bench(graph.replay, warmup=2, rep=rep, return_mode="median")
    del graph
    return ms


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["9B", "27B"])
    ap.add_argument("--lengths", nargs="+", type=int, default=[1024, 8192, 32768])
    ap.add_argument("--formats", nargs="+", default=["bf16"],
                    choices=["bf16", "fp8", "int4", "fp8-w8a8", "gptq", "gptq-act-order"])
    ap.add_argument("--graph", action="store_true", help="also time each step replayed from one CUDA graph")
    args = ap.parse_args()
    require_cuda("bench_prefill.py")
    rate = measure_matmul_rate()
    rows = []
    for name in args.models:
        for length in args.lengths:
            bf16_row = None
            for fmt in args.formats:
                rows.append(bench_one(name, length, rate, fmt, bf16_row, args.graph))
                bf16_row = rows[-1] if fmt == "bf16" else bf16_row
                print(rows[-1], flush=True)
    print(header(""))
    print(f"bf16 8192^3 matmul measured: {rate / 1e12:.0f} TFLOP/s")
    print(table([{k: v for k, v in r.items() if k != "flops"} for r in rows]))


if __name__ == "__main__":
    main()
