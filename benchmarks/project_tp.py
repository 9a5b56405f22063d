"""Projected decode-step time under tensor parallelism, from one GPU's measured step and a model of the all-reduces.

python benchmarks/project_tp.py [--models 27B 122B-A10B] [--batches 1 64] [--tp 1 2 4 8] [--bandwidth 4.27e12]
                                [--allreduce-us 8 15 25] [--nvlink-gbs 450] [--fixed-ms 27B:1=2.2,64=3.9]

No GPU needed: per rank, the bytes a decode step must read are counted on the meta device from the rank's own
module shapes (RankShapes: heads, GDN heads, intermediate sizes and experts split; KV heads replicated past their
count), as bench_decode.py counts them for one GPU (weights, B rows of the embedding, the expected distinct experts
under uniform routing, GDN state read and written, KV at `--context`). A step then costs

    floor(bytes per rank / bandwidth) + fixed + all-reduces x (latency + ring transfer)

where `fixed` is what one GPU's measured graph step spends above its floor (launch gaps, small kernels: it does not
shrink with TP, since every rank runs every kernel), the all-reduces are two per layer (after the mixer, after the
MLP/MoE) plus one for the vocab-parallel logits, each moving batch x hidden bf16 values, and the ring transfer is
2 (N - 1) / N of them at `--nvlink-gbs` per direction. The latency of a decode-sized NCCL all-reduce is not
measured here (a single-GPU machine): the table spans `--allreduce-us` so the multi-GPU runs can place their
measurement in it. Models that do not fit one GPU take the fixed cost of the closest measured shape (`--fixed-ms`).
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.bench_decode import weight_bytes_read
from benchmarks.common import SHAPES, kv_bytes_per_token, model_config, positive_int, state_bytes, table

# One H200, 2026-12-03 (benchmarks/RESULTS.md, bench_decode.py, context 1,024, CUDA graphs): graph ms - floor ms.
MEASURED_FIXED_MS = {("27B", 1): 14.3 - 12.1, ("27B", 64): 21.5 - 17.6,
                     ("35B-A3B", 1): 2.80 - 1.41, ("35B-A3B", 64): 28.9 - 16.2}
CLOSEST_MEASURED = {"122B-A10B": "35B-A3B"}


def rank_bytes(name: str, tp: int, batch: int, context: int, expert_parallel: bool) -> float:
    """Bytes one rank's decode step must read (rank 0; every rank holds the same sizes)."""
    from deltaserve.config import RankShapes
    from deltaserve.models.qwen3_5 import Qwen3_5ForCausalLM

    cfg = model_config(name)
    shapes = RankShapes.for_rank(cfg, tp, 0, expert_parallel=expert_parallel)
    model = Qwen3_5ForCausalLM(cfg, dtype=torch.bfloat16, device="meta", with_mtp=False, shapes=shapes)
    weights = weight_bytes_read(model, cfg, batch)  # bench_decode's count, over this rank's parameters
    state = 2 * state_bytes(cfg) / tp  # GDN value heads split evenly
    kv_heads_total = cfg.num_key_value_heads
    kv_share = max(shapes.num_kv_heads, 1) / kv_heads_total  # replicated KV heads: a rank reads its own copy
    kv = context * kv_bytes_per_token(cfg) * kv_share
    return weights + batch * (state + kv)


def allreduce_ms(name: str, tp: int, batch: int, latency_us: float, nvlink_gbs: float) -> float:
    if tp == 1:
        return 0.0
    cfg = SHAPES[name]
    count = 2 * cfg["num_hidden_layers"] + 1
    message = batch * cfg["hidden_size"] * 2
    transfer_s = 2 * (tp - 1) / tp * message / (nvlink_gbs * 1e9)
    return count * (latency_us * 1e-6 + transfer_s) * 1e3


def fixed_ms(name: str, batch: int, overrides: dict[tuple[str, int], float]) -> float:
    key = (CLOSEST_MEASURED.get(name, name), batch)
    table_ = {**MEASURED_FIXED_MS, **overrides}
    if key not in table_:
        raise SystemExit(f"no measured fixed cost for {key}; pass --fixed-ms {key[0]}:{key[1]}=MS")
    return table_[key]


def parse_fixed(values: list[str]) -> dict[tuple[str, int], float]:
    out = {}
    for v in values:
        model, _, pairs = v.partition(":")
        for pair in pairs.split(","):
            b, _, ms = pair.partition("=")
            out[(model, int(b))] = float(ms)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["27B", "122B-A10B"], choices=[m for m in SHAPES if m != "tiny"])
    ap.add_argument("--batches", nargs="+", type=positive_int, default=[1, 64])
    ap.add_argument("--tp", nargs="+", type=positive_int, default=[1, 2, 4, 8])
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--bandwidth", type=float, default=4.27e12, help="HBM bytes/s (H200 copy, measured)")
    ap.add_argument("--allreduce-us", nargs="+", type=float, default=[8.0, 15.0, 25.0])
    ap.add_argument("--nvlink-gbs", type=float, default=450.0, help="NVLink 4 per direction, GB/s (spec)")
    ap.add_argument("--fixed-ms", nargs="*", default=[], help="MODEL:BATCH=MS,... measured graph - floor")
    ap.add_argument("--expert-parallel", action="store_true", help="MoE experts whole per rank")
    args = ap.parse_args()
    overrides = parse_fixed(args.fixed_ms)
    rows = []
    for name in args.models:
        for batch in args.batches:
            base = None
            for tp in args.tp:
                try:
                    nbytes = rank_bytes(name, tp, batch, args.context, args.expert_parallel)
                except Exception as e:  # noqa: BLE001 (an impossible TP size is a row, not a crash)
                    rows.append({"model": name, "batch": batch, "tp": tp, "GB/rank": str(e).split(";")[0][:60]})
                    continue
                floor = nbytes / args.bandwidth * 1e3
                row = {"model": name, "batch": batch, "tp": tp, "GB/rank": nbytes / 1e9, "floor ms": floor,
                       "fixed ms": fixed_ms(name, batch, overrides)}
                for lat in args.allreduce_us:
                    step = floor + row["fixed ms"] + allreduce_ms(name, tp, batch, lat, args.nvlink_gbs)
                    base = base if base is not None or tp != 1 else step
                    row[f"step ms @{lat:g}us"] = step
                    row[f"x TP1 @{lat:g}us"] = (base / step) if base else float("nan")
                rows.append(row)
    print(f"projection, not a measurement | bandwidth {args.bandwidth / 1e12:.2f} TB/s | NVLink "
          f"{args.nvlink_gbs:g} GB/s per direction | context {args.context} | expert parallel {args.expert_parallel}")
    print(table(rows))


if __name__ == "__main__":
    main()
