"""Checkpoint loading: safetensors (sharded or single file) -> the model's parameters, or deterministic dummy weights.

Each tensor is mapped from the file straight into its final parameter (one tensor mapped at a time, then unmapped), so
peak host memory stays near the size of the weights. Names and shapes are all checked from the file headers before a
byte of weights is read: a missing tensor, an unexpected one or a shape mismatch fails fast with the names involved.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from deltaserve.config import ModelConfig
from deltaserve.models.qwen3_5 import Qwen3_5ForCausalLM

log = logging.getLogger(__name__)

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
SKIPPED_PREFIXES = ("model.visual.", "visual.", "model.vision_tower.")
FP32_PARAMS = ("linear_attn.A_log", "linear_attn.norm.weight")
PROGRESS_MIN_BYTES = 1 << 30  # below ~1 GiB loading takes a few seconds at most: no progress bar
_PER_EXPERT = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<e>\d+)\.(?P<proj>gate|up|down)_proj\.weight$")


class CheckpointError(ValueError):
    """The checkpoint does not match the model: the message lists the tensors involved."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in a safetensors file (from its header)."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


@dataclass(frozen=True)
class Target:
    """Where a checkpoint tensor goes: a parameter, a view of it, and how much of the parameter it covers."""

    param_name: str
    view: Callable[[torch.Tensor], torch.Tensor]
    units: int


# ---- reading safetensors headers ----------------------------------------------------------------------------------

def read_header(path: Path) -> list[TensorEntry]:
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) != 8:
            raise CheckpointError(f"{path} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw_len)
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} has a corrupt safetensors header: {e}") from e
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"tensor '{name}' in {path.name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        entries.append(TensorEntry(name, path, SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]),
                                   8 + n + begin, 8 + n + end))
    return entries


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({model_dir / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index.name} lists shard files that are not in {model_dir}: {missing}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {model_dir}; deltaserve loads Hugging Face safetensors "
                              "checkpoints (convert .bin/.pt checkpoints with transformers' save_pretrained)")
    return files


def read_into(entry: TensorEntry, dest: torch.Tensor) -> None:
    """Map just this tensor's bytes and copy them into `dest` (converting dtype/device); unmap right after."""
    if entry.end == entry.begin:
        return
    start = entry.begin - entry.begin % mmap.ALLOCATIONGRANULARITY
    with open(entry.file, "rb") as f:
        mm = mmap.mmap(f.fileno(), entry.end - start, offset=start, access=mmap.ACCESS_COPY)
    try:
        count = math.prod(entry.shape)
        src = torch.frombuffer(mm, dtype=entry.dtype, count=count, offset=entry.begin - start).view(entry.shape)
        dest.copy_(src)
        del src
    finally:
        mm.close()


# ---- name mapping --------------------------------------------------------------------------------------------------

def normalize_name(name: str) -> str | None:
    """Checkpoint name -> our parameter name; None for tensors we deliberately skip (vision tower)."""
    if name.startswith(SKIPPED_PREFIXES):
        return None
    for prefix in ("model.language_model.", "language_model.model.", "model."):
        if name.startswith(prefix):
            return "model." + name[len(prefix):]
    return name  # lm_head.weight, mtp.*


def merged_shards(model: torch.nn.Module) -> dict[str, tuple[str, slice]]:
    """Checkpoint name of each projection that the model stores merged (layers.linear.MergedLinear) -> (the merged
    parameter's name, its rows there)."""
    from deltaserve.layers.linear import MergedLinear

    out = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, MergedLinear):
            parent = mod_name.rpartition(".")[0]
            for shard, rows in mod.shard_rows().items():
                out[f"{parent}.{shard}.weight" if parent else f"{shard}.weight"] = (f"{mod_name}.weight", rows)
    return out


def checkpoint_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under checkpoint names (merged projections split back into theirs): what load_model
    reads, e.g. to save a dummy-weight model as a checkpoint."""
    state = model.state_dict()
    shards = merged_shards(model)
    merged = {m for m, _ in shards.values()}
    out = {n: t for n, t in state.items() if n not in merged}
    out.update({n: state[m][rows].clone() for n, (m, rows) in shards.items()})  # own storage: savers may refuse views
    return out


def resolve_target(name: str, params: dict[str, torch.nn.Parameter],
                   shards: dict[str, tuple[str, slice]] | None = None) -> Target | None:
    if name in params:
        p = params[name]
        units = 2 * p.shape[0] if name.endswith("experts.gate_up_proj") else (
            p.shape[0] if name.endswith("experts.down_proj") else 1)
        return Target(name, lambda t: t, units)
    if shards and name in shards:
        merged, rows = shards[name]
        return Target(merged, lambda t: t[rows], 1)
    m = _PER_EXPERT.match(name)
    if m is None:
        return None
    e, proj = int(m["e"]), m["proj"]
    if proj == "down":
        return Target(f"{m['prefix']}.down_proj", lambda t: t[e], 1)
    fused = f"{m['prefix']}.gate_up_proj"
    if fused not in params:
        return None
    half = params[fused].shape[1] // 2
    rows = slice(0, half) if proj == "gate" else slice(half, 2 * half)
    return Target(fused, lambda t: t[e, rows], 1)


def required_units(name: str, p: torch.Tensor, shard_counts: dict[str, int] | None = None) -> int:
    if shard_counts and name in shard_counts:
        return shard_counts[name]
    if name.endswith("experts.gate_up_proj"):
        return 2 * p.shape[0]
    if name.endswith("experts.down_proj"):
        return p.shape[0]
    return 1


# ---- planning and loading ------------------------------------------------------------------------------------------

def plan_load(entries: list[TensorEntry], params: dict[str, torch.nn.Parameter], config: ModelConfig,
              shards: dict[str, tuple[str, slice]] | None = None) -> list[tuple[TensorEntry, Target]]:
    """Match every checkpoint tensor to its parameter (or its rows of a merged one); raise listing every problem."""
    shards = shards or {}
    plan: list[tuple[TensorEntry, Target]] = []
    unexpected, mismatched = [], []
    covered: dict[str, int] = {}
    seen: dict[str, int] = {}
    for entry in entries:
        name = normalize_name(entry.name)
        if name is None or (name == "lm_head.weight" and config.tie_word_embeddings):
            continue  # vision tower, or a redundant copy of the tied embedding
        target = resolve_target(name, params, shards)
        if target is None:
            unexpected.append(entry.name)
            continue
        expected = tuple(target.view(params[target.param_name]).shape)
        if expected != entry.shape:
            mismatched.append(f"{entry.name}: expected {list(expected)}, found {list(entry.shape)}")
            continue
        covered[target.param_name] = covered.get(target.param_name, 0) + target.units
        seen[name] = seen.get(name, 0) + 1
        plan.append((entry, target))
    shard_counts: dict[str, int] = {}
    for merged, _ in shards.values():
        shard_counts[merged] = shard_counts.get(merged, 0) + 1
    # A merged parameter short of a shard is reported by the checkpoint name of the shard that is missing.
    missing = [n for n, (merged, _) in shards.items() if n not in seen and merged in params]
    missing += [n for n, p in params.items()
                if n not in shard_counts and covered.get(n, 0) < required_units(n, p)]
    duplicated = [n for n, count in seen.items() if count > 1 and n in shards]  # a merged shard given twice
    duplicated += [n for n, p in params.items()
                   if n not in shard_counts and covered.get(n, 0) > required_units(n, p)]
    problems = []
    if mismatched:
        problems.append("shape mismatch:\n  " + "\n  ".join(mismatched))
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s) that this model has no parameter for:\n  "
                        + "\n  ".join(unexpected[:50]) + ("\n  ..." if len(unexpected) > 50 else ""))
    if missing:
        problems.append(f"{len(missing)} missing tensor(s):\n  " + "\n  ".join(missing[:50]))
    if duplicated:
        problems.append("tensors given more than once (fused and per-expert forms mixed?):\n  " + "\n  ".join(duplicated))
    if problems:
        raise CheckpointError(f"checkpoint in {config.model_dir} does not match the {config.architecture} config:\n"
                              + "\n".join(problems))
    return plan


def load_weights(model: Qwen3_5ForCausalLM, entries: list[TensorEntry]) -> None:
    params = dict(model.named_parameters())
    plan = plan_load(entries, params, model.config, merged_shards(model))
    total = sum(e.end - e.begin for e, _ in plan)
    with torch.no_grad(), tqdm(total=total, unit="B", unit_scale=True, desc="Loading weights",
                               disable=total < PROGRESS_MIN_BYTES) as bar:
        for entry, target in plan:
            read_into(entry, target.view(params[target.param_name]))
            bar.update(entry.end - entry.begin)


def init_dummy_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """Deterministic random weights of realistic scale, generated directly on each parameter's device."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = torch.Generator(device=p.device).manual_seed(seed + zlib.crc32(name.encode()))
            if name.endswith("A_log"):
                p.uniform_(1.0, 16.0, generator=g).log_()
            elif name.endswith("dt_bias"):
                p.uniform_(0.0, 1.0, generator=g)
            elif name.endswith("linear_attn.norm.weight"):
                p.normal_(1.0, 0.02, generator=g)
            elif p.dim() == 1:  # zero-centred RMSNorm weights are stored near 0
                p.normal_(0.0, 0.02, generator=g)
            elif name.endswith("embed_tokens.weight"):
                p.normal_(0.0, 0.02, generator=g)
            else:  # [.., out, in] projections: keep activations O(1)
                p.normal_(0.0, p.shape[-1] ** -0.5, generator=g)


def _dtype(name: str) -> torch.dtype:
    try:
        dtype = getattr(torch, name)
    except AttributeError:
        dtype = None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype {name!r} is not a torch dtype; use bfloat16, float16 or float32")
    return dtype


def load_model(config: ModelConfig, *, dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu",
               load_format: str = "auto", with_mtp: bool | None = None) -> Qwen3_5ForCausalLM:
    """Build the model on `device` and fill it from `config.model_dir` (load_format "auto"/"safetensors"), or with
    deterministic random weights ("dummy", for benchmarks at real shapes). dtype defaults to the checkpoint's."""
    if load_format not in ("auto", "safetensors", "dummy"):
        raise ValueError(f"load_format {load_format!r} is not supported; use 'auto', 'safetensors' or 'dummy'")
    if config.quantization_config and load_format != "dummy":
        method = config.quantization_config.get("quant_method", "?")
        raise CheckpointError(f"quantized checkpoints (quant_method {method!r}) are not supported yet; "
                              "use the bf16 release of the model")
    dtype = _dtype(dtype) if isinstance(dtype, str) else (dtype or _dtype(config.dtype))
    entries: list[TensorEntry] = []
    if load_format != "dummy":
        if config.model_dir is None:
            raise ValueError("config has no model_dir to load weights from; use load_format='dummy' or from_hf(dir)")
        entries = [e for f in checkpoint_files(Path(config.model_dir)) for e in read_header(f)]
        has_mtp = any(e.name.startswith("mtp.") for e in entries)
        if with_mtp is None:
            if config.mtp_num_hidden_layers and not has_mtp:
                log.warning("config.json declares an MTP head but the checkpoint has no mtp.* tensors; "
                            "loading without it (MTP speculative decoding unavailable)")
            with_mtp = bool(config.mtp_num_hidden_layers) and has_mtp
    model = Qwen3_5ForCausalLM(config, dtype=dtype, device=device, with_mtp=with_mtp)
    for name, p in model.named_parameters():
        if name.endswith(FP32_PARAMS):
            assert p.dtype == torch.float32, name
    if load_format == "dummy":
        init_dummy_weights(model)
    else:
        load_weights(model, entries)
    return model.eval()
