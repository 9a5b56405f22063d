"""Where the GPU time of a step goes: the kernels of one decode step (or one GDN prefill call) by time, against the
step's wall time, so launch gaps and slow kernels show apart.

    PYTHONPATH=src:. python benchmarks/profile_step.py decode --model 9B --batch 1 [--context 1024] [--pdl off on]
                                                      [--format bf16|fp8|int4]
    PYTHONPATH=src:. python benchmarks/profile_step.py gdn-prefill --model 27B --tokens 2048
    PYTHONPATH=src:. python benchmarks/profile_step.py mixed --model 9B --prompts 8 --tokens 1024 --batch 56

mixed: one eager step of the kind an offline run's prefill steps are: `--prompts` fresh prompts of `--tokens` tokens
each plus `--batch` decode rows at `--context`, in one varlen batch (logits for every sequence's last row).

Kernel times come from an eager run under torch.profiler (the same kernels a graph replays); the wall times are
medians of do_bench over the graph replay (decode) or the eager call (prefill).

--pdl (decode): profile with Programmatic Dependent Launch off and/or on (bench_decode.set_pdl), one capture each.
With PDL a kernel starts while its predecessor drains and waits inside (griddepcontrol.wait), so its profiled time
includes that wait: compare the graph step times, and the kernel table with PDL off.

--format (decode): the weights in one of bench_quant.py's formats (dummy weights quantized at load).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import triton.testing
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import header, require_cuda


def host_us(fn: Callable[[], object], calls: int = 50) -> float:
    """Host time per call with the GPU queue free to run behind: above the kernel time means launch-bound."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def kernel_table(fn: Callable[[], object], calls: int, top: int = 25) -> tuple[float, str]:
    """Profile `calls` runs of fn; returns (kernel µs per call, a table of the top kernels per call)."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return profiled_kernels(prof, calls, top)


def profiled_kernels(prof: profile, calls: int, top: int = 25, skip: tuple[str, ...] = ()) -> tuple[float, str]:
    """(kernel µs per call, table of the top kernels per call) of a finished profile over `calls` calls; `skip`:
    record_function labels, which also show up as device-side spans."""
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if us > 0 and e.count and e.device_type == torch.autograd.DeviceType.CUDA and e.key not in skip:
            rows.append((us / calls, e.count / calls, e.key))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    lines = [f"{'µs/call':>9} {'share':>6} {'launches':>8}  kernel"]
    lines += [f"{us:9.1f} {us / total:6.1%} {n:8.1f}  {name[:110]}" for us, n, name in rows[:top]]
    launches = sum(r[1] for r in rows)
    lines.append(f"{total:9.1f} {'100%':>6} {launches:8.1f}  (all kernels)")
    return total, "\n".join(lines)


def profile_decode(model_name: str, batch: int, context: int, pdl: str = "auto", model=None, fmt: str = "bf16"):
    from benchmarks.bench_decode import set_pdl, setup_decode
    from benchmarks.bench_quant import load

    pdl_on = set_pdl(pdl)
    if model is None and fmt != "bf16":
        model = load(model_name, fmt)
    _, model, cache, fb, ids, graphs = setup_decode(model_name, batch, context, model)
    wall_ms = triton.testing.do_bench(lambda: graphs.run(ids, fb), warmup=20, rep=200, return_mode="median")

    @torch.no_grad()
    def eager() -> None:
        model.compute_logits(model(ids, fb, cache))

    kernel_us, text = kernel_table(eager, calls=5)
    print(f"decode {model_name} {fmt} batch {batch} context {context}, PDL {'on' if pdl_on else 'off'}: "
          f"graph step {wall_ms * 1e3:.0f} µs, "
          f"kernel time {kernel_us:.0f} µs ({kernel_us / (wall_ms * 1e3):.0%} of the step), "
          f"eager host time {host_us(eager, 10):.0f} µs")
    print(text)
    return model


def profile_mixed(model_name: str, prompts: int, tokens: int, decode_rows: int, context: int) -> None:
    from benchmarks.bench_decode import PAGE
    from benchmarks.common import model_config
    from deltaserve.cache.tensors import CacheShape, ModelCache
    from deltaserve.engine.device_inputs import build_forward_batch
    from deltaserve.models.loader import load_model

    cfg = model_config(model_name)
    model = load_model(cfg, load_format="dummy", device="cuda", dtype=torch.bfloat16, with_mtp=False)
    lens = [tokens] * prompts + [context + 1] * decode_rows
    pages = [-(-n // PAGE) for n in lens]
    n_seqs = len(lens)
    cache = ModelCache(cfg, CacheShape(num_pages=sum(pages), page_size=PAGE, num_slots=n_seqs,
                                       kv_dtype=torch.bfloat16, conv_dtype=torch.bfloat16), device="cuda")
    starts = [sum(pages[:i]) for i in range(n_seqs)]
    fb = build_forward_batch(query_lens=[tokens] * prompts + [1] * decode_rows,
                             context_lens=[0] * prompts + [context] * decode_rows, state_slots=list(range(n_seqs)),
                             block_tables=[list(range(a, a + p)) for a, p in zip(starts, pages)], page_size=PAGE,
                             device="cuda")
    ids = torch.randint(0, cfg.vocab_size, (fb.num_tokens,), device="cuda")

    @torch.no_grad()
    def step() -> None:
        hidden = model(ids, fb, cache)
        model.compute_logits(hidden[fb.logits_indices])

    wall_ms = triton.testing.do_bench(step, warmup=3, rep=20, return_mode="median")
    kernel_us, text = kernel_table(step, calls=3)
    print(f"mixed step {model_name}: {prompts} prompts x {tokens} + {decode_rows} decode rows at {context}: "
          f"{wall_ms:.1f} ms eager, kernel time {kernel_us / 1e3:.1f} ms, host time {host_us(step, 5) / 1e3:.1f} ms")
    print(text)


def profile_gdn_prefill(model_name: str, tokens: int) -> None:
    from benchmarks.bench_gdn import prefill_inputs

    ours, theirs = prefill_inputs(model_name, tokens)
    for label, fn in (("deltaserve chunk_gated_delta_rule", ours), ("fla-core chunk_gated_delta_rule", theirs)):
        wall_ms = triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")
        kernel_us, text = kernel_table(fn, calls=10)
        print(f"{label} {model_name} T={tokens}: eager call {wall_ms * 1e3:.0f} µs, kernel time {kernel_us:.0f} µs, "
              f"host time {host_us(fn):.0f} µs")
        print(text)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["decode", "gdn-prefill", "mixed"])
    ap.add_argument("--model", default="9B")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--pdl", nargs="+", default=["auto"], choices=["auto", "off", "on"])
    ap.add_argument("--format", default="bf16", choices=["bf16", "fp8", "fp8-w8a8", "int4"])
    args = ap.parse_args()
    require_cuda("profile_step.py")
    print(header(""))
    if args.what == "decode":
        model = None
        for pdl in args.pdl:  # one model, a capture per setting
            model = profile_decode(args.model, args.batch, args.context, pdl, model, args.format)
    elif args.what == "mixed":
        profile_mixed(args.model, args.prompts, args.tokens, args.batch, args.context)
    else:
        profile_gdn_prefill(args.model, args.tokens)


if __name__ == "__main__":
    main()
