"""Decode step time of quantized models (dummy weights at real shapes) against the weight-read floor measured in the
same run.

python benchmarks/bench_quant.py [--models 27B 35B-A3B] [--formats bf16 fp8 int4 fp8-w8a8 gptq gptq-act-order]
                                 [--batches 1 64] [--context 1024] [--gemv-variants fp32 f16 f16x4]
                                 [--fp8-gemv fp32 f16]
                                 [--gemv-pipeline off rule]

--gemv-variants: int4 runs once per variant of its GEMVs (one-row projections, MoE per-pair): fp32 FMAs (rows
"int4"), fp16 products one word per fp16 accumulator (kernels/quant/triton.py GEMV_F16 with GEMV_F16_WORDS 1, rows
"int4 gemv-f16") and four words chained (GEMV_F16_WORDS 4, the engine's default for dense layers; the MoE per-pair
GEMV keeps 1 by default, both are set by the variant; rows "int4 gemv-f16x4"); default
f16x4 only. --fp8-gemv: fp8 runs once per variant of its one-row GEMV (fp32 FMAs; f16: fp16 products, the default,
kernels/quant/triton.py GEMV_FP8_F16; rows "fp8 gemv-fp32" / "fp8 gemv-f16" when both run).

fp8: Qwen's official layout (128x128 block scales; GDN in_proj_a/b, router, shared-expert gate, embedding and lm_head
kept bf16); fp8-w8a8: the same with --fp8-activations dynamic. int4: AWQ-style W4A16 g128 on every projection
except those same modules (the layout that gives the largest speedup; Qwen's own GPTQ-Int4 quantizes only the MLP /
experts); gptq / gptq-act-order: Qwen's GPTQ-Int4 layout with desc_act false / true (each projection's and expert's
input gathered in its order first). The floor is the bytes a step must read
(weights as stored, routed experts expected to be hit, GDN state, KV at --context) over the device-to-device copy
bandwidth measured first; "vs bf16" is the bf16 step time over this one's.
"""

from __future__ import annotations

import argparse
import gc
import itertools

import torch

from benchmarks.bench_decode import _oom_row, bench_one
from benchmarks.bench_quant_kernels import GEMV_VARIANTS, fp8_gemv, gemv_f16, gemv_pipeline
from benchmarks.common import measure_copy_bandwidth, model_config, print_report, require_cuda
from deltaserve.config import QuantizationConfig
from deltaserve.kernels.quant import triton as qt
from deltaserve.models.loader import load_model

KEEP = ["linear_attn.in_proj_a", "linear_attn.in_proj_b", "mlp.gate", "mlp.shared_expert_gate", "lm_head",
        "embed_tokens"]
FORMATS = {
    "bf16": None,
    "fp8": {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
            "modules_to_not_convert": KEEP},
    "int4": {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm", "zero_point": True,
             "modules_to_not_convert": KEEP},
}
FORMATS["fp8-w8a8"] = FORMATS["fp8"]  # the same weights run with --fp8-activations dynamic
# Qwen's GPTQ-Int4 layout (the MLP / routed experts in int4 g128; attention, GDN and shared experts bf16), and the
# same with desc_act true: each projection and expert reads its input in an order of its own (dummy weights: the
# identity order, gathered all the same), the cost of serving an act-order checkpoint
FORMATS["gptq"] = {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False,
                   "dynamic": {"-:.*attn.*": {}, "-:.*shared_expert.*": {}}, "modules_to_not_convert": KEEP}
FORMATS["gptq-act-order"] = {**FORMATS["gptq"], "desc_act": True}


def load(name: str, fmt: str, device: str = "cuda", dtype: torch.dtype = torch.bfloat16):
    """A dummy-weight model of shape `name` with its projections in format `fmt`."""
    cfg = model_config(name)
    raw = FORMATS[fmt]
    quant = QuantizationConfig(method=raw["quant_method"], raw=raw,
                               fp8_activations="dynamic" if fmt == "fp8-w8a8" else "off") if raw else None
    return load_model(cfg, load_format="dummy", device=device, dtype=dtype, with_mtp=False, quantization=quant)


# --gemv-pipeline: (qt.GEMV_DEPTH, qt.GEMV_EVICT_FIRST): "rule" = the default (kernels/quant/triton.py
# _gemv_pipeline), "off" = every GEMV on the two-tile loop without evict-first (the kernels before the rule)
PIPELINE_KNOBS = {"rule": (None, None), "off": (2, False)}


def pipelines_for(fmt: str, batch: int, wanted: list[str]) -> list[str]:
    """The --gemv-pipeline values worth running: the pipelines change only the GEMV (int4 up to
    qt.GEMV_F16_MAX_ROWS rows, fp8 up to qt.GEMV_MAX_ROWS); any other step runs once, the default."""
    rows = {"int4": qt.GEMV_F16_MAX_ROWS, "fp8": qt.GEMV_MAX_ROWS}.get(fmt, 0)
    return wanted if batch <= rows else ["rule"]


def row_format(fmt: str, f16: str, variants: list[str], pipe: str, pipes: list[str]) -> str:
    """The format column: the format, its GEMV variant, and its GEMV pipeline where it is not the rule or the run
    compares several (a lone 'off' must not read as the default)."""
    gemv = f" gemv-{f16}" if f16 and (fmt == "int4" or f16 == "f16" or len(variants) > 1) else ""
    return fmt + gemv + (f" pipeline-{pipe}" if len(pipes) > 1 or pipe != "rule" else "")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["27B", "35B-A3B"])
    ap.add_argument("--formats", nargs="+", default=["bf16", "fp8", "fp8-w8a8", "int4"], choices=list(FORMATS))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--gemv-variants", nargs="+", choices=list(GEMV_VARIANTS), default=["f16x4"])
    ap.add_argument("--gemv-pipeline", nargs="+", choices=list(PIPELINE_KNOBS), default=["rule"],
                    help="int4 and fp8 run once per GEMV pipeline: the default rule, or 'off' (two-tile loop, no "
                         "evict-first: the kernels before the rule)")
    ap.add_argument("--fp8-gemv", nargs="+", choices=["fp32", "f16"], default=["f16"],
                    help="fp8 (not fp8-w8a8) runs once per variant of its one-row GEMV: fp32 FMAs, fp16 products")
    args = ap.parse_args()
    require_cuda("bench_quant.py")
    bw = measure_copy_bandwidth()
    rows = []
    for name in args.models:
        base: dict[int, float] = {}
        for fmt in args.formats:
            model = load(name, fmt)
            variants = (["" if v == "fp32" else v for v in args.gemv_variants] if fmt == "int4" else
                        args.fp8_gemv if fmt == "fp8" else [""])
            runs = [(b, f16, pipe, pipes) for b, f16 in itertools.product(args.batches, variants)
                    for pipes in [pipelines_for(fmt, b, args.gemv_pipeline)] for pipe in pipes]
            for b, f16, pipe, pipes in runs:
                try:  # the variant is read as the step's CUDA graph is captured
                    with gemv_f16(f16) if fmt == "int4" else fp8_gemv(f16), gemv_pipeline(*PIPELINE_KNOBS[pipe]):
                        row = bench_one(name, b, args.context, bw, model)
                except torch.OutOfMemoryError:
                    row = None
                row = row or _oom_row(name, b, args.context, "auto", "float32")
                row["format"] = row_format(fmt, f16, variants, pipe, pipes)
                if fmt == "bf16":
                    base[b] = row["graph ms"]
                row["vs bf16"] = base.get(b, float("nan")) / row["graph ms"]
                rows.append(row)
                print(row, flush=True)
            del model
            gc.collect()
            torch.cuda.empty_cache()
    print_report(rows, bw)


if __name__ == "__main__":
    main()
