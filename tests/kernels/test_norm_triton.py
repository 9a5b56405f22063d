"""Triton row-wise kernels (rms_norm with and without the fused residual add, gated_rms_norm, silu_and_mul,
sigmoid_gate_mul, apply_partial_rope) against float64 formulas and the references.

Without a GPU they run under TRITON_INTERPRET=1 (CI); `pytest -m gpu` runs them compiled at model shapes. Outputs
are fresh tensors from the kernels, so each test also checks that no element is NaN (every element was written).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' import (read at @triton.jit time)

triton = pytest.importorskip("triton")

from tests.tolerances import assert_close  # noqa: E402

from deltaserve.kernels.activation import triton as act  # noqa: E402
from deltaserve.kernels.norm import ref as norm_ref  # noqa: E402
from deltaserve.kernels.norm import triton as norm  # noqa: E402
from deltaserve.kernels.rope import ref as rope_ref  # noqa: E402
from deltaserve.kernels.rope import triton as rope  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
GPU = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
EPS = 1e-6


@pytest.fixture(autouse=True, scope="module")
def _interpreter_like_the_gpu(interpreter_rounds_like_the_gpu):
    """bf16 results compare as they would on the device (see conftest)."""
    yield


def rms64(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + EPS)


def randn(*shape, gen, dtype, device, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)


def no_nan(*tensors: torch.Tensor) -> None:
    for t in tensors:
        assert not t.isnan().any(), "NaN in a kernel output (unwritten element?)"


# ------------------------------------------------------------------------------------------------ shared test bodies


def check_rms_norm(shape, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    x = randn(*shape, gen=gen, dtype=dtype, device=device, scale=3)
    w = randn(shape[-1], gen=gen, dtype=dtype, device=device, scale=0.1)
    y = norm.rms_norm(x=x, weight=w, eps=EPS)
    assert y.dtype == dtype and y.shape == x.shape
    no_nan(y)
    assert_close(y, rms64(x) * (1 + w.double()))


def check_rms_norm_residual(shape, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    x = randn(*shape, gen=gen, dtype=dtype, device=device)
    residual = randn(*shape, gen=gen, dtype=dtype, device=device, scale=10)
    w = randn(shape[-1], gen=gen, dtype=dtype, device=device, scale=0.1)
    y, h = norm.rms_norm(x=x, weight=w, eps=EPS, residual=residual)
    no_nan(y, h)
    assert torch.equal(h, x + residual), "the residual stream must be the dtype sum, bit for bit"
    assert_close(y, rms64(h) * (1 + w.double()))


def check_gated_rms_norm(shape, dtype, device, seed, gate_in_wider_rows=False):
    gen = torch.Generator().manual_seed(seed)
    x = randn(*shape, gen=gen, dtype=dtype, device=device)
    gate = randn(*shape, gen=gen, dtype=dtype, device=device, scale=2)
    if gate_in_wider_rows:  # as in the GDN layer: z is a column slice of the merged input projection's output
        wide = randn(shape[0], 7 + shape[1] * shape[2] + 5, gen=gen, dtype=dtype, device=device)
        wide[:, 7:7 + shape[1] * shape[2]] = gate.reshape(shape[0], -1)
        gate = wide[:, 7:7 + shape[1] * shape[2]].view(shape)
        assert shape[0] == 1 or not gate.is_contiguous()
    w = randn(shape[-1], gen=gen, dtype=torch.float32, device=device)  # GDN keeps this weight in fp32
    y = norm.gated_rms_norm(x=x, gate=gate, weight=w, eps=EPS)
    assert y.dtype == dtype and y.shape == x.shape
    no_nan(y)
    g = gate.double()
    assert_close(y, w.double() * rms64(x) * g * torch.sigmoid(g))


def check_silu_and_mul(rows, inter, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    x = randn(rows, 2 * inter, gen=gen, dtype=dtype, device=device, scale=4)
    y = act.silu_and_mul(x=x)
    assert y.dtype == dtype and y.shape == (rows, inter)
    no_nan(y)
    gate, up = x[:, :inter].double(), x[:, inter:].double()
    assert_close(y, gate * torch.sigmoid(gate) * up)


def check_sigmoid_gate_mul(tokens, heads, head_dim, dtype, device, seed):
    """The gate as the attention layer passes it: the second half of each head's [query | gate] projection row."""
    gen = torch.Generator().manual_seed(seed)
    x = randn(tokens, heads, head_dim, gen=gen, dtype=dtype, device=device, scale=2)
    gate = randn(tokens, heads, 2 * head_dim, gen=gen, dtype=dtype, device=device, scale=4)[..., head_dim:]
    y = act.sigmoid_gate_mul(x=x, gate=gate)
    assert y.dtype == dtype and y.shape == x.shape
    no_nan(y)
    assert_close(y, x.double() * torch.sigmoid(gate.double()))


def check_rope(tokens, heads, head_dim, rotary_dim, max_pos, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    q = randn(tokens, heads[0], head_dim, gen=gen, dtype=dtype, device=device)
    k = randn(tokens, heads[1], head_dim, gen=gen, dtype=dtype, device=device)
    positions = torch.randint(0, max_pos, (tokens,), generator=gen).to(device)
    args = dict(positions=positions, rotary_dim=rotary_dim, theta=1e7)
    q_out, k_out = rope.apply_partial_rope(q=q, k=k, **args)
    q_ref, k_ref = rope_ref.apply_partial_rope(q=q, k=k, **args)
    no_nan(q_out, k_out)
    assert q_out.dtype == dtype and k_out.shape == k.shape
    # the reference forms the same fp32 angles; its cos/sin are the truth here (large positions included)
    q_truth, k_truth = rope_ref.apply_partial_rope(q=q.double(), k=k.double(), **args)
    assert_close(q_out, q_truth, dtype=dtype)
    assert_close(k_out, k_truth, dtype=dtype)
    assert torch.equal(q_out[..., rotary_dim:], q[..., rotary_dim:])
    assert torch.equal(k_out[..., rotary_dim:], k[..., rotary_dim:])
    if dtype == torch.float32:
        assert_close(q_out, q_ref)
        assert_close(k_out, k_ref)


# ------------------------------------------------------------------------------ interpreter tier (CPU, tiny shapes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_interpreted(dtype):
    check_rms_norm((65, 3, 40), dtype, "cpu", seed=1)  # D = 40: a masked, non-power-of-two row


def test_rms_norm_long_rows_interpreted():
    check_rms_norm((3, 5120), torch.bfloat16, "cpu", seed=2)  # one row per program


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_residual_interpreted(dtype):
    check_rms_norm_residual((63, 48), dtype, "cpu", seed=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_rms_norm_interpreted(dtype):
    check_gated_rms_norm((5, 3, 24), dtype, "cpu", seed=4)
    check_gated_rms_norm((5, 3, 24), dtype, "cpu", seed=4, gate_in_wider_rows=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_interpreted(dtype):
    check_silu_and_mul(63, 37, dtype, "cpu", seed=5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sigmoid_gate_mul_interpreted(dtype):
    check_sigmoid_gate_mul(5, 3, 24, dtype, "cpu", seed=8)


def test_sigmoid_gate_mul_rejects_a_gate_of_another_shape():
    with pytest.raises(ValueError, match="gate must have x's shape"):
        act.sigmoid_gate_mul(x=torch.zeros(2, 3, 4), gate=torch.zeros(2, 3, 5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_interpreted(dtype):
    check_rope(9, (4, 2), 48, 16, 262_144, dtype, "cpu", seed=6)  # 32 pass-through dims: not a power of two


def test_rope_rotary_is_whole_head_interpreted():
    check_rope(3, (3, 1), 16, 16, 100, torch.float32, "cpu", seed=7)


def test_dispatch_keeps_the_reference_on_cpu():
    from deltaserve.kernels.norm import rms_norm

    assert rms_norm.reference is norm_ref.rms_norm
    x = torch.randn(4, 8)
    assert torch.equal(rms_norm(x=x, weight=torch.zeros(8), eps=EPS), norm_ref.rms_norm(x=x, weight=torch.zeros(8),
                                                                                         eps=EPS))


# --------------------------------------------------------------------------------------- GPU tier (model shapes)

ROWS = [1, 63, 65, 500]


@GPU
@needs_cuda
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dim", [5120, 2048, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_rms_norm_gpu(rows, dim, dtype):
    check_rms_norm((rows, dim), dtype, "cuda", seed=rows + dim)
    check_rms_norm_residual((rows, dim), dtype, "cuda", seed=rows + dim + 1)


@GPU
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_qk_norm_shape_gpu(dtype):
    check_rms_norm((65, 24, 256), dtype, "cuda", seed=9)


@GPU
@needs_cuda
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gated_rms_norm_gpu(rows, dtype):
    check_gated_rms_norm((rows, 48, 128), dtype, "cuda", seed=rows)
    check_gated_rms_norm((rows, 48, 128), dtype, "cuda", seed=rows, gate_in_wider_rows=True)


@GPU
@needs_cuda
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("inter", [17408, 512, 37])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_silu_and_mul_gpu(rows, inter, dtype):
    check_silu_and_mul(rows, inter, dtype, "cuda", seed=rows + inter)


@GPU
@needs_cuda
@pytest.mark.parametrize("tokens", ROWS)
@pytest.mark.parametrize("heads", [24, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_sigmoid_gate_mul_gpu(tokens, heads, dtype):
    check_sigmoid_gate_mul(tokens, heads, 256, dtype, "cuda", seed=tokens + heads)


@GPU
@needs_cuda
@pytest.mark.parametrize("tokens", ROWS)
@pytest.mark.parametrize("heads", [(24, 4), (16, 2)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rope_gpu(tokens, heads, dtype):
    check_rope(tokens, heads, 256, 64, 262_144, dtype, "cuda", seed=tokens)


@GPU
@needs_cuda
def test_dispatch_selects_triton_on_cuda():
    from deltaserve.kernels.activation import silu_and_mul
    from deltaserve.kernels.norm import rms_norm
    from deltaserve.kernels.rope import apply_partial_rope

    x = torch.randn(7, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.zeros(256, device="cuda", dtype=torch.bfloat16)
    assert_close(rms_norm(x=x, weight=w, eps=EPS), rms64(x))
    assert_close(silu_and_mul(x=x), silu_and_mul.reference(x=x))
    q, k = apply_partial_rope(q=x.view(7, 1, 256), k=x.view(7, 1, 256), positions=torch.arange(7, device="cuda"),
                              rotary_dim=64, theta=1e7)
    assert q.is_cuda and not q.isnan().any()
