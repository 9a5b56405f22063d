"""The model section of the engine config: the text decoder of a Qwen3.5 / Qwen3.6 checkpoint, read from its
config.json. Pure Python (no torch import), like the whole `config` package; environment variables are read in this
package only (`env_flag`)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltaserve.config.common import ConfigError, require as _require

SUPPORTED_ARCHITECTURES = {
    "Qwen3_5ForConditionalGeneration": False,
    "Qwen3_5ForCausalLM": False,
    "Qwen3_5MoeForConditionalGeneration": True,
    "Qwen3_5MoeForCausalLM": True,
}
SUPPORTED_MODEL_TYPES = {"qwen3_5": False, "qwen3_5_text": False, "qwen3_5_moe": True, "qwen3_5_moe_text": True}
LAYER_TYPES = ("linear_attention", "full_attention")
HF_DEFAULT_ROPE_THETA = 10_000.0  # transformers' RotaryEmbeddingConfigMixin.default_theta


class LinearAttentionSizes:
    """The Gated DeltaNet widths derived from the head counts; shared by the model's config and a rank's shapes."""

    linear_num_key_heads: int
    linear_key_head_dim: int
    linear_num_value_heads: int
    linear_value_head_dim: int

    @property
    def key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.key_dim + self.value_dim


@dataclass(frozen=True)
class ModelConfig(LinearAttentionSizes):
    """The text decoder of a Qwen3.5 / Qwen3.6 checkpoint (dense or MoE), read from config.json."""

    architecture: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    layer_types: tuple[str, ...]
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel_dim: int
    rms_norm_eps: float
    rope_theta: float
    partial_rotary_factor: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    is_moe: bool
    intermediate_size: int | None = None
    num_experts: int | None = None
    num_experts_per_tok: int | None = None
    moe_intermediate_size: int | None = None
    shared_expert_intermediate_size: int | None = None
    mtp_num_hidden_layers: int = 0
    hidden_act: str = "silu"
    attn_output_gate: bool = True
    attention_bias: bool = False
    dtype: str = "bfloat16"
    eos_token_ids: tuple[int, ...] = ()
    quantization_config: dict[str, Any] | None = field(default=None, compare=False, hash=False)
    model_dir: str | None = None

    def __post_init__(self) -> None:
        self._validate()

    # ---- derived sizes -------------------------------------------------------------------------------------------
    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def full_attention_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "full_attention"]

    @property
    def linear_attention_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "linear_attention"]

    # ---- validation ----------------------------------------------------------------------------------------------
    def _validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                     "linear_value_head_dim", "linear_conv_kernel_dim"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value > 0, f"config field '{name}' must be a positive integer, got {value!r}")
        value = self.max_position_embeddings
        _require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                 f"config field 'max_position_embeddings' must be a positive integer, got {value!r}")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            _require(isinstance(value, (int, float)) and math.isfinite(value) and value > 0,
                     f"config field '{name}' must be a finite positive number, got {value!r}")
        _require(len(self.layer_types) == self.num_hidden_layers,
                 f"config field 'layer_types' has {len(self.layer_types)} entries but 'num_hidden_layers' is "
                 f"{self.num_hidden_layers}; they must match")
        for i, t in enumerate(self.layer_types):
            _require(t in LAYER_TYPES, f"config field 'layer_types[{i}]' is {t!r}; supported layer types are {LAYER_TYPES}")
        _require(self.num_attention_heads % self.num_key_value_heads == 0,
                 f"config field 'num_attention_heads' ({self.num_attention_heads}) must be a multiple of "
                 f"'num_key_value_heads' ({self.num_key_value_heads})")
        _require(self.linear_num_value_heads % self.linear_num_key_heads == 0,
                 f"config field 'linear_num_value_heads' ({self.linear_num_value_heads}) must be a multiple of "
                 f"'linear_num_key_heads' ({self.linear_num_key_heads})")
        _require(isinstance(self.partial_rotary_factor, (int, float)) and math.isfinite(self.partial_rotary_factor),
                 f"config field 'partial_rotary_factor' must be a finite number, got {self.partial_rotary_factor!r}")
        rot = self.head_dim * self.partial_rotary_factor
        _require(0 < self.partial_rotary_factor <= 1 and rot == int(rot) and int(rot) % 2 == 0,
                 f"config field 'partial_rotary_factor' ({self.partial_rotary_factor}) times head_dim ({self.head_dim}) "
                 f"must give an even number of rotary dims")
        _require(self.hidden_act == "silu", f"config field 'hidden_act' is {self.hidden_act!r}; only 'silu' is supported")
        _require(self.attn_output_gate, "config field 'attn_output_gate' is false; Qwen3.5 checkpoints always gate")
        _require(self.attention_bias is False,
                 f"config field 'attention_bias' is {self.attention_bias!r}; only false is supported (the attention "
                 "layers have no q/k/v/o_proj biases, as in the published Qwen3.5 checkpoints)")
        _require(self.mtp_num_hidden_layers in (0, 1),
                 f"config field 'mtp_num_hidden_layers' is {self.mtp_num_hidden_layers}; only 0 or 1 is supported")
        if self.is_moe:
            for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size"):
                value = getattr(self, name)
                _require(isinstance(value, int) and value > 0, f"MoE config field '{name}' must be a positive integer, got {value!r}")
            _require(self.num_experts_per_tok <= self.num_experts,  # type: ignore[operator]
                     f"config field 'num_experts_per_tok' ({self.num_experts_per_tok}) exceeds 'num_experts' ({self.num_experts})")
        else:
            _require(isinstance(self.intermediate_size, int) and self.intermediate_size > 0,
                     f"config field 'intermediate_size' must be a positive integer for a dense model, got {self.intermediate_size!r}")

    # ---- construction --------------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, model_dir: str | Path) -> ModelConfig:
        """Read `model_dir/config.json` (nested ConditionalGeneration or flat CausalLM form) and generation_config.json."""
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config.json in {model_dir!s}: pass the directory of a Hugging Face checkpoint")
        raw = _read_json_object(path)
        gen_path = Path(model_dir) / "generation_config.json"
        gen = _read_json_object(gen_path) if gen_path.is_file() else {}
        return cls.from_dict(raw, generation_config=gen, model_dir=str(model_dir))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, generation_config: dict[str, Any] | None = None,
                  model_dir: str | None = None) -> ModelConfig:
        architecture, is_moe = _architecture(raw)
        text = raw.get("text_config") or raw
        if not isinstance(text, dict):
            raise ConfigError(f"config field 'text_config' must be an object, got {type(text).__name__}")

        def get(name: str, default: Any = ..., *, also_top: bool = False) -> Any:
            if name in text:
                return text[name]
            if also_top and name in raw:
                return raw[name]
            if default is ...:
                raise ConfigError(f"config field '{name}' is missing from config.json"
                                  + (" (looked in 'text_config' too)" if text is not raw else ""))
            return default

        num_layers = get("num_hidden_layers")
        rope = _rope(text)
        # Either level may say so: transformers ties a nested checkpoint by the top-level flag and saves the
        # text_config's own (default false) beside it; older exports set only the text_config's.
        tie = bool(text.get("tie_word_embeddings")) or bool(raw.get("tie_word_embeddings"))
        return cls(
            architecture=architecture, is_moe=is_moe,
            vocab_size=get("vocab_size"), hidden_size=get("hidden_size"), num_hidden_layers=num_layers,
            layer_types=_layer_types(text, num_layers),
            num_attention_heads=get("num_attention_heads"), num_key_value_heads=get("num_key_value_heads"),
            head_dim=get("head_dim", 256),
            linear_num_key_heads=get("linear_num_key_heads"), linear_num_value_heads=get("linear_num_value_heads"),
            linear_key_head_dim=get("linear_key_head_dim"), linear_value_head_dim=get("linear_value_head_dim"),
            linear_conv_kernel_dim=get("linear_conv_kernel_dim", 4),
            rms_norm_eps=_float("rms_norm_eps", get("rms_norm_eps", 1e-6)),
            rope_theta=rope["rope_theta"], partial_rotary_factor=rope["partial_rotary_factor"],
            max_position_embeddings=get("max_position_embeddings", 262144),
            tie_word_embeddings=bool(tie),
            intermediate_size=None if is_moe else get("intermediate_size"),
            num_experts=get("num_experts") if is_moe else None,
            num_experts_per_tok=get("num_experts_per_tok") if is_moe else None,
            moe_intermediate_size=get("moe_intermediate_size") if is_moe else None,
            shared_expert_intermediate_size=get("shared_expert_intermediate_size") if is_moe else None,
            mtp_num_hidden_layers=get("mtp_num_hidden_layers", 0, also_top=True),
            hidden_act=_activation(get("hidden_act", "silu")),
            attn_output_gate=get("attn_output_gate", True),
            attention_bias=get("attention_bias", False),
            dtype=_dtype_name(raw, text),
            eos_token_ids=_eos_ids(text, raw, generation_config or {}),
            quantization_config=raw.get("quantization_config") or text.get("quantization_config"),
            model_dir=model_dir,
        )


def _read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold one object (config.json, generation_config.json); a ConfigError names the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, got a {type(data).__name__}")
    return data


def _architecture(raw: dict[str, Any]) -> tuple[str, bool]:
    archs = raw.get("architectures") or []
    if not isinstance(archs, list):
        raise ConfigError(f"config field 'architectures' must be a list, got {archs!r}")
    for arch in archs:
        if isinstance(arch, str) and arch in SUPPORTED_ARCHITECTURES:
            return arch, SUPPORTED_ARCHITECTURES[arch]
    model_type = raw.get("model_type")
    if not archs and model_type in SUPPORTED_MODEL_TYPES:
        return str(model_type), SUPPORTED_MODEL_TYPES[model_type]
    raise ConfigError(
        f"unsupported architecture: config field 'architectures' is {archs!r} (model_type {model_type!r}); "
        f"deltaserve serves {sorted(SUPPORTED_ARCHITECTURES)}")


def _layer_types(text: dict[str, Any], num_layers: int) -> tuple[str, ...]:
    types = text.get("layer_types")
    if types is not None:
        if not isinstance(types, list):
            raise ConfigError(f"config field 'layer_types' must be a list of strings, got {types!r}")
        return tuple(types)
    interval = text.get("full_attention_interval", 4)
    if not isinstance(interval, int) or interval <= 0:
        raise ConfigError(f"config field 'full_attention_interval' must be a positive integer, got {interval!r}")
    return tuple("full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(num_layers))


def _rope(text: dict[str, Any]) -> dict[str, float]:
    # transformers reads a legacy `rope_scaling` in preference to `rope_parameters` when a config has both.
    key = "rope_scaling" if text.get("rope_scaling") else "rope_parameters"
    params = text.get(key) or {}
    if not isinstance(params, dict):
        raise ConfigError(f"config field '{key}' must be an object, got {params!r}")
    nested = sorted(k for k, v in params.items() if isinstance(v, dict))
    if nested:  # transformers' per-layer-type form; read flat, its theta and rotary factor would fall to defaults
        raise ConfigError(f"config field '{key}' holds per-layer-type RoPE parameters ({nested}); only one flat "
                          "object for all layers is supported (rope_type, rope_theta, partial_rotary_factor)")
    rope_type = params.get("rope_type", params.get("type", "default"))
    # Qwen-VL-style configs name their multimodal RoPE "mrope": on text every section sees the same position, so it
    # is the default RoPE (the published Qwen3.5 configs carry mrope_section under rope_type "default" likewise)
    if rope_type not in ("default", "mrope", None):
        raise ConfigError(f"config field '{key}.rope_type' is {rope_type!r}; only 'default' RoPE is "
                          "supported (YaRN beyond 256K context is not implemented)")
    # No rope_theta anywhere: transformers' default base (10000), not the published checkpoints' 1e7.
    theta = params.get("rope_theta", text.get("rope_theta", HF_DEFAULT_ROPE_THETA))
    factor = params.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.25))
    return {"rope_theta": _float("rope_theta", theta), "partial_rotary_factor": _float("partial_rotary_factor", factor)}


def _activation(name: Any) -> Any:
    """transformers' ACT2FN maps "swish" to the same SiLU as "silu"."""
    return "silu" if name == "swish" else name


def _dtype_name(raw: dict[str, Any], text: dict[str, Any]) -> str:
    """The checkpoint's dtype: the top-level one first, as transformers' dtype="auto" reads a nested config."""
    for level in (raw, text):
        for key in ("dtype", "torch_dtype"):
            if level.get(key):
                return str(level[key])
    return "bfloat16"


def _float(name: str, value: Any) -> float:
    """A numeric config field as a float (validated further by ModelConfig); a ConfigError names a non-number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"config field '{name}' must be a number, got {value!r}")
    return float(value)


def _eos_ids(text: dict[str, Any], raw: dict[str, Any], gen: dict[str, Any]) -> tuple[int, ...]:
    ids: list[int] = []
    for source in (text.get("eos_token_id"), raw.get("eos_token_id"), gen.get("eos_token_id")):
        for i in source if isinstance(source, list) else [source]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return tuple(ids)
