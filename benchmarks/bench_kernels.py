"""Every kernel at Qwen3.5-27B and 35B-A3B layer shapes in one table, against the card's floors measured in the same
run (bytes / copy bandwidth, FLOPs / bf16 matmul rate) and against the baselines run in the same process (fla-core's
chunk and fused_recurrent kernels for GDN, SDPA for attention, the torch references for the row-wise ops, the
grouped-GEMM path for MoE).

    PYTHONPATH=src:. python3 benchmarks/bench_kernels.py [--skip-prefill] [--out FILE]

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


MOE_SWEEP = [(8, 512, 4), (16, 512, 4), (16, 256, 4), (32, 256, 8), (16, 512, 8), (32, 512, 8), (8, 256, 2),
             (4, 512, 2)]


def sweep_moe(copy_gbs: float) -> list[str]:
    """Time every (BLOCK_N, BLOCK_K, warps) of the gate_up and down kernels at 35B-A3B, batch 1 and 8."""
    from deltaserve.kernels.moe import triton as moe

    c, out = A3B, []
    gen = torch.Generator(device="cuda").manual_seed(0)
    w13 = torch.randn(c["experts"], 2 * c["inter"], c["dim"], device="cuda", generator=gen).bfloat16()
    w2 = torch.randn(c["experts"], c["dim"], c["inter"], device="cuda", generator=gen).bfloat16()
    s13 = torch.randn(2 * c["shared"], c["dim"], device="cuda", generator=gen).bfloat16()
    s2 = torch.randn(c["dim"], c["shared"], device="cuda", generator=gen).bfloat16()
    for tokens in (1, 8):
        x = torch.randn(tokens, c["dim"], device="cuda", generator=gen).bfloat16()
        logits = torch.randn(tokens, c["experts"] + 1, device="cuda", generator=gen).bfloat16()
        w, ids = moe.moe_topk_softmax(router_logits=logits[:, :c["experts"]], top_k=c["top_k"])
        kw = dict(x=x, w13=w13, w2=w2, topk_weights=w.bfloat16(), topk_ids=ids, shared_w13=s13, shared_w2=s2,
                  shared_gate=logits[:, c["experts"]:])
        expected = moe.fused_moe_pairs(**kw)
        nbytes = (ids.unique().numel() + 1) * 3 * c["dim"] * c["inter"] * 2
        for which in ("gate_up", "down"):
            for cfg in MOE_SWEEP:
                other = moe.DOWN_CONFIG if which == "gate_up" else moe.GATE_UP_CONFIG
                cfgs = {"gate_up_config": cfg, "down_config": other} if which == "gate_up" else \
                    {"gate_up_config": other, "down_config": cfg}
                try:
                    got = moe.fused_moe_pairs(**kw, **cfgs)
                    ok = torch.allclose(got.float(), expected.float(), rtol=1e-2, atol=1e-2)
                    t = triton.testing.do_bench_cudagraph(lambda cfgs=cfgs: moe.fused_moe_pairs(**kw, **cfgs),
                                                          rep=50, return_mode="median")
                    out.append(f"moe sweep T={tokens} {which} {cfg}: {t * 1e3:.1f} us for both kernels "
                               f"({nbytes / (t * 1e-3) / 1e9 / copy_gbs:.0%} of copy) {'ok' if ok else 'WRONG'}")
                except Exception as e:  # noqa: BLE001
                    out.append(f"moe sweep T={tokens} {which} {cfg}: {type(e).__name__} {str(e)[:100]}")
                print(out[-1], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-prefill", action="store_true", help="skip the GDN chunk prefill rows")
    parser.add_argument("--out", help="also write the table to this file")
    parser.add_argument("--sweep-moe", action="store_true", help="only time the MoE kernels' tile configs")
    args = parser.parse_args()
    import fla

    copy_gbs, mm_tflops = attn_bench.ceilings()
    if args.sweep_moe:
        sweep_moe(copy_gbs)
        return
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
