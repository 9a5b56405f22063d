"""silu_and_mul against a float64 formula."""

from __future__ import annotations

import pytest
import torch
from tolerances import assert_close

from deltaserve.kernels.activation import silu_and_mul


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 63, 65])
def test_silu_and_mul(dtype, rows):
    gen = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, 2 * 37, generator=gen) * 4).to(dtype)
    y = silu_and_mul(x=x)
    assert y.dtype == dtype and y.shape == (rows, 37)
    gate, up = x[:, :37].double(), x[:, 37:].double()
    assert_close(y, gate * torch.sigmoid(gate) * up)
