"""Quantized checkpoints under tensor and expert parallelism (gloo, 2 ranks): the checked-in fixtures of
tests/models/quant_fixtures (written by llm-compressor and auto-round) give the same greedy tokens as one process and
logprobs within LOGPROB_ATOL; each rank's dequantized weights are exactly the matching part of the one-process
model's; a split a format cannot take fails naming the module, the dimension and the sizes that work.

The fixtures (hidden 256, group / block 128) split at TP 2 the way large models split at TP 8: the dense MLP's
down_proj keeps 192 of 384 input columns (inside a group, so each rank uses groups of 64 with the duplicated scale of
the checkpoint's group), each expert's down_proj 64 of 128 (within one group), GDN's q / k sections 64 rows of a
128-row FP8 block."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from deltaserve import LLM, SamplingParams
from deltaserve.config import ModelConfig, RankShapes
from deltaserve.kernels.quant.ref import dequant_fp8, dequant_int4
from deltaserve.layers.linear import Linear, MergedLinear
from deltaserve.layers.moe import Experts
from deltaserve.models import loader
from deltaserve.models.loader import CheckpointError
from tests.parallel.compare import assert_same

FIXTURES = Path(__file__).parents[1] / "models" / "quant_fixtures"
# fp32 activations over the same dequantized weights: the ranks' partial sums are added in another order than one
# process adds them, so logprobs differ by rounding only (observed below 1e-5).
LOGPROB_ATOL = 1e-4
PARAMS = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3)


@pytest.fixture(autouse=True)
def short_collective_timeout(monkeypatch):
    monkeypatch.setenv("DELTASERVE_DIST_TIMEOUT", "60")  # inherited by the spawned workers


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(1, 160, (n,), generator=g).tolist() for n in (37, 5, 50)]


def run(path: Path, tp: int = 1, **kw) -> list:
    llm = LLM(str(path), dtype="float32", device="cpu", max_model_len=128, num_pages=32, max_num_seqs=4,
              max_num_batched_tokens=32, tensor_parallel_size=tp, **kw)
    try:
        return [o.outputs[0] for o in llm.generate(prompts(), PARAMS)]
    finally:
        llm.engine.shutdown()


_REFERENCE: dict[str, list] = {}


def reference(name: str) -> list:
    if name not in _REFERENCE:
        _REFERENCE[name] = run(FIXTURES / name)
    return _REFERENCE[name]


@pytest.mark.parametrize("name, options", [
    ("gptq_dense", {}),                                  # int4 GPTQ v1 (packed along K, g_idx); K split in a group
    ("qwen_fp8_dense", {}),                              # FP8 128x128 blocks; N and K splits inside a block
    ("ct_w4a16_asym_moe", {}),                           # compressed-tensors, zero points packed along N; experts
    ("gptq_moe", {"enable_expert_parallel": True}),      # int4 experts, two whole experts per rank
    ("qwen_fp8_moe", {}),                                # FP8 experts sliced: 64 of 128 rows and columns
    ("qwen_fp8_moe", {"enable_expert_parallel": True}),
    ("awq_mixed_moe", {}),                               # AWQ (packed along N) next to bf16 projections
])
def test_two_ranks_match_one_process(name, options):
    assert_same(run(FIXTURES / name, 2, **options), reference(name), LOGPROB_ATOL)


def test_two_ranks_with_an_unquantized_shared_expert_in_the_experts_op(tmp_path):
    """Qwen's GPTQ-Int4 layout: each rank's slice of the bf16 shared expert runs inside the int4 experts' op, its
    partial output summed with the experts' by the one all-reduce after the block, as one process computes it."""
    from tests.models.test_quant import qwen_gptq_layout
    path = qwen_gptq_layout(tmp_path / "qwen_layout")
    assert_same(run(path, 2), run(path), LOGPROB_ATOL)


# ---- each rank's weights, without processes -------------------------------------------------------------------------

def _dense(layer) -> torch.Tensor:
    """A linear layer's weight [N, K] as it computes with it (dequantized, act-order permutation undone)."""
    if hasattr(layer, "parts"):
        return torch.cat([_dense(p) for p in layer.parts])
    if hasattr(layer, "qweight"):
        w = dequant_int4(qweight=layer.qweight, scales=layer.scales, zeros=layer.zeros, group_size=layer.group_size,
                         k=layer.in_features)
        if layer.perm is not None:
            w = torch.empty_like(w).index_copy_(1, layer.perm, w)
        return w
    if layer.weight.dtype == torch.float8_e4m3fn:
        return dequant_fp8(weight=layer.weight, scale=layer.weight_scale, block_k=layer.block_k)
    return layer.weight.float()


def _experts(ex) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(ex, "w13_qweight"):
        kw = dict(group_size=ex.group_size)
        return (dequant_int4(qweight=ex.w13_qweight, scales=ex.w13_scales, zeros=ex.w13_zeros, k=ex.hidden_size, **kw),
                dequant_int4(qweight=ex.w2_qweight, scales=ex.w2_scales, zeros=ex.w2_zeros, k=ex.intermediate_size,
                             **kw))
    if hasattr(ex, "w13"):
        return (dequant_fp8(weight=ex.w13, scale=ex.w13_scale, block_k=ex.block_k),
                dequant_fp8(weight=ex.w2, scale=ex.w2_scale, block_k=ex.block_k))
    return ex.gate_up_proj.float(), ex.down_proj.float()


def _take(t: torch.Tensor, shard, offset: int = 0) -> torch.Tensor:
    if shard is None:
        return t
    d = shard.dim + offset
    return torch.cat([t.narrow(d, s, n) for s, n in shard.pieces], d)


def _check_rank_weights(path: Path, tp: int, expert_parallel: bool) -> None:
    config = ModelConfig.from_hf(path)
    full = dict(loader.load_model(config, dtype=torch.float32).named_modules())
    for rank in range(tp):
        shapes = RankShapes.for_rank(config, tp, rank, expert_parallel=expert_parallel)
        for name, mod in loader.load_model(config, dtype=torch.float32, shapes=shapes).named_modules():
            shards = getattr(mod, "tp_shards", None) or {}
            if ".parts." in name:  # one format's rows of a merged projection: checked with the merged layer
                continue
            if isinstance(mod, MergedLinear) and name in full:
                one = _dense(full[name])
                want = torch.cat([_take(one[rows], shards.get(f"{proj}.weight"))
                                  for proj, rows in full[name].shard_rows().items()])
                assert torch.equal(_dense(mod)[:want.shape[0]], want), name  # past it: alignment rows
            elif isinstance(mod, Linear) and name in full:
                assert torch.equal(_dense(mod), _take(_dense(full[name]), shards.get("weight"))), name
            elif isinstance(mod, Experts):
                w13, w2 = _experts(full[name])
                if expert_parallel:
                    w13, w2 = (w[shapes.expert_offset:shapes.expert_offset + shapes.num_experts] for w in (w13, w2))
                else:
                    i, rows = full[name].intermediate_size, shards["gate_proj.weight"]
                    w13 = torch.cat([_take(w13[:, :i], rows, 1), _take(w13[:, i:], rows, 1)], 1)
                    w2 = _take(w2, shards["down_proj.weight"], 1)
                got13, got2 = _experts(mod)
                assert torch.equal(got13, w13) and torch.equal(got2, w2), name


@pytest.mark.parametrize("name", ["gptq_dense", "ct_w4a16_asym_dense", "awq_dense", "ct_fp8_block_dense",
                                  "ct_w4a16_moe", "qwen_fp8_moe", "awq_mixed_moe"])
def test_rank_weights_are_the_one_process_weights(name):
    """Every linear layer and experts block of each rank dequantizes to exactly its part of the one-process
    model's weights (column pieces, row pieces, expert slices; whole experts under EP for the MoE fixtures)."""
    _check_rank_weights(FIXTURES / name, 2, False)
    if "moe" in name:
        _check_rank_weights(FIXTURES / name, 2, True)


def test_ranks_read_only_their_part(monkeypatch):
    """No quantized tensor that a rank keeps only part of is read whole (row-parallel splits of K read their
    columns through safetensors slices; the file's rows are mapped only where they are the rank's)."""
    path = FIXTURES / "gptq_dense"
    config = ModelConfig.from_hf(path)
    reads: list[tuple[str, int]] = []
    real_read = loader.read_entry
    monkeypatch.setattr(loader, "read_entry", lambda e: reads.append((e.name, e.end - e.begin)) or real_read(e))
    loader.load_model(config, dtype=torch.float32, shapes=RankShapes.for_rank(config, 2, 1))
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        sizes = {n: f.get_slice(n).get_shape() for n in f.keys()}
    whole = {n for n, size in reads if size == math.prod(sizes[n]) * 4}  # int32 tensors read in full
    assert not any(n.endswith(("proj.qweight", "proj.qzeros")) for n in whole), whole


def _with_intermediate(tmp_path: Path, name: str, size: int) -> Path:
    out = tmp_path / name
    shutil.copytree(FIXTURES / name, out)
    config = json.loads((out / "config.json").read_text())
    config["intermediate_size"] = size
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_a_split_the_format_cannot_take_names_module_dimension_and_sizes(tmp_path):
    """FP8 blocks of 128 over 336 input columns at TP 2: 168 per rank would need blocks of gcd(128, 168) = 8 columns;
    int4 over 388: 194 columns per rank is not a whole number of packed words. The model is not loaded."""
    fp8 = ModelConfig.from_hf(_with_intermediate(tmp_path, "qwen_fp8_dense", 336))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.down_proj: fp8 weights: tensor parallelism "
                                                r"splits the input dimension K \(336\) into 168 per rank, but a rank "
                                                r"would use fp8 groups of 8 columns .* tensor_parallel_size values "
                                                r"that work for it: \[1, 3, 7, 21, 42, 84, 168, 336\]"):
        loader.load_model(fp8, dtype=torch.float32, shapes=RankShapes.for_rank(fp8, 2, 0))
    int4 = ModelConfig.from_hf(_with_intermediate(tmp_path, "ct_w4a16_dense", 388))
    with pytest.raises(CheckpointError, match=r"mlp\.down_proj: int4 weights: .* K \(388\) into 194 per rank, but "
                                                r"int4 codes are packed 8 per word"):
        loader.load_model(int4, dtype=torch.float32, shapes=RankShapes.for_rank(int4, 2, 1))


# ---- layouts no checked-in fixture has: fused FP8 experts, FP8 per channel, act-order GPTQ ---------------------------

def _rewrite(tmp_path: Path, name: str, edit_tensors, edit_config=None) -> Path:
    from safetensors.torch import load_file, save_file

    out = tmp_path / f"{name}_{edit_tensors.__name__}"
    shutil.copytree(FIXTURES / name, out)
    tensors = load_file(out / "model.safetensors")
    save_file(edit_tensors(tensors), out / "model.safetensors", metadata={"format": "pt"})
    if edit_config is not None:
        config = json.loads((out / "config.json").read_text())
        edit_config(config["quantization_config"])
        (out / "config.json").write_text(json.dumps(config))
    return out


def fused_experts(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert FP8 tensors stacked into gate_up_proj [E, 2I, D] / down_proj [E, D, I] with per-expert block
    scales [E, 2I/128, D/128] / [E, D/128, I/128]."""
    out = {n: v for n, v in t.items() if ".experts." not in n}
    prefixes = sorted({n.split(".experts.")[0] for n in t if ".experts." in n})
    for p in prefixes:
        e = range(len({n.split(".experts.")[1].split(".")[0] for n in t if n.startswith(p + ".experts.")}))
        x = lambda i, proj, s: t[f"{p}.experts.{i}.{proj}.{s}"]  # noqa: E731
        for s, suffix in (("weight", ""), ("weight_scale_inv", "_scale_inv")):
            out[f"{p}.experts.gate_up_proj{suffix}"] = torch.stack([torch.cat([x(i, "gate_proj", s),
                                                                               x(i, "up_proj", s)]) for i in e])
            out[f"{p}.experts.down_proj{suffix}"] = torch.stack([x(i, "down_proj", s) for i in e])
    return out


def per_channel(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every FP8 block-scaled weight dequantized and quantized again with one scale per output row."""
    out = dict(t)
    for n in [n for n in t if n.endswith(".weight_scale_inv")]:
        w = n.removesuffix("_scale_inv")
        full = dequant_fp8(weight=t[w], scale=t[n].float().repeat_interleave(128, 0)[:t[w].shape[0]], block_k=128)
        scale = full.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 448
        out[w], out[n] = (full / scale).to(torch.float8_e4m3fn), scale
    return out


def test_fused_fp8_experts_and_fp8_per_channel(tmp_path):
    """Fused FP8 experts split along dims 1 and 2 (TP) or 0 (EP), and FP8 with a scale per output row (a K split
    needs nothing: each row's scale covers all its columns): exact weights per rank, and the same tokens as one
    process under TP 2 (fused experts, which also run EP in the weight check)."""
    fused = _rewrite(tmp_path, "qwen_fp8_moe", fused_experts)
    channel = _rewrite(tmp_path, "qwen_fp8_dense", per_channel, lambda q: q.pop("weight_block_size"))
    assert loader.load_model(ModelConfig.from_hf(channel), dtype=torch.float32).model.layers[0].mlp.down_proj \
        .method.name == "fp8 per-channel"
    for path, moe in ((fused, True), (channel, False)):
        _check_rank_weights(path, 2, False)
        if moe:
            _check_rank_weights(path, 2, True)
    assert_same(run(fused, 2), run(fused), LOGPROB_ATOL)


def fp8_lm_head(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from deltaserve.quantize import quantize_fp8_block

    t["lm_head.weight"], t["lm_head.weight_scale_inv"] = quantize_fp8_block(t["lm_head.weight"])
    return t


def test_fp8_vocab_parallel_lm_head(tmp_path):
    """An FP8 lm_head: 80 of its 160 rows per rank, rank 1's spanning the end of one 128-row block and the start of
    the next."""
    path = _rewrite(tmp_path, "qwen_fp8_dense", fp8_lm_head,
                    lambda q: q["modules_to_not_convert"].remove("lm_head"))
    assert loader.load_model(ModelConfig.from_hf(path), dtype=torch.float32).lm_head.method.name.startswith("fp8")
    _check_rank_weights(path, 2, False)


def permuted_out_proj(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GDN layer 0's out_proj stored as act-order GPTQ (g_idx a permutation of k // 128, codes in that order)."""
    out = dict(t)
    p = "model.layers.0.linear_attn.out_proj"
    g = out[f"{p}.g_idx"]
    out[f"{p}.g_idx"] = g[torch.randperm(g.numel(), generator=torch.Generator().manual_seed(0))].contiguous()
    return out


def test_act_order_row_parallel_is_refused(tmp_path):
    """An act-order g_idx mixes the groups of every rank's input columns: a row-parallel split of it fails at load
    naming the tensor (one process loads it)."""
    path = _rewrite(tmp_path, "gptq_dense", permuted_out_proj)
    config = ModelConfig.from_hf(path)
    loader.load_model(config, dtype=torch.float32)
    with pytest.raises(CheckpointError, match=r"layers\.0\.linear_attn\.out_proj\.g_idx: an act-order \(permuted\) "
                                              r"g_idx in a row-parallel projection"):
        loader.load_model(config, dtype=torch.float32, shapes=RankShapes.for_rank(config, 2, 1))
