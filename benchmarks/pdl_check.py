"""PTX evidence for Programmatic Dependent Launch without a GPU (compile_check.py's approach: Triton compiles each
kernel for sm_90a offline). For every kernel that takes part (`PDL` constexpr), at decode-like shapes:

- PDL on: how many griddepcontrol.wait / griddepcontrol.launch_dependents the PTX holds (expected: >= 1 each), and
  the global loads / stores its SASS issues before the wait (ACQBULK): stores must be 0; loads only where the
  kernel prefetches weights (none now: the skinny linear waits first); registers and spills from ptxas, off and on;
- PDL off: the PTX must hold none, and be byte-identical to the same kernel compiled from another tree (default: the
  `main` branch, extracted with `git archive`), which has no PDL parameter. Line info is compiled out
  (TRITON_DISABLE_LINE_INFO=1) for that comparison: the added lines shift the kernels' source line numbers, which
  the debug info records, and the two trees live at different paths.

PYTHONPATH=src:. python benchmarks/pdl_check.py [--against main]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

# (module, kernel, pointer / float types (other args: i32), constexprs, num_warps, num_stages)
SPECS = [
    ("linear.triton", "_skinny_linear_kernel", {"ws_ptr": "*fp32", "count_ptr": "*i32"},
     dict(BM=16, BN=64, BK=256, STAGES=4, SPLIT=1, EVEN_K=True, UPCAST=False), 4, 3),
    ("linear.triton", "_skinny_linear_kernel", {"ws_ptr": "*fp32", "count_ptr": "*i32"},
     dict(BM=16, BN=32, BK=256, STAGES=4, SPLIT=4, EVEN_K=False, UPCAST=False), 4, 3),
    ("moe.triton", "_topk_softmax_kernel", {"w_ptr": "*fp32", "ids_ptr": "*i64"},
     dict(TOP_K=8, BLOCK_E=256, BLOCK_TOPK=8), 1, 3),
    ("moe.triton", "_gate_up_kernel", {"ids_ptr": "*i64", "act_ptr": "*fp32"},
     dict(ACT_W=512, D=2048, TOP_K=8, HAS_SHARED=1, BLOCK_N=8, BLOCK_K=512, UNROLL_K=True), 4, 3),
    ("moe.triton", "_down_kernel", {"act_ptr": "*fp32", "ids_ptr": "*i64"},
     dict(ACT_W=512, TOP_K=8, HAS_SHARED=1, BLOCK_N=4, BLOCK_K=512, NUM_E=256), 2, 3),
    ("norm.triton", "_rms_norm_kernel", {"eps": "fp32"},
     dict(D=4096, BLOCK_R=1, BLOCK_D=4096, HAS_RESIDUAL=True), 8, 3),
    ("norm.triton", "_gated_rms_norm_kernel", {"eps": "fp32"}, dict(G_HEADS=32, D=128, BLOCK_R=32, BLOCK_D=128), 8, 3),
    ("activation.triton", "_silu_and_mul_kernel", {}, dict(I=12288, BLOCK=1024), 4, 3),
    ("activation.triton", "_sigmoid_gate_mul_kernel", {}, dict(HD=4096, D=256, BLOCK=1024), 4, 3),
    ("conv1d.triton", "_conv1d_update_kernel", {"slot_ptr": "*i64"}, dict(W=4, WP=4, BC=256), 2, 3),
    ("gated_delta_rule.triton", "_decode_recurrent_kernel",
     {"alog_ptr": "*fp32", "dtb_ptr": "*fp32", "ss_ptr": "*fp32", "slot_ptr": "*i64", "scale": "fp32", "eps": "fp32"},
     dict(H=16, HV=48, K=128, V=128, BK=128, BV=16, NV=8), 1, 3),
    ("attention.triton", "_qk_norm_rope_write_kv_kernel",
     {"ks_ptr": "*fp32", "vs_ptr": "*fp32", "pos_ptr": "*i64", "slot_ptr": "*i64", "inv_freq_ptr": "*fp32",
      "eps": "fp32"},
     dict(HQ=24, HK=4, D=256, HALF=32, PAGE_SIZE=16, BLOCK_HQ=32, BLOCK_HK=4, BLOCK_D=256, QUANT=0, QMAX=0.0), 4, 3),
    ("attention.triton_decode", "_decode_split_kernel",
     {"ks_ptr": "*fp32", "vs_ptr": "*fp32", "part_o_ptr": "*fp32", "part_lse_ptr": "*fp32", "bt_ptr": "*i32",
      "seq_lens_ptr": "*i32", "qk_scale": "fp32"},
     dict(GROUP=6, HEAD_DIM=256, PAGE_SIZE=16, BLOCK_H=16, BLOCK_N=64, BLOCK_D=256, UPCAST=False, PREC="tf32",
          QUANT=0), 4, 3),
    ("attention.triton_decode", "_decode_reduce_kernel", {"part_o_ptr": "*fp32", "part_lse_ptr": "*fp32"},
     dict(HEAD_DIM=256, BLOCK_S=16, BLOCK_D=256), 4, 3),
    ("quant.triton", "_plane_major_f16_kernel", {"h_ptr": "*fp16", "f_ptr": "*fp32"}, dict(BK=128), 1, 3),
    ("quant.triton", "_act_f16_kernel", {"h_ptr": "*fp16", "f_ptr": "*fp32"}, dict(BK=128), 1, 3),
    ("quant.triton", "_gemv_kernel", {"x_ptr": "*i32", "w_ptr": "*i32", "s_ptr": "*fp32", "z_ptr": "*u8",
                                      "ws_ptr": "*fp32", "count_ptr": "*i32"},
     dict(GROUP=128, INT4=True, BM=1, BN=128, BK=128, EVEN_N=True, EVEN_K=True, F16_FMA=True, F16_WORDS=4, SPLIT=4),
     8, 3),
    ("quant.triton", "_gemm_kernel", {"w_ptr": "*i32", "s_ptr": "*fp32", "z_ptr": "*u8", "ws_ptr": "*fp32",
                                      "count_ptr": "*i32"},
     dict(GROUP=128, INT4=True, IEEE=False, BM=16, BN=64, BK=128, UNPACK=0, SPLIT=2), 4, 5),
    ("quant.triton", "_moe_gate_up_kernel", {"x_ptr": "*i32", "ids_ptr": "*i64", "w_ptr": "*i32", "s_ptr": "*fp32",
                                             "z_ptr": "*u8", "sw_ptr": "*i32", "ss_ptr": "*fp32", "sz_ptr": "*u8",
                                             "act_ptr": "*fp32", "ws_ptr": "*fp32", "count_ptr": "*i32"},
     dict(TOP_K=8, HAS_SHARED=1, GROUP=128, INT4=True, BN=64, BK=128, SPLIT=4, ACT_BK=128, EVEN_N=True, EVEN_K=True,
          F16=True, F16_WORDS=1), 4, 3),
    ("quant.triton", "_moe_down_kernel", {"act_ptr": "*fp32", "ids_ptr": "*i64", "weights_ptr": "*fp32",
                                          "w_ptr": "*i32", "s_ptr": "*fp32", "z_ptr": "*u8", "sw_ptr": "*i32",
                                          "ss_ptr": "*fp32", "sz_ptr": "*u8", "ws_ptr": "*fp32", "count_ptr": "*i32"},
     dict(TOP_K=8, HAS_SHARED=1, GROUP=128, INT4=True, BN=64, BK=128, EVEN_N=True, EVEN_K=True), 8, 3),
]
# marked divisible by 16, as Triton specializes them at real shapes (unmarked, K_SPLIT would scalarize W's loads)
_DIVISIBLE = ("N", "K", "K_SPLIT", "D", "C", "E", "I_R", "I_S")  # and every stride but these:
_NOT_DIVISIBLE = ("stride_sg",)  # the shared-expert gate [T, 1]


def label(spec) -> str:
    module, kernel, _, consts, *_ = spec
    extra = f" SPLIT={consts['SPLIT']}" if "SPLIT" in consts else ""
    return f"{module.split('.')[0]}.{kernel}{extra}"


def compile_ptx(spec, pdl: bool | None) -> str:
    """The kernel's sm_90a PTX; pdl None: the tree's kernel as it is (no PDL argument passed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, kernel, types, consts, warps, stages = spec
    fn = getattr(importlib.import_module(f"deltaserve.kernels.{module}"), kernel)
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}  # the other tree may lack some (NUM_E)
    # constexpr parameters with defaults the spec leaves out (F16_DOTS..., and PDL itself) take their defaults
    for p in fn.params:
        if p.is_constexpr and p.name not in consts and p.default is not p._param.empty:
            consts[p.name] = p.default
    if pdl is not None:
        consts["PDL"] = pdl
    sig = {n: ("constexpr" if n in consts else types.get(n, "*bf16" if n.endswith("_ptr") else "i32"))
           for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if n.endswith("_ptr") or n in _DIVISIBLE or (n.startswith("stride") and n not in _NOT_DIVISIBLE)}
    options = {"num_warps": warps, "num_stages": stages}
    if pdl:
        options["launch_pdl"] = True
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options=options)
    return k.asm["ptx"]


def assemble(ptx: str) -> tuple[int, int, str]:
    """(registers, spill store bytes, SASS) for sm_90a (ptxas and cuobjdump ship with Triton)."""
    import triton

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as d:
        path, cubin = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
        with open(path, "w") as f:
            f.write(ptx)
        log = subprocess.run([os.path.join(bin_dir, "ptxas"), "-arch=sm_90a", "-v", path, "-o", cubin],
                             capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([os.path.join(bin_dir, "cuobjdump"), "-sass", cubin], capture_output=True, text=True,
                              check=True).stdout
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", log).group(1))
    return regs, spills, sass


# SASS: griddepcontrol.wait assembles to ACQBULK, launch_dependents to PREEXIT
_SASS_OP = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


def before_wait(sass: str) -> tuple[int, int]:
    """(global loads, global stores and atomics) the SASS issues before ACQBULK: the prologue that overlaps the
    previous kernel (only weight loads are allowed there, _pdl.py's rule 1); (0, 0) without PDL."""
    ops = [m.group(1) for m in map(_SASS_OP.search, sass.splitlines()) if m]
    if "ACQBULK" not in ops:
        return 0, 0
    head = ops[:ops.index("ACQBULK")]
    return (sum(op.startswith(("LDG", "LDGSTS")) for op in head),
            sum(op.startswith(("STG", "ATOM", "RED")) for op in head))


def summary(ptx: str) -> dict:
    regs, spills, sass = assemble(ptx)
    loads, stores = before_wait(sass)
    return {"regs": regs, "spill": spills, "loads before wait": loads, "stores before wait": stores,
            "sha1": hashlib.sha1(ptx.encode()).hexdigest()[:10], "lines": ptx.count("\n"),
            "wait": ptx.count("griddepcontrol.wait"),
            "launch_dependents": ptx.count("griddepcontrol.launch_dependents")}


def collect(with_pdl: bool) -> dict:
    out = {}
    for spec in SPECS:
        fn = getattr(importlib.import_module(f"deltaserve.kernels.{spec[0]}"), spec[1])
        has = "PDL" in fn.arg_names
        row = {"off": summary(compile_ptx(spec, False if has else None))}
        if with_pdl and has:
            row["on"] = summary(compile_ptx(spec, True))
        out[label(spec)] = row
    return out


def run_tree(src: str, with_pdl: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.path.dirname(os.path.dirname(__file__))]),
           "TRITON_DISABLE_LINE_INFO": "1", "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": tempfile.mkdtemp()}
    res = subprocess.run([sys.executable, __file__, "--collect"] + (["--pdl"] if with_pdl else []), env=env,
                         capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"compiling the kernels of {src} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--against", default="main", help="git ref whose kernels PDL-off must equal")
    ap.add_argument("--collect", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--pdl", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.collect:
        print(json.dumps(collect(args.pdl)))
        return
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                          check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as d:
        subprocess.run(f"git -C {root} archive {args.against} src | tar -x -C {d}", shell=True, check=True)
        base = run_tree(os.path.join(d, "src"), False)
    ours = run_tree(os.path.join(root, "src"), True)
    bad = 0
    print(f"sm_90a PTX (line info off), this tree vs {args.against}")
    print(f"{'kernel':48} {'PDL off sha1':>12} {args.against + ' sha1':>12} {'same':>5} {'off wait/ld':>11} "
          f"{'on wait/ld':>10} {'regs off/on':>11} {'spill off/on':>12} {'on: LDG/STG before ACQBULK':>27}")
    for name, row in ours.items():
        off, on, ref = row["off"], row.get("on"), base[name]["off"]
        same = off["sha1"] == ref["sha1"]
        ok = same and off["wait"] == off["launch_dependents"] == 0 and on and on["wait"] >= 1 and \
            on["launch_dependents"] >= 1 and on["stores before wait"] == 0
        bad += not ok
        print(f"{name:48} {off['sha1']:>12} {ref['sha1']:>12} {str(same):>5} "
              f"{off['wait']:>5}/{off['launch_dependents']:<5} {on['wait'] if on else '-':>4}/"
              f"{on['launch_dependents'] if on else '-':<5} {off['regs']:>5}/{on['regs'] if on else '-':<5} "
              f"{off['spill']:>6}/{on['spill'] if on else '-':<5} "
              f"{on['loads before wait'] if on else '-':>21}/{on['stores before wait'] if on else '-':<5}"
              f"{'' if ok else '  FAIL'}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
