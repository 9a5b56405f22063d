"""LLM.generate's prompt shapes: what it accepts, and a clear TypeError for what it does not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deltaserve import LLM, SamplingParams
from tests.models.factory import TinySpec, save_servable_checkpoint

GREEDY = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = tmp_path_factory.mktemp("llm_api")
    save_servable_checkpoint(TinySpec("llm_api", extra={"vocab_size": 320}), path)
    return LLM(str(path), dtype="float32", device="cpu", max_model_len=64)


def texts(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


def test_arrays_and_tensors_of_ids_are_prompts(llm):
    """A 1-D numpy array or tensor is one prompt, a 2-D one a batch (they used to fail inside list(): "'numpy.int64'
    object is not iterable", "iteration over a 0-d tensor")."""
    want = texts(llm.generate([[10, 11, 12], [13, 14, 15]], GREEDY))
    assert texts(llm.generate(np.array([10, 11, 12]), GREEDY)) == want[:1]
    assert texts(llm.generate(torch.tensor([[10, 11, 12], [13, 14, 15]]), GREEDY)) == want
    assert texts(llm.generate({"prompt_token_ids": torch.tensor([13, 14, 15])}, GREEDY)) == want[1:]


@pytest.mark.parametrize("prompt,needle", [
    (None, "got NoneType None"), (5, "got int 5"), ([1.5, 2.0], "got float 1.5"),
    (b"abc", "decode bytes to str first"),  # was read as the token ids [97, 98, 99]
    ({"prompt": None}, "got NoneType None"), ({"prompt_token_ids": [1, "x"]}, "the prompt holds str 'x'"),
    (["fine", 7], "got int 7"),
])
def test_a_prompt_of_another_kind_is_a_type_error_naming_the_kinds(llm, prompt, needle):
    with pytest.raises(TypeError, match="a prompt must be a str, a list of int token ids") as e:
        llm.generate(prompt, GREEDY)
    assert needle in str(e.value)
    stats = llm.engine.stats()
    assert stats["running"] == stats["waiting"] == stats["slots_used"] == 0  # a prompt queued before it was aborted


@pytest.mark.parametrize("message", [{"content": "hi"}, {"role": "User", "content": "hi"}, {"role": None}])
def test_chat_message_without_a_known_role_is_refused(llm, message):
    """The chat template renders messages by role: one without a known role was silently left out of the prompt
    (llm.chat([{"content": "hi"}]) generated from an empty conversation)."""
    with pytest.raises(ValueError, match=r"message 1 has role .*; use 'system', 'user', 'assistant'"):
        llm.chat([{"role": "system", "content": "be brief"}, message], GREEDY)
    developer = llm.chat([{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}], GREEDY)
    system = llm.chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}], GREEDY)
    assert developer[0].prompt_token_ids == system[0].prompt_token_ids  # OpenAI's developer is the system role


def test_use_tqdm_as_in_vllm(llm, capsys):
    """generate and chat take vLLM's use_tqdm (True by default: a bar over the prompts; False: none; a callable:
    the tqdm class to use); it was a TypeError ("unexpected keyword argument 'use_tqdm'") for code written for vLLM."""
    want = texts(llm.generate([[10, 11, 12], [13, 14]], GREEDY, use_tqdm=False))
    assert capsys.readouterr().err == ""
    assert texts(llm.generate([[10, 11, 12], [13, 14]], GREEDY)) == want
    err = capsys.readouterr().err
    assert "Processed prompts" in err and "2/2" in err
    bars = []

    class Bar:  # a caller's own tqdm class
        def __init__(self, total, **kw):
            self.total, self.n, self.closed = total, 0, False
            bars.append(self)

        def update(self, k):
            self.n += k

        def close(self):
            self.closed = True

    assert texts(llm.generate([[10, 11, 12], [13, 14]], GREEDY, use_tqdm=Bar)) == want
    assert (bars[0].total, bars[0].n, bars[0].closed) == (2, 2, True)
    assert len(llm.chat([{"role": "user", "content": "hi"}], GREEDY, use_tqdm=False)) == 1


def test_generate_without_sampling_params_takes_the_checkpoints_generation_config(tmp_path):
    """As vLLM's LLM (get_default_sampling_params): sampling_params=None means the sampling generation_config.json
    sets, as the server's requests get; the offline API used SamplingParams() (temperature 1, top_p 1) instead."""
    save_servable_checkpoint(TinySpec("llm_api_gen", extra={"vocab_size": 320}), tmp_path)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": 256, "temperature": 0.0, "top_k": 20}')
    llm = LLM(str(tmp_path), dtype="float32", device="cpu", max_model_len=64)
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.top_k, defaults.top_p) == (0.0, 20, 1.0)
    greedy = SamplingParams(temperature=0, top_k=20)
    ps = [[10, 11, 12], [40, 41]]
    assert texts(llm.generate(ps, use_tqdm=False)) == texts(llm.generate(ps, greedy, use_tqdm=False))


def test_chat_takes_add_generation_prompt_as_in_vllm(llm):
    """vLLM's LLM.chat(..., add_generation_prompt=False) renders the conversation without the assistant's opening
    (the server's field of that name does the same); it was a TypeError."""
    conv = [{"role": "user", "content": "hi"}]
    opened = llm.chat(conv, GREEDY, use_tqdm=False)[0].prompt_token_ids
    closed = llm.chat(conv, GREEDY, use_tqdm=False, add_generation_prompt=False)[0].prompt_token_ids
    assert len(closed) < len(opened) and opened[:len(closed)] == closed
