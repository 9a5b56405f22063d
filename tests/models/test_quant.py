"""Quantized checkpoints on CPU (fp32 references): every published format, written by an independent tool where one
runs on CPU (the checked-in fixtures of quant_fixtures/, see make_fixtures.py for tools and versions) and by
deltaserve's own writer (`deltaserve quantize`) for what none of them writes (act-order GPTQ, FP8 per channel, fused
FP8 experts). deltaserve's logits must equal those of transformers' model over the dequantized weights within the
fp32 tolerance of test_qwen3_5_vs_hf, and its greedy tokens must match for 32 steps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltaserve.config import ModelConfig, QuantizationConfig
from deltaserve.kernels.quant.ref import dequant_fp8, dequant_int4, pack_int4, unpack_int4
from deltaserve.models.loader import CheckpointError, load_model
from deltaserve.quantize import quantize_checkpoint
from tests.models.factory import TinySpec, save_checkpoint
from tests.models.simple_runner import SimpleRunner

FIXTURES = Path(__file__).parent / "quant_fixtures"
FIXTURE_NAMES = sorted(p.name for p in FIXTURES.iterdir() if (p / "oracle" / "expected.safetensors").is_file())
REL_TOL = 1e-4
STEPS = 32


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    scale = ref.abs().max().item()
    diff = (ours - ref).abs().max().item()
    assert diff <= REL_TOL * scale, f"max abs diff {diff:.3g} > {REL_TOL} x logit scale {scale:.3g}"


def assert_matches_plain(model, tmp_path: Path, state: dict[str, torch.Tensor], cfg: dict, prompt: list[int]) -> None:
    """`model`'s logits equal those of a plain (unquantized) checkpoint of `state` with config `cfg` less its
    quantization_config."""
    plain = tmp_path / "plain"
    plain.mkdir()
    save_file({k: v.float().contiguous() for k, v in state.items()}, plain / "model.safetensors")
    (plain / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "quantization_config"}))
    reference = load_model(ModelConfig.from_hf(plain), dtype="float32")
    assert_logits_close(SimpleRunner(model).step({0: prompt}, all_logits=True)[0],
                        SimpleRunner(reference).step({0: prompt}, all_logits=True)[0])


def check_against(model, prompt: list[int], logits: torch.Tensor, greedy: list[int]) -> None:
    got = SimpleRunner(model).step({0: prompt}, all_logits=True)[0]
    assert_logits_close(got, logits)
    assert SimpleRunner(model).generate_greedy(0, prompt, len(greedy)) == greedy


def test_all_fixtures_present():
    kinds = {"ct_w4a16", "ct_w4a16_asym", "ct_fp8_block", "qwen_fp8", "gptq", "awq"}
    expected = {f"{k}_{m}" for k in kinds for m in ("dense", "moe")} | {"awq_mixed_moe"}
    assert expected <= set(FIXTURE_NAMES), sorted(expected - set(FIXTURE_NAMES))


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_independent_writer_fixture(name):
    path = FIXTURES / name
    model = load_model(ModelConfig.from_hf(path), dtype="float32")
    exp = load_file(path / "oracle" / "expected.safetensors")
    check_against(model, exp["prompt"].tolist(), exp["logits"], exp["greedy"].tolist())


def test_mixed_awq_layout_keeps_full_precision_modules():
    """bf16 QKV and GDN in-projections with int4 o_proj / out_proj, and a whole layer (experts included) listed as
    unquantized, as the mixed AWQ releases store them."""
    model = load_model(ModelConfig.from_hf(FIXTURES / "awq_mixed_moe"), dtype="float32")
    layers = model.model.layers
    assert layers[2].self_attn.qkv_proj.method.name == "unquantized"
    assert layers[2].self_attn.o_proj.method.name.startswith("int4")
    assert layers[0].linear_attn.in_proj.method.name == "unquantized"
    assert layers[0].linear_attn.out_proj.method.name.startswith("int4")
    assert layers[0].mlp.experts.method.name.startswith("int4")
    assert layers[1].mlp.experts.method.name == "unquantized"
    assert layers[1].linear_attn.out_proj.method.name == "unquantized"


# ---- deltaserve's own writer ----------------------------------------------------------------------------------------

SPEC_DENSE = TinySpec("q_dense", extra=dict(hidden_size=256, intermediate_size=384, head_dim=64,
                                            linear_key_head_dim=64, linear_value_head_dim=64))
SPEC_MOE = TinySpec("q_moe", moe=True, per_expert=False,
                    extra=dict(hidden_size=256, head_dim=64, linear_key_head_dim=64, linear_value_head_dim=64,
                               moe_intermediate_size=128, shared_expert_intermediate_size=128, num_experts=4))


def hf_over(src: Path, state: dict[str, torch.Tensor]):
    """transformers' model with `state` (dequantized, fp32) as its weights."""
    import transformers as tf
    tmp = src.parent / (src.name + "_deq")
    tmp.mkdir(exist_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in state.items()}, tmp / "model.safetensors", metadata={"format": "pt"})
    return tf.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()


def dequant_gptq_file(t: dict[str, torch.Tensor], base: str, group: int) -> torch.Tensor:
    """GPTQ v1 by its dequantization formula, written out independently of the loader."""
    qw = t[base + ".qweight"]
    k = qw.shape[0] * 8
    q = torch.stack([(qw >> (4 * j)) & 0xF for j in range(8)], dim=1).reshape(k, -1)
    z = torch.stack([(t[base + ".qzeros"] >> (4 * j)) & 0xF for j in range(8)], dim=-1).reshape(k // group, -1) + 1
    g = t[base + ".g_idx"].long()
    return ((q - z[g]).float() * t[base + ".scales"].float()[g]).T


def dequant_state(path: Path, group: int = 128) -> dict[str, torch.Tensor]:
    t = load_file(path / "model.safetensors")
    out = {}
    for k, v in t.items():
        if k.endswith(".qweight"):
            out[k[:-len("qweight")] + "weight"] = dequant_gptq_file(t, k[:-len(".qweight")], group)
        elif k.endswith(".weight") and v.dtype == torch.float8_e4m3fn:
            s = t[k + "_scale_inv"].float()
            bn, bk = -(-v.shape[0] // s.shape[0]), -(-v.shape[1] // s.shape[1])
            out[k] = v.float() * s.repeat_interleave(bn, 0)[:v.shape[0]].repeat_interleave(bk, 1)[:, :v.shape[1]]
        elif not k.endswith((".qzeros", ".scales", ".g_idx", "_scale_inv")):
            out[k] = v.float()
    return out


@pytest.fixture(scope="module")
def bf16_dirs(tmp_path_factory):
    dirs = {}
    for spec in (SPEC_DENSE, SPEC_MOE):
        d = tmp_path_factory.mktemp(spec.name)
        save_checkpoint(spec, d)
        dirs[spec.name] = d
    return dirs


def _oracle_check(qdir: Path, seed: int = 3) -> None:
    model = load_model(ModelConfig.from_hf(qdir), dtype="float32")
    group = json.loads((qdir / "config.json").read_text())["quantization_config"].get("group_size", 128)
    hf = hf_over(qdir, dequant_state(qdir, group))
    prompt = torch.randint(1, 160, (16,), generator=torch.Generator().manual_seed(seed)).tolist()
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor([prompt])).logits[0].float()
        ids, greedy = list(prompt), []
        for _ in range(STEPS):
            tok = int(hf(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            greedy.append(tok)
            ids.append(tok)
    check_against(model, prompt, logits, greedy)


@pytest.mark.parametrize("kind", ["q_dense", "q_moe"])
def test_own_writer_gptq_act_order(bf16_dirs, kind, tmp_path):
    """desc_act true: g_idx a permutation of k // G (no independent writer produces it on CPU); gate and up share
    one order, as GPTQ gives them. MoE: each expert's down projection has another (the loader puts the gate and up
    rows in it; groups of 32 so that the experts' 128 intermediate columns are several groups); act-order experts
    were refused before."""
    group = 32 if kind == "q_moe" else 128
    out = quantize_checkpoint(bf16_dirs[kind], tmp_path / "gptq", method="int4", desc_act=True, group_size=group)
    t = load_file(out / "model.safetensors")
    mlp = "model.layers.0.mlp." + ("experts.1." if kind == "q_moe" else "")
    g = {p: t[f"{mlp}{p}_proj.g_idx"].long() for p in ("gate", "up", "down")}
    for p in ("gate", "down"):
        assert not torch.equal(g[p], torch.arange(g[p].numel()) // group)
    assert torch.equal(g["gate"], g["up"])  # one input, one order (as GPTQ's one Hessian gives)
    model = load_model(ModelConfig.from_hf(out), dtype="float32")
    if kind == "q_moe":
        assert model.model.layers[0].mlp.experts.w13_perm is not None
    else:  # gate|up stays one GEMM behind one gather of its input (each part had its own before)
        gate_up = model.model.layers[0].mlp.gate_up_proj
        assert gate_up.method.name == "int4 g128 act-order" and gate_up.perm is not None
    _oracle_check(out)


def test_act_order_parts_with_different_orders_stay_apart(bf16_dirs, tmp_path):
    """gate_proj and up_proj in two orders of their input cannot share one gather: the merged projection runs them
    as two GEMMs, each behind its own, and the logits are still those of the dequantized model."""
    out = quantize_checkpoint(bf16_dirs["q_dense"], tmp_path / "gptq", method="int4", desc_act=True)
    t = load_file(out / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.g_idx"
    t[name] = t[name][torch.randperm(t[name].numel(), generator=torch.Generator().manual_seed(1))].contiguous()
    save_file(t, out / "model.safetensors", metadata={"format": "pt"})
    model = load_model(ModelConfig.from_hf(out), dtype="float32")
    gate, up = model.model.layers[0].mlp.gate_up_proj.parts
    assert gate.perm is not None and up.perm is not None and not torch.equal(gate.perm, up.perm)
    assert model.model.layers[1].mlp.gate_up_proj.perm is not None  # the other layers' stay one GEMM
    _oracle_check(out)


def test_own_writer_fp8_fused_experts(bf16_dirs, tmp_path):
    """Qwen FP8 with the MoE experts stored fused ([E, 2I, D] e4m3 + [E, 2I/128, D/128] scales)."""
    out = quantize_checkpoint(bf16_dirs["q_moe"], tmp_path / "fp8", method="fp8")
    t = load_file(out / "model.safetensors")
    fused = {}
    for prefix in {k.split(".experts.")[0] for k in t if ".experts." in k}:
        e = 0
        gu, gus, dn, dns = [], [], [], []
        while f"{prefix}.experts.{e}.gate_proj.weight" in t:
            p = f"{prefix}.experts.{e}."
            gu.append(torch.cat([t.pop(p + "gate_proj.weight"), t.pop(p + "up_proj.weight")]))
            gus.append(torch.cat([t.pop(p + "gate_proj.weight_scale_inv"), t.pop(p + "up_proj.weight_scale_inv")]))
            dn.append(t.pop(p + "down_proj.weight"))
            dns.append(t.pop(p + "down_proj.weight_scale_inv"))
            e += 1
        fused[f"{prefix}.experts.gate_up_proj"] = torch.stack(gu)
        fused[f"{prefix}.experts.gate_up_proj_scale_inv"] = torch.stack(gus)
        fused[f"{prefix}.experts.down_proj"] = torch.stack(dn)
        fused[f"{prefix}.experts.down_proj_scale_inv"] = torch.stack(dns)
    t.update(fused)
    save_file(t, out / "model.safetensors", metadata={"format": "pt"})
    model = load_model(ModelConfig.from_hf(out), dtype="float32")
    reference = load_model(ModelConfig.from_hf(_per_expert_copy(out, fused, t, tmp_path)), dtype="float32")
    prompt = list(range(3, 19))
    a = SimpleRunner(model).step({0: prompt}, all_logits=True)[0]
    b = SimpleRunner(reference).step({0: prompt}, all_logits=True)[0]
    assert torch.equal(a, b)


def _per_expert_copy(out: Path, fused: dict, t: dict, tmp_path: Path) -> Path:
    """The same FP8 checkpoint with the experts per expert again (the layout the oracle test covers)."""
    ref = tmp_path / "fp8_per_expert"
    ref.mkdir()
    shutil.copy(out / "config.json", ref / "config.json")
    per = {k: v for k, v in t.items() if ".experts.gate_up_proj" not in k and ".experts.down_proj" not in k}
    for name, v in fused.items():
        prefix = name.split(".experts.")[0] + ".experts."
        if name.endswith("gate_up_proj"):
            inter = v.shape[1] // 2
            s = fused[name + "_scale_inv"]
            si = s.shape[1] // 2
            for e in range(v.shape[0]):
                per[f"{prefix}{e}.gate_proj.weight"] = v[e, :inter].contiguous()
                per[f"{prefix}{e}.up_proj.weight"] = v[e, inter:].contiguous()
                per[f"{prefix}{e}.gate_proj.weight_scale_inv"] = s[e, :si].contiguous()
                per[f"{prefix}{e}.up_proj.weight_scale_inv"] = s[e, si:].contiguous()
        elif name.endswith("down_proj"):
            for e in range(v.shape[0]):
                per[f"{prefix}{e}.down_proj.weight"] = v[e].contiguous()
                per[f"{prefix}{e}.down_proj.weight_scale_inv"] = fused[name + "_scale_inv"][e].contiguous()
    save_file(per, ref / "model.safetensors", metadata={"format": "pt"})
    return ref


def test_own_writer_fp8_dense_matches_dequantized(bf16_dirs, tmp_path):
    _oracle_check(quantize_checkpoint(bf16_dirs["q_dense"], tmp_path / "fp8", method="fp8"))


def test_fp8_per_channel_compressed_tensors(bf16_dirs, tmp_path):
    """compressed-tensors FP8 per channel (FP8_DYNAMIC's weights): weight_scale [N, 1]."""
    src = bf16_dirs["q_dense"]
    out = tmp_path / "fp8_channel"
    out.mkdir()
    t = load_file(src / "model.safetensors")
    q = {}
    for k, v in t.items():
        if k.endswith("_proj.weight") and "in_proj_a" not in k and "in_proj_b" not in k and v.dim() == 2:
            s = (v.float().abs().amax(dim=1, keepdim=True) / 448).to(torch.bfloat16)
            q[k] = (v.float() / s.float()).to(torch.float8_e4m3fn)
            q[k[:-len("weight")] + "weight_scale"] = s
        else:
            q[k] = v
    save_file(q, out / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head", "re:.*in_proj_[ab]$"],
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True},
            "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}}}}
    (out / "config.json").write_text(json.dumps(cfg))
    model = load_model(ModelConfig.from_hf(out), dtype="float32")
    assert model.model.layers[0].mlp.down_proj.method.name == "fp8 per-channel"
    # the same weights, dequantized, as a plain checkpoint
    deq = {k: (v.float() * q[k[:-len("weight")] + "weight_scale"].float() if v.dtype == torch.float8_e4m3fn else v)
           for k, v in q.items() if not k.endswith("weight_scale")}
    assert_matches_plain(model, tmp_path, deq, cfg, list(range(5, 30)))


@pytest.mark.parametrize("layout", ["autofp8", "ct-tensor"])
def test_fp8_per_tensor_scales(tmp_path, layout):
    """FP8 weights with one scale per tensor (AutoFP8: quant_method fp8 without weight_block_size, a scalar
    weight_scale; compressed-tensors strategy "tensor", weight_scale [1]) were refused (a shape mismatch against
    per-channel [N, 1] scales, or the strategy); they load and give the logits of their dequantized weights."""
    src = FIXTURES / "qwen_fp8_dense"
    t = load_file(src / "model.safetensors")
    out = {}
    for k, v in t.items():
        if k.endswith("_scale_inv"):
            continue
        if v.dtype == torch.float8_e4m3fn:
            s = t[k + "_scale_inv"].float()
            bn, bk = -(-v.shape[0] // s.shape[0]), -(-v.shape[1] // s.shape[1])
            w = v.float() * s.repeat_interleave(bn, 0)[:v.shape[0]].repeat_interleave(bk, 1)[:, :v.shape[1]]
            scale = w.abs().max() / 448
            out[k] = (w / scale).to(torch.float8_e4m3fn)
            out[k + "_scale"] = scale.reshape(() if layout == "autofp8" else (1,))
        else:
            out[k] = v
    path = tmp_path / layout
    path.mkdir()
    save_file(out, path / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    skipped = cfg["quantization_config"]["modules_to_not_convert"]
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                  "modules_to_not_convert": skipped} if layout == "autofp8" else {
        "quant_method": "compressed-tensors", "format": "float-quantized", "ignore": skipped,
        "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": {"dynamic": True},
                                      "weights": {"type": "float", "num_bits": 8, "strategy": "tensor"}}}}
    (path / "config.json").write_text(json.dumps(cfg))
    model = load_model(ModelConfig.from_hf(path), dtype="float32")
    assert model.model.layers[0].mlp.down_proj.method.name == "fp8 per-tensor"
    plain = {k: (v.float() * out[k + "_scale"].float() if v.dtype == torch.float8_e4m3fn else v)
             for k, v in out.items() if not k.endswith("_scale")}
    assert_matches_plain(model, tmp_path, plain, cfg, list(range(3, 30)))


# ---- errors ------------------------------------------------------------------------------------------------------

def _with_config(src: Path, dst: Path, qc: dict | None, edit=None) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    if qc is not None:
        cfg["quantization_config"] = qc
    (dst / "config.json").write_text(json.dumps(cfg))
    if edit is not None:
        t = load_file(dst / "model.safetensors")
        edit(t)
        save_file(t, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_unknown_method_and_bits_are_errors(tmp_path):
    src = FIXTURES / "gptq_dense"
    bad = _with_config(src, tmp_path / "bnb", {"quant_method": "bitsandbytes"})
    with pytest.raises(CheckpointError, match="'bitsandbytes' is not supported"):
        load_model(ModelConfig.from_hf(bad), dtype="float32")
    qc = json.loads((src / "config.json").read_text())["quantization_config"]
    bits3 = _with_config(src, tmp_path / "bits3", {**qc, "bits": 3})
    with pytest.raises(CheckpointError, match="bits is 3"):
        load_model(ModelConfig.from_hf(bits3), dtype="float32")
    awq = json.loads((FIXTURES / "awq_dense" / "config.json").read_text())["quantization_config"]
    gemv = _with_config(FIXTURES / "awq_dense", tmp_path / "gemv", {**awq, "version": "gemv"})
    with pytest.raises(CheckpointError, match="version 'gemv'"):
        load_model(ModelConfig.from_hf(gemv), dtype="float32")


def test_fp8_static_activation_scales_are_refused_by_name(tmp_path):
    """quant_method fp8 with activation_scheme static (an input_scale per layer) failed as a list of unexpected
    input_scale tensors without saying why; it is refused by its config key, as compressed-tensors static schemes
    are."""
    src = FIXTURES / "qwen_fp8_dense"
    qc = json.loads((src / "config.json").read_text())["quantization_config"]

    def input_scales(t):
        for k in [k for k in t if k.endswith(".weight_scale_inv")]:
            t[k[:-len("weight_scale_inv")] + "input_scale"] = torch.tensor(0.01)
    bad = _with_config(src, tmp_path / "static", {**qc, "activation_scheme": "static"}, input_scales)
    with pytest.raises(CheckpointError, match="activation_scheme 'static': static activation scales"):
        load_model(ModelConfig.from_hf(bad), dtype="float32")


def test_quantized_lm_head_with_tied_embeddings_says_why(tmp_path):
    """A quantized lm_head in a checkpoint whose config ties it to the embedding: the unexpected lm_head.* tensors
    are listed with the reason (the tie), not alone."""
    from deltaserve.quantize import quantize_gptq
    src = FIXTURES / "gptq_dense"
    cfg = json.loads((src / "config.json").read_text())

    def quantized_head(t):
        for k, v in quantize_gptq(t.pop("lm_head.weight").float(), 128).items():
            t["lm_head." + k] = v
    path = _with_config(src, tmp_path / "tied", {**cfg["quantization_config"], "lm_head": True}, quantized_head)
    (path / "config.json").write_text(json.dumps({**json.loads((path / "config.json").read_text()),
                                                  "tie_word_embeddings": True}))
    with pytest.raises(CheckpointError, match=r"(?s)lm_head\.qweight.*ties the lm_head to the embedding "
                                              r"\(tie_word_embeddings true\)"):
        load_model(ModelConfig.from_hf(path), dtype="float32")


def test_wrong_shape_names_module_tensor_and_expectation(tmp_path):
    def edit(t):
        name = "model.layers.0.mlp.down_proj.scales"
        t[name] = torch.cat([t[name], t[name]])
    bad = _with_config(FIXTURES / "gptq_dense", tmp_path / "shape", None, edit)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.down_proj\.scales: expected \[3, 256\]"):
        load_model(ModelConfig.from_hf(bad), dtype="float32")


def test_quantized_tensors_of_an_excluded_module_are_an_error(tmp_path):
    qc = json.loads((FIXTURES / "gptq_dense" / "config.json").read_text())["quantization_config"]
    qc = {**qc, "dynamic": {**qc["dynamic"], "-:.*mlp.down_proj": {}}}
    bad = _with_config(FIXTURES / "gptq_dense", tmp_path / "excl", qc)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.down_proj: the checkpoint holds int4 qweight"):
        load_model(ModelConfig.from_hf(bad), dtype="float32")


def test_gptq_zero_points_must_match_checkpoint_format(tmp_path):
    """A symmetric GPTQ checkpoint whose zero points contradict its checkpoint_format (v1 stores zero - 1 = 7, v2
    stores 8) used to load with every weight one scale step off; it fails naming the tensor. Labelled right, the
    v2 copy gives the v1 fixture's logits."""
    src = FIXTURES / "gptq_dense"
    qc = json.loads((src / "config.json").read_text())["quantization_config"]
    v1_as_v2 = _with_config(src, tmp_path / "v1_as_v2", {**qc, "checkpoint_format": "gptq_v2"})
    with pytest.raises(CheckpointError, match=r"linear_attn\.in_proj_qkv\.qzeros: quantization_config\.sym is true, "
                                              r"so every zero point is 8, but .* gives \[7\]"):
        load_model(ModelConfig.from_hf(v1_as_v2), dtype="float32")

    def to_v2(t):
        for name in [n for n in t if n.endswith(".qzeros")]:
            t[name] = pack_int4(unpack_int4(t[name], t[name].shape[1] * 8) + 1)
    v2_as_v1 = _with_config(src, tmp_path / "v2_as_v1", None, to_v2)
    with pytest.raises(CheckpointError, match=r"qzeros: .* gives \[9\]"):
        load_model(ModelConfig.from_hf(v2_as_v1), dtype="float32")
    v2 = _with_config(v2_as_v1, tmp_path / "v2", {**qc, "checkpoint_format": "gptq_v2"})
    prompt = list(range(3, 20))
    assert torch.equal(SimpleRunner(load_model(ModelConfig.from_hf(v2), dtype="float32")).step({0: prompt})[0],
                       SimpleRunner(load_model(ModelConfig.from_hf(src), dtype="float32")).step({0: prompt})[0])


def test_gptq_v1_asymmetric_zero_point_zero_reads_as_vllm_does(tmp_path):
    """An asymmetric GPTQ v1 group whose zero point is 0 is written as 15 (zero - 1 in 4 bits) and was refused as out
    of range. v1 readers (vLLM's gptq_gemm, AutoGPTQ's kernels) add 1 to the stored nibble without wrapping and
    dequantize that group as (q - 16) * scale; so does deltaserve (dequant_gptq_file is that formula)."""
    src = FIXTURES / "gptq_dense"
    qc = json.loads((src / "config.json").read_text())["quantization_config"]
    base = "model.layers.0.mlp.down_proj"
    gen = torch.Generator().manual_seed(5)

    def v1_writer(t):
        zeros = torch.randint(0, 16, (3, 256), generator=gen, dtype=torch.int32)  # [K/G, N], true zero points
        zeros[:, ::7] = 0
        t[base + ".qzeros"] = pack_int4(((zeros - 1) & 0xF).to(torch.uint8))
    path = _with_config(src, tmp_path / "asym", {**qc, "sym": False}, v1_writer)
    stored = unpack_int4(load_file(path / "model.safetensors")[base + ".qzeros"], 256)
    assert (stored == 15).sum() >= 3 * 37
    cfg = json.loads((path / "config.json").read_text())
    assert_matches_plain(load_model(ModelConfig.from_hf(path), dtype="float32"), tmp_path, dequant_state(path), cfg,
                         list(range(3, 20)))


def test_fp8_weight_without_scale_is_not_read_as_bf16(tmp_path):
    def edit(t):
        del t["model.layers.0.mlp.down_proj.weight_scale_inv"]
    bad = _with_config(FIXTURES / "qwen_fp8_dense", tmp_path / "noscale", None, edit)
    with pytest.raises(CheckpointError, match=r"down_proj\.weight: a torch\.float8_e4m3fn tensor where a "
                                               "full-precision weight was expected"):
        load_model(ModelConfig.from_hf(bad), dtype="float32")


def test_fp8_embedding_is_not_read_as_bf16(tmp_path):
    """A quantized tensor for a parameter no quantized method loads (the embedding, norms, conv1d) was converted
    to the model dtype silently, i.e. loaded without its scales; it is refused naming the tensor."""
    def edit(t):
        t["model.embed_tokens.weight"] = t["model.embed_tokens.weight"].to(torch.float8_e4m3fn)
    bad = _with_config(FIXTURES / "qwen_fp8_dense", tmp_path / "fp8_embed", None, edit)
    with pytest.raises(CheckpointError, match=r"model\.embed_tokens\.weight: a torch\.float8_e4m3fn tensor where a "
                                               r"full-precision torch\.float32 one was expected"):
        load_model(ModelConfig.from_hf(bad), dtype="float32")


def test_mixed_experts_are_an_error(tmp_path):
    def edit(t):
        p = "model.layers.0.mlp.experts.1.up_proj."
        w = torch.randn(128, 256).to(torch.bfloat16)
        for s in ("qweight", "qzeros", "scales", "g_idx"):
            t.pop(p + s)
        t[p + "weight"] = w
    bad = _with_config(FIXTURES / "gptq_moe", tmp_path / "mixed", None, edit)
    with pytest.raises(CheckpointError, match="experts of one layer must share one format"):
        load_model(ModelConfig.from_hf(bad), dtype="float32")


# ---- formats, pieces ---------------------------------------------------------------------------------------------

def test_pack_unpack_round_trip():
    codes = torch.randint(0, 16, (5, 37), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(codes), 37), codes)


def test_dequant_refs():
    codes = torch.randint(0, 16, (4, 16), dtype=torch.uint8)
    scales, zeros = torch.rand(4, 2), torch.randint(0, 16, (4, 2), dtype=torch.uint8)
    w = dequant_int4(qweight=pack_int4(codes), scales=scales, zeros=zeros, group_size=8, k=16)
    expect = (codes.float() - zeros.float().repeat_interleave(8, 1)) * scales.repeat_interleave(8, 1)
    assert torch.equal(w, expect)
    w8 = torch.randn(4, 10).to(torch.float8_e4m3fn)
    s = torch.rand(4, 3)
    assert torch.equal(dequant_fp8(weight=w8, scale=s, block_k=4),
                       w8.float() * s.repeat_interleave(4, 1)[:, :10])


@pytest.mark.parametrize("method", ["fp8", "gptq"])
def test_dummy_quantized_model_runs(method):
    """load_format dummy with a quantization config (benchmarks at real shapes, here tiny): formats from the config
    alone, the router and lm_head kept unquantized."""
    cfg = ModelConfig.from_hf(FIXTURES / ("qwen_fp8_moe" if method == "fp8" else "gptq_moe"))
    model = load_model(cfg, dtype="float32", load_format="dummy", quantization=QuantizationConfig.from_model(cfg))
    moe = model.model.layers[0].mlp
    assert moe.router.method.name == "unquantized" and moe.experts.method.name.startswith(method[:3].replace(
        "gpt", "int"))
    out = SimpleRunner(model).step({0: [1, 2, 3]})[0]
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name,folded", [("gptq_moe", True), ("qwen_fp8_moe", True), ("awq_mixed_moe", True)])
def test_shared_expert_folds_into_the_experts_op_only_when_formats_match(name, folded, monkeypatch):
    """A quantized shared expert in the experts' format runs inside their op as one more expert per token; the
    MoE block's output is the same (fp32) as running it through its own layers. (An act-order GPTQ shared expert,
    its input permuted, keeps its own layers: test_only_a_permuted_g_idx_is_act_order.)"""
    from deltaserve.layers import quant as layer_quant

    model = load_model(ModelConfig.from_hf(FIXTURES / name), dtype="float32")
    moe = model.model.layers[0].mlp
    method = type(moe.shared_expert.down_proj.method)
    assert (layer_quant._foldable_shared(moe.experts, moe.shared_expert, method) is not None) == folded
    x = torch.randn(5, moe.experts.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = moe(x)
        monkeypatch.setattr(layer_quant, "_foldable_shared", lambda *args: None)
        want = moe(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def qwen_gptq_layout(dest: Path) -> Path:
    """The gptq_moe fixture in the layout of Qwen's GPTQ-Int4 releases: the shared expert kept in full precision
    (its int4 tensors dequantized to `.weight`, and a "-:" key in `dynamic` for it), the experts int4."""
    src = FIXTURES / "gptq_moe"
    qc = json.loads((src / "config.json").read_text())["quantization_config"]
    qc = {**qc, "dynamic": {"-:.*shared_expert\\..*": {}, **qc.get("dynamic", {})}}

    def dense_shared(t):
        for base in [k[:-len(".qweight")] for k in t if ".shared_expert." in k and k.endswith(".qweight")]:
            t[base + ".weight"] = dequant_gptq_file(t, base, qc["group_size"]).contiguous()
            for suffix in (".qweight", ".qzeros", ".scales", ".g_idx"):
                t.pop(base + suffix)
    return _with_config(src, dest, qc, dense_shared)


def fp8_with_dense_shared(dest: Path) -> Path:
    """The qwen_fp8_moe fixture with its shared experts stored in full precision (dequantized, and named in
    modules_to_not_convert), the routed experts FP8."""
    src = FIXTURES / "qwen_fp8_moe"
    qc = json.loads((src / "config.json").read_text())["quantization_config"]
    dense = dequant_state(src)
    names = sorted({k[:-len(".weight")] for k in dense if ".shared_expert." in k})
    qc = {**qc, "modules_to_not_convert": qc["modules_to_not_convert"] + names}

    def dense_shared(t):
        for base in names:
            t[base + ".weight"] = dense[base + ".weight"].to(torch.bfloat16).contiguous()
            t.pop(base + ".weight_scale_inv")
    return _with_config(src, dest, qc, dense_shared)


@pytest.mark.parametrize("layout", ["gptq", "fp8"])
def test_unquantized_shared_expert_runs_in_the_experts_op(layout, tmp_path):
    """int4 (Qwen's GPTQ-Int4 layout: "-:" in `dynamic`) or FP8 experts beside a shared expert kept in full precision.
    The shared expert's dense weights go into the experts' op (its per-pair kernels run them as one more pair)
    instead of its own three launches and an added output; the model equals transformers on the dequantized
    weights."""
    from deltaserve.layers.quant import _shared_kwargs
    path = (qwen_gptq_layout if layout == "gptq" else fp8_with_dense_shared)(tmp_path / layout)
    moe = load_model(ModelConfig.from_hf(path), dtype="float32").model.layers[0].mlp
    assert moe.experts.method.name.startswith("int4" if layout == "gptq" else "fp8")
    assert moe.shared_expert.down_proj.method.name == "unquantized"
    kw = _shared_kwargs(moe.experts, torch.zeros(1, moe.experts.hidden_size), moe.shared_expert, None)
    assert kw["shared_w13"] is moe.shared_expert.gate_up_proj.weight and "shared_out" not in kw
    _oracle_check(path)


def test_only_a_permuted_g_idx_is_act_order(tmp_path, caplog):
    """GPTQ writes a g_idx with desc_act false too (k // group_size). Every module holding one used to be taken as
    act-order: logged so, gate|up and q|k|v split into one GEMM per projection, an identity permutation of the
    input before each, the shared expert never folded into the experts' op. Only a g_idx that permutes K is."""
    from deltaserve.layers.quant import Int4LinearMethod, _foldable_shared

    with caplog.at_level("INFO", logger="deltaserve.models.loader"):
        model = load_model(ModelConfig.from_hf(FIXTURES / "gptq_moe"), dtype="float32")
    line = next(r.getMessage() for r in caplog.records if "weight formats" in r.getMessage())
    assert "int4 g128" in line and "act-order" not in line
    moe = model.model.layers[0].mlp
    assert type(moe.shared_expert.gate_up_proj.method) is Int4LinearMethod
    assert moe.shared_expert.down_proj.perm is None and _foldable_shared(moe.experts, moe.shared_expert,
                                                                         Int4LinearMethod) is not None

    def permute(t):
        name = "model.layers.0.mlp.shared_expert.gate_proj.g_idx"  # 256 inputs: two groups
        t[name] = t[name][torch.randperm(256, generator=torch.Generator().manual_seed(0))].contiguous()
    model = load_model(ModelConfig.from_hf(_with_config(FIXTURES / "gptq_moe", tmp_path / "perm", None, permute)),
                       dtype="float32")
    moe = model.model.layers[0].mlp
    gate, up = moe.shared_expert.gate_up_proj.parts
    assert gate.method.name == "int4 g128 act-order" and gate.perm is not None and up.perm is None
    assert _foldable_shared(moe.experts, moe.shared_expert, Int4LinearMethod) is None
    assert type(model.model.layers[1].mlp.shared_expert.gate_up_proj.method) is Int4LinearMethod


def test_split_format_projection_gives_its_shards_without_concatenating(monkeypatch):
    """FP8 GDN in_proj qkv|z beside bf16 b|a: forward_split returns each part's shards (the same values as the
    concatenated output's columns) and never concatenates them; both run as one op, the fp8 part's with the bf16
    part's weight as its tail (one GEMV launch at decode sizes on a GPU)."""
    from deltaserve.layers.quant import Fp8LinearMethod
    model = load_model(ModelConfig.from_hf(FIXTURES / "qwen_fp8_moe"), dtype="float32")
    proj = model.model.layers[0].linear_attn.in_proj
    assert proj.method.name.startswith("split(")
    fp8_part, plain = proj.parts
    tails, real = [], Fp8LinearMethod.apply_tail
    monkeypatch.setattr(Fp8LinearMethod, "apply_tail", lambda *a: tails.append(a[3]) or real(*a))
    x = torch.randn(3, proj.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        apart = torch.cat([fp8_part(x), plain(x)], dim=-1)
        want = proj(x)
        assert torch.equal(want, apart)
        monkeypatch.setattr(torch, "cat", lambda *args, **kwargs: pytest.fail("forward_split concatenated"))
        got = proj.forward_split(x)
    want = want.split(list(proj.shards.values()), dim=-1)
    assert len(got) == len(want) == 4 and all(torch.equal(g, w) for g, w in zip(got, want))
    assert len(tails) == 2 and all(t is plain.weight for t in tails)


def test_quantize_cli_and_startup_log(bf16_dirs, tmp_path, caplog):
    from deltaserve.cli import main
    out = tmp_path / "cli_fp8"
    src = tmp_path / "src"  # with a model card and measured figures, as the demo model has
    shutil.copytree(bf16_dirs["q_moe"], src)
    (src / "README.md").write_text("# A card\n")
    (src / "metrics.json").write_text("{}")
    assert main(["quantize", str(src), str(out), "--method", "fp8"]) == 0
    # the card says it is the bf16 source's; the source's measured figures are not carried over
    card = (out / "README.md").read_text()
    assert card.startswith("> Quantized to FP8") and "# A card" in card
    assert not (out / "metrics.json").exists()
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "fp8" and any(n.endswith("in_proj_a") for n in cfg["modules_to_not_convert"])
    with caplog.at_level("INFO", logger="deltaserve.models.loader"):
        model = load_model(ModelConfig.from_hf(out), dtype="float32")
    line = next(r.getMessage() for r in caplog.records if "weight formats" in r.getMessage())
    assert "weight formats (fp8): linear_attn.in_proj_qkv fp8 block 128x128" in line
    assert "linear_attn.in_proj_a float32" in line and "mlp.experts fp8 block 128x128" in line
    # qkv|z fp8 and b|a unquantized: one merged layer, two GEMMs
    assert model.model.layers[0].linear_attn.in_proj.method.name.startswith("split(")


def test_own_fp8_checkpoint_lists_every_module_kept_in_high_precision(bf16_dirs, tmp_path, caplog):
    """Qwen's FP8 releases list every module with a weight they keep in bf16 in modules_to_not_convert, GDN conv1d
    and embed_tokens included (spec wave2.md A.1), and readers that build conv1d as a linear layer (ATOM's Qwen3-Next
    GDN passes it the quant config) take an unlisted one as FP8. deltaserve quantize listed only 2-D projections:
    no conv1d (its weight is [C, 1, 4]) and no embed_tokens, although its keep list names conv1d."""
    out = quantize_checkpoint(bf16_dirs["q_moe"], tmp_path / "fp8", method="fp8")
    listed = set(json.loads((out / "config.json").read_text())["quantization_config"]["modules_to_not_convert"])
    t = load_file(out / "model.safetensors")
    kept = {n[:-len(".weight")] for n, v in t.items()
            if n.endswith(".weight") and v.dim() >= 2 and v.dtype != torch.float8_e4m3fn}
    assert "model.layers.0.linear_attn.conv1d" in kept and "model.embed_tokens" in kept
    assert listed == kept
    with caplog.at_level("WARNING", logger="deltaserve.models.loader"):
        load_model(ModelConfig.from_hf(out), dtype="float32")
    assert not [r.getMessage() for r in caplog.records if "match no module" in r.getMessage()]


@pytest.mark.parametrize("kind", ["q_dense", "q_moe"])
def test_own_int4_checkpoint_loads_without_exclusion_warnings(bf16_dirs, kind, tmp_path, caplog):
    """deltaserve quantize lists only exclusions that match a module of the source: one that matches nothing (a
    vision tower or shared expert the model lacks) made every start warn of a typo in our own config."""
    out = quantize_checkpoint(bf16_dirs[kind], tmp_path / "gptq", method="int4")
    with caplog.at_level("WARNING", logger="deltaserve.models.loader"):
        load_model(ModelConfig.from_hf(out), dtype="float32")
    assert not [r.getMessage() for r in caplog.records if "match no module" in r.getMessage()]
    dynamic = json.loads((out / "config.json").read_text())["quantization_config"]["dynamic"]
    assert "-:.*attn.*" in dynamic and "-:.*visual.*" not in dynamic


def test_quantize_refuses_an_output_dir_in_use(bf16_dirs, tmp_path, capsys):
    """`deltaserve quantize SRC SRC` used to overwrite the bf16 checkpoint with its quantized copy; a non-empty OUT
    mixed stale files into the new checkpoint ('tensor given more than once' at load). Both are refused, and
    nothing is written."""
    from deltaserve.cli import main
    src = tmp_path / "src"
    shutil.copytree(bf16_dirs["q_dense"], src)
    before = {f.name: f.read_bytes() for f in src.iterdir()}
    assert main(["quantize", str(src), str(src), "--method", "fp8"]) == 2
    assert "exists and is not an empty directory" in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in src.iterdir()} == before
    out = tmp_path / "out"
    out.mkdir()
    (out / "model-00001-of-00002.safetensors").write_bytes(b"stale")
    with pytest.raises(ValueError, match="exists and is not an empty directory"):
        quantize_checkpoint(src, out, method="int4")
    assert [f.name for f in out.iterdir()] == ["model-00001-of-00002.safetensors"]


def test_quantize_bad_requests_fail_before_writing(bf16_dirs, tmp_path, capsys):
    """Arguments that cannot give a loadable checkpoint fail with a message and leave no partial output: a group
    size of 0 (was a ZeroDivisionError traceback) or -1, one that does not divide the MLP's 384 inputs (failed
    half-way, leaving an empty OUT), a source without weights (wrote a config alone)."""
    from deltaserve.cli import main
    for size, why in (("0", "positive group size"), ("-1", "positive group size"), ("100", "multiple of the group")):
        out = tmp_path / f"g{size}"
        assert main(["quantize", str(bf16_dirs["q_dense"]), str(out), "--method", "int4", "--group-size", size]) == 2
        assert why in capsys.readouterr().err and not out.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(bf16_dirs["q_dense"] / "config.json", empty)
    with pytest.raises(ValueError, match="no \\*.safetensors files"):
        quantize_checkpoint(empty, tmp_path / "none", method="fp8")
    assert not (tmp_path / "none").exists()


def test_quantize_group_size_error_names_the_tensor(bf16_dirs, tmp_path):
    """A group size that does not divide a projection's inputs failed with 'GPTQ int4 needs in_features (384) a
    multiple of the group size 256 ...', naming neither the tensor nor a group size that works."""
    with pytest.raises(ValueError, match=r"model\.layers\.\d+\.mlp\.down_proj\.weight \[256, 384\]: GPTQ int4 "
                                         r"needs in_features \(384\) a multiple of the group size 256.*--group-size "
                                         r"dividing 384 \(128, 64, 32, 16\)"):
        quantize_checkpoint(bf16_dirs["q_dense"], tmp_path / "g256", method="int4", group_size=256)
    assert not (tmp_path / "g256").exists()


@pytest.mark.parametrize("args, needle", [(("--group-size", "64"), "--group-size: int4 options"),
                                           (("--desc-act",), "--desc-act: int4 options"),
                                           (("--group-size", "128", "--desc-act"), "--group-size and --desc-act")])
def test_quantize_fp8_refuses_int4_options(bf16_dirs, tmp_path, capsys, args, needle):
    """`--method fp8` writes 128x128 block scales; --group-size and --desc-act were silently ignored with it (a
    user asking for FP8 groups of 64 got 128). They are refused, nothing written."""
    from deltaserve.cli import main
    out = tmp_path / "fp8"
    assert main(["quantize", str(bf16_dirs["q_dense"]), str(out), "--method", "fp8", *args]) == 2
    assert needle in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("make_src, args, needle", [
    (lambda d, bf16: None, ("--method", "fp8"), "no config.json in"),
    (lambda d, bf16: (d / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}'), ("--method", "fp8"),
     "unsupported architecture"),
    (lambda d, bf16: shutil.copy(bf16 / "config.json", d / "config.json"), ("--method", "fp8"),
     "no *.safetensors files in"),
    (lambda d, bf16: shutil.copytree(bf16, d, dirs_exist_ok=True), ("--method", "int4", "--group-size", "0"),
     "positive group size"),
])
def test_quantize_bad_sources_are_one_line(bf16_dirs, tmp_path, capsys, make_src, args, needle):
    """A source that is not a bf16 Qwen3.5 safetensors checkpoint, or a zero group size, is a one-line error with
    exit 2 and no output directory (a Llama config or a directory without weights "quantized" into a lone
    config.json; --group-size 0 was a ZeroDivisionError traceback)."""
    from deltaserve.cli import main
    src = tmp_path / "src"
    src.mkdir()
    make_src(src, bf16_dirs["q_dense"])
    assert main(["quantize", str(src), str(tmp_path / "out"), *args]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["qwen_fp8_dense", "gptq_dense", "awq_dense", "ct_w4a16_asym_dense",
                                  "ct_fp8_block_dense"])
def test_fixture_on_gpu_matches_cpu_reference(name):
    """The whole model through the GPU kernels (bf16) against the CPU references in bf16: the same numbers up to
    bf16 rounding of different summation orders. Dense fixtures only: the tiny random MoE fixtures are so sensitive
    to routing that bf16 alone moves their logits by 25% of the scale (the MoE kernels are checked op by op in
    tests/kernels/test_quant_kernels.py)."""
    path = FIXTURES / name
    prompt = load_file(path / "oracle" / "expected.safetensors")["prompt"].tolist()
    ref_model = load_model(ModelConfig.from_hf(path), dtype="bfloat16")
    gpu_model = load_model(ModelConfig.from_hf(path), dtype="bfloat16", device="cuda")
    ref_runner, gpu_runner = SimpleRunner(ref_model), SimpleRunner(gpu_model, device="cuda")
    want = ref_runner.step({0: prompt}, all_logits=True)[0].float()
    got = gpu_runner.step({0: prompt}, all_logits=True)[0].float().cpu()
    scale = want.abs().max().item()
    assert torch.isfinite(got).all()
    assert (got - want).abs().max().item() <= 5e-2 * scale
    # then one-token steps, the same tokens into both: the GEMV paths (a GDN in_proj's bf16 b|a in its quantized
    # GEMV's launch, the MLP's SiLU-and-mul in its down projection's activation copy)
    for _ in range(4):
        token = int(want[-1].argmax())
        want = ref_runner.step({0: [token]})[0].float()
        got = gpu_runner.step({0: [token]})[0].float().cpu()
        assert torch.isfinite(got).all()
        assert (got - want).abs().max().item() <= 5e-2 * want.abs().max().item()


def test_nested_checkpoint_names_and_exclusions(tmp_path):
    """A ConditionalGeneration checkpoint (model.language_model.*, a vision tower, mtp.*): modules_to_not_convert
    holds nested names, which must match our module paths; the result equals the dequantized bf16 checkpoint."""
    spec = TinySpec("q_nested", nested=True, moe=True, per_expert=False, mtp=True,
                    extra=dict(hidden_size=128, head_dim=64, linear_key_head_dim=64, linear_value_head_dim=64,
                               moe_intermediate_size=128, shared_expert_intermediate_size=128, num_experts=4))
    src = tmp_path / "bf16"
    save_checkpoint(spec, src)
    out = quantize_checkpoint(src, tmp_path / "fp8", method="fp8")
    skipped = json.loads((out / "config.json").read_text())["quantization_config"]["modules_to_not_convert"]
    assert "model.language_model.layers.0.linear_attn.in_proj_a" in skipped
    model = load_model(ModelConfig.from_hf(out), dtype="float32")
    assert model.model.layers[0].linear_attn.in_proj.method.name.startswith("split(")
    assert_matches_plain(model, tmp_path, dequant_state(out), json.loads((out / "config.json").read_text()),
                         list(range(7, 40)))


NESTED_MOE = TinySpec("q_nested", nested=True, moe=True, per_expert=False, mtp=True,
                      extra=dict(hidden_size=128, head_dim=64, linear_key_head_dim=64, linear_value_head_dim=64,
                                 moe_intermediate_size=128, shared_expert_intermediate_size=128, num_experts=4))


def test_short_exclusion_names_match_whole_components_of_decoder_paths():
    """A short modules_to_not_convert entry matches whole trailing components of a module path (or an enclosing
    one), never part of a component, and reaches the MTP head only when it names it: `layers.0.mlp` used to
    exclude `mtp.layers.0.mlp` too (the lists are written against transformers' model, which has no MTP head)."""
    from deltaserve.layers.quant import QuantResolver
    raw = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm",
           "modules_to_not_convert": ["layers.0.mlp", "layers.1", "attn", "mtp.fc", "model.language_model.layers.2"]}
    skip = QuantResolver("awq", raw, None).skip
    excluded = ["model.layers.0.mlp.down_proj", "model.layers.0.mlp.experts.3.up_proj", "model.layers.1.mlp.gate",
                "model.layers.2.self_attn.qkv_proj", "mtp.fc"]
    kept = ["mtp.layers.0.mlp.down_proj", "mtp.layers.0.mlp.experts.3.up_proj", "model.layers.10.mlp.down_proj",
            "model.layers.3.self_attn.qkv_proj", "mtp.layers.1.mlp.gate", "model.layers.20.mlp.down_proj"]
    assert [n for n in excluded if n not in skip] == [] and [n for n in kept if n in skip] == []
    mtp_named = QuantResolver("awq", {**raw, "modules_to_not_convert": ["mtp.layers.0.mlp", "mtp"]}, None).skip
    assert "mtp.layers.0.mlp.down_proj" in mtp_named and "model.layers.0.mlp.down_proj" not in mtp_named


def test_decoder_exclusion_loads_a_quantized_mtp_layer_of_the_same_index(tmp_path):
    """A checkpoint whose decoder layer 0 MLP is bf16 (listed as `layers.0.mlp`) and whose MTP layer 0 MLP is FP8
    was refused (the short name reached `mtp.layers.0.mlp`, which holds FP8 tensors); it loads, MTP in FP8."""
    src = tmp_path / "bf16"
    save_checkpoint(NESTED_MOE, src)
    out = quantize_checkpoint(src, tmp_path / "fp8", method="fp8")
    prefix = "model.language_model.layers.0.mlp."

    def decoder_mlp_in_bf16(t):
        for k in [k for k in t if k.startswith(prefix) and k.endswith("_scale_inv")]:
            w, s = t[k[:-len("_scale_inv")]].float(), t.pop(k).float()
            bn, bk = -(-w.shape[0] // s.shape[0]), -(-w.shape[1] // s.shape[1])
            t[k[:-len("_scale_inv")]] = (w * s.repeat_interleave(bn, 0)[:w.shape[0]].repeat_interleave(bk, 1)
                                         [:, :w.shape[1]]).to(torch.bfloat16)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    qc["modules_to_not_convert"] = [*qc["modules_to_not_convert"], "layers.0.mlp"]
    path = _with_config(out, tmp_path / "mixed", qc, decoder_mlp_in_bf16)
    model = load_model(ModelConfig.from_hf(path), dtype="float32", with_mtp=True)
    assert model.model.layers[0].mlp.experts.method.name == "unquantized"
    assert model.mtp.layers[0].mlp.experts.method.name.startswith("fp8")


def test_unmatched_exclusions_are_named_at_startup(tmp_path, caplog):
    """An exclusion entry that names no module of the model or the checkpoint (a typo) used to be ignored
    silently; the start-up log names it. Entries that match (a short name, a module of the vision tower or of the
    MTP head not loaded) are not named."""
    src = tmp_path / "bf16"
    save_checkpoint(NESTED_MOE, src)
    out = quantize_checkpoint(src, tmp_path / "fp8", method="fp8")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    qc["modules_to_not_convert"] = [*qc["modules_to_not_convert"], "in_proj_a", "visual", "mtp.fc",
                                    "model.language_model.layers.0.linear_attn.in_proj_bb", "shared_expert_gat"]
    path = _with_config(out, tmp_path / "typo", qc)
    with caplog.at_level("WARNING", logger="deltaserve.models.loader"):
        load_model(ModelConfig.from_hf(path), dtype="float32")
    warned = [r.getMessage() for r in caplog.records if "match no module" in r.getMessage()]
    assert len(warned) == 1, warned
    assert warned[0].endswith("modules_to_not_convert 'model.language_model.layers.0.linear_attn.in_proj_bb', "
                              "modules_to_not_convert 'shared_expert_gat'")


def test_compressed_tensors_actorder_group(bf16_dirs, tmp_path):
    """compressed-tensors W4A16 with actorder "group" (weight_g_idx a permutation): the same weights as the
    act-order GPTQ checkpoint they are converted from, so the same logits."""
    gptq = quantize_checkpoint(bf16_dirs["q_dense"], tmp_path / "gptq", method="int4", desc_act=True)
    t = load_file(gptq / "model.safetensors")
    ct = {}
    for k, v in t.items():
        if k.endswith(".qweight"):
            base = k[:-len(".qweight")]
            codes = unpack_int4(v.T.contiguous(), v.shape[0] * 8)          # [N, K]
            ct[base + ".weight_packed"] = pack_int4(codes)
            ct[base + ".weight_scale"] = t[base + ".scales"].T.contiguous()
            ct[base + ".weight_g_idx"] = t[base + ".g_idx"]
            ct[base + ".weight_shape"] = torch.tensor(list(codes.shape))
        elif not k.endswith((".qzeros", ".scales", ".g_idx")):
            ct[k] = v
    out = tmp_path / "ct"
    out.mkdir()
    save_file(ct, out / "model.safetensors")
    cfg = json.loads((gptq / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
        "config_groups": {"group_0": {"targets": ["re:.*mlp\\.(gate|up|down)_proj$"], "weights": {
            "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128,
            "actorder": "group"}}}}
    (out / "config.json").write_text(json.dumps(cfg))
    model = load_model(ModelConfig.from_hf(out), dtype="float32")
    assert model.model.layers[0].mlp.down_proj.perm is not None
    reference = load_model(ModelConfig.from_hf(gptq), dtype="float32")
    prompt = list(range(3, 30))
    assert_logits_close(SimpleRunner(model).step({0: prompt}, all_logits=True)[0],
                        SimpleRunner(reference).step({0: prompt}, all_logits=True)[0])


@pytest.mark.parametrize("name", ["awq_mixed_moe", "qwen_fp8_dense"])
def test_engine_generates_the_oracle_tokens(name, tmp_path):
    """The whole engine (scheduler, runner, memory planning, sampler) on a quantized checkpoint: greedy tokens of a
    batch of two requests equal the oracle's."""
    from deltaserve import LLM, SamplingParams
    from deltaserve.demo import write_byte_tokenizer
    path = tmp_path / name
    shutil.copytree(FIXTURES / name, path)
    write_byte_tokenizer(path)
    exp = load_file(path / "oracle" / "expected.safetensors")
    llm = LLM(str(path), dtype="float32", device="cpu", max_model_len=256)
    sp = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True)
    prompt = exp["prompt"].tolist()
    outs = llm.generate([prompt, prompt[:5]], sp)
    assert list(outs[0].outputs[0].token_ids) == exp["greedy"].tolist()


def fp8_lm_head_checkpoint(dest: Path, **config) -> Path:
    """The FP8 dense fixture with its lm_head stored in FP8 (not excluded), config.json updated by `config`."""
    from deltaserve.quantize import quantize_fp8_block

    src = FIXTURES / "qwen_fp8_dense"
    qc = json.loads((src / "config.json").read_text())["quantization_config"]
    qc = {**qc, "modules_to_not_convert": [m for m in qc["modules_to_not_convert"] if m != "lm_head"]}

    def edit(t):
        t["lm_head.weight"], t["lm_head.weight_scale_inv"] = quantize_fp8_block(t["lm_head.weight"])
    path = _with_config(src, dest, qc, edit)
    (path / "config.json").write_text(json.dumps({**json.loads((path / "config.json").read_text()), **config}))
    return path


def check_fp8_lm_head(path: Path) -> None:
    """The model at path loads its lm_head as FP8, and its logits are those of the dequantized head."""
    model = load_model(ModelConfig.from_hf(path), dtype="float32")
    assert model.lm_head.method.name.startswith("fp8")
    t = load_file(path / "model.safetensors")
    head = t["lm_head.weight"].float() * t["lm_head.weight_scale_inv"].float().repeat_interleave(128, 0)[:160] \
        .repeat_interleave(128, 1)[:, :256]
    hidden = torch.randn(3, 256)
    assert_logits_close(model.compute_logits(hidden), hidden @ head.T)


def test_quantized_lm_head(tmp_path):
    """An lm_head stored in FP8 (a config that does not exclude it) loads as FP8 and gives the dequantized logits."""
    check_fp8_lm_head(fp8_lm_head_checkpoint(tmp_path / "head"))


# ---- dynamic FP8 activations (--fp8-activations dynamic) ---------------------------------------------------------

def test_fp8_dynamic_activations_quantize_dense_inputs_only(caplog):
    """W8A8 on the FP8 linear layers (logged as such), routed experts unchanged; the next-token distributions move
    by the activation rounding (e4m3: 3 mantissa bits) and no more (mean KL 2.5e-4 here)."""
    cfg = ModelConfig.from_hf(FIXTURES / "qwen_fp8_moe")
    with caplog.at_level("INFO", logger="deltaserve.models.loader"):
        w8a8 = load_model(cfg, dtype="float32", quantization=QuantizationConfig.from_model(cfg, "dynamic"))
    line = next(r.getMessage() for r in caplog.records if "weight formats" in r.getMessage())
    assert "linear_attn.in_proj_qkv fp8 block 128x128 w8a8" in line
    assert "mlp.experts fp8 block 128x128;" in line or line.endswith("mlp.experts fp8 block 128x128")
    w8a16 = load_model(cfg, dtype="float32")
    prompt = list(range(3, 40))
    a8 = SimpleRunner(w8a8).step({0: prompt}, all_logits=True)[0]
    a16 = SimpleRunner(w8a16).step({0: prompt}, all_logits=True)[0]
    kl = torch.nn.functional.kl_div(a8.log_softmax(-1), a16.log_softmax(-1), log_target=True, reduction="none")
    assert 1e-7 < kl.sum(-1).mean().item() < 1e-3


def test_fp8_dynamic_activations_refused_where_they_do_not_apply(bf16_dirs):
    from deltaserve.config import ConfigError
    gptq = ModelConfig.from_hf(FIXTURES / "gptq_dense")
    with pytest.raises(CheckpointError, match="--fp8-activations dynamic applies to FP8 linear layers"):
        load_model(gptq, dtype="float32", quantization=QuantizationConfig.from_model(gptq, "dynamic"))
    with pytest.raises(ConfigError, match="is not quantized"):
        QuantizationConfig.from_model(ModelConfig.from_hf(bf16_dirs["q_dense"]), "dynamic")
    with pytest.raises(ConfigError, match="fp8_activations must be one of"):
        QuantizationConfig(method="fp8", fp8_activations="static")


def test_engine_runs_with_fp8_activations(tmp_path, caplog):
    """LLM(fp8_activations=...) reaches the layers (the start-up log names w8a8) and the engine generates."""
    from deltaserve import LLM, SamplingParams
    from deltaserve.demo import write_byte_tokenizer
    path = tmp_path / "fp8"
    shutil.copytree(FIXTURES / "qwen_fp8_dense", path)
    write_byte_tokenizer(path)
    with caplog.at_level("INFO", logger="deltaserve.models.loader"):
        llm = LLM(str(path), dtype="float32", device="cpu", max_model_len=128, fp8_activations="dynamic")
    assert llm.engine.config.quantization.fp8_activations == "dynamic"
    line = next(r.getMessage() for r in caplog.records if "weight formats" in r.getMessage())
    assert "self_attn.o_proj fp8 block 128x128 w8a8" in line and "lm_head float32" in line
    out = llm.generate([[5, 6, 7, 8]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 8


def test_step_cost_prior_counts_int4_weights_as_multiplied(tmp_path):
    """The scheduler's step-time prior (engine/step_cost.py) read each packed int32 word of 8 int4 codes as one
    parameter, and scales and zero points as parameters too: an int4 model's per-token cost came out about 8x too
    low (the unsafe side: chunks too large until measurements came in). Its matmul work per token is the plain
    model's; only the bytes a step reads differ (those stored: int4 words, scales and zero points). The input
    embedding is a row gather: in neither (the tied case multiplies by it in the lm_head)."""
    from deltaserve import LLM
    from deltaserve.demo import write_byte_tokenizer
    from deltaserve.engine.step_cost import PRIOR_BYTES_PER_MS, PRIOR_FLOPS_PER_MS
    src = FIXTURES / "gptq_dense"
    cfg = json.loads((src / "config.json").read_text())
    quant, plain = tmp_path / "int4", tmp_path / "plain"
    shutil.copytree(src, quant)
    plain.mkdir()
    state = dequant_state(src)
    save_file({k: v.float().contiguous() for k, v in state.items()}, plain / "model.safetensors")
    (plain / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "quantization_config"}))
    priors = {}
    for path in (quant, plain):
        write_byte_tokenizer(path)
        priors[path.name] = LLM(str(path), dtype="float32", device="cpu", max_model_len=64).engine.scheduler \
            .step_cost.prior
    multiplied = sum(v.numel() for k, v in state.items() if not k.endswith("embed_tokens.weight"))
    assert priors["int4"][1] == pytest.approx(priors["plain"][1], rel=1e-9)
    assert priors["plain"][1] * PRIOR_FLOPS_PER_MS / 2 == pytest.approx(multiplied, rel=1e-9)
    assert priors["plain"][0] * PRIOR_BYTES_PER_MS == pytest.approx(4 * multiplied, rel=1e-9)
    # as loaded: int32 words as stored, fp32 scales, a uint8 zero point per row and group, fp32 plain weights
    int4_bytes = sum(v.numel() * (8 if k.endswith(".qzeros") else 4) for k, v in load_file(src / "model.safetensors")
                     .items() if not k.endswith(("embed_tokens.weight", ".g_idx")))
    assert priors["int4"][0] * PRIOR_BYTES_PER_MS == pytest.approx(int4_bytes, rel=1e-9)
