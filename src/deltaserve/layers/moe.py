"""Sparse MoE block: softmax router over all experts, top-k renormalised, routed experts, gated shared expert."""

from __future__ import annotations

from collections.abc import Set

import torch
from torch import nn

from deltaserve.config import ModelConfig, RankShapes
from deltaserve.kernels.moe import fused_moe, moe_topk_softmax
from deltaserve.layers.linear import LinearMethod, MergedLinear, check_unquantized, new_param
from deltaserve.layers.mlp import MLP
from deltaserve.layers.weights import TensorSource, WeightSlot, init_dummy_param
from deltaserve.parallel import sharding


def unquantized_mlp(mlp: MLP) -> bool:
    """Both projections of the MLP hold plain dense weights (no quantized method)."""
    return all(type(p.method) is LinearMethod for p in (mlp.gate_up_proj, mlp.down_proj))


class ExpertsMethod:
    """How the routed experts store and apply their weights. This one: fused bf16 tensors as Hugging Face
    checkpoints store them, gate_up_proj [E, 2I, D] (rows [0, I) gate, [I, 2I) up) and down_proj [E, D, I]."""

    name = "unquantized"

    def create_weights(self, layer: Experts, *, dtype: torch.dtype, device: torch.device | str | None) -> None:
        e, d, i = layer.num_experts, layer.hidden_size, layer.intermediate_size
        layer.gate_up_proj = new_param(e, 2 * i, d, dtype=dtype, device=device)
        layer.down_proj = new_param(e, d, i, dtype=dtype, device=device)

    def apply(self, layer: Experts, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              shared: MLP | None, shared_gate: torch.Tensor | None) -> torch.Tensor:
        # An unquantized shared expert runs inside the same op, as one more expert per token weighted by
        # sigmoid(its gate); any other runs through its own layers and is added.
        fold = shared is not None and unquantized_mlp(shared)
        out = fused_moe(x=x, w13=layer.gate_up_proj, w2=layer.down_proj, topk_weights=topk_weights,
                        topk_ids=topk_ids, shared_w13=shared.gate_up_proj.weight if fold else None,
                        shared_w2=shared.down_proj.weight if fold else None,
                        shared_gate=shared_gate if fold else None)
        if shared is None or fold:
            return out
        return (out.float() + torch.sigmoid(shared_gate.float()) * shared(x).float()).to(x.dtype)

    def layout(self, layer: Experts, prefix: str, present: Set[str]) -> dict[str, WeightSlot]:
        """Fused tensors (`experts.gate_up_proj`, `experts.down_proj`) or per-expert ones
        (`experts.{e}.{gate,up,down}_proj.weight`), whichever the checkpoint has (ValueError for both)."""
        fused = {f"{prefix}gate_up_proj": _slot(layer.gate_up_proj), f"{prefix}down_proj": _slot(layer.down_proj)}
        has_fused = any(n in present for n in fused)
        has_per_expert = any(f"{prefix}{layer.expert_offset + e}.{proj}.weight" in present
                             for e in range(layer.num_experts) for proj in ("gate_proj", "up_proj", "down_proj"))
        if has_fused and has_per_expert:
            raise ValueError(f"{prefix.rstrip('.')}: the checkpoint gives the experts both fused and per expert; "
                             "keep one form")
        return self._per_expert_layout(layer, prefix) if has_per_expert else fused

    def init_dummy(self, layer: Experts, prefix: str, seed: int) -> None:
        for name, p in layer.named_parameters(recurse=False):
            init_dummy_param(prefix + name, p, seed)

    def finish_loading(self, layer: Experts) -> None:
        """Once every checkpoint tensor is in: work that needs several of them (nothing for bf16 experts)."""

    @staticmethod
    def _per_expert_layout(layer: Experts, prefix: str) -> dict[str, WeightSlot]:
        i = layer.intermediate_size
        layout = {}
        for e in range(layer.num_experts):
            for name, dest in (("gate_proj", layer.gate_up_proj[e, :i]), ("up_proj", layer.gate_up_proj[e, i:]),
                               ("down_proj", layer.down_proj[e])):
                layout[f"{prefix}{layer.expert_offset + e}.{name}.weight"] = _slot(dest)
        return layout


def _slot(dest: torch.Tensor) -> WeightSlot:
    def load(source: TensorSource) -> None:
        with torch.no_grad():
            dest.copy_(check_unquantized(source))
    return WeightSlot(tuple(dest.shape), load, save=lambda: dest.detach())


class Experts(nn.Module):
    """The routed experts; their weights are whatever the experts method makes of them. Expert e here is the
    checkpoint's expert expert_offset + e (expert parallelism keeps a range of them); per-expert layouts name their
    tensors by the checkpoint's ids."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, *, dtype: torch.dtype,
                 device: torch.device | str | None = None, method: ExpertsMethod | None = None) -> None:
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.expert_offset, self.checkpoint_experts = 0, num_experts
        self.method = method or ExpertsMethod()
        self.method.create_weights(self, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
                shared: MLP | None = None, shared_gate: torch.Tensor | None = None) -> torch.Tensor:
        return self.method.apply(self, x, topk_weights, topk_ids, shared, shared_gate)

    def weight_layout(self, prefix: str, present: Set[str]) -> dict[str, WeightSlot]:
        return self.method.layout(self, prefix, present)

    def init_dummy_weights(self, prefix: str, seed: int) -> None:
        self.method.init_dummy(self, prefix, seed)

    def finish_loading(self) -> None:
        self.method.finish_loading(self)


def _expert_slices(shapes: RankShapes) -> dict[str, sharding.Shard | None]:
    """Tensor parallelism: a slice of every expert's intermediate size (gate and up rows, down columns), for the
    fused and the per-expert layouts."""
    i = shapes.moe_intermediate_size
    assert i is not None
    rows = sharding.split(shapes, i)
    return {"gate_up_proj": sharding.sections(shapes, [i, i], dim=1), "down_proj": sharding.split(shapes, i, dim=2),
            "gate_proj.weight": rows, "up_proj.weight": rows, "down_proj.weight": sharding.split(shapes, i, dim=1)}


class SparseMoE(nn.Module):
    def __init__(self, config: ModelConfig, shapes: RankShapes, *, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        assert config.num_experts and shapes.moe_intermediate_size and shapes.shared_expert_intermediate_size
        self.top_k = config.num_experts_per_tok
        # The router (checkpoint name "gate") and the shared expert's gate as one GEMM: [E + 1, D], padded to a
        # multiple of 8 rows so cuBLAS keeps its aligned kernels.
        self.router = MergedLinear(config.hidden_size, {"gate": config.num_experts, "shared_expert_gate": 1},
                                   dtype=dtype, device=device, row_multiple=8)
        if shapes.expert_parallel:  # whole experts per rank (parallel/layers.py)
            from deltaserve.parallel.layers import ExpertParallelExperts
            self.experts: Experts = ExpertParallelExperts(shapes, config.hidden_size, dtype=dtype, device=device)
        else:
            self.experts = Experts(config.num_experts, config.hidden_size, shapes.moe_intermediate_size,
                                   dtype=dtype, device=device)
            self.experts.tp_shards = _expert_slices(shapes)
        self.shared_expert = MLP(config.hidden_size, shapes.shared_expert_intermediate_size, dtype=dtype,
                                 device=device, shapes=shapes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        router_logits, shared_gate_logit = self.router.forward_split(x)
        # The router weights are rounded to the activation dtype before use, as the reference model does.
        weights, ids = moe_topk_softmax(router_logits=router_logits, top_k=self.top_k, dtype=x.dtype)
        return self.experts(x, weights, ids, shared=self.shared_expert, shared_gate=shared_gate_logit)
