"""The step loop: schedule -> batch -> run the model -> sample -> append tokens, check stops, stream deltas."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from deltaserve.config import CacheConfig, ModelConfig, SchedulerConfig
from deltaserve.engine.batch import BlockTables, build_step_batch
from deltaserve.engine.detokenizer import IncrementalDetokenizer, StopChecker
from deltaserve.engine.request import Request, RequestStatus
from deltaserve.engine.runner import ModelRunner
from deltaserve.engine.sampler import Sampler, SamplerOutput, SamplingRow
from deltaserve.engine.scheduler import ScheduledRequest, Scheduler, SchedulerOutput
from deltaserve.engine.sequence import SequenceState
from deltaserve.engine.tokenizer import eos_token_ids, load_tokenizer
from deltaserve.outputs import SequenceDelta, TokenLogprob
from deltaserve.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request that cannot be served as given (too long, bad token ids, duplicate id); nothing was queued."""


@dataclass(frozen=True)
class EngineArgs:
    """Everything needed to build an engine; the CLI and LLM() fill it."""

    model: str
    dtype: str | None = None
    device: str = "cpu"
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    page_size: int = 16
    num_pages: int | None = None
    gpu_memory_utilization: float = 0.9
    state_dtype: str = "float32"
    load_format: str = "auto"
    enforce_eager: bool = False


class LLMEngine:
    """Owns the scheduler, the runner, the tokenizer and the per-sequence output state. Single-threaded."""

    def __init__(self, args: EngineArgs) -> None:
        self.model_config = ModelConfig.from_hf(args.model)
        max_len = args.max_model_len or self.model_config.max_position_embeddings
        self.scheduler_config = SchedulerConfig(max_model_len=max_len, max_num_seqs=args.max_num_seqs,
                                                max_num_batched_tokens=args.max_num_batched_tokens)
        self.cache_config = CacheConfig(page_size=args.page_size, num_pages=args.num_pages,
                                        gpu_memory_utilization=args.gpu_memory_utilization,
                                        state_dtype=args.state_dtype)
        self.runner = ModelRunner(self.model_config, self.cache_config, self.scheduler_config, device=args.device,
                                  dtype=args.dtype, load_format=args.load_format, enforce_eager=args.enforce_eager)
        self.scheduler = Scheduler(self.scheduler_config, page_size=args.page_size,
                                   num_pages=self.runner.num_pages, num_slots=self.runner.num_slots)
        self.tokenizer = load_tokenizer(args.model)
        self.eos_ids = frozenset(eos_token_ids(self.tokenizer, self.model_config.eos_token_ids))
        self.sampler = Sampler()
        self.block_tables = BlockTables(self.runner.num_slots, -(-self.max_model_len // args.page_size))
        self.sequences: dict[str, SequenceState] = {}   # scheduler request id -> state
        self.children: dict[str, list[str]] = {}        # user request id -> its n scheduler request ids
        # Prompts of requests with a repetition penalty, kept on the device: the penalty needs them every step, and
        # converting a long prompt list each step costs ~1.5 ms per 32k tokens of host time.
        self.prompt_tensors: dict[str, torch.Tensor] = {}
        self.counters = {"prompt_tokens": 0, "generation_tokens": 0, "requests_finished": 0, "preemptions": 0}

    @property
    def max_model_len(self) -> int:
        return self.scheduler_config.max_model_len

    # ---- requests ------------------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Queue a request (params.n samples). Raises RequestError, queuing nothing, for a request it cannot serve."""
        self._validate(request_id, prompt_token_ids)
        ids = [request_id] if params.n == 1 else [f"{request_id}#{i}" for i in range(params.n)]
        self.children[request_id] = ids
        for index, child_id in enumerate(ids):
            child_params = params if params.seed is None or index == 0 else dataclasses.replace(
                params, seed=params.seed + index)
            request = Request(child_id, list(prompt_token_ids), sampling_params=child_params)
            self.sequences[child_id] = self._sequence_state(request, request_id, index, child_params)
            self.scheduler.add_request(request)
        self.counters["prompt_tokens"] += len(prompt_token_ids)

    def _validate(self, request_id: str, prompt: list[int]) -> None:
        if request_id in self.children:
            raise RequestError(f"request id {request_id!r} is already in use")
        if not prompt:
            raise RequestError("the prompt is empty; give at least one token")
        if len(prompt) >= self.max_model_len:
            raise RequestError(f"the prompt has {len(prompt)} tokens but max_model_len is {self.max_model_len}; "
                               "shorten the prompt or start the engine with a larger max_model_len")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise RequestError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")

    def _sequence_state(self, request: Request, parent: str, index: int, params: SamplingParams) -> SequenceState:
        detok = (IncrementalDetokenizer(self.tokenizer, skip_special_tokens=params.skip_special_tokens)
                 if self.tokenizer is not None else None)
        return SequenceState(request=request, parent_id=parent, index=index, params=params, eos_ids=self.eos_ids,
                             max_model_len=self.max_model_len, detokenizer=detok,
                             stop_checker=StopChecker(list(params.stop), params.include_stop_str_in_output))

    def abort_request(self, request_id: str) -> list[SequenceDelta]:
        """Abort every sample of a request (unknown or finished ids are ignored); frees its pages and slot."""
        deltas = []
        for child_id in self.children.pop(request_id, []):
            state = self.sequences.pop(child_id, None)
            self.prompt_tensors.pop(child_id, None)
            if self.scheduler.abort_request(child_id) is not None and state is not None:
                deltas.append(SequenceDelta(request_id, state.index, (), "", None, True, "abort"))
        return deltas

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> dict[str, int]:
        """Gauges and counters for /metrics (call on the engine's thread)."""
        s = self.scheduler
        return {"running": s.num_running, "waiting": s.num_waiting,
                "pages_used": s.page_allocator.num_used, "pages_total": s.page_allocator.num_total,
                "slots_used": s.slot_allocator.num_used, "slots_total": s.slot_allocator.num_total, **self.counters}

    # ---- the step ------------------------------------------------------------------------------------------------
    def step(self) -> list[SequenceDelta]:
        """One engine step; returns what each sequence produced (tokens, text, finish)."""
        out = self.scheduler.schedule()
        if out.is_empty:
            return []
        try:
            sampling, sampled = self._run(out)
        except Exception as e:  # a failing step fails the requests in it, never the engine
            log.exception("engine step failed")
            return self._fail(out, f"{type(e).__name__}: {e}")
        token_ids = sampled.token_ids.tolist()
        appended = self.scheduler.update_from_step(out, {e.request_id: t for e, t in zip(sampling, token_ids)})
        self.counters["generation_tokens"] += len(appended)
        self.counters["preemptions"] += len(out.preempted)
        logprobs = self._logprobs(sampling, token_ids, sampled)
        return [self._after_token(r, logprobs.get(r.request_id)) for r in appended]

    def _run(self, out: SchedulerOutput) -> tuple[tuple[ScheduledRequest, ...], SamplerOutput]:
        """Run the model and sample; returns the entries that sampled (in row order) and their samples on the CPU."""
        batch = build_step_batch(out.scheduled, page_size=self.cache_config.page_size, device=self.runner.device,
                                 block_tables=self.block_tables)
        result = self.runner.execute(batch.input_ids, batch.forward)
        if result is None:
            return (), SamplerOutput(*([torch.empty(0)] * 4))
        rows = [SamplingRow(params=e.request.sampling_params, prompt_token_ids=self._prompt_for_sampler(e.request),
                            output_token_ids=e.request.output_token_ids, eos_token_ids=self.eos_ids)
                for e in batch.sampling]
        sampled = self.sampler(result.logits, rows)
        return batch.sampling, SamplerOutput(*(t.cpu() for t in sampled))

    def _prompt_for_sampler(self, request: Request) -> list[int] | torch.Tensor:
        """The prompt as the sampler reads it: a cached device tensor when a repetition penalty needs it."""
        if request.sampling_params.repetition_penalty == 1.0:
            return request.prompt_token_ids
        cached = self.prompt_tensors.get(request.request_id)
        if cached is None:
            cached = torch.tensor(request.prompt_token_ids, dtype=torch.long).to(self.runner.device)
            self.prompt_tensors[request.request_id] = cached
        return cached

    @staticmethod
    def _logprobs(sampling: tuple[ScheduledRequest, ...], token_ids: list[int],
                  sampled: SamplerOutput) -> dict[str, TokenLogprob]:
        result = {}
        for i, entry in enumerate(sampling):
            n = entry.request.sampling_params.logprobs
            if n is None:
                continue
            top = tuple(zip(sampled.top_ids[i, :n].tolist(), sampled.top_logprobs[i, :n].tolist()))
            result[entry.request_id] = TokenLogprob(token_ids[i], float(sampled.logprobs[i]), top)
        return result

    def _after_token(self, request: Request, logprob: TokenLogprob | None) -> SequenceDelta:
        state = self.sequences[request.request_id]
        delta = state.on_token(request.output_token_ids[-1], logprob)
        if delta.finished:
            status = (RequestStatus.FINISHED_STOPPED if delta.finish_reason == "stop"
                      else RequestStatus.FINISHED_LENGTH)
            self.scheduler.finish_request(request.request_id, status, delta.finish_reason)
            self.counters["requests_finished"] += 1
            self._forget(request.request_id, state.parent_id)
        return delta

    def _forget(self, child_id: str, parent_id: str) -> None:
        self.sequences.pop(child_id, None)
        self.prompt_tensors.pop(child_id, None)
        if all(c not in self.sequences for c in self.children.get(parent_id, [])):
            self.children.pop(parent_id, None)

    def _fail(self, out: SchedulerOutput, message: str) -> list[SequenceDelta]:
        deltas = []
        for entry in out.scheduled:
            state = self.sequences.get(entry.request_id)
            if state is None or entry.request.is_finished:
                continue
            self.scheduler.finish_request(entry.request_id, RequestStatus.FINISHED_ERROR, "error")
            self._forget(entry.request_id, state.parent_id)
            deltas.append(SequenceDelta(state.parent_id, state.index, (), "", None, True, "error", error=message))
        return deltas

