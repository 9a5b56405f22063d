"""The seam that folds a decoder layer's input RMSNorm into its mixer's input projection (DecoderLayer._mixer_input,
PendingNorm, Linear.can_fold_norm). On CPU the fold is never taken (the engine runs exactly as before); forced on,
the references it then runs (norm, then linear) must give a decode bit for bit equal to the unfused one, which
checks the wiring: the residual stream handed on, the first layer without a residual, both mixer kinds. The fused
kernel itself: tests/kernels/test_norm_linear.py; on the GPU, tests/engine/test_norm_fold_gpu.py."""

from __future__ import annotations

import pytest
import torch

from deltaserve.config import ModelConfig
from deltaserve.kernels import linear as linear_kernels
from deltaserve.layers import linear as linear_layers
from deltaserve.layers.linear import Linear, LinearMethod
from deltaserve.models import qwen3_5
from deltaserve.models.loader import load_model
from tests.models.factory import TinySpec, text_kwargs
from tests.models.simple_runner import SimpleRunner


def _tiny(moe: bool):
    kw = text_kwargs(TinySpec("fold", moe=moe))
    arch = "Qwen3_5MoeForCausalLM" if moe else "Qwen3_5ForCausalLM"
    config = ModelConfig.from_dict({**kw, "architectures": [arch], "dtype": "bfloat16"})
    return load_model(config, load_format="dummy", dtype=torch.bfloat16, device="cpu")


def _decode(model) -> list[torch.Tensor]:
    runner = SimpleRunner(model)
    outs = [runner.step({0: [5, 9, 17, 3], 1: [8, 2]})[0]]
    for tok in (11, 12, 13):
        step = runner.step({0: [tok], 1: [tok + 1]})
        outs += [step[0], step[1]]
    return outs


def test_cpu_never_folds():
    layer = Linear(64, 32, dtype=torch.bfloat16)
    assert not layer.can_fold_norm(torch.zeros(1, 64, dtype=torch.bfloat16))


def test_quantized_methods_never_fold(monkeypatch):
    monkeypatch.setattr(linear_layers, "can_fold_norm", lambda **kwargs: True)  # as if on the GPU
    layer = Linear(64, 32, dtype=torch.bfloat16)
    h = torch.zeros(1, 64, dtype=torch.bfloat16)
    assert layer.can_fold_norm(h)

    class Quantized(LinearMethod):
        name = "int4 g128"

    layer.method = Quantized()
    assert not layer.can_fold_norm(h)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_forced_fold_decodes_bitwise_like_unfused(moe, monkeypatch):
    model = _tiny(moe)
    want = _decode(model)
    calls = []
    fold = linear_kernels.rms_norm_linear

    def counted(**kwargs):
        calls.append(kwargs["residual"] is None)
        return fold(**kwargs)

    monkeypatch.setattr(linear_layers, "can_fold_norm", lambda **kwargs: True)
    monkeypatch.setattr(linear_layers, "rms_norm_linear", counted)
    got = _decode(model)
    layers = len(model.model.layers)
    assert len(calls) == 4 * layers and sum(calls) == 4  # every layer of every step; the first without a residual
    for a, b in zip(want, got):
        assert torch.equal(a, b)
    monkeypatch.setattr(qwen3_5, "FOLD_INPUT_NORM", False)  # the switch turns it off
    calls.clear()
    _decode(model)
    assert not calls
