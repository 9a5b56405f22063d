"""Linear layers and the linear methods behind them. A layer holds a LinearMethod, which creates the layer's
parameters, applies them, and declares the checkpoint tensors that fill them; quantized formats are other methods,
so models never branch on the format. Qwen3.5 projections have no bias."""

from __future__ import annotations

from collections.abc import Set
from typing import TYPE_CHECKING

import torch
from torch import nn

from deltaserve.kernels.activation import silu_and_mul
from deltaserve.kernels.linear import linear
from deltaserve.layers.weights import TensorSource, WeightSlot, init_dummy_param

if TYPE_CHECKING:
    from deltaserve.parallel.sharding import Shard


def new_param(*shape: int, dtype: torch.dtype, device: torch.device | str | None = None) -> nn.Parameter:
    """An uninitialised, frozen parameter; the loader (or dummy init) fills it in place."""
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


def check_unquantized(source: TensorSource) -> torch.Tensor:
    """The tensor of a full-precision weight; ValueError for a quantized one (FP8 or packed integers), which only a
    quantized method may load, so that nothing quantized is ever read as if it were bf16."""
    t = source.read()
    if not t.is_floating_point() or t.element_size() == 1:
        raise ValueError(f"{source.name}: a {t.dtype} tensor where a full-precision weight was expected (a quantized "
                         "weight without its scales, or a quantization_config that does not describe it)")
    return t


def tp_shard(module: nn.Module, key: str) -> Shard | None:
    """The rank's part of the checkpoint tensor `key` that `module` declares in its tp_shards (None: whole)."""
    return (getattr(module, "tp_shards", None) or {}).get(key)


class LinearMethod:
    """How a linear layer stores and applies its weight. This one: a plain [out, in] weight in the model dtype, as
    Hugging Face checkpoints store it."""

    name = "unquantized"

    def create_weights(self, layer: Linear, *, dtype: torch.dtype, device: torch.device | str | None) -> None:
        layer.weight = new_param(layer.out_features, layer.in_features, dtype=dtype, device=device)
        pad = getattr(layer, "padding_rows", 0)  # a MergedLinear's alignment rows: never loaded, kept finite
        if pad:
            with torch.no_grad():
                layer.weight[-pad:].zero_()

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return linear(x=x, weight=layer.weight)

    def apply_silu_gate(self, layer: Linear, gate_up: torch.Tensor) -> torch.Tensor:
        """The layer applied to silu(gate) * up of gate_up = [gate | up] (a SwiGLU MLP's down projection): here
        silu_and_mul, then apply; quantized methods compute it in their activation copy instead (one launch less)."""
        return self.apply(layer, silu_and_mul(x=gate_up))

    def apply_split(self, layer: MergedLinear, x: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, ...]:
        """A merged layer's output as its column groups `sizes`: here column views of apply's one result."""
        return self.apply(layer, x).split(sizes, dim=-1)

    def shard_layout(self, layer: Linear, name: str, rows: slice, tp: Shard | None = None) -> dict[str, WeightSlot]:
        """The checkpoint tensors of one projection stored in `rows` of the layer's output (name: the projection's
        checkpoint path, without the tensor suffix). tp: under tensor parallelism, the rank's part of the
        projection's [N, K] weight (dim 0: output rows, dim 1: input columns); a plain weight ignores it (the
        module's tp_shards wrap its slot), quantized methods split each of their tensors by it (layers/quant.py)."""
        dest = layer.weight[rows]

        def load(source: TensorSource) -> None:
            with torch.no_grad():
                dest.copy_(check_unquantized(source))
        return {f"{name}.weight": WeightSlot((rows.stop - rows.start, layer.in_features), load,
                                             save=lambda: dest.detach().clone())}

    def init_dummy(self, layer: Linear, prefix: str, seed: int) -> None:
        init_dummy_param(prefix + "weight", layer.weight, seed)


class Linear(nn.Module):
    """y = x @ W^T with W: [out, in]; what W is made of is the linear method's business."""

    def __init__(self, in_features: int, out_features: int, *, dtype: torch.dtype,
                 device: torch.device | str | None = None, method: LinearMethod | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.method = method or LinearMethod()
        self.method.create_weights(self, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x)

    def forward_silu_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        """forward(silu(gate) * up) for gate_up = [gate | up] (the method may fuse the activation)."""
        return self.method.apply_silu_gate(self, gate_up)

    def weight_layout(self, prefix: str, present: Set[str]) -> dict[str, WeightSlot]:
        return self.method.shard_layout(self, prefix.rstrip("."), slice(0, self.out_features),
                                        tp_shard(self, "weight"))

    def init_dummy_weights(self, prefix: str, seed: int) -> None:
        self.method.init_dummy(self, prefix, seed)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, method={self.method.name}"


class MergedLinear(Linear):
    """Projections of the same input stored as one layer, so they run as one GEMM (at decode, one weight stream
    instead of several small ones). Checkpoints keep them apart: `shards` maps each checkpoint projection name (a
    sibling of this module, e.g. "gate_proj") to its row count; each shard's tensors fill its rows, in order.

    row_multiple pads the output to a multiple of that many rows (zero rows, not in any shard, dropped by
    forward_split): cuBLAS falls back to slow align-1 kernels when the output's row length is odd (the MoE router
    with the shared expert's gate has 257 rows; padded to 264, the 35B-A3B prefill's router GEMM took 6.3 ms)."""

    def __init__(self, in_features: int, shards: dict[str, int], *, dtype: torch.dtype,
                 device: torch.device | str | None = None, method: LinearMethod | None = None,
                 row_multiple: int = 1) -> None:
        self.shards = dict(shards)
        rows = sum(shards.values())
        self.padding_rows = -rows % row_multiple  # set first: create_weights zeroes them
        super().__init__(in_features, rows + self.padding_rows, dtype=dtype, device=device, method=method)

    def shard_rows(self) -> dict[str, slice]:
        """Checkpoint projection name -> its rows of the merged output."""
        rows, start = {}, 0
        for name, size in self.shards.items():
            rows[name] = slice(start, start + size)
            start += size
        return rows

    def weight_layout(self, prefix: str, present: Set[str]) -> dict[str, WeightSlot]:
        parent = prefix.rstrip(".").rpartition(".")[0]
        layout: dict[str, WeightSlot] = {}
        for shard, rows in self.shard_rows().items():
            layout.update(self.method.shard_layout(self, f"{parent}.{shard}" if parent else shard, rows,
                                                   tp_shard(self, f"{shard}.weight")))
        return layout

    def forward_split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The shards' outputs, in order: column views of one [T, out] result (padding rows dropped), or of one per
        part where the shards differ in format (SplitLinearMethod)."""
        sizes = list(self.shards.values())
        parts = self.method.apply_split(self, x, sizes + [self.padding_rows] if self.padding_rows else sizes)
        return parts[:len(sizes)]

    def extra_repr(self) -> str:
        return f"in={self.in_features}, shards={self.shards}, method={self.method.name}"
