"""GPU tier: folding the input RMSNorm into the mixers' input projections (models/qwen3_5.py FOLD_INPUT_NORM) keeps
a decode step's results. The tiny test models' projections are too small for any kernel tile, so every few-row
linear is given the same small Triton tile (both with the fold and without: the only difference left is the norm's
place). Replayed from a CUDA graph, decode steps with the fold must equal eager ones with the fold bit for bit, and
eager ones without it within bf16 noise (the fused rstd sums its squares in another order than the norm kernel,
which may move an input by one bf16 ulp); every layer must have taken the fold."""

from __future__ import annotations

import pytest
import torch

from deltaserve.engine.cuda_graph import StepGraphs
from deltaserve.engine.device_inputs import build_forward_batch
from deltaserve.kernels.linear import gpu as linear_gpu
from deltaserve.kernels.linear import triton as linear_triton
from deltaserve.models import qwen3_5
from tests.engine.test_pdl_gpu import PAGE, PAGES, ROWS, STEPS, _cache, _model, _state

pytestmark = pytest.mark.gpu
TILE = linear_triton.Tile(16, 32, 4, 2)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_decode_graph_with_fold_equals_eager(moe, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = _model(moe)
    monkeypatch.setattr(linear_gpu, "tile_config", lambda rows, *args: TILE if rows <= 16 else None)
    monkeypatch.setattr(linear_gpu, "norm_fold_tile", lambda rows, *args: TILE if rows <= 16 else None)
    folded = []
    skinny = linear_triton.skinny_linear

    def counted(*args, **kwargs):
        folded.append(kwargs.get("norm") is not None)
        return skinny(*args, **kwargs)

    monkeypatch.setattr(linear_gpu, "skinny_linear", counted)
    ctx = [20, 7, 33]
    tables = [list(range(1 + r * PAGES, 1 + (r + 1) * PAGES)) for r in range(ROWS)]
    fb = build_forward_batch(query_lens=[1] * ROWS, context_lens=ctx, state_slots=list(range(ROWS)),
                             block_tables=tables, page_size=PAGE, device="cuda")
    ids = [torch.randint(1, model.config.vocab_size, (ROWS,), device="cuda") for _ in range(STEPS)]

    def eager(fold):
        monkeypatch.setattr(qwen3_5, "FOLD_INPUT_NORM", fold)
        cache, outs = _cache(model), []
        with torch.no_grad():
            for step_ids in ids:
                h = model(step_ids, fb, cache)
                outs.append((h.clone(), model.compute_logits(h, upcast=False).clone(), _state(cache)))
        return outs

    def graphed():
        monkeypatch.setattr(qwen3_5, "FOLD_INPUT_NORM", True)
        cache = _cache(model)
        graphs = StepGraphs(model, cache, max_batch=ROWS, max_pages=PAGES, device=torch.device("cuda"))
        graphs.sizes = [ROWS]
        graphs.capture()
        outs = []
        for step_ids in ids:
            h, logits = graphs.run(step_ids, fb)
            outs.append((h.clone(), logits.clone(), _state(cache)))
        return outs

    unfused = eager(False)
    assert not any(folded)
    fused = eager(True)
    assert sum(folded) == STEPS * len(model.model.layers), "a layer did not fold its input norm"
    replayed = graphed()
    for step, (u, f, g) in enumerate(zip(unfused, fused, replayed)):
        for name, a, b, c in zip(["hidden", "logits", "states"], u, f, g):
            a, b, c = ([a], [b], [c]) if name != "states" else (a, b, c)
            for x, y, z in zip(a, b, c):
                assert torch.equal(z, y), f"step {step} {name}: graph replay with the fold != eager with it"
                assert _rel_err(y, x) < 2e-2, f"step {step} {name}: the fold moved the result beyond bf16 noise"
