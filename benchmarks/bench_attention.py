"""Attention and row-wise kernels at Qwen3.5 layer shapes against the card's own ceilings and torch.

Prints one table: card, versions, command; per kernel and shape the median time (triton.testing.do_bench), achieved GB/s
against a device-to-device copy measured in the same run, for prefill TFLOP/s against a bf16 8192^3 matmul measured in
the same run, and the same op through torch (SDPA on contiguous K/V for attention, the pure-torch reference for the
row-wise ops). `--sweep` first times a few tile configs of the two attention kernels and keeps the fastest correct one.
`--kv-quant` instead times decode over quantized KV pages (bf16, fp8, int8, int4; 27B heads) at 32k and 128k contexts,
against copy bandwidth over the bytes each format actually reads (pages and scales), and the prefill kernel over pages
of each format; with `--sweep` it first times tile configs per quantized format and keeps the fastest. `--verify`
instead times a verify step's attention (1 + K query tokens per row, 27B heads, CUDA graphs): the one-token decode
kernel, the prefill kernel the verify rows took before, and the decode kernel with tokens_per_row; with `--sweep` it
first times tile configs of the latter (MULTI_TOKEN_DECODE_CONFIG) and keeps the fastest.

    PYTHONPATH=src:. python3 benchmarks/bench_attention.py --sweep --out /tmp/bench.txt
    PYTHONPATH=src:. python3 benchmarks/bench_attention.py --kv-quant [--sweep]
    PYTHONPATH=src:. python3 benchmarks/bench_attention.py --verify [--sweep] [--verify-tokens 2 3 4 5]
"""

from __future__ import annotations

import argparse
import platform
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench, do_bench_cudagraph

from benchmarks.common import require_cuda

from deltaserve.kernels.activation import ref as act_ref
from deltaserve.kernels.activation import triton as act
from deltaserve.kernels.attention import ref as attn_ref
from deltaserve.kernels.attention import triton as attn
from deltaserve.kernels.norm import ref as norm_ref
from deltaserve.kernels.norm import triton as norm
from deltaserve.kernels.rope import ref as rope_ref
from deltaserve.kernels.rope import triton as rope

MODELS = {"27B": (24, 4), "35B-A3B": (16, 2)}  # (Hq, Hkv); head_dim 256
D, PAGE = 256, 16
BF16 = torch.bfloat16


def ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


@dataclass
class Row:
    kernel: str
    shape: str
    ms: float
    gbs: float | None = None
    tflops: float | None = None
    base_name: str = ""
    base_ms: float | None = None
    note: str = ""


TABLE_HEADER = ["| kernel | shape | ms (median) | GB/s | % copy | TFLOP/s | % matmul | baseline | baseline ms "
                "| speedup | note |", "|---|---|---|---|---|---|---|---|---|---|---|"]


def format_row(r: Row, copy_gbs: float, mm_tflops: float) -> str:
    """One markdown row of TABLE_HEADER: shares of the ceilings measured in the same run, speedup over baseline."""
    gbs = f"{r.gbs:.0f} | {r.gbs / copy_gbs:.0%}" if r.gbs is not None else " | "
    tf = f"{r.tflops:.0f} | {r.tflops / mm_tflops:.0%}" if r.tflops is not None else " | "
    base = f"{r.base_ms:.4f} | {r.base_ms / r.ms:.2f}x" if r.base_ms is not None else " | "
    return f"| {r.kernel} | {r.shape} | {r.ms:.4f} | {gbs} | {tf} | {r.base_name} | {base} | {r.note} |"


def ceilings() -> tuple[float, float]:
    """(copy GB/s counting read + write, bf16 matmul TFLOP/s), measured now on random data."""
    x = torch.randn(2**28, device="cuda", dtype=BF16)  # 512 MiB
    y = torch.empty_like(x)
    copy_gbs = 2 * x.numel() * 2 / (ms(lambda: y.copy_(x)) * 1e-3) / 1e9
    del x, y
    a = torch.randn(8192, 8192, device="cuda", dtype=BF16)
    b = torch.randn(8192, 8192, device="cuda", dtype=BF16)
    mm_tflops = 2 * 8192**3 / (ms(lambda: a @ b) * 1e-3) / 1e12
    return copy_gbs, mm_tflops


def paged_kv(lengths: list[int], hkv: int, gen: torch.Generator):
    """Contiguous K/V per sequence ([N, Hkv, L, D] for SDPA when lengths are equal) and the same tokens in shuffled
    pages."""
    pages = [-(-n // PAGE) for n in lengths]
    total = sum(pages)
    k_cache = torch.randn(total, PAGE, hkv, D, device="cuda", dtype=BF16)
    v_cache = torch.randn_like(k_cache)
    perm = torch.randperm(total, generator=gen).to(torch.int32)
    tables = torch.zeros(len(lengths), max(pages), dtype=torch.int32)
    at = 0
    for n, p in enumerate(pages):
        tables[n, :p] = perm[at : at + p]
        at += p
    tables = tables.cuda()
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")

    def dense(cache, n):
        return cache[tables[n, : pages[n]].long()].flatten(0, 1)[: lengths[n]]  # [L, Hkv, D]

    return k_cache, v_cache, tables, seq_lens, dense


def sdpa(q, k, v, causal):
    """q: [B, Hq, Lq, D], k, v: [B, Hkv, Lk, D]; flash backend with GQA, else whatever torch picks."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True), "sdpa-flash"
    except RuntimeError:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True), "sdpa-default"


# -------------------------------------------------------------------------------------------------------- decode


def decode_case(model: str, n: int, length: int, gen: torch.Generator):
    hq, hkv = MODELS[model]
    k_cache, v_cache, tables, seq_lens, dense = paged_kv([length] * n, hkv, gen)
    q = torch.randn(n, hq, D, device="cuda", dtype=BF16)
    args = dict(q=q, k_cache=k_cache, v_cache=v_cache, seq_lens=seq_lens, block_tables=tables, scale=D**-0.5)
    kv_bytes = 2 * n * length * hkv * D * 2
    return args, kv_bytes, dense


def bench_decode(model, n, length, gen, copy_gbs) -> Row:
    args, kv_bytes, dense = decode_case(model, n, length, gen)
    fn = lambda: attn.paged_attention_decode(**args)  # noqa: E731
    out = fn()
    t = ms(fn)
    t_graph = do_bench_cudagraph(fn, rep=100, return_mode="median")
    q = args["q"]
    k = torch.stack([dense(args["k_cache"], i) for i in range(n)]).transpose(1, 2).contiguous()
    v = torch.stack([dense(args["v_cache"], i) for i in range(n)]).transpose(1, 2).contiguous()
    ref_out, name = sdpa(q[:, :, None, :], k, v, causal=False)
    err = (out.float() - ref_out[:, :, 0].float()).abs().max().item()
    t_sdpa = ms(lambda: sdpa(q[:, :, None, :], k, v, causal=False))
    splits = attn.decode_num_splits(n, k.shape[1], args["block_tables"].shape[1] * PAGE, q.device)
    return Row("decode", f"{model} N={n} L={length}", t, kv_bytes / (t * 1e-3) / 1e9, None, name, t_sdpa,
               f"graph {t_graph * 1e3:.1f}us ({kv_bytes / (t_graph * 1e-3) / 1e9 / copy_gbs:.0%} copy); "
               f"splits {splits}; max|err| vs sdpa {err:.1e}")


# ------------------------------------------------------------------------------------------------------- prefill


def prefill_case(model: str, cached: int, new: int, gen: torch.Generator):
    hq, hkv = MODELS[model]
    k_cache, v_cache, tables, seq_lens, dense = paged_kv([cached + new], hkv, gen)
    q = torch.randn(new, hq, D, device="cuda", dtype=BF16)
    cu = torch.tensor([0, new], dtype=torch.int32, device="cuda")
    args = dict(q=q, k_cache=k_cache, v_cache=v_cache, cu_seqlens_q=cu, seq_lens=seq_lens, block_tables=tables,
                scale=D**-0.5)
    visible = new * cached + new * (new + 1) // 2
    flops = 4 * D * hq * visible
    return args, flops, dense


def bench_prefill(model, cached, new, gen) -> Row:
    args, flops, dense = prefill_case(model, cached, new, gen)
    fn = lambda: attn.paged_attention_prefill(**args)  # noqa: E731
    out = fn()
    t = ms(fn)
    base_name, t_sdpa, note = "", None, ""
    if cached == 0:  # SDPA's causal mask is top-left aligned: compare only fresh prompts
        q = args["q"].transpose(0, 1)[None]
        k = dense(args["k_cache"], 0).transpose(0, 1)[None].contiguous()
        v = dense(args["v_cache"], 0).transpose(0, 1)[None].contiguous()
        ref_out, base_name = sdpa(q, k, v, causal=True)
        err = (out.float() - ref_out[0].transpose(0, 1).float()).abs().max().item()
        t_sdpa = ms(lambda: sdpa(q, k, v, causal=True))
        note = f"max|err| vs sdpa {err:.1e}"
    return Row("prefill", f"{model} ctx={cached} new={new}", t, None, flops / (t * 1e-3) / 1e12, base_name, t_sdpa,
               note)


# ------------------------------------------------------------------------------------------- quantized KV decode

KV_FORMATS = {"bf16": BF16, "fp8": torch.float8_e4m3fn, "int8": torch.int8, "int4": torch.uint8}
_QUANT_CODE = {"fp8": 1, "int8": 2, "int4": 3}  # the kernels' QUANT codes, the keys of QUANT_DECODE_CONFIG
KV_QUANT_CASES = [(1, 32768), (1, 131072), (8, 32768), (8, 131072), (32, 32768)]  # (sequences, context)


def quantized_case(n: int, length: int, fmt: str, gen: torch.Generator):
    """27B-head decode over `length` tokens per sequence, pages in `fmt` (quantized from random bf16 K/V by the
    reference); returns (kernel kwargs, bytes the kernel must read)."""
    hq, hkv = MODELS["27B"]
    k_cache, v_cache, tables, seq_lens, _ = paged_kv([length] * n, hkv, gen)
    scales = {}
    if fmt != "bf16":
        (k_cache, k_scale), (v_cache, v_scale) = (attn_ref.quantize_kv(c, KV_FORMATS[fmt]) for c in (k_cache, v_cache))
        scales = dict(k_scale=k_scale, v_scale=v_scale)
    q = torch.randn(n, hq, D, device="cuda", dtype=BF16)
    args = dict(q=q, k_cache=k_cache, v_cache=v_cache, seq_lens=seq_lens, block_tables=tables, scale=D**-0.5,
                **scales)
    per_head = k_cache.shape[-1] * k_cache.element_size() + (4 if scales else 0)
    return args, 2 * n * length * hkv * per_head


# Tile configs tried per quantized format: the current default first (QUANT_DECODE_CONFIG, its kernel variant: PLANES,
# and INT4_WORDS 2 for int4), then the same variant at other (BLOCK_N, num_warps, num_stages) and WAVES (programs per
# SM the split-KV grid aims at; DECODE_CONFIG's MAX_SPLITS stays). The variants' SASS: benchmarks/compile_check.py.
QUANT_SWEEP = [(128, 4, 3, 8), (128, 4, 2, 8), (128, 4, 4, 8), (64, 4, 6, 8), (128, 8, 3, 8), (256, 8, 2, 8),
               (128, 4, 3, 4), (128, 4, 3, 16), (64, 4, 6, 16)]  # (BLOCK_N, warps, stages, WAVES), the default first


def quant_sweep_configs(code: int) -> list[dict]:
    """QUANT_SWEEP as full configs of format `code` (1 fp8, 2 int8, 3 int4), the current default first."""
    default = attn.QUANT_DECODE_CONFIG[code]
    return [{**default, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages, "WAVES": waves}
            for bn, warps, stages, waves in QUANT_SWEEP]


QUANT_SWEEP_CASES = [(32, 32768), (1, 131072)]


def sweep_kv_quant(log, copy_gbs: float) -> None:
    """Per quantized format: time quant_sweep_configs() on QUANT_SWEEP_CASES, keep the fastest (summed ratio to the
    first config) whose output equals the first config's within 1e-2, in attn.QUANT_DECODE_CONFIG."""
    gen = torch.Generator().manual_seed(4)
    for fmt, code in (("fp8", 1), ("int8", 2), ("int4", 3)):
        cases = [quantized_case(n, length, fmt, gen) for n, length in QUANT_SWEEP_CASES]
        best, best_score, first = None, float("inf"), None
        for cfg in quant_sweep_configs(code):
            name = f"sweep {fmt} " + " ".join(f"{k}={v}" for k, v in cfg.items())
            attn.QUANT_DECODE_CONFIG[code] = cfg
            try:
                outs = [attn.paged_attention_decode(**args) for args, _ in cases]
                times = [do_bench_cudagraph(lambda a=args: attn.paged_attention_decode(**a), rep=50,
                                            return_mode="median") for args, _ in cases]
            except Exception as e:  # noqa: BLE001 (out of resources for a config is a result, not a failure)
                log(f"{name}: failed {type(e).__name__}")
                continue
            if first is None:
                first = (times, outs)
            err = max((o.float() - f.float()).abs().max().item() for o, f in zip(outs, first[1]))
            score = sum(t / t0 for t, t0 in zip(times, first[0]))
            log(f"{name}: "
                + ", ".join(f"{t * 1e3:.0f}us ({nb / (t * 1e-3) / 1e9 / copy_gbs:.0%} copy)"
                            for t, (_, nb) in zip(times, cases)) + f"; diff vs first {err:.1e}")
            if err < 1e-2 and score < best_score:
                best, best_score = cfg, score
        attn.QUANT_DECODE_CONFIG[code] = best or {}
        log(f"{fmt}: keeping {attn.QUANT_DECODE_CONFIG[code]}")
        del cases
        torch.cuda.empty_cache()


def bench_kv_quant(log, copy_gbs: float) -> None:
    """One row per (case, format): median time eager and in a CUDA graph, GB/s of the bytes read and its share of
    copy bandwidth, the speedup over bf16 pages, and the error against the reference on the same pages."""
    gen = torch.Generator().manual_seed(3)
    log("| case | KV | bytes read | ms | graph ms | GB/s (graph) | % copy | vs bf16 (graph) | max abs err vs ref |")
    log("|---|---|---|---|---|---|---|---|---|")
    for n, length in KV_QUANT_CASES:
        base_ms = None
        for fmt in KV_FORMATS:
            args, nbytes = quantized_case(n, length, fmt, gen)
            fn = lambda: attn.paged_attention_decode(**args)  # noqa: E731
            err = (fn().float() - attn_ref.paged_attention_decode(**args).float()).abs().max().item() \
                if n * length <= 8 * 32768 else float("nan")  # the reference's fp32 copies of longer contexts: slow
            t, t_graph = ms(fn), do_bench_cudagraph(fn, rep=100, return_mode="median")
            base_ms = base_ms or t_graph
            gbs = nbytes / (t_graph * 1e-3) / 1e9
            log(f"| 27B N={n} L={length} | {fmt} | {nbytes / 1e9:.3f} GB | {t:.4f} | {t_graph:.4f} | {gbs:.0f} | "
                f"{gbs / copy_gbs:.0%} | {base_ms / t_graph:.2f}x | {err:.1e} |")
            del args
            torch.cuda.empty_cache()


KV_QUANT_PREFILL_CASES = [(0, 8192), (6144, 2048)]  # (cached tokens, new tokens), one sequence


def bench_kv_quant_prefill(log, mm_tflops: float) -> None:
    """One row per (case, format): the prefill kernel over pages in that format (27B heads; the new tokens' K/V are
    read from the pages too, as when the server prefills), TFLOP/s against the bf16 matmul, the time against the bf16
    pages', the error against the reference on the same pages (the kernel's) and against the bf16 pages' output (the
    format's)."""
    gen = torch.Generator().manual_seed(5)
    log("| prefill case | KV | ms | TFLOP/s | % matmul | vs bf16 | max abs err vs ref | max abs diff vs bf16 pages |")
    log("|---|---|---|---|---|---|---|---|")
    for cached, new in KV_QUANT_PREFILL_CASES:
        args, flops, _ = prefill_case("27B", cached, new, gen)
        for fmt in KV_FORMATS:  # bf16 first: the baseline
            run = dict(args)
            if fmt != "bf16":
                (run["k_cache"], k_scale), (run["v_cache"], v_scale) = (
                    attn_ref.quantize_kv(args[c], KV_FORMATS[fmt]) for c in ("k_cache", "v_cache"))
                run.update(k_scale=k_scale, v_scale=v_scale)
            fn = lambda: attn.paged_attention_prefill(**run)  # noqa: E731
            out = fn().float()
            err = (out - attn_ref.paged_attention_prefill(**run).float()).abs().max().item()
            t = ms(fn)
            if fmt == "bf16":
                base_ms, base_out = t, out
            tflops = flops / (t * 1e-3) / 1e12
            log(f"| 27B ctx={cached} new={new} | {fmt} | {t:.3f} | {tflops:.0f} | {tflops / mm_tflops:.0%} | "
                f"{base_ms / t:.2f}x | {err:.1e} | {(out - base_out).abs().max().item():.1e} |")
            del run
            torch.cuda.empty_cache()


# (format, QUANT_DECODE_CONFIG entry) pairs --kv-quant-variants compares on the same pages: the first defaults
# (no PLANES) against the PLANES tiles, and for int4 an earlier default (PLANES V_REGS) against INT4_WORDS 1 and 2
# (16-bit words, four planes; 2 with BLOCK_N 128 is the current default); rows with WAVES 8 set it as the current
# defaults do (triton_decode.py says what the variants are; benchmarks/RESULTS.md has their timings by date)
KV_VARIANTS = [("fp8", dict(BLOCK_N=64, num_warps=4, num_stages=3, F16_DOTS=1)),
               ("fp8", dict(BLOCK_N=64, num_warps=4, num_stages=3, F16_DOTS=1, PLANES=1)),
               ("fp8", dict(BLOCK_N=128, num_warps=8, num_stages=3, F16_DOTS=1, PLANES=1)),
               ("fp8", dict(BLOCK_N=128, num_warps=4, num_stages=3, F16_DOTS=1, PLANES=1)),
               ("int8", dict(BLOCK_N=64, num_warps=4, num_stages=3)),
               ("int8", dict(BLOCK_N=64, num_warps=4, num_stages=3, F16_DOTS=1, PLANES=1)),
               ("int8", dict(BLOCK_N=128, num_warps=8, num_stages=3, F16_DOTS=1, PLANES=1)),
               ("int8", dict(BLOCK_N=128, num_warps=4, num_stages=3, F16_DOTS=1, PLANES=1)),
               ("int8", dict(BLOCK_N=128, num_warps=4, num_stages=3, F16_DOTS=1, PLANES=1, WAVES=8)),
               ("int4", dict(BLOCK_N=128, num_warps=4, num_stages=3)),
               ("int4", dict(BLOCK_N=128, num_warps=4, num_stages=3, F16_DOTS=1, PLANES=1, V_REGS=1)),
               ("int4", dict(BLOCK_N=128, num_warps=4, num_stages=3, F16_DOTS=1, PLANES=1, INT4_WORDS=1)),
               ("int4", dict(BLOCK_N=128, num_warps=4, num_stages=3, F16_DOTS=1, PLANES=1, INT4_WORDS=2)),
               ("int4", dict(BLOCK_N=256, num_warps=8, num_stages=3, F16_DOTS=1, PLANES=1, INT4_WORDS=2)),
               ("int4", dict(BLOCK_N=64, num_warps=4, num_stages=3, F16_DOTS=1, PLANES=1, INT4_WORDS=2)),
               ("int4", dict(BLOCK_N=128, num_warps=4, num_stages=3, F16_DOTS=1, PLANES=1, INT4_WORDS=2, WAVES=8))]
KV_VARIANT_CASES = [(32, 32768), (8, 131072)]


def compare_kv_variants(log, copy_gbs: float) -> None:
    """KV_VARIANTS on KV_VARIANT_CASES in CUDA graphs: % of copy bandwidth over the bytes read, speed against bf16
    pages, and the largest difference from the format's first variant (same pages)."""
    gen = torch.Generator().manual_seed(3)
    saved = dict(attn.QUANT_DECODE_CONFIG)
    log("| case | KV | config | graph us | % copy | vs bf16 | max diff vs first |")
    log("|---|---|---|---|---|---|---|")
    for n, length in KV_VARIANT_CASES:
        args, nbytes = quantized_case(n, length, "bf16", gen)
        t_bf16 = do_bench_cudagraph(lambda: attn.paged_attention_decode(**args), rep=100, return_mode="median")
        log(f"| N={n} L={length} | bf16 | | {t_bf16 * 1e3:.0f} | {nbytes / (t_bf16 * 1e-3) / 1e9 / copy_gbs:.0%} | 1 | |")
        del args
        for fmt in dict(KV_VARIANTS):
            args, nbytes = quantized_case(n, length, fmt, gen)
            first = None
            for cfg in (c for f, c in KV_VARIANTS if f == fmt):
                attn.QUANT_DECODE_CONFIG[_QUANT_CODE[fmt]] = cfg
                out = attn.paged_attention_decode(**args)
                t = do_bench_cudagraph(lambda: attn.paged_attention_decode(**args), rep=100, return_mode="median")
                first = out if first is None else first
                diff = (out.float() - first.float()).abs().max().item()
                log(f"| N={n} L={length} | {fmt} | {cfg} | {t * 1e3:.0f} | "
                    f"{nbytes / (t * 1e-3) / 1e9 / copy_gbs:.0%} | {t_bf16 / t:.2f}x | {diff:.1e} |")
            del args
            torch.cuda.empty_cache()
    attn.QUANT_DECODE_CONFIG.clear()
    attn.QUANT_DECODE_CONFIG.update(saved)


# ------------------------------------------------------------------------------------ verify steps (1 + K tokens)

VERIFY_CASES = [(n, length) for length in (1024, 32768) for n in (1, 8, 32)]  # (sequences, context)
FULL_ATTENTION_LAYERS_27B = 16
# (BLOCK_N, num_warps, num_stages, WAVES) for the decode kernel with verify rows (MULTI_TOKEN_DECODE_CONFIG, the
# entry of the sweep's tile rows: 32 for 27B at T = 3..5); the first is the current default
VERIFY_SWEEP = [(64, 8, 3, 4), (64, 4, 3, 4), (32, 4, 3, 4), (128, 8, 2, 4), (64, 8, 2, 4), (64, 8, 3, 2),
                (32, 8, 4, 8)]
VERIFY_SWEEP_CASES = [(1, 1024), (1, 32768), (32, 32768)]


def verify_case(n: int, length: int, tokens: int, gen: torch.Generator):
    """27B heads, `length` tokens per row (the last `tokens` of them the verify step's queries). Returns kwargs for
    the one-token decode (each row's last query), the prefill kernel (uniform cu_seqlens) and the decode kernel with
    tokens_per_row, and the KV bytes one pass reads."""
    hq, hkv = MODELS["27B"]
    k_cache, v_cache, tables, seq_lens, _ = paged_kv([length] * n, hkv, gen)
    q = torch.randn(n * tokens, hq, D, device="cuda", dtype=BF16)
    common = dict(k_cache=k_cache, v_cache=v_cache, seq_lens=seq_lens, block_tables=tables, scale=D**-0.5)
    cu = torch.arange(n + 1, dtype=torch.int32, device="cuda") * tokens
    one = dict(q=q[tokens - 1 :: tokens].contiguous(), **common)
    prefill = dict(q=q, cu_seqlens_q=cu, **common)
    multi = dict(q=q, tokens_per_row=tokens, **common)
    return one, prefill, multi, 2 * n * length * hkv * D * 2


def _graph_us(fn) -> float:
    return do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3


def sweep_verify(log, tokens: int) -> None:
    """VERIFY_SWEEP on VERIFY_SWEEP_CASES; keeps the fastest (summed ratio to the first) whose output is within 1e-2
    of the prefill kernel's, in attn.MULTI_TOKEN_DECODE_CONFIG[tile rows]."""
    gen = torch.Generator().manual_seed(6)
    hq, hkv = MODELS["27B"]
    rows = max(16, triton.next_power_of_2(tokens * hq // hkv))
    cases = [verify_case(n, length, tokens, gen) for n, length in VERIFY_SWEEP_CASES]
    refs = [attn.paged_attention_prefill(**c[1]) for c in cases]
    best, best_score, first = None, float("inf"), None
    for block_n, warps, stages, waves in VERIFY_SWEEP:
        cfg = dict(BLOCK_N=block_n, num_warps=warps, num_stages=stages, WAVES=waves)
        attn.MULTI_TOKEN_DECODE_CONFIG[rows] = cfg
        try:
            errs = [(attn.paged_attention_decode(**c[2]).float() - r.float()).abs().max().item()
                    for c, r in zip(cases, refs)]
            times = [_graph_us(lambda a=c[2]: attn.paged_attention_decode(**a)) for c in cases]
        except Exception as e:  # noqa: BLE001 (out of resources for a config is a result, not a failure)
            log(f"sweep verify {cfg}: failed {type(e).__name__}")
            continue
        first = first or times
        score = sum(t / t0 for t, t0 in zip(times, first))
        log(f"sweep verify T={tokens} {cfg}: " + ", ".join(f"{t:.1f}us" for t in times)
            + f"; max diff vs prefill kernel {max(errs):.1e}")
        if max(errs) < 1e-2 and score < best_score:
            best, best_score = cfg, score
    attn.MULTI_TOKEN_DECODE_CONFIG[rows] = best or {}
    log(f"verify config ({rows} tile rows): keeping {attn.MULTI_TOKEN_DECODE_CONFIG[rows]}")
    del cases, refs
    torch.cuda.empty_cache()


def bench_verify(log, copy_gbs: float, tokens_list: list[int]) -> None:
    """Per (tokens, case), CUDA-graph medians: one-token decode, the prefill kernel and the decode kernel on the
    verify rows; the share of copy bandwidth the latter reaches over the KV bytes; the difference between the two
    verify kernels' outputs; and the saving over the 27B's full-attention layers per verify step."""
    gen = torch.Generator().manual_seed(5)
    log(f"multi-token decode config overrides: {attn.MULTI_TOKEN_DECODE_CONFIG}; decode config {attn.DECODE_CONFIG}")
    log("| T | case | decode 1 token us | prefill kernel us | decode kernel T us | T / 1 token | prefill / decode T "
        "| % copy (decode T) | max diff | saving per verify step (16 layers) us |")
    log("|---|---|---|---|---|---|---|---|---|---|")
    for tokens in tokens_list:
        for n, length in VERIFY_CASES:
            one, prefill, multi, nbytes = verify_case(n, length, tokens, gen)
            t1 = _graph_us(lambda: attn.paged_attention_decode(**one))
            tp = _graph_us(lambda: attn.paged_attention_prefill(**prefill))
            tm = _graph_us(lambda: attn.paged_attention_decode(**multi))
            diff = (attn.paged_attention_decode(**multi).float()
                    - attn.paged_attention_prefill(**prefill).float()).abs().max().item()
            pct = nbytes / (tm * 1e-6) / 1e9 / copy_gbs
            log(f"| {tokens} | 27B N={n} L={length} | {t1:.1f} | {tp:.1f} | {tm:.1f} | {tm / t1:.2f}x | "
                f"{tp / tm:.2f}x | {pct:.0%} | {diff:.1e} | {FULL_ATTENTION_LAYERS_27B * (tp - tm):.0f} |")
            del one, prefill, multi
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------------- sweeps

# (BLOCK_N, num_warps, num_stages, WAVES, MAX_SPLITS) and (BLOCK_M, BLOCK_N, num_warps, num_stages). The first run
# (H200, 2026-11-27) swept 7 + 7 configs; these are its leaders plus more splits for small batches.
DECODE_SWEEP = [(64, 8, 2, 2, 64), (64, 8, 2, 4, 128), (32, 4, 3, 4, 128), (64, 4, 3, 4, 128), (32, 4, 3, 2, 64)]
PREFILL_SWEEP = [(128, 64, 8, 2), (128, 64, 8, 3), (64, 32, 4, 3)]


def sweep(log) -> None:
    gen = torch.Generator().manual_seed(0)
    cases = [decode_case("27B", 1, 32768, gen), decode_case("27B", 64, 4096, gen)]
    refs = [attn_ref.paged_attention_decode(**c[0]) for c in cases]
    best, best_score, first_times = None, float("inf"), None
    for block_n, warps, stages, waves, max_splits in DECODE_SWEEP:
        attn.DECODE_CONFIG.update(BLOCK_N=block_n, num_warps=warps, num_stages=stages, WAVES=waves,
                                  MAX_SPLITS=max_splits)
        name = f"BLOCK_N={block_n} warps={warps} stages={stages} waves={waves} max_splits={max_splits}"
        try:
            times, errs = [], []
            for (args, kv_bytes, _), r in zip(cases, refs):
                out = attn.paged_attention_decode(**args)
                errs.append((out.float() - r.float()).abs().max().item())
                times.append(ms(lambda: attn.paged_attention_decode(**args)))
        except Exception as e:  # noqa: BLE001 (out of resources for a config is a result, not a failure)
            log(f"sweep decode {name}: failed {type(e).__name__}")
            continue
        first_times = first_times or times
        score = sum(t / t0 for t, t0 in zip(times, first_times))  # each case counts alike
        log(f"sweep decode {name}: "
            + ", ".join(f"{t * 1e3:.1f}us" for t in times) + f" err {max(errs):.1e}")
        if max(errs) < 3e-2 and score < best_score:
            best, best_score = (block_n, warps, stages, waves, max_splits), score
    if best:
        attn.DECODE_CONFIG.update(BLOCK_N=best[0], num_warps=best[1], num_stages=best[2], WAVES=best[3],
                                  MAX_SPLITS=best[4])
    log(f"decode config: {attn.DECODE_CONFIG}")

    args, flops, dense = prefill_case("27B", 0, 8192, gen)
    q = args["q"].transpose(0, 1)[None]
    k = dense(args["k_cache"], 0).transpose(0, 1)[None].contiguous()
    v = dense(args["v_cache"], 0).transpose(0, 1)[None].contiguous()
    r = sdpa(q, k, v, causal=True)[0][0].transpose(0, 1)  # the fp32 reference would need 19 GB here
    best, best_t = None, float("inf")
    for bm, bn, warps, stages in PREFILL_SWEEP:
        attn.PREFILL_CONFIG.update(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
        try:
            out = attn.paged_attention_prefill(**args)
            err = (out.float() - r.float()).abs().max().item()
            t = ms(lambda: attn.paged_attention_prefill(**args))
        except Exception as e:  # noqa: BLE001
            log(f"sweep prefill M={bm} N={bn} warps={warps} stages={stages}: failed {type(e).__name__}")
            continue
        log(f"sweep prefill M={bm} N={bn} warps={warps} stages={stages}: {t:.3f} ms "
            f"{flops / (t * 1e-3) / 1e12:.0f} TFLOP/s err {err:.1e}")
        if err < 3e-2 and t < best_t:
            best, best_t = (bm, bn, warps, stages), t
    if best:
        attn.PREFILL_CONFIG.update(BLOCK_M=best[0], BLOCK_N=best[1], num_warps=best[2], num_stages=best[3])
    log(f"prefill config: {attn.PREFILL_CONFIG}")


# ------------------------------------------------------------------------------------------------------ row-wise


def bench_rowwise(tokens: int) -> list[Row]:
    rows = []
    x = torch.randn(tokens, 5120, device="cuda", dtype=BF16)
    r = torch.randn_like(x)
    w = torch.randn(5120, device="cuda", dtype=BF16) * 0.1
    a = dict(x=x, weight=w, eps=1e-6, residual=r)
    rows.append(_rowwise("rms_norm+residual", f"T={tokens} D=5120", lambda: norm.rms_norm(**a),
                         lambda: norm_ref.rms_norm(**a), 5 * x.numel() * 2))
    g = torch.randn(tokens * 48, 128, device="cuda", dtype=BF16)
    xg = torch.randn_like(g)
    wg = torch.randn(128, device="cuda")
    a = dict(x=xg, gate=g, weight=wg, eps=1e-6)
    rows.append(_rowwise("gated_rms_norm", f"T={tokens} 48x128", lambda: norm.gated_rms_norm(**a),
                         lambda: norm_ref.gated_rms_norm(**a), 3 * g.numel() * 2))
    gu = torch.randn(tokens, 2 * 17408, device="cuda", dtype=BF16)
    rows.append(_rowwise("silu_and_mul", f"T={tokens} I=17408", lambda: act.silu_and_mul(x=gu),
                         lambda: act_ref.silu_and_mul(x=gu), 3 * gu.numel()))
    q = torch.randn(tokens, 24, D, device="cuda", dtype=BF16)
    k = torch.randn(tokens, 4, D, device="cuda", dtype=BF16)
    v = torch.randn_like(k)
    pos = torch.randint(0, 32768, (tokens,), device="cuda")
    a = dict(q=q, k=k, positions=pos, rotary_dim=64, theta=1e7)
    rows.append(_rowwise("apply_partial_rope", f"T={tokens} 24+4 heads", lambda: rope.apply_partial_rope(**a),
                         lambda: rope_ref.apply_partial_rope(**a), 2 * (q.numel() + k.numel()) * 2))
    pages = -(-tokens // PAGE) + 1
    kc = torch.zeros(pages, PAGE, 4, D, device="cuda", dtype=BF16)
    vc = torch.zeros_like(kc)
    slots = torch.randperm(pages * PAGE, device="cuda")[:tokens]
    a = dict(k=k, v=v, k_cache=kc, v_cache=vc, slot_mapping=slots)
    rows.append(_rowwise("write_kv", f"T={tokens} 4 heads", lambda: attn.write_kv(**a),
                         lambda: attn_ref.write_kv(**a), 4 * k.numel() * 2))
    qw = torch.randn(D, device="cuda", dtype=BF16) * 0.1
    a = dict(q=q, k=k, v=v, q_weight=qw, k_weight=qw, eps=1e-6, positions=pos, rotary_dim=64, theta=1e7,
             k_cache=kc, v_cache=vc, slot_mapping=slots)
    rows.append(_rowwise("qk_norm_rope_write_kv", f"T={tokens} 24+4 heads",
                         lambda: attn.qk_norm_rope_write_kv(**a), lambda: attn_ref.qk_norm_rope_write_kv(**a),
                         (2 * q.numel() + 4 * k.numel() + 2 * v.numel()) * 2))
    return rows


def _rowwise(name, shape, fn, ref_fn, nbytes) -> Row:
    try:
        fn()
        t = ms(fn)
    except Exception as e:  # noqa: BLE001 (one broken kernel must not lose the table)
        return Row(name, shape, float("nan"), note=f"{type(e).__name__}: {str(e)[:200]}")
    return Row(name, shape, t, nbytes / (t * 1e-3) / 1e9, None, "torch ref", ms(ref_fn))


# --------------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true",
                        help="time tile configs first and keep the fastest (with --kv-quant: per quantized format)")
    parser.add_argument("--kv-quant", action="store_true",
                        help="only the tables over quantized KV pages (27B heads): decode at 32k and 128k contexts, "
                        "and prefill")
    parser.add_argument("--kv-quant-variants", action="store_true",
                        help="with --kv-quant: the quantized-page kernel variants of KV_VARIANTS side by side")
    parser.add_argument("--verify", action="store_true",
                        help="only the verify-step attention table (1 + K tokens per row, 27B heads, batches 1/8/32, "
                        "contexts 1k/32k; with --sweep: tile configs of the multi-token decode kernel first)")
    parser.add_argument("--verify-tokens", type=int, nargs="+", default=[4],
                        help="with --verify: tokens per row (1 + K), default 4")
    parser.add_argument("--out", help="also write the output to this file")
    args = parser.parse_args()
    require_cuda("bench_attention.py")
    lines: list[str] = []

    def log(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    copy_gbs, mm_tflops = ceilings()
    if args.verify:
        log(f"card: {torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}; "
            f"command: {' '.join([sys.executable, *sys.argv])}")
        log(f"copy {copy_gbs:.0f} GB/s (read + write) measured in this run; CUDA-graph medians")
        if args.sweep:
            sweep_verify(log, max(args.verify_tokens))
        bench_verify(log, copy_gbs, args.verify_tokens)
        if args.out:
            with open(args.out, "w") as f:
                f.write("\n".join(lines) + "\n")
        return
    if args.kv_quant:
        log(f"card: {torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}; "
            f"command: {' '.join([sys.executable, *sys.argv])}")
        log(f"copy {copy_gbs:.0f} GB/s (read + write) measured in this run; decode config {attn.DECODE_CONFIG}")
        if args.kv_quant_variants:
            compare_kv_variants(log, copy_gbs)
        elif args.sweep:
            sweep_kv_quant(log, copy_gbs)
        log(f"quantized-page overrides: {attn.QUANT_DECODE_CONFIG}")
        bench_kv_quant(log, copy_gbs)
        log(f"bf16 8192^3 matmul {mm_tflops:.0f} TFLOP/s measured in this run; prefill config {attn.PREFILL_CONFIG}")
        bench_kv_quant_prefill(log, mm_tflops)
        if args.out:
            with open(args.out, "w") as f:
                f.write("\n".join(lines) + "\n")
        return
    if args.sweep:
        sweep(log)
    gen = torch.Generator().manual_seed(1)
    rows: list[Row] = []

    def attempt(what: str, fn) -> None:
        try:
            out = fn()
            rows.extend(out if isinstance(out, list) else [out])
        except Exception as e:  # noqa: BLE001 (report and go on: one broken row must not lose the table)
            log(f"{what}: {type(e).__name__}: {str(e)[:300]}")

    for model in MODELS:
        for n, length in [(1, 4096), (1, 32768), (8, 4096), (64, 4096)]:
            attempt(f"decode {model} {n} {length}", lambda: bench_decode(model, n, length, gen, copy_gbs))
    for model in MODELS:
        for cached, new in [(0, 8192), (0, 2048), (6144, 2048)]:
            attempt(f"prefill {model} {cached} {new}", lambda: bench_prefill(model, cached, new, gen))
    for tokens in (64, 8192):
        attempt(f"rowwise {tokens}", lambda: bench_rowwise(tokens))

    props = torch.cuda.get_device_properties(0)
    log("")
    log(f"card: {props.name} ({props.multi_processor_count} SMs); torch {torch.__version__}, triton "
        f"{triton.__version__}, CUDA {torch.version.cuda}, python {platform.python_version()}")
    log(f"command: {' '.join([sys.executable, *sys.argv])}")
    log(f"ceilings measured in this run: copy {copy_gbs:.0f} GB/s (read + write), bf16 8192^3 matmul "
        f"{mm_tflops:.0f} TFLOP/s")
    log(f"decode config {attn.DECODE_CONFIG}; prefill config {attn.PREFILL_CONFIG}")
    for line in TABLE_HEADER:
        log(line)
    for r in rows:
        log(format_row(r, copy_gbs, mm_tflops))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
