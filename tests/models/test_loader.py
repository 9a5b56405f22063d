"""The safetensors loader: layouts, error messages, dummy weights, MTP, and the host-memory bound."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltaserve.config import ModelConfig
from deltaserve.models import loader
from deltaserve.models.loader import CheckpointError, checkpoint_state_dict, load_model
from tests.models.factory import TinySpec, save_checkpoint


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dense")
    save_checkpoint(TinySpec("dense"), path)
    return path


def copy_ckpt(src, dst, edit):
    """Copy a single-file checkpoint, applying edit(tensors) to its tensors."""
    dst.mkdir(exist_ok=True)
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


def load(path, **kw):
    return load_model(ModelConfig.from_hf(path), dtype="float32", **kw)


def test_missing_tensor_is_named(dense_dir, tmp_path):
    path = copy_ckpt(dense_dir, tmp_path / "c", lambda t: t.pop("model.layers.1.linear_attn.in_proj_z.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor.*\n.*model\.layers\.1\.linear_attn\.in_proj_z\.weight"):
        load(path)


def test_unexpected_tensors_are_listed(dense_dir, tmp_path):
    def add(t):
        t["model.layers.0.mlp.bogus.weight"] = torch.zeros(2)
        t["something_else"] = torch.zeros(1)
    path = copy_ckpt(dense_dir, tmp_path / "c", add)
    with pytest.raises(CheckpointError, match="2 unexpected") as e:
        load(path)
    assert "model.layers.0.mlp.bogus.weight" in str(e.value) and "something_else" in str(e.value)


def test_static_kv_scales_are_skipped_and_nothing_else(dense_dir, tmp_path, caplog):
    """A checkpoint's calibrated KV-cache scales (compressed-tensors kv_cache_scheme, ModelOpt exports) are skipped
    with a log line, not refused as unexpected (the quantized KV cache computes its own scales); the weights load
    as without them, and any other stray tensor under self_attn is still refused."""
    i = next(n for n, kind in enumerate(ModelConfig.from_hf(dense_dir).layer_types) if kind == "full_attention")
    attn = f"model.layers.{i}.self_attn"

    def add(t):
        t.update({f"{attn}.k_scale": torch.tensor(0.5), f"{attn}.v_scale": torch.tensor([0.25]),
                  f"{attn}.k_proj.output_scale": torch.tensor(1.0)})
    path = copy_ckpt(dense_dir, tmp_path / "c", add)
    with caplog.at_level("INFO", logger="deltaserve.models.loader"):
        model = load(path)
    assert "skipping 3 static KV-cache scale" in caplog.text
    ref = load(dense_dir)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
    path = copy_ckpt(dense_dir, tmp_path / "d", lambda t: t.update({f"{attn}.k_bogus_scale": torch.tensor(1.0)}))
    with pytest.raises(CheckpointError, match=r"1 unexpected.*\n.*k_bogus_scale"):
        load(path)


def test_shape_mismatch_names_expected_and_found(dense_dir, tmp_path):
    path = copy_ckpt(dense_dir, tmp_path / "c", lambda t: t.update({"model.norm.weight": torch.zeros(65)}))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight: expected \[64\], found \[65\]"):
        load(path)


def test_sharded_checkpoint_with_index(dense_dir, tmp_path):
    tensors = load_file(dense_dir / "model.safetensors")
    names = sorted(tensors)
    out = tmp_path / "sharded"
    out.mkdir()
    (out / "config.json").write_text((dense_dir / "config.json").read_text())
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, out / fname)
        weight_map.update({n: fname for n in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    a, b = load(dense_dir), load(out)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)


def test_index_listing_a_missing_shard(dense_dir, tmp_path):
    out = copy_ckpt(dense_dir, tmp_path / "c", lambda t: None)
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-2.safetensors"}}))
    with pytest.raises(CheckpointError, match="model-2.safetensors"):
        load(out)


def test_no_weights_at_all(tmp_path, dense_dir):
    (tmp_path / "config.json").write_text((dense_dir / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load(tmp_path)


def test_values_and_fp32_params(dense_dir):
    model = load(dense_dir, )
    ref = load_file(dense_dir / "model.safetensors")
    # The four GDN input projections live as rows of one merged weight, in checkpoint order.
    merged = model.model.layers[0].linear_attn.in_proj
    for shard, rows in merged.shard_rows().items():
        assert torch.equal(merged.weight[rows], ref[f"model.layers.0.linear_attn.{shard}.weight"]), shard
    assert merged.weight.shape[0] == sum(ref[f"model.layers.0.linear_attn.{s}.weight"].shape[0] for s in merged.shards)
    attn = next(layer.self_attn for layer in model.model.layers if hasattr(layer, "self_attn"))
    i = next(i for i, layer in enumerate(model.model.layers) if hasattr(layer, "self_attn"))
    for shard, rows in attn.qkv_proj.shard_rows().items():
        assert torch.equal(attn.qkv_proj.weight[rows], ref[f"model.layers.{i}.self_attn.{shard}.weight"]), shard
    bf16 = load_model(ModelConfig.from_hf(dense_dir), dtype="bfloat16")
    gdn = bf16.model.layers[0].linear_attn
    assert gdn.A_log.dtype == torch.float32 and gdn.norm.weight.dtype == torch.float32
    assert gdn.in_proj.weight.dtype == torch.bfloat16
    assert torch.equal(gdn.A_log, ref["model.layers.0.linear_attn.A_log"])


def test_vision_tower_skipped_without_reading(tmp_path, monkeypatch):
    path = tmp_path / "nested"
    save_checkpoint(TinySpec("nested", nested=True), path)
    names = set(load_file(path / "model.safetensors"))
    assert any(n.startswith("model.visual.") for n in names)
    read = []
    real = loader.read_entry
    monkeypatch.setattr(loader, "read_entry", lambda e: (read.append(e.name), real(e))[1])
    load(path)
    assert read and not any(n.startswith("model.visual.") for n in read)


def test_fused_and_per_expert_moe_load_the_same(tmp_path):
    a, b = tmp_path / "per", tmp_path / "fused"
    save_checkpoint(TinySpec("m", moe=True, per_expert=True), a, seed=5)
    save_checkpoint(TinySpec("m", moe=True, per_expert=False), b, seed=5)
    assert any(".experts.gate_up_proj" in n for n in load_file(b / "model.safetensors"))
    ma, mb = load(a), load(b)
    for (na, pa), (nb, pb) in zip(ma.named_parameters(), mb.named_parameters()):
        assert na == nb and torch.equal(pa, pb), na


def test_mixed_expert_forms_are_rejected(tmp_path):
    a = tmp_path / "per"
    save_checkpoint(TinySpec("m", moe=True, per_expert=True), a)

    def add_fused(t):
        t["model.layers.0.mlp.experts.down_proj"] = torch.stack(
            [t[f"model.layers.0.mlp.experts.{e}.down_proj.weight"] for e in range(8)])
    path = copy_ckpt(a, tmp_path / "mixed", add_fused)
    with pytest.raises(CheckpointError, match="both fused and per expert"):
        load(path)


def test_a_tensor_in_two_shards_is_rejected(dense_dir, tmp_path):
    tensors = load_file(dense_dir / "model.safetensors")
    out = tmp_path / "twice"
    out.mkdir()
    (out / "config.json").write_text((dense_dir / "config.json").read_text())
    save_file(tensors, out / "a.safetensors")
    save_file({"model.norm.weight": tensors["model.norm.weight"]}, out / "b.safetensors")
    with pytest.raises(CheckpointError, match=r"more than once: model\.norm\.weight"):
        load(out)


def test_truncated_file_and_absurd_header_name_the_file(dense_dir, tmp_path):
    out = tmp_path / "bad"
    out.mkdir()
    (out / "config.json").write_text((dense_dir / "config.json").read_text())
    data = (dense_dir / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated or corrupt"):
        load(out)
    (out / "model.safetensors").write_bytes((1 << 60).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a valid safetensors file \(header length"):
        load(out)


def test_mtp_head_loaded_and_runnable(tmp_path):
    from tests.models.simple_runner import SimpleRunner
    from deltaserve.engine.device_inputs import build_forward_batch

    path = tmp_path / "mtp"
    save_checkpoint(TinySpec("mtp", moe=True, nested=True, mtp=True), path)
    assert load(path).mtp is None  # the head is built only for speculative decoding
    model = load(path, with_mtp=True)
    ref = load_file(path / "model.safetensors")
    assert model.mtp is not None
    assert torch.equal(model.mtp.fc.weight, ref["mtp.fc.weight"])
    assert torch.equal(model.mtp.layers[0].mlp.experts.down_proj[3], ref["mtp.layers.0.mlp.experts.3.down_proj.weight"])
    runner = SimpleRunner(model)
    ids = list(range(1, 12))
    batch = build_forward_batch(query_lens=[11], context_lens=[0], state_slots=[0], block_tables=[[0]], page_size=16,
                                logits_indices=list(range(11)))
    hidden = model(torch.tensor(ids), batch, runner.cache)
    draft = model.compute_logits(model.mtp_forward(torch.tensor(ids[1:] + [5]), hidden, batch, runner.cache))
    assert draft.shape == (11, 160) and torch.isfinite(draft).all()


def test_checkpoint_without_mtp_tensors_loads_without_head(dense_dir):
    cfg = ModelConfig.from_hf(dense_dir)
    model = load_model(cfg, dtype="float32")
    assert model.mtp is None
    with pytest.raises(RuntimeError, match="without its MTP head"):
        model.mtp_forward(None, None, None, None)
    with pytest.raises(CheckpointError, match=r"asks for the MTP head .* has no mtp\.\* tensors"):
        load_model(cfg, dtype="float32", with_mtp=True)


def test_dummy_weights_deterministic_and_sane(dense_dir):
    cfg = ModelConfig.from_hf(dense_dir)
    a = load_model(cfg, dtype="float32", load_format="dummy", with_mtp=True)
    b = load_model(cfg, dtype="float32", load_format="dummy", with_mtp=True)
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb) and torch.isfinite(pa).all(), n
    from tests.models.simple_runner import SimpleRunner
    logits = SimpleRunner(a).step({0: list(range(1, 40))}, all_logits=True)[0]
    assert torch.isfinite(logits).all() and logits.std() > 0


def test_bad_load_format_and_dtype(dense_dir):
    cfg = ModelConfig.from_hf(dense_dir)
    with pytest.raises(ValueError, match="load_format"):
        load_model(cfg, load_format="pt")
    with pytest.raises(ValueError, match="dtype 'floaty'"):
        load_model(cfg, dtype="floaty")


def test_unsupported_quantization_is_a_clear_error(dense_dir, tmp_path):
    path = copy_ckpt(dense_dir, tmp_path / "q", lambda t: None)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "version": "marlin"}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="version 'marlin'"):
        load(path)


RSS_SCRIPT = textwrap.dedent("""
    import json, sys, psutil, torch
    from deltaserve.config import ModelConfig
    from deltaserve.models.loader import load_model
    cfg = ModelConfig.from_hf(sys.argv[1])
    base = psutil.Process().memory_info().rss
    model = load_model(cfg, dtype="float32")
    # VmHWM, not ru_maxrss: after fork+exec ru_maxrss keeps the (large) pytest parent's peak.
    status = open("/proc/self/status").read()
    peak = int(next(l for l in status.splitlines() if l.startswith("VmHWM:")).split()[1]) * 1024
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"base": base, "peak": peak, "weights": weights}))
""")


def test_peak_rss_while_loading_stays_under_1_3x_weights(tmp_path):
    """A ~300 MB checkpoint: loading may not hold a second full copy of the weights in host memory."""
    cfg = {"architectures": ["Qwen3_5ForCausalLM"], "vocab_size": 8192, "hidden_size": 1024,
           "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 128,
           "intermediate_size": 4096, "linear_num_key_heads": 8, "linear_num_value_heads": 16,
           "linear_key_head_dim": 64, "linear_value_head_dim": 64, "dtype": "float32"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model = load_model(ModelConfig.from_hf(tmp_path), load_format="dummy")
    save_file({n: p.contiguous() for n, p in checkpoint_state_dict(model).items()}, tmp_path / "model.safetensors")
    del model
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(tmp_path)], capture_output=True, text=True, check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["weights"] > 250e6
    ratio = (m["peak"] - m["base"]) / m["weights"]
    print(f"peak RSS growth while loading: {ratio:.3f} x the weights")
    assert ratio <= 1.3, m


def test_router_rows_padded_to_eight_and_dropped(tmp_path):
    """The router | shared-gate GEMM (E + 1 rows) is padded to a multiple of 8 rows (cuBLAS's aligned kernels):
    the loaded rows equal the checkpoint's, the padding is zero, and forward_split returns only the real rows."""
    save_checkpoint(TinySpec("m", moe=True), tmp_path, seed=3)
    model = load(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    router = model.model.layers[0].mlp.router
    E = model.config.num_experts
    assert router.weight.shape[0] % 8 == 0 and router.padding_rows == router.weight.shape[0] - (E + 1)
    prefix = "model.layers.0.mlp."
    want = torch.cat([tensors[prefix + "gate.weight"], tensors[prefix + "shared_expert_gate.weight"]]).float()
    assert torch.equal(router.weight[:E + 1], want)
    assert not router.weight[E + 1:].any()
    logits, gate = router.forward_split(torch.randn(3, router.in_features))
    assert logits.shape == (3, E) and gate.shape == (3, 1)
