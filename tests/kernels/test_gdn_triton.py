"""Triton GDN kernels (causal conv1d, fused GDN decode, chunked prefill through fla-core) against the references.

CPU (CI): the kernels run under TRITON_INTERPRET=1 at tiny shapes; the interpreter runs programs one after another in
numpy, about 50 ms per decode program, so shapes are chosen for program count. GPU (`pytest -m gpu`): model shapes,
through the dispatched public ops, plus CUDA graph capture and the fla-core prefill path.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel module is imported

from tests.tolerances import assert_close, assert_error_within

from deltaserve.engine.device_inputs import chunk_indices
from deltaserve.kernels.conv1d import ref as conv_ref
from deltaserve.kernels.gated_delta_rule import ref as gdn_ref

triton = pytest.importorskip("triton")

CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
NAN = float("nan")


def _patch_interpreter() -> None:
    """Make the interpreter round like the GPU and run faster (CPU only).

    - fp32 -> bf16 casts: the interpreter truncates (its cast ignores the rounding mode); the GPU rounds to nearest
      even, as torch does. Truncation makes half of all bf16 conv outputs differ from the reference by one ulp.
    - It checks every int32 op for overflow (a third of its time); the GPU never does. Off."""
    if CUDA:
        return
    import numpy as np
    import triton.language as tl
    import triton.runtime.interpreter as interp

    interp.InterpreterOptions.sanitize_overflow = False
    cast_impl = interp.InterpreterBuilder.cast_impl

    def cast_rtne(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            data = torch.from_numpy(np.array(src.data, dtype=np.float32)).bfloat16().view(torch.int16).numpy()
            return interp.TensorHandle(data.view(np.uint16), tl.bfloat16)
        return cast_impl(self, src, dst_type)

    interp.InterpreterBuilder.cast_impl = cast_rtne


_patch_interpreter()


def conv_mod():
    from deltaserve.kernels.conv1d import triton as mod

    return mod


def gdn_mod():
    from deltaserve.kernels.gated_delta_rule import triton as mod

    return mod


def shuffled_slots(n: int, num_slots: int, gen: torch.Generator, pad: bool) -> list[int]:
    """n distinct slots in random order out of num_slots; one padding row (-1) in the middle if pad."""
    slots = torch.randperm(num_slots, generator=gen)[:n].tolist()
    if pad and n >= 3:
        slots[n // 2] = -1
    return slots


def nan_pool(shape, used, fill, dtype) -> torch.Tensor:
    """A pool poisoned with NaN except the used slots, which get fill(slot-shape)."""
    pool = torch.full(shape, NAN, dtype=torch.float32)
    for s in used:
        pool[s] = fill(shape[1:])
    return pool.to(dtype)


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bitwise-equal values, NaN where NaN (untouched slots stay poisoned)."""
    torch.testing.assert_close(a.cpu(), b.cpu(), rtol=0, atol=0, equal_nan=True)


# ---------------------------------------------------------------------------------------------------------------------
# causal conv1d


def conv_update_case(n, channels, width, dtype, device, seed, pad=True):
    gen = torch.Generator().manual_seed(seed)
    num_slots = n + 4
    slots = shuffled_slots(n, num_slots, gen, pad)
    x = torch.randn(n, channels, generator=gen).to(dtype)
    weight = (torch.randn(channels, width, generator=gen) * 0.5).to(dtype)
    pool = nan_pool((num_slots, width - 1, channels), [s for s in slots if s >= 0],
                    lambda shp: torch.randn(shp, generator=gen), dtype)
    return [t.to(device) for t in (x, weight, pool, torch.tensor(slots))]


def check_conv_update(fn, n, channels, width, dtype, device, seed=0):
    x, weight, pool, slots = conv_update_case(n, channels, width, dtype, device, seed)
    ref_pool = pool.cpu().clone()
    y_ref = conv_ref.causal_conv1d_update(x=x.cpu(), weight=weight.cpu(), conv_state=ref_pool, slots=slots.cpu())
    y = fn(x=x, weight=weight, conv_state=pool, slots=slots)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, y_ref)
    assert_same(pool, ref_pool)  # the window holds raw inputs: exact, and untouched slots stay NaN


def conv_prefill_case(lengths, init, slots, channels, width, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    num_slots = max(slots) + 3
    x = torch.randn(sum(lengths), channels, generator=gen).to(dtype)
    weight = (torch.randn(channels, width, generator=gen) * 0.5).to(dtype)
    pool = nan_pool((num_slots, width - 1, channels), [s for s, h in zip(slots, init) if s >= 0 and h],
                    lambda shp: torch.randn(shp, generator=gen), dtype)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return [t.to(device) for t in (x, weight, pool, cu, torch.tensor(slots), torch.tensor(init))]


def check_conv_prefill(fn, lengths, init, slots, channels, width, dtype, device, seed=0):
    x, weight, pool, cu, sl, hi = conv_prefill_case(lengths, init, slots, channels, width, dtype, device, seed)
    ref_pool = pool.cpu().clone()
    y_ref = conv_ref.causal_conv1d_prefill(x=x.cpu(), weight=weight.cpu(), conv_state=ref_pool, cu_seqlens=cu.cpu(),
                                           slots=sl.cpu(), has_initial_state=hi.cpu())
    y = fn(x=x, weight=weight, conv_state=pool, cu_seqlens=cu, slots=sl, has_initial_state=hi)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, y_ref)
    assert_same(pool, ref_pool)


# lengths / has_initial_state / slots: single sequences at odd lengths, and a varlen mix with sequences shorter than
# the window (they keep part of their old history), fresh ones, shuffled slots and a padding row
PREFILL_CASES = [
    ([1], [True], [2]),
    ([63], [False], [0]),
    ([65], [True], [1]),
    ([2, 1, 65, 3, 63, 7], [True, True, False, True, True, False], [5, 0, 3, -1, 7, 2]),
    ([3, 0, 5, 0], [True, True, False, False], [1, 4, 0, 2]),  # empty sequences: state kept, or zeros if fresh
]


@pytest.mark.parametrize("n,dtype", [(1, torch.float32), (3, torch.float32), (3, torch.bfloat16),
                                     (65, torch.bfloat16)])
def test_conv_update_interpreter(n, dtype):
    check_conv_update(conv_mod().causal_conv1d_update, n, 40, 4, dtype, "cpu", seed=n)


@pytest.mark.parametrize("case", range(len(PREFILL_CASES)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_prefill_interpreter(case, dtype):
    check_conv_prefill(conv_mod().causal_conv1d_prefill, *PREFILL_CASES[case], 40, 4, dtype, "cpu", seed=case)


@gpu
@pytest.mark.parametrize("n", [1, 3, 65])
def test_conv_update_gpu(n):
    from deltaserve.kernels.conv1d import causal_conv1d_update

    check_conv_update(causal_conv1d_update, n, 10240, 4, torch.bfloat16, "cuda", seed=n)


@gpu
@pytest.mark.parametrize("case", range(len(PREFILL_CASES)))
def test_conv_prefill_gpu(case):
    from deltaserve.kernels.conv1d import causal_conv1d_prefill

    check_conv_prefill(causal_conv1d_prefill, *PREFILL_CASES[case], 10240, 4, torch.bfloat16, "cuda", seed=case)


def split_prefill(mod, split, tile=None):
    """The split conv as a function returning y: checks both sections are contiguous and cover [T, C]."""
    def fn(**kw):
        if tile is None:
            head, tail = mod.causal_conv1d_prefill_split(**kw, split=split)
        else:
            head, tail = mod.causal_conv1d_prefill_launch(**kw, split=split, tile=tile)
        assert head.is_contiguous() and tail.is_contiguous()
        assert head.shape[1] == split and tail.shape[1] == kw["x"].shape[1] - split
        return torch.cat([head, tail], dim=1)
    return fn


# Small tiles make the prefill programs start inside sequences and walk across several: BT = 4 and 5 are not
# multiples of the W-1 = 3 tokens a loop step takes; BC = 16 leaves a partial channel block of C = 37.
# (lengths, has_initial_state, slots): a tile spanning three sequences and more (2, 1, 1, 3 tokens, a skipped slot);
# empty sequences inside a tile and at the end; sequences shorter than W-1 with history
TILE_CASES = [
    ([2, 1, 1, 3, 9, 2], [True, False, True, True, False, True], [3, 0, -1, 5, 1, 2]),
    ([1, 0, 0, 6, 2, 0], [True, True, False, True, True, False], [2, 4, 1, 0, 3, 5]),
]


@pytest.mark.parametrize("tile", [(4, 16, 1), (5, 32, 1)])
@pytest.mark.parametrize("case", range(len(TILE_CASES)))
def test_conv_prefill_small_tiles_interpreter(case, tile):
    mod = conv_mod()
    check_conv_prefill(split_prefill(mod, 37, tile), *TILE_CASES[case], 37, 4, torch.bfloat16, "cpu", seed=case)


@pytest.mark.parametrize("split", [0, 13, 16, 37])
def test_conv_prefill_split_interpreter(split):
    """Column sections at an odd split, one inside a channel block, one at its edge, and the two empty ones."""
    mod = conv_mod()
    check_conv_prefill(split_prefill(mod, split, (4, 16, 1)), *TILE_CASES[0], 37, 4, torch.float32, "cpu", seed=split)


def test_conv_prefill_split_reference():
    """The reference's split returns the reference's y, cut in two contiguous tensors."""
    x, weight, pool, cu, sl, hi = conv_prefill_case(*TILE_CASES[0], 37, 4, torch.float32, "cpu", 0)
    kw = dict(x=x, weight=weight, cu_seqlens=cu, slots=sl, has_initial_state=hi)
    head, tail = conv_ref.causal_conv1d_prefill_split(**kw, conv_state=pool.clone(), split=13)
    y = conv_ref.causal_conv1d_prefill(**kw, conv_state=pool.clone())
    assert head.is_contiguous() and tail.is_contiguous()
    assert_same(torch.cat([head, tail], dim=1), y)



def check_conv_qkv(fn, case, channels, key_dim, head_dim, dtype, device, seed=0):
    """fn's (q, k, v) against the reference's (the conv, then l2norm_qk on q and k); the state pool as written by
    the reference conv; q, k and v contiguous."""
    x, weight, pool, cu, sl, hi = conv_prefill_case(*case, channels, 4, dtype, device, seed)
    kw = dict(cu_seqlens=cu, slots=sl, has_initial_state=hi, key_dim=key_dim, head_dim=head_dim)
    ref_pool = pool.cpu().clone()
    expected = conv_ref.causal_conv1d_prefill_qkv(x=x.cpu(), weight=weight.cpu(), conv_state=ref_pool,
                                                  **{k: v.cpu() if torch.is_tensor(v) else v for k, v in kw.items()})
    got = fn(x=x, weight=weight, conv_state=pool, **kw)
    for g, e in zip(got, expected):
        assert g.is_contiguous() and g.shape == e.shape and g.dtype == dtype
        assert_close(g, e)
    assert_same(pool, ref_pool)


def test_conv_prefill_qkv_reference():
    """The reference's q and k: the conv's columns as rounded to their dtype, over sqrt(sum of squares + 1e-6) per
    head (fla-core's and transformers' l2norm), rounded again; v the rest."""
    x, weight, pool, cu, sl, hi = conv_prefill_case(*TILE_CASES[0], 40, 4, torch.bfloat16, "cpu", 1)
    kw = dict(x=x, weight=weight, cu_seqlens=cu, slots=sl, has_initial_state=hi)
    q, k, v = conv_ref.causal_conv1d_prefill_qkv(**kw, conv_state=pool.clone(), key_dim=16, head_dim=8)
    y = conv_ref.causal_conv1d_prefill(**kw, conv_state=pool.clone())
    heads = y[:, :32].float().view(-1, 4, 8)
    normed = (heads / torch.sqrt((heads * heads).sum(-1, keepdim=True) + 1e-6)).to(torch.bfloat16).view(-1, 32)
    assert_close(torch.cat([q, k], dim=1), normed)
    assert_same(v, y[:, 32:])
    with pytest.raises(ValueError, match="multiple of head_dim"):
        conv_ref.causal_conv1d_prefill_qkv(**kw, conv_state=pool.clone(), key_dim=12, head_dim=8)


@pytest.mark.parametrize("case", range(len(TILE_CASES)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_prefill_qkv_interpreter(case, dtype, monkeypatch):
    """The fused L2-norm: 16-channel blocks of two 8-channel heads, q | k | v = 16 | 16 | 8 channels (v in a block of
    its own with 8 masked channels), tiles starting inside sequences."""
    mod = conv_mod()
    monkeypatch.setattr(mod, "PREFILL_QKV_TILE", (4, 16, 1))
    check_conv_qkv(mod.causal_conv1d_prefill_qkv, TILE_CASES[case], 40, 16, 8, dtype, "cpu", seed=case)


def test_conv_prefill_qkv_block_across_the_split_interpreter(monkeypatch):
    """A 32-channel block holding q | k (8 | 8 channels, normed) and the first 16 of v's 24: both stores of one
    block."""
    mod = conv_mod()
    monkeypatch.setattr(mod, "PREFILL_QKV_TILE", (4, 32, 1))
    check_conv_qkv(mod.causal_conv1d_prefill_qkv, TILE_CASES[1], 40, 8, 8, torch.bfloat16, "cpu", seed=5)


def test_conv_prefill_qkv_other_head_dims_interpreter(monkeypatch):
    """A head of 12 channels (not a power of two) takes the split conv and l2norm_qk: the same result."""
    mod = conv_mod()
    monkeypatch.setattr(mod, "PREFILL_TILE", (4, 16, 1))
    monkeypatch.setattr(mod, "PREFILL_QKV_TILE", (4, 16, 1))
    check_conv_qkv(mod.causal_conv1d_prefill_qkv, TILE_CASES[0], 37, 12, 12, torch.float32, "cpu", seed=4)



@pytest.mark.parametrize("key_dim,head_dim", [(16, 8), (12, 12)])  # the fused kernel, the fallback
def test_conv_prefill_qkv_no_tokens(key_dim, head_dim):
    """An empty batch (one sequence of no tokens): empty q, k and v from the reference and the Triton op alike."""
    kw = dict(x=torch.zeros(0, 40), weight=torch.randn(40, 4), cu_seqlens=torch.tensor([0, 0], dtype=torch.int32),
              slots=torch.tensor([1]), has_initial_state=torch.tensor([True]), key_dim=key_dim, head_dim=head_dim)
    for fn in (conv_ref.causal_conv1d_prefill_qkv, conv_mod().causal_conv1d_prefill_qkv):
        q, k, v = fn(**kw, conv_state=torch.zeros(3, 3, 40))
        assert q.shape == k.shape == (0, key_dim) and v.shape == (0, 40 - 2 * key_dim)

@gpu
@pytest.mark.parametrize("shape", [(8192, 2048), (10240, 2048), (6144, 1024)])  # 35B-A3B, 27B, a 4-head split
@pytest.mark.parametrize("case", [1, 3])
def test_conv_prefill_qkv_gpu(shape, case):
    channels, key_dim = shape
    check_conv_qkv(conv_mod().causal_conv1d_prefill_qkv, PREFILL_CASES[case], channels, key_dim, 128,
                   torch.bfloat16, "cuda", seed=case)


def test_conv_prefill_rows_past_the_batch_interpreter():
    """x longer than cu_seqlens[-1]: the rows past the last sequence are zeros, as in the reference."""
    mod = conv_mod()
    lengths, init, slots = TILE_CASES[0]
    x, weight, pool, cu, sl, hi = conv_prefill_case(lengths + [5], init + [True], slots + [7], 37, 4,
                                                    torch.float32, "cpu", 1)
    cu, sl, hi = cu[:-1], sl[:-1], hi[:-1]  # the last 5 rows belong to no sequence
    ref_pool = pool.clone()
    y_ref = conv_ref.causal_conv1d_prefill(x=x, weight=weight, conv_state=ref_pool, cu_seqlens=cu, slots=sl,
                                           has_initial_state=hi)
    y, _ = mod.causal_conv1d_prefill_launch(x=x, weight=weight, conv_state=pool, cu_seqlens=cu, slots=sl,
                                            has_initial_state=hi, split=37, tile=(4, 16, 1))
    assert_close(y, y_ref)
    assert (y[-5:] == 0).all()
    assert_same(pool, ref_pool)


# some of the tiles bench_gdn.py --conv-prefill --sweep times (CONV_PREFILL_SWEEP there), the default first
GPU_TILES = [(128, 512, 2), (64, 512, 2), (256, 512, 2), (128, 256, 1), (128, 1024, 4), (64, 1024, 2)]


@gpu
@pytest.mark.parametrize("tile", GPU_TILES)
def test_conv_prefill_gpu_tiles(tile):
    """The swept tiles on the varlen mix (tiles span sequences), at a split inside a channel block."""
    check_conv_prefill(split_prefill(conv_mod(), 700, tile), *PREFILL_CASES[3], 1000, 4, torch.bfloat16, "cuda",
                       seed=tile[0])


@gpu
@pytest.mark.parametrize("tile", [None, (64, 1024, 2)])
def test_conv_prefill_split_gpu_model_shape(tile):
    """35B-A3B's layer: x a column slice of the merged projection's output (row stride 12352), q/k | v split at
    4096, 3000 tokens over 3 sequences; against the reference."""
    gen = torch.Generator().manual_seed(5)
    channels, split, lengths = 8192, 4096, [1000, 3, 1997]
    total = sum(lengths)
    wide = torch.randn(total, 12352, generator=gen).bfloat16().cuda()
    x = wide[:, :channels]
    weight = (torch.randn(channels, 4, generator=gen) * 0.5).bfloat16().cuda()
    pool = torch.randn(6, 3, channels, generator=gen).bfloat16().cuda()
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    slots, init = torch.tensor([4, 0, 2], device="cuda"), torch.tensor([True, False, True], device="cuda")
    ref_pool = pool.cpu().clone()
    y_ref = conv_ref.causal_conv1d_prefill(x=x.cpu(), weight=weight.cpu(), conv_state=ref_pool, cu_seqlens=cu.cpu(),
                                           slots=slots.cpu(), has_initial_state=init.cpu())
    y = split_prefill(conv_mod(), split, tile)(x=x, weight=weight, conv_state=pool, cu_seqlens=cu, slots=slots,
                                               has_initial_state=init)
    assert_close(y, y_ref)
    assert_same(pool, ref_pool)


# ---------------------------------------------------------------------------------------------------------------------
# fused GDN decode


def decode_case(n, dims, dtype, device, seed, width=4, pad=True, merged=False, state_dtype=torch.float32):
    """Inputs of fused_gdn_decode with NaN-poisoned pools; returns (kwargs without the pools, conv pool, ssm pool).
    merged=True passes mixed_qkv, b and a as column slices of one wider row, as the GDN layer's merged projection
    produces them. state_dtype: the recurrent state pool's storage."""
    num_k_heads, head_k_dim, num_v_heads, head_v_dim = dims
    gen = torch.Generator().manual_seed(seed)
    conv_dim = 2 * num_k_heads * head_k_dim + num_v_heads * head_v_dim
    num_slots = n + 4
    slots = shuffled_slots(n, num_slots, gen, pad)
    used = [s for s in slots if s >= 0]
    kw = {
        "mixed_qkv": torch.randn(n, conv_dim, generator=gen).to(dtype),
        "a": (torch.randn(n, num_v_heads, generator=gen) * 2).to(dtype),
        "b": (torch.randn(n, num_v_heads, generator=gen) * 2).to(dtype),
        "A_log": torch.rand(num_v_heads, generator=gen) * 2.5,  # fp32, A in [1, 12] as in checkpoints
        "dt_bias": torch.randn(num_v_heads, generator=gen).to(dtype),
        "conv_weight": (torch.randn(conv_dim, width, generator=gen) * 0.5).to(dtype),
        "slots": torch.tensor(slots),
    }
    conv_pool = nan_pool((num_slots, width - 1, conv_dim), used, lambda shp: torch.randn(shp, generator=gen), dtype)
    ssm_pool = nan_pool((num_slots, num_v_heads, head_k_dim, head_v_dim), used,
                        lambda shp: torch.randn(shp, generator=gen) * 0.3, state_dtype)
    kw = {key: val.to(device) for key, val in kw.items()}
    if merged:
        z = torch.full((n, 5), float("nan"), dtype=dtype, device=device)  # in_proj_z's columns, unread here
        wide = torch.cat([kw["mixed_qkv"], z, kw["b"], kw["a"]], dim=1)
        kw["mixed_qkv"], _, kw["b"], kw["a"] = wide.split([conv_dim, 5, num_v_heads, num_v_heads], dim=1)
    kw.update(num_k_heads=num_k_heads, head_k_dim=head_k_dim, num_v_heads=num_v_heads, head_v_dim=head_v_dim,
              scale=head_k_dim**-0.5)
    return kw, conv_pool.to(device), ssm_pool.to(device)


def run_ref_decode(kw, conv_pool, ssm_pool, upcast=False):
    """The reference on CPU copies of the pools; upcast=True runs the whole pipeline from fp32 inputs (the truth a
    bf16 kernel is measured against). Returns (o, conv_pool, ssm_pool)."""
    cpu = {key: (val.cpu() if isinstance(val, torch.Tensor) else val) for key, val in kw.items()}
    conv_pool, ssm_pool = conv_pool.cpu().clone(), ssm_pool.cpu().clone()
    if upcast:
        cpu.update({key: cpu[key].float() for key in ("mixed_qkv", "a", "b", "dt_bias", "conv_weight")})
        conv_pool = conv_pool.float()
    o = gdn_ref.fused_gdn_decode(conv_state=conv_pool, ssm_state=ssm_pool, **cpu)
    return o, conv_pool, ssm_pool


def check_decode(fn, n, dims, dtype, device, seed=0, merged=False, state_dtype=torch.float32):
    """state_dtype bf16: the kernel and the reference both widen the stored state, update it in fp32 and round it
    once, so o keeps the activations' tolerance and the pools differ by at most about a bf16 rounding."""
    kw, conv_pool, ssm_pool = decode_case(n, dims, dtype, device, seed, merged=merged, state_dtype=state_dtype)
    conv_before, ssm_before = conv_pool.clone(), ssm_pool.clone()
    o_ref, conv_ref_pool, ssm_ref_pool = run_ref_decode(kw, conv_before, ssm_before)
    o = fn(conv_state=conv_pool, ssm_state=ssm_pool, **kw)
    assert o.dtype == dtype and o.shape == (n, dims[2], dims[3])
    pad = (kw["slots"] < 0).cpu()
    assert (o.cpu()[pad] == 0).all() and not o.isnan().any()
    assert_same(conv_pool, conv_ref_pool)  # raw inputs shifted: exact; unused slots still NaN
    used = kw["slots"][kw["slots"] >= 0].cpu()
    unused = sorted(set(range(ssm_pool.shape[0])) - set(used.tolist()))
    assert ssm_pool.cpu()[unused].isnan().all() and ssm_pool.dtype == state_dtype
    if dtype == torch.float32:
        assert_close(o, o_ref)
        assert_close(ssm_pool.cpu()[used], ssm_ref_pool[used])
    else:  # bf16 activations: error against the fp32 pipeline within 2x that of the reference run in bf16
        o_true, _, ssm_true = run_ref_decode(kw, conv_before, ssm_before, upcast=True)
        assert_error_within(o, o_ref, o_true)
        assert_error_within(ssm_pool.cpu()[used], ssm_ref_pool[used], ssm_true[used])


def test_fused_gdn_decode_ref_matches_float64_truth():
    """The composed reference against an explicit float64 conv + gating + recurrence."""
    dims = (2, 16, 4, 8)
    kw, conv_pool, ssm_pool = decode_case(5, dims, torch.float32, "cpu", seed=7)
    conv0, ssm0 = conv_pool.clone(), ssm_pool.clone()
    o = gdn_ref.fused_gdn_decode(conv_state=conv_pool, ssm_state=ssm_pool, **kw)
    num_k_heads, head_k_dim, num_v_heads, head_v_dim = dims
    key_dim = num_k_heads * head_k_dim
    for row, slot in enumerate(kw["slots"].tolist()):
        if slot < 0:
            assert (o[row] == 0).all()
            continue
        window = torch.cat([conv0[slot].double(), kw["mixed_qkv"][row : row + 1].double()])  # [W, C]
        pre = (window.T * kw["conv_weight"].double()).sum(-1)
        y = pre * torch.sigmoid(pre)
        q = y[:key_dim].view(num_k_heads, head_k_dim)
        k = y[key_dim : 2 * key_dim].view(num_k_heads, head_k_dim)
        v = y[2 * key_dim :].view(num_v_heads, head_v_dim)
        q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6) * kw["scale"]
        k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
        x = kw["a"][row].double() + kw["dt_bias"].double()
        g = -kw["A_log"].double().exp() * torch.log1p(torch.exp(x))
        beta = torch.sigmoid(kw["b"][row].double())
        s = ssm0[slot].double()
        for hv in range(num_v_heads):
            kh, qh = k[hv // (num_v_heads // num_k_heads)], q[hv // (num_v_heads // num_k_heads)]
            s[hv] = math.exp(g[hv]) * s[hv]
            s[hv] = s[hv] + torch.outer(kh, beta[hv] * (v[hv] - s[hv].T @ kh))
            assert_close(o[row, hv], s[hv].T @ qh, dtype=torch.float32)
        assert_close(ssm_pool[slot], s, dtype=torch.float32)
        assert_close(conv_pool[slot], window[1:], dtype=torch.float32)


# (H, K, HV, V): GQA ratio 2; V = 24 is not a power of two and splits into two V tiles at BV 16 (a masked tail)
TINY = (2, 16, 4, 24)


@pytest.mark.parametrize("n", [1, 3])
def test_fused_gdn_decode_interpreter_fp32(n):
    check_decode(gdn_mod().fused_gdn_decode, n, TINY, torch.float32, "cpu", seed=n)


def test_fused_gdn_decode_interpreter_strided_inputs():
    check_decode(gdn_mod().fused_gdn_decode, 3, TINY, torch.float32, "cpu", seed=7, merged=True)


@pytest.mark.parametrize("block_v", [8, 32])
@pytest.mark.parametrize("n,dims", [(3, TINY), (2, (2, 16, 6, 16))])
def test_fused_gdn_decode_interpreter_tilings(n, dims, block_v):
    mod = gdn_mod()

    def fn(**kw):
        return mod.fused_gdn_decode_launch(block_v=block_v, num_warps=1, **kw)

    check_decode(fn, n, dims, torch.float32, "cpu", seed=20 + n)


def test_fused_gdn_decode_interpreter_bf16():
    check_decode(gdn_mod().fused_gdn_decode, 3, (1, 16, 2, 16), torch.bfloat16, "cpu", seed=11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_gdn_decode_interpreter_bf16_state(dtype):
    check_decode(gdn_mod().fused_gdn_decode, 3, TINY, dtype, "cpu", seed=12, state_dtype=torch.bfloat16)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_gdn_decode_interpreter_65_rows(dtype):
    # ~10 s per dtype on the interpreter: deselected by default, run with `pytest -m slow`
    check_decode(gdn_mod().fused_gdn_decode, 65, (1, 16, 2, 16), dtype, "cpu", seed=65)


MODEL_DIMS = {"27B": (16, 128, 48, 128), "35B-A3B": (16, 128, 32, 128)}


@gpu
@pytest.mark.parametrize("n", [1, 3, 65])
@pytest.mark.parametrize("model", list(MODEL_DIMS))
def test_fused_gdn_decode_gpu(n, model):
    from deltaserve.kernels.gated_delta_rule import fused_gdn_decode

    check_decode(fused_gdn_decode, n, MODEL_DIMS[model], torch.bfloat16, "cuda", seed=n)
    check_decode(fused_gdn_decode, n, MODEL_DIMS[model], torch.bfloat16, "cuda", seed=n, merged=True)


@gpu
@pytest.mark.parametrize("n", [1, 65])
def test_fused_gdn_decode_gpu_bf16_state(n):
    from deltaserve.kernels.gated_delta_rule import fused_gdn_decode

    check_decode(fused_gdn_decode, n, MODEL_DIMS["27B"], torch.bfloat16, "cuda", seed=n, merged=True,
                 state_dtype=torch.bfloat16)
    check_decode(fused_gdn_decode, n, MODEL_DIMS["27B"], torch.float32, "cuda", seed=n + 1,
                 state_dtype=torch.bfloat16)


DECODE_CONFIGS = [(8, 1), (16, 1), (16, 2), (32, 2), (32, 4), (64, 4), (128, 4), (128, 8)]


@gpu
@pytest.mark.parametrize("block_v,num_warps", DECODE_CONFIGS)
def test_fused_gdn_decode_gpu_tile_configs(block_v, num_warps):
    mod = gdn_mod()

    def fn(**kw):
        return mod.fused_gdn_decode_launch(block_v=block_v, num_warps=num_warps, **kw)

    check_decode(fn, 64, MODEL_DIMS["27B"], torch.bfloat16, "cuda", seed=block_v + num_warps)


@gpu
@pytest.mark.parametrize("n", [6, 64])  # both tilings of decode_config (35B-A3B: 6 * 32 heads < 256 <= 64 * 32)
def test_fused_gdn_decode_cuda_graph(n):
    """Capture, then replay on new inputs with two rows turned into padding: same o and pools as eager."""
    from deltaserve.kernels.gated_delta_rule import fused_gdn_decode

    dims = MODEL_DIMS["35B-A3B"]
    kw, conv_pool, ssm_pool = decode_case(n, dims, torch.bfloat16, "cuda", seed=1)
    static = {key: (val.clone() if isinstance(val, torch.Tensor) else val) for key, val in kw.items()}
    fused_gdn_decode(conv_state=conv_pool.clone(), ssm_state=ssm_pool.clone(), **static)  # warm-up
    graph_conv, graph_ssm = conv_pool.clone(), ssm_pool.clone()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_gdn_decode(conv_state=graph_conv, ssm_state=graph_ssm, **static)
    for step in range(3):
        fresh, _, _ = decode_case(n, dims, torch.bfloat16, "cuda", seed=100 + step)
        fresh["slots"] = kw["slots"].clone()
        fresh["slots"][[2, 5]] = -1
        eager_conv, eager_ssm = graph_conv.clone(), graph_ssm.clone()
        expected = fused_gdn_decode(conv_state=eager_conv, ssm_state=eager_ssm, **fresh)
        for key, val in fresh.items():
            if isinstance(val, torch.Tensor):
                static[key].copy_(val)
        graph.replay()
        torch.cuda.synchronize()
        assert_same(out, expected)
        assert_same(graph_conv, eager_conv)
        assert_same(graph_ssm, eager_ssm)


# ---------------------------------------------------------------------------------------------------------------------
# chunked prefill (fla-core on GPU; the state gather/scatter kernels also under the interpreter)


def test_state_gather_scatter_interpreter():
    mod = gdn_mod()
    gen = torch.Generator().manual_seed(0)
    pool = torch.randn(6, 2, 4, 8, generator=gen)
    pool[4] = NAN
    slots = torch.tensor([3, -1, 0, 5])
    init = torch.tensor([True, True, False, True])
    out = mod.gather_states(pool, slots, init)
    assert_same(out, torch.stack([pool[3], torch.zeros(2, 4, 8), torch.zeros(2, 4, 8), pool[5]]))
    before = pool.clone()
    src = torch.randn(4, 2, 4, 8, generator=gen)
    mod.scatter_states(src, pool, slots)
    expected = before.clone()
    expected[3], expected[0], expected[5] = src[0], src[2], src[3]
    assert_same(pool, expected)


def test_state_gather_scatter_bf16_pool_interpreter():
    """A bf16 pool is gathered widened to fp32 (fla-core's initial state) and the fp32 final states are scattered
    back rounded to nearest even."""
    mod = gdn_mod()
    gen = torch.Generator().manual_seed(1)
    pool = torch.randn(5, 2, 4, 8, generator=gen).bfloat16()
    pool[1] = NAN
    slots, init = torch.tensor([2, 0, -1]), torch.tensor([True, False, True])
    out = mod.gather_states(pool, slots, init)
    assert out.dtype == torch.float32
    assert_same(out, torch.stack([pool[2].float(), torch.zeros(2, 4, 8), torch.zeros(2, 4, 8)]))
    src = torch.randn(3, 2, 4, 8, generator=gen)
    expected = pool.clone()
    expected[2], expected[0] = src[0].bfloat16(), src[1].bfloat16()
    mod.scatter_states(src, pool, slots)
    assert_same(pool, expected)


def bf16_recurrent_baseline(q, k, v, g, beta, s0, scale):
    """A plain torch run in bf16 of one sequence: bf16 activations and products, fp32 state (as the engine keeps
    it). q, k: [L, H, K]; v: [L, HV, V]; g, beta: [L, HV]; s0: [HV, K, V] -> (o [L, HV, V] bf16, state fp32)."""
    group = v.shape[1] // q.shape[1]
    q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6) * scale
    k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    q, k = q.repeat_interleave(group, 1), k.repeat_interleave(group, 1)
    s, out = s0.clone(), []
    for t in range(q.shape[0]):
        s = s * g[t].float().exp()[:, None, None]
        pred = (k[t].unsqueeze(1) @ s.to(torch.bfloat16)).squeeze(1)  # [HV, V]
        delta = beta[t][:, None] * (v[t] - pred)
        s = s + k[t].float().unsqueeze(-1) * delta.float().unsqueeze(-2)
        out.append((q[t].unsqueeze(1) @ s.to(torch.bfloat16)).squeeze(1))
    return torch.stack(out), s


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gdn_gating_kernel(dtype):
    """Triton gating against the reference: strided a/b (column slices), large |a| (softplus branches), odd T."""
    device = "cuda" if CUDA else "cpu"
    gen = torch.Generator().manual_seed(3)
    T, hv = 37, 12
    ab = (torch.randn(T, 2 * hv + 5, generator=gen) * 12).to(dtype).to(device)
    a, b = ab[:, 3:3 + hv], ab[:, 3 + hv:3 + 2 * hv]
    A_log = torch.randn(hv, generator=gen).to(device)
    dt_bias = torch.randn(hv, generator=gen).to(dtype).to(device)
    g, beta = gdn_mod().gdn_gating(a=a, b=b, A_log=A_log, dt_bias=dt_bias, beta_dtype=dtype)
    g_ref, beta_ref = gdn_ref.gdn_gating(a=a, b=b, A_log=A_log, dt_bias=dt_bias, beta_dtype=dtype)
    assert g.dtype == torch.float32 and beta.dtype == dtype
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)
    assert_close(beta, beta_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_l2norm_qk_kernel(dtype):
    """Strided q/k views of one conv output row -> contiguous normalised copies, against the reference."""
    device = "cuda" if CUDA else "cpu"
    gen = torch.Generator().manual_seed(4)
    T, H, K = 19, 3, 24
    mixed = torch.randn(T, 2 * H * K + 40, generator=gen).to(dtype).to(device)
    mixed[5, :H * K] = 0  # an all-zero row: eps keeps it finite
    q, k = mixed[:, :H * K].view(T, H, K), mixed[:, H * K:2 * H * K].view(T, H, K)
    qn, kn = gdn_mod().l2norm_qk(q, k)
    assert qn.is_contiguous() and kn.is_contiguous() and qn.dtype == dtype
    for out, expected in zip((qn, kn), gdn_ref.l2norm_qk(q, k)):
        assert_close(out, expected)


@gpu
@pytest.mark.parametrize("lengths,init,slots", [
    ([1], [True], [2]),
    ([63, 65], [True, False], [1, 0]),
    ([500, 3, 65, 1, 37], [True, False, True, True, False], [4, 0, -1, 6, 2]),
])
@pytest.mark.parametrize("hinted", [False, True])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_chunk_gated_delta_rule_gpu(lengths, init, slots, hinted, state_dtype):
    """hinted: q/k as strided views (as the layer passes them), the chunk indices built on the host and the padding
    flag given (as the runner's upload does); then the call must not sync with the device. A bf16 state pool is
    measured against the fp32 truth with a baseline whose final state is rounded to bf16 too."""
    from deltaserve.kernels.gated_delta_rule import chunk_gated_delta_rule

    num_k_heads, head_dim, num_v_heads = 16, 128, 48  # 27B (the benchmark's shape: fla autotunes once)
    gen = torch.Generator().manual_seed(sum(lengths))
    total, num_slots = sum(lengths), max(slots) + 3
    q = torch.randn(total, num_k_heads, head_dim, generator=gen).bfloat16()
    k = torch.randn(total, num_k_heads, head_dim, generator=gen).bfloat16()
    v = torch.randn(total, num_v_heads, head_dim, generator=gen).bfloat16()
    rate = torch.exp(torch.empty(num_v_heads).uniform_(-6.0, 0.0, generator=gen))
    g = -rate * torch.rand(total, num_v_heads, generator=gen) * 2
    beta = torch.rand(total, num_v_heads, generator=gen).bfloat16()
    pool = nan_pool((num_slots, num_v_heads, head_dim, head_dim), [s for s, h in zip(slots, init) if s >= 0 and h],
                    lambda shp: torch.randn(shp, generator=gen) * 0.3, state_dtype)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    args = {"cu_seqlens": cu, "slots": torch.tensor(slots), "has_initial_state": torch.tensor(init),
            "scale": head_dim**-0.5}
    truth_pool = pool.float()
    o_true = gdn_ref.chunk_gated_delta_rule(q=q.float(), k=k.float(), v=v.float(), g=g, beta=beta.float(),
                                            state=truth_pool, **args)
    gpu_pool = pool.cuda()
    q_in, k_in = q.cuda(), k.cuda()
    hints = {}
    if hinted:
        qk = torch.cat([q_in, k_in], dim=2)  # [T, H, 2K]: q and k as strided views, unit stride in K
        q_in, k_in = qk[..., :head_dim], qk[..., head_dim:]
        hints = {"chunk_indices": torch.from_numpy(chunk_indices(np.array(lengths))).cuda(),
                 "any_padding": any(s < 0 for s in slots)}

    v_in, g_in, beta_in = v.cuda(), g.cuda(), beta.cuda()

    def call(state: torch.Tensor) -> torch.Tensor:
        dev_args = {key: (val.cuda() if isinstance(val, torch.Tensor) else val) for key, val in args.items()}
        return chunk_gated_delta_rule(q=q_in, k=k_in, v=v_in, g=g_in, beta=beta_in, state=state, **hints, **dev_args)

    if hinted:
        call(gpu_pool.clone())  # fla autotunes (and syncs) on its first call at a shape
        dev_args = {key: (val.cuda() if isinstance(val, torch.Tensor) else val) for key, val in args.items()}
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:  # fresh metadata tensors, as every engine step has
            o = chunk_gated_delta_rule(q=q_in, k=k_in, v=v_in, g=g_in, beta=beta_in, state=gpu_pool, **hints,
                                       **dev_args)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    else:
        o = call(gpu_pool)
    assert o.dtype == torch.bfloat16 and o.shape == v.shape and not o.isnan().any()
    for n, (slot, has) in enumerate(zip(slots, init)):
        lo, hi = cu[n].item(), cu[n + 1].item()
        if slot < 0:
            assert (o[lo:hi] == 0).all()
            continue
        s0 = pool[slot].float() if has else torch.zeros(num_v_heads, head_dim, head_dim)
        o_base, s_base = bf16_recurrent_baseline(q[lo:hi].cuda(), k[lo:hi].cuda(), v[lo:hi].cuda(), g[lo:hi].cuda(),
                                                 beta[lo:hi].cuda(), s0.cuda(), head_dim**-0.5)
        assert gpu_pool.dtype == state_dtype
        assert_error_within(o[lo:hi], o_base, o_true[lo:hi])
        assert_error_within(gpu_pool[slot], s_base.to(state_dtype), truth_pool[slot])
    untouched = sorted(set(range(num_slots)) - {s for s in slots if s >= 0})
    assert gpu_pool[untouched].isnan().all()


@gpu
def test_chunk_states_and_multistep_run_on_cuda_tensors():
    """The prefix-checkpoint and verify contracts on CUDA tensors: the GPU chunk op hands a call that asks for chunk
    states to the reference (fla keeps them in the input dtype), and the multistep op runs its fused kernels (their
    own tests: test_gdn_multistep_triton.py); both must give the reference's results on the device."""
    from deltaserve.kernels.gated_delta_rule import chunk_gated_delta_rule, fused_gdn_multistep

    gen = torch.Generator().manual_seed(5)
    lengths, hv, hk, d = [70, 5], 4, 2, 32
    total = sum(lengths)
    q, k = (torch.randn(total, hk, d, generator=gen) for _ in range(2))
    v = torch.randn(total, hv, d, generator=gen)
    g = -torch.rand(total, hv, generator=gen)
    beta = torch.rand(total, hv, generator=gen)
    pool = torch.randn(3, hv, d, d, generator=gen)
    args = dict(cu_seqlens=torch.tensor([0, 70, 75]), slots=torch.tensor([2, 0]),
                has_initial_state=torch.tensor([True, False]), scale=d ** -0.5)
    states_cpu, states_gpu = torch.zeros(3, hv, d, d), torch.zeros(3, hv, d, d, device="cuda")
    pool_cpu, pool_gpu = pool.clone(), pool.cuda()
    o_cpu = gdn_ref.chunk_gated_delta_rule(q=q, k=k, v=v, g=g, beta=beta, state=pool_cpu, chunk_states=states_cpu,
                                           **args)
    o_gpu = chunk_gated_delta_rule(q=q.cuda(), k=k.cuda(), v=v.cuda(), g=g.cuda(), beta=beta.cuda(), state=pool_gpu,
                                   chunk_states=states_gpu, **{n: t.cuda() if isinstance(t, torch.Tensor) else t
                                                               for n, t in args.items()})
    assert_close(o_gpu.cpu(), o_cpu, dtype=torch.float32)
    assert_close(states_gpu.cpu(), states_cpu, dtype=torch.float32)
    conv_dim = 2 * hk * d + hv * d
    case = {"mixed_qkv": torch.randn(6, conv_dim, generator=gen), "a": torch.randn(6, hv, generator=gen),
            "b": torch.randn(6, hv, generator=gen), "A_log": torch.rand(hv, generator=gen),
            "dt_bias": torch.rand(hv, generator=gen), "conv_weight": torch.randn(conv_dim, 4, generator=gen) * 0.3,
            "conv_state": torch.randn(3, 3, conv_dim, generator=gen), "ssm_state": torch.randn(3, hv, d, d,
                                                                                          generator=gen),
            "slots": torch.tensor([1, -1, 0]), "conv_states_out": torch.zeros(3, 2, 3, conv_dim),
            "y_out": torch.zeros(3, 2, conv_dim), "gates_out": torch.zeros(3, 2, 2, hv)}
    fixed = dict(tokens_per_row=2, num_k_heads=hk, head_k_dim=d, num_v_heads=hv, head_v_dim=d, scale=d ** -0.5)
    on_gpu = {n: t.cuda() for n, t in case.items()}
    o_cpu = fused_gdn_multistep(**case, **fixed)
    o_gpu = fused_gdn_multistep(**on_gpu, **fixed)
    assert_close(o_gpu.cpu(), o_cpu, dtype=torch.float32)
    for name in ("conv_states_out", "y_out", "gates_out"):
        assert_close(on_gpu[name].cpu(), case[name], dtype=torch.float32)
