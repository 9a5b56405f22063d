"""Registers, spills and instruction counts of the quantized kernels (and of the GDN verify step's recurrence and
commit replay, a table of their own) for sm_90a, without a GPU: Triton compiles each
kernel variant to PTX for a Hopper target and ptxas (shipped with Triton) assembles it with -v. Pointers, N, K and
the row strides are marked divisible by 16, as Triton specializes them at real shapes (without the hint the counts
come out pessimistic). A check before a device call, not a timing.

For the decode kernel a second table counts the SASS of its KV-tile loop (cuobjdump, also shipped with Triton): per
warp and tile, and over all the tile's warps per byte of K/V it reads ("warp-instr / KV byte"). An H200 SM gets
about 18 bytes of HBM per cycle and issues at most 4 warp-instructions per cycle: past 0.22 per byte the loop cannot
keep up with memory even at full issue, and in practice the line is nearer 0.1 (2026-12-04: bf16 pages 0.07 and
85-100% of copy bandwidth, fp8 pages 0.20 and 36-54%; 2026-12-07: int4 pages 0.155 -> 0.126 and 57% -> 68%, int8
0.109 -> 0.083 and 79% -> 90%, benchmarks/RESULTS.md). A third table gives the same counts for the decode kernel
serving verify rows (tokens_per_row T: T x the GQA group as the tile's rows), a fourth for the prefill kernel's loop
(its dots are wgmma, HGMMA in the SASS, which the HMMA column does not count).

PYTHONPATH=src:. python3 benchmarks/compile_check.py
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import tempfile
from collections import Counter

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from benchmarks.common import table
from deltaserve.kernels.attention import triton_decode
from deltaserve.kernels.quant import triton as quant

TARGET = GPUTarget("cuda", 90, 32)
_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
PTXAS, CUOBJDUMP = os.path.join(_BIN, "ptxas"), os.path.join(_BIN, "cuobjdump")
_DIVISIBLE = ("N", "K", "stride_xm", "stride_wn", "stride_om", "k_per_split", "stride_qn")


def compile_one(fn, types: dict[str, str], constexprs: dict, num_warps: int, num_stages: int,
                loop: bool = False) -> dict:
    """fn compiled for sm_90a: registers, spill bytes and PTX instruction counts (loop: and its main loop's SASS)."""
    # constexprs the caller leaves out take their defaults (PDL: off, the launch as without it)
    defaults = {p.name: p.default for p in fn.params if p.is_constexpr and p.default is not inspect.Parameter.empty}
    constexprs = {**defaults, **constexprs}
    sig = {n: ("constexpr" if n in constexprs else types.get(n, "i32")) for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if n.endswith("_ptr") or n in _DIVISIBLE or n.startswith(("stride_k", "stride_v"))}
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs), target=TARGET,
                            options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = kernel.asm["ptx"]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        log = subprocess.run([PTXAS, "-arch=sm_90a", "-v", path, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([CUOBJDUMP, "-sass", os.path.join(d, "k.cubin")], capture_output=True, text=True,
                              check=True).stdout if loop else ""
    regs = next(int(w) for line in log.splitlines() if "Used" in line for w, nxt in zip(line.split(), line.split()[1:])
                if nxt.startswith("registers"))
    spills = next(int(line.split("bytes spill stores")[0].split(",")[-1]) for line in log.splitlines()
                  if "spill stores" in line)
    ops = Counter(line.split()[0] for line in ptx.splitlines() if line.strip()[:1].isalpha())
    return {"registers": regs, "spill store bytes": spills, "instructions": sum(ops.values()),
            "mma": sum(v for k, v in ops.items() if k.startswith("mma.") or "mma_async" in k),
            "cvt": sum(v for k, v in ops.items() if k.startswith("cvt")),
            "shared st": sum(v for k, v in ops.items() if k.startswith("st.shared")),
            **(loop_counts(sass) if loop else {})}


_SASS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def loop_counts(sass: str) -> dict:
    """SASS opcodes of the longest loop (the longest backward branch): the kernel's per-tile work, per warp."""
    ins = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in map(_SASS.search, sass.splitlines()) if m]
    back = [(int(t.group(1), 16), a) for a, op, rest in ins if op.startswith("BRA")
            for t in [re.search(r"0x([0-9a-f]+)", rest)] if t and int(t.group(1), 16) < a]
    lo, hi = max(back, key=lambda span: span[1] - span[0])
    ops = Counter(op for a, op, _ in ins if lo <= a <= hi)

    def n(*prefixes: str) -> int:
        return sum(v for k, v in ops.items() if k.startswith(prefixes))

    return {"loop SASS": sum(ops.values()), "loop HMMA": n("HMMA"), "loop LDS": n("LDS.") + ops["LDS"],
            "of them LDS.U8": n("LDS.U8"), "loop LDSM": n("LDSM"), "loop STS": n("STS"),
            "loop cvt (F2FP, I2F)": n("F2FP", "I2F", "F2F"), "of them I2F": n("I2F"), "loop BAR": n("BAR"),
            "loop LDL/STL": n("LDL", "STL")}  # local-memory (spill) traffic inside the loop


def moe_block_row() -> dict:
    """The int4 MoE block kernel (65-1024 routed pairs: blocks of 16 pairs of one expert share a weight tile), as
    _blocks launches it on the moe.blocked.block_plan of 256 experts (order: argsort's int64 pair ids)."""
    types = {"x_ptr": "*bf16", "order_ptr": "*i64", "bounds_ptr": "*i32", "starts_ptr": "*i32", "w_ptr": "*i32",
             "s_ptr": "*fp32", "z_ptr": "*u8", "out_ptr": "*fp32"}
    consts = dict(X_PER_PAIR=False, GROUP=128, INT4=True, IEEE=False, BM=16, BN=64, BK=128, BLOCK_E=512, EVEN=True)
    return {"kernel": "int4 MoE block kernel, 16 pairs x 64 rows",
            **compile_one(quant._moe_block_kernel, types, consts, 4, 3, loop=True)}


def quant_rows() -> list[dict]:
    """The quantized GEMM's variants at the tiles the plan gives them."""
    int4 = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*fp32", "z_ptr": "*u8", "out_ptr": "*bf16", "ws_ptr": "*fp32",
            "count_ptr": "*i32"}
    fp8 = {**int4, "w_ptr": "*fp8e4nv", "z_ptr": "*fp32"}
    cases = [("int4 UNPACK 3, 1-8 rows", int4, dict(INT4=True, UNPACK=3, BM=16, BN=64), 4, 5),
             ("int4 UNPACK 3 fp16, 9-16 rows", {**int4, "x_ptr": "*fp16", "out_ptr": "*fp16"},
              dict(INT4=True, UNPACK=3, BM=16, BN=128), 4, 5),
             ("int4 UNPACK 2, 64 rows", int4, dict(INT4=True, UNPACK=2, BM=64, BN=128), 4, 3),
             ("int4 UNPACK 0, 16 rows", int4, dict(INT4=True, UNPACK=0, BM=16, BN=64), 4, 3),
             ("int4 UNPACK 0, 64 rows", int4, dict(INT4=True, UNPACK=0, BM=64, BN=128), 4, 3),
             ("fp8 UNPACK 0, 1-16 rows", fp8, dict(INT4=False, UNPACK=0, BM=16, BN=64), 4, 3),
             ("fp8 W8A8, 1-16 rows", fp8, dict(INT4=False, UNPACK=3, ACT_FP8=True, BM=16, BN=64), 4, 3),
             ("fp8 W8A8, prefill tile", fp8, dict(INT4=False, UNPACK=3, ACT_FP8=True, BM=64, BN=128), 4, 3)]
    rows = []
    for name, types, consts, warps, stages in cases:
        consts = {"GROUP": 128, "IEEE": False, "BK": 128, "ACT_FP8": False, "EVEN": True, **consts}  # real shapes
        rows.append({"kernel": name, **compile_one(quant._gemm_kernel, types, consts, warps, stages, loop=True)})
    # int4: x plane-major fp32, or (F16_FMA) plane_major_f16's words, one word (F16_WORDS 1) or four chained per
    # fp16 accumulator; fp8: bf16 x and fp32 FMAs, or act_f16's fp16 words and fp16 products (GEMV_FP8_F16, four
    # words a chain); with the K loop's SASS per warp and per weight (a thread's share of the tile)
    for kind, types, f16, words in (("int4", {**int4, "x_ptr": "*fp32"}, False, 1),
                                    ("int4", {**int4, "x_ptr": "*i32"}, True, 1),
                                    ("int4", {**int4, "x_ptr": "*i32"}, True, 4), ("fp8", fp8, False, 1),
                                    ("fp8", {**fp8, "x_ptr": "*i32"}, True, 4)):
        tiles = ((64, 4), (128 if kind == "int4" else 64, 8)) + (((256, 8),) if words > 1 and kind == "int4" else
                                                                   ((128, 8),) if f16 and kind == "fp8" else ())
        for bn, warps in tiles:
            consts = dict(GROUP=128, INT4=kind == "int4", BM=1, BN=bn, BK=128, EVEN_N=True, EVEN_K=True, F16_FMA=f16,
                          F16_WORDS=words)
            r = compile_one(quant._gemv_kernel, types, consts, warps, 3, loop=True)
            label = (f" F16_FMA words {words}" if kind == "int4" else " fp16 products (GEMV_FP8_F16)") if f16 else ""
            # the K loop takes two tiles an iteration (_gemv_acc's UNROLL): per tile, half of it
            rows.append({"kernel": f"{kind} GEMV{label}, 1 row, BN {bn}, {warps} warps", **r,
                         "loop SASS / weight": r["loop SASS"] / 2 / (bn * 128 / (32 * warps))})
    # the default GEMVs (fp16 products) with three tiles an iteration (GEMV_DEPTH 3) and evict-first words
    for kind, types in (("int4", {**int4, "x_ptr": "*i32"}), ("fp8", {**fp8, "x_ptr": "*i32"})):
        bn = 128 if kind == "int4" else 64
        for depth, evict in ((3, False), (2, True), (3, True)):
            consts = dict(GROUP=128, INT4=kind == "int4", BM=1, BN=bn, BK=128, EVEN_N=True, EVEN_K=True, F16_FMA=True,
                          F16_WORDS=4, DEPTH=depth, EVICT_FIRST=evict)
            r = compile_one(quant._gemv_kernel, types, consts, 8, 3, loop=True)
            rows.append({"kernel": f"{kind} GEMV fp16 products, 1 row, BN {bn}, 8 warps, DEPTH {depth}"
                                   f"{', evict-first' if evict else ''}", **r,
                         "loop SASS / weight": r["loop SASS"] / depth / (bn * 128 / (32 * 8))})
    rows.append(moe_block_row())
    # the one-pass dequantize of prefill-sized quantized linears (past FUSED_MAX_ROWS rows), at dequantize()'s tile
    for kind, types in (("int4", {"w_ptr": "*i32", "s_ptr": "*fp32", "z_ptr": "*u8", "out_ptr": "*bf16"}),
                        ("fp8", {"w_ptr": "*fp8e4nv", "s_ptr": "*fp32", "z_ptr": "*fp32", "out_ptr": "*bf16"})):
        consts = dict(GROUP=128, INT4=kind == "int4", BN=64, BK=64, EVEN=True)
        rows.append({"kernel": f"{kind} dequantize, 64 x 64 tile", **compile_one(quant._dequant_kernel, types,
                                                                                  consts, 4, 3)})
    return rows


# (label, QUANT, BLOCK_N, warps, stages, F16_DOTS, PLANES, V_REGS[, INT4_WORDS, group, tokens]:
# _decode_row's arguments): the defaults (DECODE_CONFIG, QUANT_DECODE_CONFIG) and the variants bench_attention.py
# --kv-quant --sweep / --kv-quant-variants times; 27B's GQA group (6 q heads per KV head), head_dim 256, pages of 16
# tokens
DECODE_CASES = [("bf16 pages (default)", 0, 64, 4, 3, 0, 0, 0),
                ("fp8, bf16 dots", 1, 64, 4, 3, 0, 0, 0),
                ("fp8, fp16 dots (old default)", 1, 64, 4, 3, 1, 0, 0),
                ("fp8 PLANES", 1, 64, 4, 3, 1, 1, 0),
                ("fp8 PLANES V_REGS", 1, 64, 4, 3, 1, 1, 1),
                ("fp8 PLANES (default)", 1, 128, 4, 3, 1, 1, 0),
                ("fp8 PLANES", 1, 128, 8, 3, 1, 1, 0),
                ("int8 (old default)", 2, 64, 4, 3, 0, 0, 0),
                ("int8 PLANES", 2, 64, 4, 3, 1, 1, 0),
                ("int8 PLANES (default)", 2, 128, 4, 3, 1, 1, 0),
                ("int4 (old default)", 3, 128, 4, 3, 0, 0, 0),
                ("int4 PLANES", 3, 128, 4, 3, 1, 1, 0),
                ("int4 PLANES V_REGS", 3, 128, 4, 3, 1, 1, 1),
                ("int4 PLANES V_REGS", 3, 64, 4, 3, 1, 1, 1),
                ("int4 PLANES V_REGS", 3, 256, 8, 3, 1, 1, 1),
                ("int4 INT4_WORDS 1", 3, 128, 4, 3, 1, 1, 0, 1),
                ("int4 INT4_WORDS 1 V_REGS", 3, 128, 4, 3, 1, 1, 1, 1),
                ("int4 INT4_WORDS 2 (default)", 3, 128, 4, 3, 1, 1, 0, 2),
                ("int4 INT4_WORDS 2", 3, 64, 4, 3, 1, 1, 0, 2),
                ("int4 INT4_WORDS 2", 3, 256, 8, 3, 1, 1, 0, 2)]
_PAGES = {0: "*bf16", 1: "*fp8e4nv", 2: "*i8", 3: "*u8"}
_BYTES_PER_DIM = {0: 2, 1: 1, 2: 1, 3: 0.5}


def _decode_row(label: str, quant: int, block_n: int, warps: int, stages: int, f16: int, planes: int, v_regs: int,
                words: int = 0, group: int = 6, tokens: int = 1) -> dict:
    types = {"q_ptr": "*bf16", "kc_ptr": _PAGES[quant], "vc_ptr": _PAGES[quant], "ks_ptr": "*fp32",
             "vs_ptr": "*fp32", "part_o_ptr": "*fp32", "part_lse_ptr": "*fp32", "bt_ptr": "*i32",
             "seq_lens_ptr": "*i32", "qk_scale": "fp32"}
    consts = dict(GROUP=group, HEAD_DIM=256, PAGE_SIZE=16, BLOCK_H=max(16, triton.next_power_of_2(group * tokens)),
                  BLOCK_N=block_n, BLOCK_D=256, UPCAST=False, PREC="tf32", QUANT=quant, F16_DOTS=bool(f16),
                  PLANES=bool(planes), V_REGS=bool(v_regs), WORDS=words, TOKENS=tokens)
    r = compile_one(triton_decode._decode_split_kernel, types, consts, warps, stages, loop=True)
    tile_bytes = 2 * block_n * 256 * _BYTES_PER_DIM[quant]  # K and V
    r["warp-instr / KV byte"] = r["loop SASS"] * warps / tile_bytes
    return {"kernel": f"decode {label}, BLOCK_N {block_n}, {warps} warps", **r}


def decode_rows() -> list[dict]:
    """The split-KV decode kernel per page format and variant, with its tile loop's SASS."""
    return [_decode_row(*case) for case in DECODE_CASES]


# The decode kernel's default tiles per page format, serving verify rows (tokens_per_row T = 1 + K: T x group tile
# rows, 32 for 27B at T = 3..5, 16 for 9B up to T = 4), with 4 warps (the decode tile) and the warps
# MULTI_TOKEN_DECODE_CONFIG gives the tile's rows
VERIFY_CASES = [("bf16 pages", 0, 64, 4, 3, 0, 0, 0), ("fp8 PLANES", 1, 128, 4, 3, 1, 1, 0),
                ("int4 INT4_WORDS 2", 3, 128, 4, 3, 1, 1, 0, 2)]


def prefill_rows() -> list[dict]:
    """The prefill kernel (PREFILL_CONFIG's tile, 27B heads, 16-token pages) per page format: its longest loop's
    SASS (20 HGMMA a tile on sm_90a)."""
    from deltaserve.kernels.attention import triton_prefill

    cfg = triton_prefill.PREFILL_CONFIG
    rows = []
    for label, code in (("bf16 pages", 0), ("fp8 pages", 1), ("int4 pages", 3)):
        types = {"q_ptr": "*bf16", "kc_ptr": _PAGES[code], "vc_ptr": _PAGES[code], "ks_ptr": "*fp32",
                 "vs_ptr": "*fp32", "o_ptr": "*bf16", "cu_q_ptr": "*i32", "cu_tiles_ptr": "*i32",
                 "seq_lens_ptr": "*i32", "bt_ptr": "*i32", "qk_scale": "fp32"}
        consts = dict(GROUP=6, HEAD_DIM=256, PAGE_SIZE=16, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                      BLOCK_D=256, BLOCK_SEQ=16, UPCAST=False, PREC="tf32", QUANT=code)
        r = compile_one(triton_prefill._prefill_kernel, types, consts, cfg["num_warps"], cfg["num_stages"], loop=True)
        rows.append({"kernel": f"prefill {label}, {cfg['BLOCK_M']} x {cfg['BLOCK_N']}, {cfg['num_warps']} warps",
                     **{k: r[k] for k in ("registers", "spill store bytes", "loop SASS", "loop LDL/STL")}})
    return rows


def verify_rows() -> list[dict]:
    rows = []
    for model, group in (("27B", 6), ("9B", 4)):
        for tokens in (1, 2, 4, 5):
            tile_rows = max(16, triton.next_power_of_2(group * tokens))
            for label, code, block_n, warps, *rest in VERIFY_CASES if model == "27B" else VERIFY_CASES[:1]:
                override = triton_decode.MULTI_TOKEN_DECODE_CONFIG.get(tile_rows, {}) if tokens > 1 else {}
                for w in sorted({warps, override.get("num_warps", warps)}):
                    r = _decode_row(label, code, override.get("BLOCK_N", block_n), w, *rest, group=group,
                                    tokens=tokens)
                    rows.append({**r, "kernel": f"{model} T={tokens} {r['kernel']}"})
    return rows


def gdn_verify_rows() -> list[dict]:
    """The verify step's GDN recurrence (27B heads, 1 + K = 4 tokens) and the commit's replay, at the decode tiles
    of few rows (BV 16, 1 warp; the verify's MULTISTEP_TILE at any rows) and of many (BV 64, 4 warps; the replay's
    past 256 (row, head) pairs), fp32 state pool."""
    from deltaserve.kernels.gated_delta_rule import triton as gdn

    heads = dict(T=4, H=16, HV=48, K=128, V=128, BK=128)
    scalars = {"scale": "fp32", "eps": "fp32"}
    verify = {"y_ptr": "*bf16", "a_ptr": "*bf16", "b_ptr": "*bf16", "alog_ptr": "*fp32", "dtb_ptr": "*bf16",
              "ss_ptr": "*fp32", "slot_ptr": "*i64", "o_ptr": "*bf16", "gates_ptr": "*fp32", **scalars}
    replay = {"ss_ptr": "*fp32", "y_ptr": "*bf16", "gates_ptr": "*fp32", "slot_ptr": "*i64", "row_ptr": "*i64",
              "kept_ptr": "*i64", **scalars}
    rows = []
    for bv, warps in ((16, 1), (64, 4)):
        for name, fn, types in (("verify recurrence", gdn._multistep_recurrent_kernel, verify),
                                ("commit replay", gdn._replay_kernel, replay)):
            r = compile_one(fn, types, {**heads, "BV": bv, "NV": 128 // bv}, warps, 1)
            rows.append({"kernel": f"GDN {name}, BV {bv}, {warps} warps", "registers": r["registers"],
                         "spill store bytes": r["spill store bytes"], "instructions": r["instructions"]})
    return rows


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)  # no options; --help
    print(f"triton {triton.__version__}, target sm_90a (compile only, no GPU)")
    print(table(quant_rows()))
    print()
    print(table(gdn_verify_rows()))
    print()
    print(table(decode_rows()))
    print()
    print(table(verify_rows()))
    print()
    print(table(prefill_rows()))


if __name__ == "__main__":
    main()
