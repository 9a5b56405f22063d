"""Where the GPU time of a step goes: the kernels of one decode step (or one GDN prefill call) by time, against the
step's wall time, so launch gaps and slow kernels show apart.

    PYTHONPATH=src:. python benchmarks/profile_step.py decode --model 9B --batch 1 [--context 1024]
    PYTHONPATH=src:. python benchmarks/profile_step.py gdn-prefill --model 27B --tokens 2048

Kernel times come from an eager run under torch.profiler (the same kernels a graph replays); the wall times are
medians of do_bench over the graph replay (decode) or the eager call (prefill).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import triton.testing
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import header


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
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if us > 0 and e.count:
            rows.append((us / calls, e.count / calls, e.key))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    lines = [f"{'µs/call':>9} {'share':>6} {'launches':>8}  kernel"]
    lines += [f"{us:9.1f} {us / total:6.1%} {n:8.1f}  {name[:110]}" for us, n, name in rows[:top]]
    launches = sum(r[1] for r in rows)
    lines.append(f"{total:9.1f} {'100%':>6} {launches:8.1f}  (all kernels)")
    return total, "\n".join(lines)


def profile_decode(model_name: str, batch: int, context: int) -> None:
    from benchmarks.bench_decode import setup_decode

    _, model, cache, fb, ids, graphs = setup_decode(model_name, batch, context)
    wall_ms = triton.testing.do_bench(lambda: graphs.run(ids, fb), warmup=20, rep=200, return_mode="median")

    @torch.no_grad()
    def eager() -> None:
        model.compute_logits(model(ids, fb, cache))

    kernel_us, text = kernel_table(eager, calls=5)
    print(f"decode {model_name} batch {batch} context {context}: graph step {wall_ms * 1e3:.0f} µs, "
          f"kernel time {kernel_us:.0f} µs ({kernel_us / (wall_ms * 1e3):.0%} of the step), "
          f"eager host time {host_us(eager, 10):.0f} µs")
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
    ap.add_argument("what", choices=["decode", "gdn-prefill"])
    ap.add_argument("--model", default="9B")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=2048)
    args = ap.parse_args()
    print(header(""))
    if args.what == "decode":
        profile_decode(args.model, args.batch, args.context)
    else:
        profile_gdn_prefill(args.model, args.tokens)


if __name__ == "__main__":
    main()
