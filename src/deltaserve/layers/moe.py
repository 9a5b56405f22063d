"""Sparse MoE block: softmax router over all experts, top-k renormalised, routed experts, gated shared expert."""

from __future__ import annotations

import torch
from torch import nn

from deltaserve.config import ModelConfig
from deltaserve.kernels.moe import fused_moe, moe_topk_softmax
from deltaserve.layers.linear import MergedLinear, new_param
from deltaserve.layers.mlp import MLP


class Experts(nn.Module):
    """Routed experts stored fused, as in Hugging Face checkpoints.

    gate_up_proj: [E, 2I, D] (rows [0, I) gate, [I, 2I) up); down_proj: [E, D, I].
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, *, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.num_experts, self.intermediate_size = num_experts, intermediate_size
        self.gate_up_proj = new_param(num_experts, 2 * intermediate_size, hidden_size, dtype=dtype, device=device)
        self.down_proj = new_param(num_experts, hidden_size, intermediate_size, dtype=dtype, device=device)


class SparseMoE(nn.Module):
    def __init__(self, config: ModelConfig, *, dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        super().__init__()
        assert config.num_experts and config.moe_intermediate_size and config.shared_expert_intermediate_size
        self.top_k = config.num_experts_per_tok
        # The router (checkpoint name "gate") and the shared expert's gate as one GEMM: [E + 1, D].
        self.router = MergedLinear(config.hidden_size, {"gate": config.num_experts, "shared_expert_gate": 1},
                                   dtype=dtype, device=device)
        self.experts = Experts(config.num_experts, config.hidden_size, config.moe_intermediate_size,
                               dtype=dtype, device=device)
        self.shared_expert = MLP(config.hidden_size, config.shared_expert_intermediate_size, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        router_logits, shared_gate_logit = self.router.forward_split(x)
        weights, ids = moe_topk_softmax(router_logits=router_logits, top_k=self.top_k)
        # The router weights are rounded to the activation dtype before use, as the reference model does.
        weights = weights.to(x.dtype)
        # The shared expert runs inside the same op, as one more expert per token weighted by sigmoid(its gate).
        return fused_moe(x=x, w13=self.experts.gate_up_proj, w2=self.experts.down_proj, topk_weights=weights,
                         topk_ids=ids, shared_w13=self.shared_expert.gate_up_proj.weight,
                         shared_w2=self.shared_expert.down_proj.weight, shared_gate=shared_gate_logit)
