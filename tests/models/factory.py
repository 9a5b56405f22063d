"""Tiny random Qwen3.5 checkpoints made with transformers, in every published layout, for tests."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


@dataclass(frozen=True)
class TinySpec:
    """What varies between test checkpoints."""

    name: str
    moe: bool = False
    nested: bool = False           # Qwen3_5(Moe)ForConditionalGeneration with a (tiny) vision tower
    tie: bool = False
    gva: int = 2                    # linear_num_value_heads / linear_num_key_heads
    layer_types: tuple[str, ...] | None = None
    per_expert: bool = True         # MoE expert storage: per-expert tensors (HF save default) or fused 3-D tensors
    mtp: bool = False               # add random mtp.* tensors (HF does not model the MTP head)
    extra: dict[str, Any] = field(default_factory=dict)


def text_kwargs(spec: TinySpec) -> dict[str, Any]:
    kw: dict[str, Any] = dict(
        vocab_size=160, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, linear_num_key_heads=2, linear_num_value_heads=2 * spec.gva, linear_key_head_dim=16,
        linear_value_head_dim=16, linear_conv_kernel_dim=4, max_position_embeddings=4096, tie_word_embeddings=spec.tie,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        eos_token_id=None,
    )
    if spec.layer_types is not None:
        kw.update(num_hidden_layers=len(spec.layer_types), layer_types=list(spec.layer_types))
    if spec.moe:
        kw.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48)
    else:
        kw.update(intermediate_size=96)
    kw.update(spec.extra)
    return kw


def build_hf_model(spec: TinySpec, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    text = text_kwargs(spec)
    if spec.nested:
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=text["hidden_size"])
        cfg_cls = tf.Qwen3_5MoeConfig if spec.moe else tf.Qwen3_5Config
        cls = tf.Qwen3_5MoeForConditionalGeneration if spec.moe else tf.Qwen3_5ForConditionalGeneration
        config = cfg_cls(text_config=text, vision_config=vision, tie_word_embeddings=spec.tie)
    else:
        cfg_cls = tf.Qwen3_5MoeTextConfig if spec.moe else tf.Qwen3_5TextConfig
        cls = tf.Qwen3_5MoeForCausalLM if spec.moe else tf.Qwen3_5ForCausalLM
        config = cfg_cls(**text)
    model = cls(config).eval()
    _randomize_norms(model)
    return model


def _randomize_norms(model: torch.nn.Module) -> None:
    """HF initialises zero-centred norm weights to 0 and A_log/dt_bias to fixed values; random values make the tests
    sensitive to (1 + w) vs w mistakes and to the gating formula."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 or name.endswith(("A_log", "dt_bias")):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def save_checkpoint(spec: TinySpec, out_dir: Path, seed: int = 0):
    """Save an HF model of `spec` into out_dir; returns the HF model (kept for comparisons)."""
    model = build_hf_model(spec, seed)
    model.save_pretrained(out_dir)
    weights = out_dir / "model.safetensors"
    if spec.moe and not spec.per_expert:
        tensors = load_file(weights)
        save_file(_fuse_experts(tensors), weights, metadata={"format": "pt"})
    if spec.mtp:
        tensors = load_file(weights)
        tensors.update(mtp_tensors(spec, model.config, seed))
        save_file(tensors, weights, metadata={"format": "pt"})
        cfg = json.loads((out_dir / "config.json").read_text())
        (cfg.get("text_config") or cfg)["mtp_num_hidden_layers"] = 1
        (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    return model


def save_servable_checkpoint(spec: TinySpec, out_dir: Path, seed: int = 0):
    """save_checkpoint plus the byte-level tokenizer: a directory LLM(...) and the server load as they are."""
    from deltaserve.demo import write_byte_tokenizer

    model = save_checkpoint(spec, out_dir, seed)
    write_byte_tokenizer(out_dir)
    return model


def _fuse_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for name, t in tensors.items():
        if ".experts." in name and name.endswith("_proj.weight"):
            prefix, rest = name.split(".experts.")
            e, proj, _ = rest.split(".")
            groups.setdefault(prefix, {}).setdefault(int(e), {})[proj] = t
        else:
            out[name] = t
    for prefix, experts in groups.items():
        ids = sorted(experts)
        out[f"{prefix}.experts.gate_up_proj"] = torch.stack(
            [torch.cat([experts[e]["gate_proj"], experts[e]["up_proj"]]) for e in ids]).contiguous()
        out[f"{prefix}.experts.down_proj"] = torch.stack([experts[e]["down_proj"] for e in ids]).contiguous()
    return out


def mtp_tensors(spec: TinySpec, hf_config, seed: int) -> dict[str, torch.Tensor]:
    """Random mtp.* tensors of the right shapes (per-expert MoE layout), as real checkpoints ship them."""
    text = text_kwargs(spec)
    d, hd, nq, nkv = text["hidden_size"], text["head_dim"], text["num_attention_heads"], text["num_key_value_heads"]
    g = torch.Generator().manual_seed(seed + 7)

    def r(*shape: int, scale: float | None = None) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * (scale if scale is not None else shape[-1] ** -0.5)

    t = {"mtp.fc.weight": r(d, 2 * d), "mtp.pre_fc_norm_embedding.weight": r(d, scale=0.1),
         "mtp.pre_fc_norm_hidden.weight": r(d, scale=0.1), "mtp.norm.weight": r(d, scale=0.1)}
    p = "mtp.layers.0."
    t.update({p + "input_layernorm.weight": r(d, scale=0.1), p + "post_attention_layernorm.weight": r(d, scale=0.1),
              p + "self_attn.q_proj.weight": r(2 * nq * hd, d), p + "self_attn.k_proj.weight": r(nkv * hd, d),
              p + "self_attn.v_proj.weight": r(nkv * hd, d), p + "self_attn.o_proj.weight": r(d, nq * hd),
              p + "self_attn.q_norm.weight": r(hd, scale=0.1), p + "self_attn.k_norm.weight": r(hd, scale=0.1)})
    if spec.moe:
        ie, ish = text["moe_intermediate_size"], text["shared_expert_intermediate_size"]
        t[p + "mlp.gate.weight"] = r(text["num_experts"], d)
        t[p + "mlp.shared_expert_gate.weight"] = r(1, d)
        for proj, shape in (("gate_proj", (ish, d)), ("up_proj", (ish, d)), ("down_proj", (d, ish))):
            t[p + f"mlp.shared_expert.{proj}.weight"] = r(*shape)
        for e in range(text["num_experts"]):
            for proj, shape in (("gate_proj", (ie, d)), ("up_proj", (ie, d)), ("down_proj", (d, ie))):
                t[p + f"mlp.experts.{e}.{proj}.weight"] = r(*shape)
    else:
        i = text["intermediate_size"]
        for proj, shape in (("gate_proj", (i, d)), ("up_proj", (i, d)), ("down_proj", (d, i))):
            t[p + f"mlp.{proj}.weight"] = r(*shape)
    return {k: v.contiguous() for k, v in t.items()}


SPECS = [
    TinySpec("dense_gva1", gva=1),
    TinySpec("dense_gva2_tied", gva=2, tie=True),
    TinySpec("dense_gva3_custom_layers", gva=3,
             layer_types=("linear_attention", "full_attention", "linear_attention", "linear_attention",
                          "full_attention")),
    TinySpec("moe_per_expert", moe=True),
    TinySpec("moe_fused", moe=True, per_expert=False, gva=3),
    TinySpec("nested_dense", nested=True, tie=True, mtp=True),
    TinySpec("nested_moe", nested=True, moe=True, per_expert=False, mtp=True),
]
