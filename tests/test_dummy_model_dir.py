"""benchmarks/dummy_model_dir.py: the directory it writes loads as the server loads it (config and tokenizer)."""

from __future__ import annotations

import pytest

from benchmarks.common import SHAPES
from benchmarks.dummy_model_dir import SPECIAL_TOKENS, write_model_dir
from deltaserve.config import ModelConfig
from deltaserve.engine.tokenizer import eos_token_ids, load_tokenizer, render_chat


def check_dir(model: str, path) -> None:
    write_model_dir(model, path)
    cfg = ModelConfig.from_hf(path)
    tok = load_tokenizer(path)
    assert cfg.vocab_size == SHAPES[model]["vocab_size"] == len(tok)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.is_moe) == (
        SHAPES[model]["hidden_size"], SHAPES[model]["num_hidden_layers"], "Moe" in SHAPES[model]["architectures"][0])
    specials = tok.convert_ids_to_tokens(list(range(cfg.vocab_size - len(SPECIAL_TOKENS), cfg.vocab_size)))
    assert tuple(specials) == SPECIAL_TOKENS
    assert set(eos_token_ids(tok, cfg.eos_token_ids)) == {tok.convert_tokens_to_ids(t)
                                                          for t in ("<|im_end|>", "<|endoftext|>")}
    text = "alpha river, 12 ünï\n"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    ids = render_chat(tok, [{"role": "user", "content": "hi"}])
    assert tok.decode(ids, skip_special_tokens=False).startswith("<|im_start|>user\nhi<|im_end|>")


def test_tiny_dir_loads(tmp_path):
    check_dir("tiny", tmp_path)
    tok = load_tokenizer(tmp_path)
    # streamed text arrives with every generated token: no ordinary id decodes to nothing
    assert all(tok.decode([i]) for i in range(len(tok) - len(SPECIAL_TOKENS)))


@pytest.mark.slow
def test_published_moe_dir_loads(tmp_path):
    """The real vocabulary (248,320 ids) and the class transformers picks for qwen3_5_moe_text."""
    check_dir("35B-A3B", tmp_path)
