"""The block-grouped MoE path (kernels/moe/blocked.py): the block plan, the gate|up kernel (x gathered
through the pair ids, SiLU-and-mul in its epilogue) and the down kernel, with the combine, against ref.fused_moe.
Without a GPU the kernels run under TRITON_INTERPRET=1 at tiny shapes with small tiles (several blocks an expert,
ragged N and K); `pytest -m gpu` runs them compiled at the 35B-A3B and 122B-A10B expert shapes at prefill sizes."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' import (read at @triton.jit time)

triton = pytest.importorskip("triton")

from tests.kernels.test_moe_grouped import (ROUTINGS, moe_inputs, poison_allocator, rel_error,  # noqa: E402
                                            shared_output)
from tests.tolerances import assert_close  # noqa: E402

from deltaserve.kernels.moe import blocked, ref  # noqa: E402

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SMALL_TILES = {"tiles": (16, (16, 16, 1, 1), (16, 16, 1, 1))}


@pytest.fixture(autouse=True, scope="module")
def _interpreter_like_the_gpu(interpreter_rounds_like_the_gpu):
    yield


def run(kw, **tiles):
    routed = {k: kw[k] for k in ("x", "w13", "w2", "topk_weights", "topk_ids")}
    return blocked.fused_moe(**routed, **shared_output(kw), **tiles)


def test_block_plan():
    """Expert e's sorted rows in blocks of bm: starts[e + 1] - starts[e] = ceil(rows / bm); ids < 0 in no block;
    the grid's bound covers the worst routing (every expert with a partial block)."""
    ids = torch.tensor([[2, 0], [2, -1], [1, 2], [2, 2]])
    order, bounds, starts, pos = blocked.block_plan(ids, 4, 2)
    assert bounds.tolist() == [1, 2, 3, 8, 8]  # one id < 0 first, then experts 0, 1, 2 (5 rows), 3 (none)
    assert starts.dtype == torch.int32 and starts.tolist() == [0, 1, 2, 5, 5]
    assert sorted(order[1:].tolist()) == [0, 1, 2, 4, 5, 6, 7] and torch.equal(pos.reshape(-1), torch.arange(8))
    assert blocked.max_blocks(8, 4, 2) == 8 >= starts[-1]


@pytest.mark.parametrize("kind", ROUTINGS)
@pytest.mark.parametrize("shared_inter", [0, 12])
def test_blocked_fp32_interpreter(kind, shared_inter):
    """fp32, 16-row blocks: 37 tokens x top-3 over 12 experts (an expert over several blocks, 'one' puts all 37 on
    one expert), D=40 in three K blocks (the last ragged), I=20 in two N blocks (ragged); ids < 0 and empty experts
    contribute nothing."""
    kw = moe_inputs(37, 40, 20, 12, 3, torch.float32, "cpu", seed=5, kind=kind, shared_inter=shared_inter)
    got = run(kw, **SMALL_TILES)
    assert got.dtype == torch.float32 and got.shape == kw["x"].shape
    assert_close(got, ref.fused_moe(**kw))


@pytest.mark.parametrize("kind", ["one", "gaps"])
def test_blocked_split_blocks_interpreter(kind, monkeypatch):
    """SPLIT: blocks of at most half of BLOCK_M rows run a half-height tile. 32-row blocks (split from 32 rows on,
    for the test: the GPU's rule starts at 128) over 37 tokens x top-3 routed to 12 experts, with blocks of both
    heights; the same output as the reference."""
    monkeypatch.setattr(blocked, "SPLIT_MIN_M", 32)
    kw = moe_inputs(37, 40, 20, 12, 3, torch.float32, "cpu", seed=9, kind=kind, shared_inter=12)
    _, bounds, _, _ = blocked.block_plan(kw["topk_ids"], 12, 32)
    rows = bounds[1:] - bounds[:-1]
    assert ((rows > 0) & (rows % 32 <= 16) & (rows % 32 > 0)).any()  # a half-height block
    assert (rows > 16).any()  # a full one
    assert_close(run(kw, tiles=(32, (16, 16, 1, 1), (16, 16, 1, 1))), ref.fused_moe(**kw))


@pytest.mark.parametrize("tma", [True, False])
def test_blocked_even_k_interpreter(tma, monkeypatch):
    """K a multiple of BLOCK_K in both kernels (D = 48, I = 32): the unmasked K loads the GPU shapes take; weights
    by tensor descriptor and by pointer."""
    monkeypatch.setattr(blocked, "TMA_WEIGHTS", tma)
    kw = moe_inputs(19, 48, 32, 12, 3, torch.float32, "cpu", seed=8, kind="dropped", shared_inter=16)
    assert (blocked._descriptor(kw["w13"], 16, 16, None) is not None) == tma
    assert_close(run(kw, **SMALL_TILES), ref.fused_moe(**kw))


def test_blocked_unaligned_rows_load_by_pointer():
    """A weight row of 37 fp32 (148 bytes) breaks the descriptor's 16-byte rule: the kernels load by pointer."""
    kw = moe_inputs(9, 37, 20, 6, 2, torch.float32, "cpu", seed=3)
    assert blocked._descriptor(kw["w13"], 16, 16, None) is None
    assert blocked._descriptor(kw["w2"], 16, 16, None) is not None  # I = 20: 80-byte rows
    assert_close(run(kw, **SMALL_TILES), ref.fused_moe(**kw))


def test_blocked_bf16_interpreter():
    """bf16 with the default tiles (clamped to the tiny shape): act and y rounded to bf16, the sum in fp32."""
    kw = moe_inputs(21, 40, 20, 12, 3, torch.bfloat16, "cpu", seed=6, shared_inter=12)
    got = run(kw)
    assert got.dtype == torch.bfloat16 and not got.isnan().any()
    assert rel_error(got, kw) < 5e-3


def test_blocked_needs_both_shared_inputs():
    kw = moe_inputs(3, 8, 4, 4, 2, torch.float32, "cpu", seed=0)
    with pytest.raises(ValueError, match="come together"):
        blocked.fused_moe(**kw, shared=kw["x"])


MODELS = {"35B-A3B": (2048, 512, 256, 8, 512), "122B-A10B": (3072, 1024, 256, 8, 1024)}  # D, I, E, top_k, I_s


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("tokens,kind", [(333, "dropped"), (2048, "dropped"), (1111, "one"), (517, "gaps"),
                                         (300, "none"), (4096, "dropped"), (2500, "one")])
def test_blocked_gpu(model, tokens, kind):
    """Compiled, at the real expert shapes, against the fp32 reference; the act, y and output allocations
    NaN-poisoned. 'one': all tokens on one expert (many blocks of it); 'none': no routed expert at all. 4,096 tokens
    (past 16,384 pairs) and 'one' at 2,500 tokens (the tiles forced) run 128-row blocks with SPLIT on, full-height
    blocks (test_blocked_configs_gpu's 999 tokens give 128-row configs only short, half-height ones)."""
    dim, inter, experts, top_k, shared_inter = MODELS[model]
    kw = moe_inputs(tokens, dim, inter, experts, top_k, torch.bfloat16, "cuda", seed=tokens, kind=kind,
                    shared_inter=shared_inter)
    pairs = tokens * top_k
    poison_allocator((tokens, dim), (pairs, dim), (pairs, inter))
    got = run(kw, tiles=blocked.TILES[-1][1:]) if kind == "one" and tokens > 2048 else run(kw)
    assert got.dtype == torch.bfloat16 and not got.isnan().any()
    assert rel_error(got, kw) < 1e-2


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("tiles", blocked.CONFIGS)
def test_blocked_configs_gpu(tiles):
    dim, inter, experts, top_k, shared_inter = MODELS["35B-A3B"]
    kw = moe_inputs(999, dim, inter, experts, top_k, torch.bfloat16, "cuda", seed=2, shared_inter=shared_inter)
    assert rel_error(run(kw, tiles=tiles), kw) < 1e-2


@pytest.mark.gpu
@needs_gpu
def test_blocked_cuda_graph_gpu():
    """No host syncs, no data-dependent shapes: captured once, replayed on new routing, equal to eager."""
    dim, inter, experts, top_k, shared_inter = MODELS["35B-A3B"]
    kw = moe_inputs(333, dim, inter, experts, top_k, torch.bfloat16, "cuda", seed=12, shared_inter=shared_inter)
    run(kw)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = run(kw)
    fresh = moe_inputs(333, dim, inter, experts, top_k, torch.bfloat16, "cuda", seed=13, kind="gaps",
                       shared_inter=shared_inter)
    for name in ("x", "topk_weights", "topk_ids", "shared_gate"):
        kw[name].copy_(fresh[name])
    graph.replay()
    assert torch.equal(static_out, run(kw))


H100_SMEM = 232448  # bytes of shared memory a program may use on an H100 / H200 (Triton's launch limit)
_SMEM_CHECK = """
import json, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from deltaserve.kernels.moe import blocked
out = []
for bm, gate_up, down in [t[1:] for t in blocked.TILES]:
    for fn, cfg, weights, n, k in ((blocked._gate_up_kernel, gate_up, 2, 512, 2048),
                                   (blocked._down_kernel, down, 1, 2048, 512)):
        bn, bk, warps, stages = blocked.fit_tile(cfg, n, k, None, bm=bm, weights=weights, elt=4, smem=%d)
        consts = dict(TOP_K=8, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_E=512, EVEN_K=True, IEEE=True)
        consts = {c: v for c, v in consts.items() if c in fn.arg_names}
        ptr = {a: "*i64" if a == "order_ptr" else "*i32" if a.endswith(("bounds_ptr", "starts_ptr")) else "*fp32"
               for a in fn.arg_names if a.endswith("_ptr")}
        ptr["w_desc"] = f"tensordesc<fp32[1,{bn},{bk}]>"
        sig = {a: "constexpr" if a in consts else ptr.get(a, "i32") for a in fn.arg_names}
        consts.update(W_TILE=None, GROUP=0, EVEN_W=False)
        sig.update(W_TILE="constexpr", GROUP="constexpr", EVEN_W="constexpr")
        kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                                target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
        out.append([fn.__name__, bm, kernel.metadata.shared])
print(json.dumps(out))
"""


def test_blocked_fp32_tiles_fit_shared_memory():
    """fp32 activations at the real tiles, compiled for sm_90 (no GPU needed): the pipelined x and weight tiles
    of every TILES entry fit an H100's shared memory once fit_tile trims the stages (4 stages of the gate|up kernel
    took 240-288 KB: an OutOfResources launch failure for fp32 MoE models past 512 routed pairs)."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled, not interpreted
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", _SMEM_CHECK % H100_SMEM], env=env, cwd=root, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    used = json.loads(out.stdout.splitlines()[-1])
    assert len(used) == 2 * len(blocked.TILES)
    assert all(smem <= H100_SMEM for _, _, smem in used), used
