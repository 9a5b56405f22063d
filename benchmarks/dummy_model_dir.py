"""A model directory with a published model's config.json and a generated tokenizer, for `--load-format dummy`.

python benchmarks/dummy_model_dir.py --model 35B-A3B --out /tmp/qwen35-35b-a3b
deltaserve serve /tmp/qwen35-35b-a3b --load-format dummy --max-model-len 10240

Serving a real shape needs no checkpoint (the weights are random with --load-format dummy), but the server reads
config.json and a tokenizer from the directory. This writes:

- config.json / generation_config.json: the text model of that shape (benchmarks/common.py SHAPES, from the
  published configs) in the flat CausalLM form the loader reads, with explicit layer_types (every 4th layer full
  attention) and one MTP layer, as the published checkpoints have (the tiny shape has none);
- tokenizer.json: a generated tokenizer with exactly vocab_size tokens, in the form of Qwen's (byte-level BPE with
  Qwen's pre-tokenizer, normalizer and decoder, taken from the demo model's tokenizer.json): the 256 byte
  symbols, then lowercase letter strings "aa", "ab", ..., "zz", "aaa", ... each made by one merge (prefix + letter),
  and Qwen's chat special tokens on the top ids. Every non-special id decodes to non-empty text, so streamed text arrives with every generated token;
- tokenizer_config.json and chat_template.jinja (the demo model's template), so chat requests render too.

Why BPE and not a word-level model: transformers 5 loads a checkpoint whose config.json says model_type qwen3_5*
with its Qwen3_5Tokenizer class, which rebuilds a byte-level BPE from tokenizer.json's vocab and merges; a
word-level vocabulary would then be tokenized and decoded differently from tokenizer.json. Written in Qwen's form,
the tokenizer is the same whichever class loads it.

The text is meaningless and token counts differ from Qwen's real tokenizer: random token-id prompts (what
serve_load.py sends to /v1/completions) are unaffected, but a chat prompt of serve_load's words takes about 3
tokens a word (the merges rarely rebuild a whole word), not the 1 its --input-len assumes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import SHAPES  # noqa: E402

# Qwen's chat tokens, in the order of Qwen's added tokens (the demo model's too); they take the top ids.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>",
                  "</tool_call>", "<tool_response>", "</tool_response>")
_DEMO = Path(__file__).resolve().parent.parent / "src" / "deltaserve" / "demo_model"


def words(n: int) -> list[str]:
    """The first n lowercase strings of two letters or more, shortest first, then alphabetical: aa, ab, ..., zz,
    aaa, ... (bijective base 26 from 27). Each one's prefix without its last letter comes earlier (or is a letter)."""
    out = []
    for i in range(27, n + 27):
        chars = []
        while i:
            i, r = divmod(i - 1, 26)
            chars.append(chr(ord("a") + r))
        out.append("".join(reversed(chars)))
    return out


def config_for(model: str, special_ids: dict[str, int]) -> dict[str, Any]:
    """config.json of `model`: the SHAPES entry plus what a published text config also states."""
    shape = dict(SHAPES[model])
    moe = "Moe" in shape["architectures"][0]
    layers = shape["num_hidden_layers"]
    eos = [special_ids["<|im_end|>"], special_ids["<|endoftext|>"]]
    return {**shape, "model_type": "qwen3_5_moe_text" if moe else "qwen3_5_text",
            "layer_types": ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(layers)],
            "hidden_act": "silu", "attn_output_gate": True, "tie_word_embeddings": False,
            "mtp_num_hidden_layers": 0 if model == "tiny" else 1,
            "eos_token_id": eos, "pad_token_id": special_ids["<|endoftext|>"], "bos_token_id": None}


def build_tokenizer(vocab_size: int):
    """A tokenizers.Tokenizer with exactly vocab_size ids: the 256 byte symbols, merged letter strings, then
    SPECIAL_TOKENS on top; normalizer, pre-tokenizer and decoder are the demo model's (Qwen's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    n_words = vocab_size - len(alphabet) - len(SPECIAL_TOKENS)
    if n_words < 0:
        raise ValueError(f"vocab_size {vocab_size} is below the {len(alphabet)} byte symbols plus "
                         f"{len(SPECIAL_TOKENS)} special tokens")
    merged = words(n_words)
    vocab = {t: i for i, t in enumerate(alphabet + merged)}
    merges = [(w[:-1], w[-1]) for w in merged]
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    demo = Tokenizer.from_file(str(_DEMO / "tokenizer.json"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = demo.normalizer, demo.pre_tokenizer, demo.decoder
    tok.add_special_tokens(list(SPECIAL_TOKENS))  # ids vocab_size-9 .. vocab_size-1, in this order
    return tok


def write_model_dir(model: str, out: str | Path) -> Path:
    """Write the directory (created if missing; files of the same names are replaced) and return its path."""
    if model not in SHAPES:
        raise ValueError(f"unknown model {model!r}; known shapes: {sorted(SHAPES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab_size = SHAPES[model]["vocab_size"]
    tok = build_tokenizer(vocab_size)
    special_ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size
    tok.save(str(out / "tokenizer.json"))
    config = config_for(model, special_ids)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": config["eos_token_id"], "pad_token_id": config["pad_token_id"]}, indent=2) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "backend": "tokenizers", "tokenizer_class": "TokenizersBackend", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "extra_special_tokens": list(SPECIAL_TOKENS),
        "model_max_length": config["max_position_embeddings"], "clean_up_tokenization_spaces": False}, indent=2) + "\n")
    shutil.copyfile(_DEMO / "chat_template.jinja", out / "chat_template.jinja")
    (out / "README.md").write_text(
        f"Dummy model directory for the {model} shape, written by benchmarks/dummy_model_dir.py: no weights "
        "(serve it with --load-format dummy) and a generated tokenizer.\n")
    return out


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, choices=sorted(SHAPES), help="shape from benchmarks/common.py")
    p.add_argument("--out", required=True, help="directory to write (created if missing)")
    args = p.parse_args(argv)
    out = write_model_dir(args.model, args.out)
    print(f"wrote {out}: {args.model} config.json, tokenizer of {SHAPES[args.model]['vocab_size']} tokens")
    return out


if __name__ == "__main__":
    main()
