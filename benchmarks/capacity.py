"""How many sequences of a given context fit at once on one GPU for each cache option, from the memory planner's own
sizes (cache/tensors.py page and slot bytes, cache/planner.py). Pure arithmetic: runs anywhere, no GPU needed.

The budget is what the engine would plan with: memory x --gpu-memory-utilization, minus the bf16 weights (counted
from the model built on the meta device) and --reserve-gib for the CUDA context, the activation peak and the CUDA
graphs (the engine measures these at startup; the default is an allowance, not a measurement). The count is what the
engine's planner (cache/planner.plan_memory) would give with --max-num-seqs set to it: with prefix caching on (the
engine's default) a share of the budget goes to prefix-cache checkpoints first (--no-prefix-caching: none).

    PYTHONPATH=src:. python3 benchmarks/capacity.py                          # H200 (140.4 GiB visible), 32k context
    PYTHONPATH=src:. python3 benchmarks/capacity.py --memory-gib 79.6 --context 4096   # H100 80 GB
"""

from __future__ import annotations

import argparse
import itertools

import torch

from benchmarks.common import SHAPES, model_config, table
from deltaserve.cache.allocator import pages_for_tokens
from deltaserve.cache.planner import GiB, OutOfMemoryError, max_full_length_sequences, plan_memory
from deltaserve.cache.tensors import kv_bytes_per_page, kv_page_dtype, state_bytes_per_slot
from deltaserve.config import RankShapes
from deltaserve.config.engine import CHECKPOINT_FRACTION, KV_CACHE_DTYPES, STATE_DTYPES

PAGE = 16


def weight_bytes(name: str) -> int:
    from deltaserve.models.qwen3_5 import Qwen3_5ForCausalLM

    model = Qwen3_5ForCausalLM(model_config(name), dtype=torch.bfloat16, device="meta")
    return sum(p.numel() * p.element_size() for p in model.parameters())


def planned_sequences(budget: int, page: int, slot: int, context: int, prefix_caching: bool) -> int:
    """The most sequences of `context` tokens that the engine's plan holds at once (a state slot and every page each)
    with --max-num-seqs set to that number. Prefix caching sets checkpoints aside before the pages (their number
    grows with --max-num-seqs), so the count is searched down from the bound without them."""
    n = max_full_length_sequences(budget_bytes=budget, page_bytes=page, slot_bytes=slot, page_size=PAGE,
                                  max_model_len=context)
    fraction = CHECKPOINT_FRACTION if prefix_caching else 0.0
    while n > 0:
        try:
            plan = plan_memory(budget_bytes=budget, page_bytes=page, slot_bytes=slot, page_size=PAGE, max_num_seqs=n,
                               max_model_len=context, checkpoint_fraction=fraction)
        except OutOfMemoryError:
            return 0
        if plan.num_slots >= n and plan.num_pages >= n * pages_for_tokens(context, PAGE):
            return n
        n -= 1
    return 0


def capacity_rows(models: list[str], memory_gib: float, utilization: float, reserve_gib: float,
                  context: int, prefix_caching: bool = True) -> list[dict]:
    rows = []
    for name in models:
        cfg, weights = model_config(name), weight_bytes(name)
        shapes = RankShapes.for_rank(cfg)
        budget = int(memory_gib * GiB * utilization) - weights - int(reserve_gib * GiB)
        first = None
        for kv, state in itertools.product(KV_CACHE_DTYPES, STATE_DTYPES):
            page = kv_bytes_per_page(shapes, PAGE, kv_page_dtype(kv, torch.bfloat16),
                                     num_layers=len(cfg.full_attention_layers))
            slot = state_bytes_per_slot(shapes, len(cfg.linear_attention_layers), torch.bfloat16,
                                        getattr(torch, state))
            n = planned_sequences(budget, page, slot, context, prefix_caching)
            first = n if first is None else first  # auto/float32's, even 0 (then any that fits is inf times it)
            rows.append({"model": name, "kv_cache_dtype": kv, "state_dtype": state,
                         "KV MiB/seq": page * -(-context // PAGE) / 2**20, "state MiB/seq": slot / 2**20,
                         "budget GiB": budget / GiB, "sequences": n, "vs auto/float32": _ratio(n, first)})
    return rows


def _ratio(n: int, base: int) -> float:
    return n / base if base else (float("inf") if n else 0.0)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["27B", "35B-A3B"], choices=sorted(SHAPES))
    ap.add_argument("--memory-gib", type=float, default=143771 / 1024, help="device memory (H200: 143,771 MiB)")
    ap.add_argument("--utilization", type=float, default=0.9, help="--gpu-memory-utilization (engine default)")
    ap.add_argument("--reserve-gib", type=float, default=3.0, help="CUDA context + activation peak + graphs")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                    help="as the engine's flag: no budget share for prefix-cache checkpoints")
    args = ap.parse_args(argv)
    rows = capacity_rows(args.models, args.memory_gib, args.utilization, args.reserve_gib, args.context,
                         args.prefix_caching)
    share = f"up to {CHECKPOINT_FRACTION:.0%} to prefix-cache checkpoints" if args.prefix_caching else "no prefix cache"
    print(f"{args.context}-token sequences on {args.memory_gib:.1f} GiB x {args.utilization} minus bf16 weights and "
          f"{args.reserve_gib} GiB reserve ({share}); pages of {PAGE} tokens")
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
