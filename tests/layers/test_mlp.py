"""The dense MLP's down projection applied to its gate|up output (Linear.forward_silu_mul): the plain weight folds
the activation into its GEMM (kernels/linear silu_mul_linear); every other linear method gets silu_and_mul's output
through its own apply, unchanged."""

from __future__ import annotations

import pytest
import torch

from deltaserve.kernels.activation import silu_and_mul
from deltaserve.layers.linear import Linear
from deltaserve.layers.mlp import MLP
from deltaserve.layers.quant import Fp8LinearMethod, Int4LinearMethod, WeightFormat


def gate_up(rows: int, intermediate: int) -> torch.Tensor:
    return (torch.randn(rows, 2 * intermediate, generator=torch.Generator().manual_seed(rows)) * 2).bfloat16()


@pytest.mark.parametrize("method", [None, Fp8LinearMethod(WeightFormat(kind="fp8", checkpoint="fp8", group_size=128,
                                                                        block_n=128)),
                                    Int4LinearMethod(WeightFormat(kind="int4", checkpoint="gptq", group_size=128),
                                                     None)], ids=["unquantized", "fp8", "int4"])
def test_forward_silu_mul_is_forward_of_silu_and_mul(method):
    down = Linear(256, 64, dtype=torch.bfloat16, method=method)
    down.init_dummy_weights("down_proj.", seed=0)
    for rows in (1, 3):
        h = gate_up(rows, 256)
        assert torch.equal(down.forward_silu_mul(h), down(silu_and_mul(x=h)))


def test_mlp_forward_calls_the_fold(monkeypatch):
    """MLP.forward hands down_proj the gate|up output itself (no separate activation on the way)."""
    mlp = MLP(32, 48, dtype=torch.bfloat16)
    for name, module in mlp.named_children():
        module.init_dummy_weights(f"{name}.", seed=1)
    seen = []
    fold = Linear.forward_silu_mul
    monkeypatch.setattr(Linear, "forward_silu_mul", lambda self, h: seen.append(h.shape) or fold(self, h))
    x = torch.randn(2, 32).bfloat16()
    y = mlp(x)
    assert seen == [(2, 96)]
    assert torch.equal(y, mlp.down_proj(silu_and_mul(x=mlp.gate_up_proj(x))))
