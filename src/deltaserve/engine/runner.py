"""The model runner: the worker side of the step. Owns everything on the device (weights, caches, CUDA graphs, the
sampler, the per-slot buffer of last sampled tokens, device prompts for the repetition penalty, the copies of
sampled tokens back to the host) and knows no Request: it takes a StepInput and, later, gives back plain lists.

    launched = runner.launch(step)     # upload, model, sampler queued on the device; copies to the host started
    result = runner.collect(launched)  # waits for those copies: tokens (and logprobs) per sampling request

A step that samples for a constrained request (structured outputs) stops after the model: `launched.awaits_grammar`.
The engine builds the grammar mask once the previous step's tokens are known (the GPU runs this step's model
meanwhile) and queues the sampling with `launched = runner.sample(launched, mask)`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from deltaserve.cache.allocator import pages_for_tokens
from deltaserve.cache.manager import PageCopy, StateCopy
from deltaserve.cache.planner import MemoryPlan
from deltaserve.config import EngineConfig
from deltaserve.engine.cuda_graph import StepGraphs
from deltaserve.engine.device_inputs import DeviceStep, upload_step
from deltaserve.engine.memory import new_cache, plan_cache_memory
from deltaserve.engine.prompt_logprobs import PromptScores, prompt_logprobs, prompt_logprobs_lists
from deltaserve.engine.sampler import GrammarBitmask, Sampler, SamplerOutput, SamplingRow
from deltaserve.engine.step_input import GrammarMask, SamplingRequest, StepInput, needs_grammar
from deltaserve.models.loader import load_model
from deltaserve.outputs import TokenLogprob
from deltaserve.sampling_params import SamplingParams

log = logging.getLogger(__name__)


def _concat_outputs(outputs: list[SamplerOutput]) -> SamplerOutput:
    """One SamplerOutput from single-row ones (top-k columns padded to the widest)."""
    k = max(o.top_ids.shape[1] for o in outputs)
    pad = lambda t: torch.nn.functional.pad(t, (0, k - t.shape[1]))  # noqa: E731
    return SamplerOutput(torch.cat([o.token_ids for o in outputs]), torch.cat([o.logprobs for o in outputs]),
                         torch.cat([pad(o.top_ids) for o in outputs]), torch.cat([pad(o.top_logprobs) for o in outputs]))


def grammar_to_device(mask: GrammarMask | None, device: torch.device) -> GrammarBitmask | None:
    """A step's grammar mask on the device, copied without waiting for the stream (pinned on CUDA)."""
    if mask is None or mask.rows.shape[0] == 0:
        return None
    pinned = device.type == "cuda"
    rows, bitmask = torch.from_numpy(mask.rows), torch.from_numpy(mask.bitmask)
    if pinned:
        rows, bitmask = rows.pin_memory(), bitmask.pin_memory()
    return GrammarBitmask(rows.to(device, non_blocking=pinned), bitmask.to(device, non_blocking=pinned))


def _grammar_row(grammar: GrammarBitmask | None, row: int) -> GrammarBitmask | None:
    """The mask of one batch row as the mask of a one-row batch (None if the row is not constrained)."""
    if grammar is None:
        return None
    hit = (grammar.rows == row).nonzero().flatten()  # a sync, but only on the row-by-row error path
    if hit.numel() == 0:
        return None
    return GrammarBitmask(torch.zeros(1, dtype=torch.long, device=hit.device), grammar.bitmask[hit[:1]])


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A pinned host copy, started without waiting (valid once the step's ready event has passed)."""
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)


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
    sampled: SamplerOutput | None   # None: nothing sampled; on CUDA pinned host copies, valid once `ready` passed
    ready: torch.cuda.Event | None  # None: not a CUDA step (or nothing to copy), the results are ready now
    scored: PromptScores | None = None  # prompt logprobs, copied as `sampled` is
    failed: dict[str, str] = field(default_factory=dict)  # requests whose sampling raised -> why
    # a step whose sampling waits for its grammar mask: the sampling rows' logits and their state slots
    logits: torch.Tensor | None = None
    sample_slots: torch.Tensor | None = None

    @property
    def awaits_grammar(self) -> bool:
        return self.logits is not None


@dataclass(frozen=True)
class StepResult:
    """What a step produced, per sampling request (ragged: 1 to 1 + drafts tokens each)."""

    tokens: dict[str, list[int]]
    logprobs: dict[str, list[TokenLogprob]]  # only for requests that asked for logprobs
    # prompt logprobs: request id -> (position of the scored token's predecessor, the scored token's logprob)
    prompt_logprobs: dict[str, list[tuple[int, TokenLogprob]]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # requests whose sampling raised -> why (no tokens)


class ModelRunner:
    """The only writer of device tensors; see the module docstring."""

    def __init__(self, config: EngineConfig, *, eos_token_ids: frozenset[int] = frozenset()) -> None:
        self.config = config
        self.device = resolve_device(config.runner.device)
        self.model = load_model(config.model, dtype=config.runner.dtype, device=self.device,
                                load_format=config.runner.load_format, with_mtp=config.with_mtp,
                                shapes=config.rank_shapes(), quantization=config.quantization)
        self.dtype = self.model.model.embed_tokens.weight.dtype
        self.plan = self.plan_memory()
        log.info("%s", self.plan.describe(config.cache.page_size))
        # running slots first, then the prefix cache's checkpoint slots, in the same state tensors
        self.cache = new_cache(config, num_pages=self.plan.num_pages,
                               num_slots=self.plan.num_slots + self.plan.num_checkpoints,
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

    def plan_memory(self) -> MemoryPlan:
        """Pages and slots for the caches (under tensor parallelism the ranks agree on the smallest plan)."""
        return plan_cache_memory(self.model, self.config, self.device, self.dtype)

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
        self.apply_copies(step.state_copies, step.page_copies)
        logits = self.execute_model(dev, step)
        self.apply_copies(step.state_snapshots)
        if logits is None:
            return LaunchedStep(step, None, None)
        num_sampled = step.logits_rows.shape[0]
        scored = prompt_logprobs(logits[num_sampled:], step) if step.prompt_logprobs else None
        pending = LaunchedStep(step, None, None, scored, logits=logits[:num_sampled], sample_slots=dev.sample_slots)
        if step.sampling and needs_grammar(step):
            return pending  # sampled by sample() once the engine has the mask
        return self.sample(pending, None)

    def sample(self, launched: LaunchedStep, mask: GrammarMask | None) -> LaunchedStep:
        """Queue the sampling of a launched step (with its grammar mask, if any) and start copying the samples to
        the host. The mask is applied outside any CUDA graph: the graph ends at the logits."""
        step, scored = launched.step, launched.scored
        sampled, failed = None, {}
        if step.sampling:
            sampled, failed = self._sample(launched.logits, step, grammar_to_device(mask, self.device))
            self.last_tokens.index_copy_(0, launched.sample_slots, sampled.token_ids)
        if self.device.type != "cuda":
            return LaunchedStep(step, sampled, None, scored, failed)
        host = SamplerOutput(*(_to_host(t) for t in sampled)) if sampled is not None else None
        scored = PromptScores(*(_to_host(t) for t in scored)) if scored is not None else None
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))
        return LaunchedStep(step, host, ready, scored, failed)

    def _sample(self, logits: torch.Tensor, step: StepInput,
                grammar: GrammarBitmask | None) -> tuple[SamplerOutput, dict[str, str]]:
        """The sampler over every row; if it raises, row by row, so that only the requests whose parameters broke it
        fail (returned with the reason; their rows hold a placeholder token that nobody reads)."""
        rows = [self._sampling_row(s) for s in step.sampling]
        try:
            return self.sampler(logits, rows, grammar), {}
        except Exception as batch_error:  # noqa: BLE001 - find the culprit rows below
            log.warning("sampling failed for the batch (%s); sampling row by row", batch_error)
        outputs, failed = [], {}
        for i, (row, s) in enumerate(zip(rows, step.sampling)):
            try:
                outputs.append(self.sampler(logits[i:i + 1], [row], _grammar_row(grammar, i)))
            except Exception as e:  # noqa: BLE001 - this request's error, reported to it alone
                failed[s.request_id] = f"{type(e).__name__}: {e}"
                outputs.append(self.sampler(logits[i:i + 1], [SamplingRow(SamplingParams(temperature=0))]))
        return _concat_outputs(outputs), failed

    def execute_model(self, dev: DeviceStep, step: StepInput) -> torch.Tensor | None:
        """Run the model on an uploaded step: logits in the model dtype of its sampling rows, then of its prompt
        logprob rows ([M + R, V]; None when there are none)."""
        input_ids = dev.input_ids_from(self.last_tokens)
        batch = dev.batch
        if self.graphs is not None and self.graphs.can_run(batch):
            _, logits = self.graphs.run(input_ids, batch)  # every token of a uniform step, in order
            every_token = not step.prompt_logprobs and step.logits_rows.shape[0] == step.num_tokens
            return logits if every_token else logits[batch.logits_indices]
        if batch.logits_indices.shape[0] == 0:
            self.model(input_ids, batch, self.cache)
            return None
        hidden = self.model(input_ids, batch, self.cache)
        return self.model.compute_logits(hidden[batch.logits_indices], upcast=False)

    def apply_copies(self, states: Sequence[StateCopy] = (), pages: Sequence[PageCopy] = ()) -> None:
        """GDN state copies between slots and KV copies between pages, queued on the device in order with the
        steps (a snapshot taken now sees every step launched before it)."""
        if states:
            self.cache.copy_states(self._ids([c.src for c in states]), self._ids([c.dst for c in states]))
        if pages:
            self.cache.copy_pages(self._ids([c.src for c in pages]), self._ids([c.dst for c in pages]))

    def _ids(self, values: list[int]) -> torch.Tensor:
        """An index tensor on the device, sent from pinned memory (a pageable copy would wait for the GPU)."""
        host = torch.tensor(values, dtype=torch.long)
        return host.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else host

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
        if launched.ready is not None:
            launched.ready.synchronize()
        scored = {} if launched.scored is None else prompt_logprobs_lists(launched.scored, launched.step)
        tokens: dict[str, list[int]] = {}
        logprobs: dict[str, list[TokenLogprob]] = {}
        sampled, sampling = launched.sampled, launched.step.sampling
        if sampled is None:
            return StepResult(tokens, logprobs, scored)
        token_ids = sampled.token_ids.tolist()
        for i, s in enumerate(sampling):
            if s.request_id in launched.failed:
                continue  # one logits row per request: drafts are refused at launch
            tokens[s.request_id] = [token_ids[i]]
            n = s.params.logprobs
            if n is not None:
                top = tuple(zip(sampled.top_ids[i, :n].tolist(), sampled.top_logprobs[i, :n].tolist()))
                logprobs[s.request_id] = [TokenLogprob(token_ids[i], float(sampled.logprobs[i]), top)]
        return StepResult(tokens, logprobs, scored, launched.failed)

    def release(self, request_ids: Iterable[str]) -> None:
        """Drop what the runner keeps for requests that ended (their device prompts)."""
        for rid in request_ids:
            self.prompt_tensors.pop(rid, None)
