"""GPU tier (`pytest -m gpu`): the grammar mask applied on CUDA equals the CPU one; constrained requests on CUDA
(async scheduling, CUDA graphs: the mask is applied after the graph) validate, and leave unconstrained requests in
the same batch with their own tokens; greedy constrained outputs equal the CPU reference."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
import torch

from deltaserve import LLM, SamplingParams
from deltaserve.engine.runner import grammar_to_device
from deltaserve.engine.sampler import apply_grammar
from deltaserve.engine.step_input import GrammarMask
from deltaserve.structured import StructuredSpec
from tests.engine.test_structured_engine import tiny  # noqa: F401 (fixture)
from tests.structured.schemas import SCHEMAS

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("vocab", [65, 248320])
def test_mask_on_cuda_equals_cpu(vocab):
    rng = np.random.default_rng(0)
    logits = torch.randn(64, vocab, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    mask = GrammarMask(np.arange(0, 64, 2, dtype=np.int64),
                       rng.integers(-2**31, 2**31, size=(32, (vocab + 31) // 32), dtype=np.int64).astype(np.int32))
    cpu = apply_grammar(logits, grammar_to_device(mask, torch.device("cpu")), copy=True)
    gpu = apply_grammar(logits.cuda(), grammar_to_device(mask, torch.device("cuda")), copy=True)
    assert torch.equal(gpu.cpu(), cpu)


@pytest.mark.parametrize("enforce_eager", [False, True], ids=["graphs", "eager"])
def test_constrained_on_cuda_validate_and_leave_others_alone(tiny, enforce_eager):  # noqa: F811
    llm = LLM(str(tiny), device="cuda", dtype="float32", max_model_len=512, enforce_eager=enforce_eager)
    assert llm.engine.async_scheduling
    free = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    alone = llm.generate([[3, 4, 5]], free)[0].outputs[0].token_ids
    schema = SCHEMAS["nested"]
    spec = StructuredSpec.json_schema(schema)
    outs = llm.generate([[3, 4, 5], [7, 8], [9, 10, 11]], [
        free, SamplingParams(structured=spec, n=4, seed=1, max_tokens=300),
        SamplingParams(structured=spec, temperature=0, max_tokens=300)])
    assert outs[0].outputs[0].token_ids == alone
    for out in outs[1:]:
        for c in out.outputs:
            assert c.finish_reason == "stop"
            jsonschema.validate(json.loads(c.text), schema)


def test_greedy_constrained_equals_cpu(tiny):  # noqa: F811
    params = SamplingParams(structured=StructuredSpec.json_schema(SCHEMAS["bounded"]), temperature=0,
                            max_tokens=200)
    prompts = [[5, 6, 7], [40, 41, 42, 43]]
    cpu = LLM(str(tiny), device="cpu", dtype="float32", max_model_len=512).generate(prompts, params)
    gpu = LLM(str(tiny), device="cuda", dtype="float32", max_model_len=512).generate(prompts, params)
    assert [o.outputs[0].text for o in gpu] == [o.outputs[0].text for o in cpu]
