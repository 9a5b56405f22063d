"""Triton paged attention, decode: split-KV kernel and its reduction (triton.py describes the layouts and formats).
One query per sequence (decode steps), or its last 1 + K positions (verify steps: tokens_per_row, the GQA group's
queries of all of them as the tile's rows, a causal mask per row)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deltaserve.kernels._device import num_sms, pdl_launch
from deltaserve.kernels._pdl import wait_then_release
from deltaserve.kernels.attention._triton_common import (_LOG2E, _check_heads, _check_last_dim, _config,
                                                        _kv_quant, _load_planes, _load_quantized, _load_words,
                                                        _precision, _widen)

# Tile config for CUDA; module-level so benchmarks/bench_attention.py can sweep it. From that sweep
# (benchmarks/RESULTS.md, 2026-11-27, bench_attention.py): configs within 10% of each other at batch 64; more
# splits (4 waves, up to 128 per sequence) helped batch 1 at long context.
DECODE_CONFIG: dict[str, int] = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "WAVES": 4, "MAX_SPLITS": 128}
# Overrides for quantized pages, by the kernels' QUANT code (1 fp8, 2 int8, 3 int4): a tile of them is a half or a
# quarter of the bytes, so the best tile differs. From bench_attention.py --kv-quant --sweep (benchmarks/RESULTS.md,
# 2026-12-03, H200): fp8 +5% and int4 +20% at 27B batch 32 / 32k over the bf16 tile; int8 keeps it.
# F16_DOTS (fp8 only, 0/1): run the dots in fp16 instead of bf16 (e4m3 -> fp16 is one native cvt per two values,
# -> bf16 adds one per value: 20% fewer instructions for sm_90a, benchmarks/compile_check.py in RESULTS.md). The
# 2026-12-03 H200 sweep at 865dce1 (same command, run 3 of the day) kept it with BLOCK_N 64: fp8 pages went from
# 0.97-1.02x to 1.01-1.09x the bf16 kernel's time.
# PLANES (0/1, any quantized format; implies fp16 dots): K, V, q and the output split into two planes, even and odd head
# dims, the pages converted by PTX (_triton_common.py says why and how): for sm_90a the tile loop's SASS per KV byte
# read drops from 0.20 to 0.13 warp-instructions (fp8), 0.25 to 0.15 (int8), 0.40 to 0.24 (int4, with V_REGS) against
# 0.07 for bf16 pages (benchmarks/compile_check.py; these and the figures below are of their dates: the addressing
# of eadb050 took 18-36% off every loop, RESULTS.md 2026-12-07). V_REGS (0/1, with PLANES): V converted in its load
# layout, then through shared memory as fp16 (matters for int4). Timed on the H200 (RESULTS.md, 2026-12-03, commit
# b4055ff, 27B heads, N=32 L=32k / N=8 L=128k, CUDA graphs): fp8 PLANES with BLOCK_N 128 / 4 warps 75% / 71% of copy
# bandwidth (the previous default 47% / 42%), 1.63x / 1.71x the bf16 pages' time; int8 PLANES (BLOCK_N 64) 58% / 50%
# (was 46% / 39%), int4 PLANES V_REGS 34% / 30% (was 22% / 19%).
# INT4_WORDS (int4 only, 0/1/2; implies PLANES; 2 is the default since 2026-12-04): int4 pages read as 16-bit words (4
# head dims each) into four planes, dims 4i + j, converted by _INT4_WORDS_PTX (1: magic-number lop3 + sub/fma, exact)
# or with K as fp16 subnormals (2: one AND per plane register, the +8 offset removed as 8 * sum(q) per head in the
# scores' accumulator; V as in 1). Every operand stays 16-bit (kWidth 2): no kWidth-4 q reloads and register shuffles,
# V through ldmatrix.trans without V_REGS. sm_90a tile-loop SASS per KV byte (benchmarks/compile_check.py, BLOCK_N
# 128, 4 warps): 0.236 (PLANES V_REGS) -> 0.169 (1) / 0.155 (2). Timed (bench_attention.py --kv-quant
# --kv-quant-variants, RESULTS.md 2026-12-04, H200, 27B heads, N=32 L=32k / N=8 L=128k): PLANES V_REGS 758 / 876 us
# (35% / 31% of copy), INT4_WORDS 1 513 / 529 us, INT4_WORDS 2 494 / 500 us (54% / 53%; BLOCK_N 64 or 256: slower).
# Tried and removed: INT4_WORDS 3 (V's nibbles as subnormals too) and INT8_SUBNORMAL (int8 K and V as the fp16
# subnormals (q + 128) 2^-24), V's offset taken off as offset * sum(p) per row after the loop. Fewer instructions
# and registers in compile_check (sm_90a tile loop, BLOCK_N 128: int4 1270 -> 1177 SASS per warp, 255 -> 166
# registers; int8 1918 -> 1686, 255 -> 168, no loop spills), but that subtraction loses the output's precision:
# both fail the 128k flat-context bound (test_quantized_decode_over_a_long_flat_context_gpu) on the H200 and the
# H100, max error 4.9e-4 to 6.6e-4 against 2 x the bf16 baseline's ~4e-5 (RESULTS.md 2026-12-05).
# WAVES 8 (twice the bf16 pages' splits): the pick of the H200 sweep for every quantized format (bench_attention.py
# --kv-quant --sweep, RESULTS.md 2026-12-05): 27B heads N=32 L=32k fp8 678 -> 646 us (77% -> 81% of copy), int8
# 705 -> 681, int4 495 -> 464; N=1 L=128k the same either way (98 / 102 / 69 us).
_PLANES = {"num_stages": 3, "F16_DOTS": 1, "PLANES": 1, "WAVES": 8}
QUANT_DECODE_CONFIG: dict[int, dict[str, int]] = {1: {"BLOCK_N": 128, "num_warps": 4, **_PLANES},
                                                  2: {"BLOCK_N": 128, "num_warps": 4, **_PLANES},
                                                  3: {"BLOCK_N": 128, "num_warps": 4, **_PLANES, "INT4_WORDS": 2}}
# Overrides for verify steps (tokens_per_row > 1: the tile's rows are the 1 + K queries of the whole GQA group, e.g.
# 24 of 32 at 27B K = 3, against 6 of 16 for decode), by the tile's rows (BLOCK_H), on top of the above; 16-row tiles
# (9B up to K = 3) keep the decode tile. 8 warps from benchmarks/compile_check.py (sm_90a, 27B T = 4): 32 rows with
# 4 warps spill (bf16 pages 228 bytes, fp8 PLANES 320, int4 60), with 8 warps none (bf16 168 registers, 0.094
# warp-instructions per KV byte in the tile loop against 0.067 for decode). 2 stages at 32 rows: the pick of the H200
# sweep (bench_attention.py --verify --sweep, RESULTS.md 2026-12-04, bf16 pages, 27B heads), over BLOCK_N, warps and
# stages. 64 rows (35B-A3B K = 4) with 8 warps: bf16 no spill, quantized pages still spill; not timed.
MULTI_TOKEN_DECODE_CONFIG: dict[int, dict[str, int]] = {32: {"num_warps": 8, "num_stages": 2}, 64: {"num_warps": 8}}
# The interpreter (CPU tensors) runs programs serially in numpy: the smallest tiles tl.dot takes keep tests fast.
_INTERPRET_DECODE: dict[str, int] = {"BLOCK_N": 16, "num_warps": 1, "num_stages": 1, "WAVES": 2, "MAX_SPLITS": 4}


# num_splits changes as contexts grow (eager decode); stride_btn is the block-table width of the step
@triton.jit(do_not_specialize=["num_splits", "stride_btn"])
def _decode_split_kernel(
    q_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, bt_ptr, seq_lens_ptr, part_o_ptr, part_lse_ptr,
    qk_scale, num_splits,
    stride_qn, stride_qh,
    stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh, stride_sp, stride_ss,
    stride_btn,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr, QUANT: tl.constexpr, F16_DOTS: tl.constexpr = False,
    PLANES: tl.constexpr = False, V_REGS: tl.constexpr = False, WORDS: tl.constexpr = 0, TOKENS: tl.constexpr = 1,
    PDL: tl.constexpr = False,
):
    """Program (n, kv head g, split s): the GQA group's q heads are the rows of the tile, so each K/V tile is read
    once for all of them. Split s covers whole BLOCK_N tiles [lo, hi) of sequence n; writes the split's normalized
    output and its log2-sum-exp (-inf for an empty split) to the partial buffers [N, Hq, num_splits, (D)].
    TOKENS > 1 (a verify step: every row's last TOKENS tokens are queries, q is [N * TOKENS, Hq, D]): the tile's rows
    are the (query token, q head) pairs, row r = token r // GROUP, head r % GROUP; query t sits at position
    seq_len - TOKENS + t and sees keys up to it (the causal mask, per row of the tile); the partial buffers are
    [N * TOKENS, Hq, num_splits, (D)]. TOKENS == 1 compiles the single-query kernel exactly as before. With
    PLANES every head-dim tile is split in two: even dims (q, acc, k, v) and odd dims (q_hi, acc_hi, k_hi, v_hi);
    with WORDS too (int4 read as 16-bit words) in four, dims 4i + j: j = 0 (q, acc, k, v), 1 (the _hi names), 2 and
    3 (the _2 and _3 names)."""
    n = tl.program_id(0)
    g = tl.program_id(1)
    s = tl.program_id(2)
    n64 = tl.cast(n, tl.int64)
    wait_then_release(PDL)  # q and the pages were written by the kernel before; seq_lens, tables: step data
    seq_len = tl.load(seq_lens_ptr + n)
    tiles_per_split = tl.cdiv(tl.cdiv(seq_len, BLOCK_N), num_splits)
    lo = s * tiles_per_split * BLOCK_N
    hi = tl.minimum(lo + tiles_per_split * BLOCK_N, seq_len)

    STEP: tl.constexpr = 4 if WORDS else (2 if PLANES else 1)  # head dims between neighbouring columns of a tile
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D // STEP)
    offs_n = tl.arange(0, BLOCK_N)
    d_mask = offs_d < HEAD_DIM // STEP
    if TOKENS == 1:
        h_mask = offs_h < GROUP
        heads = g * GROUP + offs_h
        q_cols = q_ptr + n64 * stride_qn + heads[:, None] * stride_qh + STEP * offs_d[None, :]
    else:
        h_mask = offs_h < GROUP * TOKENS
        heads = g * GROUP + offs_h % GROUP
        q_tok = n64 * TOKENS + offs_h // GROUP  # q's row (flat token index) of each tile row
        q_cols = q_ptr + (q_tok * stride_qn + heads * stride_qh)[:, None] + STEP * offs_d[None, :]
        # keys [lo, row_end) are visible to the tile row: its query's position + 1 = seq_len - TOKENS + 1 + t
        row_end = tl.minimum(seq_len - TOKENS + 1 + offs_h // GROUP, hi)
    q = _load_q(q_cols, h_mask[:, None] & d_mask[None, :], UPCAST, F16_DOTS)
    q_hi = q  # unused unless PLANES
    if PLANES:
        q_hi = _load_q(q_cols + 1, h_mask[:, None] & d_mask[None, :], UPCAST, F16_DOTS)
    q_2 = q  # unused unless WORDS
    q_3 = q
    if WORDS:
        q_2 = _load_q(q_cols + 2, h_mask[:, None] & d_mask[None, :], UPCAST, F16_DOTS)
        q_3 = _load_q(q_cols + 3, h_mask[:, None] & d_mask[None, :], UPCAST, F16_DOTS)
    k_scale_mul = qk_scale
    k_bias = tl.zeros([BLOCK_H], tl.float32)  # WORDS 2: K's +8 over all dims, in the dot's 2^-24 units
    if WORDS == 2:
        k_scale_mul = qk_scale * 16777216.0
        q_sum = tl.sum(q.to(tl.float32) + q_hi.to(tl.float32) + q_2.to(tl.float32) + q_3.to(tl.float32), 1)
        k_bias = q_sum * (8.0 * 2.0**-24)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D // STEP], tl.float32)
    acc_hi = tl.zeros([BLOCK_H, BLOCK_D // STEP], tl.float32)  # loop-invariant (dropped) unless PLANES
    acc_2 = tl.zeros([BLOCK_H, BLOCK_D // STEP], tl.float32)  # and these unless WORDS
    acc_3 = tl.zeros([BLOCK_H, BLOCK_D // STEP], tl.float32)
    bt_row = bt_ptr + n64 * stride_btn
    for start in range(lo, hi, BLOCK_N):
        tok = start + offs_n
        t_mask = tok < hi
        # helpers are inlined by hand on the unquantized path: each nested jit call costs milliseconds in the
        # interpreter
        if BLOCK_N % PAGE_SIZE == 0:
            # the tile starts on a page boundary (lo is a multiple of BLOCK_N), so a token's offset in its page and
            # the part of its address that does not depend on the page are the same every tile: per token the loop
            # keeps one 32 x 32 -> 64-bit product (page id x page stride), where it computed a signed division, a
            # remainder and three 64-bit products
            page = tl.load(bt_row + start // PAGE_SIZE + offs_n // PAGE_SIZE, mask=t_mask, other=0)
            in_page = offs_n % PAGE_SIZE
        else:
            page = tl.load(bt_row + tok // PAGE_SIZE, mask=t_mask, other=0)
            in_page = tok % PAGE_SIZE
        page = _widen(page)  # page ids and page strides are not negative (decode_into checks the strides)
        k_rows = page * _widen(stride_kp) + (in_page * stride_ks + g * stride_kh)
        v_rows = page * _widen(stride_vp) + (in_page * stride_vs + g * stride_vh)
        if QUANT == 0:
            kv_mask = t_mask[:, None] & d_mask[None, :]
            k = tl.load(kc_ptr + k_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(vc_ptr + v_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            scores = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        else:
            # offsets in 16-bit words (the strides of paired bytes are even), for the loads that read words
            k_words = page * _widen(stride_kp // 2) + (in_page * stride_ks + g * stride_kh) // 2
            v_words = page * _widen(stride_vp // 2) + (in_page * stride_vs + g * stride_vh) // 2
            if WORDS:
                k, k_hi, k_2, k_3 = _load_words(kc_ptr, k_words, t_mask, q.dtype, HEAD_DIM, BLOCK_D, False,
                                                WORDS == 2)
                v, v_hi, v_2, v_3 = _load_words(vc_ptr, v_words, t_mask, q.dtype, HEAD_DIM, BLOCK_D, V_REGS)
                if WORDS == 2:  # planes 1 and 3 are 16 n 2^-24, 0 and 2 n 2^-24 (n = q + 8)
                    scores = tl.dot(q_hi, tl.trans(k_hi), input_precision=PREC)
                    scores = tl.dot(q_3, tl.trans(k_3), scores, input_precision=PREC)
                    scores = scores * 0.0625 - k_bias[:, None]
                    scores = tl.dot(q_2, tl.trans(k_2), scores, input_precision=PREC)
                else:
                    scores = tl.dot(q_hi, tl.trans(k_hi), input_precision=PREC)
                    scores = tl.dot(q_2, tl.trans(k_2), scores, input_precision=PREC)
                    scores = tl.dot(q_3, tl.trans(k_3), scores, input_precision=PREC)
            elif PLANES:
                k, k_hi = _load_planes(kc_ptr, k_rows, k_words, t_mask, q.dtype, QUANT, HEAD_DIM, BLOCK_D, False,
                                       IS_V=False)
                v, v_hi = _load_planes(vc_ptr, v_rows, v_words, t_mask, q.dtype, QUANT, HEAD_DIM, BLOCK_D, V_REGS)
                scores = tl.dot(q_hi, tl.trans(k_hi), input_precision=PREC)
                if QUANT == 3:
                    scores = scores * 0.0625  # two-plane int4's k_hi is 16 (q - 8)
            else:
                k = _load_quantized(kc_ptr, k_rows, t_mask, q.dtype, QUANT, HEAD_DIM, BLOCK_N, BLOCK_D)
                v = _load_quantized(vc_ptr, v_rows, t_mask, q.dtype, QUANT, HEAD_DIM, BLOCK_N, BLOCK_D)
                scores = tl.zeros([BLOCK_H, BLOCK_N], tl.float32)
            s_rows = page * _widen(stride_sp) + (in_page * stride_ss + g)
            k_sc = tl.load(ks_ptr + s_rows, mask=t_mask, other=0.0)
            v_sc = tl.load(vs_ptr + s_rows, mask=t_mask, other=0.0)
            scores = tl.dot(q, tl.trans(k), scores, input_precision=PREC) * (k_sc * k_scale_mul)[None, :]
        if TOKENS == 1:
            scores = tl.where(t_mask[None, :], scores, float("-inf"))
            # every tile holds at least one valid token, so m_new is finite
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(scores - m_new[:, None])
        else:
            scores = tl.where(tok[None, :] < row_end[:, None], scores, float("-inf"))
            # a query before the split's first key sees none of this tile (nor maybe of the split): its m stays
            # -inf; shift by 0 there so exp2 never sees (-inf) - (-inf)
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if QUANT != 0:
            p = p * v_sc[None, :]  # l_i above sums the unscaled probabilities
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        if PLANES:
            acc_hi = acc_hi * alpha[:, None] + tl.dot(p.to(v.dtype), v_hi, input_precision=PREC)
        if WORDS:
            acc_2 = acc_2 * alpha[:, None] + tl.dot(p.to(v.dtype), v_2, input_precision=PREC)
            acc_3 = acc_3 * alpha[:, None] + tl.dot(p.to(v.dtype), v_3, input_precision=PREC)
        m_i = m_new

    nonempty = l_i > 0
    denom = tl.where(nonempty, l_i, 1.0)[:, None]
    lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
    if TOKENS == 1:
        row = (n64 * (GROUP * tl.num_programs(1)) + heads) * num_splits + s  # [N, Hq, S] flat index
    else:
        row = (q_tok * (GROUP * tl.num_programs(1)) + heads) * num_splits + s  # [N * TOKENS, Hq, S]
    tl.store(part_lse_ptr + row, lse, mask=h_mask)
    o_cols = part_o_ptr + row[:, None] * HEAD_DIM + STEP * offs_d[None, :]
    tl.store(o_cols, acc / denom, mask=h_mask[:, None] & d_mask[None, :])
    if PLANES:
        hi_scale: tl.constexpr = 16.0 if QUANT == 3 and not WORDS else 1.0  # two-plane int4's v_hi is 16 (q - 8)
        tl.store(o_cols + 1, acc_hi / (hi_scale * denom), mask=h_mask[:, None] & d_mask[None, :])
    if WORDS:
        tl.store(o_cols + 2, acc_2 / denom, mask=h_mask[:, None] & d_mask[None, :])
        tl.store(o_cols + 3, acc_3 / denom, mask=h_mask[:, None] & d_mask[None, :])


@triton.jit
def _load_q(ptrs, mask, UPCAST: tl.constexpr, F16_DOTS: tl.constexpr):
    """q's tile (a plane of it with PLANES) in the dots' dtype."""
    q = tl.load(ptrs, mask=mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    if F16_DOTS:
        # quantized pages with bf16 q: the dots run in fp16, because e4m3 -> fp16 is one native cvt per two values
        # while e4m3 -> bf16 adds a cvt per value, and PLANES makes fp16 tiles (fp16 also keeps more of q's and p's
        # bits; |q| past 65504 is clamped)
        q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
    return q


@triton.jit(do_not_specialize=["num_splits"])  # eager decode: changes as contexts grow
def _decode_reduce_kernel(
    part_o_ptr, part_lse_ptr, o_ptr, stride_on, stride_oh, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr = False,
):
    """Program (n, q head h): o = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M); zeros when every split is empty
    (a padding row, seq_lens 0)."""
    n = tl.program_id(0)
    h = tl.program_id(1)
    row = tl.cast(n, tl.int64) * tl.num_programs(1) + h
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    d_mask = offs_d < HEAD_DIM
    wait_then_release(PDL)  # the split kernel's partials
    lse = tl.load(part_lse_ptr + row * num_splits + offs_s, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))
    denom = tl.sum(w, 0)
    parts = tl.load(part_o_ptr + (row * num_splits + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    o = tl.sum(parts * w[:, None], 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(o_ptr + tl.cast(n, tl.int64) * stride_on + h * stride_oh + offs_d, o.to(o_ptr.dtype.element_ty),
             mask=d_mask)


def _tile_rows(group: int, tokens_per_row: int) -> int:
    """The split kernel's BLOCK_H: the GQA group's queries of all the row's tokens, at least tl.dot's 16."""
    return max(16, triton.next_power_of_2(group * tokens_per_row))


def _decode_config(device: torch.device, quant: int, tokens_per_row: int = 1, tile_rows: int = 16) -> dict[str, int]:
    if device.type != "cuda":
        return _INTERPRET_DECODE
    if tokens_per_row > 1:
        return {**DECODE_CONFIG, **QUANT_DECODE_CONFIG.get(quant, {}), **MULTI_TOKEN_DECODE_CONFIG.get(tile_rows, {})}
    return {**DECODE_CONFIG, **QUANT_DECODE_CONFIG.get(quant, {})}


_INT4_WORDS_MODES = (0, 1, 2)


def _check_decode_config(cfg: dict[str, int]) -> None:
    """Refuse the keys of removed kernel variants: a config that still asks for one would otherwise run another
    kernel than its author timed, without a word."""
    if "INT8_SUBNORMAL" in cfg:
        raise ValueError(f"decode config key INT8_SUBNORMAL (got {cfg['INT8_SUBNORMAL']!r}) was removed: it failed "
                         "the 128k flat-context accuracy bound; leave the key out (int8 pages take PLANES 0 or 1)")
    if cfg.get("INT4_WORDS", 0) not in _INT4_WORDS_MODES:
        raise ValueError(f"decode config INT4_WORDS must be one of {_INT4_WORDS_MODES}, got "
                         f"{cfg['INT4_WORDS']!r} (mode 3 was removed: it failed the 128k flat-context accuracy bound)")


def decode_num_splits(num_seqs: int, num_kv_heads: int, max_kv_len: int, device: torch.device,
                      quant: int = 0, tokens_per_row: int = 1, tile_rows: int = 16) -> int:
    """Splits per (sequence, kv head): enough programs for about WAVES waves over the SMs, at most one split per
    BLOCK_N tile of the longest possible sequence (block-table width * page size), at most MAX_SPLITS. Depends on
    shapes only, so a captured CUDA graph stays valid for any seq_lens."""
    sms = num_sms(device) if device.type == "cuda" else 8
    cfg = _decode_config(device, quant, tokens_per_row, tile_rows)
    want = triton.cdiv(cfg["WAVES"] * sms, max(1, num_seqs * num_kv_heads))
    return max(1, min(want, triton.cdiv(max_kv_len, cfg["BLOCK_N"]), cfg["MAX_SPLITS"]))


def paged_attention_decode(
    *,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    tokens_per_row: int = 1,
) -> torch.Tensor:
    """The last tokens_per_row (T) positions of every sequence as queries: query t of sequence n at position
    seq_lens[n] - T + t, causal (T = 1: one query at seq_lens[n] - 1, a decode step; T = 1 + K: a verify step).

    q: [N * T, Hq, D] (sequence n's queries in rows n * T ..); k_cache, v_cache: [P, page_size, Hkv, D] (quantized:
    with k_scale, v_scale); seq_lens: [N] int32 (0: padding row, output zeros); block_tables: [N, max_pages] int32.
    Returns o: [N * T, Hq, D] in q.dtype.
    """
    return decode_into(q=q, k_cache=k_cache, v_cache=v_cache, seq_lens=seq_lens, block_tables=block_tables,
                       scale=scale, out=torch.empty_like(q, memory_format=torch.contiguous_format),
                       k_scale=k_scale, v_scale=v_scale, tokens_per_row=tokens_per_row)


def decode_into(
    *, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
    block_tables: torch.Tensor, scale: float, out: torch.Tensor, num_splits: int | None = None,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None, tokens_per_row: int = 1,
) -> torch.Tensor:
    """paged_attention_decode writing into `out` ([N * tokens_per_row, Hq, D]); `num_splits` overrides the heuristic
    (tests)."""
    T = tokens_per_row
    rows, Hq, D = q.shape
    N = seq_lens.shape[0]
    Hkv, page_size = k_cache.shape[2], k_cache.shape[1]
    if T < 1 or rows != N * T:
        raise ValueError(f"q has {rows} rows, expected len(seq_lens) * tokens_per_row = {N} * {T}")
    if N == 0:
        return out
    _check_last_dim(q, k_cache, v_cache, out)
    _check_heads(q, k_cache)
    quant, ks, vs, stride_sp, stride_ss = _kv_quant(k_cache, v_cache, k_scale, v_scale, D, q)
    if max(k_cache.stride(0), v_cache.stride(0), stride_sp or 0) >= 2**31:  # the kernel widens them as uint32
        raise ValueError(f"a KV page spans {max(k_cache.stride(0), v_cache.stride(0))} elements; the decode kernel "
                         f"takes pages of fewer than 2^31 (use a smaller page_size)")
    group = Hq // Hkv
    block_h = _tile_rows(group, T)
    if num_splits is None:
        num_splits = decode_num_splits(N, Hkv, block_tables.shape[1] * page_size, q.device, quant, T, block_h)
    cfg = _config(_decode_config(q.device, quant, T, block_h), _INTERPRET_DECODE, q)
    _check_decode_config(cfg)
    part_o = torch.empty((N * T, Hq, num_splits, D), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((N * T, Hq, num_splits), dtype=torch.float32, device=q.device)
    BLOCK_D = triton.next_power_of_2(D)
    # two planes of >= 16 columns for tl.dot; fp8/int8 pages are read as 16-bit dim pairs, so every stride is even
    planes = (bool(cfg.get("PLANES") or cfg.get("INT4_WORDS")) and quant != 0 and BLOCK_D >= 32 and D % 2 == 0
              and all(st % 2 == 0 for st in (*k_cache.stride()[:3], *v_cache.stride()[:3])))
    # int4 as 16-bit words: four planes of >= 16 columns, a row of whole words (the strides are even: planes)
    words = (int(cfg.get("INT4_WORDS", 0)) if planes and quant == 3 and BLOCK_D >= 64 and D % 4 == 0 else 0)
    _decode_split_kernel[(N, Hkv, num_splits)](
        q, k_cache, v_cache, ks, vs, block_tables, seq_lens, part_o, part_lse,
        scale * _LOG2E, num_splits,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), stride_sp, stride_ss,
        block_tables.stride(0),
        GROUP=group, HEAD_DIM=D, PAGE_SIZE=page_size,
        BLOCK_H=block_h, BLOCK_N=cfg["BLOCK_N"], BLOCK_D=BLOCK_D,
        UPCAST=not q.is_cuda, PREC=_precision(q), QUANT=quant,
        F16_DOTS=q.dtype == torch.bfloat16 and q.is_cuda and (bool(cfg.get("F16_DOTS")) and quant == 1 or planes),
        PLANES=planes, V_REGS=planes and bool(cfg.get("V_REGS")), WORDS=words, TOKENS=T,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **pdl_launch(q.device),
    )
    _decode_reduce_kernel[(N * T, Hq)](
        part_o, part_lse, out, out.stride(0), out.stride(1), num_splits,
        HEAD_DIM=D, BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=BLOCK_D,
        num_warps=4, **pdl_launch(q.device),
    )
    return out
