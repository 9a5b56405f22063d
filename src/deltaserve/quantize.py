"""`deltaserve quantize`: writes a bf16 Qwen3.5 checkpoint as FP8 (Qwen's official block-scaled layout) or int4
(GPTQ v1, the layout of Qwen's GPTQ-Int4 releases), by round-to-nearest: no calibration data, so int4 quality is
below a calibrated GPTQ / AWQ run; FP8 block scaling loses little.

Which projections are quantized follows the official releases (the quantization_config of Qwen's Qwen3.5-*-FP8 and
-GPTQ-Int4 checkpoints): FP8 quantizes every linear projection except the GDN in_proj_a/b, the MoE router and
shared-expert gate, the embedding, lm_head and mtp.fc; int4 quantizes only the MLP / routed experts (attention, GDN,
shared experts and MTP stay bf16). Routed experts are written per expert. Tensors not quantized are copied as they are.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from deltaserve.config import ModelConfig
from deltaserve.kernels.quant.ref import FP8_MAX, pack_int4

FP8_KEEP = (r".*linear_attn\.in_proj_[ab]$", r".*mlp\.gate$", r".*shared_expert_gate$", r".*embed_tokens$",
            r"^lm_head$", r"^mtp\.fc$", r".*visual.*", r".*conv1d$")
GPTQ_ONLY = r".*mlp\.(experts\.\d+\.)?(gate|up|down)_proj$"
# Modules int4 leaves in bf16, as GPTQ `dynamic` exclusions; only those matching a module of the source are written
# (an entry that matches nothing reads as a typo, and the loader warns of it).
GPTQ_EXCLUDED = (r".*attn.*", r".*shared_expert.*", r".*mtp.*", r".*visual.*")


def quantize_fp8_block(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> (e4m3 [N, K], bf16 multipliers [ceil(N/bn), ceil(K/bk)])."""
    bn, bk = block
    n, k = w.shape
    w = w.float()
    pad = torch.nn.functional.pad(w, (0, (-k) % bk, 0, (-n) % bn))
    blocks = pad.view(pad.shape[0] // bn, bn, pad.shape[1] // bk, bk)
    scale = (blocks.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=1e-12).to(torch.bfloat16)
    s = scale.float().repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    return (w / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def quantize_gptq(w: torch.Tensor, group_size: int = 128, desc_act: bool = False,
                  generator: torch.Generator | None = None,
                  order: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """[N, K] -> GPTQ v1 tensors (symmetric int4, zero 8 stored as 7): qweight [K/8, N], qzeros [K/G, N/8],
    scales fp16 [K/G, N], g_idx [K]. desc_act: columns are grouped in order of decreasing norm (GPTQ orders them by
    the Hessian diagonal; with no calibration data, the weight's own column norms stand in), or in `order` where
    given, so g_idx is a permutation of k // G."""
    n, k = w.shape
    if k % group_size or k % 8 or n % 8:
        fits = ", ".join(str(g) for g in (128, 64, 32, 16) if k % g == 0)
        raise ValueError(f"GPTQ int4 needs in_features ({k}) a multiple of the group size {group_size} and of 8, "
                         f"out_features ({n}) a multiple of 8" + (f"; use a --group-size dividing {k} ({fits})"
                                                                   if fits and n % 8 == 0 else ""))
    w = w.float()
    if order is None:
        order = torch.argsort(w.norm(dim=0), descending=True, stable=True) if desc_act else torch.arange(k)
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = (torch.arange(k) // group_size).to(torch.int32)
    groups = k // group_size
    amax = torch.zeros(groups, n).scatter_reduce(0, g_idx.long()[:, None].expand(k, n), w.abs().T, "amax")
    scales = (amax / 7.5).clamp(min=1e-8).to(torch.float16)
    s = scales.float()[g_idx.long()].T                                    # [N, K]
    codes = (torch.round(w / s) + 8).clamp(0, 15).to(torch.uint8)        # [N, K]
    return {"qweight": _pack_rows(codes.T.contiguous()),
            "qzeros": pack_int4(torch.full((groups, n), 7, dtype=torch.uint8)),
            "scales": scales, "g_idx": g_idx}


_GATE_UP = re.compile(r"(.*\.mlp\.(?:experts\.\d+\.|shared_expert\.)?)(gate|up)_proj\.weight$")


def _gate_up_order(name: str, tensors: dict[str, torch.Tensor], files: list[Path]) -> torch.Tensor | None:
    """An MLP's (or an expert's) gate_proj and up_proj read the same input, so GPTQ (one Hessian for both) gives them
    one act-order: here the decreasing norms of their stacked columns, gate rows first whichever is asked (one order
    lets them run as one GEMM; the MoE kernels need it). None for any other weight."""
    m = _GATE_UP.match(name)
    if m is None:
        return None
    pair = [_tensor(f"{m[1]}{p}_proj.weight", tensors, files) for p in ("gate", "up")]
    return torch.argsort(torch.cat(pair).float().norm(dim=0), descending=True, stable=True)


def _tensor(name: str, tensors: dict[str, torch.Tensor], files: list[Path]) -> torch.Tensor:
    """A weight of this file's tensors, or of whichever checkpoint file holds it."""
    if name in tensors:
        return tensors[name]
    for f in files:
        with safe_open(f, "pt") as handle:
            if name in handle.keys():
                return handle.get_tensor(name)
    raise ValueError(f"{name}: not in the checkpoint (its sibling projection is)")


def _pack_rows(codes_kn: torch.Tensor) -> torch.Tensor:
    """codes [K, N] -> int32 [K/8, N] packed along K (GPTQ's qweight)."""
    return pack_int4(codes_kn.T.contiguous()).T.contiguous()


def _split_fused_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in tensors.items():
        if name.endswith(".experts.gate_up_proj") and t.dim() == 3:
            base, inter = name[:-len("gate_up_proj")], t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{base}{e}.gate_proj.weight"] = t[e, :inter].contiguous()
                out[f"{base}{e}.up_proj.weight"] = t[e, inter:].contiguous()
        elif name.endswith(".experts.down_proj") and t.dim() == 3:
            base = name[:-len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{base}{e}.down_proj.weight"] = t[e].contiguous()
        else:
            out[name] = t
    return out


def _module_name(tensor_name: str) -> str:
    """Checkpoint tensor -> module path in the flat text form, for matching (model.language_model. -> model.)."""
    name = tensor_name[:-len(".weight")]
    return re.sub(r"^model\.language_model\.", "model.", name)


def _check_request(src: Path, out: Path, *, method: str, group_size: int | None, desc_act: bool) -> dict:
    """src's config.json, or a ValueError (ConfigError) before anything is written, for a request that cannot give a
    checkpoint deltaserve loads."""
    if method not in ("fp8", "int4"):
        raise ValueError(f"method {method!r}: use fp8 or int4")
    # FP8 is written with 128x128 block scales: an int4 option given with it would be silently ignored
    if method == "fp8" and (group_size is not None or desc_act):
        given = [f for f, on in (("--group-size", group_size is not None), ("--desc-act", desc_act)) if on]
        raise ValueError(f"{' and '.join(given)}: int4 options; --method fp8 writes 128x128 block scales and takes "
                         "neither (drop them, or use --method int4)")
    bad_size = isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0
    if method == "int4" and group_size is not None and bad_size:
        raise ValueError(f"--group-size {group_size!r}: int4 needs a positive group size dividing the MLP input sizes "
                         "(128 is Qwen's)")
    model = ModelConfig.from_hf(src)  # a Qwen3.5 checkpoint's config.json, or a ConfigError naming the problem
    if model.quantization_config:
        raise ValueError(f"{src} is already quantized; quantize the bf16 checkpoint")
    if not any(src.glob("*.safetensors")):
        raise ValueError(f"no *.safetensors files in {src}; quantize a Hugging Face safetensors checkpoint")
    # files already in `out` would be read with the new ones as one checkpoint (and `out` may be `src` itself)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty directory; write the quantized checkpoint into a new "
                         "one")
    return json.loads((src / "config.json").read_text())


def quantize_checkpoint(src: str | Path, out: str | Path, *, method: str, group_size: int | None = None,
                        desc_act: bool = False, block: tuple[int, int] = (128, 128)) -> Path:
    """Quantize the bf16 checkpoint in `src` into `out` ("fp8": Qwen FP8 block; "int4": GPTQ v1, group_size
    default 128), a directory that must not exist or be empty. On failure nothing is left in `out`."""
    src, out = Path(src), Path(out)
    config = _check_request(src, out, method=method, group_size=group_size, desc_act=desc_act)
    group_size = 128 if group_size is None else group_size
    out.mkdir(parents=True, exist_ok=True)
    try:
        _write(src, out, config, method=method, group_size=group_size, desc_act=desc_act, block=block)
    except BaseException:
        shutil.rmtree(out)  # empty before this call: only the partial checkpoint goes
        raise
    return out


def _write(src: Path, out: Path, config: dict, *, method: str, group_size: int, desc_act: bool,
           block: tuple[int, int]) -> None:
    files = sorted(src.glob("*.safetensors"))
    keep = [re.compile(p) for p in FP8_KEEP]
    skipped: list[str] = []
    weight_map: dict[str, str] = {}
    modules: set[str] = set()
    for f in files:
        tensors = _split_fused_experts(load_file(f))
        result: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            modules.add(re.sub(r"^model\.language_model\.", "model.", name.rpartition(".")[0]))
            is_linear = name.endswith(".weight") and t.dim() == 2 and "norm" not in name and "embed" not in name
            module = _module_name(name) if is_linear else ""
            if method == "fp8" and is_linear and not any(r.match(module) for r in keep):
                w8, s = quantize_fp8_block(t, block)
                result[name], result[name[:-len("weight")] + "weight_scale_inv"] = w8, s
            elif method == "int4" and is_linear and re.match(GPTQ_ONLY, module) and not module.startswith("mtp."):
                base = name[:-len(".weight")]
                try:
                    order = _gate_up_order(name, tensors, files) if desc_act else None
                    quantized = quantize_gptq(t, group_size, desc_act, order=order)
                except ValueError as e:
                    raise ValueError(f"{name} {list(t.shape)}: {e}") from None
                result.update({f"{base}.{suffix}": q for suffix, q in quantized.items()})
            else:
                # every module whose weight stays high precision, as Qwen's releases list them: conv1d ([C, 1, 4])
                # and embed_tokens too, which readers that build conv1d as a linear layer would take as FP8
                if name.endswith(".weight") and t.dim() >= 2:
                    skipped.append(name[:-len(".weight")])
                result[name] = t.contiguous()
        save_file(result, out / f.name, metadata={"format": "pt"})
        weight_map.update({n: f.name for n in result})
    if len(files) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}, indent=2))
    if method == "fp8":
        qc = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
              "weight_block_size": list(block), "modules_to_not_convert": sorted(skipped)}
    else:
        qc = {"quant_method": "gptq", "bits": 4, "group_size": group_size, "sym": True, "desc_act": desc_act,
              "lm_head": False, "checkpoint_format": "gptq",
              "dynamic": {"-:" + p: {} for p in GPTQ_EXCLUDED if any(re.match(p, m) for m in modules)}}
    config["quantization_config"] = qc
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for extra in src.iterdir():
        if extra.name == "README.md":
            _write_card(extra, out / extra.name, src, qc)
        elif extra.is_file() and extra.suffix != ".safetensors" and extra.name not in _NOT_COPIED:
            shutil.copy(extra, out / extra.name)


# The source's weights and config are rewritten above; measured figures (the demo model's metrics.json) are the bf16
# model's and do not hold for the quantized one.
_NOT_COPIED = ("config.json", "model.safetensors.index.json", "metrics.json")


def _write_card(card: Path, to: Path, src: Path, qc: dict) -> None:
    """The source's model card under a note saying it describes the bf16 model this one was quantized from."""
    method = "FP8 (128x128 block scales)" if qc["quant_method"] == "fp8" else f"GPTQ int4 g{qc['group_size']}"
    note = (f"> Quantized to {method} by `deltaserve quantize` (round to nearest, no calibration) from `{src.name}`. "
            "The card below is the source model's: its figures were measured before quantization.\n\n")
    to.write_text(note + card.read_text())


if __name__ == "__main__":
    import sys

    from deltaserve.cli import main

    sys.exit(main(["quantize", *sys.argv[1:]]))
