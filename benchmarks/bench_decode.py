"""Whole-model decode step time (CUDA graph replay) at real shapes with dummy weights, against the bandwidth floor.

python benchmarks/bench_decode.py [--models 9B 27B 35B-A3B] [--batches 1 8 64] [--context 1024]
    [--kv-cache-dtype auto fp8 int8 int4] [--state-dtype float32 bfloat16] [--pdl off on] [--layers N]

Each (--kv-cache-dtype, --state-dtype) pair gets its own caches and graph on the same loaded model; the floor counts
the bytes each format reads (quantized pages and their scales, the state in its dtype), and "vs first" is the step
time of the first pair (default: auto / float32) over this one's.

--layers N: each model cut to its first N layers (its GDN / attention pattern kept; rows named "35B-A3B/20L"): a
step and its floor both scale with the layers, so graph / floor stands for the whole model's where the whole model
does not fit the card (35B-A3B at batch 256 on an 80 GB H100: 70 GB of weights plus 16 GB of fp32 GDN state).

--pdl off on: an A/B of Programmatic Dependent Launch in one process (kernels/_device.py: "off" sets the switch to
False, "on" to True, "auto" leaves it to DELTASERVE_PDL / the device); each setting gets its own graph capture, and
"pdl" in the table is what the kernels actually got (on only at sm_90+). Listed first, "off" is the "vs first" base.
"""

from __future__ import annotations

import argparse
import gc
import itertools
from typing import Callable

import torch
import triton.testing

from benchmarks.common import SHAPES, kv_bytes_per_token, measure_copy_bandwidth, model_config, print_report
from benchmarks.common import state_bytes
from benchmarks.common import require_cuda
from deltaserve.cache.tensors import CacheShape, ModelCache, kv_page_dtype
from deltaserve.config.engine import KV_CACHE_DTYPES, STATE_DTYPES
from deltaserve.engine.cuda_graph import StepGraphs
from deltaserve.engine.device_inputs import build_forward_batch
from deltaserve.kernels import _device
from deltaserve.models.loader import load_model

PAGE = 16
PDL_SETTINGS = {"auto": None, "off": False, "on": True}


def set_pdl(setting: str) -> bool:
    """Point the PDL switch at `setting` (auto / off / on); returns whether kernels on this GPU now launch with PDL
    (graphs captured from here on get it; capture again after a change)."""
    _device.PDL = PDL_SETTINGS[setting]
    return _device.pdl_enabled(torch.device("cuda"))


def weight_bytes_read(model, cfg, batch: int, keep: Callable[[str], bool] = lambda name: True) -> float:
    """Bytes of weights one decode step must read: all but the embedding table (B rows of it), and for MoE only the
    expected number of distinct experts hit by B tokens under uniform routing. keep: which parameters count."""
    total = 0.0
    for name, p in model.named_parameters():
        if not keep(name):
            continue
        size = p.numel() * p.element_size()
        if name.endswith("embed_tokens.weight"):
            size = batch * p.shape[1] * p.element_size() + (size if cfg.tie_word_embeddings else 0)
        elif ".experts." in name:
            e, k = cfg.num_experts, cfg.num_experts_per_tok
            size *= (1 - (1 - k / e) ** batch)
        total += size
    return total


def setup_decode(name: str, batch: int, context: int, model=None, kv: str = "auto", state: str = "float32"):
    """Dummy-weight model (or the one given), cache, a decode batch at `context` tokens per sequence, and its
    captured graph."""
    cfg = model_config(name)
    if model is None:
        model = load_model(cfg, load_format="dummy", device="cuda", dtype=torch.bfloat16, with_mtp=False)
    pages_per_seq = -(-(context + 1) // PAGE)
    shape = CacheShape(num_pages=batch * pages_per_seq, page_size=PAGE, num_slots=batch,
                       kv_dtype=kv_page_dtype(kv, torch.bfloat16), conv_dtype=torch.bfloat16,
                       state_dtype=getattr(torch, state))
    cache = ModelCache(cfg, shape, device="cuda")
    for i in cfg.linear_attention_layers:
        cache.gdn(i).ssm.normal_(0, 0.01)
    tables = [list(range(s * pages_per_seq, (s + 1) * pages_per_seq)) for s in range(batch)]
    fb = build_forward_batch(query_lens=[1] * batch, context_lens=[context] * batch, state_slots=list(range(batch)),
                             block_tables=tables, page_size=PAGE, device="cuda")
    ids = torch.randint(0, cfg.vocab_size, (batch,), device="cuda")
    graphs = StepGraphs(model, cache, max_batch=batch, max_pages=pages_per_seq, device=torch.device("cuda"))
    graphs.sizes = [batch]
    graphs.capture()
    return cfg, model, cache, fb, ids, graphs


def bench_one(name: str, batch: int, context: int, bw: float, model=None, kv: str = "auto",
              state: str = "float32") -> dict:
    cfg, model, cache, fb, ids, graphs = setup_decode(name, batch, context, model, kv, state)
    ms_graph = triton.testing.do_bench(lambda: graphs.run(ids, fb), warmup=20, rep=200, return_mode="median")
    with torch.no_grad():
        ms_eager = triton.testing.do_bench(lambda: model.compute_logits(model(ids, fb, cache)), warmup=5, rep=50,
                                           return_mode="median")
    floor_bytes = (weight_bytes_read(model, cfg, batch) + batch * 2 * state_bytes(cfg, getattr(torch, state))
                   + batch * context * kv_bytes_per_token(cfg, kv_page_dtype(kv, torch.bfloat16)))
    floor_ms = floor_bytes / bw * 1e3
    del cache, graphs
    gc.collect()
    torch.cuda.empty_cache()
    return {"model": name, "batch": batch, "context": context, "kv": kv, "state": state,
            "GB/step": floor_bytes / 1e9, "floor ms": floor_ms, "graph ms": ms_graph, "eager ms": ms_eager,
            "graph/floor": ms_graph / floor_ms, "tok/s": batch / ms_graph * 1e3}


def first_layers(name: str, layers: int) -> str:
    """The shape `name` cut to its first `layers` layers, registered in SHAPES under the name it returns."""
    full = SHAPES[name]["num_hidden_layers"]
    if not 0 < layers <= full:
        raise SystemExit(f"--layers {layers}: {name} has {full} layers; give 1 to {full}")
    cut = f"{name}/{layers}L"
    SHAPES[cut] = {**SHAPES[name], "num_hidden_layers": layers}
    return cut


def _oom_row(name: str, batch: int, context: int, kv: str, state: str) -> dict:
    gc.collect()
    torch.cuda.empty_cache()
    nan = float("nan")
    return {"model": name, "batch": batch, "context": context, "kv": kv, "state": state, "GB/step": nan,
            "floor ms": nan, "graph ms": nan, "eager ms": nan, "graph/floor": nan, "tok/s": "OOM"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["9B", "27B", "35B-A3B"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--kv-cache-dtype", nargs="+", default=["auto"], choices=KV_CACHE_DTYPES)
    ap.add_argument("--state-dtype", nargs="+", default=["float32"], choices=STATE_DTYPES)
    ap.add_argument("--pdl", nargs="+", default=["auto"], choices=list(PDL_SETTINGS),
                    help="Programmatic Dependent Launch settings to A/B (each captures its own graph)")
    ap.add_argument("--layers", type=int, help="only each model's first N layers")
    args = ap.parse_args()
    require_cuda("bench_decode.py")
    bw = measure_copy_bandwidth()
    rows = []
    for name in [first_layers(n, args.layers) for n in args.models] if args.layers else args.models:
        model = load_model(model_config(name), load_format="dummy", device="cuda", dtype=torch.bfloat16,
                           with_mtp=False)
        for b in args.batches:
            first = None
            for kv, state, pdl in itertools.product(args.kv_cache_dtype, args.state_dtype, args.pdl):
                pdl_on = set_pdl(pdl)
                try:
                    row = bench_one(name, b, args.context, bw, model, kv, state)
                except torch.OutOfMemoryError:
                    row = None
                # outside the except block, so the traceback no longer holds the failed run's caches
                rows.append({**(row or _oom_row(name, b, args.context, kv, state)), "pdl": "on" if pdl_on else "off"})
                first = first or rows[-1]
                rows[-1]["vs first"] = first["graph ms"] / rows[-1]["graph ms"]
                print(rows[-1], flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    print_report(rows, bw)


if __name__ == "__main__":
    main()
