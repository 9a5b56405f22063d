"""config.json variants that real Qwen3.5 / Qwen3.6 checkpoints use or could use, each loaded by transformers and by
deltaserve from the same directory and compared (fp32 logits, greedy tokens); fields deltaserve does not implement
are refused at start, naming the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltaserve.config import ConfigError, ModelConfig
from deltaserve.models.loader import load_model
from tests.models.factory import TinySpec, save_checkpoint, text_kwargs
from tests.models.simple_runner import SimpleRunner
from tests.models.test_qwen3_5_vs_hf import assert_logits_close, hf_logits, prompt

L, F = "linear_attention", "full_attention"
Patch = Callable[[dict[str, Any], Path], None]


def _text(cfg: dict[str, Any]) -> dict[str, Any]:
    return cfg.get("text_config") or cfg


def no_rope_theta(cfg: dict[str, Any], _: Path) -> None:
    _text(cfg)["rope_parameters"].pop("rope_theta")


def rope_scaling_beside_rope_parameters(cfg: dict[str, Any], _: Path) -> None:
    _text(cfg)["rope_scaling"] = {"rope_type": "default", "rope_theta": 1e5, "partial_rotary_factor": 0.5}


def tie_at_top_level_only(cfg: dict[str, Any], _: Path) -> None:
    """As transformers saves Qwen3_5Config(tie_word_embeddings=True) with a default text_config."""
    cfg["tie_word_embeddings"], cfg["text_config"]["tie_word_embeddings"] = True, False


def tie_with_distinct_lm_head(cfg: dict[str, Any], path: Path) -> None:
    """The config ties, but the checkpoint carries its own lm_head (transformers then does not tie)."""
    _text(cfg)["tie_word_embeddings"] = True
    tensors = load_file(path / "model.safetensors")
    assert not torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])


CASES: list[tuple[str, TinySpec, Patch | None]] = [
    # mismatches found by fuzzing the config fields against transformers
    ("no_rope_theta", TinySpec("a"), no_rope_theta),
    ("rope_scaling_beside_rope_parameters", TinySpec("a"), rope_scaling_beside_rope_parameters),
    ("nested_tie_at_top_level_only", TinySpec("a", nested=True, tie=True), tie_at_top_level_only),
    ("tie_with_distinct_lm_head", TinySpec("a"), tie_with_distinct_lm_head),
    # representative variants that agree
    ("attention_first_kv1_full_rotary", TinySpec("a", layer_types=(F, L, L), extra=dict(
        num_key_value_heads=1, head_dim=64,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 1.0})), None),
    ("gdn_key_dim_ne_value_dim_conv2_one_key_head", TinySpec("a", gva=4, extra=dict(
        linear_num_key_heads=1, linear_key_head_dim=8, linear_value_head_dim=24, linear_conv_kernel_dim=2)), None),
    ("moe_top1_kv_eq_heads", TinySpec("a", moe=True, extra=dict(num_experts_per_tok=1, num_key_value_heads=4)), None),
]


@pytest.mark.parametrize("spec,patch", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_config_variant_matches_transformers(tmp_path, spec: TinySpec, patch: Patch | None):
    hf = save_checkpoint(spec, tmp_path)
    if patch is not None:
        cfg = json.loads((tmp_path / "config.json").read_text())
        patch(cfg, tmp_path)
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        hf = type(hf).from_pretrained(tmp_path).eval()  # transformers' own reading of the patched config
    ours = load_model(ModelConfig.from_hf(tmp_path), dtype="float32")
    ids = prompt(70, seed=4)
    assert_logits_close(SimpleRunner(ours).step({0: ids}, all_logits=True)[0], hf_logits(hf, ids))
    ids = prompt(5, seed=5)
    expected = hf.generate(torch.tensor([ids]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                           pad_token_id=0)[0, len(ids):].tolist()
    assert SimpleRunner(ours).generate_greedy(0, ids, 16) == expected


def test_redundant_lm_head_equal_to_embedding_stays_tied(tmp_path):
    """A tied checkpoint that also ships lm_head.weight (a copy of the embedding) keeps one shared weight."""
    save_checkpoint(TinySpec("a", tie=True), tmp_path)
    weights = tmp_path / "model.safetensors"
    tensors = load_file(weights)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, weights, metadata={"format": "pt"})
    ours = load_model(ModelConfig.from_hf(tmp_path), dtype="float32")
    assert ours.lm_head.weight is ours.model.embed_tokens.weight


def test_nested_dtype_is_read_as_transformers_reads_it(tmp_path):
    """A nested config whose top level and text_config name different dtypes: transformers' dtype="auto" (its
    from_pretrained default) takes the top-level one."""
    hf = save_checkpoint(TinySpec("a", nested=True), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["dtype"], cfg["text_config"]["dtype"] = "float32", "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    hf = type(hf).from_pretrained(tmp_path)
    assert str(hf.dtype) == "torch." + ModelConfig.from_hf(tmp_path).dtype == "torch.float32"


@pytest.mark.parametrize("field,value,message", [
    ("attention_bias", True, r"config field 'attention_bias' is True; only false is supported"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024},
     r"config field 'rope_scaling.rope_type' is 'yarn'; only 'default' RoPE"),
    ("rope_parameters", {"full_attention": {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5}},
     r"config field 'rope_parameters' holds per-layer-type RoPE parameters \(\['full_attention'\]\)"),
])
def test_unsupported_field_is_refused_naming_it(field, value, message):
    """Fields transformers applies (or fails on): deltaserve refuses them rather than serve different logits."""
    import transformers as tf
    cfg = {**tf.Qwen3_5TextConfig(**text_kwargs(TinySpec("a"))).to_dict(), "architectures": ["Qwen3_5ForCausalLM"]}
    cfg[field] = value
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(cfg)


def test_mrope_rope_scaling_reads_as_default_rope():
    """A Qwen-VL-style `rope_scaling: {"type": "mrope", "mrope_section": ...}` beside rope_parameters: on text the
    multimodal RoPE is the default one, so the config loads (it was refused as an unsupported RoPE type)."""
    import transformers as tf
    cfg = {**tf.Qwen3_5TextConfig(**text_kwargs(TinySpec("a"))).to_dict(), "architectures": ["Qwen3_5ForCausalLM"]}
    cfg["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 1, 1], "rope_theta": 1e6}
    assert ModelConfig.from_dict(cfg).rope_theta == 1e6


def test_swish_reads_as_silu():
    """transformers' ACT2FN gives "swish" the SiLU of "silu": the config loads as SiLU (it was refused)."""
    import transformers as tf
    cfg = {**tf.Qwen3_5TextConfig(**text_kwargs(TinySpec("a"))).to_dict(), "architectures": ["Qwen3_5ForCausalLM"]}
    cfg["hidden_act"] = "swish"
    assert ModelConfig.from_dict(cfg).hidden_act == "silu"
    x = torch.linspace(-8, 8, 101)
    torch.testing.assert_close(tf.activations.ACT2FN["swish"](x), tf.activations.ACT2FN["silu"](x))
