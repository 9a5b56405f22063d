"""Structured outputs through the whole engine on CPU: every constrained output validates (demo model and a tiny
random model, many seeds, several schemas, n > 1); unconstrained requests in the same batch get exactly their
tokens alone; async scheduling and preemption change nothing; a cut-off structure ends with "length"."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from deltaserve import LLM, SamplingParams
from deltaserve.demo import write_byte_tokenizer
from deltaserve.engine.engine import RequestError
from deltaserve.engine.sampler import GrammarBitmask, apply_grammar
from deltaserve.structured import StructuredSpec
from tests.models.factory import TinySpec, save_checkpoint
from tests.structured.schemas import SCHEMAS

VOCAB = 320


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("structured_ckpt")
    save_checkpoint(TinySpec("structured", moe=True, extra={"vocab_size": VOCAB}), path, seed=5)
    write_byte_tokenizer(path)
    (path / "generation_config.json").write_text('{"eos_token_id": [256, 258]}')
    return path


def make_llm(path, **kw) -> LLM:
    kw.setdefault("max_model_len", 512)
    return LLM(str(path), dtype="float32", device="cpu", **kw)


@pytest.fixture(scope="module")
def demo():
    return LLM(device="cpu", dtype="float32", max_model_len=1024)


def constrained(name: str, seed: int, n: int = 1, **kw) -> SamplingParams:
    return SamplingParams(structured=StructuredSpec.json_schema(SCHEMAS[name]), seed=seed, n=n,
                          max_tokens=kw.pop("max_tokens", 300), **kw)


def assert_valid(outputs, schema) -> None:
    for out in outputs:
        for c in out.outputs:
            assert c.finish_reason == "stop", c.text
            jsonschema.validate(json.loads(c.text), schema)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_demo_model_outputs_validate(demo, name):
    prompts = ["def main(", "import json\n", '"""Parse the']
    assert_valid(demo.generate(prompts, constrained(name, 100, n=4, temperature=1.0)), SCHEMAS[name])  # 12 seeds


# A random model may write a number's digits or a recursive structure for ever (the schemas do not bound them),
# so the random model gets the bounded schemas: every output must then end within max_tokens.
@pytest.mark.parametrize("name", ["nested", "bounded"])
def test_tiny_random_model_outputs_validate(tiny, name):
    llm = make_llm(tiny)
    outs = llm.generate([[5, 6, 7], [40, 41], [100] * 30], constrained(name, 7, n=6, temperature=1.2))
    assert_valid(outs, SCHEMAS[name])
    assert_valid(llm.generate([[9, 9]], constrained(name, 0, temperature=0)), SCHEMAS[name])  # greedy too


def test_other_kinds_on_the_demo_model(demo):
    regex = demo.generate(["x = "], SamplingParams(structured=StructuredSpec.regex(r"[0-9]{3}-[a-z]{2}"), seed=1,
                                                   max_tokens=20))
    assert regex[0].outputs[0].finish_reason == "stop"
    assert len(regex[0].outputs[0].text) == 6 and regex[0].outputs[0].text[3] == "-"
    choice = demo.generate(["return "], SamplingParams(structured=StructuredSpec.choice(["True", "False"]), n=4,
                                                       seed=3, max_tokens=10))
    assert {c.text for c in choice[0].outputs} <= {"True", "False"}
    any_object = demo.generate(["data = "], SamplingParams(structured=StructuredSpec.json_object(), seed=2, n=4,
                                                           max_tokens=400))
    for c in any_object[0].outputs:
        assert c.finish_reason == "length" or isinstance(json.loads(c.text), dict)


def test_unconstrained_requests_get_their_tokens_alone(tiny):
    llm = make_llm(tiny)
    free = [SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
            SamplingParams(temperature=1.0, seed=11, max_tokens=16, ignore_eos=True)]
    prompts = [[3, 4, 5, 6], [70, 71]]
    alone = [llm.generate([p], s)[0].outputs[0].token_ids for p, s in zip(prompts, free)]
    mixed = llm.generate([prompts[0], [8, 9], prompts[1], [10, 11, 12]],
                         [free[0], constrained("nested", 3, temperature=1.0), free[1], constrained("ranges", 4)])
    assert [mixed[0].outputs[0].token_ids, mixed[2].outputs[0].token_ids] == alone
    assert_valid([mixed[1]], SCHEMAS["nested"])
    assert_valid([mixed[3]], SCHEMAS["ranges"])


@pytest.mark.parametrize("kw", [dict(), dict(num_pages=20, max_model_len=160, max_num_batched_tokens=40,
                                           growth_reserve=False)],
                         ids=["roomy", "preemption"])
def test_async_scheduling_and_preemption_give_the_same_outputs(tiny, kw):
    prompts = [[i + 1] * (40 + 9 * i) for i in range(6)]
    params = [constrained(name, 20 + i, temperature=1.0, max_tokens=120)
              for i, name in enumerate(["nested", "bounded", "ranges"] * 2)]
    sync = make_llm(tiny, async_scheduling=False, **kw)
    overlapped = make_llm(tiny, async_scheduling=True, **kw)
    preempted = []
    real = overlapped.engine.scheduler.schedule
    overlapped.engine.scheduler.schedule = lambda: (out := real(), preempted.extend(out.preempted))[0]
    expected = [o.outputs[0].token_ids for o in sync.generate(prompts, params)]
    got = overlapped.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in got] == expected
    assert bool(preempted) == ("num_pages" in kw)
    for out, p in zip(got, params):
        if out.outputs[0].finish_reason == "stop":
            jsonschema.validate(json.loads(out.outputs[0].text), json.loads(p.structured.spec))


def test_max_tokens_before_the_structure_closes_is_length(demo):
    out = demo.generate(["x"], constrained("nested", 0, max_tokens=4))[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 4 and out.text.startswith("{")


def test_pools_and_matchers_free_after_every_kind_of_end(tiny):
    llm = make_llm(tiny)
    llm.generate([[1, 2], [3, 4]], [constrained("nested", 1), constrained("nested", 2, max_tokens=3)])
    llm.engine.add_request("gone", [5, 6], constrained("arrays", 3))
    llm.engine.step()
    llm.engine.abort_request("gone")
    assert not llm.engine.structured._sequences and llm.engine.cache.is_empty()


def test_bad_constraints_are_refused_whole(tiny):
    llm = make_llm(tiny)
    with pytest.raises(RequestError, match="uniqueItems"):
        llm.engine.add_request("bad", [1, 2], SamplingParams(
            structured=StructuredSpec.json_schema({"type": "array", "uniqueItems": True})))
    assert "bad" not in llm.engine.outputs and not llm.engine.scheduler.has_unfinished()
    with pytest.raises(ValueError, match="ignore_eos"):
        SamplingParams(structured=StructuredSpec.json_object(), ignore_eos=True)


def test_grammar_mask_matches_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 70, generator=g)
    bitmask = torch.randint(-2**31, 2**31 - 1, (2, 3), generator=g, dtype=torch.int64).to(torch.int32)
    out = apply_grammar(logits, GrammarBitmask(torch.tensor([1, 3]), bitmask), copy=True)
    expected = logits.clone()
    for k, row in enumerate((1, 3)):
        for t in range(70):
            if not (int(bitmask[k, t // 32]) >> (t % 32)) & 1:
                expected[row, t] = float("-inf")
    assert torch.equal(out, expected) and not torch.isinf(logits).any()
