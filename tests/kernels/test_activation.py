"""silu_and_mul and sigmoid_gate_mul (references on CPU) against float64 formulas."""

from __future__ import annotations

import pytest
import torch
from tests.tolerances import assert_close

from deltaserve.kernels.activation import sigmoid_gate_mul, silu_and_mul


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 63, 65])
def test_silu_and_mul(dtype, rows):
    gen = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, 2 * 37, generator=gen) * 4).to(dtype)
    y = silu_and_mul(x=x)
    assert y.dtype == dtype and y.shape == (rows, 37)
    gate, up = x[:, :37].double(), x[:, 37:].double()
    assert_close(y, gate * torch.sigmoid(gate) * up)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sigmoid_gate_mul(dtype):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 3, 16, generator=gen).to(dtype)
    gate = (torch.randn(7, 3, 32, generator=gen) * 4).to(dtype)[..., 16:]  # a strided view, as the layer passes it
    y = sigmoid_gate_mul(x=x, gate=gate)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, x.double() * torch.sigmoid(gate.double()))
