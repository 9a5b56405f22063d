"""Decode-time linear layers at real shapes: each BLAS backend against the weight-read floor, in one run.

    PYTHONPATH=src:. python benchmarks/bench_linear.py [--models 9B 27B] [--batches 1 8 64] [--sweep]

At decode a linear layer reads its whole weight for a few rows, so its floor is weight bytes / copy bandwidth
(measured in the same run). Each timing is a CUDA graph over enough copies of the weight that they do not fit in
L2, as in a model where every layer has its own. Columns: torch's GEMM (cuBLAS); `pick`, the call as the engine
routes it (the tile kernels/linear/tuned.py lists for this card and shape, else the one `tile_config` picks; "k<S>"
its split over K, or torch); TB/s = weight bytes / time. For the
narrow outputs that split-K is for (rows <= 16, N <= SPLIT_MAX_N) also the Triton kernel at the picked column tile
with no split (k1) and split 2 / 4 / 8 (k2, k4, k8), and `best` the fastest of all the columns. With --sweep also the
best of SWEEP_TILES (and of SPLIT_TILES for narrow outputs).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import header, measure_copy_bandwidth, model_config, require_cuda, table

L2_BYTES = 50 << 20
# (BN, BK, num_warps, stages) tiles of the Triton kernel timed with --sweep
SWEEP_TILES = [(16, 256, 4, 4), (32, 256, 4, 4), (64, 256, 4, 4), (32, 128, 4, 6), (64, 128, 8, 4),
               (128, 128, 8, 3), (32, 512, 8, 3)]
# (BN, BK, num_warps, stages, split) split-K tiles timed with --sweep on narrow outputs
SPLIT_TILES = [(16, 256, 4, 4, 4), (16, 256, 4, 4, 8), (32, 256, 4, 4, 4), (64, 256, 4, 4, 4), (32, 128, 4, 6, 4),
               (32, 256, 8, 4, 8), (64, 256, 4, 4, 8)]
SPLITS = (1, 2, 4, 8)  # timed at the picked column tile on narrow outputs


def linear_shapes(name: str) -> dict[str, tuple[int, int]]:
    """{layer: (in_features, out_features)} of one decoder layer of each kind, plus the lm_head."""
    cfg = model_config(name)
    d = cfg.hidden_size
    shapes = {
        "gdn in_proj (qkv|z|b|a)": (d, cfg.conv_dim + cfg.value_dim + 2 * cfg.linear_num_value_heads),
        # quantized checkpoints keep b|a in the model dtype beside an int4 / FP8 qkv|z: a call of its own
        "gdn in_proj b|a (quantized checkpoints)": (d, 2 * cfg.linear_num_value_heads),
        "gdn out_proj": (cfg.value_dim, d),
        "attn qkv (q|gate|k|v)": (d, 2 * cfg.num_attention_heads * cfg.head_dim
                                  + 2 * cfg.num_key_value_heads * cfg.head_dim),
        "attn o_proj": (cfg.num_attention_heads * cfg.head_dim, d),
        "lm_head": (d, cfg.vocab_size),
    }
    if cfg.is_moe:  # padded to a multiple of 8 rows, as the engine's MergedLinear stores it
        shapes["moe router (gate|shared gate)"] = (d, -(-(cfg.num_experts + 1) // 8) * 8)
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
    parser.add_argument("--sweep", action="store_true", help="also time every tile of SWEEP_TILES / SPLIT_TILES")
    args = parser.parse_args()
    require_cuda("bench_linear.py")
    from deltaserve.kernels._device import device_name, num_sms
    from deltaserve.kernels.linear import gpu as linear_gpu
    from deltaserve.kernels.linear import triton as linear_triton
    from deltaserve.kernels.linear.tuned import _MISSING, tuned_tile

    sms = num_sms(torch.device("cuda"))
    bw = measure_copy_bandwidth()
    title = header(" ".join(sys.argv)) + f"\ncopy bandwidth (read + write): {bw / 1e12:.3f} TB/s, {sms} SMs"
    print(title, flush=True)
    rows: list[dict[str, Any]] = []
    for name in args.models:
        for layer, (k, n) in linear_shapes(name).items():
            floor_us = 2 * k * n / bw * 1e6  # bf16 weight bytes at the copy rate (the bytes moved per second)
            tbs = lambda us: 2 * k * n / us / 1e6  # noqa: E731  weight bytes read per second, TB/s
            for batch in args.batches:
                row: dict[str, Any] = {"model": name, "layer": f"{layer} {k}->{n}", "batch": batch,
                                       "floor_us": floor_us}
                timed: dict[str, float] = {"torch": time_linear(k, n, batch, torch.nn.functional.linear)}
                row.update(torch_us=timed["torch"], torch_TBs=tbs(timed["torch"]))
                tile = tuned_tile(device_name(torch.device("cuda")), batch, n, k)
                if tile is _MISSING:
                    tile = linear_triton.tile_config(batch, n, k, sms)
                pick = str(tile) if tile else "torch"
                us = time_linear(k, n, batch, lambda x, w: linear_gpu.linear(x=x, weight=w))
                row.update(pick=pick, pick_us=us, pick_TBs=tbs(us), **{f"k{s}_us": "" for s in SPLITS})
                timed[pick] = min(us, timed.get(pick, us))
                tiles: list[tuple[int, ...]] = []
                if batch <= linear_triton.SPLIT_ROWS and n <= linear_triton.SPLIT_MAX_N:
                    base = tile or linear_triton.Tile(32, 256, 4, 4)
                    for split in SPLITS:
                        t = base._replace(split=split)
                        us = time_linear(k, n, batch, lambda x, w, t=t: linear_triton.skinny_linear(x, w, t))
                        row[f"k{split}_us"] = us
                        timed[str(t)] = us
                    if args.sweep:
                        tiles += SPLIT_TILES
                if args.sweep:
                    tiles += SWEEP_TILES
                for t in map(linear_triton.Tile._make, (t + (1,) * (5 - len(t)) for t in tiles)):
                    timed[str(t)] = time_linear(k, n, batch, lambda x, w, t=t: linear_triton.skinny_linear(x, w, t))
                best = min(timed, key=timed.get)
                row.update(best=best, best_us=timed[best], best_TBs=tbs(timed[best]))
                if args.sweep:
                    print(name, layer, batch, {t: round(v, 1) for t, v in timed.items()}, flush=True)
                rows.append(row)
    print(table(rows))
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "bench_linear.txt"), "w") as f:
            f.write(title + "\n" + table(rows) + "\n")


if __name__ == "__main__":
    main()
