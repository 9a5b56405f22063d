"""Per-rank shapes: what one tensor-parallel rank holds of each layer. The layers size their parameters from it and
the cache sizes its tensors from it, so the two can never disagree about a rank's share.

Splits follow the usual Megatron scheme: attention query heads, GDN key and value heads (so the grouped-value mapping
stays rank-local), MLP and expert intermediate sizes and the vocabulary (embedding and lm_head rows) are divided by
the TP size; KV heads are divided when there are at least as many as ranks and replicated (one per rank) otherwise.
With expert parallelism each rank holds num_experts / tp_size whole experts (a contiguous range) instead of a slice
of every expert.
"""

from __future__ import annotations

from dataclasses import dataclass

from deltaserve.config.common import ConfigError, is_int
from deltaserve.config.model import LinearAttentionSizes, ModelConfig


@dataclass(frozen=True)
class RankShapes(LinearAttentionSizes):
    """Sizes held by rank `tp_rank` of `tp_size` (all equal to the model's when tp_size is 1).

    Attention: num_heads query heads (each with its gate), num_kv_heads K/V heads of head_dim.
    GDN: linear_num_key_heads key heads of linear_key_head_dim, linear_num_value_heads value heads of
    linear_value_head_dim; key_dim, value_dim and conv_dim are the channel counts of the fused q|k|v projection.
    MLP: intermediate_size (dense), moe_intermediate_size / shared_expert_intermediate_size (MoE); num_experts
    routed experts held (all of them, or this rank's range under expert parallelism). vocab_size: embedding rows.
    """

    tp_size: int
    tp_rank: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    conv_kernel: int
    intermediate_size: int | None
    moe_intermediate_size: int | None
    shared_expert_intermediate_size: int | None
    num_experts: int | None
    model_num_kv_heads: int = 0  # before the split, for kv_replicas
    vocab_size: int = 0          # this rank's rows of the embedding and the lm_head
    expert_parallel: bool = False

    @property
    def expert_offset(self) -> int:
        """The global id of this rank's first expert (0 without expert parallelism)."""
        return self.tp_rank * self.num_experts if self.expert_parallel and self.num_experts else 0

    @property
    def kv_replicas(self) -> int:
        """How many ranks hold a copy of each KV head (1: the KV heads are split, not replicated)."""
        return max(1, self.tp_size * self.num_kv_heads // self.model_num_kv_heads)

    @classmethod
    def for_rank(cls, model: ModelConfig, tp_size: int = 1, tp_rank: int = 0, *,
                 expert_parallel: bool = False) -> RankShapes:
        """The shapes of one rank; ConfigError naming the dimension and the sizes that work when tp_size does not
        divide it. expert_parallel (MoE models; ignored for dense ones): whole experts per rank."""
        if not is_int(tp_size) or tp_size < 1:
            raise ConfigError(f"'tensor_parallel_size' must be a positive integer, got {tp_size!r}")
        if not is_int(tp_rank) or not 0 <= tp_rank < tp_size:
            raise ConfigError(f"tensor-parallel rank {tp_rank!r} is outside [0, {tp_size})")
        try:
            return cls._build(model, tp_size, tp_rank, expert_parallel)
        except ConfigError as e:
            works = [n for n in range(1, MAX_TP + 1) if _fits(cls, model, n, expert_parallel)]
            raise ConfigError(f"{e}; tensor_parallel_size values that fit every dimension of this model"
                              f"{' with expert parallelism' if expert_parallel and model.num_experts else ''}: "
                              f"{works}") from None

    @classmethod
    def _build(cls, model: ModelConfig, tp_size: int, tp_rank: int, expert_parallel: bool) -> RankShapes:
        split = _Splitter(model, tp_size)
        ep = bool(expert_parallel and model.num_experts)
        return cls(
            tp_size=tp_size, tp_rank=tp_rank, hidden_size=model.hidden_size,
            num_heads=split("num_attention_heads"), num_kv_heads=split.kv_heads(),
            head_dim=model.head_dim,
            linear_num_key_heads=split("linear_num_key_heads"), linear_num_value_heads=split("linear_num_value_heads"),
            linear_key_head_dim=model.linear_key_head_dim, linear_value_head_dim=model.linear_value_head_dim,
            conv_kernel=model.linear_conv_kernel_dim,
            intermediate_size=split.optional("intermediate_size"),
            moe_intermediate_size=model.moe_intermediate_size if ep else split.optional("moe_intermediate_size"),
            shared_expert_intermediate_size=split.optional("shared_expert_intermediate_size"),
            num_experts=split("num_experts") if ep else model.num_experts,
            model_num_kv_heads=model.num_key_value_heads, vocab_size=split("vocab_size"), expert_parallel=ep,
        )


MAX_TP = 64  # the largest size suggested in error messages


def _fits(cls: type[RankShapes], model: ModelConfig, tp_size: int, expert_parallel: bool) -> bool:
    try:
        cls._build(model, tp_size, 0, expert_parallel)
        return True
    except ConfigError:
        return False


class _Splitter:
    """Divides a model dimension by the TP size, or raises naming the dimension and the TP sizes that divide it."""

    def __init__(self, model: ModelConfig, tp_size: int) -> None:
        self.model, self.tp = model, tp_size

    def __call__(self, name: str) -> int:
        size = getattr(self.model, name)
        if size % self.tp:
            works = [d for d in range(1, size + 1) if size % d == 0 and d <= 64]
            raise ConfigError(f"tensor_parallel_size {self.tp} does not divide the model's {name} ({size}); sizes "
                              f"that work for it: {works}")
        return size // self.tp

    def optional(self, name: str) -> int | None:
        return None if getattr(self.model, name) is None else self(name)

    def kv_heads(self) -> int:
        kv = self.model.num_key_value_heads
        if kv >= self.tp:
            return self("num_key_value_heads")
        if self.tp % kv:
            raise ConfigError(f"tensor_parallel_size {self.tp} is larger than num_key_value_heads ({kv}) but not a "
                              f"multiple of it, so the KV heads cannot be replicated evenly; use a multiple of {kv}")
        return 1
