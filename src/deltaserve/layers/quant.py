"""Quantized checkpoints: which format each module's weights are in, and the linear / expert methods that load and
apply them.

A format is chosen per module (per shard of a merged projection, per experts block) from two things: the checkpoint's
`quantization_config` (method, bits, group or block size, and the modules it says are left unquantized) and the
tensors the checkpoint holds for that module (`qweight`, `weight_packed`, `weight_scale_inv`, ... or a plain `weight`).
The tensors decide whether a module is quantized, so layouts that keep some modules in full precision without naming
them (the mixed AWQ releases: bf16 QKV and GDN in-projections next to int4 out-projections) load as they are; the
config decides how, and a module it names as unquantized must not hold quantized tensors.

Every format is converted at load time into one of two internal layouts (kernels/quant/ref.py): int4 codes packed
along K with fp32 group scales and uint8 zero points, or e4m3 weights with an fp32 scale per row and K block. So the
kernels do not care whether a weight came from GPTQ, AWQ or compressed-tensors.

Checkpoint layouts (as GPTQ, AutoAWQ and compressed-tensors write them; auto-round's own format holds GPTQ v1 or
AutoAWQ GEMM tensors): GPTQ v1 qweight [K/8, N] (packed along K),
qzeros [K/G, N/8] stored as zero - 1 (a stored 15 reads as 16, as v1 readers do: _check_gptq_zeros), scales [K/G, N],
g_idx [K]; AutoAWQ GEMM qweight [K, N/8] and qzeros [K/G, N/8] packed along N in the nibble order 0,4,1,5,2,6,3,7;
compressed-tensors weight_packed [N, K/8] (codes + 8), weight_scale [N, K/G], weight_zero_point [N/8, K/G] (packed along
N), weight_shape, weight_g_idx; FP8 weight e4m3 [N, K] with weight_scale_inv (Qwen) or weight_scale (compressed-tensors)
[ceil(N/bn), ceil(K/bk)] block scales, [N, 1] per channel or [] / [1] per tensor, all multipliers.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Set
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from deltaserve.kernels._device import capability
from deltaserve.kernels.quant import (fp8_fused_moe, fp8_linear, fp8_linear_tail, int4_fused_moe, int4_linear,
                                      int4_linear_tail)
from deltaserve.kernels.quant.ref import ACT_GROUP, pack_int4, unpack_int4
from deltaserve.layers.linear import Linear, LinearMethod, MergedLinear, new_param, tp_shard
from deltaserve.layers.mlp import MLP
from deltaserve.layers.moe import Experts, ExpertsMethod, unquantized_mlp
from deltaserve.layers.weights import TensorSource, WeightSlot, seeded
from deltaserve.parallel.sharding import Shard, read_part

SUPPORTED_METHODS = ("fp8", "gptq", "awq", "compressed-tensors", "auto-round")
_AUTO_ROUND = ("auto-round", "intel/auto-round")  # auto-round's own format (older releases wrote the second name)
AWQ_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # AutoAWQ GEMM: column 8c + j of a word lives in nibble AWQ_ORDER[j]
# Checkpoint prefixes of the text decoder, mapped to our module paths (as models/loader.text_model_name does).
_TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
_FP8 = torch.float8_e4m3fn


class QuantizationError(ValueError):
    """The checkpoint's quantization cannot be loaded; the message names the module, the tensor and what was
    expected."""


@dataclass(frozen=True)
class WeightFormat:
    """How one module's weight is stored in the checkpoint.

    kind: "unquantized", "fp8" or "int4". checkpoint: "plain", "fp8" (Qwen, weight_scale_inv), "ct-fp8"
    (compressed-tensors float-quantized), "gptq", "awq" or "ct-int4" (compressed-tensors pack-quantized).
    group_size: int4 K-group, fp8 K-block (0: the whole row, i.e. per channel). block_n: rows per fp8 scale in the
    checkpoint (1: per channel). zero_offset: added to stored zero points (GPTQ v1 stores zero - 1). act_order: the
    checkpoint's g_idx permutes K (GPTQ desc_act, compressed-tensors actorder "group"; from the config alone for
    dummy weights). scale_dims: a per-tensor FP8 scale (one for the whole weight) and its rank in the checkpoint (0:
    a scalar, 1: [1]); -1 where the scales are per channel or block."""

    kind: str = "unquantized"
    checkpoint: str = "plain"
    group_size: int = 0
    block_n: int = 0
    zero_offset: int = 0
    symmetric: bool = True
    act_order: bool = False
    scale_name: str = ""
    act_fp8: bool = False  # run with dynamic FP8 activations (W8A8; fp8 weights only, --fp8-activations dynamic)
    scale_dims: int = -1

    @property
    def quantized(self) -> bool:
        return self.kind != "unquantized"

    def describe(self, dtype: torch.dtype | None = None) -> str:
        if self.kind == "fp8":
            act = " w8a8" if self.act_fp8 else ""
            if self.group_size == 0:
                return ("fp8 per-tensor" if self.scale_dims >= 0 else "fp8 per-channel") + act
            return f"fp8 block {self.block_n}x{self.group_size}" + act
        if self.kind == "int4":
            g = f"g{self.group_size}" if self.group_size else "per-channel"
            return f"int4 {g}" + ("" if self.symmetric else " asym") + (" act-order" if self.act_order else "")
        return str(dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace("float16", "fp16") \
            if dtype is not None else "unquantized"


UNQUANTIZED = WeightFormat()


def _our_name(name: str) -> str:
    for prefix in _TEXT_PREFIXES:
        if name.startswith(prefix):
            return "model." + name[len(prefix):]
    return name


def _name_forms(name: str) -> tuple[str, ...]:
    """Our module path and the nested checkpoint form of it, so regexes written for either match."""
    if name.startswith("model."):
        return name, "model.language_model." + name[len("model."):]
    return (name,)


class _ModuleSet:
    """The modules a quantization_config leaves unquantized (modules_to_not_convert, ignored_layers, ignore, GPTQ
    dynamic "-:" keys), entries matched against our module paths (the text decoder's checkpoint prefixes read as
    `model.`):

    - a name matches the module it names and every module inside it (`model.layers.3.mlp`, `lm_head`, `mtp.fc`);
    - a shorter name matches whole trailing components of a module's path or of an enclosing one (`mlp.gate`,
      `in_proj_a`, `layers.1.mlp`), never part of a component (`layers.1` is not `layers.10`, `attn` not
      `self_attn`), and reaches the MTP head (`mtp.*`) only when it names it: the lists are written against
      transformers' model, which has no MTP head, so `layers.1.mlp` is the decoder's layer 1, not `mtp.layers.1`;
    - a regex (compressed-tensors `re:`, GPTQ dynamic) matches from the start of the path, in our form or the
      nested checkpoint form (`model.language_model.`).

    Only whole-component matches are taken (vLLM's AWQ and GPTQ configs match any substring, transformers a prefix
    or a raw suffix): a stray match excludes a module the checkpoint may hold quantized, which is then refused.
    exact: names match only the module they name (compressed-tensors' `ignore`, whose writer and vLLM compare names
    with ==, so a parent's name leaves the projections inside it quantized).

    entries: (entry as written, the config key it came from); regexes likewise."""

    def __init__(self, names: list[tuple[str, str]] | None = None,
                 regexes: list[tuple[str, str]] | None = None, exact: bool = False) -> None:
        self.names = [(raw, key, _our_name(raw.rstrip("."))) for raw, key in names or []]
        self.regexes = [(raw, key, re.compile(raw)) for raw, key in regexes or []]
        self.exact = exact

    def _name_matches(self, n: str, name: str) -> bool:
        if self.exact:
            return n == name
        if n == name or name.startswith(n + "."):
            return True
        if name.startswith("mtp.") and "mtp" not in n.split("."):
            return False
        return f".{n}." in f".{name}."

    def __contains__(self, name: str) -> bool:
        return any(self._name_matches(n, name) for _, _, n in self.names) or \
            any(r.match(form) for _, _, r in self.regexes for form in _name_forms(name))

    def unmatched(self, paths: Set[str]) -> list[str]:
        """The entries that match none of `paths`, as `key entry` (each matches nothing: likely a typo)."""
        out = [f"{key} {raw!r}" for raw, key, n in self.names if not any(self._name_matches(n, p) for p in paths)]
        return out + [f"{key} {raw!r}" for raw, key, r in self.regexes
                      if not any(r.match(form) for p in paths for form in _name_forms(p))]


def _entries(raw: dict[str, Any], *keys: str) -> list[tuple[str, str]]:
    return [(n, key) for key in keys for n in _names(raw.get(key), f"quantization_config.{key}")]


def _names(value: Any, where: str) -> list[str]:
    """A list of module names (or targets) from the config; None for none."""
    if value is None:
        return []
    if not isinstance(value, (list, tuple)) or not all(isinstance(n, str) for n in value):
        raise QuantizationError(f"{where}: expected a list of module names, got {value!r}")
    return list(value)


def _regex(pattern: str, where: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise QuantizationError(f"{where}: not a valid regular expression ({e})") from None


def _group_size(value: Any, where: str) -> int:
    """A group size field: a positive number of input columns, or -1 (GPTQ, AutoAWQ) / None for one group per
    output channel (0 here)."""
    if value in (-1, None) and not isinstance(value, bool):
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise QuantizationError(f"{where} {value!r}: expected a positive group size, or -1 for one group per output "
                                "channel")
    return value


def _block_structure(value: Any, where: str) -> tuple[int, int]:
    """compressed-tensors block_structure: [block_n, block_k], or the older string form "128x128"."""
    if isinstance(value, str):
        parts = value.lower().split("x")
        value = [int(p) for p in parts] if all(p.isdigit() for p in parts) else value
    if not (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in value)):
        raise QuantizationError(f"{where} {value!r}: expected [block_n, block_k], e.g. [128, 128]")
    return value[0], value[1]


class QuantResolver:
    """Chooses each module's WeightFormat from the quantization_config and the checkpoint's tensor names (our module
    paths; None for dummy weights, when the config alone decides). read: a checkpoint tensor by name (ours), to
    tell an act-order g_idx from the trivial one that GPTQ writes with desc_act false too."""

    def __init__(self, method: str, raw: dict[str, Any], present: Set[str] | None,
                 fp8_activations: str = "off", read: Callable[[str], torch.Tensor] | None = None) -> None:
        self.method, self.raw, self.present, self.read = method, raw, present, read
        self.fp8_activations = fp8_activations
        if method not in SUPPORTED_METHODS + _AUTO_ROUND:
            raise QuantizationError(f"quantization_config.quant_method {method!r} is not supported; deltaserve loads "
                                    f"{', '.join(SUPPORTED_METHODS)} checkpoints")
        self.family = method  # the tensor layout: auto-round's is GPTQ's or AWQ's (_parse_auto_round)
        self.ct_groups: list[tuple[list[str], WeightFormat]] = []
        self.dynamic: list[tuple[bool, re.Pattern[str], dict[str, Any]]] = []  # GPTQ: ("-:" key, regex, override)
        getattr(self, "_parse_" + ("auto-round" if method in _AUTO_ROUND else method).replace("-", "_"))(raw)

    # ---- the config ---------------------------------------------------------------------------------------------

    def _parse_fp8(self, raw: dict[str, Any]) -> None:
        fmt = raw.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise QuantizationError(f"quantization_config.fmt {fmt!r}: only e4m3 FP8 weights are supported")
        scheme = raw.get("activation_scheme", "dynamic")
        if scheme != "dynamic":  # static: input_scale tensors, as compressed-tensors static schemes are refused
            raise QuantizationError(f"quantization_config.activation_scheme {scheme!r}: static activation scales "
                                    "(input_scale tensors) are not supported; FP8 checkpoints with activation_scheme "
                                    "'dynamic' are")
        block = raw.get("weight_block_size")
        if block is None:
            self.default = WeightFormat("fp8", "fp8", 0, 1, scale_name="weight_scale_inv")
        else:
            if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0
                                                                                 for b in block)):
                raise QuantizationError(f"quantization_config.weight_block_size {block!r}: expected [block_n, "
                                        "block_k], e.g. [128, 128]")
            self.default = WeightFormat("fp8", "fp8", block[1], block[0], scale_name="weight_scale_inv")
        self.skip = _ModuleSet(_entries(raw, "modules_to_not_convert", "ignored_layers"))

    def _int4_bits(self, bits: Any, where: str) -> None:
        if bits != 4:
            raise QuantizationError(f"{where} is {bits!r}: deltaserve loads 4-bit integer weights (bits 4) and FP8 "
                                    "(quant_method fp8 or compressed-tensors float 8-bit)")

    def _parse_gptq(self, raw: dict[str, Any]) -> None:
        self._int4_bits(raw.get("bits"), "quantization_config.bits")
        fmt = raw.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise QuantizationError(f"quantization_config.checkpoint_format {fmt!r}: expected gptq (v1) or gptq_v2")
        group = _group_size(raw.get("group_size", 128), "quantization_config.group_size")
        self.default = WeightFormat("int4", "gptq", group, 0,
                                    zero_offset=1 if fmt == "gptq" else 0, symmetric=bool(raw.get("sym", True)),
                                    act_order=bool(raw.get("desc_act", False)))
        dynamic = raw.get("dynamic") or {}
        if not isinstance(dynamic, dict) or not all(isinstance(o, dict) or o is None for o in dynamic.values()):
            raise QuantizationError(f"quantization_config.dynamic: expected an object of regex keys and override "
                                    f"objects, got {dynamic!r}")
        for key, override in dynamic.items():
            pattern = key[2:] if key.startswith(("-:", "+:")) else key
            regex = _regex(pattern, f"quantization_config.dynamic {key!r}")
            self.dynamic.append((key.startswith("-:"), regex, dict(override or {})))
        self.not_converted = _ModuleSet(_entries(raw, "modules_to_not_convert"))
        negative = [(k[2:], "dynamic '-:'") for k in dynamic if k.startswith("-:")]
        self.skip = _ModuleSet(_entries(raw, "modules_to_not_convert"), negative)  # all exclusions, for warnings

    def _parse_awq(self, raw: dict[str, Any]) -> None:
        self._int4_bits(raw.get("bits", raw.get("w_bit")), "quantization_config.bits")
        version = str(raw.get("version", "gemm")).lower()
        if version != "gemm":
            raise QuantizationError(f"quantization_config.version {version!r}: only AutoAWQ GEMM checkpoints "
                                    "(version 'gemm') are supported")
        key = "group_size" if "group_size" in raw else "q_group_size"
        group = _group_size(raw.get(key, 128), f"quantization_config.{key}")
        # zero_point false (auto-round's symmetric export: zero_point = not sym) still stores qzeros (8), which
        # AutoAWQ's and vLLM's kernels read: they are read here too
        self.default = WeightFormat("int4", "awq", group, symmetric=not raw.get("zero_point", True))
        self.skip = _ModuleSet(_entries(raw, "modules_to_not_convert"))

    def _parse_auto_round(self, raw: dict[str, Any]) -> None:
        """auto-round's own format, as vLLM's AutoRoundConfig reads it: GPTQ v1 tensors (packing_format
        auto_round:auto_gptq, the default) or AutoAWQ GEMM ones (auto_round:auto_awq) under one bits / group_size /
        sym, and extra_config mapping module names to their own settings (bits 16: left unquantized)."""
        data_type = raw.get("data_type", "int")
        if data_type != "int":
            raise QuantizationError(f"quantization_config.data_type {data_type!r}: deltaserve loads auto-round's "
                                    "integer (data_type int) checkpoints")
        extra = raw.get("extra_config") or {}
        if not isinstance(extra, dict) or not all(isinstance(c, dict) for c in extra.values()):
            raise QuantizationError(f"quantization_config.extra_config: expected an object of module names and "
                                    f"settings, got {extra!r}")
        bits = raw.get("bits")
        keep = [name for name, c in extra.items()
                if isinstance(c.get("bits"), int) and c["bits"] >= 16 or c.get("data_type") == "float"]
        for name, c in extra.items():
            if name not in keep and "bits" in c:
                self._int4_bits(c["bits"], f"quantization_config.extra_config[{name!r}].bits")
        overrides = {"+:" + re.escape(name) + "$": {k: c[k] for k in ("bits", "group_size", "sym") if k in c}
                     for name, c in extra.items() if name not in keep}
        packing = raw.get("packing_format", "auto_round:auto_gptq")
        base = {"bits": bits, "group_size": raw.get("group_size"), "modules_to_not_convert": keep}
        if packing == "auto_round:auto_gptq":
            self.family = "gptq"
            self._parse_gptq({**base, "sym": raw.get("sym", True), "desc_act": False, "dynamic": overrides})
        elif packing == "auto_round:auto_awq":
            self.family = "awq"
            self._parse_awq({**base, "zero_point": not raw.get("sym", True)})
        else:
            raise QuantizationError(f"quantization_config.packing_format {packing!r}: deltaserve loads auto-round's "
                                    "auto_round:auto_gptq and auto_round:auto_awq packings")

    def _parse_compressed_tensors(self, raw: dict[str, Any]) -> None:
        top = raw.get("format")
        groups = raw.get("config_groups") or {}
        if not isinstance(groups, dict) or not all(isinstance(g, dict) for g in groups.values()):
            raise QuantizationError(f"quantization_config.config_groups: expected an object of named groups, got "
                                    f"{groups!r}")
        if not groups:
            raise QuantizationError("compressed-tensors quantization_config has no config_groups")
        for gname, group in groups.items():
            where = f"quantization_config.config_groups.{gname}"
            w = group.get("weights") or {}
            fmt = group.get("format") or top
            if group.get("input_activations") and not (group["input_activations"] or {}).get("dynamic", False):
                raise QuantizationError(f"{where}.input_activations: static activation scales are not supported "
                                        "(weight-only and dynamic-activation schemes are)")
            if w.get("type") == "int":
                self._int4_bits(w.get("num_bits"), f"{where}.weights.num_bits")
                if fmt != "pack-quantized":
                    raise QuantizationError(f"{where}: format {fmt!r} for int4 weights; expected pack-quantized")
                strategy = w.get("strategy")
                if strategy not in ("group", "channel"):
                    raise QuantizationError(f"{where}.weights.strategy {strategy!r}: expected group or channel")
                group_size = w.get("group_size") if strategy == "group" else 0
                if strategy == "group" and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                            or group_size <= 0):
                    raise QuantizationError(f"{where}.weights.group_size {group_size!r}: strategy group needs a "
                                            "positive group size")
                wf = WeightFormat("int4", "ct-int4", group_size,
                                  symmetric=bool(w.get("symmetric", True)),
                                  act_order=w.get("actorder") == "group")
            elif w.get("type") == "float":
                if w.get("num_bits") != 8:
                    raise QuantizationError(f"{where}.weights.num_bits is {w.get('num_bits')!r}: float weights "
                                            "must be 8-bit (FP8 e4m3)")
                if fmt not in ("float-quantized", "naive-quantized"):
                    raise QuantizationError(f"{where}: format {fmt!r} for FP8 weights; expected float-quantized")
                strategy = w.get("strategy")
                if strategy == "block":
                    bn, bk = _block_structure(w.get("block_structure") or [128, 128],
                                              f"{where}.weights.block_structure")
                    wf = WeightFormat("fp8", "ct-fp8", bk, bn, scale_name="weight_scale")
                elif strategy in ("channel", "tensor"):  # one scale per tensor: found so in the checkpoint
                    wf = WeightFormat("fp8", "ct-fp8", 0, 1, scale_name="weight_scale")
                else:
                    raise QuantizationError(f"{where}.weights.strategy {strategy!r}: FP8 weights must be block, "
                                            "channel or tensor scaled")
            else:
                raise QuantizationError(f"{where}.weights.type {w.get('type')!r}: expected int (4-bit) or float "
                                        "(8-bit)")
            targets = _names(group.get("targets"), f"{where}.targets") or ["Linear"]
            for t in targets:
                if t.startswith("re:"):
                    _regex(t[3:], f"{where}.targets {t!r}")
            self.ct_groups.append((targets, wf))
        ignore = _names(raw.get("ignore"), "quantization_config.ignore")
        for n in ignore:
            if n.startswith("re:"):
                _regex(n[3:], f"quantization_config.ignore {n!r}")
        self.skip = _ModuleSet([(n, "ignore") for n in ignore if not n.startswith("re:")],
                               [(n[3:], "ignore 're:'") for n in ignore if n.startswith("re:")], exact=True)
        self.default = self.ct_groups[0][1]

    def configured(self, name: str) -> WeightFormat:
        """The format the config gives module `name` (our path)."""
        if self.family == "gptq":
            return self._gptq_dynamic(name)
        if name in self.skip:
            return UNQUANTIZED
        if self.family == "compressed-tensors":
            return self._ct_group(name)
        return self.default

    def _gptq_dynamic(self, name: str) -> WeightFormat:
        """GPTQ: the first `dynamic` key, in config order, whose regex matches module `name` decides, as GPTQModel
        (which wrote the checkpoint by it) and vLLM's get_dynamic_override read it: a "-:" key leaves the module
        unquantized, another overrides the defaults with its fields."""
        if name in self.not_converted:
            return UNQUANTIZED
        forms = _name_forms(name)
        match = next(((neg, p, o) for neg, p, o in self.dynamic if any(p.match(f) for f in forms)), None)
        if match is None:
            return self.default
        negative, pattern, override = match
        if negative:
            return UNQUANTIZED
        if "bits" in override:
            self._int4_bits(override["bits"], f"quantization_config.dynamic[{pattern.pattern!r}].bits")
        fmt = self.default
        if "group_size" in override:
            where = f"quantization_config.dynamic[{pattern.pattern!r}].group_size"
            fmt = replace(fmt, group_size=_group_size(override["group_size"], where))
        if "desc_act" in override:
            fmt = replace(fmt, act_order=bool(override["desc_act"]))
        if "sym" in override:
            fmt = replace(fmt, symmetric=bool(override["sym"]))
        return fmt

    def _ct_group(self, name: str) -> WeightFormat:
        """The compressed-tensors config group of module `name`: a target naming it (exactly or by `re:`) wins over
        the class target "Linear", whatever group comes first, as compressed-tensors and vLLM (find_matched_target)
        match them; a mixed-precision config lists its defaults under "Linear" and its exceptions by name."""
        forms = _name_forms(name)
        for targets, wf in self.ct_groups:
            if any(_our_name(t) == name or (t.startswith("re:") and any(re.match(t[3:], f) for f in forms))
                   for t in targets):
                return wf
        return next((wf for targets, wf in self.ct_groups if "Linear" in targets), UNQUANTIZED)

    # ---- the tensors --------------------------------------------------------------------------------------------

    def linear(self, name: str, *, dummy_default: bool = True) -> WeightFormat:
        """The format of the linear projection whose checkpoint path (ours) is `name`, and whether its activations
        are quantized as it runs (dynamic FP8 activations apply to FP8 weights; routed experts keep theirs)."""
        fmt = self._stored(name, dummy_default)
        # the lm_head keeps model-dtype inputs (the logits are the most sensitive GEMM; the peers do the same)
        if self.fp8_activations == "dynamic" and fmt.kind == "fp8" and not name.endswith("lm_head"):
            if fmt.group_size % ACT_GROUP:
                raise QuantizationError(f"{name}: dynamic FP8 activations take scales per {ACT_GROUP} columns, which "
                                        f"this checkpoint's K blocks of {fmt.group_size} do not hold; use "
                                        "--fp8-activations off")
            fmt = replace(fmt, act_fp8=True)
        return fmt

    def _stored(self, name: str, dummy_default: bool, read_order: bool = True) -> WeightFormat:
        """How the linear projection `name` is stored, from the config and the tensors the checkpoint holds
        (read_order: read its g_idx to see whether it permutes K)."""
        conf = self.configured(name)
        if self.present is None:
            return conf if dummy_default else UNQUANTIZED
        has = lambda suffix: f"{name}.{suffix}" in self.present  # noqa: E731
        if has("qweight"):
            found = "int4 qweight"
            ok = conf.kind == "int4" and conf.checkpoint in ("gptq", "awq")
        elif has("weight_packed"):
            found = "int4 weight_packed"
            ok = conf.checkpoint == "ct-int4"
        elif has("weight_scale_inv") or has("weight_scale"):
            found = "FP8 weight + scale"
            ok = conf.kind == "fp8"
            if ok:
                conf = replace(conf, scale_name="weight_scale_inv" if has("weight_scale_inv") else "weight_scale")
                conf = self._per_tensor(name, conf)
        else:
            return UNQUANTIZED  # a plain weight (or nothing: the loader reports the missing tensor)
        if not ok:
            if not conf.quantized:
                raise QuantizationError(
                    f"{name}: the checkpoint holds {found} tensors, but quantization_config (quant_method "
                    f"{self.method!r}) leaves this module unquantized (listed as not converted / ignored, or in no "
                    "config group)")
            raise QuantizationError(f"{name}: the checkpoint holds {found} tensors, which quant_method "
                                    f"{self.method!r} ({conf.describe()}) does not use")
        if conf.kind == "int4" and conf.checkpoint in ("gptq", "ct-int4") and read_order:
            g = f"{name}.{'g_idx' if conf.checkpoint == 'gptq' else 'weight_g_idx'}"
            # act-order (a K permutation, its own GEMM) only where the g_idx permutes K, whatever desc_act says:
            # GPTQ writes a trivial g_idx with desc_act false too
            conf = replace(conf, act_order=g in self.present and self._permutes(g, conf.group_size))
        return conf

    def same_order(self, a: str, b: str, fmt: WeightFormat) -> bool:
        """Whether act-order projections `a` and `b` (int4 `fmt`) order their input columns alike (one stable sort of
        equal g_idx), so that a merged projection can gather its input once for both (GPTQ gives projections that
        read the same input one order: it comes from their inputs' Hessian). Dummy weights: the identity order."""
        if self.read is None or self.present is None:
            return True
        key = "g_idx" if fmt.checkpoint == "gptq" else "weight_g_idx"
        names = [f"{n}.{key}" for n in (a, b)]
        return all(n in self.present for n in names) and torch.equal(*(self.read(n).long() for n in names))

    def _per_tensor(self, name: str, conf: WeightFormat) -> WeightFormat:
        """A per-channel FP8 format whose checkpoint holds one scale for the whole weight (a scalar or [1], as AutoFP8
        and compressed-tensors strategy "tensor" write) reads it per tensor (each row takes that scale)."""
        if conf.group_size or self.read is None:
            return conf
        scale = self.read(f"{name}.{conf.scale_name}")
        return replace(conf, scale_dims=scale.dim()) if scale.numel() == 1 and scale.dim() <= 1 else conf

    def _permutes(self, name: str, group: int) -> bool:
        """Whether g_idx `name` differs from k // group (an unreadable one is kept to be checked at load)."""
        if self.read is None:
            return True
        g_idx = self.read(name)
        if g_idx.dim() != 1 or g_idx.dtype not in (torch.int32, torch.int64):
            return True  # the load reports it
        return not torch.equal(g_idx.long(), torch.arange(g_idx.numel()) // (group or g_idx.numel()))

    def experts(self, prefix: str, num_experts: int) -> WeightFormat:
        """The format shared by all routed experts under `prefix` (ours, with a trailing dot). Their inputs stay in
        the model dtype under dynamic FP8 activations (the MoE kernels take bf16 tokens)."""
        return replace(self._experts(prefix, num_experts), act_fp8=False)

    def _experts(self, prefix: str, num_experts: int) -> WeightFormat:
        formats = {}
        fused = any(f"{prefix}{p}{s}" in (self.present or ())
                    for p in ("gate_up_proj", "down_proj") for s in ("", "_scale_inv", "_scale"))
        if fused:
            conf = self.configured(f"{prefix}gate_up_proj")
            if f"{prefix}gate_up_proj_scale_inv" in self.present or f"{prefix}gate_up_proj_scale" in self.present:
                if conf.kind != "fp8":
                    raise QuantizationError(f"{prefix}gate_up_proj: fused FP8 experts in a {self.method!r} "
                                            "checkpoint that does not quantize them")
                name = "_scale_inv" if f"{prefix}gate_up_proj_scale_inv" in self.present else "_scale"
                return replace(conf, scale_name=name)
            return UNQUANTIZED
        for e in range(num_experts):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                formats[f"{e}.{proj}"] = self._stored(f"{prefix}{e}.{proj}", True, read_order=False)
        kinds = set(formats.values())
        if len(kinds) > 1:
            by = {}
            for where, f in formats.items():
                by.setdefault(f.describe(), where)
            raise QuantizationError(f"{prefix.rstrip('.')}: the experts of one layer must share one format; found "
                                    + ", ".join(f"{d} (e.g. {w})" for d, w in by.items()))
        fmt = kinds.pop()
        if fmt.kind == "int4" and self.present is not None:
            # act-order (an order of the input per expert) where some expert's g_idx permutes K, whatever the config
            # says (GPTQ writes a trivial g_idx with desc_act false too)
            names = (f"{prefix}{e}.{proj}.{key}" for e in range(num_experts)
                     for proj in ("gate_proj", "up_proj", "down_proj") for key in ("g_idx", "weight_g_idx"))
            fmt = replace(fmt, act_order=any(self._permutes(n, fmt.group_size) for n in names if n in self.present))
        return fmt


# ---- checkpoint tensors -> internal layouts ----------------------------------------------------------------------

def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _read(source: TensorSource, dtypes: tuple[torch.dtype, ...], what: str) -> torch.Tensor:
    return _check_dtype(source.name, source.read(), dtypes, what)


def _check_dtype(name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...], what: str) -> torch.Tensor:
    if t.dtype not in dtypes:
        raise QuantizationError(f"{name}: dtype {t.dtype} where {what} ({', '.join(map(str, dtypes))}) "
                                "was expected")
    return t


_INT_PACKED = (torch.int32,)
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


# ---- tensor parallelism: the rank's part of each quantized tensor ---------------------------------------------------
#
# A module declares the rank's part of a projection's logical [N, K] weight (parallel/sharding.Shard: dim 0 output
# rows for column-parallel layers, dim 1 input columns for row-parallel ones). Each checkpoint tensor of a format maps
# those dims onto its own (`Axis`): one entry per index (FP8 weights, scales along N for int4), 8 int4 codes per int32
# word (the split must fall on word boundaries), or one scale / zero point per group or FP8 block. A split inside a
# group or block (K / tp not a multiple of 128, e.g. a 192-column half of a 384-wide down_proj, or the 64 input columns
# of a 128-wide expert at TP 2) is loaded by *duplicating* that group's scale (and zero point) on both ranks, not by
# padding: the internal layouts keep a scale per row (FP8 N blocks become per-row scales anyway) and per K group of
# any size, so each rank uses groups of gcd(group, K / tp) columns, each inside one checkpoint group, with that
# group's scale. The weights stay exactly the checkpoint's, no rank stores or multiplies padding, and the activations
# keep their shape (padding K would pad every rank's input as well). The cost: smaller K groups where the split is
# uneven (more scales, and kernels need groups of a multiple of 16 columns).


@dataclass(frozen=True)
class Axis:
    """How a checkpoint tensor's dim `dim` covers one dim of the logical [N, K] weight: one entry per `per`
    consecutive indices; grouped (scales, zero points): entries are repeated to the rank's group size, else (codes,
    packed words) the split must fall on entry boundaries."""

    dim: int
    per: int = 1
    grouped: bool = False


def local_group(group: int, k_local: int, split: bool) -> int:
    """The K group (or FP8 block) a rank uses for a checkpoint group of `group` columns when it keeps k_local input
    columns: the checkpoint's when the split falls on its boundaries or stays inside one group, else the largest size
    dividing both (each rank's groups then lie inside one checkpoint group)."""
    if not split or k_local % group == 0 or group % k_local == 0:
        return group
    return math.gcd(group, k_local)


def read_sharded(source: TensorSource, axes: dict[int, Axis], tp: Shard | None, sizes: tuple[int, ...],
                 group: int, k_dim: int = 1) -> torch.Tensor:
    """The rank's part of checkpoint tensor `source` in the internal grid: logical dims split by `tp` are read in its
    pieces only (safetensors slices); grouped dims are repeated so that entry j covers the logical indices [start +
    j * step, ...) with step 1 along N (per-row scales) and `group` along K (logical dim k_dim: 2 for fused [E, N, K]
    experts). sizes: the logical dims' sizes on this rank (those of unsplit dims are the checkpoint's)."""
    split_dim = tp.dim if tp is not None and tp.dim in axes else None
    if split_dim is None:
        t = source.read()
    else:
        ax, parts = axes[split_dim], []
        step = group if split_dim == k_dim else 1
        for start, length in tp.pieces:
            first, last = start // ax.per, _cdiv(start + length, ax.per)
            part = read_part(source, ax.dim, first, last - first)
            if ax.grouped:
                part = part.index_select(ax.dim, torch.arange(start, start + length, step) // ax.per - first)
            parts.append(part)
        t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=ax.dim)
    for logical, ax in axes.items():
        step = group if logical == k_dim else 1
        if ax.grouped and logical != split_dim and step != ax.per:
            t = t.index_select(ax.dim, torch.arange(0, sizes[logical], step) // ax.per)
    return t


def _sizes_that_work(full: int, ok) -> list[int]:
    return [t for t in range(1, full + 1) if full % t == 0 and ok(full // t)]


def _split_error(name: str, what: str, full: int, local: int, why: str, ok) -> QuantizationError:
    return QuantizationError(
        f"{name}: tensor parallelism splits the {what} ({full}) into {local} per rank, but {why}; "
        f"tensor_parallel_size values that work for it: {_sizes_that_work(full, ok)}")


def k_group(kind: str, group: int, k_local: int, tp: Shard | None) -> int:
    """The K group a rank uses for a quantized projection whose input columns `tp` may split (row-parallel):
    QuantizationError naming the dimension and the sizes that work when the split cannot be loaded (quantize_model
    adds the module's path)."""
    if tp is None or tp.dim != 1:
        return group
    full = tp.full

    def ok(local: int) -> bool:
        if local == full:
            return True
        g = local_group(group, local, True)
        if kind == "int4" and local % 8:
            return False
        if g >= local:
            return True
        return g % 16 == 0

    if not ok(k_local):
        g = local_group(group, k_local, True)
        if kind == "int4" and k_local % 8:
            why = f"int4 codes are packed 8 per word and {k_local} is not a multiple of 8"
        else:
            why = (f"a rank would use {kind} groups of {g} columns (the checkpoint's {group} split to fit) and the "
                   "kernels need groups of a multiple of 16")
        raise _split_error(kind + " weights", "input dimension K", full, k_local, why, ok)
    return local_group(group, k_local, True)


def check_n_split(name: str, tp: Shard | None, packed: bool) -> None:
    """Output rows split by tensor parallelism (column-parallel): formats that pack int4 codes or zero points along
    N need each piece on a word boundary (8 rows)."""
    if tp is None or tp.dim != 0 or not packed:
        return
    if any(start % 8 or length % 8 for start, length in tp.pieces):
        local = tp.local
        raise _split_error(name, "output dimension N", tp.full, local, "its int4 zero points (or codes) are packed 8 "
                           "rows per word and a rank's rows do not start and end on a word", lambda n: n % 8 == 0)


@dataclass
class Int4Dest:
    """Where one checkpoint projection's int4 weight goes: views of the layer's tensors for its rows."""

    qweight: torch.Tensor   # [n, ceil(K/8)] int32
    scales: torch.Tensor    # [n, groups] fp32
    zeros: torch.Tensor     # [n, groups] uint8
    perm: torch.Tensor | None  # [K] int64 when K may be permuted (act-order), else None


def _int4_axes(fmt: WeightFormat, g: int) -> dict[str, dict[int, Axis]]:
    """Per checkpoint tensor of an int4 format: logical dim (0: N, 1: K) -> how the tensor covers it."""
    if fmt.checkpoint == "gptq":
        return {"qweight": {0: Axis(1), 1: Axis(0, 8)}, "qzeros": {0: Axis(1, 8), 1: Axis(0, g, True)},
                "scales": {0: Axis(1), 1: Axis(0, g, True)}, "g_idx": {1: Axis(0)}}
    if fmt.checkpoint == "awq":
        return {"qweight": {0: Axis(1, 8), 1: Axis(0)}, "qzeros": {0: Axis(1, 8), 1: Axis(0, g, True)},
                "scales": {0: Axis(1), 1: Axis(0, g, True)}}
    return {"weight_packed": {0: Axis(0), 1: Axis(1, 8)}, "weight_scale": {0: Axis(0), 1: Axis(1, g, True)},
            "weight_zero_point": {0: Axis(0, 8), 1: Axis(1, g, True)}, "weight_shape": {},
            "weight_g_idx": {1: Axis(0)}}


def int4_slots(fmt: WeightFormat, name: str, dest: Int4Dest, n: int, k: int,
               present: Set[str] | None, tp: Shard | None = None, group: int | None = None) -> dict[str, WeightSlot]:
    """The checkpoint tensors of one int4 projection `name` with n output rows and k inputs (the rank's, under
    tensor parallelism: `tp` says which part of the checkpoint's [N, K] weight, `group` the rank's K group, see
    local_group). They are collected as they arrive and converted together once the last one is in."""
    n_full = tp.full if tp is not None and tp.dim == 0 else n
    k_full = tp.full if tp is not None and tp.dim == 1 else k
    g = fmt.group_size or k_full
    local_g = group or g
    ng = _cdiv(k_full, g)
    if fmt.checkpoint == "gptq":
        spec = {"qweight": ((_cdiv(k_full, 8), n_full), False), "qzeros": ((ng, _cdiv(n_full, 8)), False),
                "scales": ((ng, n_full), False), "g_idx": ((k_full,), True)}
    elif fmt.checkpoint == "awq":
        spec = {"qweight": ((k_full, _cdiv(n_full, 8)), False), "qzeros": ((ng, _cdiv(n_full, 8)), False),
                "scales": ((ng, n_full), False)}
    else:
        spec = {"weight_packed": ((n_full, _cdiv(k_full, 8)), False), "weight_scale": ((n_full, ng), False),
                "weight_shape": ((2,), True), "weight_g_idx": ((k_full,), True)}
        if not fmt.symmetric:
            spec["weight_zero_point"] = ((_cdiv(n_full, 8), ng), False)
    sharded = tp is not None or local_g != g
    if sharded:  # packed zero points (every format but symmetric compressed-tensors) or AWQ codes along N
        check_n_split(name, tp, "qzeros" in spec or "weight_zero_point" in spec)
    axes = _int4_axes(fmt, g)
    expected = {s for s, (_, optional) in spec.items() if not optional or present is None or f"{name}.{s}" in present}
    got: dict[str, torch.Tensor] = {}

    def finish() -> None:
        if sharded:
            _check_sharded_int4(fmt, name, got, tp, (n_full, k_full), g)
        q, z, s, gidx = _convert_int4(fmt, name, got, n, k, local_g)
        if gidx is not None:
            trivial = torch.arange(k) // g
            if torch.equal(gidx.long(), trivial):
                gidx = None
            elif dest.perm is None:
                key = "g_idx" if fmt.checkpoint == "gptq" else "weight_g_idx"
                raise QuantizationError(f"{name}.{key}: a permuted (act-order) g_idx, but this module's weights "
                                        "cannot take one: use a checkpoint quantized without act-order (GPTQ "
                                        "desc_act false; compressed-tensors actorder null, 'static' or 'weight')")
            else:
                perm = torch.argsort(gidx.long(), stable=True)
                if not torch.equal(gidx.long()[perm], trivial):
                    raise QuantizationError(f"{name}.g_idx: expected every group to hold exactly {g} input "
                                            "columns")
                q = q[:, perm]
                dest.perm.copy_(perm)
        if gidx is None and dest.perm is not None:
            dest.perm.copy_(torch.arange(k))
        dest.qweight.copy_(pack_int4(q))
        dest.scales.copy_(s)
        dest.zeros.copy_(z)
        got.clear()

    def slot(suffix: str) -> WeightSlot:
        def load(source: TensorSource) -> None:
            dtypes = _FLOATS if suffix in ("scales", "weight_scale") else (
                torch.int64, torch.int32) if suffix in ("weight_shape", "g_idx", "weight_g_idx") else _INT_PACKED
            what = "packed int32 codes" if dtypes == _INT_PACKED else suffix
            if sharded:
                t = _check_dtype(source.name, read_sharded(source, axes[suffix], tp, (n, k), local_g), dtypes, what)
            else:
                t = _read(source, dtypes, what)
            got[suffix] = t.clone()
            if expected <= got.keys():
                finish()
        shape, optional = spec[suffix]
        return WeightSlot(shape, load, optional=optional, sharded=tp is not None)

    slots = {f"{name}.{s}": slot(s) for s in spec}
    if fmt.checkpoint == "gptq":
        slots[f"{name}.bias"] = _zero_bias_slot(n_full, tp)
    return slots


def _zero_bias_slot(n: int, tp: Shard | None) -> WeightSlot:
    """A GPTQ projection's `bias`: GPTQ-for-LLaMa and early AutoGPTQ store one (zeros) with every quantized layer,
    also where the model has none (vLLM skips them). Qwen3.5's projections have no bias, so only zeros load."""
    def load(source: TensorSource) -> None:
        t = _read(source, _FLOATS, "a floating-point bias")
        if bool(t.any()):
            raise QuantizationError(f"{source.name}: a non-zero bias, but Qwen3.5's projections have none (a GPTQ "
                                    "writer's bias is all zeros); the checkpoint does not match the model")
    return WeightSlot((n,), load, optional=True, sharded=tp is not None)


def _check_sharded_int4(fmt: WeightFormat, name: str, got: dict[str, torch.Tensor], tp: Shard | None,
                        full: tuple[int, int], g: int) -> None:
    """Under tensor parallelism: weight_shape names the checkpoint's full shape; a g_idx over split input columns
    must be the trivial one (an act-order permutation mixes the groups of all ranks' columns)."""
    shape = got.pop("weight_shape", None)
    if shape is not None and tuple(shape.tolist()) != full:
        raise QuantizationError(f"{name}.weight_shape is {shape.tolist()}; expected {list(full)}")
    key = "g_idx" if fmt.checkpoint == "gptq" else "weight_g_idx"
    if tp is None or tp.dim != 1 or key not in got:
        return
    (start, length), = tp.pieces
    if not torch.equal(got.pop(key).long(), torch.arange(start, start + length) // g):
        raise QuantizationError(f"{name}.{key}: an act-order (permuted) g_idx in a row-parallel projection: its "
                                "groups mix input columns of several tensor-parallel ranks, so it cannot be split; "
                                "use tensor_parallel_size 1 or a checkpoint quantized without act-order")


def _unpack_along_rows(packed: torch.Tensor, rows: int) -> torch.Tensor:
    """int32 [R, C] packed along dim 0 -> codes [rows, C]."""
    return unpack_int4(packed.T.contiguous(), rows).T


def _check_gptq_zeros(fmt: WeightFormat, name: str, z: torch.Tensor) -> None:
    """Symmetric GPTQ zero points (stored + the checkpoint_format's offset) must all be 8: a v1 checkpoint labelled
    gptq_v2 (or the reverse) would otherwise load every weight one scale step off. Asymmetric v1 zero points may
    read 16: a group whose zero point was 0 is stored as 15 (zero - 1 wraps in 4 bits), and v1 readers (vLLM's
    gptq_gemm, AutoGPTQ's kernels) add 1 without wrapping, so they dequantize it as (q - 16) * scale; the internal
    uint8 zero points hold 16 and the kernels compute the same."""
    if fmt.symmetric and not bool((z == 8).all()):
        offset = f"checkpoint_format {'gptq' if fmt.zero_offset else 'gptq_v2'}'s offset of {fmt.zero_offset}"
        found = sorted(set(z.unique().tolist()) - {8})
        raise QuantizationError(f"{name}.qzeros: quantization_config.sym is true, so every zero point is 8, but "
                                f"stored + {offset} gives {found[:4]}; a v1 checkpoint stores 7 (checkpoint_format "
                                "gptq), a v2 one 8 (gptq_v2), an asymmetric one needs sym false")


def _convert_int4(fmt: WeightFormat, name: str, t: dict[str, torch.Tensor], n: int, k: int, g: int):
    """Checkpoint tensors -> (codes [n, k] uint8, zeros [n, groups] uint8, scales [n, groups] fp32, g_idx|None)."""
    gidx = None
    if fmt.checkpoint == "gptq":
        q = _unpack_along_rows(t["qweight"], k).T                      # [n, k]
        z = unpack_int4(t["qzeros"], n).T.int() + fmt.zero_offset     # [n, groups]
        s = t["scales"].float().T
        gidx = t.get("g_idx")
        _check_gptq_zeros(fmt, name, z)
    elif fmt.checkpoint == "awq":
        order = torch.tensor(AWQ_ORDER)

        def unpack(packed: torch.Tensor) -> torch.Tensor:
            u = unpack_int4(packed, packed.shape[-1] * 8).view(packed.shape[0], -1, 8)
            return u[..., order].reshape(packed.shape[0], -1)[:, :n]
        q, z, s = unpack(t["qweight"]).T, unpack(t["qzeros"]).T.int(), t["scales"].float().T
    else:
        if "weight_shape" in t and tuple(t["weight_shape"].tolist()) != (n, k):
            raise QuantizationError(f"{name}.weight_shape is {t['weight_shape'].tolist()}; expected {[n, k]}")
        q = unpack_int4(t["weight_packed"], k)
        s = t["weight_scale"].float()
        z = (_unpack_along_rows(t["weight_zero_point"], n).int() if "weight_zero_point" in t
             else torch.full_like(s, 8, dtype=torch.int32))
        gidx = t.get("weight_g_idx")
    return q.contiguous(), z.to(torch.uint8).contiguous(), s.contiguous(), gidx


def fp8_slots(fmt: WeightFormat, name: str, weight: torch.Tensor, scale: torch.Tensor, n: int,
              k: int, tp: Shard | None = None, group: int | None = None) -> dict[str, WeightSlot]:
    """The checkpoint tensors of one FP8 projection `name` ([n, k] e4m3 and its scales), into `weight` [n, k] and
    `scale` [n, ceil(k / bk)] (fp32, one row per output row). Under tensor parallelism n and k are the rank's, `tp`
    its part of the checkpoint's [N, K] weight and `group` its K block (local_group)."""
    return _fp8_layout(fmt, f"{name}.weight", f"{name}.{fmt.scale_name}", weight, scale, (n, k), tp, group)


def _fused_fp8_slots(fmt: WeightFormat, name: str, weight: torch.Tensor, scale: torch.Tensor,
                     tp: Shard | None = None, group: int | None = None) -> dict[str, WeightSlot]:
    """Fused FP8 experts `name` (gate_up_proj or down_proj) [E, N, K] and `name`{scale suffix}, into `weight` and
    `scale` [E, n, ceil(k / bk)]; tensor parallelism splits dim 0 (experts, EP), 1 (N sections) or 2 (K)."""
    return _fp8_layout(fmt, name, f"{name}{fmt.scale_name}", weight, scale, tuple(weight.shape), tp, group)


def _fp8_layout(fmt: WeightFormat, weight_name: str, scale_name: str, weight: torch.Tensor, scale: torch.Tensor,
                sizes: tuple[int, ...], tp: Shard | None, group: int | None) -> dict[str, WeightSlot]:
    """The FP8 checkpoint layout, of a projection ([N, K]) or of fused experts ([E, N, K]): e4m3 weights, and scales
    [..., ceil(N/bn), ceil(K/bk)] per block or [..., N, 1] per channel. sizes: the rank's [..., n, k] (tp: its part
    of the checkpoint's tensors, each read in that part only; group: its K block, default the checkpoint's); scales
    are repeated to one per row and per K block, the internal layout."""
    k_dim = len(sizes) - 1
    n_dim = k_dim - 1
    full = list(sizes)
    if tp is not None:
        full[tp.dim] = tp.full
    bn, bk = fmt.block_n or 1, fmt.group_size or full[k_dim]
    group = group or bk
    w_axes = {d: Axis(d) for d in range(len(sizes))}
    s_axes = {d: Axis(d) for d in range(n_dim)}
    if fmt.scale_dims >= 0:  # one scale for the weight: every rank reads it whole, every row takes it
        s_axes = {}
        s_shape = (1,) * fmt.scale_dims
    elif fmt.group_size == 0:
        s_axes[n_dim] = Axis(n_dim)
        s_shape = (*full[:k_dim], 1)
    else:
        s_axes.update({n_dim: Axis(n_dim, bn, True), k_dim: Axis(k_dim, bk, True)})
        s_shape = (*full[:n_dim], _cdiv(full[n_dim], bn), _cdiv(full[k_dim], bk))

    def load_weight(source: TensorSource) -> None:
        t = read_sharded(source, w_axes, tp, sizes, group, k_dim)
        weight.copy_(_check_dtype(source.name, t, (_FP8,), "FP8 e4m3 weights"))

    def load_scale(source: TensorSource) -> None:
        t = read_sharded(source, s_axes, tp, sizes, group, k_dim)
        t = _check_dtype(source.name, t, _FLOATS, "floating-point scales").float()
        scale.copy_(t.reshape(()).expand(scale.shape) if fmt.scale_dims >= 0 else t)
    return {weight_name: WeightSlot(tuple(full), load_weight, sharded=tp is not None),
            scale_name: WeightSlot(s_shape, load_scale, sharded=tp is not None)}


def _dummy_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, k: int, name: str,
                seed: int) -> None:
    g = seeded(name, seed, qweight.device)
    with torch.no_grad():
        codes = torch.randint(0, 16, (*qweight.shape[:-1], k), generator=g, device=qweight.device)
        qweight.copy_(pack_int4(codes))
        zeros.fill_(8)
        scales.fill_(k ** -0.5 / 4.6)  # codes - 8 have std ~4.6: W ~ k^-1/2, as the bf16 dummy weights


def _dummy_fp8(weight: torch.Tensor, scale: torch.Tensor, k: int, name: str, seed: int) -> None:
    g = seeded(name, seed, weight.device)
    with torch.no_grad():
        weight.copy_((torch.randn(weight.shape, generator=g, device=weight.device) * 64).to(_FP8))
        scale.fill_(k ** -0.5 / 64)


# ---- linear methods ----------------------------------------------------------------------------------------------

class Int4LinearMethod(LinearMethod):
    """W4A16: int4 codes, fp32 group scales, uint8 zero points (and a K permutation for act-order GPTQ)."""

    def __init__(self, fmt: WeightFormat, present: Set[str] | None) -> None:
        self.fmt, self.present, self.name = fmt, present, fmt.describe()

    def create_weights(self, layer: Linear, *, dtype: torch.dtype, device: torch.device | str | None) -> None:
        n, k = layer.out_features, layer.in_features
        tp = tp_shard(layer, "weight")  # a row-parallel split of K: the rank's group (local_group)
        layer.group_size = k_group("int4", self.fmt.group_size, k, tp) if self.fmt.group_size else k
        groups = _cdiv(k, layer.group_size)
        layer.qweight = new_param(n, _cdiv(k, 8), dtype=torch.int32, device=device)
        layer.scales = new_param(n, groups, dtype=torch.float32, device=device)
        layer.zeros = new_param(n, groups, dtype=torch.uint8, device=device)
        row_parallel = tp is not None and tp.dim == 1  # act-order over split columns is refused at load
        layer.perm = (new_param(k, dtype=torch.int64, device=device) if self.fmt.act_order and not row_parallel
                      else None)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return int4_linear(x=x, qweight=layer.qweight, scales=layer.scales, zeros=layer.zeros,
                           group_size=layer.group_size, perm=layer.perm)

    def apply_silu_gate(self, layer: Linear, gate_up: torch.Tensor) -> torch.Tensor:
        return int4_linear(x=gate_up, qweight=layer.qweight, scales=layer.scales, zeros=layer.zeros,
                           group_size=layer.group_size, perm=layer.perm, silu_gate=True)

    def apply_tail(self, layer: Linear, x: torch.Tensor, tail: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's output, x @ tail^T): at decode sizes one launch (SplitLinearMethod)."""
        return int4_linear_tail(x=x, qweight=layer.qweight, scales=layer.scales, zeros=layer.zeros,
                                group_size=layer.group_size, tail=tail, perm=layer.perm)

    def shard_layout(self, layer: Linear, name: str, rows: slice, tp: Shard | None = None) -> dict[str, WeightSlot]:
        dest = Int4Dest(layer.qweight[rows], layer.scales[rows], layer.zeros[rows], layer.perm)
        return int4_slots(self.fmt, name, dest, rows.stop - rows.start, layer.in_features, self.present, tp,
                          layer.group_size)

    def init_dummy(self, layer: Linear, prefix: str, seed: int) -> None:
        _dummy_int4(layer.qweight, layer.scales, layer.zeros, layer.in_features, prefix + "qweight", seed)
        if layer.perm is not None:
            layer.perm.copy_(torch.arange(layer.in_features))


def _check_act_fp8(layer: Linear, k: int, group_size: int, device: torch.device | str | None) -> None:
    """Dynamic FP8 activations need K blocks of whole 128-column activation groups and FP8 tensor cores."""
    if layer.block_k % ACT_GROUP and layer.block_k != k:
        raise QuantizationError(f"a {k}-column shard cuts the checkpoint's {group_size}-column K blocks into "
                                f"{layer.block_k}-column pieces; dynamic FP8 activations need multiples of "
                                f"{ACT_GROUP}: use another tensor_parallel_size or --fp8-activations off")
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda" and capability(dev) < (8, 9):
        major, minor = capability(dev)
        raise QuantizationError(f"--fp8-activations dynamic multiplies on FP8 tensor cores (compute capability 8.9+: "
                                f"Ada, Hopper or newer); this GPU is {major}.{minor}: use --fp8-activations off")


class Fp8LinearMethod(LinearMethod):
    """FP8 e4m3 weights with an fp32 scale per row and K block; activations stay in the model dtype, or (fmt.act_fp8)
    are quantized to FP8 per token and 128 columns as each GEMM runs."""

    def __init__(self, fmt: WeightFormat) -> None:
        self.fmt, self.name = fmt, fmt.describe()

    def create_weights(self, layer: Linear, *, dtype: torch.dtype, device: torch.device | str | None) -> None:
        n, k = layer.out_features, layer.in_features
        tp = tp_shard(layer, "weight")
        layer.block_k = k_group("fp8", self.fmt.group_size, k, tp) if self.fmt.group_size else k
        if self.fmt.act_fp8:
            _check_act_fp8(layer, k, self.fmt.group_size, device)
        layer.weight = new_param(n, k, dtype=_FP8, device=device)
        layer.weight_scale = new_param(n, _cdiv(k, layer.block_k), dtype=torch.float32, device=device)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x=x, weight=layer.weight, scale=layer.weight_scale, block_k=layer.block_k,
                          act_fp8=self.fmt.act_fp8)

    def apply_silu_gate(self, layer: Linear, gate_up: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x=gate_up, weight=layer.weight, scale=layer.weight_scale, block_k=layer.block_k,
                          act_fp8=self.fmt.act_fp8, silu_gate=True)

    def apply_tail(self, layer: Linear, x: torch.Tensor, tail: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's output, x @ tail^T): at decode sizes one launch (SplitLinearMethod)."""
        return fp8_linear_tail(x=x, weight=layer.weight, scale=layer.weight_scale, block_k=layer.block_k, tail=tail,
                               act_fp8=self.fmt.act_fp8)

    def shard_layout(self, layer: Linear, name: str, rows: slice, tp: Shard | None = None) -> dict[str, WeightSlot]:
        return fp8_slots(self.fmt, name, layer.weight[rows], layer.weight_scale[rows], rows.stop - rows.start,
                         layer.in_features, tp, layer.block_k)

    def init_dummy(self, layer: Linear, prefix: str, seed: int) -> None:
        _dummy_fp8(layer.weight, layer.weight_scale, layer.in_features, prefix + "weight", seed)


class _Part(MergedLinear):
    """One same-format group of a merged projection whose shards differ in format; the merged layer declares its
    checkpoint tensors."""

    def weight_layout(self, prefix: str, present: Set[str]) -> dict[str, WeightSlot]:
        return {}


class SplitLinearMethod(LinearMethod):
    """A merged projection whose shards are stored in different formats (e.g. the mixed AWQ layout, or FP8 GDN in_proj
    qkv|z next to bf16 b|a): consecutive shards of one format stay merged (one GEMM each) and the outputs are
    concatenated, so the layer's output is the same [T, sum of shards] as before; forward_split skips the
    concatenation. A quantized part followed by an unquantized one (the GDN in_proj of every published quantized
    checkpoint: int4 / fp8 qkv|z, bf16 b|a) runs as the quantized op with the plain weight as its tail (apply_tail):
    at decode sizes its rows join the quantized GEMV's launch instead of a cuBLAS call and its split-K reduction."""

    def __init__(self, groups: list[tuple[dict[str, int], LinearMethod]]) -> None:
        self.groups = groups
        self.name = "split(" + ", ".join(f"{'+'.join(s)}: {m.name}" for s, m in groups) + ")"

    def create_weights(self, layer: Linear, *, dtype: torch.dtype, device: torch.device | str | None) -> None:
        layer.parts = nn.ModuleList(_Part(layer.in_features, shards, dtype=dtype, device=device, method=method)
                                    for shards, method in self.groups)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self._outputs(layer, x), dim=-1)

    def _outputs(self, layer: Linear, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each part's output, in order."""
        first, *rest = layer.parts
        if len(rest) == 1 and hasattr(first.method, "apply_tail") and type(rest[0].method) is LinearMethod:
            return first.method.apply_tail(first, x, rest[0].weight)
        return tuple(part(x) for part in layer.parts)

    def apply_split(self, layer: MergedLinear, x: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, ...]:
        """Each part's shards as column views of its own output: no concatenation (a copy launch a layer) when the
        caller wants the shards apart anyway (the parts hold consecutive shards, in order)."""
        if sizes != [rows for part in layer.parts for rows in part.shards.values()]:
            return super().apply_split(layer, x, sizes)
        return tuple(shard for part, out in zip(layer.parts, self._outputs(layer, x))
                     for shard in out.split(list(part.shards.values()), dim=-1))

    def shard_layout(self, layer: Linear, name: str, rows: slice, tp: Shard | None = None) -> dict[str, WeightSlot]:
        shard = name.rpartition(".")[2]
        for part in layer.parts:
            if shard in part.shards:
                # a plain part's slot is wrapped by the merged layer's tp_shards, a quantized one reads its part
                return part.method.shard_layout(part, name, part.shard_rows()[shard], tp)
        raise KeyError(shard)

    def init_dummy(self, layer: Linear, prefix: str, seed: int) -> None:
        pass  # the parts are modules of their own: dummy init visits them


def linear_method(fmt: WeightFormat, present: Set[str] | None) -> LinearMethod:
    if fmt.kind == "int4":
        return Int4LinearMethod(fmt, present)
    if fmt.kind == "fp8":
        return Fp8LinearMethod(fmt)
    return LinearMethod()


# ---- experts methods ---------------------------------------------------------------------------------------------

def _expert_projections(layer: Experts) -> tuple[tuple[str, str, slice, int], ...]:
    """Each expert's checkpoint projections (per-expert layout) and where they go: (name, internal tensor, its rows,
    K). gate_proj and up_proj are stacked in w13, gate rows first as the MoE kernels read them; down_proj is w2."""
    i, d = layer.intermediate_size, layer.hidden_size
    return (("gate_proj", "w13", slice(0, i), d), ("up_proj", "w13", slice(i, 2 * i), d),
            ("down_proj", "w2", slice(0, d), i))


class Int4ExpertsMethod(ExpertsMethod):
    """Routed experts in int4: w13 (gate rows, then up rows) [E, 2I, D] and w2 [E, D, I] in the internal layout.

    Act-order (GPTQ desc_act, compressed-tensors actorder "group"): each projection's columns are stored sorted by
    group (int4_slots), so each expert reads its input in an order of its own. gate_proj and up_proj read the same
    input and must share one order (GPTQ derives both from the same inputs' Hessian): w13_perm [E, D], applied to x
    per routed pair. down_proj's order permutes the intermediate columns, which only gate and up produce: at the end
    of loading their rows are put in that order (exact, and free at run time), so w2 needs none."""

    def __init__(self, fmt: WeightFormat, present: Set[str] | None) -> None:
        self.fmt, self.present, self.name = fmt, present, fmt.describe()

    def create_weights(self, layer: Experts, *, dtype: torch.dtype, device: torch.device | str | None) -> None:
        e, d, i = layer.num_experts, layer.hidden_size, layer.intermediate_size
        tp = tp_shard(layer, "down_proj.weight")  # tensor-parallel slices of every expert: down_proj's K split
        g = k_group("int4", self.fmt.group_size, i, tp) if self.fmt.group_size else 0
        # the MoE ops take one group size for both K (d and i): each a multiple of it, or inside one group
        if g and any(k % g and g % k for k in (d, i)):
            raise QuantizationError(f"int4 experts with group size {g} need hidden size ({d}) and expert "
                                    f"intermediate size ({i}) each to be a multiple of it or to divide it")
        layer.group_size = g or max(d, i)  # per channel: one group covers the K of w13 (d) and of w2 (i)
        for w, n, k in (("w13", 2 * i, d), ("w2", d, i)):
            groups = _cdiv(k, layer.group_size)
            setattr(layer, f"{w}_qweight", new_param(e, n, _cdiv(k, 8), dtype=torch.int32, device=device))
            setattr(layer, f"{w}_scales", new_param(e, n, groups, dtype=torch.float32, device=device))
            setattr(layer, f"{w}_zeros", new_param(e, n, groups, dtype=torch.uint8, device=device))
        layer.w13_perm = new_param(e, d, dtype=torch.int32, device=device) if self.fmt.act_order else None
        # each projection's order as loaded (CPU, until finish_loading): gate_proj, up_proj, down_proj
        layer.load_orders = {proj: torch.empty(e, k, dtype=torch.int32)
                             for proj, _, _, k in _expert_projections(layer)} if self.fmt.act_order else None

    def apply(self, layer, x, topk_weights, topk_ids, shared, shared_gate):
        fold = _foldable_shared(layer, shared, Int4LinearMethod)
        kw = dict(shared_w13=(fold.gate_up_proj.qweight, fold.gate_up_proj.scales, fold.gate_up_proj.zeros),
                  shared_w2=(fold.down_proj.qweight, fold.down_proj.scales, fold.down_proj.zeros),
                  shared_gate=shared_gate) if fold else _shared_kwargs(layer, x, shared, shared_gate)
        return int4_fused_moe(x=x, w13_qweight=layer.w13_qweight, w13_scales=layer.w13_scales,
                              w13_zeros=layer.w13_zeros, w2_qweight=layer.w2_qweight, w2_scales=layer.w2_scales,
                              w2_zeros=layer.w2_zeros, group_size=layer.group_size, topk_weights=topk_weights,
                              topk_ids=topk_ids, w13_perm=layer.w13_perm, **kw)

    def layout(self, layer: Experts, prefix: str, present: Set[str]) -> dict[str, WeightSlot]:
        layer.checkpoint_prefix = prefix
        orders = layer.load_orders
        out = {}
        for e in range(layer.num_experts):
            for proj, w, rows, k in _expert_projections(layer):
                dest = Int4Dest(getattr(layer, f"{w}_qweight")[e, rows], getattr(layer, f"{w}_scales")[e, rows],
                                getattr(layer, f"{w}_zeros")[e, rows], orders[proj][e] if orders else None)
                out.update(int4_slots(self.fmt, f"{prefix}{layer.expert_offset + e}.{proj}", dest,
                                      rows.stop - rows.start, k,
                                      self.present, tp_shard(layer, f"{proj}.weight"),
                                      layer.group_size if self.fmt.group_size else None))
        return out

    def finish_loading(self, layer: Experts) -> None:
        """Act-order: check that each expert's gate and up share one order, keep it as w13_perm (none where no
        expert permutes: the plain kernels), and put the gate and up rows in down_proj's order."""
        if layer.load_orders is None:
            return
        gate, up, down = (layer.load_orders[p] for p in ("gate_proj", "up_proj", "down_proj"))
        layer.load_orders = None
        prefix = layer.checkpoint_prefix
        differ = (gate != up).any(dim=1).nonzero().flatten().tolist()
        if differ:
            e = layer.expert_offset + differ[0]
            more = f" (and {len(differ) - 1} more experts)" if len(differ) > 1 else ""
            raise QuantizationError(
                f"{prefix}{e}.gate_proj and {prefix}{e}.up_proj{more}: their g_idx order the input columns "
                "differently; the MoE kernels read an expert's gate and up rows with one order of its input (GPTQ "
                "gives both the same, from the same inputs), so this checkpoint cannot be served as it is: quantize "
                "it again, without act-order or with one order for both")
        i = layer.intermediate_size
        identity = torch.arange(gate.shape[1])
        layer.w13_perm = layer.w13_perm.copy_(gate) if (gate != identity).any() else None
        if (down != torch.arange(i)).any():
            rows = down.to(layer.w13_qweight.device, torch.int64)
            for t in (layer.w13_qweight, layer.w13_scales, layer.w13_zeros):
                for part in (t[:, :i], t[:, i:]):  # gate rows, up rows
                    part.copy_(part.gather(1, rows[:, :, None].expand(part.shape)))

    def init_dummy(self, layer: Experts, prefix: str, seed: int) -> None:
        _dummy_int4(layer.w13_qweight, layer.w13_scales, layer.w13_zeros, layer.hidden_size, prefix + "w13", seed)
        _dummy_int4(layer.w2_qweight, layer.w2_scales, layer.w2_zeros, layer.intermediate_size, prefix + "w2", seed)
        if layer.w13_perm is not None:  # act-order in the config: an order for each expert (here the identity)
            layer.w13_perm.copy_(torch.arange(layer.hidden_size))
        layer.load_orders = None


class Fp8ExpertsMethod(ExpertsMethod):
    """Routed experts in FP8: w13 [E, 2I, D], w2 [E, D, I] e4m3 with fp32 scales per row and K block."""

    def __init__(self, fmt: WeightFormat) -> None:
        self.fmt, self.name = fmt, fmt.describe()

    def create_weights(self, layer: Experts, *, dtype: torch.dtype, device: torch.device | str | None) -> None:
        e, d, i = layer.num_experts, layer.hidden_size, layer.intermediate_size
        bk = self.fmt.group_size
        tp = tp_shard(layer, "down_proj.weight") or tp_shard(layer, "down_proj")  # per-expert or fused, if split
        # per channel: one K block covers the K of w13 (d) and of w2 (i), so each row keeps its one scale
        layer.block_k = k_group("fp8", bk, i, tp if tp is not None and tp.dim > 0 else None) \
            if bk else max(d, i)
        layer.w13 = new_param(e, 2 * i, d, dtype=_FP8, device=device)
        layer.w13_scale = new_param(e, 2 * i, _cdiv(d, layer.block_k), dtype=torch.float32, device=device)
        layer.w2 = new_param(e, d, i, dtype=_FP8, device=device)
        layer.w2_scale = new_param(e, d, _cdiv(i, layer.block_k), dtype=torch.float32, device=device)

    def apply(self, layer, x, topk_weights, topk_ids, shared, shared_gate):
        fold = _foldable_shared(layer, shared, Fp8LinearMethod)
        kw = dict(shared_w13=(fold.gate_up_proj.weight, fold.gate_up_proj.weight_scale),
                  shared_w2=(fold.down_proj.weight, fold.down_proj.weight_scale), shared_gate=shared_gate) \
            if fold else _shared_kwargs(layer, x, shared, shared_gate)
        return fp8_fused_moe(x=x, w13=layer.w13, w13_scale=layer.w13_scale, w2=layer.w2, w2_scale=layer.w2_scale,
                             block_k=layer.block_k, topk_weights=topk_weights, topk_ids=topk_ids, **kw)

    def layout(self, layer: Experts, prefix: str, present: Set[str]) -> dict[str, WeightSlot]:
        fmt = self.fmt
        if f"{prefix}gate_up_proj" in present or f"{prefix}down_proj" in present:
            return self._fused_layout(layer, prefix)
        out = {}
        for e in range(layer.num_experts):
            for proj, w, rows, k in _expert_projections(layer):
                out.update(fp8_slots(fmt, f"{prefix}{layer.expert_offset + e}.{proj}", getattr(layer, w)[e, rows],
                                     getattr(layer, f"{w}_scale")[e, rows], rows.stop - rows.start, k,
                                     tp_shard(layer, f"{proj}.weight"), layer.block_k))
        return out

    def _fused_layout(self, layer: Experts, prefix: str) -> dict[str, WeightSlot]:
        """Fused FP8 experts: gate_up_proj [E, 2I, D] e4m3 with gate_up_proj{scale suffix} [E, 2I/bn, D/bk]
        (and the same for down_proj), our reading of the fused layout with per-expert block scales."""
        out = {}
        for w, ckpt in (("w13", "gate_up_proj"), ("w2", "down_proj")):
            weight, scale = getattr(layer, w), getattr(layer, f"{w}_scale")
            out.update(_fused_fp8_slots(self.fmt, f"{prefix}{ckpt}", weight, scale, tp_shard(layer, ckpt),
                                        layer.block_k))
        return out

    def init_dummy(self, layer: Experts, prefix: str, seed: int) -> None:
        _dummy_fp8(layer.w13, layer.w13_scale, layer.hidden_size, prefix + "w13", seed)
        _dummy_fp8(layer.w2, layer.w2_scale, layer.intermediate_size, prefix + "w2", seed)


def _foldable_shared(layer: Experts, shared, method: type) -> MLP | None:
    """The shared expert when the routed experts' op can run it as one more expert per token: both its projections
    in the experts' format (`method`, FP8 without dynamic activations, int4 without act-order) with the same
    intermediate size and the same group (or block) along each K. Otherwise None: it runs through its own layers."""
    if shared is None or shared.down_proj.in_features != layer.intermediate_size:
        return None
    group = layer.group_size if method is Int4LinearMethod else layer.block_k
    for proj, k in ((shared.gate_up_proj, layer.hidden_size), (shared.down_proj, layer.intermediate_size)):
        if type(proj.method) is not method:
            return None
        if method is Int4LinearMethod and (proj.perm is not None or min(proj.group_size, k) != min(group, k)):
            return None
        if method is Fp8LinearMethod and (proj.method.fmt.act_fp8 or min(proj.block_k, k) != min(group, k)):
            return None
    return shared


def _shared_kwargs(layer: Experts, x: torch.Tensor, shared, shared_gate) -> dict:
    """A shared expert in another format than the experts'. Unquantized with the experts' intermediate size (Qwen's
    GPTQ-Int4 layout keeps it bf16): its dense weights go into the op, whose per-pair kernels run it as one more
    pair (three launches fewer a layer at decode batches). Otherwise it runs through its own layers and its output
    goes into the op, which adds it weighted by sigmoid(shared_gate) in its fp32 sum."""
    if shared is None:
        return {}
    if shared.down_proj.in_features == layer.intermediate_size and unquantized_mlp(shared):
        return dict(shared_w13=shared.gate_up_proj.weight, shared_w2=shared.down_proj.weight, shared_gate=shared_gate)
    return dict(shared_out=shared(x), shared_gate=shared_gate)


def experts_method(fmt: WeightFormat, present: Set[str] | None) -> ExpertsMethod:
    if fmt.kind == "int4":
        return Int4ExpertsMethod(fmt, present)
    if fmt.kind == "fp8":
        return Fp8ExpertsMethod(fmt)
    return ExpertsMethod()


# ---- choosing the methods of a built model -----------------------------------------------------------------------

_ROUTER_SHARDS = ("gate", "shared_expert_gate")


def _class_key(path: str) -> str:
    """model.layers.3.linear_attn.in_proj_qkv -> linear_attn.in_proj_qkv (mtp.* kept apart)."""
    key = re.sub(r"^model\.layers\.\d+\.", "", path)
    key = re.sub(r"\.experts\.\d+\.\w+$", ".experts", key)
    return re.sub(r"^mtp\.layers\.\d+\.", "mtp.", key)


def quantize_model(model: nn.Module, resolver: QuantResolver, *, dtype: torch.dtype,
                   device: torch.device | str | None) -> dict[str, Counter[str]]:
    """Give every linear layer and experts block of `model` (built on the meta device) the method of its checkpoint
    format and create its weights on `device`; then create every other parameter still on meta. Returns, per module
    class (e.g. "self_attn.o_proj"), how many modules hold each format, for the start-up log line."""
    from deltaserve.layers.embedding import LMHead
    summary: dict[str, Counter[str]] = {}

    any_act_fp8 = False

    def note(path: str, fmt: WeightFormat) -> None:
        nonlocal any_act_fp8
        any_act_fp8 |= fmt.act_fp8
        summary.setdefault(_class_key(path), Counter())[fmt.describe(dtype)] += 1

    for path, module in list(model.named_modules()):
        if isinstance(module, _Part):
            continue
        if isinstance(module, MergedLinear):
            parent = path.rpartition(".")[0]
            groups: list[tuple[dict[str, int], WeightFormat]] = []
            last = ""
            for shard, size in module.shards.items():
                name = f"{parent}.{shard}" if parent else shard
                router = shard in _ROUTER_SHARDS and parent.endswith("mlp")
                fmt = resolver.linear(name, dummy_default=not router)
                note(name, fmt)
                # act-order parts share one GEMM only where they share one order of the input
                if groups and groups[-1][1] == fmt and (not fmt.act_order or resolver.same_order(last, name, fmt)):
                    groups[-1][0][shard] = size
                else:
                    groups.append(({shard: size}, fmt))
                last = name
            if len(groups) == 1:
                method = linear_method(groups[0][1], resolver.present)
            else:
                method = SplitLinearMethod([(s, linear_method(f, resolver.present)) for s, f in groups])
            _replace_method(module, method, dtype, device, path)
        elif isinstance(module, Linear):
            # the lm_head is quantized only when the checkpoint holds it so (never for dummy weights)
            fmt = resolver.linear(path, dummy_default=not isinstance(module, LMHead))
            note(path, fmt)
            _replace_method(module, linear_method(fmt, resolver.present), dtype, device, path)
        elif isinstance(module, Experts):
            fmt = resolver.experts(f"{path}.", module.checkpoint_experts)
            note(f"{path}.0.gate_proj", fmt)
            for name in [n for n, _ in module.named_parameters(recurse=False)]:
                delattr(module, name)
            module.method = experts_method(fmt, resolver.present)
            _create(path, lambda: module.method.create_weights(module, dtype=dtype, device=device))
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.is_meta:
                setattr(module, name, new_param(*p.shape, dtype=p.dtype, device=device))
    if resolver.fp8_activations == "dynamic" and not any_act_fp8:
        raise QuantizationError(f"--fp8-activations dynamic applies to FP8 linear layers, and this {resolver.method!r} "
                                "checkpoint has none (routed experts and the lm_head keep their activations); use "
                                "--fp8-activations off")
    return summary


def _replace_method(layer: Linear, method: LinearMethod, dtype: torch.dtype,
                    device: torch.device | str | None, path: str = "") -> None:
    for name in [n for n, _ in layer.named_parameters(recurse=False)]:
        delattr(layer, name)
    layer.method = method
    _create(path, lambda: method.create_weights(layer, dtype=dtype, device=device))


def _create(path: str, create) -> None:
    """create(), its QuantizationError (e.g. a tensor-parallel split the format cannot take) naming the module."""
    try:
        create()
    except QuantizationError as e:
        raise QuantizationError(f"{path}: {e}") from None


def describe_summary(method: str, summary: dict[str, Counter[str]]) -> str:
    """e.g. "weights (gptq): mlp.experts int4 g128; self_attn.qkv bf16; ..." with counts where a class is mixed."""
    parts = []
    for key, counts in summary.items():
        if len(counts) == 1:
            parts.append(f"{key} {next(iter(counts))}")
        else:
            parts.append(f"{key} " + " / ".join(f"{f} x{c}" for f, c in counts.most_common()))
    return f"weight formats ({method}): " + "; ".join(parts)


def weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# the internal layouts' tensors (the methods above): int32 words of 8 int4 codes, and what only scales the codes
_INT4_WORDS = ("qweight", "w13_qweight", "w2_qweight")
_QUANT_METADATA = ("scales", "zeros", "perm", "weight_scale", "w13_scales", "w13_zeros", "w2_scales", "w2_zeros",
                   "w13_scale", "w2_scale")


@dataclass(frozen=True)
class StepWeights:
    """What one forward step reads of a model's weights, for the step-time prior (engine/step_cost.py).

    bytes: bytes as stored (packed int4 words, fp8, scales and zero points included). params: the weights the
    matmuls multiply by, as they are used (8 per packed int4 word; none for scales, zero points or act-order
    permutations), so 2 flops each per token; expert_params: those of the routed experts (a token reaches top-k of
    them). The input embedding is a row gather: neither (unless tied, when the lm_head multiplies by it)."""

    bytes: int
    params: int
    expert_params: int


def step_weights(model: nn.Module) -> StepWeights:
    from deltaserve.layers.embedding import TiedLMHead, VocabEmbedding
    tied = {id(m._embedding[0]) for m in model.modules() if isinstance(m, TiedLMHead)}
    gathered = {id(p) for m in model.modules() if isinstance(m, VocabEmbedding) and id(m) not in tied
                for p in m.parameters(recurse=False)}
    nbytes = params = experts = 0
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if id(p) in gathered:
            continue
        leaf = name.rpartition(".")[2]
        nbytes += p.numel() * p.element_size()
        n = 0 if leaf in _QUANT_METADATA else p.numel() * (8 if leaf in _INT4_WORDS else 1)
        params += n
        if ".experts." in name:
            experts += n
    return StepWeights(nbytes, params, experts)


__all__ = ["QuantResolver", "QuantizationError", "StepWeights", "WeightFormat", "describe_summary", "quantize_model",
           "step_weights", "weight_bytes"]
