"""Decode-time linear layers at real shapes: each BLAS backend against the weight-read floor, in one run.

    PYTHONPATH=src:. python benchmarks/bench_linear.py [--models 9B 27B] [--batches 1 8 64]

At decode a linear layer reads its whole weight for a few rows, so its floor is weight bytes / copy bandwidth
(measured in the same run). Each timing is a CUDA graph over enough copies of the weight that they do not fit in
L2, as in a model where every layer has its own. Backends: torch's default (cuBLAS) and cuBLASLt
(torch.backends.cuda.preferred_blas_library), the choice the engine could make per shape.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch

from benchmarks.common import header, measure_copy_bandwidth, model_config, table

L2_BYTES = 50 << 20
BACKENDS = ("cublas", "cublaslt")


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
    if not cfg.is_moe:
        shapes["mlp gate_up"] = (d, 2 * cfg.intermediate_size)
        shapes["mlp down"] = (cfg.intermediate_size, d)
    return shapes


def time_linear(k: int, n: int, batch: int, backend: str) -> float:
    """us per call of x [batch, k] @ W[n, k]^T in bf16, cycling through weights that together overflow L2."""
    import triton.testing

    copies = max(2, -(-3 * L2_BYTES // (2 * k * n)))
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    x = torch.randn(batch, k, device="cuda", dtype=torch.bfloat16)
    previous = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library(backend)
    try:
        for w in weights:  # warm-up outside the capture (cuBLAS workspace, heuristics)
            torch.nn.functional.linear(x, w)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for w in weights:
                torch.nn.functional.linear(x, w)
    finally:
        torch.backends.cuda.preferred_blas_library(previous)
    ms = triton.testing.do_bench(graph.replay, warmup=20, rep=200, return_mode="median")
    del graph, weights
    torch.cuda.empty_cache()
    return ms * 1e3 / copies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["9B", "27B"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    args = parser.parse_args()
    bw = measure_copy_bandwidth()
    print(header(" ".join(sys.argv)))
    print(f"copy bandwidth (read + write): {bw / 1e12:.3f} TB/s")
    rows: list[dict[str, Any]] = []
    for name in args.models:
        for layer, (k, n) in linear_shapes(name).items():
            floor_us = 2 * k * n / bw * 1e6  # bf16 weight bytes at the copy rate (the bytes moved per second)
            for batch in args.batches:
                row: dict[str, Any] = {"model": name, "layer": f"{layer} {k}->{n}", "batch": batch,
                                       "floor_us": floor_us}
                for backend in BACKENDS:
                    us = time_linear(k, n, batch, backend)
                    row[f"{backend}_us"] = us
                    row[f"{backend}_pct"] = 100 * floor_us / us
                rows.append(row)
    print(table(rows))
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "bench_linear.txt"), "w") as f:
            f.write(table(rows) + "\n")


if __name__ == "__main__":
    main()
