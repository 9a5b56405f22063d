"""How much device memory the caches may take: measured here (free memory, one profiled forward), split by the pure
planner in cache/planner.py."""

from __future__ import annotations

import psutil
import torch

from deltaserve.cache.allocator import pages_for_tokens
from deltaserve.cache.planner import MemoryPlan, plan_memory
from deltaserve.cache.tensors import (CacheShape, ModelCache, kv_bytes_per_page, kv_page_dtype, state_bytes_per_slot,
                                      verify_bytes_per_position)
from deltaserve.config import ConfigError, EngineConfig
from deltaserve.engine.device_inputs import build_forward_batch
from deltaserve.engine.varlen_graph import token_sizes


def plan_cache_memory(model: torch.nn.Module, config: EngineConfig, device: torch.device,
                      dtype: torch.dtype) -> MemoryPlan:
    """Pages and slots for the caches, from what the device has left after the weights and an activation peak."""
    cc, sched, shapes = config.cache, config.scheduler, config.rank_shapes()
    page_bytes = kv_bytes_per_page(shapes, cc.page_size, kv_page_dtype(cc.kv_cache_dtype, dtype),
                                   num_layers=_kv_layers(config))
    slot_bytes = state_bytes_per_slot(shapes, len(config.model.linear_attention_layers), dtype,
                                      getattr(torch, cc.state_dtype),
                                      config.model.hidden_size if config.with_mtp else 0)
    explicit_slots = cc.num_state_slots if cc.num_state_slots is not None else (
        sched.max_num_seqs if cc.num_pages is not None else None)
    budget = _budget_bytes(model, config, device, dtype) - verify_state_bytes(config, dtype)
    return plan_memory(budget_bytes=budget, page_bytes=page_bytes,
                       slot_bytes=slot_bytes, page_size=cc.page_size, max_num_seqs=sched.max_num_seqs,
                       max_model_len=sched.max_model_len, num_pages=cc.num_pages, num_slots=explicit_slots,
                       num_checkpoints=cc.num_checkpoints if cc.enable_prefix_caching else 0,
                       checkpoint_fraction=cc.checkpoint_fraction,
                       kv_format=kv_format_label(cc.kv_cache_dtype, dtype), state_format=cc.state_dtype,
                       kv_cache_dtype=cc.kv_cache_dtype)


# fp8 pages are written with Triton's fp8e4nv cast and read with cvt.rn.f16x2.e4m3x2 (kernels/attention): sm_89+
FP8_KV_MIN_CAPABILITY = (8, 9)


def check_kv_cache_support(kv_cache_dtype: str, capability: tuple[int, int] | None) -> None:
    """Refuse a KV page format the GPU (compute capability; None: a CPU, where the references run) cannot convert,
    before the weights load: its kernels would fail to compile inside the first step."""
    if kv_cache_dtype == "fp8" and capability is not None and tuple(capability) < FP8_KV_MIN_CAPABILITY:
        major, minor = capability
        raise ConfigError(f"'kv_cache_dtype' fp8 pages need e4m3 conversions of compute capability 8.9+ (Ada, Hopper "
                          f"or newer); this GPU is {major}.{minor}: use int8 (the same memory) or int4")


def kv_format_label(kv_cache_dtype: str, model_dtype: torch.dtype) -> str:
    """What a KV page holds, for the plan's log line."""
    if kv_cache_dtype == "auto":
        return str(model_dtype).removeprefix("torch.")
    name = "fp8 e4m3" if kv_cache_dtype == "fp8" else kv_cache_dtype
    return f"{name} + an fp32 scale per token and head"


def _kv_layers(config: EngineConfig) -> int:
    return len(config.model.full_attention_layers) + int(config.with_mtp)


def verify_shape(config: EngineConfig) -> tuple[int, int]:
    """(rows, positions) of the per-position GDN buffers verify steps keep: (0, 0) without speculative decoding."""
    if not config.with_mtp:
        return 0, 0
    return min(config.speculative.max_batch, config.scheduler.max_num_seqs), 1 + config.num_speculative_tokens


def verify_state_bytes(config: EngineConfig, dtype: torch.dtype) -> int:
    """Memory of what verify steps keep per position for the commit (1 + K per row: the conv window, the post-conv
    row and the gates of every GDN layer; the recurrent state is replayed, not kept)."""
    rows, positions = verify_shape(config)
    return rows * positions * verify_bytes_per_position(config.rank_shapes(),
                                                        len(config.model.linear_attention_layers), dtype)


def new_cache(config: EngineConfig, *, num_pages: int, num_slots: int, dtype: torch.dtype,
              device: torch.device, verify: bool = True) -> ModelCache:
    cc = config.cache
    shape = CacheShape(num_pages=num_pages, page_size=cc.page_size, num_slots=num_slots,
                       kv_dtype=kv_page_dtype(cc.kv_cache_dtype, dtype), conv_dtype=dtype,
                       state_dtype=getattr(torch, cc.state_dtype))
    rows, positions = verify_shape(config) if verify else (0, 0)
    return ModelCache(config.model, shape, device=device, with_mtp=config.with_mtp, shapes=config.rank_shapes(),
                      verify_rows=rows, verify_positions=positions)


def _budget_bytes(model: torch.nn.Module, config: EngineConfig, device: torch.device, dtype: torch.dtype) -> int:
    """Bytes left for caches: the allowed fraction of the device minus what is in use and the activation peak."""
    util, sched = config.cache.gpu_memory_utilization, config.scheduler
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        in_use = total - free
        peak = _activation_peak_cuda(model, config, device, dtype)
        return int(total * util) - in_use - peak - int(peak * _graphed_share(config))
    # CPU: a share of the RAM that is available now (weights are already resident).
    act = sched.max_num_batched_tokens * config.model.hidden_size * 4 * 32
    return int(psutil.virtual_memory().available * util * 0.5) - act


def _graphed_share(config: EngineConfig) -> float:
    """The varlen CUDA graphs' memory pool as a share of the profiled activation peak: their largest token bucket
    over the profiled step's tokens (activations grow about linearly with tokens); it stays allocated beside the
    eager steps' activations."""
    runner, sched = config.runner, config.scheduler
    if runner.enforce_eager or runner.prefill_graph_tokens < 64:
        return 0.0
    sizes = token_sizes(runner.prefill_graph_tokens, sched.max_num_batched_tokens)
    return min(1.0, sizes[-1] / max(1, min(sched.max_num_batched_tokens, sched.max_model_len))) if sizes else 0.0


@torch.no_grad()
def _activation_peak_cuda(model: torch.nn.Module, config: EngineConfig, device: torch.device,
                          dtype: torch.dtype) -> int:
    """Measure the peak extra memory of one forward over max_num_batched_tokens tokens with a minimal cache."""
    sched = config.scheduler
    tokens = min(sched.max_num_batched_tokens, sched.max_model_len)
    pages = pages_for_tokens(tokens, config.cache.page_size)
    cache = new_cache(config, num_pages=pages, num_slots=1, dtype=dtype, device=device, verify=False)
    batch = build_forward_batch(query_lens=[tokens], context_lens=[0], state_slots=[0],
                                block_tables=[list(range(pages))], page_size=config.cache.page_size, device=device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    ids = torch.zeros(tokens, dtype=torch.long, device=device)
    model.compute_logits(model(ids, batch, cache)[batch.logits_indices])
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del cache
    torch.cuda.empty_cache()
    return int(peak * 1.1) + (256 << 20)  # margin for allocator fragmentation and sampling buffers
