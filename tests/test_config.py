"""ModelConfig.from_hf on every published config.json form, and its errors."""

from __future__ import annotations

import copy
import json
import re

import pytest

from deltaserve.config import CacheConfig, ConfigError, ModelConfig, SchedulerConfig

# Shaped like the published Qwen3.5-27B config.json (nested ConditionalGeneration form).
DENSE_27B = {
    "architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5",
    "image_token_id": 248056, "tie_word_embeddings": False,
    "text_config": {
        "model_type": "qwen3_5_text", "vocab_size": 248320, "hidden_size": 5120, "num_hidden_layers": 64,
        "num_attention_heads": 24, "num_key_value_heads": 4, "head_dim": 256, "intermediate_size": 17408,
        "linear_num_key_heads": 16, "linear_num_value_heads": 48, "linear_key_head_dim": 128,
        "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4, "full_attention_interval": 4,
        "rms_norm_eps": 1e-6, "max_position_embeddings": 262144, "mtp_num_hidden_layers": 1,
        "attn_output_gate": True, "dtype": "bfloat16", "eos_token_id": 248044,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000000, "partial_rotary_factor": 0.25,
                            "mrope_section": [11, 11, 10], "mrope_interleaved": True},
    },
    "vision_config": {"model_type": "qwen3_5", "depth": 27},
}

MOE_35B_FLAT = {
    "architectures": ["Qwen3_5MoeForCausalLM"], "model_type": "qwen3_5_moe_text", "vocab_size": 248320,
    "hidden_size": 2048, "num_hidden_layers": 40, "num_attention_heads": 16, "num_key_value_heads": 2,
    "head_dim": 256, "linear_num_key_heads": 16, "linear_num_value_heads": 32, "linear_key_head_dim": 128,
    "linear_value_head_dim": 128, "num_experts": 256, "num_experts_per_tok": 8, "moe_intermediate_size": 512,
    "shared_expert_intermediate_size": 512, "rope_theta": 10000000, "partial_rotary_factor": 0.25,
    "layer_types": ["linear_attention"] * 3 * 10 + ["full_attention"] * 10, "torch_dtype": "bfloat16",
    "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128},
}


def write(tmp_path, cfg, gen=None):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    if gen is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(gen))
    return tmp_path


def test_nested_dense_27b(tmp_path):
    c = ModelConfig.from_hf(write(tmp_path, DENSE_27B, {"eos_token_id": [248046, 248044]}))
    assert not c.is_moe and c.hidden_size == 5120 and c.intermediate_size == 17408
    assert c.layer_types.count("full_attention") == 16 and c.layer_types[3] == "full_attention"
    assert c.layer_types[:3] == ("linear_attention",) * 3
    assert c.rope_theta == 1e7 and c.rotary_dim == 64 and c.mtp_num_hidden_layers == 1
    assert c.conv_dim == 2 * 16 * 128 + 48 * 128 and c.value_dim == 6144
    assert set(c.eos_token_ids) == {248044, 248046} and c.dtype == "bfloat16"


def test_flat_moe_with_top_level_rope_and_quant(tmp_path):
    c = ModelConfig.from_hf(write(tmp_path, MOE_35B_FLAT))
    assert c.is_moe and c.num_experts == 256 and c.num_experts_per_tok == 8 and c.intermediate_size is None
    assert c.rope_theta == 1e7 and c.partial_rotary_factor == 0.25
    assert c.quantization_config == {"quant_method": "awq", "bits": 4, "group_size": 128}
    assert c.layer_types[-1] == "full_attention" and c.dtype == "bfloat16"


@pytest.mark.parametrize("where", ["top", "text"])
def test_tie_word_embeddings_at_either_level(tmp_path, where):
    cfg = copy.deepcopy(DENSE_27B)
    (cfg if where == "top" else cfg["text_config"])["tie_word_embeddings"] = True
    assert ModelConfig.from_hf(write(tmp_path, cfg)).tie_word_embeddings


def test_model_type_only_flat_config(tmp_path):
    cfg = {k: v for k, v in MOE_35B_FLAT.items() if k != "architectures"}
    assert ModelConfig.from_hf(write(tmp_path, cfg)).is_moe


@pytest.mark.parametrize("mutate, needle", [
    (lambda c: c.update(architectures=["LlamaForCausalLM"]), "LlamaForCausalLM"),
    (lambda c: c["text_config"].pop("hidden_size"), "'hidden_size' is missing"),
    (lambda c: c["text_config"].update(num_key_value_heads=5), "num_key_value_heads"),
    (lambda c: c["text_config"].update(linear_num_value_heads=40), "linear_num_value_heads"),
    (lambda c: c["text_config"].update(layer_types=["linear_attention"] * 63 + ["sliding_attention"]),
     "sliding_attention"),
    (lambda c: c["text_config"].update(layer_types=["full_attention"] * 3), "layer_types"),
    (lambda c: c["text_config"].pop("intermediate_size"), "intermediate_size"),
    (lambda c: c["text_config"]["rope_parameters"].update(rope_type="yarn"), "yarn"),
    (lambda c: c["text_config"].update(hidden_size=-1), "hidden_size"),
])
def test_errors_name_the_field_and_value(tmp_path, mutate, needle):
    cfg = copy.deepcopy(DENSE_27B)
    mutate(cfg)
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        ModelConfig.from_hf(write(tmp_path, cfg))


def test_missing_and_broken_config_json(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_hf(tmp_path)


@pytest.mark.parametrize("name, text, needle", [
    ("config.json", "[1, 2]", "config.json must hold a JSON object, got a list"),
    ("config.json", "null", "config.json must hold a JSON object, got a NoneType"),
    ("config.json", b'{"model_type": "\xff"}', "config.json is not valid JSON"),
    ("generation_config.json", "{not json", "generation_config.json is not valid JSON"),
    ("generation_config.json", '"eos"', "generation_config.json must hold a JSON object, got a str"),
])
def test_malformed_json_files_name_the_file(tmp_path, name, text, needle):
    """Every malformed file is a ConfigError naming it (the CLI's one-line error), never an AttributeError from
    reading a list as a dict or a bare JSON error without the file."""
    write(tmp_path, DENSE_27B)
    (tmp_path / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match=needle):
        ModelConfig.from_hf(tmp_path)


@pytest.mark.parametrize("mutate, needle", [
    (lambda t: t.update(max_position_embeddings="262144"), "'max_position_embeddings' must be a positive integer"),
    (lambda t: t.update(max_position_embeddings=0), "'max_position_embeddings' must be a positive integer"),
    (lambda t: t.update(rms_norm_eps="1e-6"), "'rms_norm_eps' must be a number, got '1e-6'"),
    (lambda t: t.update(rms_norm_eps=None), "'rms_norm_eps' must be a number, got None"),
    (lambda t: t["rope_parameters"].update(rope_theta=[1]), "'rope_theta' must be a number"),
])
def test_mistyped_model_fields_name_the_field(mutate, needle):
    cfg = copy.deepcopy(DENSE_27B)
    mutate(cfg["text_config"])
    with pytest.raises(ConfigError, match=needle):
        ModelConfig.from_dict(cfg)


def test_non_string_architectures_are_unsupported_not_a_crash():
    with pytest.raises(ConfigError, match="unsupported architecture"):
        ModelConfig.from_dict({**DENSE_27B, "architectures": [["Qwen3_5ForCausalLM"]]})


def test_moe_missing_field(tmp_path):
    cfg = dict(MOE_35B_FLAT)
    cfg.pop("num_experts")
    with pytest.raises(ConfigError, match="num_experts"):
        ModelConfig.from_hf(write(tmp_path, cfg))


def test_configs_are_frozen_and_validated():
    c = ModelConfig.from_dict(DENSE_27B)
    with pytest.raises(Exception):
        c.hidden_size = 1  # type: ignore[misc]
    with pytest.raises(ConfigError, match="gpu_memory_utilization"):
        CacheConfig(gpu_memory_utilization=1.5)
    with pytest.raises(ConfigError, match="page_size"):
        CacheConfig(page_size=12)
    with pytest.raises(ConfigError, match="max_num_seqs"):
        SchedulerConfig(max_num_seqs=0)


def test_cache_compression_options_name_the_values_that_work():
    assert CacheConfig().kv_cache_dtype == "auto" and CacheConfig().state_dtype == "float32"
    assert CacheConfig(kv_cache_dtype="int4", state_dtype="bfloat16").kv_cache_dtype == "int4"
    with pytest.raises(ConfigError, match=r"'kv_cache_dtype' is 'fp8_e5m2'; use auto .*fp8, int8 or int4"):
        CacheConfig(kv_cache_dtype="fp8_e5m2")
    with pytest.raises(ConfigError, match=r"'state_dtype' is 'float16'; use float32 \(default\) or bfloat16"):
        CacheConfig(state_dtype="float16")


# ---- the composed engine config and its option table ----------------------------------------------------------------
def test_one_option_table_feeds_the_cli_and_llm_kwargs(tmp_path):
    import argparse
    import dataclasses

    from deltaserve.config import EngineArgs, add_engine_options, engine_args_from
    from deltaserve.config.options import option_names

    parser = argparse.ArgumentParser()
    add_engine_options(parser)
    defaults = parser.parse_args([])
    fields = {f.name: f.default for f in dataclasses.fields(EngineArgs) if f.metadata}
    assert set(option_names()) == set(fields) == set(vars(defaults))
    assert all(getattr(defaults, name) == default for name, default in fields.items())  # one place for defaults
    parsed = parser.parse_args(["--max-num-seqs", "3", "--no-async-scheduling", "--enforce-eager",
                                "--kv-cache-dtype", "fp8", "--state-dtype", "bfloat16"])
    args = engine_args_from(parsed, "m")
    assert (args.max_num_seqs, args.async_scheduling, args.enforce_eager) == (3, False, True)
    assert (args.kv_cache_dtype, args.state_dtype) == ("fp8", "bfloat16")
    with pytest.raises(TypeError, match=r"unknown engine option\(s\) \['max_seqs'\]"):
        EngineArgs.from_kwargs("m", max_seqs=3)


def test_engine_config_composes_validated_sections(tmp_path):
    from deltaserve.config import EngineArgs

    path = write(tmp_path, DENSE_27B)
    config = EngineArgs(model=str(path), max_num_seqs=8, state_dtype="bfloat16").create_engine_config()
    assert config.max_model_len == 262144 and config.scheduler.max_num_seqs == 8
    assert config.cache.state_dtype == "bfloat16" and config.quantization is None and not config.with_mtp
    assert config.rank_shapes().num_heads == 24
    with pytest.raises(Exception):
        config.cache = None  # type: ignore[misc]
    for bad, needle in ((dict(max_model_len=0), "max_model_len"), (dict(gpu_memory_utilization=float("nan")),
                        "gpu_memory_utilization"), (dict(max_num_seqs=True), "max_num_seqs"),
                        (dict(dtype="float8"), "dtype"), (dict(load_format="pt"), "load_format"),
                        (dict(device="tpu"), "device"), (dict(max_model_len="8192"), "max_model_len")):
        with pytest.raises(ConfigError, match=needle):
            EngineArgs(model=str(path), **bad).create_engine_config()


def test_nan_model_fields_name_the_field(tmp_path):
    for field_name in ("rms_norm_eps", "partial_rotary_factor", "rope_theta"):
        cfg = copy.deepcopy(DENSE_27B)
        where = cfg["text_config"] if field_name == "rms_norm_eps" else cfg["text_config"]["rope_parameters"]
        where[field_name] = float("nan")
        with pytest.raises(ConfigError, match=field_name):
            ModelConfig.from_dict(cfg)


def test_rank_shapes_split_heads_and_replicate_kv():
    from deltaserve.config import RankShapes

    dense, moe = ModelConfig.from_dict(DENSE_27B), ModelConfig.from_dict(MOE_35B_FLAT)
    one = RankShapes.for_rank(dense)
    assert (one.num_heads, one.num_kv_heads, one.conv_dim, one.intermediate_size) == (24, 4, 10240, 17408)
    two = RankShapes.for_rank(dense, 2, 1)
    assert (two.num_heads, two.num_kv_heads, two.linear_num_key_heads, two.linear_num_value_heads) == (12, 2, 8, 24)
    assert two.conv_dim == 10240 // 2 and two.intermediate_size == 8704 and two.kv_replicas == 1
    eight = RankShapes.for_rank(moe, 8)
    assert (eight.num_kv_heads, eight.kv_replicas, eight.moe_intermediate_size) == (1, 4, 64)
    with pytest.raises(ConfigError, match=r"does not divide the model's num_attention_heads \(24\).*\[1, 2, 3"):
        RankShapes.for_rank(dense, 5)
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        RankShapes.for_rank(dense, 0)


@pytest.mark.parametrize("device, want", [("cpu", 2048), (None, 8192), ("cuda", 8192), ("cuda:0", 8192),
                                          ("cuda:1", 2048), ("cuda:3", 2048), ("cuda:x", 2048), ("gpu", 2048)])
def test_default_step_tokens_follow_the_gpu_memory(monkeypatch, device, want):
    """Unset, max_num_batched_tokens is 8192 on a GPU of >= 70 GiB (an 8k prompt in one step), else 2048, read from
    the GPU the engine runs on (here GPU 0 has 80 GiB, GPU 1 24); a device that is not there (cuda:3 of two) or does
    not parse keeps 2048 and is left for the configs or the runner to name."""
    import torch

    from deltaserve.config.options import default_batched_tokens

    def props(index):
        return type("Props", (), {"total_memory": (80, 24)[index] * 2**30})

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    assert default_batched_tokens(device) == want


@pytest.mark.parametrize("step, page, want", [(2048, 16, 4096), (8192, 16, 8192), (5000, 16, 4992), (8190, 16, 8176),
                                              (4096, 64, 4096), (0, 16, 4096)])
def test_default_checkpoint_interval_is_at_least_a_step(step, page, want):
    """Unset, checkpoint_interval is 4096 or one step of max_num_batched_tokens rounded down to whole pages,
    whichever is larger (invalid inputs fall back, for the configs to name)."""
    from deltaserve.config.options import default_checkpoint_interval

    assert default_checkpoint_interval(step, page) == want


def test_a_page_larger_than_the_default_interval_needs_no_checkpoint_interval(tmp_path):
    """page_size 8192 (a power of two, valid) with checkpoint_interval unset was refused with "'checkpoint_interval'
    (4096) must be a multiple of 'page_size' (8192)", naming an option the user never gave: the default is now
    rounded up to whole pages."""
    from deltaserve.config.options import EngineArgs, default_checkpoint_interval

    assert default_checkpoint_interval(2048, 8192) == 8192 and default_checkpoint_interval(20000, 8192) == 16384
    config = EngineArgs(model=str(write(tmp_path, DENSE_27B)), device="cpu", page_size=8192).create_engine_config()
    assert config.cache.checkpoint_interval == 8192


def test_engine_args_resolve_the_checkpoint_interval_from_the_step(tmp_path):
    from deltaserve.config.options import EngineArgs

    path = write(tmp_path, DENSE_27B)
    big = EngineArgs(model=str(path), device="cpu", max_num_batched_tokens=8192).create_engine_config()
    assert big.cache.checkpoint_interval == 8192
    given = EngineArgs(model=str(path), device="cpu", max_num_batched_tokens=8192,
                       checkpoint_interval=1024).create_engine_config()
    assert given.cache.checkpoint_interval == 1024
    assert EngineArgs(model=str(path), device="cpu").create_engine_config().cache.checkpoint_interval == 4096


def test_max_model_len_past_the_trained_positions_is_warned(tmp_path, caplog):
    """Allowed (a config may understate its reach, e.g. with RoPE scaling), but said at start, with both values."""
    from deltaserve.config.options import EngineArgs

    path = write(tmp_path, DENSE_27B)
    with caplog.at_level("WARNING", logger="deltaserve.config.options"):
        EngineArgs(model=str(path), device="cpu", max_model_len=262144).create_engine_config()
        assert not caplog.records
        config = EngineArgs(model=str(path), device="cpu", max_model_len=300000).create_engine_config()
    assert config.max_model_len == 300000
    assert "300000" in caplog.text and "max_position_embeddings 262144" in caplog.text


def test_int4_kv_with_an_odd_head_dim_is_refused_naming_the_formats_that_work(tmp_path):
    """int4 pages pack two values of a head vector per byte: an odd head_dim failed only once the model was loaded
    and the caches planned, with a ValueError naming neither the option nor the fix."""
    from deltaserve.config import EngineArgs

    cfg = copy.deepcopy(DENSE_27B)
    cfg["text_config"].update(head_dim=35)
    cfg["text_config"]["rope_parameters"].update(partial_rotary_factor=0.4, mrope_section=[3, 2, 2])
    path = write(tmp_path, cfg)
    assert EngineArgs(model=str(path), device="cpu", kv_cache_dtype="int8").create_engine_config()
    with pytest.raises(ConfigError, match=r"'kv_cache_dtype' int4 .*even head_dim.*head_dim is 35.*fp8 or int8"):
        EngineArgs(model=str(path), device="cpu", kv_cache_dtype="int4").create_engine_config()


def test_num_pages_that_cannot_hold_one_full_length_request_is_refused_before_loading(tmp_path):
    """It was refused only when the scheduler was built, after the weights were loaded and the caches allocated."""
    from deltaserve.config import EngineArgs

    path = write(tmp_path, DENSE_27B)
    ok = EngineArgs(model=str(path), device="cpu", max_model_len=100, num_pages=7).create_engine_config()
    assert ok.cache.num_pages * ok.cache.page_size >= ok.max_model_len  # 7 pages of 16: 112 tokens
    with pytest.raises(ConfigError, match=r"'num_pages' is 6: 6 pages x 16 tokens.*max_model_len \(100\).*"
                                          r"num_pages >= 7"):
        EngineArgs(model=str(path), device="cpu", max_model_len=100, num_pages=6).create_engine_config()


@pytest.mark.parametrize("given, named", [
    (dict(checkpoint_interval=4096), "'checkpoint_interval' (4096) only applies"),
    (dict(num_checkpoints=8), "'num_checkpoints' (8) only applies"),
    (dict(checkpoint_interval=1024, num_checkpoints=8), "'checkpoint_interval' (1024) and 'num_checkpoints' (8) only "
                                                        "apply")])
def test_checkpoint_options_given_with_prefix_caching_off_are_refused(tmp_path, given, named):
    """They were silently ignored. Only values the user gave count: the interval filled in by default is fine, and so
    is num_checkpoints 0 (no checkpoints: what prefix caching off means anyway)."""
    from deltaserve.config import EngineArgs

    path = str(write(tmp_path, DENSE_27B))
    with pytest.raises(ConfigError, match=re.escape(named) + r" with prefix caching on.*enable_prefix_caching=False "
                                                  r"\(--no-prefix-caching\): drop (it|them) or turn prefix caching on"):
        EngineArgs.from_kwargs(path, device="cpu", enable_prefix_caching=False, **given).create_engine_config()
    off = EngineArgs(model=path, device="cpu", enable_prefix_caching=False).create_engine_config()
    assert not off.cache.enable_prefix_caching and off.cache.checkpoint_fraction == 0
    assert EngineArgs(model=path, device="cpu", enable_prefix_caching=False, num_checkpoints=0).create_engine_config()
    on = EngineArgs(model=path, device="cpu", **given).create_engine_config()
    assert on.cache.enable_prefix_caching and all(getattr(on.cache, k) == v for k, v in given.items())
