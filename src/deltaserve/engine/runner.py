"""The model runner: owns the model weights and the cache tensors, runs one flat batch per step.

The only writer of device tensors. Knows nothing of requests: it gets token ids and a ForwardBatch, returns logits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psutil
import torch

from deltaserve.cache.planner import MemoryPlan, plan_memory
from deltaserve.cache.tensors import CacheShape, ModelCache, kv_bytes_per_page, state_bytes_per_slot
from deltaserve.config import CacheConfig, ModelConfig, SchedulerConfig
from deltaserve.engine.cuda_graph import DecodeGraphs
from deltaserve.layers.meta import ForwardBatch
from deltaserve.models.loader import load_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunnerOutput:
    hidden: torch.Tensor   # [M, D] final-normed hidden states of the logits rows
    logits: torch.Tensor   # [M, V] in the model dtype (the sampler upcasts the rows it processes)


class ModelRunner:
    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig, scheduler_config: SchedulerConfig, *,
                 device: str = "cpu", dtype: str | torch.dtype | None = None, load_format: str = "auto",
                 enforce_eager: bool = False) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device='cuda' was requested but torch sees no CUDA GPU; use device='cpu'")
        self.model_config, self.cache_config = model_config, cache_config
        self.model = load_model(model_config, dtype=dtype, device=self.device, load_format=load_format)
        self.dtype = self.model.model.embed_tokens.weight.dtype
        self.plan = self._plan(scheduler_config)
        log.info("%s", self.plan.describe(cache_config.page_size))
        shape = CacheShape(num_pages=self.plan.num_pages, page_size=cache_config.page_size,
                           num_slots=self.plan.num_slots, kv_dtype=self.dtype, conv_dtype=self.dtype,
                           state_dtype=getattr(torch, cache_config.state_dtype))
        self.cache = ModelCache(model_config, shape, device=self.device, with_mtp=self.model.mtp is not None)
        self.graphs = None if enforce_eager or self.device.type != "cuda" else self._capture(scheduler_config)

    def _capture(self, sched: SchedulerConfig) -> DecodeGraphs | None:
        max_pages = -(-sched.max_model_len // self.cache_config.page_size)
        graphs = DecodeGraphs(self.model, self.cache, max_batch=min(sched.max_num_seqs, self.plan.num_slots),
                              max_pages=max_pages, device=self.device)
        try:
            graphs.capture()
        except Exception as e:  # an op without a capturable GPU kernel: run eagerly rather than fail
            log.warning("CUDA graph capture failed (%s: %s); decode runs eagerly", type(e).__name__, e)
            return None
        log.info("captured decode CUDA graphs for batch sizes %s", graphs.sizes)
        return graphs

    @property
    def num_pages(self) -> int:
        return self.plan.num_pages

    @property
    def num_slots(self) -> int:
        return self.plan.num_slots

    def _plan(self, sched: SchedulerConfig) -> MemoryPlan:
        cc = self.cache_config
        page_bytes = kv_bytes_per_page(self.model_config, cc.page_size, self.dtype, with_mtp=self.model.mtp is not None)
        slot_bytes = state_bytes_per_slot(self.model_config, self.dtype, getattr(torch, cc.state_dtype))
        explicit_slots = cc.num_state_slots if cc.num_state_slots is not None else (
            sched.max_num_seqs if cc.num_pages is not None else None)
        return plan_memory(budget_bytes=self._budget_bytes(sched), page_bytes=page_bytes, slot_bytes=slot_bytes,
                           page_size=cc.page_size, max_num_seqs=sched.max_num_seqs, max_model_len=sched.max_model_len,
                           num_pages=cc.num_pages, num_slots=explicit_slots)

    def _budget_bytes(self, sched: SchedulerConfig) -> int:
        """Bytes left for caches: the allowed fraction of the device minus what is in use and the activation peak."""
        util = self.cache_config.gpu_memory_utilization
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            in_use = total - free
            return int(total * util) - in_use - self._activation_peak_cuda(sched)
        # CPU: a share of the RAM that is available now (weights are already resident).
        act = sched.max_num_batched_tokens * self.model_config.hidden_size * 4 * 32
        return int(psutil.virtual_memory().available * util * 0.5) - act

    @torch.no_grad()
    def _activation_peak_cuda(self, sched: SchedulerConfig) -> int:
        """Measure the peak extra memory of one forward over max_num_batched_tokens tokens with a minimal cache."""
        tokens = min(sched.max_num_batched_tokens, sched.max_model_len)
        page = self.cache_config.page_size
        pages = -(-tokens // page)
        shape = CacheShape(num_pages=pages, page_size=page, num_slots=1, kv_dtype=self.dtype, conv_dtype=self.dtype,
                           state_dtype=getattr(torch, self.cache_config.state_dtype))
        cache = ModelCache(self.model_config, shape, device=self.device, with_mtp=self.model.mtp is not None)
        batch = ForwardBatch.build(query_lens=[tokens], context_lens=[0], state_slots=[0],
                                   block_tables=[list(range(pages))], page_size=page, device=self.device)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        ids = torch.zeros(tokens, dtype=torch.long, device=self.device)
        self.model.compute_logits(self.model(ids, batch, cache)[batch.logits_indices])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - before
        del cache
        torch.cuda.empty_cache()
        return int(peak * 1.1) + (256 << 20)  # margin for allocator fragmentation and sampling buffers

    @torch.no_grad()
    def execute(self, input_ids: torch.Tensor, batch: ForwardBatch) -> RunnerOutput | None:
        """Run the model; returns logits for batch.logits_indices (None when no row needs logits)."""
        if self.graphs is not None and self.graphs.can_run(batch):
            hidden, logits = self.graphs.run(input_ids, batch)  # decode: every row is a logits row
            return RunnerOutput(hidden=hidden, logits=logits)
        hidden = self.model(input_ids, batch, self.cache)
        if batch.logits_indices.numel() == 0:
            return None
        rows = hidden[batch.logits_indices]
        return RunnerOutput(hidden=rows, logits=self.model.compute_logits(rows, upcast=False))
