"""GPU tier: Programmatic Dependent Launch does not change a decode step. The tiny test models (dense and MoE, bf16)
run decode steps eagerly with PDL off and replayed from a CUDA graph captured with PDL on (the default at sm_90+):
hidden states, logits, GDN states, conv windows and KV pages must agree bit for bit, step after step (each step
reads the states the one before wrote). A graph captured with PDL off is compared too, so a mismatch says whether
PDL or graph-vs-eager is to blame."""

from __future__ import annotations

import pytest
import torch

from deltaserve.cache.tensors import CacheShape, ModelCache
from deltaserve.config import ModelConfig
from deltaserve.engine.cuda_graph import StepGraphs
from deltaserve.engine.device_inputs import build_forward_batch
from deltaserve.kernels import _device
from deltaserve.models.loader import load_model
from tests.models.factory import TinySpec, text_kwargs

pytestmark = pytest.mark.gpu
PAGE, PAGES, ROWS, STEPS = 16, 4, 3, 4


def _model(moe: bool):
    kw = text_kwargs(TinySpec("pdl", moe=moe))
    arch = "Qwen3_5MoeForCausalLM" if moe else "Qwen3_5ForCausalLM"
    config = ModelConfig.from_dict({**kw, "architectures": [arch], "dtype": "bfloat16"})
    return load_model(config, load_format="dummy", dtype=torch.bfloat16, device="cuda")


def _cache(model) -> ModelCache:
    cache = ModelCache(model.config, CacheShape(num_pages=ROWS * PAGES + 1, page_size=PAGE, num_slots=ROWS,
                                                kv_dtype=torch.bfloat16, conv_dtype=torch.bfloat16),
                       device="cuda")
    torch.manual_seed(1)
    for pages in cache._kv.values():
        pages.k.normal_()
        pages.v.normal_()
    cache._conv.normal_()
    cache._ssm.normal_(0, 0.1)
    return cache


def _state(cache: ModelCache) -> list[torch.Tensor]:
    return [cache._ssm.clone(), cache._conv.clone()] + [t.clone() for p in cache._kv.values() for t in (p.k, p.v)]


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_decode_graph_with_pdl_equals_eager_without(moe, monkeypatch):
    if not _device.pdl_supported(torch.device("cuda")):
        pytest.skip("needs a GPU that supports PDL (sm_90+, CUDA >= 12.3)")
    model = _model(moe)
    ctx = [20, 7, 33]
    # every row's table as wide as the graph's, so eager and graph pick the same attention split count
    tables = [list(range(1 + r * PAGES, 1 + (r + 1) * PAGES)) for r in range(ROWS)]
    fb = build_forward_batch(query_lens=[1] * ROWS, context_lens=ctx, state_slots=list(range(ROWS)),
                             block_tables=tables, page_size=PAGE, device="cuda")
    ids = [torch.randint(1, model.config.vocab_size, (ROWS,), device="cuda") for _ in range(STEPS)]

    def eager(cache):
        outs = []
        with torch.no_grad():
            for step_ids in ids:
                h = model(step_ids, fb, cache)
                outs.append((h.clone(), model.compute_logits(h, upcast=False).clone(), _state(cache)))
        return outs

    def graphed(cache, pdl):
        monkeypatch.setattr(_device, "PDL", pdl)
        graphs = StepGraphs(model, cache, max_batch=ROWS, max_pages=PAGES, device=torch.device("cuda"))
        graphs.sizes = [ROWS]
        graphs.capture()
        outs = []
        for step_ids in ids:
            h, logits = graphs.run(step_ids, fb)
            outs.append((h.clone(), logits.clone(), _state(cache)))
        return outs

    monkeypatch.setattr(_device, "PDL", False)
    want = eager(_cache(model))
    got_off = graphed(_cache(model), False)
    got_on = graphed(_cache(model), None)  # the default: on at sm_90+
    for step, (w, off, on) in enumerate(zip(want, got_off, got_on)):
        for name, a, b, c in zip(["hidden", "logits", "states"], w, off, on):
            a, b, c = ([a], [b], [c]) if name != "states" else (a, b, c)
            for x, y, z in zip(a, b, c):
                assert torch.equal(z, y), f"step {step} {name}: graph with PDL != graph without"
                assert torch.equal(z, x), f"step {step} {name}: graph with PDL != eager without"
