"""Weight-quantized linear layers and MoE experts (int4 W4A16, fp8 block-scaled). CUDA tensors run the Triton kernels
of ``triton.py``; anything else the dequantize-then-GEMM references of ``ref.py`` (same signatures)."""

from __future__ import annotations

from deltaserve.kernels._dispatch import dispatch

from . import ref

int4_linear = dispatch(ref.int4_linear, "deltaserve.kernels.quant.triton")
fp8_linear = dispatch(ref.fp8_linear, "deltaserve.kernels.quant.triton")
int4_linear_tail = dispatch(ref.int4_linear_tail, "deltaserve.kernels.quant.triton")
fp8_linear_tail = dispatch(ref.fp8_linear_tail, "deltaserve.kernels.quant.triton")
int4_fused_moe = dispatch(ref.int4_fused_moe, "deltaserve.kernels.quant.triton")
fp8_fused_moe = dispatch(ref.fp8_fused_moe, "deltaserve.kernels.quant.triton")

__all__ = ["fp8_fused_moe", "fp8_linear", "fp8_linear_tail", "int4_fused_moe", "int4_linear", "int4_linear_tail"]
