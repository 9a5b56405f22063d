"""What the Triton attention kernels share: the tile-config choice, the dot precision, argument checks, the
quantized-KV format codes and the quantized tile load (triton.py describes the kernels)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deltaserve.kernels.attention.ref import kv_stored_dim

_LOG2E = 1.4426950408889634


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
