"""Triton kernels for weight-quantized GEMMs (int4 W4A16, fp8 block-scaled), same signatures as ref.py.

The decode-path kernels (GEMV, tl.dot GEMM, the GEMVs' activation copies, the fused MoE's two kernels) take part in
Programmatic Dependent Launch as the bf16 ones do (kernels/_pdl.py): each waits for its predecessor first.

Two kernels serve both, accumulating in fp32:
  - GEMV (variant 4, up to GEMV_MAX_ROWS / GEMV_F16_MAX_ROWS rows: decode at batch 1, and 2 for int4; the MoE
    per-pair GEMVs): CUDA-core FMAs on tiles kept in one 3-D layout from their wide loads on, so no tile passes
    through shared memory. int4 nibbles
    become the exact fp32 1 + q/16 by a shift and a lop3 (no int-to-float conversion); the zero point and scale
    apply once per row and K tile. F16_FMA (int4, bf16 activations, GEMV_F16, the default): packed
    fp16 products, two weights per and + fma.rn.f16x2, on activations scaled per K tile by a power of two;
    F16_WORDS (GEMV_F16_WORDS, default 4): that many adjacent words per fp16x2 accumulator and asm block. The fp8
    GEMV the same way with bf16 activations (GEMV_FP8_F16, the default since 2026-12-05; fp32 FMAs otherwise).
  - the tiled tl.dot kernel, for everything larger:
  - UNPACK 0 (the default for both formats): the weight tile is dequantized in
    registers and rounded to the activation dtype, as the reference does, then one dot of K = BK. fp8: a [BN, BK]
    e4m3 tile (contiguous along K) times the row's scale for that K block. int4: the tile's packed words are loaded
    once ([BN, BK/8], contiguous along K) and their nibble planes interleaved back into column order. UNPACK 2
    (int4, benchmarks): the planes never interleaved, nibble plane j (columns k0 + 8c + j) dotted with the same
    strided columns of x, eight K = BK/8 dots per tile.
  - decode-sized calls: one M tile (16/32/64 rows) and split-K until about two waves of programs run.
  - UNPACK 3 (benchmarks; int4 needs 16-bit activations on sm_90+): the scale multiplies each tile's partial
    sum, so the tensor cores take the exact q - z, two nibbles per lop3 (the FasterTransformer trick, in inline
    PTX), with no per-value scaling; the kernels skip the reference's rounding of the weight to the activation dtype
    and land closer to the exact product. Slower than UNPACK 0 for both formats at every size timed.
  - larger calls (more than FUSED_MAX_ROWS rows): one dequantize pass into a temporary, then torch's GEMM.
Split-K (both kernels) is reduced in the same launch, as in the bf16 skinny linear (kernels/linear/triton.py), on
its per-device workspace and counters (so, as there, calls run on one stream at a time): each program stores its fp32
partial, and the last of an output tile's programs to arrive adds them in split order (deterministic), stores the
result and resets the tile's counter. A capture that finds the scratch too small (no eager call of its size before
it) writes the partials to a temporary instead and adds them with one torch op (two more launches).
MoE, with no host sync at decode sizes (CUDA-graph safe): up to PAIR_GEMV_MAX routed pairs, two launches per layer
(_fused_pairs): gate|up with SiLU-and-mul for every (token, expert) pair, the GEMV's tiles with the expert id read on
the device and K split as the linear's split-K (last program adds), then down with the routing-weighted sum over a
token's pairs in the same launch; the shared expert, when its format and sizes match the experts', runs as one more
pair weighted by sigmoid(its gate). Up to PAIR_MAX, pairs sorted into blocks of 16 that share one expert
(moe.blocked.block_plan, static sizes) so each hit expert's weight is read once per block; gate|up, SiLU-and-mul in
torch, down, then the routing-weighted sum. Past PAIR_MAX pairs (prefill) moe.blocked's grouped GEMMs run on the
quantized experts, dequantizing each weight tile in their K loop.
"""

from __future__ import annotations

import logging
import os

import torch
import triton
import triton.language as tl

from deltaserve.kernels._device import capability, device_name, num_sms, pdl_launch
from deltaserve.kernels._pdl import wait_then_release
from deltaserve.kernels.activation.triton import silu_and_mul
from deltaserve.kernels.linear.gpu import linear as dense_linear
from deltaserve.kernels.linear.triton import _scratch
from deltaserve.kernels.moe import blocked
from deltaserve.kernels.moe.blocked import _block_rows, block_plan, max_blocks
from deltaserve.kernels.quant import ref

log = logging.getLogger(__name__)

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_COMPILED = tl.constexpr(not _INTERPRET)  # inline PTX can run


@triton.jit
def _dequant_tile(w_ptr, s_ptr, z_ptr, k0, offs_n, N, K, stride_wn, stride_sn, GROUP: tl.constexpr,
                  INT4: tl.constexpr, BK: tl.constexpr, EVEN: tl.constexpr = False):
    """Rows offs_n, columns [k0, k0 + BK) of W in fp32 ([BN, BK]), as the reference dequantizes. BK divides GROUP (or
    GROUP >= K), so the tile has one scale (and zero point) per row: loaded once, broadcast over BK. int4:
    _int4_in_order (each packed word loaded once). EVEN: the tile lies inside W (no masks)."""
    if INT4:
        return _int4_in_order(w_ptr, s_ptr, z_ptr, offs_n, N, K, stride_wn, stride_sn, k0, GROUP, BK, EVEN)
    offs_k = k0 + tl.arange(0, BK)
    if EVEN:
        s = tl.load(s_ptr + offs_n * stride_sn + k0 // GROUP)
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :])
    else:
        n_ok = offs_n < N
        s = tl.load(s_ptr + offs_n * stride_sn + k0 // GROUP, mask=n_ok, other=0.0)
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :],
                    mask=n_ok[:, None] & (offs_k[None, :] < K), other=0.0)
    return w.to(tl.float32) * s[:, None]


@triton.jit
def _int4_tile(w_ptr, s_ptr, z_ptr, offs_n, N, K, stride_wn, stride_sn, k0, GROUP: tl.constexpr, BK: tl.constexpr,
               EVEN: tl.constexpr = False):
    """Columns [k0, k0 + BK) of the int4 rows offs_n, as stored: (scale [BN] fp32, zero point [BN] int32, packed words
    [BN, BK/8], each word loaded once, contiguous along K). BK divides the group: one scale and zero per row. EVEN:
    the tile lies inside W (no masks)."""
    g = k0 // GROUP
    offs_w = k0 // 8 + tl.arange(0, BK // 8)
    if EVEN:
        s = tl.load(s_ptr + offs_n * stride_sn + g)
        z = tl.load(z_ptr + offs_n * stride_sn + g).to(tl.int32)
        words = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_w[None, :])
    else:
        n_ok = offs_n < N
        s = tl.load(s_ptr + offs_n * stride_sn + g, mask=n_ok, other=0.0)
        z = tl.load(z_ptr + offs_n * stride_sn + g, mask=n_ok, other=0).to(tl.int32)
        words = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_w[None, :],
                        mask=n_ok[:, None] & (offs_w[None, :] < (K + 7) // 8), other=0)
    return s, z, words


@triton.jit
def _int4_in_order(w_ptr, s_ptr, z_ptr, offs_n, N, K, stride_wn, stride_sn, k0, GROUP: tl.constexpr,
                   BK: tl.constexpr, EVEN: tl.constexpr = False):
    """Columns [k0, k0 + BK) of the int4 rows offs_n as (q - z) s in fp32 [BN, BK], each packed word loaded once (it
    used to be loaded once per column, eight times): the eight nibble planes as f = 1 + q/16 (_nibbles_as_float: a
    shift and a lop3 each, no int-to-float conversion), q - z = 16 f - (16 + z) exactly (one FMA), interleaved back
    into column order (column 8c + j is nibble j of word c: planes j and j + 4 first, then j + 2, then j + 1)."""
    s, z, words = _int4_tile(w_ptr, s_ptr, z_ptr, offs_n, N, K, stride_wn, stride_sn, k0, GROUP, BK, EVEN)
    z, s = z[:, None], s[:, None]
    f = _nibbles_as_float(words, _COMPILED)
    even = tl.interleave(tl.interleave(_dequant_plane(f[0], z, s), _dequant_plane(f[4], z, s)),
                         tl.interleave(_dequant_plane(f[2], z, s), _dequant_plane(f[6], z, s)))
    odd = tl.interleave(tl.interleave(_dequant_plane(f[1], z, s), _dequant_plane(f[5], z, s)),
                        tl.interleave(_dequant_plane(f[3], z, s), _dequant_plane(f[7], z, s)))
    return tl.interleave(even, odd)


@triton.jit
def _dequant_plane(f, z, s):
    """A nibble plane given as f = 1 + q/16 (_nibble_as_float) -> (q - z) s in fp32, as the reference dequantizes
    (the same bits): 16 f - (16 + z) = q - z exactly, in one FMA."""
    return (f * 16.0 - (z.to(tl.float32) + 16.0)) * s


@triton.jit
def _nibble_plane(words, j: tl.constexpr, z, s):
    """(nibble j of each word - z) s in fp32, one plane at a time (UNPACK 2; _int4_in_order makes all eight at
    once)."""
    return _dequant_plane(_nibble_as_float(words, j), z, s)


# int4 -> 16-bit float without per-value arithmetic (the FasterTransformer trick): OR-ing a nibble into the mantissa of
# 128.0 (bf16 0x4300; fp16 1024.0, 0x6400) gives exactly 128 + q, so one lop3 turns two nibbles of a word (q_j in the
# low half, q_{j+4} in the high half) into two 16-bit floats, and one packed subtract of 128 + z leaves the exact
# q - z. Two words per call; prmt regroups the halves so that output p holds nibble p of both words (plane p).
def _planes_ptx() -> str:
    """The PTX above for two words ($8, $9) and their 128 + z ($10, $11); MAGIC and SUB are filled in per dtype."""
    lines = ["{", ".reg .b32 a<4>, b<4>, t;",
             "lop3.b32 a0, $8, 0x000f000f, MAGIC, 0xea;", "lop3.b32 b0, $9, 0x000f000f, MAGIC, 0xea;"]
    for i in range(1, 4):
        for reg, word in (("a", "$8"), ("b", "$9")):
            lines += [f"shr.u32 t, {word}, {4 * i};", f"lop3.b32 {reg}{i}, t, 0x000f000f, MAGIC, 0xea;"]
    lines += [f"SUB {reg}{i}, {reg}{i}, {z};" for reg, z in (("a", "$10"), ("b", "$11")) for i in range(4)]
    lines += [f"prmt.b32 ${p}, a{p % 4}, b{p % 4}, {'0x5410' if p < 4 else '0x7632'};" for p in range(8)]
    return "\n".join(["", *lines, "}", ""])


_PLANES_ASM = _planes_ptx()
FP8_MAX = tl.constexpr(ref.FP8_MAX)
FP8_RECIPROCAL = tl.constexpr(ref.FP8_RECIPROCAL)
_PLANES_BF16 = tl.constexpr(_PLANES_ASM.replace("MAGIC", "0x43004300").replace("SUB", "sub.rn.bf16x2"))
_PLANES_FP16 = tl.constexpr(_PLANES_ASM.replace("MAGIC", "0x64006400").replace("SUB", "sub.f16x2"))


@triton.jit
def _int4_planes(words, z, BF16: tl.constexpr):
    """words int32 [BN, C], z int32 [BN] -> eight [BN, C] tensors of the activation dtype: plane p holds
    q_p - z of each word (column 8c + p of the tile), exactly."""
    if BF16:
        zz = (z | 0x4300) * 0x10001  # 128 + z in both halves
        return tl.inline_asm_elementwise(_PLANES_BF16, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r", [words, zz[:, None]],
                                         dtype=(tl.bfloat16,) * 8, is_pure=True, pack=2)
    else:
        zz = (z | 0x6400) * 0x10001
        return tl.inline_asm_elementwise(_PLANES_FP16, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r", [words, zz[:, None]],
                                         dtype=(tl.float16,) * 8, is_pure=True, pack=2)


@triton.jit
def _int4_tile_dot(x_ptr, words, z, offs_m, M, K, stride_xm, k0, BM: tl.constexpr, BN: tl.constexpr,
                   BK: tl.constexpr):
    """sum over the tile's BK columns of x[m, k] (q[n, k] - z[n]) -> fp32 [BM, BN]."""
    planes = _int4_planes(words, z, x_ptr.dtype.element_ty == tl.bfloat16)
    offs_c = tl.arange(0, BK // 8)
    part = tl.zeros((BM, BN), dtype=tl.float32)
    for j in tl.static_range(8):
        offs_k = k0 + offs_c * 8 + j
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        part += tl.dot(x, tl.trans(planes[j]))
    return part


@triton.jit
def _quantize_fp8_rows(x):
    """x [BM, BK] (one ACT_GROUP of columns) -> (e4m3 codes [BM, BK], fp32 scale [BM]): ref.quantize_fp8_act's
    formula (scale = amax times the fp32 reciprocal of 448, correctly rounded division, round to nearest even), so
    the GEMM needs no separate quantize pass."""
    xf = x.to(tl.float32)
    scale = tl.max(tl.abs(xf), axis=1) * FP8_RECIPROCAL
    safe = tl.where(scale > 0, scale, 1.0)
    q = tl.clamp(tl.math.div_rn(xf, safe[:, None]), -FP8_MAX, FP8_MAX)
    return q.to(tl.float8e4nv), scale


@triton.jit
def _acc_scale_after(x_ptr, w_ptr, s_ptr, z_ptr, offs_m, offs_n, M, N, K, stride_xm, stride_wn, stride_sn, k_begin,
                     k_end, GROUP: tl.constexpr, INT4: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr,
                     BN: tl.constexpr, BK: tl.constexpr, ACT_FP8: tl.constexpr):
    """UNPACK 3. Scale after the dot: sum_k x_k (q_k - z) s = s * sum_k x_k (q_k - z) within a K tile (one scale per
    row and tile), so the tile goes to the tensor cores as the exact small integers (q - z) in the activation dtype
    (fp8: the exact e4m3 values) and the scale multiplies the [BM, BN] partial sum once per tile. ACT_FP8: x holds
    e4m3 codes with one scale per row and BK columns (sx), fp8 x fp8 dots."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    n_ok = offs_n < N
    rows = offs_m.to(tl.int64) * stride_xm  # int64: a prefill's M x K can pass 2^31
    for k0 in range(k_begin, k_end, BK):
        if INT4:
            s, z, words = _int4_tile(w_ptr, s_ptr, z_ptr, offs_n, N, K, stride_wn, stride_sn, k0, GROUP, BK)
            part = _int4_tile_dot(x_ptr, words, z, offs_m, M, K, stride_xm, k0, BM, BN, BK)
        else:
            s = tl.load(s_ptr + offs_n * stride_sn + k0 // GROUP, mask=n_ok, other=0.0)
            offs_k = k0 + tl.arange(0, BK)
            x = tl.load(x_ptr + rows[:, None] + offs_k[None, :],
                        mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
            w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :],
                        mask=n_ok[:, None] & (offs_k[None, :] < K), other=0.0)
            if ACT_FP8:
                xq, sx = _quantize_fp8_rows(x)
                if IEEE:
                    part = tl.dot(xq.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
                else:
                    part = tl.dot(xq, tl.trans(w))
                part = part * sx[:, None]
            else:
                part = tl.dot(x, tl.trans(w.to(x_ptr.dtype.element_ty)))
        acc += part * s[None, :]
    return acc


@triton.jit
def _acc_int4_planes(x_ptr, w_ptr, s_ptr, z_ptr, offs_m, offs_n, M, N, K, stride_xm, stride_wn, stride_sn, k_begin,
                     k_end, GROUP: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     BK: tl.constexpr):
    """UNPACK 2. Each packed word is loaded once ([BN, BK/8], contiguous along K) and never interleaved: nibble plane
    j of the tile holds columns k0 + 8c + j, so it is dotted with those columns of x (a strided load of the small
    activation tile). Eight K=BK/8 dots per tile; the sum over k does not care about the order."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    offs_c = tl.arange(0, BK // 8)
    for k0 in range(k_begin, k_end, BK):
        s, z, words = _int4_tile(w_ptr, s_ptr, z_ptr, offs_n, N, K, stride_wn, stride_sn, k0, GROUP, BK)
        for j in tl.static_range(8):
            w = _nibble_plane(words, j, z[:, None], s[:, None]).to(x_ptr.dtype.element_ty)
            offs_k = k0 + offs_c * 8 + j
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
            if IEEE:
                acc += tl.dot(x.to(tl.float32), tl.trans(w).to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w))
    return acc


@triton.jit
def _acc_dequant(x_ptr, w_ptr, s_ptr, z_ptr, offs_m, offs_n, M, N, K, stride_xm, stride_wn, stride_sn, k_begin,
                 k_end, GROUP: tl.constexpr, INT4: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr,
                 BN: tl.constexpr, BK: tl.constexpr, EVEN: tl.constexpr = False):
    """UNPACK 0: the weight tile dequantized in fp32, rounded to the activation dtype as the reference does, then
    one dot of K = BK (int4: each packed word loaded once, its nibbles put back in column order, _int4_in_order). The
    default past the GEMV's rows, for both formats. EVEN: N and K whole tiles (no weight masks)."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BK):
        offs_k = k0 + tl.arange(0, BK)
        if EVEN:
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=offs_m[:, None] < M, other=0.0)
        else:
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        w = _dequant_tile(w_ptr, s_ptr, z_ptr, k0, offs_n, N, K, stride_wn, stride_sn, GROUP, INT4, BK, EVEN)
        w = tl.trans(w.to(x_ptr.dtype.element_ty))
        if IEEE:  # fp32 activations, or the interpreter (its bf16 tl.dot multiplies raw bits)
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    return acc


def _nibbles_ptx() -> str:
    """PTX for the eight nibbles of a word as fp32 1 + q/16, exactly: nibble j moved to the top of the mantissa of 1.0
    by one shift and one lop3 ((t & 0x00780000) | 0x3F800000); no int-to-float conversion (a quarter-rate
    instruction). Output j is $j, the word is $8."""
    lines = ["{", ".reg .b32 t;"]
    for j in range(8):
        shift = 19 - 4 * j
        lines.append(f"shl.b32 t, $8, {shift};" if shift >= 0 else f"shr.u32 t, $8, {-shift};")
        lines.append(f"lop3.b32 ${j}, t, 0x00780000, 0x3F800000, 0xea;")
    return "\n".join(lines + ["}"])


_NIBBLES_F32 = tl.constexpr(_nibbles_ptx())


@triton.jit
def _nibble_as_float(words, j: tl.constexpr):
    """Nibble j of each int32 word as the fp32 1 + q/16, exactly (the interpreter's form of _NIBBLES_F32)."""
    if 19 - 4 * j >= 0:
        v = words << (19 - 4 * j)
    else:
        v = words >> (4 * j - 19)
    return ((v & 0x00780000) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _nibbles_as_float(words, ASM: tl.constexpr):
    """All eight nibble planes of the words, each as fp32 1 + q/16."""
    if ASM:
        return tl.inline_asm_elementwise(_NIBBLES_F32, "=r,=r,=r,=r,=r,=r,=r,=r,r", [words],
                                         dtype=(tl.float32,) * 8, is_pure=True, pack=1)
    else:
        return (_nibble_as_float(words, 0), _nibble_as_float(words, 1), _nibble_as_float(words, 2),
                _nibble_as_float(words, 3), _nibble_as_float(words, 4), _nibble_as_float(words, 5),
                _nibble_as_float(words, 6), _nibble_as_float(words, 7))


# The F16_FMA GEMV's products, two per instruction: masking a word with 0x000f000f leaves nibbles 0 and 4 in the low
# bits of its halves, and a 16-bit pattern below 2048 read as fp16 is exactly pattern * 2^-24 (subnormal, or the
# smallest normal exponent), so the mask alone gives exact f16x2 weights q * 2^-24 with no constant to subtract;
# 0x00f000f0 gives nibbles 1 and 5 as 16 q * 2^-24 (their activations come divided by 16), and the same two masks
# on the word shifted right by 8 give nibbles 2, 6 and 3, 7. Per word: one shift, four ands, four packed FMAs
# against the four activation words (pair-planes, plane_major_f16()), then the halves added and widened to fp32:
# fp16 sums span one word's eight products (four per half), all else accumulates in fp32. The zero point is applied
# in fp32 per tile: sum x (q - z) = sum q x - z sum x.
def _word_dot_f16_ptx() -> str:
    """PTX for sum_p x_p * planes_p of the word $1 against the activation words $2..$5 -> fp32 $0."""
    lines = ["{", ".reg .b32 p, t, acc;", ".reg .b16 lo, hi;", "shr.u32 t, $1, 8;"]
    for p in range(4):
        lines.append(f"and.b32 p, {'t' if p >= 2 else '$1'}, {'0x00f000f0' if p % 2 else '0x000f000f'};")
        lines.append("mul.rn.f16x2 acc, p, $2;" if p == 0 else f"fma.rn.f16x2 acc, p, ${p + 2}, acc;")
    lines += ["mov.b32 {lo, hi}, acc;", "add.rn.f16 lo, lo, hi;", "cvt.f32.f16 $0, lo;", "}"]
    return "\n".join(lines)


_WORD_DOT_F16 = tl.constexpr(_word_dot_f16_ptx())


@triton.jit
def _half(v, HIGH: tl.constexpr):
    """Half HIGH of each int32 as the fp16 its bits encode."""
    if HIGH:
        b = v >> 16
    else:
        b = (v << 16) >> 16
    return b.to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _word_dots_f16(words, xw, ASM: tl.constexpr):
    """Each word's eight (q * 2^-24) x products summed -> fp32 (the interpreter's form: the same fp16 values, a
    rounded multiply and add where the GPU fuses them)."""
    if ASM:
        return tl.inline_asm_elementwise(_WORD_DOT_F16, "=r,r,r,r,r,r", [words, xw[0], xw[1], xw[2], xw[3]],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        lo = tl.zeros(words.shape, dtype=tl.float16)
        hi = tl.zeros(words.shape, dtype=tl.float16)
        for p in tl.static_range(4):
            q = (words >> (8 * (p // 2))) & (0x000f000f << (4 * (p % 2)))
            lo += _half(q, False) * _half(xw[p], False)
            hi += _half(q, True) * _half(xw[p], True)
        return (lo + hi).to(tl.float32)


# F16_WORDS > 1 (the chained variant): one asm block takes W = F16_WORDS adjacent words of a row (and their 4W
# activation words) and runs one fp16x2 accumulator through all 4W packed FMAs, then one add of the halves and one
# conversion to fp32: per word a shift, four ands and four fma.rn.f16x2, where the one-word form above also pays per
# word the halves' add, a conversion and an fp32 add of the K reduction (and more of that reduction across threads:
# its 64-bit loads leave each row's 16 words on 8 threads, the chained form's 128-bit loads on 4). The dequant is the
# same subnormal magic number (exponent 0: w & 0x000f000f read as an f16x2 is exactly two q * 2^-24, so no packed
# subtract, unlike UNPACK 3's 1024.0 magic; the zero point stays in fp32). The fp16 sums span 4W products per half
# (16 at W = 4) instead of 4: plane_major_f16 keeps the tile's |x| below 2^15, so a product is below 15 * 2^-9 and a
# half's partial sum below 0.5, each of its roundings at most 2^-13 (the one-word form: below 0.125, 2^-15).
def _chain_f16_ptx(words: int) -> str:
    """PTX for sum over words i and planes p of x_{i,p} * planes_p(word i) -> fp32 $0: the words are $1..$W, the
    activation word of word i and plane p is $(1 + W + 4i + p)."""
    steps = []
    for i in range(words):
        w = f"${1 + i}"
        for p in range(4):
            pre = [f"shr.u32 t, {w}, 8;"] if p == 0 else []
            pre.append(f"and.b32 p, {'t' if p >= 2 else w}, {'0x00f000f0' if p % 2 else '0x000f000f'};")
            steps.append((pre, "p", f"${1 + words + 4 * i + p}"))
    return _fp16_chain_ptx(".reg .b32 p, t, acc;", steps)


def _fp16_chain_ptx(regs: str, steps: list[tuple[list[str], str, str]]) -> str:
    """An asm block that runs one fp16x2 accumulator through the packed products of `steps` ((PTX making the weight
    register, weight register, activation operand) each), then adds its halves and widens the sum to fp32 $0."""
    lines = ["{", regs, ".reg .b16 lo, hi;"]
    for i, (pre, w, x) in enumerate(steps):
        lines += pre
        lines.append(f"mul.rn.f16x2 acc, {w}, {x};" if i == 0 else f"fma.rn.f16x2 acc, {w}, {x}, acc;")
    lines += ["mov.b32 {lo, hi}, acc;", "add.rn.f16 lo, lo, hi;", "cvt.f32.f16 $0, lo;", "}"]
    return "\n".join(lines)


_CHAIN_F16_2 = tl.constexpr(_chain_f16_ptx(2))
_CHAIN_F16_4 = tl.constexpr(_chain_f16_ptx(4))


@triton.jit
def _chain_dots_f16(ws, xs, W: tl.constexpr, ASM: tl.constexpr):
    """ws: W int32 tensors (words of one row each), xs: 4W activation-word tensors (word i's plane p at 4i + p) ->
    fp32: the 8W products of each word group summed in one fp16x2 accumulator (_chain_f16_ptx; the interpreter's
    form: the same fp16 values in the same order, a rounded multiply and add where the GPU fuses them)."""
    if ASM and W == 4:
        return tl.inline_asm_elementwise(
            _CHAIN_F16_4, "=r" + ",r" * 20,
            [ws[0], ws[1], ws[2], ws[3], xs[0], xs[1], xs[2], xs[3], xs[4], xs[5], xs[6], xs[7], xs[8], xs[9],
             xs[10], xs[11], xs[12], xs[13], xs[14], xs[15]], dtype=tl.float32, is_pure=True, pack=1)
    elif ASM:
        return tl.inline_asm_elementwise(
            _CHAIN_F16_2, "=r" + ",r" * 10, [ws[0], ws[1], xs[0], xs[1], xs[2], xs[3], xs[4], xs[5], xs[6], xs[7]],
            dtype=tl.float32, is_pure=True, pack=1)
    else:
        lo = tl.zeros(ws[0].shape, dtype=tl.float16)
        hi = tl.zeros(ws[0].shape, dtype=tl.float16)
        for i in tl.static_range(W):
            for p in tl.static_range(4):
                q = (ws[i] >> (8 * (p // 2))) & (0x000f000f << (4 * (p % 2)))
                lo += _half(q, False) * _half(xs[4 * i + p], False)
                hi += _half(q, True) * _half(xs[4 * i + p], True)
        return (lo + hi).to(tl.float32)


@triton.jit
def _split4(t):
    """[A, B, C] -> 4 tensors [A, B, C/4]: element a of output i is t[..., 4a + i] (the words one chain takes are
    adjacent along K, so one thread's vector load holds them)."""
    a, b = tl.split(tl.reshape(t, (t.shape[0], t.shape[1], t.shape[2] // 4, 2, 2)))
    a0, a1 = tl.split(a)
    b0, b1 = tl.split(b)
    return a0, b0, a1, b1


@triton.jit
def _split2(t):
    """[A, B, C] -> 2 tensors [A, B, C/2]: element a of output i is t[..., 2a + i]."""
    return tl.split(tl.reshape(t, (t.shape[0], t.shape[1], t.shape[2] // 2, 2)))


@triton.jit
def _stream_load(ptrs, mask, other, EVICT_FIRST: tl.constexpr):
    """tl.load, with the evict-first L2 policy if EVICT_FIRST."""
    if EVICT_FIRST:
        return tl.load(ptrs, mask=mask, other=other, eviction_policy="evict_first")
    else:
        return tl.load(ptrs, mask=mask, other=other)


@triton.jit
def _gemv_load(w_ptr, s_ptr, z_ptr, cols, N, K, stride_wn, stride_sn, k0, GROUP: tl.constexpr, INT4: tl.constexpr,
               BK: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, ALIGNED: tl.constexpr = False,
               F16: tl.constexpr = False, EVICT_FIRST: tl.constexpr = False):
    """The weight tile at columns [k0, k0 + BK) of rows cols ([1, BN, 1]), as stored, 3-D: (scale [1, BN, 1],
    zero point [1, BN, 1] fp32 (int4; fp8: the scale again), codes [1, BN, BK/8] int32 words or [1, BN, BK] e4m3;
    fp8 with F16: [1, BN, BK/4] int32 words, four e4m3 each, K a multiple of 4 and the row stride of 16 bytes).
    EVEN_N / EVEN_K: no row / column masks (the steady state of the real shapes). ALIGNED: k0 declared a multiple
    of BK (it always is), so the words load as 128-bit vectors where the row stride allows. EVICT_FIRST: the codes
    load with the evict-first L2 policy (read once, they need not displace the activations and partial sums)."""
    n_ok = cols < N
    if not INT4 and F16:
        w_ptr = w_ptr.to(tl.pointer_type(tl.int32))
        stride_wn = stride_wn // 4
        offs = tl.multiple_of(tl.core.to_tensor(k0 // 4), BK // 4) + tl.arange(0, BK // 4)[None, None, :]
        k_ok = offs < K // 4
    elif INT4 and ALIGNED:
        offs = tl.multiple_of(tl.core.to_tensor(k0 // 8), BK // 8) + tl.arange(0, BK // 8)[None, None, :]
        k_ok = offs < (K + 7) // 8
    elif INT4:
        offs = k0 // 8 + tl.arange(0, BK // 8)[None, None, :]
        k_ok = offs < (K + 7) // 8
    else:
        offs = k0 + tl.arange(0, BK)[None, None, :]
        k_ok = offs < K
    sz = cols * stride_sn + k0 // GROUP
    if EVEN_N:
        s = tl.load(s_ptr + sz)
        z = tl.load(z_ptr + sz).to(tl.float32) if INT4 else s
    else:
        s = tl.load(s_ptr + sz, mask=n_ok, other=0.0)
        z = tl.load(z_ptr + sz, mask=n_ok, other=0).to(tl.float32) if INT4 else s
    if EVEN_N and EVEN_K:
        codes = _stream_load(w_ptr + cols * stride_wn + offs, None, None, EVICT_FIRST)
    elif INT4 or F16:
        codes = _stream_load(w_ptr + cols * stride_wn + offs, n_ok & k_ok, 0, EVICT_FIRST)
    else:
        codes = _stream_load(w_ptr + cols * stride_wn + offs, n_ok & k_ok, 0.0, EVICT_FIRST)
    return s, z, codes


@triton.jit
def _gemv_x(x_ptr, rows, offs_k, M, K, stride_xm, ROW_MASK: tl.constexpr, EVEN_K: tl.constexpr):
    """Activation columns offs_k ([1, 1, C]) of rows ([BM, 1, 1]) in fp32."""
    ptrs = x_ptr + rows * stride_xm + offs_k
    if ROW_MASK and EVEN_K:
        x = tl.load(ptrs, mask=rows < M, other=0.0)
    elif ROW_MASK:
        x = tl.load(ptrs, mask=(rows < M) & (offs_k < K), other=0.0)
    elif EVEN_K:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=offs_k < K, other=0.0)
    return x.to(tl.float32)


@triton.jit
def _gemv_words(x_ptr, rows, offs, M, stride_xm, ROW_MASK: tl.constexpr):
    """int32 words offs ([1, 1, C], or a scalar) of rows ([BM, 1, 1]) of plane_major_f16()'s or act_f16()'s buffer."""
    if ROW_MASK:
        return tl.load(x_ptr + rows * stride_xm + offs, mask=rows < M, other=0)
    else:
        return tl.load(x_ptr + rows * stride_xm + offs)


@triton.jit
def _gemv_math_f16(x_ptr, rows, M, K, stride_xm, k0, s, z, codes, BK: tl.constexpr, ROW_MASK: tl.constexpr,
                   WORDS: tl.constexpr = 1):
    """The int4 tile's sum x (q - z) s with fp16 products (_word_dots_f16) on x from plane_major_f16(): its four
    pair-planes of BK/8 words, then, past all tiles, each tile's 2^-n and scaled sum x as fp32 bits. WORDS > 1: the
    chained form (_chain_dots_f16, WORDS words per fp16 accumulator; 2 or 4, at most BK/8) with aligned loads."""
    offs_c = tl.arange(0, BK // 8)[None, None, :]
    if WORDS > 1:
        base = tl.multiple_of(tl.core.to_tensor(k0 // 2), BK // 2)  # k0: a multiple of BK (128-bit loads)
    else:
        base = k0 // 2
    xw = (_gemv_words(x_ptr, rows, base + offs_c, M, stride_xm, ROW_MASK),
          _gemv_words(x_ptr, rows, base + BK // 8 + offs_c, M, stride_xm, ROW_MASK),
          _gemv_words(x_ptr, rows, base + BK // 4 + offs_c, M, stride_xm, ROW_MASK),
          _gemv_words(x_ptr, rows, base + 3 * (BK // 8) + offs_c, M, stride_xm, ROW_MASK))
    if WORDS == 4:
        ws = _split4(codes)
        xp = (_split4(xw[0]), _split4(xw[1]), _split4(xw[2]), _split4(xw[3]))
        xq = (xp[0][0], xp[1][0], xp[2][0], xp[3][0], xp[0][1], xp[1][1], xp[2][1], xp[3][1],
              xp[0][2], xp[1][2], xp[2][2], xp[3][2], xp[0][3], xp[1][3], xp[2][3], xp[3][3])
        dot = _chain_dots_f16(ws, xq, WORDS, _COMPILED)  # [BM, BN, BK/32]: summed after the K loop
    elif WORDS == 2:
        ws = _split2(codes)
        xp = (_split2(xw[0]), _split2(xw[1]), _split2(xw[2]), _split2(xw[3]))
        xq = (xp[0][0], xp[1][0], xp[2][0], xp[3][0], xp[0][1], xp[1][1], xp[2][1], xp[3][1])
        dot = tl.sum(_chain_dots_f16(ws, xq, WORDS, _COMPILED), axis=2, keep_dims=True)
    else:
        dot = tl.sum(_word_dots_f16(codes, xw, _COMPILED), axis=2, keep_dims=True)
    tail = (K + BK - 1) // BK * (BK // 2) + 2 * (k0 // BK)
    inv = _gemv_words(x_ptr, rows, tail, M, stride_xm, ROW_MASK).to(tl.float32, bitcast=True)
    xs = _gemv_words(x_ptr, rows, tail + 1, M, stride_xm, ROW_MASK).to(tl.float32, bitcast=True)
    if WORDS == 4:  # the zero-point term shared out over the BK/32 partial sums
        return (16777216.0 * dot - z * (xs * (32.0 / BK))) * (s * inv)
    return (16777216.0 * dot - z * xs) * (s * inv)


@triton.jit
def _split8(t):
    """[A, B, C] -> 8 tensors [A, B, C/8]: element a of output i is t[..., 8a + i]."""
    e, o = tl.split(tl.reshape(t, (t.shape[0], t.shape[1], t.shape[2] // 8, 2, 2, 2)))
    e0, e1 = tl.split(e)
    o0, o1 = tl.split(o)
    m0, m4 = tl.split(e0)
    m2, m6 = tl.split(e1)
    m1, m5 = tl.split(o0)
    m3, m7 = tl.split(o1)
    return m0, m1, m2, m3, m4, m5, m6, m7


# The fp8 GEMV with fp16 products (GEMV_FP8_F16): a word holds four e4m3 weights (columns 4i..4i+3); each 16-bit half
# becomes an exact f16x2 by one cvt.rn.f16x2.e4m3x2 and meets the activation word holding the same two columns
# (act_f16(): x as fp16 pairs in column order, scaled per K tile) in one fma.rn.f16x2. Four words (16 weights) run
# through one fp16x2 accumulator, then its halves are added and widened to fp32, as the int4 chains do: per four
# weights two cvts and two packed FMAs, where the fp32 GEMV converts and multiplies each weight on its own (its K loop
# issued 0.22 warp-instructions per weight byte, the H200's whole issue rate at its copy bandwidth). Range: act_f16
# keeps the tile's |x| below 8 and |w| <= 448, so a half's sum of 8 products stays below 28,672 and the two halves'
# sum below 57,344 (fp16 max 65,504).
def _chain_fp8_f16_ptx(words: int) -> str:
    """PTX for sum over words i of x . w (word i's weights $(1 + i), its activation words $(1 + W + 2i), and
    $(2 + W + 2i)) -> fp32 $0."""
    steps = []
    for i in range(words):
        for h, half in enumerate(("lo", "hi")):
            pre = [f"mov.b32 {{lo, hi}}, ${1 + i};"] if h == 0 else []
            pre.append(f"cvt.rn.f16x2.e4m3x2 w, {half};")
            steps.append((pre, "w", f"${1 + words + 2 * i + h}"))
    return _fp16_chain_ptx(".reg .b32 w, acc;", steps)


_CHAIN_FP8_F16 = tl.constexpr(_chain_fp8_f16_ptx(4))


@triton.jit
def _e4m3_bits_to_f16(b):
    """e4m3 bits (int32 in [0, 255]) -> fp16, exactly (the interpreter's cvt.rn.f16x2.e4m3x2; no NaN codes in
    quantized weights)."""
    e = (b >> 3) & 15
    m = (b & 7).to(tl.float32)
    mag = tl.where(e == 0, m * 0.001953125, (8.0 + m) * ((e + 117) << 23).to(tl.float32, bitcast=True))  # 2^(e-10)
    return tl.where(b >= 128, -mag, mag).to(tl.float16)


@triton.jit
def _chain_fp8_dots_f16(ws, xs, ASM: tl.constexpr):
    """ws: 4 int32 tensors of fp8 words (word j of each group), xs: their 8 activation words (word j's at 2j, 2j + 1)
    -> fp32, each group's 16 products in one fp16x2 accumulator (the interpreter's form: the same fp16 values in the
    same order, a rounded multiply and add where the GPU fuses them)."""
    if ASM:
        return tl.inline_asm_elementwise(
            _CHAIN_FP8_F16, "=r" + ",r" * 12, [ws[0], ws[1], ws[2], ws[3], xs[0], xs[1], xs[2], xs[3], xs[4], xs[5],
                                               xs[6], xs[7]], dtype=tl.float32, is_pure=True, pack=1)
    else:
        lo = tl.zeros(ws[0].shape, dtype=tl.float16)
        hi = tl.zeros(ws[0].shape, dtype=tl.float16)
        for i in tl.static_range(4):
            for h in tl.static_range(2):
                lo += _e4m3_bits_to_f16((ws[i] >> (16 * h)) & 255) * _half(xs[2 * i + h], False)
                hi += _e4m3_bits_to_f16((ws[i] >> (16 * h + 8)) & 255) * _half(xs[2 * i + h], True)
        return (lo + hi).to(tl.float32)


@triton.jit
def _gemv_math_fp8_f16(x_ptr, rows, M, K, stride_xm, k0, s, codes, BK: tl.constexpr, ROW_MASK: tl.constexpr):
    """The fp8 tile's sum x w s with fp16 products (_chain_fp8_dots_f16) on x from act_f16(): its BK/2 words, then,
    past all tiles, each tile's 2^-n as fp32 bits."""
    offs = tl.multiple_of(tl.core.to_tensor(k0 // 2), BK // 2) + tl.arange(0, BK // 2)[None, None, :]
    xs = _split8(_gemv_words(x_ptr, rows, offs, M, stride_xm, ROW_MASK))
    dot = tl.sum(_chain_fp8_dots_f16(_split4(codes), xs, _COMPILED), axis=2, keep_dims=True)
    inv = _gemv_words(x_ptr, rows, (K + BK - 1) // BK * (BK // 2) + k0 // BK, M, stride_xm, ROW_MASK)
    return dot * (s * inv.to(tl.float32, bitcast=True))


@triton.jit
def _gemv_math(x_ptr, rows, M, K, stride_xm, k0, s, z, codes, INT4: tl.constexpr, BK: tl.constexpr,
               ROW_MASK: tl.constexpr, EVEN_K: tl.constexpr, F16: tl.constexpr, F16_WORDS: tl.constexpr = 1):
    """sum over the tile's columns of x[m, k] W[n, k] -> fp32 [BM, BN, 1], on CUDA cores, every tensor 3-D in one
    layout (nothing converted through shared memory); scale (and zero point) once per row and tile (BK divides the
    group). int4: x comes plane-major (plane_major(): the tile's columns 8c + j stored at j * BK/8 + c, fp32, padded
    to whole tiles), so nibble plane j of the words meets a contiguous slice of x; with f = 1 + q/16 (exact),
    sum x (q - z) = 16 sum f x - (16 + z) sum x: per weight a shift, a lop3 and one FMA. F16: the fp16-product
    variants, _gemv_math_f16 (int4) and _gemv_math_fp8_f16."""
    if INT4 and F16:
        return _gemv_math_f16(x_ptr, rows, M, K, stride_xm, k0, s, z, codes, BK, ROW_MASK, F16_WORDS)
    elif F16:
        return _gemv_math_fp8_f16(x_ptr, rows, M, K, stride_xm, k0, s, codes, BK, ROW_MASK)
    elif INT4:
        offs_c = tl.arange(0, BK // 8)[None, None, :]
        planes = _nibbles_as_float(codes, _COMPILED)
        part = tl.zeros((rows.shape[0], codes.shape[1], BK // 8), dtype=tl.float32)
        for j in tl.static_range(8):
            part += planes[j] * _gemv_x(x_ptr, rows, k0 + j * (BK // 8) + offs_c, M, K, stride_xm, ROW_MASK, True)
        dot = tl.sum(part, axis=2, keep_dims=True)
        xs = tl.sum(_gemv_x(x_ptr, rows, k0 + tl.arange(0, BK)[None, None, :], M, K, stride_xm, ROW_MASK, True),
                    axis=2, keep_dims=True)
        return (16.0 * dot - (z + 16.0) * xs) * s
    else:
        x = _gemv_x(x_ptr, rows, k0 + tl.arange(0, BK)[None, None, :], M, K, stride_xm, ROW_MASK, EVEN_K)
        return tl.sum(codes.to(tl.float32) * x, axis=2, keep_dims=True) * s


def plane_major(x: torch.Tensor, bk: int) -> torch.Tensor:
    """x [M, K] -> fp32 [M, ceil(K/bk) * bk]: within each tile of bk columns, column 8c + j moved to j * bk/8 + c (the
    order of the int4 words' nibble planes), zeros past K. One copy kernel; the int4 GEMV then loads each plane's
    activations as one contiguous vector instead of eight strided, converted scalars."""
    m, k = x.shape
    kp = triton.cdiv(k, bk) * bk
    if kp != k:
        x = torch.nn.functional.pad(x, (0, kp - k))
    out = torch.empty(m, kp // bk, 8, bk // 8, dtype=torch.float32, device=x.device)
    out.copy_(x.view(m, kp // bk, bk // 8, 8).transpose(2, 3))
    return out.view(m, kp)


@triton.jit
def _act_row(x_row, src, mask, K, SILU: tl.constexpr):
    """fp32 values of x_row's columns src (masked: 0). SILU: the row is [gate | up] and the values are silu(gate) * up
    rounded to x's dtype, as silu_and_mul (kernels/activation/triton.py) stores them, from the same fp32 formula."""
    if SILU:
        gate = tl.load(x_row + src, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_row + K + src, mask=mask, other=0.0).to(tl.float32)
        return (gate * tl.sigmoid(gate) * up).to(x_row.dtype.element_ty).to(tl.float32)
    return tl.load(x_row + src, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _plane_major_f16_kernel(x_ptr, perm_ptr, ids_ptr, h_ptr, f_ptr, K, stride_xm, stride_pe, stride_om,
                            BK: tl.constexpr, PERM: tl.constexpr = False, TOP_K: tl.constexpr = 0,
                            SHARED: tl.constexpr = 0, SILU: tl.constexpr = False, PDL: tl.constexpr = False):
    """Row program_id(0), K tile program_id(1) of plane_major_f16(); PERM: column col of x read at perm[col].
    TOP_K > 0: row r is pair (token r // (TOP_K + SHARED), slot j) of ids [T, TOP_K], read in its expert's order
    (perm row ids[t, j]; no expert, id < 0: expert 0's, never used), slot TOP_K (SHARED) as it is. SILU: x's rows
    are [gate | up] (2K columns) and column col reads silu(gate) * up (_act_row)."""
    wait_then_release(PDL)  # x: the previous kernel's output
    row, t = tl.program_id(0), tl.program_id(1)
    j = tl.arange(0, BK)  # the fp16 slot: half j % 2 of word j // 2 = (pair-plane p, column group c)
    p, c = (j // 2) // (BK // 8), (j // 2) % (BK // 8)
    col = t * BK + 8 * c + p + 4 * (j % 2)
    if TOP_K > 0:
        x_row, slot = row // (TOP_K + SHARED), row % (TOP_K + SHARED)
        e = tl.maximum(tl.load(ids_ptr + x_row * TOP_K + tl.minimum(slot, TOP_K - 1)), 0).to(tl.int64)
        routed = slot < TOP_K
        src = tl.where(routed, tl.load(perm_ptr + e * stride_pe + col, mask=(col < K) & routed, other=0), col)
    elif PERM:
        x_row, src = row, tl.load(perm_ptr + col, mask=col < K, other=0)
    else:
        x_row, src = row, col
    x = _act_row(x_ptr + x_row.to(tl.int64) * stride_xm, src, col < K, K, SILU)
    e = (tl.max(tl.abs(x)).to(tl.int32, bitcast=True) >> 23) & 0xFF  # the tile's largest |x| is in [2^(e-127), ..)
    n = tl.minimum(141 - e, 126)  # 2^n x: largest in [2^14, 2^15) (inf, NaN: stay so; 2^n and 2^-n stay normal)
    odd = (p % 2) == 1
    y = (x * ((n + 127) << 23).to(tl.float32, bitcast=True) * tl.where(odd, 0.0625, 1.0)).to(tl.float16)
    tl.store(h_ptr + row * (2 * stride_om) + t * BK + j, y)
    tail = f_ptr + row * stride_om + tl.cdiv(K, BK) * (BK // 2) + 2 * t
    tl.store(tail, ((127 - n) << 23).to(tl.float32, bitcast=True))
    tl.store(tail + 1, tl.sum(y.to(tl.float32) * tl.where(odd, 16.0, 1.0)))


def plane_major_f16(x: torch.Tensor, bk: int, perm: torch.Tensor | None = None, ids: torch.Tensor | None = None,
                    shared_slot: bool = False, silu: bool = False) -> torch.Tensor:
    """x [M, K] (contiguous rows; perm given: x[:, perm], the gather of act-order in the same launch; perm [E, K]
    with ids [M, k]: pair_rows(x, ids, perm, shared_slot), each pair's row in its expert's order) -> int32
    [rows, W], the F16_FMA GEMV's activations: per tile of bk columns, x times a
    power of two 2^n that brings the tile's largest |x| to [2^14, 2^15) (any finite row fits fp16 and keeps its
    11 bits: bf16 exactly, fp32 rounded once; products of the small ones round like subnormals, about 2^-16 of the
    tile's sum), as fp16 pairs: pair-plane p's word c holds columns 8c + p and 8c + p + 4 (odd p divided by 16),
    the order _word_dots_f16 meets the nibbles in; zeros past K. After the ceil(K/bk) * bk/2 words, each tile's
    (2^-n, sum of its scaled x) as fp32 bits; rows padded to 16 words (aligned vector loads). One kernel. silu:
    x [M, 2K] holds [gate | up] and the copy is of silu(gate) * up (silu_and_mul's values; not with ids)."""
    k = x.shape[1] // 2 if silu else x.shape[1]
    top_k = 0 if ids is None else ids.shape[1]
    m = x.shape[0] if ids is None else ids.shape[0] * (top_k + int(shared_slot))
    tiles = triton.cdiv(k, bk)
    out = torch.empty(m, tiles * bk // 2 + triton.cdiv(2 * tiles, 16) * 16, dtype=torch.int32, device=x.device)
    if m:
        _plane_major_f16_kernel[(m, tiles)](x, x if perm is None else perm, x if ids is None else ids,
                                            out.view(torch.float16), out.view(torch.float32), k, x.stride(0),
                                            0 if perm is None else perm.stride(0), out.stride(0), BK=bk,
                                            PERM=perm is not None, TOP_K=top_k, SHARED=int(shared_slot),
                                            SILU=silu, num_warps=1, **pdl_launch(x.device))
    return out


@triton.jit
def _act_f16_kernel(x_ptr, h_ptr, f_ptr, K, stride_xm, stride_om, BK: tl.constexpr, SILU: tl.constexpr = False,
                    PDL: tl.constexpr = False):
    """Row program_id(0), K tile program_id(1) of act_f16() (SILU: as _plane_major_f16_kernel's)."""
    wait_then_release(PDL)  # x: the previous kernel's output
    row, t = tl.program_id(0), tl.program_id(1)
    col = t * BK + tl.arange(0, BK)
    x = _act_row(x_ptr + row.to(tl.int64) * stride_xm, col, col < K, K, SILU)
    e = (tl.max(tl.abs(x)).to(tl.int32, bitcast=True) >> 23) & 0xFF  # the tile's largest |x| is in [2^(e-127), ..)
    n = tl.minimum(129 - e, 126)  # 2^n x: largest in [4, 8) (inf, NaN: stay so; 2^n and 2^-n stay normal)
    y = (x * ((n + 127) << 23).to(tl.float32, bitcast=True)).to(tl.float16)
    tl.store(h_ptr + row * (2 * stride_om) + col, y)
    tl.store(f_ptr + row * stride_om + tl.cdiv(K, BK) * (BK // 2) + t, ((127 - n) << 23).to(tl.float32, bitcast=True))


def act_f16(x: torch.Tensor, bk: int, silu: bool = False) -> torch.Tensor:
    """x [M, K] (contiguous rows) -> int32 [M, W], the fp8 fp16-product GEMV's activations: per tile of bk columns,
    x times the power of two 2^n that brings the tile's largest |x| to [4, 8), as fp16 pairs in column order (word c:
    columns 2c, 2c + 1), zeros past K; after the ceil(K/bk) * bk/2 words, each tile's 2^-n as fp32 bits; rows padded
    to 16 words (aligned vector loads). One kernel. silu: x [M, 2K] holds [gate | up], copied as silu(gate) * up."""
    m, k = x.shape[0], x.shape[1] // 2 if silu else x.shape[1]
    tiles = triton.cdiv(k, bk)
    out = torch.empty(m, tiles * bk // 2 + triton.cdiv(tiles, 16) * 16, dtype=torch.int32, device=x.device)
    if m:
        _act_f16_kernel[(m, tiles)](x, out.view(torch.float16), out.view(torch.float32), k, x.stride(0),
                                    out.stride(0), BK=bk, SILU=silu, num_warps=1, **pdl_launch(x.device))
    return out


@triton.jit
def _gemv_tile(x_ptr, w_ptr, s_ptr, z_ptr, rows, cols, M, N, K, stride_xm, stride_wn, stride_sn, k0, codes,
               GROUP: tl.constexpr, INT4: tl.constexpr, BK: tl.constexpr, ROW_MASK: tl.constexpr,
               EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, ALIGNED: tl.constexpr, F16: tl.constexpr,
               F16_WORDS: tl.constexpr):
    """One tile's math on its loaded words, its scale and zero point loaded here (in the iteration that uses them)."""
    s, z, _ = _gemv_load(w_ptr, s_ptr, z_ptr, cols, N, K, stride_wn, stride_sn, k0, GROUP, INT4, BK, EVEN_N, EVEN_K,
                         ALIGNED, F16)
    return _gemv_math(x_ptr, rows, M, K, stride_xm, k0, s, z, codes, INT4, BK, ROW_MASK, EVEN_K, F16, F16_WORDS)


@triton.jit
def _gemv_acc(x_ptr, w_ptr, s_ptr, z_ptr, rows, cols, M, N, K, stride_xm, stride_wn, stride_sn, k_begin, k_end,
              GROUP: tl.constexpr, INT4: tl.constexpr, BK: tl.constexpr, ROW_MASK: tl.constexpr,
              EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, F16: tl.constexpr, F16_WORDS: tl.constexpr = 1,
              UNROLL: tl.constexpr = False, DEPTH: tl.constexpr = 2, EVICT_FIRST: tl.constexpr = False):
    """The GEMV's K loop -> fp32 [BM, BN, 1]. The next tile's loads are issued before this tile's math (a
    two-deep software pipeline: Triton does not pipeline loads that feed no dot), so each program keeps two tiles
    of weight bytes in flight; past the end it reloads the last tile (no mask needed) and drops it. F16_WORDS > 1:
    only the words are carried to the next iteration; the tile's scale and zero point load in the iteration that
    uses them (unused loads are dropped), so Triton may give them, and the per-row math after the K reduction, a
    layout of their own instead of converting them in every iteration (sm_90a: 155 instructions per warp and
    128 x 128 tile against 168 when they are carried too; past two rows per thread the carried ones went through
    shared memory twice per tile, these once). UNROLL: DEPTH tiles an iteration (2 or 3), each tile's words loaded
    into the registers the math before it has just freed, so nothing is copied between iterations and DEPTH - 1
    tiles are in flight during each tile's math (sm_90a, per tile and warp at DEPTH 2: int4 fp16 products 148 -> 140
    instructions (155 before its sums were kept per thread), fp8 fp32 FMAs 221 -> 184, fp8 fp16 products 105 -> 97;
    two rows without split-K spill a register in the loop, a plan no real shape gets; the MoE down GEMV's four-tile
    loop got longer, so the MoE kernels keep the one-tile loop). EVICT_FIRST: the words' L2 policy (_gemv_load)."""
    acc = tl.zeros((rows.shape[0], cols.shape[1], BK // 32 if INT4 and F16 and F16_WORDS == 4 else 1),
                   dtype=tl.float32)  # the chained int4 form's partial sums stay per thread until the end
    ALIGNED: tl.constexpr = F16_WORDS > 1
    s, z, codes = _gemv_load(w_ptr, s_ptr, z_ptr, cols, N, K, stride_wn, stride_sn, k_begin, GROUP, INT4, BK,
                             EVEN_N, EVEN_K, ALIGNED, F16, EVICT_FIRST)
    last = k_end - BK if EVEN_K else k_end - 1 - (k_end - 1 - k_begin) % BK
    if UNROLL:  # DEPTH 2: b is loaded at the top of each iteration; DEPTH 3: b is carried, c loaded at the top
        if DEPTH == 3:
            codes_b = _gemv_load(w_ptr, s_ptr, z_ptr, cols, N, K, stride_wn, stride_sn, tl.minimum(k_begin + BK, last),
                                 GROUP, INT4, BK, EVEN_N, EVEN_K, ALIGNED, F16, EVICT_FIRST)[2]
        for k0 in range(k_begin, k_end, DEPTH * BK):
            if DEPTH == 3:
                codes_c = _gemv_load(w_ptr, s_ptr, z_ptr, cols, N, K, stride_wn, stride_sn,
                                     tl.minimum(k0 + 2 * BK, last), GROUP, INT4, BK, EVEN_N, EVEN_K, ALIGNED, F16,
                                     EVICT_FIRST)[2]
            else:
                codes_b = _gemv_load(w_ptr, s_ptr, z_ptr, cols, N, K, stride_wn, stride_sn, tl.minimum(k0 + BK, last),
                                     GROUP, INT4, BK, EVEN_N, EVEN_K, ALIGNED, F16, EVICT_FIRST)[2]
            acc += _gemv_tile(x_ptr, w_ptr, s_ptr, z_ptr, rows, cols, M, N, K, stride_xm, stride_wn, stride_sn, k0,
                              codes, GROUP, INT4, BK, ROW_MASK, EVEN_N, EVEN_K, ALIGNED, F16, F16_WORDS)
            codes = _gemv_load(w_ptr, s_ptr, z_ptr, cols, N, K, stride_wn, stride_sn,
                               tl.minimum(k0 + DEPTH * BK, last), GROUP, INT4, BK, EVEN_N, EVEN_K, ALIGNED, F16,
                               EVICT_FIRST)[2]
            if k0 + BK < k_end:
                acc += _gemv_tile(x_ptr, w_ptr, s_ptr, z_ptr, rows, cols, M, N, K, stride_xm, stride_wn, stride_sn,
                                  k0 + BK, codes_b, GROUP, INT4, BK, ROW_MASK, EVEN_N, EVEN_K, ALIGNED, F16, F16_WORDS)
            if DEPTH == 3:
                codes_b = _gemv_load(w_ptr, s_ptr, z_ptr, cols, N, K, stride_wn, stride_sn,
                                     tl.minimum(k0 + 4 * BK, last), GROUP, INT4, BK, EVEN_N, EVEN_K, ALIGNED, F16,
                                     EVICT_FIRST)[2]
                if k0 + 2 * BK < k_end:
                    acc += _gemv_tile(x_ptr, w_ptr, s_ptr, z_ptr, rows, cols, M, N, K, stride_xm, stride_wn,
                                      stride_sn, k0 + 2 * BK, codes_c, GROUP, INT4, BK, ROW_MASK, EVEN_N, EVEN_K,
                                      ALIGNED, F16, F16_WORDS)
    else:
        for k0 in range(k_begin, k_end, BK):
            s_n, z_n, codes_n = _gemv_load(w_ptr, s_ptr, z_ptr, cols, N, K, stride_wn, stride_sn,
                                           tl.minimum(k0 + BK, last), GROUP, INT4, BK, EVEN_N, EVEN_K, ALIGNED, F16,
                                           EVICT_FIRST)
            if ALIGNED:
                s, z, _ = _gemv_load(w_ptr, s_ptr, z_ptr, cols, N, K, stride_wn, stride_sn, k0, GROUP, INT4, BK,
                                     EVEN_N, EVEN_K, True, F16)
            acc += _gemv_math(x_ptr, rows, M, K, stride_xm, k0, s, z, codes, INT4, BK, ROW_MASK, EVEN_K, F16,
                              F16_WORDS)
            s, z, codes = s_n, z_n, codes_n
    return tl.sum(acc, axis=2, keep_dims=True)


@triton.jit
def _split_sum(acc, ws_ptrs, ws_split_stride, count_ptr, tile, pid_k, mask, SPLIT: tl.constexpr):
    """Partial sums added in the launch (kernels/linear/triton.py's scheme): this program's fp32 partial acc goes to
    ws_ptrs + pid_k * ws_split_stride, then it bumps `tile`'s counter (acq_rel); the last of the tile's SPLIT
    programs to arrive adds the partials in split order (whichever program it is: deterministic) and sets the
    counter back to 0, so the next call and every CUDA-graph replay start clean. No program waits on another (no
    spin). -> (whether this program is the last, the total there; zeros elsewhere)."""
    tl.store(ws_ptrs + pid_k * ws_split_stride, acc, mask=mask)
    tl.debug_barrier()  # every thread's partial is stored before thread 0's release below publishes them
    last = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu") == SPLIT - 1
    total = tl.zeros(acc.shape, dtype=tl.float32)
    if last:  # the others' partials are visible
        for s in tl.static_range(SPLIT):  # fixed order, whichever program got here
            total += tl.load(ws_ptrs + s * ws_split_stride, mask=mask, other=0.0, cache_modifier=".cg")  # L2, not L1
        tl.store(count_ptr + tile, 0)  # every program of the tile has arrived: nobody else touches it now
    return last, total


@triton.jit
def _reduce_splits(acc, out_ptrs, ws_ptrs, ws_split_stride, count_ptr, tile, pid_k, mask, SPLIT: tl.constexpr):
    """Split-K in the launch (_split_sum): the last of an output tile's SPLIT programs stores the sum to out_ptrs
    in out's dtype."""
    last, total = _split_sum(acc, ws_ptrs, ws_split_stride, count_ptr, tile, pid_k, mask, SPLIT)
    if last:
        tl.store(out_ptrs, total.to(out_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _gemv_store(acc, out_ptr, ws_ptr, count_ptr, rows, cols, M, N, NW, stride_os, stride_om, tile, pid_k,
                BM: tl.constexpr, SPLIT: tl.constexpr, EVEN: tl.constexpr):
    """A program's sums acc [BM, BN, 1] for output columns `cols` (< N). SPLIT > 1: added in the launch
    (_reduce_splits; workspace [SPLIT, BM, NW], NW the output's columns, counter `tile`); else stored at out +
    pid_k * stride_os (the result, or without a workspace a partial that torch adds). EVEN: no mask needed."""
    if SPLIT > 1:
        # workspace strides from BM and NW only, nothing that changes with every call
        _reduce_splits(acc, out_ptr + rows.to(tl.int64) * stride_om + cols, ws_ptr + rows * NW + cols, BM * NW,
                       count_ptr, tile, pid_k, (rows < M) & (cols < N), SPLIT)
    else:
        dest = out_ptr + pid_k.to(tl.int64) * stride_os + rows.to(tl.int64) * stride_om + cols
        if EVEN:
            tl.store(dest, acc.to(out_ptr.dtype.element_ty))
        else:
            tl.store(dest, acc.to(out_ptr.dtype.element_ty), mask=(rows < M) & (cols < N))


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, count_ptr, M, N, K, stride_xm, stride_wn, stride_sn,
                 stride_os, stride_om, k_per_split, xs_ptr, t_ptr, N_TAIL, stride_xs, stride_tn,
                 GROUP: tl.constexpr, INT4: tl.constexpr, BM: tl.constexpr,
                 BN: tl.constexpr, BK: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
                 F16_FMA: tl.constexpr = False, F16_WORDS: tl.constexpr = 1, SPLIT: tl.constexpr = 1,
                 PDL: tl.constexpr = False, DEPTH: tl.constexpr = 2, EVICT_FIRST: tl.constexpr = False,
                 TAIL_BN: tl.constexpr = 0):
    """GEMV (variant 4): the BM rows of x (BM >= M) against BN output rows of W over one split of K, on CUDA
    cores: the weight tile goes from its wide loads straight into the FMAs (the dot variants pad a row to 16 and
    pass every tile through shared memory). EVEN_K: K is a multiple of BK. F16_FMA: packed fp16 products on
    plane_major_f16()'s activations (int4) or act_f16()'s (fp8) instead of fp32 FMAs. SPLIT > 1: the grid's SPLIT K
    ranges are added in this launch (_reduce_splits, workspace [SPLIT, BM, N + N_TAIL]); 1: each program stores its
    own sum at out + pid_k * stride_os (the result, or without a workspace a partial that torch adds).
    TAIL_BN > 0: N_TAIL more output columns, after W's N, from a dense weight t [N_TAIL, K] (bf16 / fp16 / fp32,
    the model dtype) times x's own rows xs (x may be a copy in another order and type): the programs past W's
    column tiles take TAIL_BN of its rows each, BK columns an iteration, over the same K splits (the GDN in_proj's
    b|a rows, which every published quantized checkpoint keeps unquantized, in the launch of its quantized qkv|z
    instead of two of their own). PDL: waits first (x, the workspace and counters are the previous kernels')."""
    wait_then_release(PDL)
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rows = tl.arange(0, BM)[:, None, None]
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    if TAIL_BN:
        if pid_n >= tl.cdiv(N, BN):
            cols = (pid_n - tl.cdiv(N, BN)) * TAIL_BN + tl.arange(0, TAIL_BN)[None, :, None]
            acc = _dense_acc(xs_ptr + rows.to(tl.int64) * stride_xs, t_ptr, cols, N_TAIL, stride_tn, k_begin, k_end,
                             BK, BM, rows < M, SUM_AFTER=True)
            _gemv_store(acc, out_ptr + N, ws_ptr + N, count_ptr, rows, cols, M, N_TAIL, N + N_TAIL, stride_os,
                        stride_om, pid_n, pid_k, BM, SPLIT, False)
        else:
            _gemv_program(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, count_ptr, rows, pid_n, pid_k, M, N, K,
                          N + N_TAIL, stride_xm, stride_wn, stride_sn, stride_os, stride_om, k_begin, k_end, GROUP,
                          INT4, BM, BN, BK, EVEN_N, EVEN_K, F16_FMA, F16_WORDS, SPLIT, DEPTH, EVICT_FIRST)
    else:
        _gemv_program(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, count_ptr, rows, pid_n, pid_k, M, N, K, N,
                      stride_xm, stride_wn, stride_sn, stride_os, stride_om, k_begin, k_end, GROUP, INT4, BM, BN, BK,
                      EVEN_N, EVEN_K, F16_FMA, F16_WORDS, SPLIT, DEPTH, EVICT_FIRST)


@triton.jit
def _gemv_program(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, count_ptr, rows, pid_n, pid_k, M, N, K, NW, stride_xm,
                  stride_wn, stride_sn, stride_os, stride_om, k_begin, k_end, GROUP: tl.constexpr, INT4: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
                  F16_FMA: tl.constexpr, F16_WORDS: tl.constexpr, SPLIT: tl.constexpr, DEPTH: tl.constexpr,
                  EVICT_FIRST: tl.constexpr):
    """One GEMV program's BN columns of W, column tile pid_n (out's row length NW)."""
    cols = pid_n * BN + tl.arange(0, BN)[None, :, None]
    acc = _gemv_acc(x_ptr, w_ptr, s_ptr, z_ptr, rows, cols, M, N, K, stride_xm, stride_wn, stride_sn, k_begin, k_end,
                    GROUP, INT4, BK, BM > 1, EVEN_N, EVEN_K, F16_FMA, F16_WORDS, UNROLL=True, DEPTH=DEPTH,
                    EVICT_FIRST=EVICT_FIRST)
    _gemv_store(acc, out_ptr, ws_ptr, count_ptr, rows, cols, M, N, NW, stride_os, stride_om, pid_n, pid_k, BM, SPLIT,
                EVEN_N and BM == 1)


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, count_ptr, M, N, K, stride_xm, stride_wn, stride_sn,
                 stride_os, stride_om, k_per_split, GROUP: tl.constexpr, INT4: tl.constexpr, IEEE: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, UNPACK: tl.constexpr = 0,
                 ACT_FP8: tl.constexpr = False, SPLIT: tl.constexpr = 1, PDL: tl.constexpr = False,
                 EVEN: tl.constexpr = False):
    """One [BM, BN] output tile over the K range of split pid_k. SPLIT > 1: the grid's SPLIT K ranges are added in
    this launch (_reduce_splits); 1: each program stores its own sum at out + pid_k * stride_os (the result, or
    without a workspace a partial that torch adds). PDL: waits first, as the GEMV."""
    wait_then_release(PDL)
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    if UNPACK == 3:
        acc = _acc_scale_after(x_ptr, w_ptr, s_ptr, z_ptr, offs_m, offs_n, M, N, K, stride_xm, stride_wn, stride_sn,
                               k_begin, k_end, GROUP, INT4, IEEE, BM, BN, BK, ACT_FP8)
    elif INT4 and UNPACK == 2:
        acc = _acc_int4_planes(x_ptr, w_ptr, s_ptr, z_ptr, offs_m, offs_n, M, N, K, stride_xm, stride_wn, stride_sn,
                               k_begin, k_end, GROUP, IEEE, BM, BN, BK)
    else:
        acc = _acc_dequant(x_ptr, w_ptr, s_ptr, z_ptr, offs_m, offs_n, M, N, K, stride_xm, stride_wn, stride_sn,
                           k_begin, k_end, GROUP, INT4, IEEE, BM, BN, BK, EVEN)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT > 1:
        # workspace [SPLIT, M padded to the grid's M tiles, N] fp32: strides from the grid, BM and N, never from M
        # (no new argument that changes with every call); one counter per output tile
        rows_pad = tl.num_programs(0) * BM
        _reduce_splits(acc, out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :],
                       ws_ptr + offs_m[:, None] * N + offs_n[None, :], rows_pad * N, count_ptr,
                       pid_m * tl.num_programs(1) + pid_n, pid_k, mask, SPLIT)
    else:
        rows = pid_k.to(tl.int64) * stride_os + offs_m.to(tl.int64) * stride_om
        tl.store(out_ptr + rows[:, None] + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def _k_tile(group: int, k: int, want: int) -> int:
    """A K tile that divides the group (one scale per row and tile), at most `want`, at least 16."""
    bk = want
    while bk > 16 and group < k and group % bk:
        bk //= 2
    if group < k and group % bk:
        raise ValueError(f"group size {group} is not a multiple of 16")
    return bk


def _plan(m: int, n: int, k: int, group: int, device: torch.device, int4: bool = False, act_fp8: bool = False,
          sm90: bool = False) -> tuple[int, ...]:
    """(BM, BN, BK, split[, num_warps, num_stages]) for an [m, k] x [k, n] call: one M tile where the rows allow (the
    weight is read once per M tile), and split-K until about two waves of programs run (the N = hidden-size
    projections have few N tiles). sm90 (compiled, 16-bit activations, sm_90+: _lop3_ok): the H200 sweep's tiles
    (_plan_sm90)."""
    bm = 16 if m <= 16 else 32 if m <= 32 else 64
    sms = num_sms(device) if device.type == "cuda" else 4
    if sm90 and not act_fp8:
        return _plan_sm90(m, n, k, group, bm, sms, int4)
    bk = _k_tile(group, k, 128 if m <= 32 or int4 or act_fp8 else 64)
    bn = 64 if m <= 32 else 128
    return bm, bn, bk, _split(k, bk, triton.cdiv(n, bn) * triton.cdiv(m, bm), sms)


def _split(k: int, bk: int, tiles: int, sms: int) -> int:
    """Split-K ways: about two waves of programs over the SMs, at most one K tile each."""
    return max(1, min(triton.cdiv(k, bk), (2 * sms) // max(tiles, 1)))


def _plan_sm90(m: int, n: int, k: int, group: int, bm: int, sms: int, int4: bool) -> tuple[int, ...]:
    """The tl.dot tiles (UNPACK 0) the H200 sweep picked (bench_quant_kernels.py --sweep --rows 16 64, RESULTS.md
    2026-12-05), as one rule: 3 stages; BN 64 where 128-column N tiles alone fill two waves (27B gate_up), else BN
    128 with split-K; up to 32 rows, int4 with a split of 4 or more (27B down) on 8 warps. Past 32 rows int4's wide
    shapes also take BK 64, its others BK 128; fp8 keeps BN 128 and BK 64 (the plan before, the sweep's pick for 27B
    gate_up and 35B in_proj) except where split-K runs 4 or more ways (27B down: BK 128). Kernel-only at 16 rows,
    against the tiles before (int4: 4 warps, 5 stages, BN 128 past 8 rows; fp8: BN 64): int4 27B gate_up 101.6 ->
    74.0 us, 27B down 66.1 -> 39.5, 35B in_proj 15.2 -> 13.3; fp8 27B down 36.5 -> 30.1, 35B in_proj 11.7 -> 10.7.
    At 64 rows int4 27B gate_up 183.6 -> 138.3, fp8 27B down 57.6 -> 52.0. Where the rule is not the sweep's pick it
    gives the tiles before, within 5% of the pick (fp8 27B gate_up at 16 rows 69.4 against 67.1; int4 27B down and
    35B in_proj at 64 rows 73.3 / 23.2 against 72.1 / 22.1). (The 2026-12-03 sweep's picks for UNPACK 3 lost in
    the whole-model step; these are for UNPACK 0 and not yet timed in it.)"""
    m_tiles = triton.cdiv(m, bm)
    if m > 32 and not int4:
        bk = _k_tile(group, k, 64)
        if _split(k, bk, triton.cdiv(n, 128) * m_tiles, sms) >= 4:
            bk = _k_tile(group, k, 128)
        return bm, 128, bk, _split(k, bk, triton.cdiv(n, 128) * m_tiles, sms), 4, 3
    wide = triton.cdiv(n, 128) * m_tiles >= 2 * sms
    bn = 64 if wide else 128
    bk = _k_tile(group, k, 64 if m > 32 and wide else 128)
    split = _split(k, bk, triton.cdiv(n, bn) * m_tiles, sms)
    if m > 32:
        return (bm, bn, bk, split, 4, 3) if wide else (bm, bn, bk, split)
    return bm, bn, bk, split, 8 if int4 and split >= 4 else 4, 3


def _lop3_ok(x: torch.Tensor) -> bool:
    """UNPACK 3's int4 planes can run: compiled (not the interpreter), 16-bit activations, and sm_90+ (the PTX uses
    sub.bf16x2)."""
    return (not _INTERPRET and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
            and capability(x.device)[0] >= 9)


def _launch(num_warps: int | None = None, num_stages: int | None = None) -> dict[str, int]:
    """Triton launch options given by a plan (none: Triton's defaults)."""
    return {k: v for k, v in (("num_warps", num_warps), ("num_stages", num_stages)) if v is not None}


# int4 past the GEMV's rows (GEMV_F16_MAX_ROWS with bf16 activations) dequantizes each tile into column order and
# makes one dot of K = BK (UNPACK 0, _int4_in_order: each packed word loaded once), not UNPACK 3's scale-after-dot nor
# UNPACK 2's eight K = BK/8 dots.
# Timed on the H200 (bench_quant_kernels.py --rows 2 16 64, RESULTS.md 2026-12-04, after 3479cbf), u0 against u3 (the
# previous default up to 32 rows, same tiles): 27B gate_up 100 / 100 us at 2 rows, 118 / 149 at 16, 193 / 792 at 64; 27B
# down 52 / 71 at 16, 81 / 327 at 64; never slower. The 27B int4 decode step at batch 64 went from 98.8 to 32.0 ms
# (bench_quant.py, same call, with u0 past 32 rows only).

# Rows up to which quant_gemm runs the CUDA-core GEMV (variant 4) by default: GEMV_MAX_ROWS for fp8 (fp16 products with
# bf16 activations, GEMV_FP8_F16; fp32 FMAs otherwise) and int4 with fp16 activations, GEMV_F16_MAX_ROWS for the int4
# GEMV with fp16 products (bf16 activations). At 2 rows (RESULTS.md 2026-12-04, H200, after 3479cbf) the fp16-product
# GEMV beat every tensor-core variant on every shape timed (27B gate_up 48.7 us against u0's 101, 35B in_proj 8.4
# against 19.4), while the fp32-FMA GEMVs spilled (27B gate_up: fp8 700 us against u0's 66, int4 8.5 ms).
GEMV_MAX_ROWS = 1
GEMV_F16_MAX_ROWS = 2
GEMV_SWEEP_ROWS = 8  # the most rows an explicit unpack=4 takes (benchmarks): its 3-D tiles grow with the rows
# The int4 GEMVs (quant_gemm's and the MoE's gate|up) with fp16 products (F16_FMA): by the sm_90a SASS 368
# instructions per 128-row tile against 496 (benchmarks/compile_check.py); on the H200 the 27B int4 decode step at
# batch 1 took 9.23 ms against 11.2 with fp32 FMAs (bench_quant.py --gemv-variants fp32 f16, RESULTS.md
# 2026-12-03), so it is the default; benchmarks switch it to compare. Only for bf16 activations (and the fused
# MoE's gate|up GEMVs; its down GEMVs run fp32 FMAs on the fp32 SiLU output the gate|up kernel stores): its error,
# about 3e-4 of the output's largest value (five fp16 roundings per word against the reference's one per weight), is
# a fraction of bf16's but as large as fp16's, past the tests' twice-the-reference for fp16 and fp32.
GEMV_F16 = True
# Words per fp16 accumulator in the F16_FMA GEMVs (F16_WORDS; 1, 2 or 4, at most BK/8): 4 chains a row's four
# adjacent words through one fp16x2 accumulator in one asm block (_chain_f16_ptx), loads them as 128-bit vectors and
# loads each tile's scale and zero point in the iteration that uses them (_gemv_acc); by the sm_90a SASS
# (benchmarks/compile_check.py) its K loop issues 155 instructions per warp and 128 x 128 tile against 222 with one
# word per accumulator (1, the F16_FMA of 4ac49b6): 2.42 instead of 3.47 per weight (BN 256 and 8 warps: 1.80, with
# one shared-memory round trip per tile; not yet timed). Its fp16 sums span 16 products per half instead of 4 (the
# error bound: tests/kernels/test_quant_kernels.py, gemv_f16). On the H200 (RESULTS.md, 2026-12-04) the dense GEMV
# kernels took 45.8 / 21.9 / 17.4 us against 48.3 / 24.9 / 22.0 with one word (27B gate_up / down / in_proj, batch
# 1) and the 27B int4 step 8.81 ms against 9.26; benchmarks set it to 1 to compare (--gemv-variants).
GEMV_F16_WORDS = 4
# The MoE's per-(token, expert) gate|up GEMV keeps one word: with four the 35B-A3B int4 step (experts int4) went
# 4.36 -> 4.84 ms in the same run (the per-pair kernel before the fused one; not re-measured on it). Tests set it to
# 4 as well, so both stay correct.
MOE_PAIR_F16_WORDS = 1
# The fp8 GEMV with fp16 products (_chain_fp8_f16_ptx, act_f16()) instead of fp32 FMAs, the default since timed on
# the H200 (bench_quant.py --fp8-gemv fp32 f16, RESULTS.md 2026-12-05, one call): the 27B fp8 decode step at batch 1
# 11.47 -> 9.58 ms (1.75x -> 1.46x its floor), 35B-A3B 2.57 -> 2.49; kernel-only 27B gate_up / down / in_proj 64.5 /
# 35.5 / 32.7 -> 52.5 / 30.8 / 28.1 us. Its error: fp16 products of the exact e4m3 weights and bf16 activations (an
# 11-bit rounding where the product has 12), summed in fp16 over 8 products per half, all else in fp32; the
# reference rounds each dequantized weight to bf16 (8 bits). Benchmarks set it off to compare (--fp8-gemv fp32).
GEMV_FP8_F16 = True
# quant_gemm's GEMV pipeline: tiles per unrolled K iteration (2 or 3: DEPTH - 1 tiles of words in flight during each
# tile's math, _gemv_acc) and whether the words load with the evict-first L2 policy. None: _gemv_pipeline's rule;
# benchmarks set them to compare (bench_quant_kernels.py --gemv-pipeline).
GEMV_DEPTH: int | None = None
GEMV_EVICT_FIRST: bool | None = None
# DEPTH per card where the rule's two-tile loop lost on that card (bench_quant_kernels.py --gemv-pipeline, RESULTS.md
# 2026-12-06): {card: {(N, K) of a one-row int4 call: DEPTH}}. H100: 27B down 24.7 -> 22.4 µs with three tiles
# (on the H200 they lost, 18.1 -> 18.5: the rule stays the default).
GEMV_DEPTH_TUNED: dict[str, dict[tuple[int, int], int]] = {"NVIDIA H100 80GB HBM3": {(5120, 17408): 3}}


def _f16_words(bk: int, words: int | None = None) -> int:
    """F16_WORDS for a K tile of bk columns: `words` (default GEMV_F16_WORDS), at most the tile's bk / 8 words."""
    return max(1, min(GEMV_F16_WORDS if words is None else words, bk // 8))


def _gemv_plan(m: int, n: int, k: int, group: int, device: torch.device, int4: bool) -> tuple[int, ...]:
    """(BM, BN, BK, split, num_warps, num_stages) for the GEMV: all rows in one program (BM the next power of two),
    a K tile of 128 that divides the group, 8 warps (with 4 Triton picks 3-D layouts for these tiles that spill:
    benchmarks/compile_check.py), and split-K until about four programs per SM run and none loops over more than
    about ten K tiles: the H200 sweep's best tiles (bench_quant_kernels.py --sweep --rows 1, RESULTS.md) split the
    27B gate_up (40 K tiles, 272-544 N tiles) 4 ways although the N tiles alone fill the GPU."""
    bm = triton.next_power_of_2(m)
    bk = _k_tile(group, k, 128)
    bn = 128 if int4 else 64
    sms = num_sms(device) if device.type == "cuda" else 4
    k_tiles = triton.cdiv(k, bk)
    split = max(1, min(k_tiles, max((4 * sms) // triton.cdiv(n, bn), k_tiles // 10)))
    return bm, bn, bk, split, 8, 3


def _gemv_pipeline(m: int, n: int, bn: int, int4: bool, sms: int, k: int = 0, card: str = "") -> tuple[int, bool]:
    """(DEPTH, EVICT_FIRST) for a GEMV call (GEMV_DEPTH / GEMV_EVICT_FIRST where set). Shapes whose N tiles alone
    fill two waves (27B gate_up) stream their words evict-first, and at one int4 row three tiles an iteration; the
    rest keep the two-tile loop. H200, kernel only (bench_quant_kernels.py --gemv-pipeline, RESULTS.md 2026-12-06):
    27B gate_up int4 39.4 -> 33.6 us at 1 row, 43.7 -> 39.8 at 2 (evict-first only: three tiles 47.9), fp8 50.9 ->
    48.3 and 64.3 -> 59.8; on the narrower shapes three tiles lost or tied at one row (35B in_proj int4 6.5 -> 7.0),
    evict-first lost on int4 (27B in_proj 15.0 -> 18.3) and, on fp8, gained 1-4% on three shapes (27B down 30.4 ->
    29.1: less than the same kernel's two timings in that call differ, 27B down int4 18.1 / 16.6) and lost 20% on
    the fourth (35B in_proj 7.7 -> 9.3)."""
    if GEMV_DEPTH not in (None, 2, 3):  # _gemv_acc has no other loop: it would run two tiles under another label
        raise ValueError(f"GEMV_DEPTH must be 2 or 3 (tiles per K iteration) or None (the rule), got {GEMV_DEPTH!r}")
    wide = triton.cdiv(n, bn) >= 2 * sms
    tuned = GEMV_DEPTH_TUNED.get(card, {}).get((n, k)) if int4 and m == 1 else None
    depth = GEMV_DEPTH if GEMV_DEPTH is not None else tuned or (3 if wide and int4 and m == 1 else 2)
    return depth, GEMV_EVICT_FIRST if GEMV_EVICT_FIRST is not None else wide


def _fp8_f16_ok(x: torch.Tensor, bk: int, *weights: torch.Tensor) -> bool:
    """The fp8 GEMV can take fp16 products (GEMV_FP8_F16): bf16 activations, and weights ([N, K], or experts
    [E, N, K]) whose rows (and experts) are whole 16-byte vectors (it loads four e4m3 a word) on a 16-byte aligned
    base."""
    if not (GEMV_FP8_F16 and x.dtype == torch.bfloat16 and bk >= 16):
        return False
    if x.is_cuda and not _INTERPRET and capability(x.device) < (8, 9):  # cvt.rn.f16x2.e4m3x2 needs sm_89
        return False
    return all(w.shape[-1] % 4 == 0 and w.data_ptr() % 16 == 0 and all(st % 16 == 0 for st in w.stride()[:-1])
               for w in weights)


def _gemv_default(m: int, int4: bool, dtype: torch.dtype, act_fp8: bool) -> bool:
    """Whether quant_gemm's default for m rows is the GEMV (GEMV_MAX_ROWS, GEMV_F16_MAX_ROWS). int4 with fp32
    activations never: the GEMV's 16 sum f x - (16 + z) sum x cancels terms of size (16 + z) |sum x|, about 3x the fp32
    error of summing (q - z) x directly."""
    if act_fp8 or int4 and dtype == torch.float32:
        return False
    return m <= (GEMV_F16_MAX_ROWS if int4 and GEMV_F16 and dtype == torch.bfloat16 else GEMV_MAX_ROWS)


_warned: set[tuple[int, int, int]] = set()  # shapes whose split-K call fell back to torch's sum (logged once)

# A dense tail's tile in the GEMV: GEMV_TAIL_BN rows by the GEMV's K tile, its products summed per thread until the
# loop ends. 16 x 128 keeps the kernel's registers where they were (sm_90a,
# benchmarks/compile_check.py rows of the GEMV: int4 48 / 64 at DEPTH 2 / 3, fp8 40 / 48; 16 x 256 takes 64 / 64 and
# 64 / 61) and was the fastest tile timed (H100, RESULTS.md 2026-12-06, one row, µs a call): 27B in_proj int4 alone
# 17.7, with b|a apart (cuBLAS and its split-K reduce) 23.5, with the tail 21.3 (8 x 256: 23.2, 16 x 256: 22.4);
# 35B-A3B int4 6.7 / 11.2 / 7.6; fp8 the tail's time is within the spread (27B 36.9 / 43.2 / 36.9). The tail's
# programs take the grid's last column indices: with the first ones 27B int4 took 22.4 against 21.1, 35B-A3B 7.3
# against 7.5, and the whole steps did not move.
GEMV_TAIL_BN = 16


def _check_tail(tail: torch.Tensor, x: torch.Tensor) -> int:
    """The tail's rows, after checking that the GEMV can read it: [N_TAIL, K] in x's dtype, unit column stride."""
    if tail.dim() != 2 or tail.shape[1] != x.shape[1] or tail.dtype != x.dtype or tail.stride(1) != 1 or \
            tail.device != x.device:
        raise ValueError(f"a dense tail must be [N_TAIL, K = {x.shape[1]}] in the activations' dtype ({x.dtype}) "
                         f"on {x.device} with unit column stride; got {list(tail.shape)} {tail.dtype} on "
                         f"{tail.device} with strides {tail.stride()}")
    return tail.shape[0]


def quant_gemm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, zeros: torch.Tensor | None,
               group: int, out: torch.Tensor | None = None, tiles: tuple[int, ...] | None = None,
               unpack: int | None = None, act_fp8: bool = False, perm: torch.Tensor | None = None,
               tail: torch.Tensor | None = None, silu_gate: bool = False) -> torch.Tensor:
    """x[:, perm] [M, K] (contiguous rows; perm: act-order int4, else None) times the int4 (zeros given) or fp8
    weight -> [M, N] in x.dtype (the gather done by the fp16-product GEMV's activation copy, else first). `out`:
    where the result goes (tests pass a NaN-filled one; required when x holds fp8 codes); `tiles`: (BM, BN, BK, split[,
    num_warps, num_stages]) instead of the plan; `unpack`: the kernel variant (benchmarks; default: the fastest one
    the call allows: 4, the CUDA-core GEMV, up to GEMV_MAX_ROWS rows (_gemv_default), else 0,
    dequantize-then-dot (the tile dequantized in fp32 and rounded as the reference does; faster than UNPACK 3's
    scale-after-dot and int4's UNPACK 2, which stay for the benchmark)); `act_fp8`: W8A8, each x tile quantized to
    e4m3 per row and ACT_GROUP columns as it is loaded (the codes and scales of ref.quantize_fp8_act). `tail`: a
    dense weight [N_TAIL, K] in x's dtype whose rows run in the GEMV's launch (_gemv_kernel's TAIL_BN): the result
    is [M, N + N_TAIL], x times the quantized weight, then x (never permuted) times the tail. `silu_gate`: x is
    [M, 2K] = [gate | up] and the product is of silu(gate) * up (silu_and_mul's values): computed by the
    fp16-product GEMVs' activation copy, else by silu_and_mul first."""
    x = x if x.stride(-1) == 1 else x.contiguous()  # the kernels step through a row with unit stride
    m, k = x.shape
    if silu_gate:
        if k % 2 or tail is not None:
            raise ValueError(f"silu_gate takes [gate | up] rows (an even width, got {k}) and no dense tail")
        k //= 2
    n = weight.shape[0]
    n_tail = _check_tail(tail, x) if tail is not None else 0
    int4 = zeros is not None
    group = min(group, k) if group else k
    sm90 = _lop3_ok(x)  # compiled, 16-bit activations, sm_90+: UNPACK 3 can run and the sm_90 tiles apply
    lop3 = int4 and sm90
    if unpack is None and _gemv_default(m, int4, x.dtype, act_fp8):
        unpack = 4
    if unpack == 4:
        if act_fp8:
            raise ValueError("the GEMV (unpack 4) takes 16-bit or fp32 activations, not fp8 ones")
        if m > GEMV_SWEEP_ROWS:
            raise ValueError(f"the GEMV (unpack 4) holds every row in one tile: at most {GEMV_SWEEP_ROWS} rows, "
                             f"got {m}; leave unpack unset for larger calls")
        bm, bn, bk, split, *launch = tiles or _gemv_plan(m, n, k, group, x.device, int4)
        if bm < m:
            raise ValueError(f"the GEMV runs all rows in one program: BM {bm} must be at least M = {m}")
    else:
        bm, bn, bk, split, *launch = tiles or _plan(m, n, k, group, x.device, int4, act_fp8, sm90)
    if act_fp8:
        if int4 or bk != ref.ACT_GROUP:
            raise ValueError(f"fp8 activations need fp8 weights and K tiles of {ref.ACT_GROUP} columns; this call has "
                             f"{'int4' if int4 else 'fp8'} weights in groups of {group} (K tile {bk})")
        unpack = 3
    elif unpack is None:
        unpack = 0  # int4 too: see the note above GEMV_MAX_ROWS
    elif unpack not in (0, 2, 3, 4):
        raise ValueError(f"unpack must be 0, 2, 3 or 4 (kernel variants), got {unpack}")
    elif unpack == 3 and (x.dtype not in (torch.bfloat16, torch.float16) or int4 and not lop3):
        raise ValueError(f"UNPACK 3 needs 16-bit activations (and, for int4, an sm_90+ GPU), got {x.dtype}")
    elif unpack == 2 and bk < 128 and not _INTERPRET:
        unpack = 0  # the nibble-plane dots need K = BK / 8 >= 16 on tensor cores
    if group < k and group % bk:
        raise ValueError(f"K tile {bk} must divide the group size {group}")
    if tail is not None and unpack != 4:
        raise ValueError(f"a dense tail runs in the GEMV's launch only (unpack 4, up to {GEMV_F16_MAX_ROWS} rows for "
                         f"int4 with bf16 activations, {GEMV_MAX_ROWS} otherwise); this call runs unpack {unpack}: "
                         "run the tail as a linear of its own")
    steps = triton.cdiv(k, bk)
    k_per_split = triton.cdiv(steps, split) * bk
    split = triton.cdiv(k, k_per_split)
    n_all = n + n_tail
    if out is None:
        out = torch.empty(m, n_all, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    m_tiles = 1 if unpack == 4 else triton.cdiv(m, bm)  # (the GEMV holds every row in one tile)
    n_tiles = triton.cdiv(n, bn) + (triton.cdiv(n_tail, GEMV_TAIL_BN) if n_tail else 0)
    dest = ws = counts = out  # the kernel stores the result; workspace and counters unused
    reduce = 1  # the kernel's SPLIT: K ranges it adds itself
    if split > 1:
        scratch = _scratch(x.device, split * m_tiles * bm * n_all, m_tiles * n_tiles)
        if scratch is not None:
            (ws, counts), reduce = scratch, split
        else:  # first call of this size inside a capture: the partials go to a temporary, torch adds them
            if (m, n, k) not in _warned:
                _warned.add((m, n, k))
                log.warning("split-K quantized GEMM [%d, %d] x [%d, %d]^T first called inside a CUDA-graph capture: "
                            "torch adds its partial sums (two more launches; warm up eagerly first)", m, k, n, k)
            dest = torch.empty(split, m, n_all, dtype=torch.float32, device=x.device)
    f16 = unpack == 4 and (GEMV_F16 if int4 else _fp8_f16_ok(x, bk, weight)) and x.dtype == torch.bfloat16
    if silu_gate and not f16:  # only the fp16-product GEMVs' copies compute it
        x, silu_gate = silu_and_mul(x=x), False
    xs = x  # the tail's activations: x's own rows, in column order
    if unpack == 4 and int4 and f16:
        xk = plane_major_f16(x, bk, perm, silu=silu_gate)
    else:
        x = x if perm is None else x.index_select(-1, perm)
        if unpack == 4 and int4:
            xk = plane_major(x, bk)
        else:
            xk = act_f16(x, bk, silu=silu_gate) if f16 else x
    common = (xk, weight, scale, zeros if int4 else scale, dest, ws, counts, m, n, k, xk.stride(0), weight.stride(0),
              scale.stride(0), dest.stride(0) if dest is not out else 0, dest.stride(-2), k_per_split)
    consts = dict(GROUP=group if group < k else k + bk, INT4=int4, BM=bm, BN=bn, BK=bk, SPLIT=reduce,
                  **_launch(*launch), **pdl_launch(x.device))
    if unpack == 4:
        depth, evict_first = _gemv_pipeline(m, n, bn, int4, num_sms(x.device) if x.is_cuda else 4, k,
                                            device_name(x.device) if x.is_cuda else "")
        t = tail if tail is not None else weight  # (unread without a tail)
        _gemv_kernel[(n_tiles, split)](*common, xs, t, n_tail, xs.stride(0), t.stride(0), EVEN_N=n % bn == 0,
                                       EVEN_K=k % bk == 0, F16_FMA=f16, F16_WORDS=_f16_words(bk) if f16 else 1,
                                       DEPTH=depth, EVICT_FIRST=evict_first, TAIL_BN=GEMV_TAIL_BN if n_tail else 0,
                                       **consts)
    else:
        _gemm_kernel[(m_tiles, triton.cdiv(n, bn), split)](
            *common, IEEE=x.dtype == torch.float32 or _INTERPRET, UNPACK=unpack, ACT_FP8=act_fp8,
            EVEN=n % bn == 0 and k % bk == 0, **consts)
    if dest is not out:
        torch.sum(dest, dim=0, out=out) if out.dtype == torch.float32 else out.copy_(dest.sum(dim=0))
    return out


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_wn, stride_sn, stride_on, GROUP: tl.constexpr,
                    INT4: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN: tl.constexpr = False):
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    k0 = pid_k * BK
    offs_k = k0 + tl.arange(0, BK)
    w = _dequant_tile(w_ptr, s_ptr, z_ptr, k0, offs_n, N, K, stride_wn, stride_sn, GROUP, INT4, BK, EVEN)
    dest = out_ptr + offs_n[:, None].to(tl.int64) * stride_on + offs_k[None, :]
    if EVEN:
        tl.store(dest, w.to(out_ptr.dtype.element_ty))
    else:
        tl.store(dest, w.to(out_ptr.dtype.element_ty), mask=(offs_n[:, None] < N) & (offs_k[None, :] < K))


def dequantize(weight: torch.Tensor, scale: torch.Tensor, zeros: torch.Tensor | None, group: int, k: int,
               dtype: torch.dtype) -> torch.Tensor:
    """The int4 (zeros given) or fp8 weight [..., N, *] as a dense [..., N, k] tensor of `dtype` (one pass)."""
    lead = weight.shape[:-1]
    w2, s2 = weight.reshape(-1, weight.shape[-1]), scale.reshape(-1, scale.shape[-1])
    z2 = zeros.reshape(-1, zeros.shape[-1]) if zeros is not None else s2
    n = w2.shape[0]
    group = min(group, k) if group else k
    bn, bk = 64, _k_tile(group, k, 64)
    out = torch.empty(n, k, dtype=dtype, device=weight.device)
    _dequant_kernel[(triton.cdiv(n, bn), triton.cdiv(k, bk))](
        w2, s2, z2, out, n, k, w2.stride(0), s2.stride(0), out.stride(0),
        GROUP=group if group < k else k + bk, INT4=zeros is not None, BN=bn, BK=bk, EVEN=n % bn == 0 and k % bk == 0)
    return out.view(*lead, k)


# Rows up to which the fused dequantize-and-GEMM kernel runs; past it (prefill) the weight is dequantized once into
# a temporary in the activation dtype and torch's GEMM runs at the bf16 rate (the extra pass costs ~3 bytes per
# weight, a few percent of an 8k-token GEMM).
FUSED_MAX_ROWS = 256


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 and x2.stride(0) == x2.shape[-1] else x2.contiguous()


def int4_linear(*, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group_size: int, perm: torch.Tensor | None = None, silu_gate: bool = False) -> torch.Tensor:
    x2 = _rows(x)
    if x2.shape[0] > FUSED_MAX_ROWS:
        x = silu_and_mul(x=x) if silu_gate else x
        x = x if perm is None else x.index_select(-1, perm)
        return torch.nn.functional.linear(x, dequantize(qweight, scales, zeros, group_size, x.shape[-1], x.dtype))
    y = quant_gemm(x2, qweight, scales, zeros, group_size, perm=perm, silu_gate=silu_gate)
    return y.view(*x.shape[:-1], qweight.shape[0])


# (BM, BN, BK, split, num_warps, num_stages) of W8A8 calls past FUSED_MAX_ROWS rows (prefill): the usual Hopper fp8
# GEMM tile (234 registers, no spills for sm_90a; not yet timed here).
W8A8_PREFILL_TILES = (64, 128, ref.ACT_GROUP, 1, 4, 3)


def fp8_linear(*, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block_k: int,
               act_fp8: bool = False, silu_gate: bool = False) -> torch.Tensor:
    x2 = _rows(x)
    if act_fp8:
        tiles = W8A8_PREFILL_TILES if x2.shape[0] > FUSED_MAX_ROWS else None
        y = quant_gemm(x2, weight, scale, None, block_k, tiles=tiles, act_fp8=True, silu_gate=silu_gate)
        return y.view(*x.shape[:-1], weight.shape[0])
    if x2.shape[0] > FUSED_MAX_ROWS:
        x = silu_and_mul(x=x) if silu_gate else x
        return torch.nn.functional.linear(x, dequantize(weight, scale, None, block_k, x.shape[-1], x.dtype))
    y = quant_gemm(x2, weight, scale, None, block_k, silu_gate=silu_gate)
    return y.view(*x.shape[:-1], weight.shape[0])


def _with_tail(x: torch.Tensor, n: int, gemv: bool, fused, apart) -> tuple[torch.Tensor, torch.Tensor]:
    """(x W^T, x tail^T) as column views of one GEMV launch's [.., N + N_TAIL] output where the call runs the GEMV
    (fused(x2) with the rows of x), else apart() (two calls)."""
    if not gemv:
        return apart()
    y = fused(_rows(x))
    y = y.view(*x.shape[:-1], y.shape[-1])
    return y[..., :n], y[..., n:]


def int4_linear_tail(*, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     group_size: int, tail: torch.Tensor, perm: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    m = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return _with_tail(
        x, qweight.shape[0], _gemv_default(m, True, x.dtype, False),
        lambda x2: quant_gemm(x2, qweight, scales, zeros, group_size, perm=perm, tail=tail),
        lambda: (int4_linear(x=x, qweight=qweight, scales=scales, zeros=zeros, group_size=group_size, perm=perm),
                 dense_linear(x=x, weight=tail)))


def fp8_linear_tail(*, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block_k: int, tail: torch.Tensor,
                    act_fp8: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    m = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return _with_tail(
        x, weight.shape[0], _gemv_default(m, False, x.dtype, act_fp8),
        lambda x2: quant_gemm(x2, weight, scale, None, block_k, tail=tail),
        lambda: (fp8_linear(x=x, weight=weight, scale=scale, block_k=block_k, act_fp8=act_fp8),
                 dense_linear(x=x, weight=tail)))


# ---- MoE ------------------------------------------------------------------------------------------------------------

# The dense shared expert's K tile in the per-pair MoE kernels: 64 rows x 64 columns of bf16 is 8 KB a tile, twice
# the int4 experts' (64 x 128 nibbles). sm_90a, 35B-A3B's int4 gate|up kernel (4 warps): 72 registers with it, 52
# without; the K loop alone takes 66 at 64 columns and 149 at 128, which would cut the kernel's occupancy for every
# pair, not only the shared expert's.
DENSE_BK = tl.constexpr(64)


@triton.jit
def _dense_acc(x_rows, w_ptr, cols, N, stride_wn, k_begin, k_end, BK: tl.constexpr, R: tl.constexpr = 1,
               row_ok=None, SUM_AFTER: tl.constexpr = False):
    """fp32 [R, BN, 1]: rows `cols` ([1, BN, 1]; masked from N) of a dense weight (bf16 / fp16 / fp32, unit column
    stride) times the activation rows x_rows (one row's pointer, or R rows' [R, 1, 1] with row_ok masking them)
    over columns [k_begin, k_end), both widened to fp32. The next tile's loads go out before this tile's math
    (Triton pipelines no loads that feed no dot); past the end they are masked off. SUM_AFTER: the products add up
    per thread ([R, BN, BK] registers) and cross threads once after the loop, not in every iteration."""
    acc = tl.zeros((R, cols.shape[1], BK if SUM_AFTER else 1), dtype=tl.float32)
    rows = w_ptr + cols.to(tl.int64) * stride_wn
    k = k_begin + tl.arange(0, BK)[None, None, :]
    x = tl.load(x_rows + k, mask=(k < k_end) if row_ok is None else (k < k_end) & row_ok, other=0.0)
    w = tl.load(rows + k, mask=(cols < N) & (k < k_end), other=0.0)
    for k0 in range(k_begin, k_end, BK):
        k_next = k + BK
        x_next = tl.load(x_rows + k_next, mask=(k_next < k_end) if row_ok is None else (k_next < k_end) & row_ok,
                         other=0.0)
        w_next = tl.load(rows + k_next, mask=(cols < N) & (k_next < k_end), other=0.0)
        if SUM_AFTER:
            acc += w.to(tl.float32) * x.to(tl.float32)
        else:
            acc += tl.sum(w.to(tl.float32) * x.to(tl.float32), axis=2, keep_dims=True)
        k, x, w = k_next, x_next, w_next
    return tl.sum(acc, axis=2, keep_dims=True) if SUM_AFTER else acc


@triton.jit
def _store_act(acc, act_ptr, p, n, stride_act, ACT_W, BN: tl.constexpr, ACT_BK: tl.constexpr, INT4: tl.constexpr,
               natural=False):
    """silu(gate) * up of the interleaved gate/up sums acc [1, BN, 1] into act row p, columns n [BN/2]. int4: stored
    plane-major by tiles of ACT_BK columns (column 8c + i of a tile at i * ACT_BK/8 + c, plane_major()'s order),
    unless `natural` (a dense shared expert's row, which its down GEMV reads in column order)."""
    gate, up = tl.split(tl.reshape(acc, (BN // 2, 2)))
    if INT4:
        dest = tl.where(natural, n, n // ACT_BK * ACT_BK + n % 8 * (ACT_BK // 8) + n % ACT_BK // 8)
    else:
        dest = n
    tl.store(act_ptr + p.to(tl.int64) * stride_act + dest, gate * tl.sigmoid(gate) * up, mask=n < ACT_W)


@triton.jit
def _moe_gate_up_kernel(x_ptr, ids_ptr, w_ptr, s_ptr, z_ptr, sw_ptr, ss_ptr, sz_ptr, xs_ptr, act_ptr, ws_ptr,
                        count_ptr, D, INTER, ACT_W, K_SPLIT, stride_xt, stride_we, stride_wn, stride_se, stride_sn,
                        stride_swn, stride_ssn, stride_xs, stride_act, TOP_K: tl.constexpr,
                        HAS_SHARED: tl.constexpr, GROUP: tl.constexpr, INT4: tl.constexpr, BN: tl.constexpr,
                        BK: tl.constexpr, SPLIT: tl.constexpr, ACT_BK: tl.constexpr, EVEN_N: tl.constexpr,
                        EVEN_K: tl.constexpr, F16: tl.constexpr, F16_WORDS: tl.constexpr,
                        X_PER_PAIR: tl.constexpr = False, SHARED_DENSE: tl.constexpr = False,
                        PDL: tl.constexpr = False):
    """act[p, n] = silu(x[t] . G[n]) * (x[t] . U[n]) in fp32 for pair p = (token t, slot j), slot TOP_K being the
    shared expert. A program takes BN/2 gate rows and the same up rows, interleaved in one tile so one K loop reads
    both (the GEMV's tiles, _gemv_acc), over K range program_id(2) of SPLIT: a GEMV keeps two K tiles in flight, so a
    long K loop waits on memory latency once per tile, and a split shortens it. The split's partial sums meet as the
    split-K linear's do: each stored in the workspace, a counter per (pair, column block), and the last program to
    arrive adds them in split order, stores act and resets the counter. Every column of act up to ACT_W is written
    (zeros past INTER and for slots without an expert). X_PER_PAIR: x holds a row per pair (act-order experts: each
    in its expert's column order, pair_rows), not per token. SHARED_DENSE: the shared expert's weights are dense
    (bf16 / fp16: Qwen's GPTQ-Int4 layout keeps it so), read with x's own rows (xs) and stored in column order.
    PDL: waits first (x, xs, ids, the workspace and counters)."""
    wait_then_release(PDL)
    pairs: tl.constexpr = TOP_K + HAS_SHARED
    half: tl.constexpr = BN // 2
    p, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t, j = p // pairs, p % pairs
    e = tl.load(ids_ptr + t * TOP_K + tl.minimum(j, TOP_K - 1)).to(tl.int64)
    n = pid_n * half + tl.arange(0, half)
    lane = tl.arange(0, BN)
    row = pid_n * half + lane // 2  # even lanes the gate row, odd lanes its up row
    cols = tl.where(row < INTER, row + (lane % 2) * INTER, 2 * INTER)[None, :, None]  # 2 * INTER: masked off
    x_row = x_ptr + (p if X_PER_PAIR else t).to(tl.int64) * stride_xt
    k_begin = pid_k * K_SPLIT
    k_end = tl.minimum(k_begin + K_SPLIT, D)
    one = tl.zeros((1, 1, 1), dtype=tl.int32)
    acc = tl.zeros((1, BN, 1), dtype=tl.float32)
    # Routed and shared weights in separate branches, each addressed straight from the kernel's arguments: a pointer
    # or stride chosen by tl.where loses the divisibility Triton specialises them on, and with it the vector loads.
    if pid_n * half < INTER:
        if j < TOP_K:
            if e >= 0:
                acc = _gemv_acc(x_row, w_ptr + e * stride_we, s_ptr + e * stride_se, z_ptr + e * stride_se, one, cols,
                                1, 2 * INTER, D, 0, stride_wn, stride_sn, k_begin, k_end, GROUP, INT4, BK, False,
                                EVEN_N, EVEN_K, F16, F16_WORDS)
        elif SHARED_DENSE:
            acc = _dense_acc(xs_ptr + t.to(tl.int64) * stride_xs, sw_ptr, cols, 2 * INTER, stride_swn, k_begin,
                             k_end, DENSE_BK)
        else:
            acc = _gemv_acc(x_row, sw_ptr, ss_ptr, sz_ptr, one, cols, 1, 2 * INTER, D, 0, stride_swn, stride_ssn,
                            k_begin, k_end, GROUP, INT4, BK, False, EVEN_N, EVEN_K, F16, F16_WORDS)
    if SHARED_DENSE:  # the dense shared expert's row goes in column order
        natural = j == TOP_K
    else:
        natural = False
    if SPLIT == 1:
        _store_act(acc, act_ptr, p, n, stride_act, ACT_W, BN, ACT_BK, INT4, natural)
    else:
        slot = p.to(tl.int64) * tl.num_programs(1) + pid_n
        last, total = _split_sum(acc, ws_ptr + slot * (SPLIT * BN) + lane[None, :, None], BN, count_ptr, slot, pid_k,
                                 (lane < BN)[None, :, None], SPLIT)
        if last:
            _store_act(total, act_ptr, p, n, stride_act, ACT_W, BN, ACT_BK, INT4, natural)


@triton.jit
def _moe_down_kernel(act_ptr, ids_ptr, weights_ptr, gate_ptr, w_ptr, s_ptr, z_ptr, sw_ptr, ss_ptr, sz_ptr, ws_ptr,
                     count_ptr, out_ptr, so_ptr, D, INTER, stride_act, stride_we, stride_wn, stride_se, stride_sn,
                     stride_swn, stride_ssn, stride_g, stride_out, stride_so, TOP_K: tl.constexpr,
                     HAS_SHARED: tl.constexpr, GROUP: tl.constexpr, INT4: tl.constexpr, BN: tl.constexpr,
                     BK: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, SHARED_OUT: tl.constexpr = False,
                     SHARED_DENSE: tl.constexpr = False, PDL: tl.constexpr = False):
    """out[t] = sum over token t's pairs of weight * (act[p] . Down[n]), the shared expert's weight being
    sigmoid(gate[t]). One program per pair and BN output columns (fp32 CUDA-core GEMV, act as the gate/up kernel
    stored it); each stores its weighted partial in the workspace [T * pairs, D], and the last of a token's programs
    for these columns to arrive (a counter per token and column block, as the split-K linear's) adds the partials in
    slot order, stores the row in out's dtype and resets the counter: one launch, deterministic, no spin.
    SHARED_OUT (with HAS_SHARED): the shared expert ran elsewhere (another format); slot TOP_K's partial is its output
    row so[t] times sigmoid(gate[t]), and act holds the routed pairs' rows only. SHARED_DENSE: the shared expert's
    down weight is dense, its act row in column order (the gate/up kernel's). PDL: waits first (act, ids, the
    routing weights, so)."""
    wait_then_release(PDL)
    pairs: tl.constexpr = TOP_K + HAS_SHARED
    p, pid_n = tl.program_id(0), tl.program_id(1)
    t, j = p // pairs, p % pairs
    cols = pid_n * BN + tl.arange(0, BN)[None, :, None]
    a_row = act_ptr + (t * (pairs - SHARED_OUT) + j).to(tl.int64) * stride_act
    one = tl.zeros((1, 1, 1), dtype=tl.int32)
    acc = tl.zeros((1, BN, 1), dtype=tl.float32)
    if j < TOP_K:  # separate branches: see the gate/up kernel
        e = tl.load(ids_ptr + t * TOP_K + j).to(tl.int64)
        if e >= 0:
            acc = tl.load(weights_ptr + t * TOP_K + j).to(tl.float32) * _gemv_acc(
                a_row, w_ptr + e * stride_we, s_ptr + e * stride_se, z_ptr + e * stride_se, one, cols, 1, D, INTER,
                0, stride_wn, stride_sn, 0, INTER, GROUP, INT4, BK, False, EVEN_N, EVEN_K, False, 1)
    elif SHARED_OUT:
        acc = tl.sigmoid(tl.load(gate_ptr + t * stride_g).to(tl.float32)) * tl.load(
            so_ptr + t.to(tl.int64) * stride_so + cols, mask=cols < D, other=0.0).to(tl.float32)
    elif SHARED_DENSE:
        acc = tl.sigmoid(tl.load(gate_ptr + t * stride_g).to(tl.float32)) * _dense_acc(
            a_row, sw_ptr, cols, D, stride_swn, 0, INTER, DENSE_BK)
    else:
        acc = tl.sigmoid(tl.load(gate_ptr + t * stride_g).to(tl.float32)) * _gemv_acc(
            a_row, sw_ptr, ss_ptr, sz_ptr, one, cols, 1, D, INTER, 0, stride_swn, stride_ssn, 0, INTER, GROUP, INT4,
            BK, False, EVEN_N, EVEN_K, False, 1)
    # the token's pairs are the splits: the last of its programs for these columns adds them in slot order
    _reduce_splits(acc, out_ptr + t.to(tl.int64) * stride_out + cols, ws_ptr + t.to(tl.int64) * pairs * D + cols, D,
                   count_ptr, t * tl.num_programs(1) + pid_n, j, cols < D, pairs)


@triton.jit
def _pair_rows_kernel(x_ptr, ids_ptr, perm_ptr, out_ptr, D, stride_xt, stride_pe, stride_out, TOP_K: tl.constexpr,
                      SHARED: tl.constexpr, BLOCK: tl.constexpr):
    """Row r of out: pair (token r // (TOP_K + SHARED), slot j)'s x row in its expert's column order; slot TOP_K
    (SHARED) the token's row as it is."""
    r = tl.program_id(0)
    t, j = r // (TOP_K + SHARED), r % (TOP_K + SHARED)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    src = cols
    if j < TOP_K:
        e = tl.maximum(tl.load(ids_ptr + t * TOP_K + j), 0).to(tl.int64)  # no expert (id < 0): never read
        src = tl.load(perm_ptr + e * stride_pe + cols, mask=mask, other=0)
    v = tl.load(x_ptr + t.to(tl.int64) * stride_xt + src, mask=mask)
    tl.store(out_ptr + r.to(tl.int64) * stride_out + cols, v, mask=mask)


def pair_rows(x: torch.Tensor, topk_ids: torch.Tensor, perm: torch.Tensor, shared_slot: bool = False) -> torch.Tensor:
    """As ref.pair_rows: x [T, D] (unit column stride), topk_ids [T, k], perm [E, D] (unit column stride) ->
    [T * (k + shared_slot), D], each routed pair's x row in its expert's column order."""
    t, k = topk_ids.shape
    d = x.shape[1]
    slots = k + int(shared_slot)
    out = torch.empty(t * slots, d, dtype=x.dtype, device=x.device)
    if t:
        block = min(1024, triton.next_power_of_2(d))
        _pair_rows_kernel[(t * slots, triton.cdiv(d, block))](
            x, topk_ids.contiguous(), perm, out, d, x.stride(0), perm.stride(0), out.stride(0), TOP_K=k,
            SHARED=int(shared_slot), BLOCK=block)
    return out


# Fused per-pair MoE tiles per weight format: gate_up (BN counting its gate and up rows together, num_warps, K tiles
# per program: the split), down (BN, num_warps). From `benchmarks/bench_quant_kernels.py --moe-tiles --rows 1 8`
# (H200, 35B-A3B layer with its shared expert, RESULTS.md 2026-12-04): one tile per format that is within 4% of the
# best at one token and 9% at eight. Four warps spill for fp8 (and for int4's down GEMV).
MOE_TILES = {"int4": ((64, 4, 4), (64, 8)), "fp8": ((64, 8, 4), (64, 8))}


def _moe_scratch(device: torch.device, floats: int, counters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The split-K linear's per-device workspace and self-resetting counters; fresh ones (zeroed in the graph) when
    a CUDA-graph capture meets a size no eager call has grown them to."""
    scratch = _scratch(device, floats, counters)
    if scratch is not None:
        return scratch
    return (torch.empty(floats, dtype=torch.float32, device=device),
            torch.zeros(counters, dtype=torch.int32, device=device))


def _fused_pairs(x: torch.Tensor, topk_weights: torch.Tensor, ids: torch.Tensor, w13, s13, z13, w2, s2, z2,
                 group: int, inter: int, shared, shared_gate: torch.Tensor | None,
                 gate_up_tile: tuple[int, int, int] | None = None,
                 down_tile: tuple[int, int] | None = None, perm: torch.Tensor | None = None,
                 shared_out: torch.Tensor | None = None, shared_dense: tuple | None = None) -> torch.Tensor:
    """The per-pair MoE in two launches (plus the activations' copy for the GEMVs: int4, fp8 with GEMV_FP8_F16):
    gate|up with SiLU-and-mul,
    then down with the routing-weighted sum, the shared expert (shared: its (w13, s13, z13, w2, s2, z2); or
    shared_dense: its dense (w13, w2)) as one more pair per token, or its output (shared_out [T, D], run elsewhere)
    added by the down kernel. perm: act-order experts' column orders, [E, D] (each pair's x row gathered in its
    expert's order by the activation copy, or by pair_rows first where the GEMVs take fp32 activations)."""
    t, d = x.shape
    top_k = ids.shape[1]
    int4 = z13 is not None
    has_shared = shared is not None or shared_dense is not None  # its weights run here as one more pair
    if shared_dense is not None:  # no scales: the weights stand in for them (never read)
        sw13, sw2 = shared_dense
        ss13, sz13, ss2, sz2 = sw13, sw13, sw2, sw2
    else:
        sw13, ss13, sz13, sw2, ss2, sz2 = shared if has_shared else (w13[0], s13[0], z13, w2[0], s2[0], z2)
    sz13 = sz13 if int4 else ss13
    sz2 = sz2 if int4 else ss2
    pairs = top_k + int(has_shared)
    g1, g2 = min(group, d) if group else d, min(group, inter) if group else inter
    bk1, bk2 = _k_tile(g1, d, 128), _k_tile(g2, inter, 128)
    act_w = triton.cdiv(inter, bk2) * bk2 if int4 else inter
    if int4:
        f16 = GEMV_F16 and x.dtype == torch.bfloat16
        if f16:  # act-order: each pair's row gathered in its expert's order by the same copy
            xin = plane_major_f16(x, bk1) if perm is None else plane_major_f16(x, bk1, perm, ids, has_shared)
        else:
            xin = plane_major(x if perm is None else pair_rows(x, ids, perm, has_shared), bk1)
    else:  # the fp8 gate|up GEMVs with fp16 products (GEMV_FP8_F16) where the weights allow
        f16 = _fp8_f16_ok(x, bk1, w13, *([sw13] if shared is not None else []))
        xin = act_f16(x, bk1) if f16 else x
    act = torch.empty(t * pairs, act_w, dtype=torch.float32, device=x.device)
    out = torch.empty_like(x)
    if t == 0:
        return out
    bn, warps, k_tiles = gate_up_tile or MOE_TILES["int4" if int4 else "fp8"][0]
    k_split = min(k_tiles, triton.cdiv(d, bk1)) * bk1
    split = triton.cdiv(d, k_split)
    blocks = triton.cdiv(act_w, bn // 2)
    ws, counts = _moe_scratch(x.device, t * pairs * blocks * split * bn, t * pairs * blocks)
    _moe_gate_up_kernel[(t * pairs, blocks, split)](
        xin, ids, w13, s13, z13 if int4 else s13, sw13, ss13, sz13, x, act, ws, counts, d, inter, act_w, k_split,
        xin.stride(0), w13.stride(0), w13.stride(1), s13.stride(0), s13.stride(1), sw13.stride(0), ss13.stride(0),
        x.stride(0), act.stride(0), TOP_K=top_k, HAS_SHARED=int(has_shared), GROUP=g1 if g1 < d else d + bk1,
        INT4=int4, BN=bn, BK=bk1, SPLIT=split, ACT_BK=bk2, EVEN_N=inter % (bn // 2) == 0, EVEN_K=d % bk1 == 0,
        F16=f16, F16_WORDS=_f16_words(bk1, MOE_PAIR_F16_WORDS) if f16 else 1, X_PER_PAIR=perm is not None,
        SHARED_DENSE=shared_dense is not None, num_warps=warps, **pdl_launch(x.device))
    bn, warps = down_tile or MOE_TILES["int4" if int4 else "fp8"][1]
    blocks = triton.cdiv(d, bn)
    slots = pairs + int(shared_out is not None)  # the down kernel's pairs a token: the shared output's too
    ws, counts = _moe_scratch(x.device, t * slots * d, t * blocks)
    gate = shared_gate if slots > top_k else topk_weights
    so = shared_out if shared_out is not None else out  # not read without it
    _moe_down_kernel[(t * slots, blocks)](
        act, ids, topk_weights, gate, w2, s2, z2 if int4 else s2, sw2, ss2, sz2, ws, counts, out, so, d, inter,
        act.stride(0), w2.stride(0), w2.stride(1), s2.stride(0), s2.stride(1), sw2.stride(0), ss2.stride(0),
        gate.stride(0), out.stride(0), so.stride(0), TOP_K=top_k, HAS_SHARED=int(slots > top_k),
        GROUP=g2 if g2 < inter else inter + bk2, INT4=int4, BN=bn, BK=bk2, EVEN_N=d % bn == 0,
        EVEN_K=inter % bk2 == 0, SHARED_OUT=shared_out is not None, SHARED_DENSE=shared_dense is not None,
        num_warps=warps, **pdl_launch(x.device))
    return out


@triton.jit
def _moe_block_kernel(x_ptr, order_ptr, bounds_ptr, starts_ptr, w_ptr, s_ptr, z_ptr, out_ptr, N, K,
                      TOP_K, E, stride_xt, stride_we, stride_wn, stride_se, stride_sn, stride_op,
                      X_PER_PAIR: tl.constexpr, GROUP: tl.constexpr, INT4: tl.constexpr, IEEE: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BLOCK_E: tl.constexpr,
                      EVEN: tl.constexpr = False):
    """One block of up to BM (token, expert) pairs routed to the same expert (moe.blocked.block_plan), times that
    expert's weight: the weight tile is read once per block instead of once per pair, dequantized as UNPACK 0 does
    (_dequant_tile; EVEN: whole tiles, no weight masks). out rows in pair order."""
    e, _, pairs, valid = _block_rows(order_ptr, bounds_ptr, starts_ptr, tl.program_id(0), E, BM, BLOCK_E)
    if e < E:
        if X_PER_PAIR:
            xrow = pairs
        else:
            xrow = pairs // TOP_K
        offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
        n_ok = offs_n < N
        e64 = e.to(tl.int64)
        wp, sp, zp = w_ptr + e64 * stride_we, s_ptr + e64 * stride_se, z_ptr + e64 * stride_se
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            offs_k = k0 + tl.arange(0, BK)
            if EVEN:
                x = tl.load(x_ptr + xrow[:, None] * stride_xt + offs_k[None, :], mask=valid[:, None], other=0.0)
            else:
                x = tl.load(x_ptr + xrow[:, None] * stride_xt + offs_k[None, :],
                            mask=valid[:, None] & (offs_k[None, :] < K), other=0.0)
            w = _dequant_tile(wp, sp, zp, k0, offs_n, N, K, stride_wn, stride_sn, GROUP, INT4, BK, EVEN)
            w = tl.trans(w.to(x_ptr.dtype.element_ty))
            if IEEE:
                acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(x, w)
        tl.store(out_ptr + pairs[:, None] * stride_op + offs_n[None, :], acc, mask=valid[:, None] & n_ok[None, :])


def _group_and_tile(group: int, k: int, want: int) -> tuple[int, int]:
    """(the GROUP constexpr, the K tile) of a block kernel over K = k: one group per tile's rows (0 or a group of
    k or more: the whole row, GROUP past the row so no tile crosses a group edge), the tile dividing the group."""
    group = min(group, k) if group else k
    bk = _k_tile(group, k, want)
    return (group if group < k else k + bk), bk


def _blocks(x: torch.Tensor, plan, w, s, z, group: int, n: int, k: int, x_per_pair: bool, top_k: int,
            num_pairs: int, bm: int) -> torch.Tensor:
    order, bounds, starts = plan
    out = torch.zeros(num_pairs, n, dtype=torch.float32, device=x.device)  # unrouted pairs (id < 0) stay 0
    group, bk = _group_and_tile(group, k, 128 if z is not None else 64)
    bn = 64
    experts = w.shape[0]
    grid = (max_blocks(num_pairs, experts, bm), triton.cdiv(n, bn))
    _moe_block_kernel[grid](x, order, bounds, starts, w, s, z if z is not None else s, out, n, k, top_k,
                            experts, x.stride(0), w.stride(0), w.stride(1), s.stride(0), s.stride(1),
                            out.stride(0), X_PER_PAIR=x_per_pair, GROUP=group,
                            INT4=z is not None, IEEE=x.dtype == torch.float32 or _INTERPRET, BM=bm, BN=bn, BK=bk,
                            BLOCK_E=triton.next_power_of_2(experts + 1), EVEN=n % bn == 0 and k % bk == 0)
    return out


# Routed pairs up to which each pair runs its own GEMV; past it, blocks of pairs of one expert share a weight tile.
PAIR_GEMV_MAX = 64
# Routed (token, expert) pairs up to which the per-pair and block kernels here run (decode batches up to 128 at
# top-8); past it (prefill) moe.blocked's grouped GEMMs, each weight tile dequantized in their K loop.
PAIR_MAX = 1024


def _shared_term(x: torch.Tensor, shared, shared_gate: torch.Tensor, group: int, inter: int) -> torch.Tensor:
    """sigmoid(shared_gate) * SharedExpert(x) in fp32, through quant_gemm (the grouped path's batch sizes)."""
    sw13, ss13, sz13, sw2, ss2, sz2 = shared
    gate_up = quant_gemm(x, sw13, ss13, sz13, group).float()
    hidden = (torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]).to(x.dtype)
    return torch.sigmoid(shared_gate.float()) * quant_gemm(hidden, sw2, ss2, sz2, group).float()


@triton.jit
def _int4_expert_tile(w_ptr, s_ptr, z_ptr, k0, offs_n, N, K, stride_wn, stride_sn, GROUP: tl.constexpr,
                      BK: tl.constexpr, EVEN: tl.constexpr):
    """moe.blocked's loader for int4 experts (QuantExperts.tile)."""
    return _dequant_tile(w_ptr, s_ptr, z_ptr, k0, offs_n, N, K, stride_wn, stride_sn, GROUP, True, BK, EVEN)


@triton.jit
def _fp8_expert_tile(w_ptr, s_ptr, z_ptr, k0, offs_n, N, K, stride_wn, stride_sn, GROUP: tl.constexpr,
                     BK: tl.constexpr, EVEN: tl.constexpr):
    """moe.blocked's loader for fp8 experts (QuantExperts.tile)."""
    return _dequant_tile(w_ptr, s_ptr, z_ptr, k0, offs_n, N, K, stride_wn, stride_sn, GROUP, False, BK, EVEN)


def _quant_linear(x, weight, scale, zeros, group):
    """int4_linear (zero points given) or fp8_linear: the fused kernel up to FUSED_MAX_ROWS, a dequantize pass and
    torch's GEMM past it."""
    if zeros is not None:
        return int4_linear(x=x, qweight=weight, scales=scale, zeros=zeros, group_size=group)
    return fp8_linear(x=x, weight=weight, scale=scale, block_k=group)


def _prefill_moe(x, topk_weights, topk_ids, w13, s13, z13, w2, s2, z2, group, inter, shared, shared_gate,
                 perm=None, shared_out=None):
    """Past PAIR_MAX pairs: moe.blocked's grouped GEMMs on the quantized experts, each weight tile dequantized in
    the K loop (no dense copy of the experts); the shared expert as the dense projections run (_quant_linear),
    added in the combine. perm (act-order experts): the gate|up kernel reads each pair's row of pair_rows."""
    (g13, bk13), (g2, bk2) = (_group_and_tile(group, k, 64) for k in (x.shape[1], inter))
    quant = blocked.QuantExperts(tile=_int4_expert_tile if z13 is not None else _fp8_expert_tile, s13=s13,
                                 z13=z13 if z13 is not None else s13, s2=s2, z2=z2 if z2 is not None else s2,
                                 groups=(g13, g2), k_tiles=(bk13, bk2), inter=inter)
    if shared is not None:
        sw13, ss13, sz13, sw2, ss2, sz2 = shared
        hidden = silu_and_mul(x=_quant_linear(x, sw13, ss13, sz13, group))
        shared_out = _quant_linear(hidden, sw2, ss2, sz2, group)
    return blocked.fused_moe(x=x, w13=w13, w2=w2, topk_weights=topk_weights, topk_ids=topk_ids, shared=shared_out,
                             shared_gate=shared_gate if shared_out is not None else None, quant=quant,
                             pair_x=None if perm is None else pair_rows(x.contiguous(), topk_ids, perm))


def _moe(x, topk_weights, topk_ids, w13, s13, z13, w2, s2, z2, group, inter, shared=None, shared_gate=None,
         perm=None, shared_out=None):
    """shared: the shared expert's weights, quantized as the experts' (w13, s13, z13, w2, s2, z2) or dense (w13, w2)
    (a bf16 / fp16 one beside int4 / fp8 experts: the per-pair kernels run it as one more pair, the other paths as
    the dense MLP layer would, its output added by the op); or shared_out, its output."""
    if shared is not None and shared_out is not None:
        raise ValueError("the shared expert comes as weights (shared_w13, shared_w2) or as its output, not both")
    dense = None
    if shared is not None and len(shared) == 2:
        shared, dense = None, shared
        if topk_ids.numel() > PAIR_GEMV_MAX:  # as the MLP layer would run it
            shared_out = dense_linear(x=silu_and_mul(x=dense_linear(x=x, weight=dense[0])), weight=dense[1])
            dense = None
    t, d = x.shape
    if topk_ids.numel() > PAIR_MAX:
        return _prefill_moe(x, topk_weights, topk_ids, w13, s13, z13, w2, s2, z2, group, inter, shared, shared_gate,
                            perm, shared_out)
    # the ids as the top-k kernel writes them (int64): the kernels widen what they load, so no cast launch
    ids = topk_ids.contiguous()
    x = x.contiguous()
    k = ids.shape[-1]
    if ids.numel() <= PAIR_GEMV_MAX:
        return _fused_pairs(x, topk_weights.contiguous(), ids, w13, s13, z13, w2, s2, z2, group, inter, shared,
                            shared_gate, perm=perm, shared_out=shared_out, shared_dense=dense)
    bm = 16
    plan = block_plan(ids, w13.shape[0], bm)[:3]
    xin = x if perm is None else pair_rows(x, ids, perm)
    gate_up = _blocks(xin, plan, w13, s13, z13, group, 2 * inter, d, perm is not None, k, ids.numel(), bm)
    # silu(gate) * up in fp32, rounded to the activation dtype for the tensor cores, as the bf16 grouped MoE does
    hidden = (torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]).to(x.dtype)
    down = _blocks(hidden, plan, w2, s2, z2, group, d, inter, True, k, ids.numel(), bm)
    y = (down.view(t, -1, d) * topk_weights.float().unsqueeze(-1)).sum(dim=1)
    if shared is not None:
        y += _shared_term(x, shared, shared_gate, group, inter)
    elif shared_out is not None:
        y += torch.sigmoid(shared_gate.float()) * shared_out.float()
    return y.to(x.dtype)


def int4_fused_moe(*, x: torch.Tensor, w13_qweight: torch.Tensor, w13_scales: torch.Tensor,
                   w13_zeros: torch.Tensor, w2_qweight: torch.Tensor, w2_scales: torch.Tensor,
                   w2_zeros: torch.Tensor, group_size: int, topk_weights: torch.Tensor,
                   topk_ids: torch.Tensor, shared_w13: tuple[torch.Tensor, ...] | torch.Tensor | None = None,
                   shared_w2: tuple[torch.Tensor, ...] | torch.Tensor | None = None,
                   shared_gate: torch.Tensor | None = None, w13_perm: torch.Tensor | None = None,
                   shared_out: torch.Tensor | None = None) -> torch.Tensor:
    inter = w13_qweight.shape[1] // 2
    shared = ref.shared_weights(shared_w13, shared_w2, x.shape[-1], inter)
    return _moe(x, topk_weights, topk_ids, w13_qweight, w13_scales, w13_zeros, w2_qweight, w2_scales, w2_zeros,
                group_size, inter, shared, shared_gate, w13_perm, shared_out)


def fp8_fused_moe(*, x: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor,
                  w2_scale: torch.Tensor, block_k: int, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, shared_w13: tuple[torch.Tensor, ...] | torch.Tensor | None = None,
                  shared_w2: tuple[torch.Tensor, ...] | torch.Tensor | None = None,
                  shared_gate: torch.Tensor | None = None, shared_out: torch.Tensor | None = None) -> torch.Tensor:
    shared = ref.shared_weights(shared_w13, shared_w2, x.shape[-1], w2.shape[2])
    if shared is not None and len(shared) == 4:  # (weight, scale) twice: no zero points
        shared = (shared[0], shared[1], None, shared[2], shared[3], None)
    return _moe(x, topk_weights, topk_ids, w13, w13_scale, None, w2, w2_scale, None, block_k, w2.shape[2], shared,
                shared_gate, shared_out=shared_out)
