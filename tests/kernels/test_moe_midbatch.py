"""The expert-centric MoE path (kernels/moe/midbatch.py): the row sort, the gate|up and down kernels (shared expert as
program 0) and the combine, against ref.fused_moe. Without a GPU the kernels run under TRITON_INTERPRET=1 at tiny
shapes with small tiles (several N and K blocks, ragged; experts over several 16-row chunks); `pytest -m gpu` runs
them compiled at the 35B-A3B and 122B-A10B expert shapes for decode batches 8-128."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' import (read at @triton.jit time)

triton = pytest.importorskip("triton")

from tests.kernels.test_moe_grouped import ROUTINGS, moe_inputs, poison_allocator, rel_error, routing  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

from deltaserve.kernels.moe import midbatch, ref  # noqa: E402

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SMALL_TILES = {"gate_up_config": (16, 16, 16, 1, 1), "down_config": (16, 16, 16, 1, 1)}


@pytest.fixture(autouse=True, scope="module")
def _interpreter_like_the_gpu(interpreter_rounds_like_the_gpu):
    yield


@pytest.fixture
def nan_empty(monkeypatch):
    """torch.empty of a floating dtype returns NaN: any element read before it is written shows in the result."""
    real = torch.empty

    def empty(*args, **kw):
        t = real(*args, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)


@pytest.mark.parametrize("kind", ROUTINGS)
def test_sort_rows(kind):
    gen = torch.Generator().manual_seed(1)
    experts, top_k, tokens = 12, 3, 37
    _, ids = routing(tokens, experts, top_k, kind, gen)
    order, bounds, pos = midbatch.sort_rows(ids, experts)
    assert bounds.dtype == torch.int32 and bounds.shape == (experts + 1,)
    assert bounds[0] == (ids < 0).sum() and bounds[-1] == ids.numel()
    flat = ids.reshape(-1)
    for e in range(experts):  # expert e's rows: its pairs, in pair (token) order
        assert torch.equal(order[bounds[e]:bounds[e + 1]], (flat == e).nonzero().reshape(-1))
    assert torch.equal(pos.reshape(-1), torch.arange(ids.numel()))


def test_sort_rows_refuses_experts_past_int16_keys():
    with pytest.raises(ValueError, match="40000 experts do not fit the int16 sort keys"):
        midbatch.sort_rows(torch.tensor([[1, 2]]), 40000)


@pytest.mark.parametrize("kind", ROUTINGS)
@pytest.mark.parametrize("inter,shared_inter", [(20, 0), (20, 12), (12, 20)])
def test_mid_fp32_interpreter(kind, inter, shared_inter, nan_empty):
    """fp32, small tiles: D=40 in three K blocks (the last ragged), the routed and shared widths in one or two N
    blocks (a routed program past its width exits); 'one' puts all 37 tokens on one expert (three 16-row chunks);
    ids < 0 and empty experts contribute nothing; intermediates NaN-poisoned."""
    kw = moe_inputs(37, 40, inter, 12, 3, torch.float32, "cpu", seed=5, kind=kind, shared_inter=shared_inter)
    got = midbatch.fused_moe_mid(**kw, **SMALL_TILES)
    assert got.dtype == torch.float32 and got.shape == kw["x"].shape
    assert_close(got, ref.fused_moe(**kw))


def test_mid_even_k_interpreter(nan_empty):
    """K a multiple of BLOCK_K in both kernels (D = 48, I = 32, I_s = 16 with 16-wide K blocks): the unmasked K
    loads the GPU shapes take."""
    kw = moe_inputs(19, 48, 32, 12, 3, torch.float32, "cpu", seed=8, kind="dropped", shared_inter=16)
    assert_close(midbatch.fused_moe_mid(**kw, **SMALL_TILES), ref.fused_moe(**kw))


@pytest.mark.parametrize("shared_inter", [0, 12])
def test_mid_bf16_interpreter(shared_inter, nan_empty):
    """bf16 with the default tiles (clamped to the tiny shape): act and y rounded to bf16, the sum in fp32."""
    kw = moe_inputs(21, 40, 20, 12, 3, torch.bfloat16, "cpu", seed=6, shared_inter=shared_inter)
    got = midbatch.fused_moe_mid(**kw)
    assert got.dtype == torch.bfloat16 and not got.isnan().any()
    assert rel_error(got, kw) < 5e-3  # ~2.5e-3 (the grouped path: ~3.5e-3; the reference run in bf16: 1.6e-3)


def test_mid_needs_all_shared_inputs():
    kw = moe_inputs(3, 8, 4, 4, 2, torch.float32, "cpu", seed=0, shared_inter=4)
    del kw["shared_gate"]
    with pytest.raises(ValueError):
        midbatch.fused_moe_mid(**kw)


MODELS = {"35B-A3B": (2048, 512, 256, 8, 512), "122B-A10B": (3072, 1024, 256, 8, 1024)}  # D, I, E, top_k, I_s


@pytest.fixture(scope="module")
def weights():
    """One model's expert weights at a time (122B-A10B's are 4.8 GB), shared by its tests."""
    cache = {}

    def get(model):
        if model not in cache:
            cache.clear()
            torch.cuda.empty_cache()
            dim, inter, experts, top_k, shared_inter = MODELS[model]
            cache[model] = moe_inputs(1, dim, inter, experts, top_k, torch.bfloat16, "cuda", seed=7,
                                      shared_inter=shared_inter)
        return cache[model]

    return get


def gpu_case(weights, model, tokens, kind, seed):
    dim, inter, experts, top_k, _ = MODELS[model]
    kw = dict(weights(model))
    gen = torch.Generator().manual_seed(seed)
    w, ids = routing(tokens, experts, top_k, kind, gen, "cuda")
    kw.update(x=torch.randn(tokens, dim, generator=gen).bfloat16().cuda(), topk_weights=w.bfloat16(), topk_ids=ids,
              shared_gate=torch.randn(tokens, experts + 1, generator=gen).bfloat16().cuda()[:, experts:])
    return kw


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("tokens", [8, 16, 32, 64, 128])
def test_mid_gpu(weights, model, tokens):
    """Random routing with dropped slots, NaN-poisoned intermediates and output, against the fp32 reference."""
    kw = gpu_case(weights, model, tokens, "dropped", seed=tokens)
    dim, inter, _, top_k, shared_inter = MODELS[model]
    rows = tokens * (top_k + 1)
    poison_allocator((tokens, dim), (rows, dim), (rows, max(inter, shared_inter)))
    got = midbatch.fused_moe_mid(**kw)
    assert got.dtype == torch.bfloat16 and not got.isnan().any()
    assert rel_error(got, kw) < 1e-2



@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("kind", ["one", "gaps", "none"])
@pytest.mark.parametrize("config", midbatch.CONFIGS)
def test_mid_routings_and_configs_gpu(weights, kind, config):
    """Every sweep config; all 128 tokens on one expert (eight chunks), only odd experts, no routed expert at all."""
    kw = gpu_case(weights, "35B-A3B", 128, kind, seed=3)
    poison_allocator((128, 2048), (128 * 9, 2048), (128 * 9, 512))
    got = midbatch.fused_moe_mid(**kw, gate_up_config=config, down_config=config)
    assert not got.isnan().any()
    assert rel_error(got, kw) < 1e-2



@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("inter,shared_inter", [(20, 12), (12, 20)])
def test_mid_fp32_gpu(inter, shared_inter):
    """fp32 on the GPU multiplies in IEEE fp32 (not tf32): within fp32 tolerance of the reference."""
    for kind in ROUTINGS:
        kw = moe_inputs(37, 40, inter, 12, 3, torch.float32, "cuda", seed=5, kind=kind, shared_inter=shared_inter)
        assert_close(midbatch.fused_moe_mid(**kw), ref.fused_moe(**{k: v.cpu() for k, v in kw.items()}))



@pytest.mark.gpu
@needs_gpu
def test_mid_dispatch_and_cuda_graph_gpu(weights):
    """gpu.fused_moe takes this path at batch 16 (35B-A3B); captured once, replayed on new routing, equal to eager."""
    from deltaserve.kernels.moe import gpu as moe_gpu

    assert moe_gpu.pick_path(16 * 8) == "mid"
    kw = gpu_case(weights, "35B-A3B", 16, "dropped", seed=1)
    moe_gpu.fused_moe(**kw)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = moe_gpu.fused_moe(**kw)
    fresh = gpu_case(weights, "35B-A3B", 16, "gaps", seed=2)
    for name in ("x", "topk_weights", "topk_ids", "shared_gate"):
        kw[name].copy_(fresh[name])
    graph.replay()
    assert torch.equal(static_out, midbatch.fused_moe_mid(**kw))
    assert rel_error(static_out, kw) < 1e-2



_SMEM_CHECK = """
import json, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from deltaserve.kernels.moe import midbatch
out = []
for arch, smem in ((90, 232448), (80, 166912)):
    for fn, cfg, weights, n, k in ((midbatch._gate_up_kernel, midbatch.GATE_UP_CONFIG, 2, 512, 2048),
                                   (midbatch._down_kernel, midbatch.DOWN_CONFIG, 1, 2048, 512)):
        bm, *tile = cfg
        bn, bk, warps, stages = midbatch.fit_tile(tile, n, k, None, bm=bm, weights=weights, elt=4, smem=smem)
        consts = dict(TOP_K=8, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=True, IEEE=True)
        ptr = {a: "*i64" if a == "order_ptr" else "*i32" if a == "bounds_ptr" else "*fp32"
               for a in fn.arg_names if a.endswith("_ptr")}
        sig = {a: "constexpr" if a in consts else ptr.get(a, "i32") for a in fn.arg_names}
        kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                                target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, num_stages=stages))
        out.append([fn.__name__, arch, stages, kernel.metadata.shared, smem])
print(json.dumps(out))
"""


def test_mid_fp32_tiles_fit_shared_memory():
    """fp32 activations at the default tiles, compiled for an H100 (sm_90) and an A100 (sm_80, 163 KB) without a GPU:
    fit_tile trims the pipeline stages so both kernels fit (the gate|up kernel's 4 stages took ~220 KB: past the
    A100's limit)."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled, not interpreted
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", _SMEM_CHECK], env=env, cwd=root, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    used = json.loads(out.stdout.splitlines()[-1])
    assert len(used) == 4
    assert all(shared <= smem for *_, shared, smem in used), used
