"""What the Triton attention kernels share: the tile-config choice, the dot precision, argument checks, the
quantized-KV format codes and the quantized tile load (triton.py describes the kernels)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deltaserve.kernels.attention.ref import kv_stored_dim

_LOG2E = 1.4426950408889634


@triton.jit
def _widen(x):
    """A non-negative int32 as int64, zero-extended: a page id times a page stride is then one 32 x 32 -> 64-bit
    product (sign-extended operands take three more multiplies)."""
    return x.to(tl.uint32).to(tl.int64)


@triton.jit
def _load_quantized(c_ptr, rows, t_mask, out_ty: tl.constexpr, QUANT: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """The stored values (unscaled) of BLOCK_N quantized head vectors starting at element offsets rows ([BLOCK_N]),
    as [BLOCK_N, BLOCK_D] in out_ty; masked rows and columns are 0."""
    if QUANT == 3:
        half = tl.arange(0, BLOCK_D // 2)
        # 0x88: both nibbles 8, i.e. the value 0
        b = tl.load(c_ptr + rows[:, None] + half[None, :], mask=t_mask[:, None] & (half < HEAD_DIM // 2)[None, :],
                    other=0x88).to(tl.int32)
        x = tl.reshape(tl.join((b & 15) - 8, (b >> 4) - 8), [BLOCK_N, BLOCK_D])  # byte j -> columns 2j, 2j+1
    else:
        cols = tl.arange(0, BLOCK_D)
        x = tl.load(c_ptr + rows[:, None] + cols[None, :], mask=t_mask[:, None] & (cols < HEAD_DIM)[None, :],
                    other=0.0)
    return x.to(out_ty)


# The decode kernel's PLANES variant (fp16 dots): quantized pages converted to fp16 by PTX, as two planes, even and
# odd head dims. Triton's own conversions (an int-to-float per int4/int8 value, its interleave of the int4 nibbles)
# and its 8-bit dot-operand layouts (single-byte ld.shared for the transposed V operand, as sm_90 has no 8-bit
# ldmatrix.trans; q's registers shuffled before every mma) cost more instructions per tile than the tile's bytes
# take to arrive (benchmarks/compile_check.py). The interpreter makes the same planes in fp32 without PTX.

# fp8 / int8: two bytes (dims 2j, 2j+1) per int16 element, two elements ($2) per call -> the even plane's two values
# ($0) and the odd plane's ($1). 16-bit loads keep Triton's dot operands in the 16-bit layout (kWidth 2): the
# transposed V tile comes through ldmatrix.trans as byte pairs, and the prmt regroups two tokens' bytes of one dim,
# which is the pair an mma operand register holds. fp8: one native cvt per pair. int8: the magic-number trick (as the
# int4 GEMM in quant/triton.py): one xor flips the sign bits of all four bytes (q + 128, unsigned), each prmt puts two
# of them under the exponent byte of fp16 1024.0 (0x64, from its second operand), giving 1024 + 128 + q exactly, and
# one packed subtract leaves q: 5 instructions per 4 values, where a lop3 per pair (sign flip and exponent after a
# prmt with zero bytes) took 6 (sm_90a tile loop at BLOCK_N 128: 1918 -> 1789 SASS per warp, compile_check.py).
_FP8_PLANES_PTX = tl.constexpr("""{
.reg .b32 t;
.reg .b16 e, o;
prmt.b32 t, $2, 0, 0x3120;
mov.b32 {e, o}, t;
cvt.rn.f16x2.e4m3x2 $0, e;
cvt.rn.f16x2.e4m3x2 $1, o;
}""")
_INT8_PLANES_PTX = tl.constexpr("""{
.reg .b32 t, d0, d1, c;
xor.b32 t, $2, 0x80808080;
prmt.b32 d0, t, 0x64646464, 0x4240;
prmt.b32 d1, t, 0x64646464, 0x4341;
mov.b32 c, 0x64806480;
sub.f16x2 $0, d0, c;
sub.f16x2 $1, d1, c;
}""")
# int4: four bytes ($4) per call. The low nibble OR-ed into the mantissa of 1024.0 gives 1024 + q; the high nibble
# OR-ed in where it sits (bits 4-7) gives 1024 + 16 q, so its plane comes out as 16 (q - 8), exact (the caller
# divides by 16: a shift per word saved). Outputs: four even-plane values ($0, $1), four odd-plane values ($2, $3).
_INT4_PLANES_PTX = tl.constexpr("""{
.reg .b32 d0, d1, t0, t1, c;
prmt.b32 d0, $4, 0, 0x4140;
prmt.b32 d1, $4, 0, 0x4342;
lop3.b32 t0, d0, 0x000f000f, 0x64006400, 0xea;
lop3.b32 t1, d1, 0x000f000f, 0x64006400, 0xea;
mov.b32 c, 0x64086408;
sub.f16x2 $0, t0, c;
sub.f16x2 $1, t1, c;
lop3.b32 t0, d0, 0x00f000f0, 0x64006400, 0xea;
lop3.b32 t1, d1, 0x00f000f0, 0x64006400, 0xea;
mov.b32 c, 0x64806480;
sub.f16x2 $2, t0, c;
sub.f16x2 $3, t1, c;
}""")


# int4 as 16-bit words (INT4_WORDS): a word holds head dims 4i..4i+3, a nibble each (byte 2i: 4i low, 4i+1 high;
# byte 2i+1: 4i+2, 4i+3), so with two words ($4, pack 2) per call the four planes come out of nibble positions
# alone, no byte regrouping: each plane register is (nibble j of word 0, nibble j of word 1), the pair an mma
# operand register holds (two dims of one token for K, one dim of two tokens for the transposed V, as for the
# fp8/int8 pairs). Low nibbles OR-ed into 1024.0 give 1024 + q, minus 1032 -> q - 8; high nibbles give 1024 + 16 q,
# and one fma (x / 16 - 72) gives q - 8 as well: all four planes come out unscaled and exact. A shift by 8 brings the
# odd byte's nibbles down for planes 2 and 3: 9 instructions per 8 values (the two-plane int4 code takes 10 plus
# the 8-bit tile's byte gathers and kWidth-4 operand shuffles).
_INT4_WORDS_PTX = tl.constexpr("""{
.reg .b32 t, a, b, c, m, s;
mov.b32 c, 0x64086408;
mov.b32 m, 0x2c002c00;
mov.b32 s, 0xd480d480;
lop3.b32 a, $4, 0x000f000f, 0x64006400, 0xea;
lop3.b32 b, $4, 0x00f000f0, 0x64006400, 0xea;
sub.f16x2 $0, a, c;
fma.rn.f16x2 $1, b, m, s;
shr.b32 t, $4, 8;
lop3.b32 a, t, 0x000f000f, 0x64006400, 0xea;
lop3.b32 b, t, 0x00f000f0, 0x64006400, 0xea;
sub.f16x2 $2, a, c;
fma.rn.f16x2 $3, b, m, s;
}""")
# INT4_WORDS 2, for K: the stored nibble n = q + 8 masked in place is the fp16 subnormal n * 2^-24 (low nibbles) or
# 16 n * 2^-24 (high), exact, with no bias subtract: 5 instructions per 8 values. The kernel scales the scores by
# 2^24 and takes the +8 off as 8 * sum(q) per head, a loop-invariant term in the dot's accumulator. Needs the
# tensor cores to take fp16 subnormal inputs as they are (test_quantized_decode_int4_words_gpu checks it).
_INT4_WORDS_DENORM_PTX = tl.constexpr("""{
.reg .b32 t;
and.b32 $0, $4, 0x000f000f;
and.b32 $1, $4, 0x00f000f0;
shr.b32 t, $4, 8;
and.b32 $2, t, 0x000f000f;
and.b32 $3, t, 0x00f000f0;
}""")


@triton.jit
def _planes_ptx(x, t_mask, ptx: tl.constexpr, PACK: tl.constexpr, IN_REGS: tl.constexpr):
    """ptx on the tile x ([BLOCK_N, C]; PACK elements per call) -> its two fp16 planes. Triton moves a dot operand's
    layout change above elementwise ops onto the narrow input, so V (transposed for its dot) would reach the PTX
    through narrow shared-memory loads. IN_REGS passes the row mask as an unused operand, which pins the conversion
    to the load's layout: the fp16 planes then take vectorized st.shared and ldmatrix.trans instead."""
    if IN_REGS:
        pin = t_mask.to(tl.int32)[:, None]
        if PACK == 4:
            return tl.inline_asm_elementwise(ptx, "=r,=r,=r,=r,r,r,r,r,r", [x, pin], dtype=(tl.float16, tl.float16),
                                             is_pure=True, pack=4)
        else:
            return tl.inline_asm_elementwise(ptx, "=r,=r,r,r,r", [x, pin], dtype=(tl.float16, tl.float16),
                                             is_pure=True, pack=2)
    else:
        if PACK == 4:
            return tl.inline_asm_elementwise(ptx, "=r,=r,=r,=r,r", [x], dtype=(tl.float16, tl.float16), is_pure=True,
                                             pack=4)
        else:
            return tl.inline_asm_elementwise(ptx, "=r,=r,r", [x], dtype=(tl.float16, tl.float16), is_pure=True,
                                             pack=2)


@triton.jit
def _load_planes(c_ptr, rows, words, t_mask, out_ty: tl.constexpr, QUANT: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BLOCK_D: tl.constexpr, IN_REGS: tl.constexpr, IS_V: tl.constexpr = True):
    """BLOCK_N quantized head vectors (offsets rows in bytes, words = rows // 2 in 16-bit words) as two
    [BLOCK_N, BLOCK_D // 2] planes in out_ty: even dims and odd dims, unscaled; int4's odd plane is 16 (q - 8).
    Masked tokens get p = 0 from the caller, and their block-table load points them at a page of the pool: int8 and
    int4 bytes are finite whatever they hold, so their tokens are not masked (as _load_words); fp8 V is (a stale byte
    may be NaN, and 0 * NaN is NaN), fp8 K (IS_V False) is not: a NaN stays in its own token's score, which the
    caller replaces by -inf. Masked bytes read 0 (cp.async fills zeros for free, another value costs a select per
    byte); dims past HEAD_DIM meet a zero q."""
    half = tl.arange(0, BLOCK_D // 2)
    dims = (half < HEAD_DIM // 2)[None, :]
    mask = t_mask[:, None] & dims if QUANT == 1 and IS_V else dims
    if QUANT == 3:
        b = tl.load(c_ptr + rows[:, None] + half[None, :], mask=mask, other=0)
        if out_ty == tl.float16:
            even, odd = _planes_ptx(b, t_mask, _INT4_PLANES_PTX, 4, IN_REGS)
        else:
            b = b.to(tl.int32)
            even, odd = ((b & 15) - 8).to(out_ty), (((b >> 4) - 8) * 16).to(out_ty)
    elif out_ty == tl.float16:
        pairs = tl.load(c_ptr.to(tl.pointer_type(tl.int16)) + words[:, None] + half[None, :], mask=mask, other=0)
        even, odd = _planes_ptx(pairs, t_mask, _FP8_PLANES_PTX if QUANT == 1 else _INT8_PLANES_PTX, 2, IN_REGS)
    else:
        even = tl.load(c_ptr + rows[:, None] + 2 * half[None, :], mask=mask, other=0.0).to(out_ty)
        odd = tl.load(c_ptr + rows[:, None] + 2 * half[None, :] + 1, mask=mask, other=0.0).to(out_ty)
    return even, odd


@triton.jit
def _load_words(c_ptr, words, t_mask, out_ty: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                IN_REGS: tl.constexpr, DENORM: tl.constexpr = False):
    """BLOCK_N int4 head vectors (offsets words, in 16-bit words) as four [BLOCK_N, BLOCK_D // 4] planes in out_ty,
    head dims 4i, 4i+1, 4i+2, 4i+3, unscaled q - 8. Compiled with fp16 out_ty: read as 16-bit words and converted by
    _INT4_WORDS_PTX (IN_REGS as in _planes_ptx); otherwise (the interpreter) from the bytes. Tokens are not masked:
    the caller points a masked token at a page of the pool (its block-table load reads page 0) and gives it p = 0,
    and any byte is a finite int4 pair, so the product is 0 (saves the mask's selects on every load); dims past
    HEAD_DIM read 0 (-8 in every plane) against a zero q. DENORM: the stored nibbles n instead, as n * 2^-24 (planes
    0, 2) and 16 n * 2^-24 (planes 1, 3): _INT4_WORDS_DENORM_PTX."""
    quarter = tl.arange(0, BLOCK_D // 4)
    dims = (quarter < HEAD_DIM // 4)[None, :]
    if out_ty == tl.float16:
        ptrs = c_ptr.to(tl.pointer_type(tl.int16)) + words[:, None] + quarter[None, :]
        if HEAD_DIM == BLOCK_D:
            w = tl.load(ptrs)
        else:
            w = tl.load(ptrs, mask=dims, other=0)
        ptx: tl.constexpr = _INT4_WORDS_DENORM_PTX if DENORM else _INT4_WORDS_PTX
        f16x4: tl.constexpr = (tl.float16, tl.float16, tl.float16, tl.float16)
        if IN_REGS:
            pin = t_mask.to(tl.int32)[:, None]
            p0, p1, p2, p3 = tl.inline_asm_elementwise(ptx, "=r,=r,=r,=r,r,r,r", [w, pin], dtype=f16x4, is_pure=True,
                                                       pack=2)
        else:
            p0, p1, p2, p3 = tl.inline_asm_elementwise(ptx, "=r,=r,=r,=r,r", [w], dtype=f16x4, is_pure=True, pack=2)
    else:
        rows = 2 * words
        lo = tl.load(c_ptr + rows[:, None] + 2 * quarter[None, :], mask=dims, other=0).to(tl.int32)
        hi = tl.load(c_ptr + rows[:, None] + 2 * quarter[None, :] + 1, mask=dims, other=0).to(tl.int32)
        if DENORM:
            tiny: tl.constexpr = 2.0**-24
            p0, p1 = ((lo & 15).to(tl.float32) * tiny).to(out_ty), ((lo & 0xF0).to(tl.float32) * tiny).to(out_ty)
            p2, p3 = ((hi & 15).to(tl.float32) * tiny).to(out_ty), ((hi & 0xF0).to(tl.float32) * tiny).to(out_ty)
        else:
            p0, p1 = ((lo & 15) - 8).to(out_ty), ((lo >> 4) - 8).to(out_ty)
            p2, p3 = ((hi & 15) - 8).to(out_ty), ((hi >> 4) - 8).to(out_ty)
    return p0, p1, p2, p3


def _config(gpu: dict[str, int], interpret: dict[str, int], q: torch.Tensor) -> dict[str, int]:
    """The tile config for q's device and dtype. fp32 tiles (tests, debugging) are twice the bytes of the bf16 ones
    the configs are tuned for: halve them and drop pipelining so they fit in shared memory."""
    if not q.is_cuda:
        return interpret
    if q.element_size() <= 2:
        return gpu
    cfg = dict(gpu, num_stages=1)
    for key in ("BLOCK_M", "BLOCK_N"):
        if key in cfg:
            cfg[key] = max(16, cfg[key] // 2)
    return cfg


def _precision(q: torch.Tensor) -> str:
    # fp32 inputs (and the interpreter's upcast tiles) get true fp32 dots; half types use the tensor cores anyway
    return "ieee" if q.dtype == torch.float32 or not q.is_cuda else "tf32"


def _check_last_dim(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.stride(-1) != 1:
            raise ValueError(f"attention kernels need a contiguous last dim, got strides {t.stride()}; "
                             "call .contiguous() first")


def _check_heads(q: torch.Tensor, k_cache: torch.Tensor) -> None:
    if q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"Hq={q.shape[1]} is not a multiple of Hkv={k_cache.shape[2]}")


_QUANT_CODE = {torch.float8_e4m3fn: 1, torch.int8: 2, torch.uint8: 3}  # the kernels' QUANT constexpr


def _kv_quant(k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor | None,
              v_scale: torch.Tensor | None, head_dim: int, q: torch.Tensor | None = None,
              ) -> tuple[int, torch.Tensor, torch.Tensor, int, int]:
    """(QUANT, k scale, v scale, scale page stride, scale slot stride) for the kernels, after checking the pages'
    format. Unquantized pages get the caches themselves as never-read scale pointers; q, when given, must then
    have the pages' dtype."""
    if k_cache.dtype != v_cache.dtype:
        raise TypeError(f"k_cache and v_cache dtypes differ ({k_cache.dtype}, {v_cache.dtype})")
    if k_cache.dtype not in _QUANT_CODE:
        if q is not None and q.dtype != k_cache.dtype:
            raise TypeError(f"q is {q.dtype} but the KV pages are {k_cache.dtype}: pages hold q's dtype, or are "
                            "quantized (float8_e4m3fn, int8, uint8 = int4) with k_scale and v_scale")
        return 0, k_cache, v_cache, 0, 0
    if k_scale is None or v_scale is None:
        raise ValueError(f"{k_cache.dtype} KV pages need k_scale and v_scale ([P, page_size, Hkv] fp32)")
    want = tuple(k_cache.shape[:3])
    for name, sc in (("k_scale", k_scale), ("v_scale", v_scale)):
        if sc.dtype != torch.float32 or tuple(sc.shape) != want or sc.stride() != k_scale.stride() or \
                sc.stride(-1) != 1:
            raise ValueError(f"{name} must be fp32 {list(want)} with unit stride in heads (and the same strides "
                             f"for k_scale and v_scale), got {sc.dtype} {list(sc.shape)} strides {sc.stride()}")
    if k_cache.shape[-1] != kv_stored_dim(k_cache.dtype, head_dim):
        raise ValueError(f"{k_cache.dtype} pages of head_dim {head_dim} have a last dim of "
                         f"{kv_stored_dim(k_cache.dtype, head_dim)}, got {k_cache.shape[-1]}")
    return _QUANT_CODE[k_cache.dtype], k_scale, v_scale, k_scale.stride(0), k_scale.stride(1)
