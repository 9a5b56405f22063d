"""Registers, spills and instruction counts of the quantized kernels for sm_90a, without a GPU: Triton compiles each
kernel variant to PTX for a Hopper target and ptxas (shipped with Triton) assembles it with -v. Pointers, N, K and
the row strides are marked divisible by 16, as Triton specializes them at real shapes (without the hint the counts
come out pessimistic). A check before a device call, not a timing.

PYTHONPATH=src:. python3 benchmarks/compile_check.py
"""

from __future__ import annotations

import os
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
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
_DIVISIBLE = ("N", "K", "stride_xm", "stride_wn", "stride_om", "k_per_split", "stride_qn")


def compile_one(fn, types: dict[str, str], constexprs: dict, num_warps: int, num_stages: int) -> dict:
    """fn compiled for sm_90a: registers, spill bytes and PTX instruction counts."""
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
    regs = next(int(w) for line in log.splitlines() if "Used" in line for w, nxt in zip(line.split(), line.split()[1:])
                if nxt.startswith("registers"))
    spills = next(int(line.split("bytes spill stores")[0].split(",")[-1]) for line in log.splitlines()
                  if "spill stores" in line)
    ops = Counter(line.split()[0] for line in ptx.splitlines() if line.strip()[:1].isalpha())
    return {"registers": regs, "spill store bytes": spills, "instructions": sum(ops.values()),
            "mma": sum(v for k, v in ops.items() if k.startswith("mma.") or "mma_async" in k),
            "cvt": sum(v for k, v in ops.items() if k.startswith("cvt")),
            "shared st": sum(v for k, v in ops.items() if k.startswith("st.shared"))}


def quant_rows() -> list[dict]:
    """The quantized GEMM's variants at the tiles the plan gives them."""
    int4 = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*fp32", "z_ptr": "*u8", "out_ptr": "*bf16"}
    fp8 = {**int4, "w_ptr": "*fp8e4nv", "z_ptr": "*fp32"}
    cases = [("int4 UNPACK 3, 1-8 rows", int4, dict(INT4=True, UNPACK=3, BM=16, BN=64), 4, 5),
             ("int4 UNPACK 3 fp16, 9-16 rows", {**int4, "x_ptr": "*fp16", "out_ptr": "*fp16"},
              dict(INT4=True, UNPACK=3, BM=16, BN=128), 4, 5),
             ("int4 UNPACK 2, 64 rows", int4, dict(INT4=True, UNPACK=2, BM=64, BN=128), 4, 3),
             ("fp8 UNPACK 0, 1-16 rows", fp8, dict(INT4=False, UNPACK=0, BM=16, BN=64), 4, 3),
             ("fp8 W8A8, 1-16 rows", fp8, dict(INT4=False, UNPACK=3, ACT_FP8=True, BM=16, BN=64), 4, 3),
             ("fp8 W8A8, prefill tile", fp8, dict(INT4=False, UNPACK=3, ACT_FP8=True, BM=64, BN=128), 4, 3)]
    rows = []
    for name, types, consts, warps, stages in cases:
        consts = {"GROUP": 128, "IEEE": False, "BK": 128, "ACT_FP8": False, **consts}
        rows.append({"kernel": name, **compile_one(quant._gemm_kernel, types, consts, warps, stages)})
    # int4: x plane-major fp32, or (F16_FMA) plane_major_f16's words
    for kind, types, f16 in (("int4", {**int4, "x_ptr": "*fp32"}, False), ("int4", {**int4, "x_ptr": "*i32"}, True),
                             ("fp8", fp8, False)):
        for bn, warps in ((64, 4), (128 if kind == "int4" else 64, 8)):
            consts = dict(GROUP=128, INT4=kind == "int4", BM=1, BN=bn, BK=128, EVEN_N=True, EVEN_K=True, F16_FMA=f16)
            rows.append({"kernel": f"{kind} GEMV{' F16_FMA' if f16 else ''}, 1 row, BN {bn}, {warps} warps",
                         **compile_one(quant._gemv_kernel, types, consts, warps, 3)})
    return rows


def decode_rows() -> list[dict]:
    """The fp8-page decode kernel at its tuned tile, dots in bf16 and in fp16 (F16_DOTS), 27B's GQA group."""
    types = {"q_ptr": "*bf16", "kc_ptr": "*fp8e4nv", "vc_ptr": "*fp8e4nv", "ks_ptr": "*fp32", "vs_ptr": "*fp32",
             "part_o_ptr": "*fp32", "part_lse_ptr": "*fp32", "bt_ptr": "*i32", "seq_lens_ptr": "*i32",
             "qk_scale": "fp32"}
    rows = []
    for f16 in (False, True):
        consts = dict(GROUP=6, HEAD_DIM=256, PAGE_SIZE=16, BLOCK_H=16, BLOCK_N=128, BLOCK_D=256, UPCAST=False,
                      PREC="tf32", QUANT=1, F16_DOTS=f16)
        rows.append({"kernel": f"fp8 KV decode, {'fp16' if f16 else 'bf16'} dots",
                     **compile_one(triton_decode._decode_split_kernel, types, consts, 4, 4)})
    return rows


def main() -> None:
    print(f"triton {triton.__version__}, target sm_90a (compile only, no GPU)")
    print(table(quant_rows() + decode_rows()))


if __name__ == "__main__":
    main()
