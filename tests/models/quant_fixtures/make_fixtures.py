"""Writes the checked-in quantized test checkpoints with independent writers, and the oracle outputs.

Run once, in a venv of its own (these pins conflict with the project's transformers):
    python3.11 -m venv .dev/ct && .dev/ct/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1 transformers==5.17.0
    PYTHONPATH=. .dev/ct/bin/python tests/models/quant_fixtures/make_fixtures.py
Tools: llm-compressor 0.14.0.1 (`model_free_ptq`, compressed-tensors 0.19.0) for compressed-tensors W4A16 sym/asym
and FP8_BLOCK; auto-round 0.15.1 (RTN, iters=0) for GPTQ v1 (`auto_gptq`) and AutoAWQ GEMM (`auto_awq`), including
the mixed AWQ layout through its layer_config; Qwen official FP8 is the compressed-tensors FP8_BLOCK output renamed
(`weight_scale` -> `weight_scale_inv`, `quant_method: fp8` config): the two differ only in those names.

Oracle (`oracle/expected.safetensors` in each checkpoint's folder): the logits of transformers' own Qwen3.5 model in fp32 over a
fixed prompt and its 32 greedy tokens, with the weights dequantized independently of deltaserve: by transformers
itself where it loads the format (compressed-tensors int4, Qwen FP8 with FineGrainedFP8Config(dequantize=True)),
else by compressed_tensors' own unpacker / the formats' dequantization formulas written out below.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).parent
PROMPT = [3, 17, 42, 99, 5, 150, 23, 77, 64, 12, 8, 131, 56, 90, 33, 2]
STEPS = 32


def tiny_text(moe: bool) -> dict:
    kw = dict(vocab_size=160, hidden_size=256, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              head_dim=64, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=64,
              linear_value_head_dim=64, linear_conv_kernel_dim=4, max_position_embeddings=4096,
              tie_word_embeddings=False, layer_types=["linear_attention", "linear_attention", "full_attention"],
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
              eos_token_id=None)
    if moe:
        kw.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128, shared_expert_intermediate_size=128)
    else:
        kw.update(intermediate_size=384)
    return kw


def write_bf16(moe: bool, out: Path, seed: int) -> None:
    """A tiny random model saved as the official releases store it: BF16, A_log and the GDN norm fp32, experts per
    expert."""
    import transformers as tf
    torch.manual_seed(seed)
    cfg = (tf.Qwen3_5MoeTextConfig if moe else tf.Qwen3_5TextConfig)(**tiny_text(moe))
    model = (tf.Qwen3_5MoeForCausalLM if moe else tf.Qwen3_5ForCausalLM)(cfg).eval()
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 or name.endswith(("A_log", "dt_bias")):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(out)
    tensors = load_file(out / "model.safetensors")
    fixed = {k: (v.float() if k.endswith(("A_log", "linear_attn.norm.weight")) else v.to(torch.bfloat16)).contiguous()
             for k, v in tensors.items()}
    save_file(fixed, out / "model.safetensors", metadata={"format": "pt"})
    cfg_json = json.loads((out / "config.json").read_text())
    cfg_json["dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(cfg_json, indent=2))
    demo = HERE.parents[2] / "src" / "deltaserve" / "demo_model"  # auto-round loads a tokenizer: any will do
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo / f, out / f)


CT_IGNORE = ["lm_head", "re:.*mlp.gate$", "re:.*shared_expert_gate$", "re:.*in_proj_a$", "re:.*in_proj_b$",
             "re:.*conv1d.*", "re:.*embed_tokens.*"]


def model_free(src: Path, out: Path, scheme: str) -> None:
    from llmcompressor import model_free_ptq
    model_free_ptq(str(src), str(out), scheme=scheme, ignore=CT_IGNORE, device="cpu")


def auto_round(src: Path, out: Path, fmt: str, layer_config: dict | None = None) -> None:
    from auto_round import AutoRound
    tmp = Path(tempfile.mkdtemp())
    ar = AutoRound(str(src), bits=4, group_size=128, sym=fmt == "auto_gptq", iters=0, device_map="cpu",
                   disable_opt_rtn=True, layer_config=layer_config or {})
    ar.quantize_and_save(str(tmp), format=fmt)
    produced = [p.parent for p in tmp.rglob("config.json")][0]
    shutil.copytree(produced, out, dirs_exist_ok=True)


def to_qwen_fp8(ct_dir: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tensors = load_file(next(ct_dir.glob("*.safetensors")))
    renamed = {(k[:-len("weight_scale")] + "weight_scale_inv" if k.endswith("weight_scale") else k): v
               for k, v in tensors.items()}
    save_file(renamed, out / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((ct_dir / "config.json").read_text())
    quantized = {k[:-len(".weight_scale_inv")] for k in renamed if k.endswith(".weight_scale_inv")}
    linears = {k[:-len(".weight")] for k, v in renamed.items() if k.endswith(".weight") and v.dim() == 2
               and "norm" not in k and "embed" not in k}
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                  "weight_block_size": [128, 128],
                                  "modules_to_not_convert": sorted(linears - quantized)}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))


# ---- independent dequantization (the writers' formulas) for the formats transformers cannot load on CPU ---------

def _unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] packed along dim 0 (8 per word, low nibble first) -> [8R, C]."""
    shifts = torch.arange(0, 32, 4)
    return ((packed.unsqueeze(1) >> shifts.view(1, 8, 1)) & 0xF).reshape(-1, packed.shape[1])


def _unpack_cols(packed: torch.Tensor, order=None) -> torch.Tensor:
    shifts = torch.arange(0, 32, 4)
    u = (packed.unsqueeze(-1) >> shifts) & 0xF  # [R, C, 8]: nibble j of word c
    if order is not None:
        u = u[..., order]
    return u.reshape(packed.shape[0], -1)


def dequant_gptq(t: dict, name: str, G: int) -> torch.Tensor:
    q = _unpack_rows(t[name + ".qweight"])             # [K, N]
    z = _unpack_cols(t[name + ".qzeros"]) + 1           # [K/G, N]
    s = t[name + ".scales"].float()
    g = t[name + ".g_idx"].long() if name + ".g_idx" in t else torch.arange(q.shape[0]) // G
    return ((q - z[g]).float() * s[g]).T.contiguous()


def dequant_awq(t: dict, name: str, G: int) -> torch.Tensor:
    order = [0, 4, 1, 5, 2, 6, 3, 7]
    q = _unpack_cols(t[name + ".qweight"], order)      # [K, N]
    z = _unpack_cols(t[name + ".qzeros"], order)       # [K/G, N]
    s = t[name + ".scales"].float()
    g = torch.arange(q.shape[0]) // G
    return ((q - z[g]).float() * s[g]).T.contiguous()


def dequant_ct_int4(t: dict, name: str) -> torch.Tensor:
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    shape = torch.Size(t[name + ".weight_shape"].tolist())
    q = unpack_from_int32(t[name + ".weight_packed"], 4, shape).float()
    s = t[name + ".weight_scale"].float()
    G = shape[1] // s.shape[1]
    z = (unpack_from_int32(t[name + ".weight_zero_point"], 4, torch.Size([shape[0], s.shape[1]]), 0).float()
         if name + ".weight_zero_point" in t else torch.zeros_like(s))
    return (q - z.repeat_interleave(G, 1)) * s.repeat_interleave(G, 1)


def dequant_fp8(t: dict, name: str, scale_key: str) -> torch.Tensor:
    w = t[name + ".weight"].float()
    s = t[name + "." + scale_key].float()
    bn, bk = -(-w.shape[0] // s.shape[0]), -(-w.shape[1] // s.shape[1])
    return w * s.repeat_interleave(bn, 0)[:w.shape[0]].repeat_interleave(bk, 1)[:, :w.shape[1]]


AUX = (".qzeros", ".scales", ".g_idx", ".weight_scale", ".weight_scale_inv", ".weight_zero_point", ".weight_shape",
       ".weight_g_idx")


def dequantized_checkpoint(qdir: Path, dequant) -> dict[str, torch.Tensor]:
    """Every quantized projection replaced by its fp32 dequantized weight (`dequant(tensors, base)`)."""
    t = load_file(next(qdir.glob("*.safetensors")))
    out = {}
    for k, v in t.items():
        if k.endswith(".qweight") or k.endswith(".weight_packed"):
            base = k.rsplit(".", 1)[0]
            out[base + ".weight"] = dequant(t, base)
        elif k.endswith(".weight") and v.dtype == torch.float8_e4m3fn:
            out[k] = dequant(t, k[:-len(".weight")])
        elif not k.endswith(AUX):
            out[k] = v.float()
    return out


def hf_from_state(src_bf16: Path, state: dict[str, torch.Tensor]):
    import transformers as tf
    cfg = tf.AutoConfig.from_pretrained(src_bf16)
    tmp = Path(tempfile.mkdtemp())
    cfg.save_pretrained(tmp)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp / "model.safetensors", metadata={"format": "pt"})
    return tf.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()


def hf_quantized(qdir: Path, fp8: bool = False):
    import transformers as tf
    kw = {"quantization_config": tf.CompressedTensorsConfig(run_compressed=False)}
    if fp8:
        kw["quantization_config"] = tf.FineGrainedFP8Config(dequantize=True)
    model = tf.AutoModelForCausalLM.from_pretrained(qdir, dtype=torch.float32, **kw).eval()
    return model


def check_exact(model, qdir: Path) -> None:
    """transformers' decompressed weights against compressed_tensors' own unpacker, in fp32 (the oracle must not
    round the dequantized weights)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    t = load_file(next(qdir.glob("*.safetensors")))
    modules = dict(model.named_modules())
    worst = 0.0
    for k in t:
        if not k.endswith(".weight_packed"):
            continue
        base = k[:-len(".weight_packed")]
        shape = torch.Size(t[base + ".weight_shape"].tolist())
        q = unpack_from_int32(t[k], 4, shape).float()
        s = t[base + ".weight_scale"].float()
        G = shape[1] // s.shape[1]
        if base + ".weight_zero_point" in t:
            z = unpack_from_int32(t[base + ".weight_zero_point"], 4, torch.Size([shape[0], s.shape[1]]), 0).float()
        else:
            z = torch.zeros_like(s)
        w = (q - z.repeat_interleave(G, 1)) * s.repeat_interleave(G, 1)
        if base in modules:
            with torch.no_grad():
                applied = modules[base](torch.eye(shape[1])).T  # the weight transformers' forward applies
        else:  # an expert: transformers fuses them into experts.gate_up_proj [E, 2I, D] / down_proj [E, D, I]
            parent, rest = base.split(".experts.")
            e, proj = rest.split(".")
            experts = modules[parent + ".experts"]
            inter = experts.down_proj.shape[-1]
            applied = {"gate_proj": experts.gate_up_proj[int(e), :inter], "up_proj": experts.gate_up_proj[int(e), inter:],
                       "down_proj": experts.down_proj[int(e)]}[proj]
        worst = max(worst, (applied.float() - w).abs().max().item())
    print("transformers vs exact fp32 dequant, max abs diff:", worst, flush=True)


@torch.no_grad()
def write_expected(model, out: Path, oracle: str) -> None:
    logits = model(input_ids=torch.tensor([PROMPT])).logits[0].float()
    ids = list(PROMPT)
    tokens = []
    for _ in range(STEPS):  # greedy by full recompute: no cache implementation involved
        tok = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        tokens.append(tok)
        ids.append(tok)
    (out / "oracle").mkdir(exist_ok=True)
    save_file({"prompt": torch.tensor(PROMPT), "logits": logits.contiguous(), "greedy": torch.tensor(tokens)},
              out / "oracle" / "expected.safetensors", metadata={"oracle": oracle})


def slim(d: Path) -> None:
    """Only what the loader reads."""
    for p in d.iterdir():
        if p.name not in ("config.json", "oracle") and not p.name.endswith(".safetensors"):
            p.unlink() if p.is_file() else shutil.rmtree(p)


def main(only: set[str]) -> None:
    work = Path(tempfile.mkdtemp())
    for moe in (False, True):
        kind = "moe" if moe else "dense"
        src = work / f"bf16_{kind}"
        write_bf16(moe, src, seed=11 if moe else 7)
        jobs = {}
        for scheme, tag in (("W4A16", "ct_w4a16"), ("W4A16_ASYM", "ct_w4a16_asym"), ("FP8_BLOCK", "ct_fp8_block")):
            jobs[f"{tag}_{kind}"] = ("ct", scheme)
        jobs[f"qwen_fp8_{kind}"] = ("qwen_fp8", None)
        jobs[f"gptq_{kind}"] = ("ar", "auto_gptq")
        jobs[f"awq_{kind}"] = ("ar", "auto_awq")
        if moe:
            jobs["awq_mixed_moe"] = ("ar_mixed", "auto_awq")
        for name, (how, arg) in jobs.items():
            if only and name not in only:
                continue
            out = HERE / name
            shutil.rmtree(out, ignore_errors=True)
            print("writing", name, flush=True)
            if how == "ct":
                model_free(src, out, arg)
                if arg.startswith("W4A16") and not moe:
                    model = hf_quantized(out)
                    check_exact(model, out)
                    oracle = "transformers 5.17.0 + compressed-tensors 0.19.0 decompression"
                else:
                    # transformers 5.17 decompresses MoE experts in low precision or fails (asym, FP8 block),
                    # and runs FP8_BLOCK with fake-quantized activations: dequantize independently instead.
                    deq = dequant_ct_int4 if arg.startswith("W4A16") else (lambda t, n: dequant_fp8(t, n, "weight_scale"))
                    model = hf_from_state(src, dequantized_checkpoint(out, deq))
                    oracle = "transformers fp32 model over weights dequantized by compressed_tensors' unpacker (A.0)"
            elif how == "qwen_fp8":
                ct = work / f"ct_fp8_{kind}"
                if not ct.exists():
                    model_free(src, ct, "FP8_BLOCK")
                to_qwen_fp8(ct, out)
                for f in ("generation_config.json",):
                    if (src / f).exists():
                        shutil.copy(src / f, out / f)
                model = hf_quantized(out, fp8=True)
                oracle = "transformers 5.17.0 FineGrainedFP8Config(dequantize=True)"
            else:
                layer_config = None
                if how == "ar_mixed":
                    layer_config = {}
                    for i in range(3):
                        for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                  "linear_attn.in_proj_qkv", "linear_attn.in_proj_z"):
                            layer_config[f"model.layers.{i}.{p}"] = {"bits": 16}
                    layer_config["model.layers.1"] = {"bits": 16}
                auto_round(src, out, arg, layer_config)
                deq = (lambda t, n: dequant_gptq(t, n, 128)) if arg == "auto_gptq" else \
                      (lambda t, n: dequant_awq(t, n, 128))
                model = hf_from_state(src, dequantized_checkpoint(out, deq))
                oracle = "transformers 5.24/5.17 fp32 model over weights dequantized by make_fixtures.py (A.0)"
            slim(out)
            write_expected(model, out, oracle)


if __name__ == "__main__":
    main(set(sys.argv[1:]))
