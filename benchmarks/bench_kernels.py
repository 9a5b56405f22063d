"""Every kernel at Qwen3.5-27B and 35B-A3B layer shapes in one table, against the card's floors measured in the same
run (bytes / copy bandwidth, FLOPs / bf16 matmul rate) and against the baselines run in the same process (fla-core's
chunk and fused_recurrent kernels for GDN, SDPA for attention, the torch references for the row-wise ops, the
grouped-GEMM path for MoE).

    PYTHONPATH=src:. python3 benchmarks/bench_kernels.py [--skip-prefill] [--out FILE]
    PYTHONPATH=src:. python3 benchmarks/bench_kernels.py --moe-paths [--moe-model 122B-A10B] [--moe-batches 1 8]
        (MoE paths by batch, each path's tile configs, and the blocked path without TMA weights or half-height blocks)
    PYTHONPATH=src:. python3 benchmarks/bench_kernels.py --moe-sort   (the grouped path's pair sort at prefill sizes)

GDN decode rotates through enough layers that states come from HBM, as in a real step (see bench_gdn.py).
"""

from __future__ import annotations

import argparse
import platform
import sys

import torch
import triton

from benchmarks import bench_attention as attn_bench
from benchmarks import bench_gdn as gdn_bench
from benchmarks.bench_attention import Row
from benchmarks.common import require_cuda

A3B = {"dim": 2048, "inter": 512, "experts": 256, "top_k": 8, "shared": 512}


def gdn_rows(copy_gbs: float, skip_prefill: bool) -> list[Row]:
    raw: list[dict] = []
    for model in gdn_bench.MODELS:
        for batch in (1, 64):
            gdn_bench.decode_shape(raw, copy_gbs * 1e9, False, model, batch)
        if not skip_prefill:
            for total in (2048, 8192):
                gdn_bench.prefill_shape(raw, model, total)
    rows = []
    for r in raw:
        gbs = r.get("state_GBps")
        rows.append(Row(f"gdn {r['kernel']}", r["shape"], r["us"] / 1e3, gbs if gbs == gbs else None,
                        note=r["mode"]))
    return rows


def moe_rows(copy_gbs: float) -> list[Row]:
    from deltaserve.kernels.moe import gpu as moe_gpu
    from deltaserve.kernels.moe import grouped
    from deltaserve.kernels.moe import triton as moe

    c, rows = A3B, []
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=gen) * scale).bfloat16()

    w13 = rnd(c["experts"], 2 * c["inter"], c["dim"], scale=c["dim"] ** -0.5)
    w2 = rnd(c["experts"], c["dim"], c["inter"], scale=c["inter"] ** -0.5)
    s13, s2 = rnd(2 * c["shared"], c["dim"]), rnd(c["dim"], c["shared"])
    expert_bytes = 3 * c["dim"] * c["inter"] * 2
    for tokens in (1, 8, 64):
        x = rnd(tokens, c["dim"])
        logits = rnd(tokens, c["experts"] + 1)
        w, ids = moe.moe_topk_softmax(router_logits=logits[:, :c["experts"]], top_k=c["top_k"])
        w = w.bfloat16()
        kw = dict(x=x, w13=w13, w2=w2, topk_weights=w, topk_ids=ids, shared_w13=s13, shared_w2=s2,
                  shared_gate=logits[:, c["experts"]:])
        nbytes = (ids.unique().numel() + 1) * expert_bytes  # each expert hit (and the shared one) read once
        shape = f"35B-A3B T={tokens} top-8/256 + shared"

        def grouped_path(kw=kw):
            routed = grouped.fused_moe(x=kw["x"], w13=w13, w2=w2, topk_weights=kw["topk_weights"],
                                       topk_ids=kw["topk_ids"])
            h = torch.nn.functional.linear(kw["x"], s13)
            h = torch.nn.functional.silu(h[:, :c["shared"]]) * h[:, c["shared"]:]
            return routed + torch.sigmoid(kw["shared_gate"]) * torch.nn.functional.linear(h, s2)

        t_graph = triton.testing.do_bench_cudagraph(lambda kw=kw: moe_gpu.fused_moe(**kw), rep=100,
                                                    return_mode="median")
        t_pairs = triton.testing.do_bench_cudagraph(lambda kw=kw: moe.fused_moe_pairs(**kw), rep=100,
                                                    return_mode="median")
        t_grouped = triton.testing.do_bench_cudagraph(grouped_path, rep=100, return_mode="median")
        rows.append(Row("moe fused_moe (auto path)", shape, t_graph, nbytes / (t_graph * 1e-3) / 1e9,
                        base_name="grouped GEMMs + torch shared expert", base_ms=t_grouped,
                        note=f"CUDA graph; per-pair kernels {t_pairs * 1e3:.1f} us; floor "
                             f"{nbytes / (copy_gbs * 1e9) * 1e6:.1f} us"))
        t_topk = triton.testing.do_bench_cudagraph(
            lambda lg=logits: moe.moe_topk_softmax(router_logits=lg[:, :c["experts"]], top_k=c["top_k"]), rep=100,
            return_mode="median")
        from deltaserve.kernels.moe import ref

        t_topk_ref = triton.testing.do_bench_cudagraph(
            lambda lg=logits: ref.moe_topk_softmax(router_logits=lg[:, :c["experts"]], top_k=c["top_k"]), rep=100,
            return_mode="median")
        rows.append(Row("moe topk_softmax", shape, t_topk, base_name="torch softmax+topk", base_ms=t_topk_ref,
                        note="CUDA graph"))
    return rows


MOE_PATH_BATCHES = (1, 4, 8, 16, 32, 64, 128, 256)
# (BLOCK_N, BLOCK_K, warps) tried for each per-pair kernel (the other keeps its default) at up to this many pairs
PAIR_SWEEP_MAX_PAIRS = 64
PAIR_GATE_UP_SWEEP = [(4, 512, 2), (8, 512, 4), (16, 512, 8), (8, 1024, 4), (4, 1024, 4), (4, 2048, 8),
                      (2, 2048, 4), (16, 256, 4)]
PAIR_DOWN_SWEEP = [(4, 512, 2), (2, 512, 1), (4, 512, 4), (8, 512, 4), (8, 256, 2), (2, 512, 2), (16, 512, 8)]


def pairs_with(calls: list[dict], extra: dict):
    """The per-pair kernels over every layer's call with one tile config overridden."""
    from deltaserve.kernels.moe import triton as moe

    return lambda: [moe.fused_moe_pairs(**kw, **extra) for kw in calls]


def moe_paths(model: str, layers: int = 4, batches=MOE_PATH_BATCHES, device: str = "cuda", shape=None,
              bench=None) -> list[dict]:
    """Time each MoE path (per-pair kernels and the expert-centric kernels with every midbatch.CONFIGS tile for
    each of its two kernels up to MID_BATCH_MAX_PAIRS, the CUTLASS grouped GEMMs, the block-grouped Triton GEMMs
    with every blocked.CONFIGS tile past a quarter of it, the automatic pick) on one MoE layer at decode batches
    1-256 or any batch given (prefill sizes: TFLOP/s is the column to read there), random routing
    (top-k of a softmax over random logits), shared expert included, against the bytes of the experts the routing
    touches (distinct experts x expert bytes + the shared expert) and the copy bandwidth measured in this run.
    Each timed call runs `layers` layers with their own weights, as a step does, so that at small batches the
    touched experts do not stay in L2 between calls; times are per layer. device / shape (a SHAPES-like dict) /
    bench (fn -> ms) let the CPU test run the plumbing."""
    from benchmarks.common import SHAPES, measure_copy_bandwidth, moe_blocked_tiles
    from deltaserve.kernels.moe import blocked, midbatch
    from deltaserve.kernels.moe import gpu as moe_gpu
    from deltaserve.kernels.moe import triton as moe

    cfg = shape or SHAPES[model]
    dim, inter, experts, top_k = (cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["num_experts"],
                                  cfg["num_experts_per_tok"])
    shared_inter = cfg["shared_expert_intermediate_size"]
    bench = bench or (lambda fn: triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"))
    # bytes read + written per second: a read-only stream's floor is bytes / copy
    copy = measure_copy_bandwidth() if device == "cuda" else 1e12
    gen = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, generator=gen) * scale).bfloat16()

    weights = [dict(w13=rnd(experts, 2 * inter, dim, scale=dim ** -0.5),
                    w2=rnd(experts, dim, inter, scale=inter ** -0.5),
                    shared_w13=rnd(2 * shared_inter, dim, scale=dim ** -0.5),
                    shared_w2=rnd(dim, shared_inter, scale=shared_inter ** -0.5)) for _ in range(layers)]
    expert_bytes = 3 * dim * inter * 2
    print(f"{model} MoE layer: D={dim} I={inter} E={experts} top-{top_k} + shared I={shared_inter}; copy "
          f"{copy / 1e12:.2f} TB/s; {layers} layers a timed call; thresholds: per-pair <= "
          f"{moe_gpu.SMALL_BATCH_PAIRS} pairs < mid <= {moe_gpu.MID_BATCH_MAX_PAIRS} < blocked", flush=True)
    mid_cfgs = [("mid", {})]
    for c in midbatch.CONFIGS:
        if c != midbatch.GATE_UP_CONFIG:
            mid_cfgs.append((f"mid gate_up={c}", {"gate_up_config": c}))
        if c != midbatch.DOWN_CONFIG:
            mid_cfgs.append((f"mid down={c}", {"down_config": c}))
    pair_cfgs = [(f"per-pair gate_up={c}", {"gate_up_config": c}) for c in PAIR_GATE_UP_SWEEP
                 if c != moe.GATE_UP_CONFIG]
    rows = []
    for tokens in batches:
        calls = []
        for layer in weights:
            logits = rnd(tokens, experts + 1)
            w, ids = moe.moe_topk_softmax(router_logits=logits[:, :experts], top_k=top_k)
            calls.append(dict(x=rnd(tokens, dim), topk_weights=w.bfloat16(), topk_ids=ids,
                              shared_gate=logits[:, experts:], **layer))
        touched = sum(kw["topk_ids"].unique().numel() for kw in calls) / layers
        nbytes = (touched + 1) * expert_bytes
        floor_us = nbytes / copy * 1e6
        flops = 2 * 3 * dim * (tokens * top_k * inter + tokens * shared_inter)

        def forced(path, extra=None):
            def run():
                previous, moe_gpu.FORCE_PATH = moe_gpu.FORCE_PATH, path
                try:
                    if extra is not None:
                        return [midbatch.fused_moe_mid(**kw, **extra) for kw in calls]
                    return [moe_gpu.fused_moe(**kw) for kw in calls]
                finally:
                    moe_gpu.FORCE_PATH = previous
            return run

        def blocked_with(cfg):
            """The blocked path, as the layer calls it, with cfg as its only tiles for the call."""
            def run():
                with moe_blocked_tiles(cfg):
                    return forced("blocked")()
            return run

        def blocked_without(flag, off):
            """The blocked path with one of its module switches turned off (TMA_WEIGHTS, or SPLIT_MIN_M past any
            block) for the call: what that feature gains, in the same table."""
            def run():
                saved = getattr(blocked, flag)
                setattr(blocked, flag, off)
                try:
                    return forced("blocked")()
                finally:
                    setattr(blocked, flag, saved)
            return run

        pairs = tokens * top_k
        variants = [("auto (" + moe_gpu.pick_path(pairs) + ")", forced(None)), ("grouped", forced("grouped")),
                    ("blocked", forced("blocked")),
                    ("blocked, weights by pointer", blocked_without("TMA_WEIGHTS", False)),
                    ("blocked, no half-height blocks", blocked_without("SPLIT_MIN_M", 1 << 30))]
        if pairs <= moe_gpu.MID_BATCH_MAX_PAIRS:  # past it the per-pair and mid tiles are far off; mid stays as truth
            variants += [("per-pair", forced("pairs"))] + [(name, forced("mid", extra)) for name, extra in mid_cfgs]
        else:
            variants += [("mid", forced("mid", {}))]
        if pairs > moe_gpu.MID_BATCH_MAX_PAIRS // 4:
            variants += [(f"blocked {c}", blocked_with(c)) for c in blocked.CONFIGS if c != blocked.pick_tiles(pairs)]
        if tokens * top_k <= PAIR_SWEEP_MAX_PAIRS:
            down_default = moe.DOWN_CONFIG_ONE_TOKEN if tokens == 1 else moe.DOWN_CONFIG  # the kernel's pick here
            down_cfgs = [(f"per-pair down={c}", {"down_config": c}) for c in PAIR_DOWN_SWEEP if c != down_default]
            variants += [(name, pairs_with(calls, extra)) for name, extra in pair_cfgs + down_cfgs]
        expected = forced("mid", {})()
        for name, fn in variants:
            row = {"batch": tokens, "path": name, "experts touched": f"{touched:.0f}", "MB": nbytes / 1e6,
                   "floor us": floor_us}
            try:
                got = fn()
                err = max(((g.float() - e.float()).norm() / e.float().norm()).item() for g, e in zip(got, expected))
                ms = bench(fn) / layers
                row.update({"us": ms * 1e3, "TB/s": nbytes / (ms * 1e-3) / 1e12, "TFLOP/s": flops / ms / 1e9,
                            "of floor": f"{floor_us / (ms * 1e3):.0%}",
                            "vs mid": "ok" if err < 2e-2 else f"DIFF {err:.1e}"})
            except Exception as e:  # noqa: BLE001 (one failing variant must not lose the table)
                row["us"] = f"{type(e).__name__}: {str(e)[:80]}"
            rows.append(row)
            print(row, flush=True)
    from benchmarks.common import table

    print(table(rows))
    return rows


def moe_sort(tokens=(2048, 8192), experts: int = 256, top_k: int = 8) -> None:
    """The grouped MoE path's sort of the routed pairs (grouped.sort_pairs: sort, searchsorted, inverse permutation)
    at prefill sizes, median us of eager calls and of CUDA-graph replays; the tree on PYTHONPATH is timed."""
    from deltaserve.kernels.moe import grouped

    for t in tokens:
        ids = torch.randint(experts, (t, top_k), device="cuda")
        call = lambda: grouped.sort_pairs(ids, experts)  # noqa: E731
        graph = gdn_bench.graph_of(call)
        eager, replay = gdn_bench.bench(call), gdn_bench.bench(graph.replay)
        print(f"sort_pairs: {t} tokens x top-{top_k} of {experts} experts ({t * top_k} pairs): eager "
              f"{1e3 * eager:.1f} us, graph {1e3 * replay:.1f} us", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-prefill", action="store_true", help="skip the GDN chunk prefill rows")
    parser.add_argument("--out", help="also write the table to this file")
    parser.add_argument("--moe-paths", action="store_true",
                        help="only time the MoE paths (per-pair, expert-centric, grouped) and their tile configs")
    parser.add_argument("--moe-batches", nargs="+", type=int, default=list(MOE_PATH_BATCHES))
    parser.add_argument("--moe-model", default="35B-A3B", help="benchmarks/common.py SHAPES entry for --moe-paths")
    parser.add_argument("--moe-sort", action="store_true", help="only time the grouped path's pair sort")
    args = parser.parse_args()
    require_cuda("bench_kernels.py", fla=not (args.moe_sort or args.moe_paths))
    if args.moe_sort:
        moe_sort()
        return
    if args.moe_paths:
        moe_paths(args.moe_model, batches=args.moe_batches)
        return
    import fla

    copy_gbs, mm_tflops = attn_bench.ceilings()
    gen = torch.Generator().manual_seed(1)
    rows: list[Row] = []
    errors: list[str] = []

    def fmt(r: Row) -> str:
        return attn_bench.format_row(r, copy_gbs, mm_tflops)

    def attempt(what: str, fn) -> None:
        try:
            out = fn()
            new = out if isinstance(out, list) else [out]
            rows.extend(new)
            print("\n".join(fmt(r) for r in new), flush=True)  # as they come: a time-out keeps what was measured
        except Exception as e:  # noqa: BLE001 (one broken row must not lose the table)
            errors.append(f"{what}: {type(e).__name__}: {str(e)[:300]}")

    attempt("moe", lambda: moe_rows(copy_gbs))
    for model in attn_bench.MODELS:
        for n, length in [(1, 4096), (64, 4096)]:
            attempt(f"attention decode {model}", lambda: attn_bench.bench_decode(model, n, length, gen, copy_gbs))
        attempt(f"attention prefill {model}", lambda: attn_bench.bench_prefill(model, 0, 8192, gen))
    for tokens in (64, 8192):
        attempt(f"rowwise {tokens}", lambda: attn_bench.bench_rowwise(tokens))
    attempt("gdn", lambda: gdn_rows(copy_gbs, args.skip_prefill))

    props = torch.cuda.get_device_properties(0)
    lines = [f"card: {props.name} ({props.multi_processor_count} SMs); torch {torch.__version__}, triton "
             f"{triton.__version__}, fla-core {getattr(fla, '__version__', '?')}, python {platform.python_version()}",
             f"command: {' '.join([sys.executable, *sys.argv])}",
             f"floors measured in this run: copy {copy_gbs:.0f} GB/s (read + write), bf16 8192^3 matmul "
             f"{mm_tflops:.0f} TFLOP/s",
             *attn_bench.TABLE_HEADER]
    lines += [fmt(r) for r in rows] + errors
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
