"""Quantized-checkpoint layouts the independent fixtures (quant_fixtures/) do not cover, derived from them: each test
rewrites a fixture's weights into another layout a real writer produces and checks that deltaserve's logits equal
those of the plain checkpoint of the same dequantized weights (or that a layout it cannot load is refused by name)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deltaserve.config import ModelConfig
from deltaserve.kernels.quant.ref import pack_int4, unpack_int4
from deltaserve.models.loader import CheckpointError, load_model
from tests.models.test_quant import (FIXTURES, _with_config, assert_matches_plain, check_fp8_lm_head,
                                     dequant_state, fp8_lm_head_checkpoint)
from tests.models.simple_runner import SimpleRunner
from tests.parallel.test_tp_quant import _check_rank_weights

PROMPT = list(range(3, 30))


def _fp8_blocks_to_channels(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An FP8_BLOCK checkpoint's tensors requantized per output channel (weight_scale [N, 1]); returns the
    dequantized weights of the result."""
    plain = {}
    for name in [n for n in t if t[n].dtype == torch.float8_e4m3fn]:
        w8, s = t[name], t[name + "_scale"].float()
        bn, bk = -(-w8.shape[0] // s.shape[0]), -(-w8.shape[1] // s.shape[1])
        w = w8.float() * s.repeat_interleave(bn, 0)[:w8.shape[0]].repeat_interleave(bk, 1)[:, :w8.shape[1]]
        scale = (w.abs().amax(dim=1, keepdim=True) / 448).to(torch.bfloat16)
        t[name], t[name + "_scale"] = (w / scale.float()).to(torch.float8_e4m3fn), scale
        plain[name] = t[name].float() * scale.float()
    return plain


def test_per_channel_fp8_experts(tmp_path):
    """compressed-tensors FP8 per channel on a MoE model (FP8_DYNAMIC, llm-compressor's Qwen3.5 MoE example) was
    refused: 'per-channel FP8 experts need hidden size == intermediate size' (256 and 128 here; 2048 and 512 in
    35B-A3B). Each expert row's one scale covers its whole K, whatever K is; tensor and expert parallelism split
    the experts as they split block-scaled ones."""
    src = FIXTURES / "ct_fp8_block_moe"
    qc = json.loads((src / "config.json").read_text())["quantization_config"]
    group = next(iter(qc["config_groups"].values()))
    group["weights"].update(strategy="channel", block_structure=None)
    group["input_activations"] = {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}
    plain: dict[str, torch.Tensor] = {}
    path = _with_config(src, tmp_path / "ch", qc, lambda t: plain.update(_fp8_blocks_to_channels(t)))
    model = load_model(ModelConfig.from_hf(path), dtype="float32")
    assert model.model.layers[0].mlp.experts.method.name == "fp8 per-channel"
    state = {k: plain.get(k, v) for k, v in load_file(path / "model.safetensors").items()
             if not k.endswith("_scale")}
    assert_matches_plain(model, tmp_path, state, json.loads((path / "config.json").read_text()), PROMPT)
    _check_rank_weights(path, 2, False)
    _check_rank_weights(path, 2, True)


def _gptq_regroup(t: dict[str, torch.Tensor], state: dict[str, torch.Tensor], group: int) -> dict[str, torch.Tensor]:
    """A GPTQ v1 checkpoint's tensors requantized with `group` input columns per scale (a K below it: one group, as
    per-channel group_size -1 stores it: one scale row, g_idx all 0) from its dequantized weights `state`; returns
    the dequantized weights of the result."""
    plain = {}
    for name in [n for n in t if n.endswith(".qweight")]:
        base = name[:-len(".qweight")]
        w = state[base + ".weight"]
        n, k = w.shape
        g_idx = torch.arange(k) // group
        s = torch.stack([w[:, g_idx == j].abs().amax(dim=1) for j in range(int(g_idx[-1]) + 1)])   # [G, N]
        s = (s / 7.5).clamp(min=1e-8).to(torch.float16)
        q = (torch.round(w / s.float()[g_idx].T) + 8).clamp(0, 15).to(torch.uint8)
        t[name] = pack_int4(q).T.contiguous()
        t[base + ".qzeros"] = pack_int4(torch.full(s.shape, 7, dtype=torch.uint8))
        t[base + ".scales"] = s.contiguous()
        t[base + ".g_idx"] = g_idx.to(torch.int32)
        plain[base + ".weight"] = (q.float() - 8) * s.float()[g_idx].T
    return plain


@pytest.mark.parametrize("group_size, method", [(-1, "int4 per-channel"), (256, "int4 g256")])
def test_int4_experts_with_one_group_a_row(tmp_path, group_size, method):
    """GPTQ experts with one scale per output channel (group_size -1), or whose down_proj K (the expert intermediate
    size, 128) is below the group size (256), so that one group covers each row as it does for a rank's slice of a
    wider expert under tensor parallelism: both were refused in one process (the second: 'int4 experts with group
    size 256 need hidden size (256) and expert intermediate size (128) to be multiples of it')."""
    src = FIXTURES / "gptq_moe"
    qc = {**json.loads((src / "config.json").read_text())["quantization_config"], "group_size": group_size}
    plain: dict[str, torch.Tensor] = {}
    deq = dequant_state(src)
    regroup = group_size if group_size > 0 else 1 << 30
    path = _with_config(src, tmp_path / "q", qc, lambda t: plain.update(_gptq_regroup(t, deq, regroup)))
    model = load_model(ModelConfig.from_hf(path), dtype="float32")
    assert model.model.layers[0].mlp.experts.method.name == method
    state = {k: plain.get(k, v) for k, v in deq.items()}
    assert_matches_plain(model, tmp_path, state, json.loads((path / "config.json").read_text()), PROMPT)
    _check_rank_weights(path, 2, False)
    _check_rank_weights(path, 2, True)


def _ct_int4_to_channels(t: dict[str, torch.Tensor], pattern: str) -> dict[str, torch.Tensor]:
    """The compressed-tensors sym int4 modules whose names match `pattern` requantized per output channel
    (weight_scale [N, 1]); returns the dequantized weights of every int4 module."""
    plain = {}
    for name in [n for n in t if n.endswith(".weight_packed")]:
        base = name[:-len(".weight_packed")]
        n, k = t[base + ".weight_shape"].tolist()
        s = t[base + ".weight_scale"].float()
        w = (unpack_int4(t[name], k).float() - 8) * s.repeat_interleave(-(-k // s.shape[1]), 1)[:, :k]
        if re.fullmatch(pattern, base):
            s = (w.abs().amax(dim=1, keepdim=True) / 7.5).to(torch.bfloat16).float()
            q = (torch.round(w / s) + 8).clamp(0, 15)
            t[name], t[base + ".weight_scale"] = pack_int4(q.to(torch.uint8)), s.to(torch.bfloat16)
            w = (q - 8) * s
        plain[base + ".weight"] = w
    return plain


def test_compressed_tensors_named_targets_take_precedence_over_linear(tmp_path):
    """Two config groups, one targeting the class ("Linear"), one the MLP by regex: the MLP takes the regex's scheme
    wherever the groups come in the config, as in compressed-tensors and vLLM (a target naming the module wins over a
    class target). The first group in config order was taken, so the MLP read the per-channel scheme of group_0:
    'shape mismatch: ...mlp.down_proj.weight_scale: expected [256, 1], found [256, 3]'."""
    src = FIXTURES / "ct_w4a16_dense"
    qc = json.loads((src / "config.json").read_text())["quantization_config"]
    grouped = next(iter(qc["config_groups"].values()))
    channel = {**grouped, "targets": ["Linear"], "weights": {**grouped["weights"], "strategy": "channel",
                                                             "group_size": None}}
    qc["config_groups"] = {"group_0": channel, "group_1": {**grouped, "targets": [r"re:.*mlp\.(gate|up|down)_proj$"]}}
    plain: dict[str, torch.Tensor] = {}
    path = _with_config(src, tmp_path / "two", qc, lambda t: plain.update(_ct_int4_to_channels(t, r".*_attn\..*")))
    model = load_model(ModelConfig.from_hf(path), dtype="float32")
    assert model.model.layers[0].mlp.down_proj.method.name == "int4 g128"
    assert model.model.layers[2].self_attn.o_proj.method.name == "int4 per-channel"
    state = {k: v for k, v in load_file(path / "model.safetensors").items() if not k.rpartition(".")[2].startswith(
        ("weight_packed", "weight_scale", "weight_shape"))}
    assert_matches_plain(model, tmp_path, {**state, **plain}, json.loads((path / "config.json").read_text()), PROMPT)


def test_compressed_tensors_ignore_names_modules_exactly(tmp_path):
    """compressed-tensors matches an `ignore` entry without "re:" against module names exactly (its _match_name:
    `target == name`), so an entry naming a parent ("model.layers.0.mlp") leaves the projections inside it
    quantized, and vLLM loads them so. deltaserve read the entry as covering the whole MLP and refused the checkpoint
    ('holds int4 weight_packed tensors, but quantization_config ... leaves this module unquantized')."""
    src = FIXTURES / "ct_w4a16_dense"
    qc = json.loads((src / "config.json").read_text())["quantization_config"]
    qc["ignore"] = [*qc["ignore"], "model.layers.0.mlp", "model.language_model.layers.2.self_attn"]
    path = _with_config(src, tmp_path / "parent", qc)
    model = load_model(ModelConfig.from_hf(path), dtype="float32")
    assert model.model.layers[0].mlp.down_proj.method.name == "int4 g128"
    prompt = list(range(3, 20))
    assert torch.equal(SimpleRunner(model).step({0: prompt})[0],
                       SimpleRunner(load_model(ModelConfig.from_hf(src), dtype="float32")).step({0: prompt})[0])


def test_gptq_zero_bias_tensors_are_accepted_and_others_refused(tmp_path):
    """GPTQ writers of the GPTQ-for-LLaMa / early AutoGPTQ line store a bias (zeros) with every quantized projection,
    also where the model has none; vLLM skips them. They were refused as '19 unexpected tensor(s)' with no reason.
    Zero biases load (the logits of the checkpoint without them); a non-zero one, which the model has no place for,
    is refused naming it."""
    src = FIXTURES / "gptq_dense"

    def biases(t, value=0.0):
        for name in [n for n in t if n.endswith(".qweight")]:
            t[name[:-len("qweight")] + "bias"] = torch.full((t[name].shape[1],), value, dtype=torch.float16)
    path = _with_config(src, tmp_path / "zero", None, biases)
    prompt = list(range(3, 20))
    assert torch.equal(SimpleRunner(load_model(ModelConfig.from_hf(path), dtype="float32")).step({0: prompt})[0],
                       SimpleRunner(load_model(ModelConfig.from_hf(src), dtype="float32")).step({0: prompt})[0])

    def one_nonzero(t):
        biases(t)
        t["model.layers.0.mlp.down_proj.bias"][5] = 0.25
    path = _with_config(src, tmp_path / "nonzero", None, one_nonzero)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.down_proj\.bias: a non-zero bias"):
        load_model(ModelConfig.from_hf(path), dtype="float32")


def _ct_act_order_experts(t: dict[str, torch.Tensor], projections: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Expert 1's `projections` of a symmetric compressed-tensors int4 checkpoint given one permuting weight_g_idx
    (actorder "group"); returns every int4 module dequantized by the format's formula, W = (u - 8) * s[:, g_idx]."""
    order = (torch.randperm(256, generator=torch.Generator().manual_seed(0)) // 128).to(torch.int32)
    for proj in projections:
        t[f"model.layers.0.mlp.experts.1.{proj}.weight_g_idx"] = order.clone()
    plain = {}
    for name in [n for n in t if n.endswith(".weight_packed")]:
        base = name[:-len(".weight_packed")]
        n, k = t[base + ".weight_shape"].tolist()
        s = t[base + ".weight_scale"].float()
        g = t.get(base + ".weight_g_idx", torch.arange(k) // (k // s.shape[1])).long()
        plain[base + ".weight"] = (unpack_int4(t[name], k).float() - 8) * s[:, g]
    return plain


def test_compressed_tensors_act_order_experts(tmp_path):
    """compressed-tensors experts with actorder "group" (a permuting weight_g_idx; refused before): each expert's
    input read in its gate and up projections' order gives the dequantized model's logits."""
    src = FIXTURES / "ct_w4a16_moe"
    plain: dict[str, torch.Tensor] = {}
    path = _with_config(src, tmp_path / "ct", None,
                        lambda t: plain.update(_ct_act_order_experts(t, ("gate_proj", "up_proj"))))
    model = load_model(ModelConfig.from_hf(path), dtype="float32")
    experts = model.model.layers[0].mlp.experts
    assert experts.method.name == "int4 g128 act-order" and experts.w13_perm is not None
    state = {k: v.float() for k, v in load_file(path / "model.safetensors").items()
             if not k.endswith((".weight_packed", ".weight_scale", ".weight_shape", ".weight_g_idx"))}
    assert_matches_plain(model, tmp_path, {**state, **plain}, json.loads((path / "config.json").read_text()), PROMPT)
    for expert_parallel in (False, True):  # gate|up rows split (their K, and so the order, whole) or whole experts
        _check_rank_weights(path, 2, expert_parallel)


def test_act_order_experts_with_two_orders_are_refused_naming_both(tmp_path):
    """An expert whose gate_proj and up_proj order their (shared) input differently cannot run in the fused gate|up
    kernels; refused naming both tensors and what to do."""
    path = _with_config(FIXTURES / "ct_w4a16_moe", tmp_path / "ct", None,
                        lambda t: _ct_act_order_experts(t, ("gate_proj",)))
    with pytest.raises(CheckpointError, match=r"experts\.1\.gate_proj and .*experts\.1\.up_proj: their g_idx order "
                                              r"the input columns differently.*quantize it again"):
        load_model(ModelConfig.from_hf(path), dtype="float32")


def test_gptq_dynamic_first_matching_key_decides(tmp_path):
    """GPTQModel's `dynamic` (and vLLM's get_dynamic_override) gives each module the first key, in config order,
    whose regex matches it: a positive key before a "-:" key that also matches keeps the module quantized, and of
    two positive keys only the first applies. Every "-:" key used to win wherever it stood (a GPTQModel checkpoint
    that quantized its shared experts under such a config was refused), and positive overrides piled up."""
    from deltaserve.layers.quant import QuantResolver
    src = FIXTURES / "gptq_moe"
    qc = json.loads((src / "config.json").read_text())["quantization_config"]
    dynamic = {r"+:.*mlp\..*": {}, "-:.*shared_expert.*": {}, **qc.get("dynamic", {})}
    path = _with_config(src, tmp_path / "order", {**qc, "dynamic": dynamic})
    model = load_model(ModelConfig.from_hf(path), dtype="float32")
    assert model.model.layers[0].mlp.shared_expert.down_proj.method.name == "int4 g128"
    prompt = list(range(3, 20))
    assert torch.equal(SimpleRunner(model).step({0: prompt})[0],
                       SimpleRunner(load_model(ModelConfig.from_hf(src), dtype="float32")).step({0: prompt})[0])
    first = {r"+:.*down_proj": {"group_size": 32}, r"+:.*mlp": {"group_size": 64}, r"-:.*self_attn": {}}
    raw = {"bits": 4, "group_size": 128, "dynamic": first}
    resolver = QuantResolver("gptq", raw, None)
    assert [resolver.configured(f"model.layers.0.mlp.{p}").group_size for p in ("down_proj", "up_proj")] == [32, 64]
    assert not resolver.configured("model.layers.3.self_attn.o_proj").quantized


def test_fp8_lm_head_under_a_tied_config(tmp_path):
    """A config that ties the lm_head to the embedding over a checkpoint with its own FP8 lm_head.weight (and scale)
    crashed comparing the two ('Promotion for Float8 Types is not supported'). The head is the checkpoint's own,
    distinct from the embedding, so it is used with its scales (as a distinct bf16 lm_head.weight is)."""
    check_fp8_lm_head(fp8_lm_head_checkpoint(tmp_path / "tied", tie_word_embeddings=True))


def test_fp8_block_structure_string_form(tmp_path):
    """compressed-tensors reads block_structure "128x128" as [128, 128] (its validator keeps the older string form);
    deltaserve failed with Python's 'too many values to unpack'."""
    src = FIXTURES / "ct_fp8_block_dense"
    qc = json.loads((src / "config.json").read_text())["quantization_config"]
    next(iter(qc["config_groups"].values()))["weights"]["block_structure"] = "128x128"
    path = _with_config(src, tmp_path / "str", qc)
    prompt = list(range(3, 20))
    assert torch.equal(SimpleRunner(load_model(ModelConfig.from_hf(path), dtype="float32")).step({0: prompt})[0],
                       SimpleRunner(load_model(ModelConfig.from_hf(src), dtype="float32")).step({0: prompt})[0])


def _ct(weights: dict, **top) -> dict:
    return {"quant_method": "compressed-tensors", "config_groups": {"group_0": {
        "targets": ["Linear"], "format": "pack-quantized" if weights.get("type") == "int" else "float-quantized",
        "weights": weights}}, **top}


W4 = {"type": "int", "num_bits": 4, "strategy": "group", "group_size": 128}


@pytest.mark.parametrize("raw, needle", [
    (_ct({"type": "float", "num_bits": 8, "strategy": "block", "block_structure": [128]}),
     r"config_groups\.group_0\.weights\.block_structure \[128\]: expected \[block_n, block_k\]"),
    (_ct({"type": "float", "num_bits": 8, "strategy": "block", "block_structure": "128by128"}),
     r"block_structure '128by128'"),
    ({"quant_method": "compressed-tensors", "config_groups": [{"targets": ["Linear"]}]},
     r"quantization_config\.config_groups: expected an object"),
    (_ct(W4, ignore=["re:(bad"]), r"quantization_config\.ignore 're:\(bad': not a valid regular expression"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "dynamic": {"-:(bad": {}}},
     r"quantization_config\.dynamic '-:\(bad': not a valid regular expression"),
    ({"quant_method": "gptq", "bits": 4, "group_size": "abc"}, r"quantization_config\.group_size 'abc'"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 0}, r"quantization_config\.group_size 0"),
    ({"quant_method": "awq", "bits": 4, "group_size": 0}, r"quantization_config\.group_size 0"),
    (_ct({**W4, "group_size": None}), r"config_groups\.group_0\.weights\.group_size None"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "dynamic": {"+:.*mlp": {"group_size": "x"}}},
     r"quantization_config\.dynamic\['\.\*mlp'\]\.group_size 'x'"),
    ({"quant_method": "fp8", "modules_to_not_convert": "lm_head"},
     r"quantization_config\.modules_to_not_convert: expected a list of module names"),
])
def test_malformed_quantization_config_names_the_field(raw, needle):
    """Malformed fields failed with Python's own errors (an unpacking ValueError, re.error, AttributeError), which
    the loader let through as tracebacks, or were read as something else (group size 0 as per channel, a string of
    module names as single characters); each is refused naming the field."""
    from deltaserve.layers.quant import QuantizationError, QuantResolver
    with pytest.raises(QuantizationError, match=needle):
        QuantResolver(raw["quant_method"], raw, None).configured("model.layers.0.mlp.down_proj")


def _awq_pack(cols: torch.Tensor) -> torch.Tensor:
    """codes [R, N] -> AutoAWQ GEMM words [R, N/8]: column 8c + i in nibble AWQ_ORDER[i] of word c."""
    from deltaserve.layers.quant import AWQ_ORDER
    nibbles = torch.empty_like(cols).view(cols.shape[0], -1, 8)
    nibbles[..., list(AWQ_ORDER)] = cols.view(cols.shape[0], -1, 8)
    return pack_int4(nibbles.reshape(cols.shape))


def test_symmetric_awq_with_zero_point_false(tmp_path):
    """auto-round's `auto_awq` export of a symmetric run writes "zero_point": false (zero_point = not sym) and still
    stores qzeros (all 8), which vLLM's AWQ kernels read; deltaserve refused it ('AWQ checkpoints without zero
    points are not supported'). It loads, with the stored zero points (dequantized by make_fixtures' formula)."""
    from tests.models.quant_fixtures.make_fixtures import dequant_awq
    src = FIXTURES / "awq_dense"
    qc = {**json.loads((src / "config.json").read_text())["quantization_config"], "sym": True, "zero_point": False}

    def symmetric(t):
        for name in [n for n in t if n.endswith(".qweight")]:
            base = name[:-len(".qweight")]
            w = dequant_awq(t, base, 128).T                                    # [K, N]
            g = w.view(-1, 128, w.shape[1]).abs().amax(dim=1) / 7.5             # [K/G, N]
            s = g.clamp(min=1e-8).half()
            q = (torch.round(w / s.float().repeat_interleave(128, 0)) + 8).clamp(0, 15).to(torch.uint8)
            t[name], t[base + ".scales"] = _awq_pack(q), s
            t[base + ".qzeros"] = _awq_pack(torch.full(s.shape, 8, dtype=torch.uint8))
    path = _with_config(src, tmp_path / "sym", qc, symmetric)
    t = load_file(path / "model.safetensors")
    state = {k: v for k, v in t.items() if not k.endswith((".qweight", ".qzeros", ".scales"))}
    state.update({n[:-len("qweight")] + "weight": dequant_awq(t, n[:-len(".qweight")], 128)
                  for n in t if n.endswith(".qweight")})
    model = load_model(ModelConfig.from_hf(path), dtype="float32")
    assert_matches_plain(model, tmp_path, state, json.loads((path / "config.json").read_text()), PROMPT)


def _auto_round_native(src: Path, packing: str, dst: Path) -> Path:
    """An auto-round fixture's config rewritten as auto-round's own format writes it (quant_method auto-round,
    packing_format, extra_config naming each module left in 16 bits); the tensors are the same."""
    qc = json.loads((src / "config.json").read_text())["quantization_config"]
    plain = sorted({n[:-len(".weight")] for n in load_file(src / "model.safetensors")
                    if n.endswith("_proj.weight") or n.endswith(("mlp.gate.weight", "shared_expert_gate.weight"))})
    native = {"quant_method": "auto-round", "packing_format": packing, "bits": 4, "group_size": qc["group_size"],
              "sym": qc["sym"], "data_type": "int", "autoround_version": "0.15.1",
              "extra_config": {n: {"bits": 16, "data_type": "float"} for n in plain + ["lm_head"]}}
    return _with_config(src, dst, native)


@pytest.mark.parametrize("name, packing", [("gptq_moe", "auto_round:auto_gptq"), ("awq_dense", "auto_round:auto_awq")])
def test_auto_round_native_format(tmp_path, name, packing):
    """auto-round's default export (quant_method auto-round, packing_format auto_round:auto_gptq or auto_awq: GPTQ v1
    or AutoAWQ tensors; Intel's and many community Qwen3.5 int4 releases, which vLLM loads) was refused as an
    unsupported quant_method. It loads with the logits of the same tensors under the gptq / awq config; extra_config
    entries left in 16 bits must not hold quantized tensors, and other bit widths are refused by name."""
    src = FIXTURES / name
    path = _auto_round_native(src, packing, tmp_path / "native")
    prompt = list(range(3, 20))
    assert torch.equal(SimpleRunner(load_model(ModelConfig.from_hf(path), dtype="float32")).step({0: prompt})[0],
                       SimpleRunner(load_model(ModelConfig.from_hf(src), dtype="float32")).step({0: prompt})[0])
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    down = "model.layers.0.mlp." + ("experts.0.down_proj" if "moe" in name else "down_proj")
    excluded = _with_config(path, tmp_path / "excluded",
                            {**qc, "extra_config": {**qc["extra_config"], down: {"bits": 16, "data_type": "float"}}})
    with pytest.raises(CheckpointError, match=rf"{re.escape(down)}: the checkpoint holds int4 qweight"):
        load_model(ModelConfig.from_hf(excluded), dtype="float32")
    if packing.endswith("gptq"):
        eight = _with_config(path, tmp_path / "eight",
                             {**qc, "extra_config": {**qc["extra_config"], down: {"bits": 8}}})
        with pytest.raises(CheckpointError, match=rf"extra_config\['{re.escape(down)}'\]\.bits is 8"):
            load_model(ModelConfig.from_hf(eight), dtype="float32")


@pytest.mark.parametrize("side_file", [None, "quantize_config.json"])
def test_quantized_tensors_without_quantization_config_say_why(tmp_path, side_file):
    """A quantized checkpoint whose config.json has no quantization_config (stripped, or kept only in the
    quantize_config.json AutoGPTQ / GPTQModel write beside it) was refused as a list of unexpected qweight / qzeros /
    g_idx tensors and missing weights, with no reason; the error says the tensors are quantized and where the config
    is missing (naming the side file when there is one)."""
    src = FIXTURES / "gptq_dense"
    cfg = json.loads((src / "config.json").read_text())
    path = _with_config(src, tmp_path / "noqc", None)
    (path / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "quantization_config"}))
    if side_file:
        (path / side_file).write_text(json.dumps(cfg["quantization_config"]))
    want = r"(?s)unexpected tensor.*quantized weights \(\.qweight.*config\.json has no quantization_config"
    if side_file:
        want += r".*quantize_config\.json"
    with pytest.raises(CheckpointError, match=want):
        load_model(ModelConfig.from_hf(path), dtype="float32")
