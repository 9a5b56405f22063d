"""Offline throughput, deltaserve vs transformers generate (+ fla-core kernels when installed), same shapes, same card.

python benchmarks/bench_e2e.py [--model 9B] [--input-len 1024] [--output-len 256] [--num-prompts 64]
                               [--hf-output-len N] [--ablate-async]
Random weights at real shapes (load_format="dummy"); ignore_eos so every request generates output-len tokens.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_decode import weight_bytes_read
from benchmarks.bench_prefill import prefill_flops
from benchmarks.common import (
    SHAPES,
    header,
    measure_copy_bandwidth,
    measure_matmul_rate,
    require_cuda,
    kv_bytes_per_token,
    model_config,
    state_bytes,
    table,
    triton_compiles,
)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_deltaserve(name: str, prompts: list[list[int]], output_len: int,
                   async_scheduling: bool | None = None) -> float:
    from deltaserve import LLM, SamplingParams

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(SHAPES[name]))
        llm = LLM(d, load_format="dummy", max_model_len=len(prompts[0]) + output_len + 16,
                  max_num_seqs=len(prompts), max_num_batched_tokens=8192, async_scheduling=async_scheduling)
        sp = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
        # Warm-up on the same prompts (short outputs): the mixed prefill+decode steps of the timed run have batch
        # shapes the engine has not compiled kernels for yet.
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
        _sync()
        with triton_compiles() as compiled:
            t0 = time.perf_counter()
            outs = llm.generate(prompts, sp)
            _sync()
            elapsed = time.perf_counter() - t0
        if compiled:
            print(f"warning: {len(compiled)} Triton compiles inside the timed run: {sorted(set(compiled))}")
        assert all(len(o.outputs[0].token_ids) == output_len for o in outs)
        del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return len(prompts) * output_len / elapsed


def run_transformers(name: str, prompts: list[list[int]], output_len: int) -> tuple[float, bool]:
    import transformers

    cfg = dict(SHAPES[name])
    moe = "num_experts" in cfg
    config_cls = transformers.Qwen3_5MoeTextConfig if moe else transformers.Qwen3_5TextConfig
    model_cls = transformers.Qwen3_5MoeForCausalLM if moe else transformers.Qwen3_5ForCausalLM
    config = config_cls(**{k: v for k, v in cfg.items() if k not in ("architectures", "dtype")})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = model_cls(config).eval()
    torch.set_default_dtype(torch.float32)
    try:
        import fla  # noqa: F401
        has_fla = True
    except ImportError:
        has_fla = False
    ids = torch.tensor(prompts, device=device)
    model.generate(ids[:2, :16], max_new_tokens=2, do_sample=False)  # warm-up
    _sync()
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False, pad_token_id=0)
    _sync()
    elapsed = time.perf_counter() - t0
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return len(prompts) * output_len / elapsed, has_fla


def ceiling_tok_s(name: str, n: int, input_len: int, output_len: int, bw: float, rate: float) -> float:
    """Prefill FLOPs at the matmul rate + every decode step's bytes at copy bandwidth."""
    from deltaserve.models.qwen3_5 import Qwen3_5ForCausalLM

    cfg = model_config(name)
    model = Qwen3_5ForCausalLM(cfg, dtype=torch.bfloat16, device="meta", with_mtp=False)  # shapes only
    t = n * prefill_flops(model, cfg, input_len) / rate
    state = 2 * state_bytes(cfg)
    kv_tok = kv_bytes_per_token(cfg)
    w = weight_bytes_read(model, cfg, n)
    for step in range(output_len):
        t += (w + n * state + n * (input_len + step) * kv_tok) / bw
    return n * output_len / t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="9B", choices=list(SHAPES))
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--hf-output-len", type=int, default=None,
                    help="output length of the transformers run (default: --output-len, the same workload); a "
                         "shorter run changes its prefill share, so its tok/s is not comparable")
    ap.add_argument("--ablate-async", action="store_true",
                    help="also run deltaserve with async scheduling off (each step waits for its own tokens)")
    args = ap.parse_args()
    require_cuda("bench_e2e.py")
    args.hf_output_len = args.hf_output_len or args.output_len
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(10, 240000, (args.num_prompts, args.input_len), generator=g).tolist()
    bw, rate = measure_copy_bandwidth(), measure_matmul_rate()
    ours = run_deltaserve(args.model, prompts, args.output_len)
    print(f"deltaserve: {ours:.0f} output tok/s", flush=True)
    sync = run_deltaserve(args.model, prompts, args.output_len, async_scheduling=False) if args.ablate_async else None
    hf, has_fla = run_transformers(args.model, prompts, args.hf_output_len)
    print(f"transformers (fla: {has_fla}): {hf:.0f} output tok/s", flush=True)
    ceiling = ceiling_tok_s(args.model, args.num_prompts, args.input_len, args.output_len, bw, rate)
    print(header(""))
    print(f"copy {bw / 1e12:.2f} TB/s, bf16 matmul {rate / 1e12:.0f} TFLOP/s; transformers with fla: {has_fla}")
    print(table([
        {"engine": "deltaserve", "output tok/s": ours, "vs transformers": ours / hf, "of ceiling": ours / ceiling},
        *([{"engine": "deltaserve, async scheduling off", "output tok/s": sync, "vs transformers": sync / hf,
            "of ceiling": sync / ceiling}] if sync is not None else []),
        {"engine": f"transformers (out {args.hf_output_len})", "output tok/s": hf, "vs transformers": 1.0,
         "of ceiling": hf / ceiling},
        {"engine": "ceiling", "output tok/s": ceiling, "vs transformers": ceiling / hf, "of ceiling": 1.0},
    ]))


if __name__ == "__main__":
    main()
