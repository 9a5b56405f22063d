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

Checkpoint layouts (wave2.md A.0): GPTQ v1 qweight [K/8, N] (packed along K), qzeros [K/G, N/8] stored as zero - 1,
scales [K/G, N], g_idx [K]; AutoAWQ GEMM qweight [K, N/8] and qzeros [K/G, N/8] packed along N in the nibble order
0,4,1,5,2,6,3,7; compressed-tensors weight_packed [N, K/8] (codes + 8), weight_scale [N, K/G], weight_zero_point
[N/8, K/G] (packed along N), weight_shape, weight_g_idx; FP8 weight e4m3 [N, K] with weight_scale_inv (Qwen) or
weight_scale (compressed-tensors) [ceil(N/bn), ceil(K/bk)] block scales, or [N, 1] per channel, all multipliers.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Set
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from deltaserve.kernels.quant import fp8_fused_moe, fp8_linear, int4_fused_moe, int4_linear
from deltaserve.kernels.quant.ref import pack_int4, unpack_int4
from deltaserve.layers.linear import Linear, LinearMethod, MergedLinear, new_param
from deltaserve.layers.moe import Experts, ExpertsMethod
from deltaserve.layers.weights import TensorSource, WeightSlot, seeded

SUPPORTED_METHODS = ("fp8", "gptq", "awq", "compressed-tensors")
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
    checkpoint may carry a g_idx that permutes K (GPTQ desc_act, compressed-tensors actorder "group")."""

    kind: str = "unquantized"
    checkpoint: str = "plain"
    group_size: int = 0
    block_n: int = 0
    zero_offset: int = 0
    symmetric: bool = True
    act_order: bool = False
    scale_name: str = ""

    @property
    def quantized(self) -> bool:
        return self.kind != "unquantized"

    def describe(self, dtype: torch.dtype | None = None) -> str:
        if self.kind == "fp8":
            if self.group_size == 0:
                return "fp8 per-channel"
            return f"fp8 block {self.block_n}x{self.group_size}"
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
    """Module names given as exact names, enclosing modules (a whole layer) or dotted suffixes (`lm_head`,
    `mlp.gate`), plus regexes matched from the start of the name."""

    def __init__(self, names: list[str] | None = None, regexes: list[str] | None = None) -> None:
        self.names = [_our_name(n.rstrip(".")) for n in names or []]
        self.regexes = [re.compile(r) for r in regexes or []]

    def __contains__(self, name: str) -> bool:
        dotted = f".{name}."
        for n in self.names:
            if n == name or name.startswith(n + ".") or f".{n}." in dotted:
                return True
        return any(r.match(form) for r in self.regexes for form in _name_forms(name))


class QuantResolver:
    """Chooses each module's WeightFormat from the quantization_config and the checkpoint's tensor names (our module
    paths; None for dummy weights, when the config alone decides)."""

    def __init__(self, method: str, raw: dict[str, Any], present: Set[str] | None) -> None:
        self.method, self.raw, self.present = method, raw, present
        if method not in SUPPORTED_METHODS:
            raise QuantizationError(f"quantization_config.quant_method {method!r} is not supported; deltaserve loads "
                                    f"{', '.join(SUPPORTED_METHODS)} checkpoints")
        self.ct_groups: list[tuple[list[str], WeightFormat]] = []
        self.positive: list[tuple[re.Pattern[str], dict[str, Any]]] = []
        getattr(self, "_parse_" + method.replace("-", "_"))(raw)

    # ---- the config ---------------------------------------------------------------------------------------------

    def _parse_fp8(self, raw: dict[str, Any]) -> None:
        fmt = raw.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise QuantizationError(f"quantization_config.fmt {fmt!r}: only e4m3 FP8 weights are supported")
        block = raw.get("weight_block_size")
        if block is None:
            self.default = WeightFormat("fp8", "fp8", 0, 1, scale_name="weight_scale_inv")
        else:
            if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0
                                                                                 for b in block)):
                raise QuantizationError(f"quantization_config.weight_block_size {block!r}: expected [block_n, "
                                        "block_k], e.g. [128, 128]")
            self.default = WeightFormat("fp8", "fp8", block[1], block[0], scale_name="weight_scale_inv")
        self.skip = _ModuleSet(list(raw.get("modules_to_not_convert") or []) + list(raw.get("ignored_layers") or []))

    def _int4_bits(self, bits: Any, where: str) -> None:
        if bits != 4:
            raise QuantizationError(f"{where} is {bits!r}: deltaserve loads 4-bit integer weights (bits 4) and FP8 "
                                    "(quant_method fp8 or compressed-tensors float 8-bit)")

    def _parse_gptq(self, raw: dict[str, Any]) -> None:
        self._int4_bits(raw.get("bits"), "quantization_config.bits")
        fmt = raw.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise QuantizationError(f"quantization_config.checkpoint_format {fmt!r}: expected gptq (v1) or gptq_v2")
        group = raw.get("group_size", 128)
        self.default = WeightFormat("int4", "gptq", 0 if group in (-1, None) else int(group), 0,
                                    zero_offset=1 if fmt == "gptq" else 0, symmetric=bool(raw.get("sym", True)),
                                    act_order=bool(raw.get("desc_act", False)))
        dynamic = raw.get("dynamic") or {}
        negative = [k[2:] for k in dynamic if k.startswith("-:")]
        for key, override in dynamic.items():
            if key.startswith("-:"):
                continue
            pattern = key[2:] if key.startswith("+:") else key
            self.positive.append((re.compile(pattern), dict(override or {})))
        self.skip = _ModuleSet(list(raw.get("modules_to_not_convert") or []), negative)

    def _parse_awq(self, raw: dict[str, Any]) -> None:
        self._int4_bits(raw.get("bits", raw.get("w_bit")), "quantization_config.bits")
        version = str(raw.get("version", "gemm")).lower()
        if version != "gemm":
            raise QuantizationError(f"quantization_config.version {version!r}: only AutoAWQ GEMM checkpoints "
                                    "(version 'gemm') are supported")
        if not raw.get("zero_point", True):
            raise QuantizationError("quantization_config.zero_point false: AWQ checkpoints without zero points are "
                                    "not supported")
        group = raw.get("group_size", raw.get("q_group_size", 128))
        self.default = WeightFormat("int4", "awq", 0 if group in (-1, None) else int(group), symmetric=False)
        self.skip = _ModuleSet(list(raw.get("modules_to_not_convert") or []))

    def _parse_compressed_tensors(self, raw: dict[str, Any]) -> None:
        top = raw.get("format")
        groups = raw.get("config_groups") or {}
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
                wf = WeightFormat("int4", "ct-int4", int(w.get("group_size") or 0) if strategy == "group" else 0,
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
                    bn, bk = w.get("block_structure") or (128, 128)
                    wf = WeightFormat("fp8", "ct-fp8", int(bk), int(bn), scale_name="weight_scale")
                elif strategy == "channel":
                    wf = WeightFormat("fp8", "ct-fp8", 0, 1, scale_name="weight_scale")
                else:
                    raise QuantizationError(f"{where}.weights.strategy {strategy!r}: FP8 weights must be block or "
                                            "channel scaled")
            else:
                raise QuantizationError(f"{where}.weights.type {w.get('type')!r}: expected int (4-bit) or float "
                                        "(8-bit)")
            self.ct_groups.append((list(group.get("targets") or ["Linear"]), wf))
        ignore = list(raw.get("ignore") or [])
        self.skip = _ModuleSet([n for n in ignore if not n.startswith("re:")],
                               [n[3:] for n in ignore if n.startswith("re:")])
        self.default = self.ct_groups[0][1]

    def configured(self, name: str) -> WeightFormat:
        """The format the config gives module `name` (our path)."""
        if name in self.skip:
            return UNQUANTIZED
        if self.method == "compressed-tensors":
            for targets, wf in self.ct_groups:
                for t in targets:
                    if t == "Linear" or t == name or (t.startswith("re:") and any(
                            re.match(t[3:], f) for f in _name_forms(name))):
                        return wf
            return UNQUANTIZED
        fmt = self.default
        for pattern, override in self.positive:
            if any(pattern.match(f) for f in _name_forms(name)):
                if "bits" in override:
                    self._int4_bits(override["bits"], f"quantization_config.dynamic[{pattern.pattern!r}].bits")
                if "group_size" in override:
                    fmt = replace(fmt, group_size=max(0, int(override["group_size"])))
                if "desc_act" in override:
                    fmt = replace(fmt, act_order=bool(override["desc_act"]))
                if "sym" in override:
                    fmt = replace(fmt, symmetric=bool(override["sym"]))
        return fmt

    # ---- the tensors --------------------------------------------------------------------------------------------

    def linear(self, name: str, *, dummy_default: bool = True) -> WeightFormat:
        """The format of the linear projection whose checkpoint path (ours) is `name`."""
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
        if conf.kind == "int4" and conf.checkpoint in ("gptq", "ct-int4"):
            g = "g_idx" if conf.checkpoint == "gptq" else "weight_g_idx"
            if has(g) and not conf.act_order:
                conf = replace(conf, act_order=True)  # a g_idx to check (trivial unless desc_act)
        return conf

    def experts(self, prefix: str, num_experts: int) -> WeightFormat:
        """The format shared by all routed experts under `prefix` (ours, with a trailing dot)."""
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
                formats[f"{e}.{proj}"] = self.linear(f"{prefix}{e}.{proj}")
        kinds = set(formats.values())
        if len(kinds) > 1:
            by = {}
            for where, f in formats.items():
                by.setdefault(f.describe(), where)
            raise QuantizationError(f"{prefix.rstrip('.')}: the experts of one layer must share one format; found "
                                    + ", ".join(f"{d} (e.g. {w})" for d, w in by.items()))
        fmt = kinds.pop()
        if fmt.kind == "int4" and fmt.act_order:
            fmt = replace(fmt, act_order=False)  # experts: g_idx must be trivial (checked when loading)
        return fmt


# ---- checkpoint tensors -> internal layouts ----------------------------------------------------------------------

def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _read(source: TensorSource, dtypes: tuple[torch.dtype, ...], what: str) -> torch.Tensor:
    t = source.read()
    if t.dtype not in dtypes:
        raise QuantizationError(f"{source.name}: dtype {t.dtype} where {what} ({', '.join(map(str, dtypes))}) "
                                "was expected")
    return t


_INT_PACKED = (torch.int32,)
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class Int4Dest:
    """Where one checkpoint projection's int4 weight goes: views of the layer's tensors for its rows."""

    qweight: torch.Tensor   # [n, ceil(K/8)] int32
    scales: torch.Tensor    # [n, groups] fp32
    zeros: torch.Tensor     # [n, groups] uint8
    perm: torch.Tensor | None  # [K] int64 when K may be permuted (act-order), else None


def int4_slots(fmt: WeightFormat, name: str, dest: Int4Dest, n: int, k: int,
               present: Set[str] | None) -> dict[str, WeightSlot]:
    """The checkpoint tensors of one int4 projection `name` with n output rows and k inputs. They are collected as
    they arrive and converted together once the last one is in."""
    g = fmt.group_size or k
    ng = _cdiv(k, g)
    if fmt.checkpoint == "gptq":
        spec = {"qweight": ((_cdiv(k, 8), n), False), "qzeros": ((ng, _cdiv(n, 8)), False),
                "scales": ((ng, n), False), "g_idx": ((k,), True)}
    elif fmt.checkpoint == "awq":
        spec = {"qweight": ((k, _cdiv(n, 8)), False), "qzeros": ((ng, _cdiv(n, 8)), False),
                "scales": ((ng, n), False)}
    else:
        spec = {"weight_packed": ((n, _cdiv(k, 8)), False), "weight_scale": ((n, ng), False),
                "weight_shape": ((2,), True), "weight_g_idx": ((k,), True)}
        if not fmt.symmetric:
            spec["weight_zero_point"] = ((_cdiv(n, 8), ng), False)
    expected = {s for s, (_, optional) in spec.items() if not optional or present is None or f"{name}.{s}" in present}
    got: dict[str, torch.Tensor] = {}

    def finish() -> None:
        q, z, s, gidx = _convert_int4(fmt, name, got, n, k, g)
        if gidx is not None:
            trivial = torch.arange(k) // g
            if torch.equal(gidx.long(), trivial):
                gidx = None
            elif dest.perm is None:
                raise QuantizationError(f"{name}.g_idx: a permuted (act-order) g_idx, but this module's weights "
                                        "cannot take one (a merged projection or MoE experts need g_idx = k // "
                                        "group_size, i.e. desc_act false)")
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
            got[suffix] = _read(source, dtypes, "packed int32 codes" if dtypes == _INT_PACKED else suffix).clone()
            if expected <= got.keys():
                finish()
        shape, optional = spec[suffix]
        return WeightSlot(shape, load, optional=optional)

    return {f"{name}.{s}": slot(s) for s in spec}


def _unpack_along_rows(packed: torch.Tensor, rows: int) -> torch.Tensor:
    """int32 [R, C] packed along dim 0 -> codes [rows, C]."""
    return unpack_int4(packed.T.contiguous(), rows).T


def _convert_int4(fmt: WeightFormat, name: str, t: dict[str, torch.Tensor], n: int, k: int, g: int):
    """Checkpoint tensors -> (codes [n, k] uint8, zeros [n, groups] uint8, scales [n, groups] fp32, g_idx|None)."""
    gidx = None
    if fmt.checkpoint == "gptq":
        q = _unpack_along_rows(t["qweight"], k).T                      # [n, k]
        z = unpack_int4(t["qzeros"], n).T.int() + fmt.zero_offset     # [n, groups]
        s = t["scales"].float().T
        gidx = t.get("g_idx")
        if z.max() > 15:
            raise QuantizationError(f"{name}.qzeros: stored zero point 15 plus GPTQ v1's offset of 1 is out of "
                                    "the 4-bit range; is this a gptq_v2 checkpoint (set checkpoint_format)?")
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
              k: int) -> dict[str, WeightSlot]:
    """The checkpoint tensors of one FP8 projection `name` ([n, k] e4m3 and its scales), into `weight` [n, k] and
    `scale` [n, ceil(k / bk)] (fp32, one row per output row)."""
    bn, bk = fmt.block_n or 1, fmt.group_size or k
    scale_shape = (n, 1) if fmt.group_size == 0 else (_cdiv(n, bn), _cdiv(k, bk))

    def load_weight(source: TensorSource) -> None:
        weight.copy_(_read(source, (_FP8,), "FP8 e4m3 weights"))

    def load_scale(source: TensorSource) -> None:
        s = _read(source, _FLOATS, "floating-point scales").float()
        scale.copy_(s.repeat_interleave(bn, dim=0)[:n])
    return {f"{name}.weight": WeightSlot((n, k), load_weight),
            f"{name}.{fmt.scale_name}": WeightSlot(scale_shape, load_scale)}


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
        groups = _cdiv(k, self.fmt.group_size or k)
        layer.qweight = new_param(n, _cdiv(k, 8), dtype=torch.int32, device=device)
        layer.scales = new_param(n, groups, dtype=torch.float32, device=device)
        layer.zeros = new_param(n, groups, dtype=torch.uint8, device=device)
        layer.perm = new_param(k, dtype=torch.int64, device=device) if self.fmt.act_order else None
        layer.group_size = self.fmt.group_size or k

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return int4_linear(x=x, qweight=layer.qweight, scales=layer.scales, zeros=layer.zeros,
                           group_size=layer.group_size, perm=layer.perm)

    def shard_layout(self, layer: Linear, name: str, rows: slice) -> dict[str, WeightSlot]:
        dest = Int4Dest(layer.qweight[rows], layer.scales[rows], layer.zeros[rows], layer.perm)
        return int4_slots(self.fmt, name, dest, rows.stop - rows.start, layer.in_features, self.present)

    def init_dummy(self, layer: Linear, prefix: str, seed: int) -> None:
        _dummy_int4(layer.qweight, layer.scales, layer.zeros, layer.in_features, prefix + "qweight", seed)
        if layer.perm is not None:
            layer.perm.copy_(torch.arange(layer.in_features))


class Fp8LinearMethod(LinearMethod):
    """FP8 e4m3 weights with an fp32 scale per row and K block; activations stay in the model dtype."""

    def __init__(self, fmt: WeightFormat) -> None:
        self.fmt, self.name = fmt, fmt.describe()

    def create_weights(self, layer: Linear, *, dtype: torch.dtype, device: torch.device | str | None) -> None:
        n, k = layer.out_features, layer.in_features
        layer.block_k = self.fmt.group_size or k
        layer.weight = new_param(n, k, dtype=_FP8, device=device)
        layer.weight_scale = new_param(n, _cdiv(k, layer.block_k), dtype=torch.float32, device=device)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x=x, weight=layer.weight, scale=layer.weight_scale, block_k=layer.block_k)

    def shard_layout(self, layer: Linear, name: str, rows: slice) -> dict[str, WeightSlot]:
        return fp8_slots(self.fmt, name, layer.weight[rows], layer.weight_scale[rows], rows.stop - rows.start,
                         layer.in_features)

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
    concatenated, so the layer's output is the same [T, sum of shards] as before."""

    def __init__(self, groups: list[tuple[dict[str, int], LinearMethod]]) -> None:
        self.groups = groups
        self.name = "split(" + ", ".join(f"{'+'.join(s)}: {m.name}" for s, m in groups) + ")"

    def create_weights(self, layer: Linear, *, dtype: torch.dtype, device: torch.device | str | None) -> None:
        layer.parts = nn.ModuleList(_Part(layer.in_features, shards, dtype=dtype, device=device, method=method)
                                    for shards, method in self.groups)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in layer.parts], dim=-1)

    def shard_layout(self, layer: Linear, name: str, rows: slice) -> dict[str, WeightSlot]:
        shard = name.rpartition(".")[2]
        for part in layer.parts:
            if shard in part.shards:
                return part.method.shard_layout(part, name, part.shard_rows()[shard])
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

class Int4ExpertsMethod(ExpertsMethod):
    """Routed experts in int4: w13 (gate rows, then up rows) [E, 2I, D] and w2 [E, D, I] in the internal layout."""

    def __init__(self, fmt: WeightFormat, present: Set[str] | None) -> None:
        self.fmt, self.present, self.name = fmt, present, fmt.describe()

    def create_weights(self, layer: Experts, *, dtype: torch.dtype, device: torch.device | str | None) -> None:
        e, d, i = layer.num_experts, layer.hidden_size, layer.intermediate_size
        g = self.fmt.group_size
        if g and (d % g or i % g):
            raise QuantizationError(f"int4 experts with group size {g} need hidden size ({d}) and expert "
                                    f"intermediate size ({i}) to be multiples of it")
        layer.group_size = g or max(d, i)
        if not g and d != i:
            raise QuantizationError("per-channel int4 experts need hidden size == intermediate size")
        for w, n, k in (("w13", 2 * i, d), ("w2", d, i)):
            groups = _cdiv(k, layer.group_size)
            setattr(layer, f"{w}_qweight", new_param(e, n, _cdiv(k, 8), dtype=torch.int32, device=device))
            setattr(layer, f"{w}_scales", new_param(e, n, groups, dtype=torch.float32, device=device))
            setattr(layer, f"{w}_zeros", new_param(e, n, groups, dtype=torch.uint8, device=device))

    def routed(self, layer: Experts, x: torch.Tensor, topk_weights: torch.Tensor,
               topk_ids: torch.Tensor) -> torch.Tensor:
        return int4_fused_moe(x=x, w13_qweight=layer.w13_qweight, w13_scales=layer.w13_scales,
                              w13_zeros=layer.w13_zeros, w2_qweight=layer.w2_qweight, w2_scales=layer.w2_scales,
                              w2_zeros=layer.w2_zeros, group_size=layer.group_size, topk_weights=topk_weights,
                              topk_ids=topk_ids)

    def apply(self, layer, x, topk_weights, topk_ids, shared, shared_gate):
        return _with_shared(self.routed(layer, x, topk_weights, topk_ids), x, shared, shared_gate)

    def layout(self, layer: Experts, prefix: str, present: Set[str]) -> dict[str, WeightSlot]:
        i, d = layer.intermediate_size, layer.hidden_size
        out = {}
        for e in range(layer.num_experts):
            for proj, w, rows, k in (("gate_proj", "w13", slice(0, i), d), ("up_proj", "w13", slice(i, 2 * i), d),
                                     ("down_proj", "w2", slice(0, d), i)):
                dest = Int4Dest(getattr(layer, f"{w}_qweight")[e, rows], getattr(layer, f"{w}_scales")[e, rows],
                                getattr(layer, f"{w}_zeros")[e, rows], None)
                out.update(int4_slots(self.fmt, f"{prefix}{e}.{proj}", dest, rows.stop - rows.start, k,
                                      self.present))
        return out

    def init_dummy(self, layer: Experts, prefix: str, seed: int) -> None:
        _dummy_int4(layer.w13_qweight, layer.w13_scales, layer.w13_zeros, layer.hidden_size, prefix + "w13", seed)
        _dummy_int4(layer.w2_qweight, layer.w2_scales, layer.w2_zeros, layer.intermediate_size, prefix + "w2", seed)


class Fp8ExpertsMethod(ExpertsMethod):
    """Routed experts in FP8: w13 [E, 2I, D], w2 [E, D, I] e4m3 with fp32 scales per row and K block."""

    def __init__(self, fmt: WeightFormat) -> None:
        self.fmt, self.name = fmt, fmt.describe()

    def create_weights(self, layer: Experts, *, dtype: torch.dtype, device: torch.device | str | None) -> None:
        e, d, i = layer.num_experts, layer.hidden_size, layer.intermediate_size
        bk = self.fmt.group_size
        if not bk and d != i:
            raise QuantizationError("per-channel FP8 experts need hidden size == intermediate size")
        layer.block_k = bk or d
        layer.w13 = new_param(e, 2 * i, d, dtype=_FP8, device=device)
        layer.w13_scale = new_param(e, 2 * i, _cdiv(d, layer.block_k), dtype=torch.float32, device=device)
        layer.w2 = new_param(e, d, i, dtype=_FP8, device=device)
        layer.w2_scale = new_param(e, d, _cdiv(i, layer.block_k), dtype=torch.float32, device=device)

    def apply(self, layer, x, topk_weights, topk_ids, shared, shared_gate):
        out = fp8_fused_moe(x=x, w13=layer.w13, w13_scale=layer.w13_scale, w2=layer.w2, w2_scale=layer.w2_scale,
                            block_k=layer.block_k, topk_weights=topk_weights, topk_ids=topk_ids)
        return _with_shared(out, x, shared, shared_gate)

    def layout(self, layer: Experts, prefix: str, present: Set[str]) -> dict[str, WeightSlot]:
        i, d = layer.intermediate_size, layer.hidden_size
        fmt = self.fmt
        if f"{prefix}gate_up_proj" in present or f"{prefix}down_proj" in present:
            return self._fused_layout(layer, prefix)
        out = {}
        for e in range(layer.num_experts):
            for proj, w, rows, k in (("gate_proj", "w13", slice(0, i), d), ("up_proj", "w13", slice(i, 2 * i), d),
                                     ("down_proj", "w2", slice(0, d), i)):
                out.update(fp8_slots(fmt, f"{prefix}{e}.{proj}", getattr(layer, w)[e, rows],
                                     getattr(layer, f"{w}_scale")[e, rows], rows.stop - rows.start, k))
        return out

    def _fused_layout(self, layer: Experts, prefix: str) -> dict[str, WeightSlot]:
        """Fused FP8 experts: gate_up_proj [E, 2I, D] e4m3 with gate_up_proj{scale suffix} [E, 2I/bn, D/bk]
        (and the same for down_proj), our reading of the fused layout with per-expert block scales."""
        out = {}
        for w, ckpt in (("w13", "gate_up_proj"), ("w2", "down_proj")):
            weight, scale = getattr(layer, w), getattr(layer, f"{w}_scale")
            out.update(_fused_fp8_slots(self.fmt, f"{prefix}{ckpt}", weight, scale))
        return out

    def init_dummy(self, layer: Experts, prefix: str, seed: int) -> None:
        _dummy_fp8(layer.w13, layer.w13_scale, layer.hidden_size, prefix + "w13", seed)
        _dummy_fp8(layer.w2, layer.w2_scale, layer.intermediate_size, prefix + "w2", seed)


def _fused_fp8_slots(fmt: WeightFormat, name: str, weight: torch.Tensor, scale: torch.Tensor):
    e, n, k = weight.shape
    bn, bk = fmt.block_n or 1, fmt.group_size or k

    def load_weight(source: TensorSource) -> None:
        weight.copy_(_read(source, (_FP8,), "FP8 e4m3 weights"))

    def load_scale(source: TensorSource) -> None:
        s = _read(source, _FLOATS, "floating-point scales").float()
        scale.copy_(s.repeat_interleave(bn, dim=1)[:, :n])
    shape = (e, n, 1) if fmt.group_size == 0 else (e, _cdiv(n, bn), _cdiv(k, bk))
    return {name: WeightSlot((e, n, k), load_weight), f"{name}{fmt.scale_name}": WeightSlot(shape, load_scale)}


def _with_shared(out: torch.Tensor, x: torch.Tensor, shared, shared_gate) -> torch.Tensor:
    if shared is None:
        return out
    return (out.float() + torch.sigmoid(shared_gate.float()) * shared(x).float()).to(x.dtype)


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

    def note(path: str, fmt: WeightFormat) -> None:
        summary.setdefault(_class_key(path), Counter())[fmt.describe(dtype)] += 1

    for path, module in list(model.named_modules()):
        if isinstance(module, _Part):
            continue
        if isinstance(module, MergedLinear):
            parent = path.rpartition(".")[0]
            groups: list[tuple[dict[str, int], WeightFormat]] = []
            for shard, size in module.shards.items():
                name = f"{parent}.{shard}" if parent else shard
                router = shard in _ROUTER_SHARDS and parent.endswith("mlp")
                fmt = resolver.linear(name, dummy_default=not router)
                note(name, fmt)
                if groups and groups[-1][1] == fmt and not fmt.act_order:
                    groups[-1][0][shard] = size
                else:
                    groups.append(({shard: size}, fmt))
            if len(groups) == 1:
                method = linear_method(groups[0][1], resolver.present)
            else:
                method = SplitLinearMethod([(s, linear_method(f, resolver.present)) for s, f in groups])
            _replace_method(module, method, dtype, device)
        elif isinstance(module, Linear):
            # the lm_head is quantized only when the checkpoint holds it so (never for dummy weights)
            fmt = resolver.linear(path, dummy_default=not isinstance(module, LMHead))
            note(path, fmt)
            _replace_method(module, linear_method(fmt, resolver.present), dtype, device)
        elif isinstance(module, Experts):
            fmt = resolver.experts(f"{path}.", module.num_experts)
            note(f"{path}.0.gate_proj", fmt)
            for name in [n for n, _ in module.named_parameters(recurse=False)]:
                delattr(module, name)
            module.method = experts_method(fmt, resolver.present)
            module.method.create_weights(module, dtype=dtype, device=device)
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.is_meta:
                setattr(module, name, new_param(*p.shape, dtype=p.dtype, device=device))
    return summary


def _replace_method(layer: Linear, method: LinearMethod, dtype: torch.dtype,
                    device: torch.device | str | None) -> None:
    for name in [n for n, _ in layer.named_parameters(recurse=False)]:
        delattr(layer, name)
    layer.method = method
    method.create_weights(layer, dtype=dtype, device=device)


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


__all__ = ["QuantResolver", "QuantizationError", "WeightFormat", "describe_summary", "quantize_model",
           "weight_bytes"]
