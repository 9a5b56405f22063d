"""Which part of a checkpoint tensor a tensor-parallel rank keeps, and reading only that part.

A module that keeps part of a checkpoint tensor says which part in its `tp_shards` attribute: checkpoint name
(relative to the module, matched as a suffix: "weight", "in_proj_qkv.weight", "gate_up_proj") -> `Shard`.
`layers.weights.layout_of` wraps the module's slots with them: the slot then expects the checkpoint's full shape
and its load function receives a source that reads just the rank's part. The helpers below build the shards from
the rank's shapes (config.RankShapes) and return None at tensor-parallel size 1, where nothing is wrapped.

Reads: a part along dim 0 maps only its rows of the file (the loader's EntrySource); a part along another dim is
read with safetensors' `safe_open(...).get_slice`, which reads only the requested elements. No rank reads a whole
tensor it keeps only part of. Quantized formats split each of their tensors themselves from the same shards (of the
logical [N, K] weight; layers/quant.py, read_sharded).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from deltaserve.config import RankShapes
from deltaserve.layers.weights import TensorSource, WeightSlot


@dataclass(frozen=True)
class Shard:
    """A rank's part of a checkpoint tensor: along `dim`, the concatenation of `pieces` ((start, length) in the
    checkpoint tensor, in order); the checkpoint tensor is `full` long along `dim`."""

    dim: int
    pieces: tuple[tuple[int, int], ...]
    full: int

    @property
    def local(self) -> int:
        return sum(n for _, n in self.pieces)

    def full_shape(self, local_shape: Sequence[int]) -> tuple[int, ...]:
        shape = list(local_shape)
        if shape[self.dim] != self.local:
            raise RuntimeError(f"shard of {self.local} along dim {self.dim} does not fit a slot of shape "
                               f"{tuple(local_shape)}")  # a bug in a layer's tp_shards
        shape[self.dim] = self.full
        return tuple(shape)

    def source(self, source: TensorSource) -> TensorSource:
        return ShardSource(source, self)

    def wrap(self, slot: WeightSlot) -> WeightSlot:
        """The slot as the checkpoint sees it: the full shape; its load reads only this rank's part. Not written back
        (save=None): a rank's part is not a checkpoint tensor."""
        return WeightSlot(self.full_shape(slot.shape), lambda source: slot.load(self.source(source)), None,
                          slot.optional)


class ShardSource:
    """A TensorSource over a rank's part of a checkpoint tensor."""

    def __init__(self, base: TensorSource, shard: Shard) -> None:
        self.base, self.shard, self.name = base, shard, base.name
        self.shape = tuple(shard.local if d == shard.dim else s for d, s in enumerate(base.shape))

    def read(self) -> torch.Tensor:
        parts = [read_part(self.base, self.shard.dim, start, n) for start, n in self.shard.pieces]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=self.shard.dim)

    def narrow(self, dim: int, start: int, length: int) -> TensorSource:
        raise NotImplementedError("narrowing a rank's shard again (quantized formats read their part themselves)")


def read_part(source: TensorSource, dim: int, start: int, length: int) -> torch.Tensor:
    """[start, start + length) of `source` along `dim`, reading only that part where the source is a file entry."""
    entry = getattr(source, "entry", None)
    if dim == 0 or entry is None:
        return source.narrow(dim, start, length).read()
    from safetensors import safe_open

    index = tuple(slice(start, start + length) if d == dim else slice(None) for d in range(len(source.shape)))
    with safe_open(str(entry.file), framework="pt") as f:
        return f.get_slice(entry.name)[index]


# ---- shards of a rank, from its shapes (None at TP size 1) ----------------------------------------------------------

def _tp(shapes: RankShapes) -> bool:
    return shapes.tp_size > 1


def split(shapes: RankShapes, local: int, dim: int = 0) -> Shard | None:
    """An even split: this rank's `local` consecutive entries along `dim` (column-parallel rows at dim 0,
    row-parallel input columns at dim 1)."""
    if not _tp(shapes):
        return None
    return Shard(dim, ((shapes.tp_rank * local, local),), local * shapes.tp_size)


def sections(shapes: RankShapes, locals_: Sequence[int], dim: int = 0) -> Shard | None:
    """Consecutive sections of a fused tensor (e.g. the q, k and v channels of GDN's in_proj_qkv and conv1d), each
    split evenly on its own: this rank's part of each section, concatenated."""
    if not _tp(shapes):
        return None
    pieces, offset = [], 0
    for n in locals_:
        pieces.append((offset + shapes.tp_rank * n, n))
        offset += n * shapes.tp_size
    return Shard(dim, tuple(pieces), offset)


def kv_heads(shapes: RankShapes) -> Shard | None:
    """Rows of k_proj / v_proj: this rank's KV heads, or, with fewer KV heads than ranks, the one head it shares with
    kv_replicas - 1 other ranks (the head its query heads attend to)."""
    if not _tp(shapes):
        return None
    hd, local = shapes.head_dim, shapes.num_kv_heads
    first = shapes.tp_rank // shapes.kv_replicas * local
    return Shard(0, ((first * hd, local * hd),), shapes.model_num_kv_heads * hd)


def experts(shapes: RankShapes) -> Shard | None:
    """Expert parallelism: this rank's contiguous range of experts (dim 0 of fused expert tensors)."""
    if not (_tp(shapes) and shapes.expert_parallel):
        return None
    return Shard(0, ((shapes.expert_offset, shapes.num_experts),), shapes.num_experts * shapes.tp_size)
