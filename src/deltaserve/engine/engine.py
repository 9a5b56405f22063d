"""The step loop: schedule -> step input -> runner (device) -> resolve tokens -> outputs (stops, text, deltas).

LLMEngine keeps host bookkeeping only. The runner owns the device; the scheduler owns the requests and asks the cache
manager for memory; the output processor owns what users see.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

from deltaserve.cache.allocator import pages_for_tokens
from deltaserve.cache.manager import CacheManager
from deltaserve.config import EngineArgs, EngineConfig
from deltaserve.engine.output_processor import OutputProcessor, RequestError
from deltaserve.engine.request import Request, RequestStatus
from deltaserve.engine.runner import LaunchedStep, StepResult
from deltaserve.engine.scheduler import Scheduler, SchedulerOutput
from deltaserve.engine.step_cost import StepCostModel, StepShape, prior_coefficients
from deltaserve.engine.step_input import BlockTables, build_step_input, needs_grammar
from deltaserve.engine.step_trace import NoTrace, StepMarks, StepTrace
from deltaserve.engine.tokenizer import eos_token_ids, load_tokenizer
from deltaserve.outputs import SequenceDelta
from deltaserve.parallel.launch import build_runner
from deltaserve.parallel.runner import RankFailure
from deltaserve.sampling_params import SamplingParams
from deltaserve.structured import StructuredError
from deltaserve.structured.compiler import GrammarCompiler
from deltaserve.structured.matchers import StructuredOutputs

log = logging.getLogger(__name__)

__all__ = ["EngineArgs", "LLMEngine", "RequestError"]


class LLMEngine:
    """Owns the scheduler (and through it the cache manager), the runner, the tokenizer and the output processor.
    Single-threaded: every call comes from one thread."""

    def __init__(self, config: EngineConfig | EngineArgs) -> None:
        self.config = config.create_engine_config() if isinstance(config, EngineArgs) else config
        path = self.config.runner.step_trace
        self.trace = StepTrace(path) if path else NoTrace()  # opened first: a bad path fails before the model loads
        self.model_config = self.config.model
        model_dir = self.model_config.model_dir
        self.tokenizer = load_tokenizer(model_dir) if model_dir else None
        self.eos_ids = frozenset(eos_token_ids(self.tokenizer, self.model_config.eos_token_ids))
        self.runner = build_runner(self.config, eos_token_ids=self.eos_ids)  # rank 0's driver under TP
        self.trace.bind(self.runner.device)
        page_size = self.config.cache.page_size
        plan = self.runner.plan
        self.cache = CacheManager(num_pages=plan.num_pages, num_slots=plan.num_slots, page_size=page_size,
                                  num_checkpoints=plan.num_checkpoints, namespace=self._cache_namespace(),
                                  state_tokens=plan.slot_bytes * page_size // max(plan.page_bytes, 1),
                                  rewrites_last=self.config.with_mtp)  # MTPDrafter.rewrite_resume_kv
        spec = self.config.speculative
        self.scheduler = Scheduler(self.config.scheduler, self.cache,
                                   checkpoint_interval=self.config.cache.checkpoint_interval,
                                   speculative_tokens=spec.num_speculative_tokens,
                                   speculative_max_batch=min(spec.max_batch, self.runner.cache.verify_rows),
                                   step_cost=self._step_cost_model(),
                                   varlen_step_replays=self.runner.varlen_step_replays)
        self.outputs = OutputProcessor(self.tokenizer, self.eos_ids, self.max_model_len)
        # the matchers of constrained requests; their grammars compile in the compiler's cache (any thread)
        self.structured = StructuredOutputs(GrammarCompiler(self.tokenizer, self.model_config.vocab_size,
                                                            self.eos_ids))
        self.block_tables = BlockTables(self.runner.num_slots, pages_for_tokens(self.max_model_len, page_size))
        self.counters = {"prompt_tokens": 0, "generation_tokens": 0, "requests_finished": 0, "preemptions": 0}
        requested = self.config.scheduler.async_scheduling
        self.async_scheduling = self.runner.device.type == "cuda" if requested is None else requested
        if spec.enabled and self.async_scheduling:
            # A request's next step verifies the drafts this step proposes: it cannot be scheduled before they
            # reach the host, so overlapping steps would only add empty ones.
            if requested:
                log.info("async scheduling is off with speculative decoding (each step's drafts feed the next)")
            self.async_scheduling = False
        # MTP: drafts proposed and verified, drafts accepted, and accepted drafts by position (1st, 2nd, ...)
        self.spec_counters = {"spec_draft_tokens": 0, "spec_accepted_tokens": 0, "spec_verify_steps": 0}
        self.spec_accepted_per_position = [0] * spec.num_speculative_tokens
        self.spec_drafted_per_position = [0] * spec.num_speculative_tokens
        self._spec_turn_down_logged = False
        self._inflight: tuple[SchedulerOutput, LaunchedStep, StepMarks] | None = None

    def _step_cost_model(self) -> StepCostModel:
        """The scheduler's step-time model, with a prior from this rank's weights and attention shapes (see
        engine/step_cost.py); the engine feeds it measured steps while max_step_ms is set."""
        model = getattr(self.runner, "model", None)
        if model is None:
            return StepCostModel()
        from deltaserve.layers.quant import step_weights
        cfg, tp = self.model_config, self.config.parallel.tensor_parallel_size
        weights = step_weights(model)  # bytes as stored, params as multiplied (8 per packed int4 word)
        params = weights.params
        if cfg.num_experts:
            params -= weights.expert_params * (1 - cfg.num_experts_per_tok / cfg.num_experts)  # type: ignore[operator]
        layers = len(cfg.full_attention_layers)
        heads, kv_heads = max(cfg.num_attention_heads // tp, 1), max(cfg.num_key_value_heads // tp, 1)
        # the KV bytes a cached token costs to read, from the planned pages (the KV cache dtype, its scales, the MTP
        # layer's pages); the attention dims where no plan exists
        plan = getattr(self.runner, "plan", None)
        kv_bytes = plan.page_bytes / self.config.cache.page_size if plan is not None else \
            2 * kv_heads * cfg.head_dim * 2 * layers
        prior = prior_coefficients(weight_bytes=weights.bytes, active_params=params,
                                   attention_flops_per_pair=4 * cfg.head_dim * heads * layers,
                                   kv_bytes_per_token=kv_bytes)
        return StepCostModel(prior)

    @property
    def max_model_len(self) -> int:
        return self.config.max_model_len

    def _cache_namespace(self) -> bytes:
        """What cached KV and states depend on besides the tokens: the model and the dtypes they are kept in."""
        return repr((self.model_config, str(self.runner.dtype), self.config.cache.state_dtype)).encode()

    # ---- requests ------------------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                    cache_points: tuple[int, ...] = ()) -> None:
        """Queue a request (params.n samples). Raises RequestError, queuing nothing, for a request it cannot serve.

        cache_points: prompt positions where a stable prefix ends (e.g. a chat history before its generation
        prompt): the prefix cache keeps the state there, where a later prompt is likely to resume."""
        params = self._with_bad_word_ids(params)
        self._validate(prompt_token_ids, params)
        children = self.outputs.new_children(request_id, prompt_token_ids, params)
        points = tuple(sorted({p for p in cache_points if 0 < p < len(prompt_token_ids)}))
        for child in children:
            child.cache_points = points
            try:
                self.scheduler.check_new(child)
            except ValueError as e:
                raise RequestError(str(e)) from None
        if params.structured is not None:
            self._compile(params)
        self.outputs.register(request_id, children)  # nothing below can fail: the request is added whole
        if params.structured is not None:
            self.structured.add([c.request_id for c in children], params.structured)  # cached: copies only
        for child in children:
            self.scheduler.add_request(child)
        self.counters["prompt_tokens"] += len(prompt_token_ids)

    def _validate(self, prompt: list[int], params: SamplingParams) -> None:
        if not prompt:
            raise RequestError("the prompt is empty; give at least one token")
        if len(prompt) >= self.max_model_len:
            raise RequestError(f"the prompt has {len(prompt)} tokens but max_model_len is {self.max_model_len}; "
                               "shorten the prompt or start the engine with a larger max_model_len")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
        if bad:
            raise RequestError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        # a bias on an id the logits do not have would be silently dropped (the server refuses it as well)
        bad = [t for t in params.logit_bias or {} if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"logit_bias token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        bad = [t for t in params.allowed_token_ids or () if t >= vocab]
        if bad:
            raise RequestError(f"allowed_token_ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        bad = [t for q in params.bad_words_token_ids for t in q if t >= vocab]
        if bad:
            raise RequestError(f"bad_words_token_ids {bad[:5]} are outside the vocabulary [0, {vocab})")

    def _with_bad_word_ids(self, params: SamplingParams) -> SamplingParams:
        """params with its bad_words tokenized, each as vLLM does: as written (spaces before it dropped) and, where
        that is a different token sequence of the same length, after a space (the word inside a text)."""
        if not params.bad_words:
            return params
        if self.tokenizer is None:
            raise RequestError("bad_words needs the model's tokenizer, which this model directory lacks; give "
                               "bad_words_token_ids instead")
        seqs = [list(q) for q in params.bad_words_token_ids]
        for word in params.bad_words:
            plain = self.tokenizer.encode(word.lstrip(), add_special_tokens=False)
            spaced = self.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
            seqs.append(plain)
            if len(spaced) == len(plain) and spaced[0] != plain[0]:
                seqs.append(spaced)
        return dataclasses.replace(params, bad_words_token_ids=seqs)

    def _compile(self, params: SamplingParams) -> None:
        """The request's grammar into the cache (the server compiled it already; the offline API compiles here)."""
        try:
            self.structured.compiler.compile(params.structured)  # type: ignore[arg-type]
        except StructuredError as e:
            raise RequestError(f"the structured output constraint cannot be used: {e}") from None

    def abort_request(self, request_id: str) -> list[SequenceDelta]:
        """Abort every sample of a request (unknown or finished ids are ignored); frees its pages and slot."""
        child_ids, deltas = self.outputs.abort(request_id)
        for child_id in child_ids:
            self.scheduler.abort_request(child_id)
        self.runner.release(child_ids)
        self.structured.remove(child_ids)
        self._trace_if_drained()
        return deltas

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> dict[str, int]:
        """Gauges and counters for /metrics (call on the engine's thread)."""
        s = self.scheduler
        stats = {"running": s.num_running, "waiting": s.num_waiting, **self.cache.stats(), **self.counters}
        if self.config.speculative.enabled:
            stats.update(self.spec_counters, spec_turned_down_steps=s.spec_turned_down,
                         spec_graph_plain_steps=s.drafts_dropped_for_graph)
            for j, (drafted, accepted) in enumerate(zip(self.spec_drafted_per_position,
                                                        self.spec_accepted_per_position)):
                stats[f"spec_drafted_pos_{j}"] = drafted
                stats[f"spec_accepted_pos_{j}"] = accepted
        return stats

    def acceptance_length(self) -> float:
        """Mean tokens a verify step kept per request (1 + accepted drafts); NaN before any verify step."""
        c = self.spec_counters
        rows = self.spec_drafted_per_position[0] if self.spec_drafted_per_position else 0
        return 1 + c["spec_accepted_tokens"] / rows if rows else float("nan")

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (its checkpoints and the pages only they hold)."""
        self.cache.reset_prefix_cache()

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, if any, and close the step trace, if any (its pending lines written)."""
        stop = getattr(self.runner, "shutdown", None)
        if stop is not None:
            stop()
        self.trace.close()
        self.trace = NoTrace()

    # ---- the step ------------------------------------------------------------------------------------------------
    def step(self, on_launch: Callable[[], None] | None = None) -> list[SequenceDelta]:
        """One engine step; returns what sequences produced (tokens, text, finish). on_launch: called once, before the
        host waits for any tokens: host work that must not delay the launch (the server's streaming of the previous
        step's tokens) goes there. After the launch where it is quick (the runner replays a CUDA graph), before it
        otherwise: a step without a graph (a long prefill or mixed step, or any under enforce_eager) launches the whole
        model from Python (~100 ms of host time on 35B-A3B), which that work should not wait for. It must not raise:
        it runs between the schedule and the step's end, where an error would fail the step's requests or strand it.

        With async scheduling the tokens returned are those of the previous step: this step is launched first, so
        the GPU goes on computing while the host turns the previous step's tokens into outputs. A step that samples
        for a request with penalties (they read every past token) waits for its own tokens instead. A step that
        samples for a constrained request runs its model first; its sampling is queued once the previous step's
        tokens have advanced the grammars (the mask is built while the GPU runs this step's model).
        """
        marks = StepMarks(time.perf_counter())
        out = self.scheduler.schedule()
        if self.scheduler.spec_turned_down and not self._spec_turn_down_logged:
            self._spec_turn_down_logged = True
            log.info("MTP speculative decoding pauses while more than %d requests run (speculative_max_batch): "
                     "verify steps cost more than they save at large batches", self.scheduler._spec_max_batch)
        launched = None
        deltas: list[SequenceDelta] = []
        if not out.is_empty:
            try:
                step_input = build_step_input(out, block_tables=self.block_tables)
                marks.schedule_ms = (time.perf_counter() - marks.start) * 1e3
                if on_launch is not None or self.trace.enabled:
                    marks.graph = self.runner.replays_graph(step_input)
                if on_launch is not None and not marks.graph:
                    on_launch, early = None, on_launch
                    early()
                self.trace.before_launch(marks)
                t0 = time.perf_counter()
                launched = self.runner.launch(step_input)
                marks.launch_ms = (time.perf_counter() - t0) * 1e3
                if not launched.awaits_grammar:  # else its end comes with its sampling, queued below
                    self.trace.end(marks)
            except Exception as e:  # a failing step fails the requests in it, never the engine
                self.scheduler.abandon(out)  # it never runs: its checkpoint reservations go back to the pools
                self.trace.gap()
                if isinstance(e, RankFailure):
                    raise  # a tensor-parallel rank is gone: no step can run any more
                log.exception("engine step failed")
                deltas = self._finish_inflight() + self._fail(out, f"{type(e).__name__}: {e}")
                self._trace_if_drained()
                return deltas
            self.scheduler.commit_step(out)
            self.counters["preemptions"] += len(out.preempted)
        if on_launch is not None:
            on_launch()
        deltas += self._finish_inflight()
        if launched is not None and launched.awaits_grammar:
            launched = self._sample_constrained(out, launched, deltas)
        if not out.is_empty:
            self.trace.after_launch(out, marks)  # a constrained step's end: after its sampling was queued
            if launched is None:  # its sampling failed: no tokens to collect
                self.trace.collected(marks, None)
        if launched is not None:
            if self.async_scheduling and not any(s.params.reads_outputs for s in launched.step.sampling):
                self._inflight = (out, launched, marks)
            else:
                deltas += self._finish(out, launched, marks)
        if not self.scheduler.has_unfinished():
            deltas += self._finish_inflight()  # rows of requests that ended meanwhile: let nothing run on unseen
        self._trace_if_drained()
        return deltas

    def _trace_if_drained(self) -> None:
        """No request left (the last ended, failed or was aborted): the step trace writes what it holds and does not
        count the time until the next request as the GPU's idle time."""
        if self.trace.enabled and not self.scheduler.has_unfinished():
            self.trace.drained()

    @property
    def step_in_flight(self) -> bool:
        """Whether a launched step's tokens are still to come (async scheduling): what step() returned last came
        from the step before it."""
        return self._inflight is not None

    def _sample_constrained(self, out: SchedulerOutput, launched: LaunchedStep,
                            deltas: list[SequenceDelta]) -> LaunchedStep | None:
        """Queue the sampling of a step with constrained rows, masked by the matchers as they stand now (every
        token before this step is known). None, with the step's requests failed into `deltas`, if that raises."""
        try:
            return self.runner.sample(launched, self.structured.fill(launched.step.sampling))
        except RankFailure:
            raise
        except Exception as e:  # as in step(): the step's requests fail, the engine goes on
            log.exception("engine step failed")
            deltas += self._fail(out, f"{type(e).__name__}: {e}")
            return None

    def _finish_inflight(self) -> list[SequenceDelta]:
        inflight, self._inflight = self._inflight, None
        return self._finish(*inflight) if inflight is not None else []

    def _finish(self, out: SchedulerOutput, launched: LaunchedStep, marks: StepMarks) -> list[SequenceDelta]:
        """Wait for a launched step's tokens; append them, check stops, make the deltas."""
        t0 = time.perf_counter()
        try:
            result = self.runner.collect(launched)  # where a device error in the step's kernels surfaces
        except Exception as e:  # as in step(): the step's requests fail, the engine goes on
            self.trace.collected(marks, None)
            log.exception("engine step failed")
            return self._fail(out, f"{type(e).__name__}: {e}")
        self.trace.collected(marks, (time.perf_counter() - t0) * 1e3)
        self._observe_step(out, launched, result, marks.launch_ms)
        deltas = self._fail_requests(result.failed)
        for rid, entries in result.prompt_logprobs.items():
            self.outputs.add_prompt_logprobs(rid, entries)
        appended = self.scheduler.resolve_step(out, result.tokens)
        if launched.step.is_verify:
            self._count_verified(launched, result)
        refused: dict[str, str] = {}
        ended: list[tuple[Request, SequenceDelta]] = []
        try:
            for request in appended:
                tokens = result.tokens[request.request_id]
                drafts = result.drafts.get(request.request_id)
                if drafts and request.status is RequestStatus.RUNNING and request.request_id not in self.structured:
                    request.draft_token_ids = drafts  # verified by its next step (dropped there if it ends first)
                delta = self.outputs.on_tokens(request, tokens, result.logprobs.get(request.request_id),
                                               lambda r, d: ended.append((r, d)))
                if delta is not None:
                    if delta.finished:
                        self._end_inside_kept(request, len(tokens) - len(delta.token_ids))
                    self.counters["generation_tokens"] += len(delta.token_ids)
                    deltas.append(delta)
                    if not delta.finished and request.request_id in self.structured:
                        error = self.structured.advance(request.request_id, delta.token_ids)
                        if error is not None:
                            refused[request.request_id] = error
        finally:  # once every end is placed (their checkpoints commit the step's states); even when a later request
            # raised (Ctrl-C too): the output processor has forgotten the ended ones, so nothing else would end them
            for request, delta in ended:
                self._end(request, delta)
        return deltas + self._fail_requests(refused)

    def _observe_step(self, out: SchedulerOutput, launched: LaunchedStep, result: StepResult,
                      launch_ms: float) -> None:
        """Feed the step's measured time to the scheduler's cost model (only while a time budget is set). On CUDA the
        device time between the step's launch and ready events; elsewhere the host wall time of the launch call,
        which there runs the whole step. Left out: steps whose sampling waited for a grammar mask (host time
        inside) and CUDA steps that sampled nothing (no ready event)."""
        if self.scheduler.max_step_ms is None or needs_grammar(launched.step):
            return
        ms = result.device_ms if self.runner.device.type == "cuda" else launch_ms
        if ms is None:
            return
        shape = StepShape.of((s.num_new_tokens, s.num_computed_tokens, len(s.draft_token_ids)) for s in out.scheduled)
        self.scheduler.step_cost.observe(shape, ms)

    def _count_verified(self, launched: LaunchedStep, result: StepResult) -> None:
        """Drafts verified and accepted, overall and by position; a row's placeholder drafts (it had none to
        verify) count for nothing, nor does a prefill chunk the step carried."""
        c = self.spec_counters
        c["spec_verify_steps"] += 1
        k = launched.step.num_drafts
        for s in launched.step.sampling:
            kept = result.tokens.get(s.request_id)
            if kept is None or s.placeholder_drafts or not s.draft_token_ids:
                continue
            accepted = len(kept) - 1
            c["spec_draft_tokens"] += k
            c["spec_accepted_tokens"] += accepted
            for j in range(k):
                self.spec_drafted_per_position[j] += 1
                self.spec_accepted_per_position[j] += j < accepted

    def _end_inside_kept(self, request: Request, dropped: int) -> None:
        """A stop that dropped `dropped` of the tokens the step kept (the stop checks end the output at the stop
        token or the one completing a stop string). The end token was then an accepted draft, computed as an input,
        and the request ends with the state after it (the end checkpoint's). With 1 dropped that is the state the
        step commits anyway (after its last input); from 2 on the positions past it roll back like rejected drafts'
        and the runner commits its verify step's state there, not at the last kept position."""
        if dropped < 2 or request.status is not RequestStatus.RUNNING:
            return
        self.scheduler.roll_back(request.request_id, dropped - 1)
        self.runner.keep_fewer(request.request_id, dropped - 1)

    def _end(self, request: Request, delta: SequenceDelta) -> None:
        status = RequestStatus.FINISHED_STOPPED if delta.finish_reason == "stop" else RequestStatus.FINISHED_LENGTH
        snapshot = self.scheduler.checkpoint_finished(request.request_id)  # the next turn resumes here
        if snapshot is not None:
            self.runner.apply_copies([snapshot])
        self.scheduler.finish_request(request.request_id, status, delta.finish_reason)
        self.runner.release([request.request_id])
        self.structured.remove([request.request_id])
        self.counters["requests_finished"] += 1

    def _fail(self, out: SchedulerOutput, message: str) -> list[SequenceDelta]:
        """A whole step failed: every request in it ends with the error."""
        return self._fail_requests({e.request_id: message for e in out.scheduled if not e.request.is_finished})

    def _fail_requests(self, errors: dict[str, str]) -> list[SequenceDelta]:
        deltas = []
        for rid, message in errors.items():
            request = self.scheduler.get_request(rid)
            if request is None:
                continue  # it ended meanwhile
            delta = self.outputs.fail(rid, message)
            self.scheduler.finish_request(rid, RequestStatus.FINISHED_ERROR, "error")
            self.runner.release([rid])
            self.structured.remove([rid])
            if delta is not None:
                deltas.append(delta)
        return deltas
