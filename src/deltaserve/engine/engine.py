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


@dataclass(frozen=True)
class LaunchedStep:
    """A step whose model run and sampling are queued on the device; its samples reach the host at `ready`."""

    out: SchedulerOutput
    sampling: tuple[ScheduledRequest, ...]  # the entries that sample, in logits-row order
    sampled: SamplerOutput | None           # on CUDA pinned host copies, valid once `ready` has passed
    ready: torch.cuda.Event | None          # None: not a CUDA step, `sampled` is ready now


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
    # Schedule and launch step n+1 before reading step n's tokens, so a step's host work runs while the GPU computes.
    # None: on for CUDA (elsewhere there is nothing to overlap, and tokens would only come a step later).
    async_scheduling: bool | None = None


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
        on_cuda = self.runner.device.type == "cuda"
        self.async_scheduling = on_cuda if args.async_scheduling is None else args.async_scheduling
        # The last token sampled for each state slot, on the device: the input of the slot's next decode step
        # when that step is launched before the token reaches the host.
        self.last_tokens = torch.zeros(self.runner.num_slots, dtype=torch.long, device=self.runner.device)
        self._inflight: LaunchedStep | None = None
        self._history_ids: set[str] = set()  # live requests whose sampling reads all their past tokens

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
            request.max_output_tokens = min(params.max_tokens or self.max_model_len,
                                            self.max_model_len - len(prompt_token_ids))
            self.sequences[child_id] = self._sequence_state(request, request_id, index, child_params)
            self.scheduler.add_request(request)
            if params.repetition_penalty != 1.0 or params.frequency_penalty or params.presence_penalty:
                self._history_ids.add(child_id)
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
            self._history_ids.discard(child_id)
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
        """One engine step; returns what sequences produced (tokens, text, finish).

        With async scheduling the tokens returned are those of the previous step: this step is launched first, so
        the GPU goes on computing while the host turns the previous step's tokens into outputs. A step that samples
        for a request with penalties (they read every past token) waits for its own tokens instead.
        """
        out = self.scheduler.schedule()
        launched = None
        deltas: list[SequenceDelta] = []
        if not out.is_empty:
            try:
                launched = self._launch(out)
            except Exception as e:  # a failing step fails the requests in it, never the engine
                log.exception("engine step failed")
                return self._finish_inflight() + self._fail(out, f"{type(e).__name__}: {e}")
            self.scheduler.commit_step(out)
            self.counters["preemptions"] += len(out.preempted)
        deltas += self._finish_inflight()
        if launched is not None:
            if self.async_scheduling and not any(e.request_id in self._history_ids for e in launched.sampling):
                self._inflight = launched
            else:
                deltas += self._finish(launched)
        if not self.scheduler.has_unfinished():
            deltas += self._finish_inflight()  # rows of requests that ended meanwhile: let nothing run on unseen
        return deltas

    def _launch(self, out: SchedulerOutput) -> LaunchedStep:
        """Build the batch, run the model and the sampler, start copying the samples to the host."""
        batch = build_step_batch(out.scheduled, page_size=self.cache_config.page_size, device=self.runner.device,
                                 block_tables=self.block_tables)
        result = self.runner.execute(batch.input_ids_from(self.last_tokens), batch.forward)
        if result is None:
            return LaunchedStep(out, (), None, None)
        rows = [SamplingRow(params=e.request.sampling_params, prompt_token_ids=self._prompt_for_sampler(e.request),
                            output_token_ids=e.request.output_token_ids, eos_token_ids=self.eos_ids,
                            num_pending=e.request.num_pending_tokens)
                for e in batch.sampling]
        sampled = self.sampler(result.logits, rows)
        self.last_tokens.index_copy_(0, batch.sample_slots, sampled.token_ids)
        if self.runner.device.type != "cuda":
            return LaunchedStep(out, batch.sampling, sampled, None)
        host = SamplerOutput(*(torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                               for t in sampled))
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.runner.device))
        return LaunchedStep(out, batch.sampling, host, ready)

    def _finish_inflight(self) -> list[SequenceDelta]:
        launched, self._inflight = self._inflight, None
        return self._finish(launched) if launched is not None else []

    def _finish(self, launched: LaunchedStep) -> list[SequenceDelta]:
        """Wait for a launched step's samples; append them, check stops, make the deltas."""
        if launched.sampled is None:
            return []
        try:
            if launched.ready is not None:
                launched.ready.synchronize()  # where a device error in the step's kernels surfaces
        except Exception as e:  # as in step(): the step's requests fail, the engine goes on
            log.exception("engine step failed")
            return self._fail(launched.out, f"{type(e).__name__}: {e}")
        sampled, sampling = launched.sampled, launched.sampling
        token_ids = sampled.token_ids.tolist()
        appended = self.scheduler.resolve_step(launched.out, {e.request_id: t for e, t in zip(sampling, token_ids)})
        self.counters["generation_tokens"] += len(appended)
        logprobs = self._logprobs(sampling, token_ids, sampled)
        return [self._after_token(r, logprobs.get(r.request_id)) for r in appended]

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
        self._history_ids.discard(child_id)
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

