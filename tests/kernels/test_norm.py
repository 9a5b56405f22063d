"""rms_norm (zero-centred, 1 + w) and gated_rms_norm (plain w) against float64 formulas."""

from __future__ import annotations

import pytest
import torch
from tests.tolerances import assert_close

from deltaserve.kernels.norm import gated_rms_norm, rms_norm

EPS = 1e-6


def rms64(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + EPS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 63, 65])
def test_rms_norm(dtype, rows):
    gen = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, 3, 40, generator=gen) * 3).to(dtype)
    weight = (torch.randn(40, generator=gen) * 0.1).to(dtype)  # stored zero-centred: ~0, often negative
    y = rms_norm(x=x, weight=weight, eps=EPS)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, rms64(x) * (1 + weight.double()))


def test_rms_norm_zero_weight_is_plain_rms():
    # the (1 + w) form: an all-zero stored weight is the identity scale, not zero
    x = torch.randn(5, 32)
    assert_close(rms_norm(x=x, weight=torch.zeros(32), eps=EPS), rms64(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_with_residual(dtype):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(65, 48, generator=gen).to(dtype)
    residual = (torch.randn(65, 48, generator=gen) * 10).to(dtype)
    weight = (torch.randn(48, generator=gen) * 0.1).to(dtype)
    y, h = rms_norm(x=x, weight=weight, eps=EPS, residual=residual)
    assert h.dtype == dtype and y.dtype == dtype
    assert torch.equal(h, x + residual)  # the residual stream is summed in activation dtype, bit for bit
    assert_close(y, rms64(h) * (1 + weight.double()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_rms_norm(dtype):
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(63, 4, 24, generator=gen).to(dtype)
    gate = (torch.randn(63, 4, 24, generator=gen) * 3).to(dtype)
    weight = (1 + torch.randn(24, generator=gen) * 0.2).to(dtype)  # plain weight, initialised to ones
    y = gated_rms_norm(x=x, gate=gate, weight=weight, eps=EPS)
    assert y.dtype == dtype
    g = gate.double()
    assert_close(y, weight.double() * rms64(x) * g * torch.sigmoid(g))
