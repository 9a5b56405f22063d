"""How a module declares and loads its own checkpoint tensors. The loader (models/loader.py) only handles files: it
asks each module, through `weight_layout`, which checkpoint tensors it owns, checks names and shapes against the
file headers, and hands each tensor to the module's own `load` function, which narrows it to its shard if it keeps
only part of it. Both hooks cover a module's direct parameters (the loader visits every module); a module that
defines no layout loads its direct parameters under their own names.

A module may define:
    weight_layout(prefix, present) -> {checkpoint name: WeightSlot}
        prefix: the module's path plus "." (checkpoint naming); present: every checkpoint name in the files, so a
        module that accepts several layouts (fused or per-expert MoE weights) can pick the one the file has.
    init_dummy_weights(prefix, seed)
        random weights of realistic scale for benchmarks (load_format="dummy").
    finish_loading()
        called once every checkpoint tensor is loaded, for work that needs several of a module's tensors together
        (act-order int4 experts put their gate and up rows in their down projection's order); ValueError if what
        was loaded cannot be served.
    tp_shards: {checkpoint name suffix: Shard or None}
        under tensor parallelism, the part of each of its checkpoint tensors the module keeps
        (parallel/sharding.py); its slots then take the full tensor's shape and load only that part.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Set
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn


class TensorSource(Protocol):
    """A checkpoint tensor not yet read: its header, and reads of the whole or of a slice."""

    name: str
    shape: tuple[int, ...]

    def read(self) -> torch.Tensor:
        """The tensor (a CPU view valid only inside the load call that received this source)."""
        ...

    def narrow(self, dim: int, start: int, length: int) -> TensorSource:
        """The slice [start, start + length) along `dim`, read without reading the rest where the layout allows."""
        ...


@dataclass(frozen=True)
class WeightSlot:
    """One checkpoint tensor a module loads: its shape in the file, how it goes in, and how to give it back in
    checkpoint form (None: not written back, e.g. a tied lm_head). Optional slots may be absent from the file.
    sharded: the slot already takes the checkpoint's full shape and reads only the rank's part (quantized formats,
    whose tensors are split by their method, layers/quant.py); a module's tp_shards do not wrap it again."""

    shape: tuple[int, ...]
    load: Callable[[TensorSource], None]
    save: Callable[[], torch.Tensor] | None = None
    optional: bool = False
    sharded: bool = False


def copy_into(dest: torch.Tensor) -> Callable[[TensorSource], None]:
    """A load function that copies the whole tensor into `dest` (converting dtype and device). A quantized tensor
    (FP8 or integer) for a full-precision parameter is an error: converted, it would load as values without their
    scales (the linear layers and experts check the same, layers/linear.check_unquantized)."""
    def load(source: TensorSource) -> None:
        t = source.read()
        if dest.is_floating_point() and dest.element_size() > 1 and (not t.is_floating_point()
                                                                      or t.element_size() == 1):
            raise ValueError(f"{source.name}: a {t.dtype} tensor where a full-precision {dest.dtype} one was "
                             "expected (a quantized tensor, which deltaserve loads only for linear layers and "
                             "experts with their scales)")
        with torch.no_grad():
            dest.copy_(t)
    return load


def param_slot(param: torch.Tensor) -> WeightSlot:
    return WeightSlot(tuple(param.shape), copy_into(param), save=lambda: param.detach())


def direct_layout(module: nn.Module, prefix: str) -> dict[str, WeightSlot]:
    """The default layout: each direct parameter under its own name."""
    return {prefix + name: param_slot(p) for name, p in module.named_parameters(recurse=False)}


def layout_of(module: nn.Module, prefix: str, present: Set[str]) -> dict[str, WeightSlot]:
    custom = getattr(module, "weight_layout", None)
    layout = custom(prefix, present) if custom is not None else direct_layout(module, prefix)
    shards = getattr(module, "tp_shards", None)  # tensor parallelism: the part of each tensor this rank keeps
    return _sharded(layout, prefix, shards) if shards and any(shards.values()) else layout


def _sharded(layout: dict[str, WeightSlot], prefix: str, shards: dict) -> dict[str, WeightSlot]:
    """The slots wrapped by the module's `tp_shards` (parallel/sharding.py): name suffix -> Shard or None (kept
    whole)."""
    out = {}
    for name, slot in layout.items():
        shard = next((s for key, s in shards.items() if name == prefix + key or name.endswith("." + key)), None)
        out[name] = shard.wrap(slot) if shard is not None and not slot.sharded else slot
    return out


def seeded(name: str, seed: int, device: torch.device) -> torch.Generator:
    """The generator of one parameter's dummy values: a function of its name, so values do not depend on order."""
    return torch.Generator(device=device).manual_seed(seed + zlib.crc32(name.encode()))


def init_dummy_param(name: str, p: torch.Tensor, seed: int) -> None:
    """Realistic scale for a parameter with no rule of its own: 1-D (zero-centred RMSNorm weights, stored near 0)
    ~ N(0, 0.02); projections [.., out, in] ~ N(0, in^-1/2), which keeps activations O(1)."""
    g = seeded(name, seed, p.device)
    with torch.no_grad():
        if p.dim() == 1:
            p.normal_(0.0, 0.02, generator=g)
        else:
            p.normal_(0.0, p.shape[-1] ** -0.5, generator=g)


def init_dummy(module: nn.Module, prefix: str, seed: int) -> None:
    custom = getattr(module, "init_dummy_weights", None)
    if custom is not None:
        custom(prefix, seed)
        return
    for name, p in module.named_parameters(recurse=False):
        init_dummy_param(prefix + name, p, seed)
