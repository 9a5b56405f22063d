"""Kernel-only timing of the quantized GEMMs at decode sizes (27B / 35B-A3B projection shapes) against torch's bf16
GEMM and the weight-read floor (bytes of the stored weight and scales over the measured copy bandwidth).

python benchmarks/bench_quant_kernels.py [--rows 1 16 64]            each kernel variant at the planned tiles, and
                                                                     the dequantize pass + bf16 GEMM (calls past
                                                                     FUSED_MAX_ROWS), the pass alone at the first rows
python benchmarks/bench_quant_kernels.py --sweep [--rows 1 16 64]    tiles x warps x stages x split-K per shape; the
                                                                     best per (kind, shape, rows) and its error
python benchmarks/bench_quant_kernels.py --moe-tiles [--rows 1 8]  the fused per-pair MoE (35B-A3B layer with its
                                                                     shared expert, 4 layers of distinct weights a
                                                                     graph): each gate_up / down tile in turn
[--fp8-gemv fp32 f16]   the fp8 GEMVs timed: fp32 FMAs ("fp8 u4"), fp16 products ("fp8 u4 f16", qt.GEMV_FP8_F16)
python benchmarks/bench_quant_kernels.py --moe-prefill --rows 2048 8192  the int4 / fp8 MoE layer at prefill sizes:
                                                                     fused dequantization against the dequantize
                                                                     pass + bf16 MoE and the bf16 layer
python benchmarks/bench_quant_kernels.py --gemv-pipeline [--rows 1 2]  the default GEMVs (int4, fp8) under each
                                                                     pipeline (qt.GEMV_DEPTH x qt.GEMV_EVICT_FIRST)
[--gemv-variants fp32 f16 f16x4]   the int4 GEMVs timed: fp32 FMAs, fp16 products with one word per fp16
                             accumulator (qt.GEMV_F16, GEMV_F16_WORDS 1) and/or four words chained (GEMV_F16_WORDS 4,
                             the default)

Variants (kernels/quant/triton.py UNPACK): int4 u0 = each tile dequantized into column order, one dot (the default
past the GEMV's rows); u2 = nibble planes dequantized in fp32 then rounded, eight dots per tile (the first kernels);
u3 = planes built by the lop3 trick, scale after the dot; fp8 u0 = dequantize-then-dot (the default), u3 = scale
after; u4 = the CUDA-core GEMV (up to GEMV_SWEEP_ROWS rows; int4 "u4 f16" / "u4 f16x4": its F16_FMA variant, one or
four words per fp16 accumulator; past one row only those, the fp32-FMA GEMVs spill). The sweep's baseline ("plan")
is what quant_gemm runs by default; it tries GEMV tiles (BN x warps x split-K) up to GEMV_SWEEP_ROWS rows and
tl.dot tiles (--sweep-unpack: BN x BK x warps x stages) past them. Timings are CUDA-graph
replays (triton.testing.do_bench_cudagraph), as the engine runs them, so launch overhead is not counted.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools

import torch
import triton
import triton.testing

from benchmarks.common import measure_copy_bandwidth, moe_blocked_tiles, read_stream, require_cuda, table
from deltaserve.kernels.quant import ref
from deltaserve.kernels.quant import triton as qt

SHAPES = {"27B gate_up": (34816, 5120), "27B down": (5120, 17408), "27B in_proj": (16384, 5120),
          "35B in_proj": (12288, 2048), "35B o_proj": (2048, 4096)}
SWEEP_SHAPES = ["27B gate_up", "27B down", "35B in_proj", "35B o_proj"]
VARIANTS = {"int4": (0, 2, 3, 4), "fp8": (0, 3, 4)}


def make_weights(n: int, k: int) -> dict:
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, device="cuda")
    s = torch.rand(n, k // 128, device="cuda") * 0.01 + 1e-3
    z = torch.randint(0, 16, (n, k // 128), dtype=torch.uint8, device="cuda")
    w8 = torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn)
    return {"int4": (ref.pack_int4(codes), s, z), "fp8": (w8, s, None)}


def floor_bytes(kind: str, n: int, k: int) -> float:
    return {"bf16": n * k * 2, "int4": n * k / 2 + n * k / 128 * 5, "fp8": n * k + n * k / 128 * 4}[kind]


def rel_error(kind: str, x: torch.Tensor, weights: tuple, got: torch.Tensor) -> float:
    w, s, z = weights
    k = x.shape[1]
    exact = (ref.dequant_int4(qweight=w, scales=s, zeros=z, group_size=128, k=k) if kind == "int4"
             else ref.dequant_fp8(weight=w, scale=s, block_k=128))
    want = x.double() @ exact.double().T
    return ((got.double() - want).abs().max() / want.abs().max()).item()


# --gemv-variants: (qt.GEMV_F16, qt.GEMV_F16_WORDS)
GEMV_VARIANTS = {"fp32": (False, 1), "f16": (True, 1), "f16x4": (True, 4)}


@contextlib.contextmanager
def gemv_f16(variant: str):
    """qt.GEMV_F16 and GEMV_F16_WORDS (the int4 GEMVs' fp16-product variants) set inside for `variant` (a key of
    GEMV_VARIANTS; "" = fp32): quant_gemm reads them as it launches."""
    old = qt.GEMV_F16, qt.GEMV_F16_WORDS, qt.MOE_PAIR_F16_WORDS
    f16, words = GEMV_VARIANTS[variant or "fp32"]
    qt.GEMV_F16, qt.GEMV_F16_WORDS, qt.MOE_PAIR_F16_WORDS = f16, words, words  # the MoE per-pair GEMV too
    try:
        yield
    finally:
        qt.GEMV_F16, qt.GEMV_F16_WORDS, qt.MOE_PAIR_F16_WORDS = old


@contextlib.contextmanager
def fp8_gemv(variant: str):
    """qt.GEMV_FP8_F16 set inside for `variant` ("f16": the fp8 GEMV with fp16 products; "fp32" or "": without)."""
    old = qt.GEMV_FP8_F16
    qt.GEMV_FP8_F16 = variant == "f16"
    try:
        yield
    finally:
        qt.GEMV_FP8_F16 = old


def variant_context(kind: str, variant: str):
    """The GEMV variant's switch for `kind`: gemv_f16 (int4) or fp8_gemv."""
    return gemv_f16(variant) if kind == "int4" else fp8_gemv(variant)


def gemv_variants(args, kind: str) -> list[str]:
    """The int4 GEMV variants to time for `kind` ("" for fp32 FMAs; fp8's come from --fp8-gemv)."""
    return ["" if v == "fp32" else v for v in args.gemv_variants if kind == "int4" or v == "fp32"]


def time_ms(fn) -> float:
    fn()  # compile outside the graph
    return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median")


def planned(args, bw: float) -> list[dict]:
    rows = []
    for name, (n, k) in SHAPES.items():
        weights = make_weights(n, k)
        wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        for m in args.rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t = {"bf16": time_ms(lambda: torch.nn.functional.linear(x, wb))}
            for kind, variants in VARIANTS.items():
                w, s, z = weights[kind]
                for u in variants:
                    if u == 4 and m > qt.GEMV_SWEEP_ROWS:
                        continue
                    # past one row only the fp16-product GEMVs: the fp32-FMA ones spill (8.5 ms at 2 rows)
                    gemv_vars = gemv_variants(args, kind) if kind == "int4" else args.fp8_gemv
                    for f16 in [v for v in gemv_vars if m == 1 or v not in ("", "fp32")] if u == 4 else [""]:
                        with variant_context(kind, f16):
                            label = f"{kind} u{u}{' ' + f16 if f16 and f16 != 'fp32' else ''}"
                            t[label] = time_ms(lambda: qt.quant_gemm(x, w, s, z, 128, unpack=u))
                # what calls past qt.FUSED_MAX_ROWS run instead: one dequantize pass, then torch's bf16 GEMM
                t[f"{kind} dequant+bf16"] = time_ms(
                    lambda: torch.nn.functional.linear(x, qt.dequantize(w, s, z, 128, k, x.dtype)))
            row = {"shape": name, "rows": m}
            for key, ms in t.items():
                row[f"{key} us"] = ms * 1e3
                row[f"{key} /floor"] = ms / (floor_bytes(key.split()[0], n, k) / bw * 1e3)
            if m == args.rows[0]:  # the dequantize pass alone: its bytes (stored weight in, bf16 out) per second
                for kind in VARIANTS:
                    w, s, z = weights[kind]
                    us = time_ms(lambda: qt.dequantize(w, s, z, 128, k, torch.bfloat16)) * 1e3
                    row[f"{kind} dequantize us"] = us
                    row[f"{kind} dequantize TB/s"] = (floor_bytes(kind, n, k) + n * k * 2) / us / 1e6
            rows.append(row)
            print(row, flush=True)
    return rows


def gemv_candidates(name, x, w, s, z, n, k, m, variants, kind="int4") -> list[tuple]:
    """GEMV (u4) tiles: BN x warps x split-K around the plan's split, for each variant (int4: gemv_variants(); fp8:
    --fp8-gemv's, "" or "fp32" for fp32 FMAs)."""
    out = []
    bm = triton.next_power_of_2(m)
    for bn, warps, f16 in itertools.product((32, 64, 128, 256), (8, 16), variants):
        base = max(1, min(k // 128, (4 * qt.num_sms(x.device)) // triton.cdiv(n, bn)))
        for split in sorted({1, base, 2 * base, 4 * base} & set(range(1, k // 128 + 1))):
            tiles = (bm, bn, 128, split, warps, 3)
            try:
                with variant_context(kind, f16):
                    ms = time_ms(lambda: qt.quant_gemm(x, w, s, z, 128, tiles=tiles, unpack=4))
            except Exception as e:  # out of registers / shared memory: not a candidate
                print(f"{name} m={m} gemv {f16 or 'fp32'} {tiles}: {type(e).__name__}", flush=True)
                continue
            out.append((f"u4 {f16}" if f16 and f16 != "fp32" else "u4", tiles, 4, ms))
    return out


def dot_candidates(name, x, w, s, z, n, k, m, bm, kind, unpack) -> list[tuple]:
    """tl.dot kernel tiles of variant `unpack`: BN x BK x warps x stages, split-K as the plan splits (UNPACK 3 keeps
    BK 128: its planes need K = BK / 8 >= 16)."""
    out = []
    for bn, bk, warps, stages in itertools.product((64, 128), (64, 128), (4, 8), (3, 5)):
        if unpack == 3 and bk != 128:
            continue
        tiles_n = triton.cdiv(n, bn) * triton.cdiv(m, bm)
        for split in [max(1, min(k // bk, (2 * qt.num_sms(x.device)) // tiles_n))]:  # the plan's rule
            tiles = (bm, bn, bk, split, warps, stages)
            try:
                ms = time_ms(lambda: qt.quant_gemm(x, w, s, z, 128, tiles=tiles, unpack=unpack))
            except Exception as e:  # out of shared memory / registers: not a candidate
                print(f"{name} m={m} {kind} {tiles}: {type(e).__name__}", flush=True)
                continue
            out.append((f"u{unpack}", tiles, unpack, ms))
    return out


def sweep(args, bw: float) -> list[dict]:
    best_rows = []
    for name in SWEEP_SHAPES:
        n, k = SHAPES[name]
        weights = make_weights(n, k)
        for m, kind in itertools.product(args.rows, VARIANTS):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            w, s, z = weights[kind]
            dot_tiles = qt._plan(m, n, k, 128, x.device, kind == "int4", sm90=qt._lop3_ok(x))
            gemv = qt._gemv_default(m, kind == "int4", x.dtype, False)
            base_tiles = qt._gemv_plan(m, n, k, 128, x.device, kind == "int4") if gemv else dot_tiles
            bm = dot_tiles[0]
            floor_ms = floor_bytes(kind, n, k) / bw * 1e3
            results = [("plan", base_tiles, None, time_ms(lambda: qt.quant_gemm(x, w, s, z, 128)))]
            if m <= qt.GEMV_SWEEP_ROWS:
                variants = gemv_variants(args, kind) if kind == "int4" else args.fp8_gemv
                variants = [v for v in variants if m == 1 or v not in ("", "fp32")]  # (as in planned())
                results += gemv_candidates(name, x, w, s, z, n, k, m, variants, kind)
            else:
                results += dot_candidates(name, x, w, s, z, n, k, m, bm, kind, args.sweep_unpack)
            label, tiles, u, ms = min(results, key=lambda r: r[3])
            variant = contextlib.nullcontext() if label == "plan" else variant_context(kind, label[3:])
            with variant:  # the best's error, in the variant it ran
                got = qt.quant_gemm(x, w, s, z, 128, tiles=tiles, unpack=u)
            row = {"shape": name, "kind": kind, "rows": m, "floor us": floor_ms * 1e3,
                   "dot plan us": time_ms(lambda: qt.quant_gemm(x, w, s, z, 128, tiles=dot_tiles,
                                                                unpack=0)) * 1e3,
                   "plan us": results[0][3] * 1e3, "best us": ms * 1e3, "best/floor": ms / floor_ms,
                   "best": f"{label} {tiles}", "rel err": rel_error(kind, x, weights[kind], got)}
            for v in [v for v in args.gemv_variants if m == 1 or v != "fp32"] if kind == "int4" and gemv else []:
                with gemv_f16(v):  # each GEMV variant at the default plan's tiles (the A/B)
                    row[f"plan {v} us"] = time_ms(
                        lambda: qt.quant_gemm(x, w, s, z, 128, tiles=base_tiles, unpack=4)) * 1e3
            best_rows.append(row)
            print(row, flush=True)
    return best_rows


MOE_SHAPE = (256, 8, 2048, 512)  # 35B-A3B: experts, top_k, hidden, expert (and shared expert) intermediate
MOE_GATE_UP_TILES = [(bn, warps, k_tiles) for bn in (16, 32, 64) for warps in (4, 8) for k_tiles in (1, 2, 4, 16)]
MOE_DOWN_TILES = [(bn, warps) for bn in (32, 64, 128) for warps in (4, 8)]
MOE_LAYERS = 4


def moe_layer(kind: str, experts: int, d: int, inter: int) -> dict:
    """One layer's int4 (g128) or fp8 (128-column blocks) experts and shared expert, random codes."""
    def part(n: int, k: int, e: int | None) -> tuple:
        lead = (e,) if e else ()
        s = torch.rand(*lead, n, k // 128, device="cuda") * 0.01 + 1e-3
        if kind == "fp8":
            return torch.randn(*lead, n, k, device="cuda").to(torch.float8_e4m3fn), s
        codes = torch.randint(0, 16, (*lead, n, k), dtype=torch.uint8, device="cuda")
        return ref.pack_int4(codes), s, torch.randint(0, 16, (*lead, n, k // 128), dtype=torch.uint8, device="cuda")
    w13, w2 = part(2 * inter, d, experts), part(d, inter, experts)
    names = ("w13_qweight", "w13_scales", "w13_zeros") if kind == "int4" else ("w13", "w13_scale")
    kw = dict(zip(names, w13)) | dict(zip([n.replace("w13", "w2") for n in names], w2))
    kw["group_size" if kind == "int4" else "block_k"] = 128
    return kw | dict(shared_w13=part(2 * inter, d, None), shared_w2=part(d, inter, None))


def moe_tiles(args, bw: float) -> list[dict]:
    """Each gate_up tile (down at its default), then each down tile (gate_up at its default), per kind and rows."""
    experts, top_k, d, inter = MOE_SHAPE
    rows = []
    for kind in ("int4", "fp8"):
        layers = [moe_layer(kind, experts, d, inter) for _ in range(MOE_LAYERS)]
        op = qt.int4_fused_moe if kind == "int4" else qt.fp8_fused_moe
        per_weight = 0.5 + 5 / 128 if kind == "int4" else 1 + 4 / 128
        for m in args.rows:
            x = torch.randn(m, d, device="cuda", dtype=torch.bfloat16)
            ids = torch.stack([torch.randperm(experts, device="cuda")[:top_k] for _ in range(m)])
            w = torch.softmax(torch.randn(m, top_k, device="cuda"), -1).to(torch.bfloat16)
            gate = torch.randn(m, 1, device="cuda", dtype=torch.bfloat16)
            touched = ids.unique().numel() + 1  # the shared expert
            floor_us = touched * 3 * d * inter * per_weight / bw * 1e6
            default = qt.MOE_TILES[kind]
            for which, tile in [("gate_up", t) for t in MOE_GATE_UP_TILES] + [("down", t) for t in MOE_DOWN_TILES]:
                qt.MOE_TILES[kind] = (tile, default[1]) if which == "gate_up" else (default[0], tile)
                try:
                    ms = time_ms(lambda: [op(x=x, topk_weights=w, topk_ids=ids, shared_gate=gate, **kw)
                                          for kw in layers])
                except Exception as e:  # out of registers / shared memory: not a candidate
                    print(f"moe {kind} m={m} {which} {tile}: {type(e).__name__}", flush=True)
                    continue
                finally:
                    qt.MOE_TILES[kind] = default
                us = ms * 1e3 / MOE_LAYERS
                row = {"kind": kind, "rows": m, "tile of": which, "tile": str(tile),
                       "default": tile == default[0 if which == "gate_up" else 1], "us/layer": us,
                       "floor us": floor_us, "/floor": us / floor_us}
                rows.append(row)
                print(row, flush=True)
    return rows


def _tiles_us(fn, tiles: tuple) -> float:
    with moe_blocked_tiles(tiles):
        return time_ms(fn) * 1e3


def moe_prefill(args, bw: float) -> list[dict]:
    """The int4 / fp8 MoE layer at prefill sizes (--rows tokens): the default (moe.blocked's kernels dequantizing
    each weight tile in their K loop), against the path before it (every expert and the shared one dequantized into
    bf16 temporaries, then the bf16 MoE) and the bf16 layer, all timed in this run; one layer, random routing. Also
    the fastest of blocked.CONFIGS' other tiles for the quantized call (the tiles were chosen on bf16)."""
    from deltaserve.kernels.moe import blocked
    from deltaserve.kernels.moe import gpu as moe_gpu

    experts, top_k, d, inter = MOE_SHAPE
    rows = []
    for kind in ("int4", "fp8"):
        kw = moe_layer(kind, experts, d, inter)
        op = qt.int4_fused_moe if kind == "int4" else qt.fp8_fused_moe
        group = 128
        parts = (("w13_qweight", "w13_scales", "w13_zeros"), ("w2_qweight", "w2_scales", "w2_zeros")) \
            if kind == "int4" else (("w13", "w13_scale", None), ("w2", "w2_scale", None))
        def dequantized() -> list[torch.Tensor]:
            return [qt.dequantize(kw[w], kw[sc], kw[z] if z else None, group, k, torch.bfloat16)
                    for (w, sc, z), k in zip(parts, (d, inter))]

        dense = dequantized()
        shared = [qt.dequantize(*(kw[name] + ((None,) if kind == "fp8" else ())), group, k, torch.bfloat16)
                  for name, k in (("shared_w13", d), ("shared_w2", inter))]

        # the path before: dense copies of the experts each call, then the bf16 MoE (it dequantized the shared
        # expert each call too, 3 MB, a few µs: here once, outside the timing)
        def dequantized_first():
            w13, w2 = dequantized()
            return moe_gpu.fused_moe(x=x, w13=w13, w2=w2, topk_weights=w, topk_ids=ids, shared_w13=shared[0],
                                     shared_w2=shared[1], shared_gate=gate)

        for m in args.rows:
            x = torch.randn(m, d, device="cuda", dtype=torch.bfloat16)
            w, ids = torch.softmax(torch.randn(m, experts, device="cuda"), -1).topk(top_k, dim=-1)
            w = (w / w.sum(-1, keepdim=True)).to(torch.bfloat16)
            gate = torch.randn(m, 1, device="cuda", dtype=torch.bfloat16)
            fused = lambda: op(x=x, topk_weights=w, topk_ids=ids, shared_gate=gate, **kw)  # noqa: E731
            bf16 = lambda: moe_gpu.fused_moe(x=x, w13=dense[0], w2=dense[1], topk_weights=w, topk_ids=ids,  # noqa
                                             shared_w13=shared[0], shared_w2=shared[1], shared_gate=gate)
            got, before = fused(), dequantized_first()
            err = ((got.float() - before.float()).norm() / before.float().norm()).item()
            row = {"kind": kind, "tokens": m, "fused us": time_ms(fused) * 1e3,
                   "dequantize + bf16 us": time_ms(dequantized_first) * 1e3, "bf16 layer us": time_ms(bf16) * 1e3,
                   "rel err vs before": f"{err:.1e}"}
            row["fused / before"] = row["fused us"] / row["dequantize + bf16 us"]
            others = [c for c in blocked.CONFIGS if c != blocked.pick_tiles(m * top_k)]
            row["best other tiles"], row["its us"] = min(((str(c), _tiles_us(fused, c)) for c in others),
                                                         key=lambda t: t[1])
            rows.append(row)
            print(row, flush=True)
    return rows


# --gemv-pipeline: (qt.GEMV_DEPTH, qt.GEMV_EVICT_FIRST) pairs, the kernels before the rule first
PIPELINES = [(2, False), (3, False), (2, True), (3, True)]


@contextlib.contextmanager
def gemv_pipeline(depth: int | None, evict: bool | None):
    """qt.GEMV_DEPTH and GEMV_EVICT_FIRST set inside (quant_gemm reads them as it launches; None: its rule)."""
    old = qt.GEMV_DEPTH, qt.GEMV_EVICT_FIRST
    qt.GEMV_DEPTH, qt.GEMV_EVICT_FIRST = depth, evict
    try:
        yield
    finally:
        qt.GEMV_DEPTH, qt.GEMV_EVICT_FIRST = old


def pipelines(args, bw: float) -> list[dict]:
    """The default GEMVs (int4 and fp8, fp16 products) at the plan's tiles under each of PIPELINES: µs, the
    weight-read floor's multiple, and the relative error against the exact product; "read us": one contiguous read
    of the same bytes (common.read_stream, the fastest a single launch of that size can be), and each pipeline's
    multiple of it."""
    rows = []
    for name, (n, k) in SHAPES.items():
        weights = make_weights(n, k)
        for m in [m for m in args.rows if m <= qt.GEMV_F16_MAX_ROWS]:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            for kind in ("int4", "fp8"):
                w, s, z = weights[kind]
                floor_us = floor_bytes(kind, n, k) / bw * 1e6
                read_us = time_ms(read_stream(int(floor_bytes(kind, n, k)))) * 1e3
                row = {"shape": name, "rows": m, "kind": kind, "floor us": floor_us, "read us": read_us}
                for depth, evict in PIPELINES:
                    with gemv_pipeline(depth, evict):
                        us = time_ms(lambda: qt.quant_gemm(x, w, s, z, 128, unpack=4)) * 1e3
                        err = rel_error(kind, x, weights[kind], qt.quant_gemm(x, w, s, z, 128, unpack=4))
                    label = f"d{depth}{' ef' if evict else ''}"
                    row[f"{label} us"], row[f"{label} /floor"], row[f"{label} /read"] = us, us / floor_us, us / read_us
                    row[f"{label} err"] = err
                rows.append(row)
                print(row, flush=True)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 16, 64])
    mode = ap.add_mutually_exclusive_group()  # one table a run (default: each variant at the planned tiles)
    mode.add_argument("--sweep", action="store_true")
    ap.add_argument("--fp8-gemv", nargs="+", choices=["fp32", "f16"], default=["fp32", "f16"],
                    help="the fp8 GEMV variants timed: fp32 FMAs, fp16 products (qt.GEMV_FP8_F16)")
    ap.add_argument("--sweep-unpack", type=int, choices=[0, 3], default=0,
                    help="the tl.dot variant --sweep tries past GEMV_SWEEP_ROWS rows (0: the default; 3: scale after "
                         "the dot)")
    mode.add_argument("--moe-tiles", action="store_true")
    mode.add_argument("--moe-prefill", action="store_true",
                      help="the int4 / fp8 MoE layer at --rows tokens: fused dequantization against the dequantize "
                           "pass + bf16 MoE and the bf16 layer")
    ap.add_argument("--gemv-variants", nargs="+", choices=list(GEMV_VARIANTS), default=list(GEMV_VARIANTS),
                    help="int4 GEMVs to time: fp32 FMAs, fp16 products one word per accumulator (qt.GEMV_F16, "
                         "GEMV_F16_WORDS 1), four words chained (GEMV_F16_WORDS 4, the default)")
    mode.add_argument("--gemv-pipeline", action="store_true",
                      help="the default GEMVs at rows <= GEMV_F16_MAX_ROWS under each pipeline: tiles per K iteration "
                           "(qt.GEMV_DEPTH 2, 3) and the words' eviction policy (qt.GEMV_EVICT_FIRST)")
    args = ap.parse_args(argv)
    if args.gemv_pipeline and min(args.rows) > qt.GEMV_F16_MAX_ROWS:
        ap.error(f"--gemv-pipeline times the GEMV, which runs up to {qt.GEMV_F16_MAX_ROWS} rows; give --rows "
                 f"{' '.join(map(str, range(1, qt.GEMV_F16_MAX_ROWS + 1)))}")
    prefill_rows = qt.PAIR_MAX // MOE_SHAPE[1] + 1  # fewer tokens route too few pairs for the prefill path
    if args.moe_prefill and min(args.rows) < prefill_rows:
        ap.error(f"--moe-prefill times the prefill path, which runs past {qt.PAIR_MAX} routed pairs (at least "
                 f"{prefill_rows} tokens at top-{MOE_SHAPE[1]}); give --rows of that many or more, e.g. 2048 8192")
    return args


def main() -> None:
    args = parse_args()
    require_cuda("bench_quant_kernels.py")
    bw = measure_copy_bandwidth()
    rows = (moe_tiles(args, bw) if args.moe_tiles else moe_prefill(args, bw) if args.moe_prefill
            else sweep(args, bw) if args.sweep
            else pipelines(args, bw) if args.gemv_pipeline else planned(args, bw))
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    print(table(rows))


if __name__ == "__main__":
    main()
