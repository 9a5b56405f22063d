"""Kernel-only timing of the quantized GEMMs at decode sizes (27B / 35B-A3B projection shapes) against torch's bf16
GEMM and the weight-read floor (bytes of the stored weight and scales over the measured copy bandwidth).

python benchmarks/bench_quant_kernels.py [--rows 1 16 64]
"""

from __future__ import annotations

import argparse

import torch
import triton.testing

from benchmarks.common import measure_copy_bandwidth, table
from deltaserve.kernels.quant import ref
from deltaserve.kernels.quant import triton as qt

SHAPES = {"27B gate_up": (34816, 5120), "27B down": (5120, 17408), "27B in_proj": (16384, 5120),
          "35B in_proj": (12288, 2048), "35B o_proj": (2048, 4096)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 16, 64])
    args = ap.parse_args()
    bw = measure_copy_bandwidth()
    rows = []
    for name, (n, k) in SHAPES.items():
        codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, device="cuda")
        qw = ref.pack_int4(codes)
        s = torch.rand(n, k // 128, device="cuda") * 0.01
        z = torch.full((n, k // 128), 8, dtype=torch.uint8, device="cuda")
        w8 = torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn)
        wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        for m in args.rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t = {"bf16": triton.testing.do_bench(lambda: torch.nn.functional.linear(x, wb), return_mode="median")}
            for u in (0, 1, 2):
                t[f"int4 u{u}"] = triton.testing.do_bench(lambda: qt.quant_gemm(x, qw, s, z, 128, unpack=u),
                                                          return_mode="median")
            t["fp8"] = triton.testing.do_bench(lambda: qt.quant_gemm(x, w8, s, None, 128), return_mode="median")
            floor = {"bf16": n * k * 2, "int4": n * k / 2 + s.numel() * 5, "fp8": n * k + s.numel() * 4}
            row = {"shape": name, "rows": m}
            for key, ms in t.items():
                fb = floor[key.split()[0]] / bw * 1e3
                row[f"{key} us"] = ms * 1e3
                row[f"{key} /floor"] = ms / fb
            rows.append(row)
            print(row, flush=True)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    print(table(rows))


if __name__ == "__main__":
    main()
