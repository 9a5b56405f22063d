"""The model runner: the worker side of the step. Owns everything on the device (weights, caches, CUDA graphs, the
sampler, the per-slot buffer of last sampled tokens, device prompts for the repetition penalty, the copies of
sampled tokens back to the host) and knows no Request: it takes a StepInput and, later, gives back plain lists.

    launched = runner.launch(step)     # upload, model, sampler queued on the device; copies to the host started
    result = runner.collect(launched)  # waits for those copies: tokens (and logprobs) per sampling request
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from deltaserve.cache.allocator import pages_for_tokens
from deltaserve.config import EngineConfig
from deltaserve.engine.cuda_graph import StepGraphs
from deltaserve.engine.device_inputs import DeviceStep, upload_step
from deltaserve.engine.memory import new_cache, plan_cache_memory
from deltaserve.engine.sampler import Sampler, SamplerOutput, SamplingRow
from deltaserve.engine.step_input import SamplingRequest, StepInput
from deltaserve.models.loader import load_model
from deltaserve.outputs import TokenLogprob

log = logging.getLogger(__name__)


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was requested but torch sees no CUDA GPU; use device='cpu'")
    return resolved


@dataclass(frozen=True)
class LaunchedStep:
    """A step whose model run and sampling are queued on the device; its samples reach the host at `ready`."""

    step: StepInput
    sampled: SamplerOutput | None   # on CUDA pinned host copies, valid once `ready` has passed
    ready: torch.cuda.Event | None  # None: not a CUDA step, `sampled` is ready now


@dataclass(frozen=True)
class StepResult:
    """What a step produced, per sampling request (ragged: 1 to 1 + drafts tokens each)."""

    tokens: dict[str, list[int]]
    logprobs: dict[str, list[TokenLogprob]]  # only for requests that asked for logprobs


class ModelRunner:
    """The only writer of device tensors; see the module docstring."""

    def __init__(self, config: EngineConfig, *, eos_token_ids: frozenset[int] = frozenset()) -> None:
        self.config = config
        self.device = resolve_device(config.runner.device)
        self.model = load_model(config.model, dtype=config.runner.dtype, device=self.device,
                                load_format=config.runner.load_format, with_mtp=config.with_mtp,
                                shapes=config.rank_shapes(), quantization=config.quantization)
        self.dtype = self.model.model.embed_tokens.weight.dtype
        self.plan = plan_cache_memory(self.model, config, self.device, self.dtype)
        log.info("%s", self.plan.describe(config.cache.page_size))
        self.cache = new_cache(config, num_pages=self.plan.num_pages, num_slots=self.plan.num_slots,
                               dtype=self.dtype, device=self.device)
        self.graphs = None if config.runner.enforce_eager or self.device.type != "cuda" else self._capture()
        self.sampler = Sampler()
        self.eos_token_ids = eos_token_ids
        # The last token sampled for each state slot: the input of the slot's next decode step when that step is
        # launched before the token reaches the host.
        self.last_tokens = torch.zeros(self.plan.num_slots, dtype=torch.long, device=self.device)
        # Prompts of requests with a repetition penalty, kept on the device: the penalty reads them every step, and
        # converting a long prompt list each step costs ~1.5 ms per 32k tokens of host time.
        self.prompt_tensors: dict[str, torch.Tensor] = {}

    @property
    def num_pages(self) -> int:
        return self.plan.num_pages

    @property
    def num_slots(self) -> int:
        return self.plan.num_slots

    def _capture(self) -> StepGraphs | None:
        sched = self.config.scheduler
        max_pages = pages_for_tokens(sched.max_model_len, self.config.cache.page_size)
        graphs = StepGraphs(self.model, self.cache, max_batch=min(sched.max_num_seqs, self.plan.num_slots),
                            max_pages=max_pages, device=self.device)
        try:
            graphs.capture()
        except Exception as e:  # an op without a capturable GPU kernel: run eagerly rather than fail
            log.warning("CUDA graph capture failed (%s: %s); decode runs eagerly", type(e).__name__, e)
            return None
        log.info("captured decode CUDA graphs for batch sizes %s", graphs.sizes)
        return graphs

    # ---- the step ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def launch(self, step: StepInput) -> LaunchedStep:
        """Upload the step, apply its state copies, run the model and the sampler, and start copying the samples
        to the host (nothing here waits for the device)."""
        if any(s.draft_token_ids for s in step.sampling):
            raise ValueError("this runner cannot verify draft tokens: its layers do not keep per-position GDN "
                             "states yet (no drafter is enabled in this version)")
        dev = upload_step(step, page_size=self.config.cache.page_size, device=self.device)
        self._apply_state_copies(step)
        logits = self.execute_model(dev, step)
        if logits is None:
            return LaunchedStep(step, None, None)
        sampled = self.sampler(logits, [self._sampling_row(s) for s in step.sampling])
        self.last_tokens.index_copy_(0, dev.sample_slots, sampled.token_ids)
        if self.device.type != "cuda":
            return LaunchedStep(step, sampled, None)
        host = SamplerOutput(*(torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                               for t in sampled))
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))
        return LaunchedStep(step, host, ready)

    def execute_model(self, dev: DeviceStep, step: StepInput) -> torch.Tensor | None:
        """Run the model on an uploaded step: logits [M, V] of its logits rows in the model dtype (None when no
        row samples)."""
        input_ids = dev.input_ids_from(self.last_tokens)
        batch = dev.batch
        if self.graphs is not None and self.graphs.can_run(batch):
            _, logits = self.graphs.run(input_ids, batch)  # every token of a uniform step
            return logits if step.logits_rows.shape[0] == step.num_tokens else logits[batch.logits_indices]
        if step.logits_rows.shape[0] == 0:
            self.model(input_ids, batch, self.cache)
            return None
        hidden = self.model(input_ids, batch, self.cache)
        return self.model.compute_logits(hidden[batch.logits_indices], upcast=False)

    def _apply_state_copies(self, step: StepInput) -> None:
        if step.state_copies:
            src = torch.tensor([c.src for c in step.state_copies], dtype=torch.long, device=self.device)
            dst = torch.tensor([c.dst for c in step.state_copies], dtype=torch.long, device=self.device)
            self.cache.copy_states(src, dst)

    def _sampling_row(self, s: SamplingRequest) -> SamplingRow:
        outputs = s.output_token_ids if s.output_token_ids is not None else ()
        return SamplingRow(params=s.params, prompt_token_ids=self._prompt_for_sampler(s), output_token_ids=outputs,
                           eos_token_ids=self.eos_token_ids, num_unlisted=s.num_output_tokens - len(outputs))

    def _prompt_for_sampler(self, s: SamplingRequest) -> list[int] | torch.Tensor:
        """The prompt as the sampler reads it: a cached device tensor when a repetition penalty needs it."""
        if s.prompt_token_ids is None or s.params.repetition_penalty == 1.0:
            return list(s.prompt_token_ids or ())
        cached = self.prompt_tensors.get(s.request_id)
        if cached is None:
            cached = torch.tensor(s.prompt_token_ids, dtype=torch.long).to(self.device)
            self.prompt_tensors[s.request_id] = cached
        return cached

    def collect(self, launched: LaunchedStep) -> StepResult:
        """Wait for a launched step's samples (a device error in its kernels surfaces here) and hand them over as
        lists."""
        if launched.sampled is None:
            return StepResult({}, {})
        if launched.ready is not None:
            launched.ready.synchronize()
        sampled, sampling = launched.sampled, launched.step.sampling
        token_ids = sampled.token_ids.tolist()
        tokens: dict[str, list[int]] = {}
        logprobs: dict[str, list[TokenLogprob]] = {}
        for i, s in enumerate(sampling):  # one logits row per request: drafts are refused at launch
            tokens[s.request_id] = [token_ids[i]]
            n = s.params.logprobs
            if n is not None:
                top = tuple(zip(sampled.top_ids[i, :n].tolist(), sampled.top_logprobs[i, :n].tolist()))
                logprobs[s.request_id] = [TokenLogprob(token_ids[i], float(sampled.logprobs[i]), top)]
        return StepResult(tokens, logprobs)

    def release(self, request_ids: Iterable[str]) -> None:
        """Drop what the runner keeps for requests that ended (their device prompts)."""
        for rid in request_ids:
            self.prompt_tensors.pop(rid, None)
