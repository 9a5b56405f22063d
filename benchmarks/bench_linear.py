"""Decode-time linear layers at real shapes: each BLAS backend against the weight-read floor, in one run.

    PYTHONPATH=src:. python benchmarks/bench_linear.py [--models 9B 27B] [--batches 1 8 64] [--sweep]

At decode a linear layer reads its whole weight for a few rows, so its floor is weight bytes / copy bandwidth
(measured in the same run). Each timing is a CUDA graph over enough copies of the weight that they do not fit in
L2, as in a model where every layer has its own. Columns: torch's GEMM (cuBLAS), the Triton decode kernel with
the tile `tile_config` picks (or torch where it picks torch), and with --sweep the best of SWEEP_TILES.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import header, measure_copy_bandwidth, model_config, table

L2_BYTES = 50 << 20
# (BN, BK, num_warps, stages) tiles of the Triton kernel timed with --sweep
SWEEP_TILES = [(16, 256, 4, 4), (32, 256, 4, 4), (64, 256, 4, 4), (32, 128, 4, 6), (64, 128, 8, 4),
               (128, 128, 8, 3), (32, 512, 8, 3)]


def linear_shapes(name: str) -> dict[str, tuple[int, int]]:
    """{layer: (in_features, out_features)} of one decoder layer of each kind, plus the lm_head."""
    cfg = model_config(name)
    d = cfg.hidden_size
    shapes = {
        "gdn in_proj (qkv|z|b|a)": (d, cfg.conv_dim + cfg.value_dim + 2 * cfg.linear_num_value_heads),
        "gdn out_proj": (cfg.value_dim, d),
        "attn qkv (q|gate|k|v)": (d, 2 * cfg.num_attention_heads * cfg.head_dim
                                  + 2 * cfg.num_key_value_heads * cfg.head_dim),
        "attn o_proj": (cfg.num_attention_heads * cfg.head_dim, d),
        "lm_head": (d, cfg.vocab_size),
    }
    if cfg.is_moe:
        shapes["moe router (gate|shared gate)"] = (d, cfg.num_experts + 1)
    else:
        shapes["mlp gate_up"] = (d, 2 * cfg.intermediate_size)
        shapes["mlp down"] = (cfg.intermediate_size, d)
    return shapes


def time_linear(k: int, n: int, batch: int, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> float:
    """us per call of fn(x [batch, k], W [n, k]) in bf16, cycling through weights that together overflow L2."""
    import triton.testing

    copies = max(2, -(-3 * L2_BYTES // (2 * k * n)))
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    x = torch.randn(batch, k, device="cuda", dtype=torch.bfloat16)
    for w in weights:  # warm-up outside the capture (compiles, cuBLAS workspace and heuristics)
        fn(x, w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            fn(x, w)
    ms = triton.testing.do_bench(graph.replay, warmup=20, rep=200, return_mode="median")
    del graph, weights
    torch.cuda.empty_cache()
    return ms * 1e3 / copies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["9B", "27B", "35B-A3B"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    parser.add_argument("--sweep", action="store_true", help="also time every tile of SWEEP_TILES")
    args = parser.parse_args()
    from deltaserve.kernels.linear import gpu as linear_gpu
    from deltaserve.kernels.linear import triton as linear_triton

    bw = measure_copy_bandwidth()
    title = header(" ".join(sys.argv)) + f"\ncopy bandwidth (read + write): {bw / 1e12:.3f} TB/s"
    print(title)
    rows: list[dict[str, Any]] = []
    for name in args.models:
        for layer, (k, n) in linear_shapes(name).items():
            floor_us = 2 * k * n / bw * 1e6  # bf16 weight bytes at the copy rate (the bytes moved per second)
            for batch in args.batches:
                row: dict[str, Any] = {"model": name, "layer": f"{layer} {k}->{n}", "batch": batch,
                                       "floor_us": floor_us}
                us = time_linear(k, n, batch, torch.nn.functional.linear)
                row.update(torch_us=us, torch_pct=100 * floor_us / us)
                tile = linear_triton.tile_config(batch, n, k)
                us = time_linear(k, n, batch, lambda x, w: linear_gpu.linear(x=x, weight=w))
                row.update(default_tile=str(tile or "torch"), default_us=us, default_pct=100 * floor_us / us)
                if args.sweep:
                    timed = {t: time_linear(k, n, batch, lambda x, w, t=t: linear_triton.skinny_linear(x, w, t))
                             for t in SWEEP_TILES}
                    best = min(timed, key=timed.get)
                    row.update(best_tile=str(best), best_us=timed[best], best_pct=100 * floor_us / timed[best])
                    print(name, layer, batch, {str(t): round(v, 1) for t, v in timed.items()}, flush=True)
                rows.append(row)
    print(table(rows))
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "bench_linear.txt"), "w") as f:
            f.write(title + "\n" + table(rows) + "\n")


if __name__ == "__main__":
    main()
