"""How much device memory the caches may take: measured here (free memory, one profiled forward), split by the pure
planner in cache/planner.py."""

from __future__ import annotations

import dataclasses
import logging

import psutil
import torch

from deltaserve.cache.allocator import pages_for_tokens
from deltaserve.cache.planner import MemoryPlan, plan_memory
from deltaserve.cache.tensors import (CacheShape, ModelCache, kv_bytes_per_page, kv_page_dtype, state_bytes_per_slot,
                                      verify_bytes_per_position)
from deltaserve.config import ConfigError, EngineConfig
from deltaserve.engine.device_inputs import build_forward_batch
from deltaserve.engine.varlen_graph import full_step_tokens, token_sizes

log = logging.getLogger(__name__)

# Prefill graphs by default (prefill_graph_tokens None): up to the full step's bucket where their pool takes at
# most FULL_STEP_GRAPH_COST of the cache memory more than the pool of the buckets up to SHORT_PREFILL_GRAPH_TOKENS,
# else up to those. An eager 8k step launches ~1,950 kernels from Python; on an H100 serving 35B-A3B that launch took
# 88-153 ms against the GPU's ~120 ms of work, and the step (so the time to first token) took as long as the launch
# on half of the prompts (RESULTS.md 2026-12-07). Where memory is tight (35B-A3B on an 80 GB card) KV pages come first.
SHORT_PREFILL_GRAPH_TOKENS = 4096
FULL_STEP_GRAPH_COST = 0.1


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
    graph_tokens, budget = _graphs_and_budget(model, config, device, dtype)
    plan = plan_memory(budget_bytes=budget - verify_state_bytes(config, dtype), page_bytes=page_bytes,
                       slot_bytes=slot_bytes, page_size=cc.page_size, max_num_seqs=sched.max_num_seqs,
                       max_model_len=sched.max_model_len, num_pages=cc.num_pages, num_slots=explicit_slots,
                       num_checkpoints=cc.num_checkpoints if cc.enable_prefix_caching else 0,
                       checkpoint_fraction=cc.checkpoint_fraction,
                       kv_format=kv_format_label(cc.kv_cache_dtype, dtype), state_format=cc.state_dtype,
                       kv_cache_dtype=cc.kv_cache_dtype)
    return dataclasses.replace(plan, prefill_graph_tokens=graph_tokens)


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


def _graphs_and_budget(model: torch.nn.Module, config: EngineConfig, device: torch.device,
                       dtype: torch.dtype) -> tuple[int, int]:
    """(prefill graph tokens, bytes left for caches): the allowed fraction of the device minus what is in use, the
    activation peak and the prefill graphs' pool."""
    util, sched = config.cache.gpu_memory_utilization, config.scheduler
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        in_use = total - free
        peak = _activation_peak_cuda(model, config, device, dtype)
        budget = int(total * util) - in_use - peak
        tokens = prefill_graph_tokens(config, peak, budget)
        return tokens, budget - int(peak * graphed_share(config, tokens))
    # CPU: a share of the RAM that is available now (weights are already resident); no graphs.
    act = sched.max_num_batched_tokens * config.model.hidden_size * 4 * 32
    return 0, int(psutil.virtual_memory().available * util * 0.5) - act


def prefill_graph_tokens(config: EngineConfig, peak: int, budget: int) -> int:
    """The prefill_graph_tokens option, or where it is None the full step's bucket when its graphs' pool (beside an
    activation peak of `peak` bytes) takes at most FULL_STEP_GRAPH_COST of `budget` (the cache memory without
    graphs) more than the pool of the buckets up to SHORT_PREFILL_GRAPH_TOKENS, else those."""
    if config.runner.enforce_eager:
        return 0
    if config.runner.prefill_graph_tokens is not None:
        return config.runner.prefill_graph_tokens
    full = full_step_tokens(config.scheduler.max_num_batched_tokens)
    if full <= SHORT_PREFILL_GRAPH_TOKENS:
        return SHORT_PREFILL_GRAPH_TOKENS
    extra = peak * (graphed_share(config, full) - graphed_share(config, SHORT_PREFILL_GRAPH_TOKENS))
    if extra <= FULL_STEP_GRAPH_COST * budget:
        return full
    log.info("prefill CUDA graphs up to %d tokens: those of a full step (%d) would take %.2f GiB more of the cache "
             "memory (%.2f GiB); --prefill-graph-tokens %d captures them anyway", SHORT_PREFILL_GRAPH_TOKENS, full,
             extra / 2**30, max(budget, 0) / 2**30, full)
    return SHORT_PREFILL_GRAPH_TOKENS


def graphed_share(config: EngineConfig, max_tokens: int) -> float:
    """The varlen CUDA graphs' memory pool (buckets up to max_tokens) as a share of the profiled activation peak:
    their largest token bucket over the profiled step's tokens (activations grow about linearly with tokens; more
    than 1 where max_model_len, which caps the profiled step, is below the step's token budget); it stays allocated
    beside the eager steps' activations."""
    runner, sched = config.runner, config.scheduler
    if runner.enforce_eager or max_tokens < 64:
        return 0.0
    sizes = token_sizes(max_tokens, sched.max_num_batched_tokens)
    return sizes[-1] / max(1, min(sched.max_num_batched_tokens, sched.max_model_len)) if sizes else 0.0


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
