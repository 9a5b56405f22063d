"""Checkpoint loading: safetensors files (sharded or single) -> the model's parameters, or deterministic dummy weights.

The loader handles files only. Which checkpoint tensors exist, what shape each must have and where it goes is declared
by the modules that own the parameters (`weight_layout`, see layers/weights.py). Names and shapes are all checked from
the file headers before a byte of weights is read: a missing tensor, an unexpected one or a shape mismatch fails fast
with the names involved. Each tensor is then mapped from its file and handed to its module (one tensor mapped at a
time, then unmapped), so peak host memory stays near the size of the weights.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import re
import struct
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from deltaserve.config import ModelConfig, QuantizationConfig, RankShapes
from deltaserve.layers.quant import (QuantizationError, QuantResolver, describe_summary, quantize_model,
                                     weight_bytes)
from deltaserve.layers.weights import WeightSlot, init_dummy, layout_of
from deltaserve.models.qwen3_5 import Qwen3_5ForCausalLM

log = logging.getLogger(__name__)

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
# Checkpoint prefixes of the text decoder (nested ConditionalGeneration or flat CausalLM form) -> ours.
TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
VISION_PREFIXES = ("model.visual.", "visual.", "model.vision_tower.")  # never read: the vision tower is not served
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit for the JSON header
PROGRESS_MIN_BYTES = 1 << 30  # below ~1 GiB loading takes a few seconds at most: no progress bar
LOAD_FORMATS = ("auto", "safetensors", "dummy")


class CheckpointError(ValueError):
    """The checkpoint does not match the model, or a file is not a valid safetensors file; the message names it."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in a safetensors file (from its header)."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


# ---- reading safetensors files -------------------------------------------------------------------------------------

def read_header(path: Path) -> list[TensorEntry]:
    """The tensors a safetensors file holds; CheckpointError naming the file when it is truncated or corrupt."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) != 8:
            raise CheckpointError(f"{path} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw_len)
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"{path} is not a valid safetensors file (header length {n} bytes, file size "
                                  f"{size} bytes): the file is truncated or corrupt")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} has a corrupt safetensors header: {e}") from e
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"tensor '{name}' in {path.name} has unsupported dtype {info.get('dtype')}")
        begin, end = info["data_offsets"]
        entry = TensorEntry(name, path, SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]), 8 + n + begin,
                            8 + n + end)
        if entry.end > size or entry.end - entry.begin != math.prod(entry.shape) * entry.dtype.itemsize:
            raise CheckpointError(f"{path} is truncated or corrupt: tensor '{name}' should occupy bytes "
                                  f"[{entry.begin}, {entry.end}) of a {size}-byte file")
        entries.append(entry)
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


def read_entry(entry: TensorEntry) -> torch.Tensor:
    """The tensor, mapped from its file (copy-on-write, only its own bytes); unmapped once the tensor is dropped."""
    if entry.end == entry.begin:
        return torch.empty(entry.shape, dtype=entry.dtype)
    start = entry.begin - entry.begin % mmap.ALLOCATIONGRANULARITY
    with open(entry.file, "rb") as f:
        mm = mmap.mmap(f.fileno(), entry.end - start, offset=start, access=mmap.ACCESS_COPY)
    count = math.prod(entry.shape)
    return torch.frombuffer(mm, dtype=entry.dtype, count=count, offset=entry.begin - start).view(entry.shape)


class EntrySource:
    """A TensorSource over one file entry: reads map just the bytes they need (a narrow along dim 0 maps only its
    rows)."""

    def __init__(self, entry: TensorEntry, name: str) -> None:
        self.entry, self.name, self.shape = entry, name, entry.shape

    def read(self) -> torch.Tensor:
        return read_entry(self.entry)

    def narrow(self, dim: int, start: int, length: int) -> EntrySource | _NarrowedSource:
        if dim != 0:
            return _NarrowedSource(self, dim, start, length)
        row = math.prod(self.shape[1:]) * self.entry.dtype.itemsize
        entry = replace(self.entry, shape=(length, *self.shape[1:]), begin=self.entry.begin + start * row,
                        end=self.entry.begin + (start + length) * row)
        return EntrySource(entry, self.name)


class _NarrowedSource:
    def __init__(self, base: EntrySource, dim: int, start: int, length: int) -> None:
        self.base, self.dim, self.start, self.length = base, dim, start, length
        self.name = base.name
        self.shape = tuple(length if d == dim else s for d, s in enumerate(base.shape))

    def read(self) -> torch.Tensor:
        return self.base.read().narrow(self.dim, self.start, self.length)

    def narrow(self, dim: int, start: int, length: int) -> _NarrowedSource:
        raise NotImplementedError("narrowing a tensor twice along different dims")


# ---- matching the checkpoint to the model --------------------------------------------------------------------------

def text_model_name(name: str) -> str | None:
    """Checkpoint name -> our module path; None for tensors deliberately skipped (the vision tower)."""
    if name.startswith(VISION_PREFIXES):
        return None
    for prefix in TEXT_PREFIXES:
        if name.startswith(prefix):
            return "model." + name[len(prefix):]
    return name  # lm_head.weight, mtp.*


def model_layout(model: torch.nn.Module, present: set[str]) -> dict[str, WeightSlot]:
    """Every checkpoint tensor the model's modules load, by checkpoint name (each module declares its own)."""
    layout: dict[str, WeightSlot] = {}
    for path, module in model.named_modules():
        for name, slot in layout_of(module, f"{path}." if path else "", present).items():
            if name in layout:
                raise RuntimeError(f"two modules claim checkpoint tensor {name!r}")  # a bug in a layout
            layout[name] = slot
    return layout


def named_entries(entries: list[TensorEntry], with_mtp: bool) -> dict[str, list[TensorEntry]]:
    """The checkpoint's tensors the text model may load, under our names (several entries: a duplicated tensor)."""
    named: dict[str, list[TensorEntry]] = {}
    for entry in entries:
        name = text_model_name(entry.name)
        if name is None or (name.startswith("mtp.") and not with_mtp):
            continue  # the vision tower; the MTP head when speculative decoding does not use it
        named.setdefault(name, []).append(entry)
    return named


def plan_load(entries: list[TensorEntry], model: Qwen3_5ForCausalLM,
              config: ModelConfig) -> list[tuple[TensorEntry, str, WeightSlot]]:
    """Match every checkpoint tensor to the slot that loads it; raise listing every problem."""
    named = named_entries(entries, model.mtp is not None)
    problems: list[str] = []
    try:
        layout = model_layout(model, set(named))
    except ValueError as e:
        raise CheckpointError(f"checkpoint in {config.model_dir} does not match the {config.architecture} config:"
                              f"\n{e}") from None
    plan = []
    for name, found in named.items():
        slot = layout.get(name)
        if slot is None:
            continue
        if len(found) > 1:
            problems.append(f"tensor given more than once: {name} (in {sorted({e.file.name for e in found})})")
        elif found[0].shape != slot.shape:
            problems.append(f"shape mismatch: {found[0].name}: expected {list(slot.shape)}, found "
                            f"{list(found[0].shape)}")
        else:
            plan.append((found[0], name, slot))
    unexpected = [e.name for n, es in named.items() if n not in layout for e in es]
    unexpected = _without_static_kv_scales(unexpected)
    missing = [n for n, slot in layout.items() if n not in named and not slot.optional]
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s) that this model has no parameter for:\n  "
                        + "\n  ".join(unexpected[:50]) + ("\n  ..." if len(unexpected) > 50 else ""))
        hint = _unquantized_config_hint(config, unexpected)
        if hint:
            problems.append(hint)
        if config.tie_word_embeddings and any(n.startswith("lm_head.") for n in unexpected):
            problems.append("the config ties the lm_head to the embedding (tie_word_embeddings true), so the "
                            "checkpoint's lm_head.* tensors have no module to load them; a checkpoint with its own "
                            "(e.g. quantized) lm_head needs tie_word_embeddings false")
    if missing:
        problems.append(f"{len(missing)} missing tensor(s):\n  " + "\n  ".join(missing[:50]))
    if problems:
        raise CheckpointError(f"checkpoint in {config.model_dir} does not match the {config.architecture} config:\n"
                              + "\n".join(problems))
    return plan


# Tensor suffixes only quantized checkpoints hold (GPTQ / AWQ, compressed-tensors, FP8).
_QUANTIZED_SUFFIXES = (".qweight", ".qzeros", ".weight_packed", ".weight_scale_inv", ".weight_scale")
# Files quantizers write beside config.json (AutoGPTQ / GPTQModel, auto-round).
_QUANT_SIDE_FILES = ("quantize_config.json", "quantization_config.json")


def _unquantized_config_hint(config: ModelConfig, unexpected: list[str]) -> str | None:
    """Why quantized tensors are unexpected, when they are: the config has no quantization_config."""
    found = sorted({s for n in unexpected for s in _QUANTIZED_SUFFIXES if n.endswith(s)})
    if config.quantization_config or not found:
        return None
    side = [f for f in _QUANT_SIDE_FILES if config.model_dir is not None and (Path(config.model_dir) / f).is_file()]
    where = (f"; {side[0]} beside it holds one: copy its fields into config.json as \"quantization_config\""
             if side else "; add the quantizer's quantization_config to config.json")
    return (f"the unexpected tensors include quantized weights ({', '.join(found)}), but config.json has no "
            f"quantization_config, so the model was built unquantized{where}")


# Static KV-cache scales a checkpoint may carry (compressed-tensors kv_cache_scheme, ModelOpt / AutoFP8 exports):
# one calibrated scale per layer for an fp8 KV cache. The engine's quantized KV cache computes a scale per token and
# head as it writes (--kv-cache-dtype), so it has no use for them.
_STATIC_KV_SCALE = re.compile(r".*\.self_attn\.((k|v|q|prob)_scale|[kv]_proj\.(output_scale|[kv]_scale))$")


def _without_static_kv_scales(names: list[str]) -> list[str]:
    """`names` less the static KV scales, which are skipped with one log line (they are not weights of this model,
    and refusing them would refuse checkpoints whose weights load fine)."""
    scales = [n for n in names if _STATIC_KV_SCALE.match(n)]
    if scales:
        log.info("skipping %d static KV-cache scale tensor(s) (e.g. %s): --kv-cache-dtype fp8 / int8 / int4 computes "
                 "a scale per token and head when the KV is written", len(scales), scales[0])
    return [n for n in names if not _STATIC_KV_SCALE.match(n)]


def load_weights(model: Qwen3_5ForCausalLM, entries: list[TensorEntry]) -> None:
    plan = plan_load(entries, model, model.config)
    total = sum(e.end - e.begin for e, _, _ in plan)
    with torch.no_grad(), tqdm(total=total, unit="B", unit_scale=True, desc="Loading weights",
                               disable=total < PROGRESS_MIN_BYTES) as bar:
        for entry, name, slot in plan:
            try:
                slot.load(EntrySource(entry, name))
            except ValueError as e:
                raise CheckpointError(f"checkpoint in {model.config.model_dir}: {e}") from None
            bar.update(entry.end - entry.begin)
        for module in model.modules():
            try:
                getattr(module, "finish_loading", lambda: None)()
            except ValueError as e:
                raise CheckpointError(f"checkpoint in {model.config.model_dir}: {e}") from None


def checkpoint_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under checkpoint names, as its modules would load them (merged projections split back
    into theirs, fused experts fused): what load_model reads, e.g. to save a dummy-weight model as a checkpoint.
    Tensors own their storage (savers may refuse views)."""
    return {n: slot.save().clone() for n, slot in model_layout(model, set()).items() if slot.save is not None}


def init_dummy_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """Deterministic random weights of realistic scale, generated on each parameter's device (each module knows the
    ranges of its own parameters)."""
    with torch.no_grad():
        for path, module in model.named_modules():
            init_dummy(module, f"{path}." if path else "", seed)


# ---- building the model ---------------------------------------------------------------------------------------------

def _build_quantized(config: ModelConfig, quantization: QuantizationConfig, entries: list[TensorEntry], *,
                     dtype: torch.dtype, device: torch.device | str, with_mtp: bool, shapes: RankShapes | None,
                     dummy: bool) -> Qwen3_5ForCausalLM:
    """Built on the meta device, then each linear layer and experts block takes the method of its checkpoint format
    (layers/quant.py) and only then gets its storage, so no bf16 copy of a quantized weight is ever allocated."""
    named = named_entries(entries, with_mtp)
    present = None if dummy else set(named)
    try:
        resolver = QuantResolver(quantization.method, quantization.raw, present, quantization.fp8_activations,
                                 read=lambda name: read_entry(named[name][0]))
        model = Qwen3_5ForCausalLM(config, dtype=dtype, device="meta", with_mtp=with_mtp, shapes=shapes)
        summary = quantize_model(model, resolver, dtype=dtype, device=device)
    except QuantizationError as e:
        raise CheckpointError(f"quantized checkpoint in {config.model_dir}: {e}") from None
    log.info("%s; %.2f GiB of weights", describe_summary(quantization.method, summary), weight_bytes(model) / 2**30)
    if not dummy:
        _warn_unmatched_exclusions(resolver, model, entries)
    return model


def _warn_unmatched_exclusions(resolver: QuantResolver, model: torch.nn.Module, entries: list[TensorEntry]) -> None:
    """quantization_config entries that leave modules unquantized but name no module of the model or the checkpoint
    (vision tower and MTP head included) exclude nothing: a typo, most likely. Not an error: the tensors decide
    which modules are quantized, and a module that holds quantized tensors but is excluded is refused anyway."""
    paths = {path for path, _ in model.named_modules()}
    paths |= {(text_model_name(e.name) or e.name).rpartition(".")[0] for e in entries}
    unmatched = resolver.skip.unmatched(paths)
    if unmatched:
        log.warning("quantization_config entries that match no module of the model or the checkpoint (a typo?): %s",
                    ", ".join(unmatched))


def _untie_distinct_lm_head(config: ModelConfig, entries: list[TensorEntry]) -> ModelConfig:
    """A config that ties the lm_head to the embedding, over a checkpoint that carries an lm_head.weight with other
    values: transformers then does not tie them and computes logits with that lm_head, so deltaserve does the same
    (a redundant copy equal to the embedding stays unread, the lm_head tied)."""
    if not config.tie_word_embeddings:
        return config
    named = {text_model_name(e.name): e for e in entries}
    head, embed = named.get("lm_head.weight"), named.get("model.embed_tokens.weight")
    if head is None or embed is None or _same_values(read_entry(head), read_entry(embed)):
        return config
    log.warning("the config ties the lm_head to the embedding (tie_word_embeddings true) but the checkpoint's "
                "lm_head.weight differs from its embedding: using the lm_head, as transformers does; set "
                "tie_word_embeddings false in config.json to silence this")
    return replace(config, tie_word_embeddings=False)


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two full-precision tensors hold the same values (an fp16 copy of a bf16 embedding does); a quantized
    one (FP8 or integer codes, which torch cannot compare with floats) never equals the embedding."""
    if any(not t.is_floating_point() or t.element_size() == 1 for t in (a, b)):
        return False
    return a.shape == b.shape and torch.equal(a, b.to(a.dtype))


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype {name!r} is not a torch dtype; use bfloat16, float16 or float32")
    return dtype


def load_model(config: ModelConfig, *, dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu",
               load_format: str = "auto", with_mtp: bool = False, shapes: RankShapes | None = None,
               quantization: QuantizationConfig | None = None) -> Qwen3_5ForCausalLM:
    """Build the model on `device` and fill it from `config.model_dir` (load_format "auto"/"safetensors"), or with
    deterministic random weights ("dummy", for benchmarks at real shapes). dtype defaults to the checkpoint's. The
    MTP head is built and loaded only with with_mtp (a checkpoint without mtp.* tensors is then an error)."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format {load_format!r} is not supported; use one of {LOAD_FORMATS}")
    quantization = quantization or QuantizationConfig.from_model(config)
    dtype = _dtype(dtype) if isinstance(dtype, str) else (dtype or _dtype(config.dtype))
    entries: list[TensorEntry] = []
    if load_format != "dummy":
        if config.model_dir is None:
            raise ValueError("config has no model_dir to load weights from; use load_format='dummy' or from_hf(dir)")
        entries = [e for f in checkpoint_files(Path(config.model_dir)) for e in read_header(f)]
        if with_mtp and not any(e.name.startswith("mtp.") for e in entries):
            raise CheckpointError(f"'speculative_tokens' asks for the MTP head (speculative decoding), but the "
                                  f"checkpoint in {config.model_dir} has no mtp.* tensors; use a checkpoint that ships "
                                  "them, or leave speculative_tokens at 0")
    config = _untie_distinct_lm_head(config, entries)
    if quantization is None:
        model = Qwen3_5ForCausalLM(config, dtype=dtype, device=device, with_mtp=with_mtp, shapes=shapes)
    else:
        model = _build_quantized(config, quantization, entries, dtype=dtype, device=device, with_mtp=with_mtp,
                                 shapes=shapes, dummy=load_format == "dummy")
    if load_format == "dummy":
        init_dummy_weights(model)
    else:
        load_weights(model, entries)
    return model.eval()
