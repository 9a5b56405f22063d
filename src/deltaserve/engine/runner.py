"""The model runner: the worker side of the step. Owns everything on the device (weights, caches, CUDA graphs, the
sampler, the per-slot buffer of last sampled tokens, device prompts for the repetition penalty, the copies of
sampled tokens back to the host) and knows no Request: it takes a StepInput and, later, gives back plain lists.

    launched = runner.launch(step)     # upload, model, sampler queued on the device; copies to the host started
    result = runner.collect(launched)  # waits for those copies: tokens (and logprobs) per sampling request

With MTP the drafter runs after the sampler, and the host does not wait for it: collect() returns once the tokens
are on the host, and each request's drafts as `device_draft` markers that the next step's upload reads from the
device (`carried`), so the host turns the tokens into outputs and schedules the next step while the GPU drafts.

A step that samples for a constrained request (structured outputs) stops after the model: `launched.awaits_grammar`.
The engine builds the grammar mask once the previous step's tokens are known (the GPU runs this step's model
meanwhile) and queues the sampling with `launched = runner.sample(launched, mask)`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import torch

from deltaserve.cache.allocator import pages_for_tokens
from deltaserve.cache.manager import PageCopy, StateCopy
from deltaserve.cache.planner import MemoryPlan
from deltaserve.config import EngineConfig
from deltaserve.engine.cuda_graph import StepGraphs
from deltaserve.engine.device_inputs import DeviceStep, upload_step
from deltaserve.engine.memory import check_kv_cache_support, new_cache, plan_cache_memory
from deltaserve.engine.prompt_logprobs import PromptScores, prompt_logprobs, prompt_logprobs_lists
from deltaserve.engine.sampler import GrammarBitmask, Sampler, SamplerOutput, SamplingRow
from deltaserve.engine.speculative import MTPDrafter, SimulatedAcceptance, first_logits_rows, kept_counts
from deltaserve.engine.step_input import GrammarMask, SamplingRequest, StepInput, device_draft, needs_grammar
from deltaserve.engine.varlen_graph import VarlenGraphs
from deltaserve.kernels._device import capability
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


def _grammar_rows(grammar: GrammarBitmask | None, first: int, count: int) -> GrammarBitmask | None:
    """The mask of batch rows [first, first + count) (one request's logits rows) as the mask of a batch of those
    rows (None if none of them is constrained)."""
    if grammar is None:
        return None
    hit = ((grammar.rows >= first) & (grammar.rows < first + count)).nonzero().flatten()  # a sync, but only on
    if hit.numel() == 0:                                                                   # the row-by-row error path
        return None
    return GrammarBitmask(grammar.rows[hit] - first, grammar.bitmask[hit])


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
    # speculative decoding: tokens kept per sampling request [R] and the next drafts [R, K] (host copies on CUDA)
    kept: torch.Tensor | None = None
    drafts: torch.Tensor | None = None
    # what the drafter reads once the step is sampled (only with speculative decoding)
    dev: DeviceStep | None = None
    input_ids: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    # CUDA: a timing event recorded on the stream as the step is launched; with `ready` it times the step on the device
    started: torch.cuda.Event | None = None
    # CUDA with MTP drafts: recorded once the tokens' copies are queued, before the drafter (`ready` comes after it)
    tokens_ready: torch.cuda.Event | None = None

    @property
    def awaits_grammar(self) -> bool:
        return self.logits is not None


@dataclass(frozen=True)
class VerifyCommit:
    """What a verify step commits into its requests' slots once its stop checks are done: the GDN states after
    `kept` positions of each row and the target's hidden state at the last of them (the MTP head's, for a request
    resuming from a checkpoint of the slot). Deferred until something reads the slots (`ModelRunner.commit_verified`)
    so that a request whose end comes before its last kept token can commit there (`ModelRunner.keep_fewer`)."""

    step: StepInput
    dev: DeviceStep
    hidden: torch.Tensor      # [T, D] the step's final-normed hidden states
    first_rows: torch.Tensor  # [V] each verify row's first logits row
    kept: torch.Tensor        # [V] positions to commit per verify row (row i of the step is sampling request i)


@dataclass(frozen=True)
class StepResult:
    """What a step produced, per sampling request (ragged: 1 to 1 + drafts tokens each)."""

    tokens: dict[str, list[int]]
    logprobs: dict[str, list[TokenLogprob]]  # only for requests that asked for logprobs
    # prompt logprobs: request id -> (position of the scored token's predecessor, the scored token's logprob)
    prompt_logprobs: dict[str, list[tuple[int, TokenLogprob]]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # requests whose sampling raised -> why (no tokens)
    drafts: dict[str, list[int]] = field(default_factory=dict)  # MTP proposals for each request's next step
    # CUDA: the step's device time in ms, from its launch event to its ready event (None elsewhere, or when the
    # step sampled nothing)
    device_ms: float | None = None


class ModelRunner:
    """The only writer of device tensors; see the module docstring."""

    def __init__(self, config: EngineConfig, *, eos_token_ids: frozenset[int] = frozenset()) -> None:
        self.config = config
        self.device = resolve_device(config.runner.device)
        check_kv_cache_support(config.cache.kv_cache_dtype,
                               capability(self.device) if self.device.type == "cuda" else None)
        self.model = load_model(config.model, dtype=config.runner.dtype, device=self.device,
                                load_format=config.runner.load_format, with_mtp=config.with_mtp,
                                shapes=config.rank_shapes(), quantization=config.quantization)
        self.dtype = self.model.model.embed_tokens.weight.dtype
        self.plan = self.plan_memory()
        page_size, max_len = config.cache.page_size, config.scheduler.max_model_len
        log.info("%s", self.plan.describe(page_size, max_len))
        hint = self.plan.long_request_hint(page_size, max_len)
        if hint is not None and config.cache.num_state_slots is None and config.cache.num_pages is None:
            log.info("%s", hint)
        # running slots first, then the prefix cache's checkpoint slots, in the same state tensors
        self.cache = new_cache(config, num_pages=self.plan.num_pages,
                               num_slots=self.plan.num_slots + self.plan.num_checkpoints,
                               dtype=self.dtype, device=self.device)
        self.num_speculative_tokens = config.num_speculative_tokens
        self.drafter = MTPDrafter(self.model, self.cache, num_tokens=self.num_speculative_tokens,
                                  page_size=config.cache.page_size, device=self.device,
                                  draft_vocab=config.speculative.draft_vocab) if config.with_mtp else None
        al = config.speculative.simulated_acceptance
        self.simulated = None if al is None else SimulatedAcceptance(al, self.num_speculative_tokens, self.device)
        self.graphs = None if config.runner.enforce_eager or self.device.type != "cuda" else self._capture()
        self.varlen_graphs = self._capture_varlen() if self.graphs is not None else None
        if self.graphs is not None and self.drafter is not None:
            sched = config.scheduler
            self.drafter.capture(max_rows=min(sched.max_num_seqs, self.plan.num_slots),
                                 max_pages=pages_for_tokens(sched.max_model_len, config.cache.page_size))
        self.sampler = Sampler()
        self.eos_token_ids = eos_token_ids
        # What each state slot carries to its next step on the device: column 0 its last sampled token (the input of
        # its next decode step when that step is launched before the token reaches the host), then the MTP drafts
        # proposed for it (the next verify step's inputs: the host does not wait for them, see collect()).
        self.carried = torch.zeros(self.plan.num_slots, 1 + self.num_speculative_tokens, dtype=torch.long,
                                   device=self.device)
        self.last_tokens = self.carried[:, 0]
        # Prompts of requests with a repetition penalty, kept on the device: the penalty reads them every step, and
        # converting a long prompt list each step costs ~1.5 ms per 32k tokens of host time.
        self.prompt_tensors: dict[str, torch.Tensor] = {}
        self.uncommitted: VerifyCommit | None = None  # the last verify step's, until something reads its slots

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
        verify = tuple(range(2, 2 + self.num_speculative_tokens)) if self.cache.verify_rows else ()
        graphs = StepGraphs(self.model, self.cache, max_batch=min(sched.max_num_seqs, self.plan.num_slots),
                            max_pages=max_pages, device=self.device, tokens_per_row=(1, *verify),
                            max_verify_batch=self.cache.verify_rows)
        try:
            graphs.capture()
        except Exception as e:  # an op without a capturable GPU kernel: run eagerly rather than fail
            log.warning("CUDA graph capture failed (%s: %s); decode runs eagerly", type(e).__name__, e)
            return None
        log.info("captured decode CUDA graphs for batch sizes %s", graphs.sizes)
        return graphs

    def _capture_varlen(self) -> VarlenGraphs | None:
        sched, tokens = self.config.scheduler, self.plan.prefill_graph_tokens
        if tokens < 64:
            return None
        graphs = VarlenGraphs(self.model, self.cache, max_tokens=tokens,
                              step_tokens=sched.max_num_batched_tokens,
                              max_rows=min(sched.max_num_seqs, self.plan.num_slots),
                              max_pages=pages_for_tokens(sched.max_model_len, self.config.cache.page_size),
                              page_size=self.config.cache.page_size, device=self.device)
        try:
            graphs.capture(pool=self.graphs.pool if self.graphs is not None else None)
        except Exception as e:  # as for decode graphs: run eagerly rather than fail
            log.warning("CUDA graph capture of short prefill steps failed (%s: %s); they run eagerly",
                        type(e).__name__, e)
            return None
        log.info("captured prefill CUDA graphs for (rows, tokens) %s", sorted(graphs.graphs))
        return graphs

    # ---- the step ------------------------------------------------------------------------------------------------
    def replays_graph(self, step: StepInput) -> bool:
        """Whether execute_model will replay a CUDA graph for this step (its launch is then quick) rather than run
        the model from Python (enforce_eager, CPU, a shape no graph was captured for). The same tests as there."""
        if self.graphs is not None and self.graphs.fits(step.tokens_per_row, step.is_verify, step.num_rows,
                                                        step.block_table.shape[1]):
            return True
        return self.varlen_graphs is not None and self.varlen_graphs.key_for(step) is not None

    def varlen_step_replays(self, num_rows: int, num_tokens: int) -> bool:
        """Whether a plain varlen step (prefill chunks, decode rows of one token) of this shape replays a CUDA graph:
        the scheduler asks before it lets a step carry both drafts and prompt chunks, a step that runs eagerly."""
        return self.varlen_graphs is not None and self.varlen_graphs.fits(num_rows, num_tokens)

    @torch.no_grad()
    def launch(self, step: StepInput) -> LaunchedStep:
        """Upload the step, apply its state copies, run the model and the sampler, and start copying the samples
        to the host (nothing here waits for the device)."""
        if step.is_verify:
            if self.drafter is None:
                raise ValueError("this runner cannot verify draft tokens: speculative decoding is off "
                                 "(speculative_tokens=0), so its GDN layers keep no per-position buffers")
            verify = step.num_verify_rows
            if step.state_snapshots and {c.src for c in step.state_snapshots} & set(step.state_slots[:verify].tolist()):
                # checkpoints lie in prompts (the prefill chunks a verify step may carry), verify rows decode
                raise ValueError("a verify row cannot take a prefix-cache snapshot (its slot's state is committed "
                                 "after its stop checks, at the next launch or state copy)")
            if verify > self.cache.verify_rows or step.num_drafts > self.num_speculative_tokens:
                raise ValueError(f"a verify step of {verify} rows x {step.num_drafts} drafts exceeds the "
                                 f"per-position buffers ({self.cache.verify_rows} rows x "
                                 f"{self.num_speculative_tokens} drafts)")
        started = None
        if self.device.type == "cuda":
            started = torch.cuda.Event(enable_timing=True)
            started.record(torch.cuda.current_stream(self.device))
        self.commit_verified()  # the last verify step's, into slots this step reads (timed with this step)
        dev = upload_step(step, page_size=self.config.cache.page_size, device=self.device)
        self.apply_copies(step.state_copies, step.page_copies)
        logits = self.execute_model(dev, step)
        if self.drafter is not None:  # before the snapshots: a checkpoint keeps the slot's hidden state too
            self.drafter.rewrite_resume_kv(step, self._input_ids)
            if step.num_verify_rows < step.num_rows:  # (a verify row's is kept once sampled: VerifyCommit)
                self.drafter.keep_hidden(step, dev, self._hidden)
        self.apply_copies(step.state_snapshots)
        if not step.sampling and self.drafter is not None:
            # nothing samples (_propose never runs), but the MTP head's KV must cover these positions, also when
            # prompt-logprobs rows gave the step logits
            self.drafter.write_kv(step, dev, self._input_ids, self._hidden, None)
        if logits is None:
            return LaunchedStep(step, None, None)
        num_sampled = step.logits_rows.shape[0]
        scored = prompt_logprobs(logits[num_sampled:], step) if step.prompt_logprobs else None
        extra = {} if self.drafter is None else dict(dev=dev, input_ids=self._input_ids, hidden=self._hidden)
        pending = LaunchedStep(step, None, None, scored, logits=logits[:num_sampled], sample_slots=dev.sample_slots,
                               started=started, **extra)
        if step.sampling and needs_grammar(step):
            return pending  # sampled by sample() once the engine has the mask
        return self.sample(pending, None)

    def sample(self, launched: LaunchedStep, mask: GrammarMask | None) -> LaunchedStep:
        """Queue the sampling of a launched step (with its grammar mask, if any) and start copying the samples to
        the host. The mask is applied outside any CUDA graph: the graph ends at the logits."""
        step, scored = launched.step, launched.scored
        sampled, failed, kept, token_ids = None, {}, None, None
        if step.sampling:
            sampled, failed = self._sample(launched.logits, step, grammar_to_device(mask, self.device))
            if self.simulated is not None:
                self.simulated.force(step, launched.input_ids, sampled.token_ids)
            token_ids = self._share_tokens(sampled.token_ids)
            kept = self._keep_tokens(launched, token_ids)
        if self.device.type != "cuda":
            drafts = self._propose(launched, token_ids, kept) if token_ids is not None else None
            return LaunchedStep(step, sampled, None, scored, failed, kept=kept, drafts=drafts)
        host = SamplerOutput(*(_to_host(t) for t in sampled)) if sampled is not None else None
        scored = PromptScores(*(_to_host(t) for t in scored)) if scored is not None else None
        kept_host = _to_host(kept) if kept is not None else None
        stream = torch.cuda.current_stream(self.device)
        tokens_ready, drafts = None, None
        if token_ids is not None and self.drafter is not None:
            if step.propose_drafts:
                tokens_ready = torch.cuda.Event()
                tokens_ready.record(stream)
            drafts = self._propose(launched, token_ids, kept)
            drafts = _to_host(drafts) if drafts is not None else None
        ready = torch.cuda.Event(enable_timing=launched.started is not None)
        ready.record(stream)
        return LaunchedStep(step, host, ready, scored, failed, kept=kept_host, drafts=drafts,
                            started=launched.started, tokens_ready=tokens_ready)

    def _share_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The sampled tokens every rank goes on from (one rank: these; tensor parallelism: rank 0's)."""
        return token_ids

    def _share_drafts(self, drafts: torch.Tensor) -> torch.Tensor:
        """The drafts every rank verifies next (one rank: these; tensor parallelism: rank 0's, as its tokens)."""
        return drafts

    def _take_tokens(self, launched: LaunchedStep,
                     token_ids: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """What follows a step's sampling on the device, on every rank: each slot's last token (the next step's
        pending input) and, with speculative decoding on, the tokens each request keeps and the next drafts."""
        kept = self._keep_tokens(launched, token_ids)
        return kept, self._propose(launched, token_ids, kept)

    def _keep_tokens(self, launched: LaunchedStep, token_ids: torch.Tensor) -> torch.Tensor | None:
        """Each slot's last kept token into `carried`; with speculative decoding on, the tokens each request keeps
        ([R], returned) and the GDN states to commit at the last kept position (verify steps; with the hidden state
        there, for the MTP head: `uncommitted`)."""
        if self.drafter is None:
            self.last_tokens.index_copy_(0, launched.sample_slots, token_ids)
            return None
        step, dev = launched.step, launched.dev
        assert dev is not None and launched.input_ids is not None and launched.hidden is not None
        kept = kept_counts(step, launched.input_ids, token_ids)
        first = self._ids(first_logits_rows(step).tolist())
        v = step.num_verify_rows
        if v:
            self.uncommitted = VerifyCommit(step, dev, launched.hidden, first[:v], kept[:v])
        self.last_tokens.index_copy_(0, launched.sample_slots, token_ids[first + kept - 1])
        return kept

    def _propose(self, launched: LaunchedStep, token_ids: torch.Tensor,
                 kept: torch.Tensor | None) -> torch.Tensor | None:
        """With speculative decoding on: the next drafts [R, K] (None when the next step will not verify: then only
        the MTP head's KV, for later drafts), also kept in `carried` by slot for the next step's inputs."""
        if self.drafter is None:
            return None
        step, dev = launched.step, launched.dev
        assert dev is not None and launched.input_ids is not None and launched.hidden is not None and kept is not None
        if not step.propose_drafts:
            self.drafter.write_kv(step, dev, launched.input_ids, launched.hidden, token_ids)
            return None
        drafts = self._share_drafts(self.drafter.propose(step, dev, launched.input_ids, launched.hidden, token_ids,
                                                         kept))
        self.carried[:, 1:].index_copy_(0, launched.sample_slots, drafts)
        return drafts

    def _sample(self, logits: torch.Tensor, step: StepInput,
                grammar: GrammarBitmask | None) -> tuple[SamplerOutput, dict[str, str]]:
        """The sampler over every row; if it raises, row by row, so that only the requests whose parameters broke it
        fail (returned with the reason; their rows hold a placeholder token that nobody reads)."""
        per_request = [self._sampling_rows(s) for s in step.sampling]
        rows = [row for group in per_request for row in group]
        try:
            return self.sampler(logits, rows, grammar), {}
        except Exception as batch_error:  # noqa: BLE001 - find the culprit rows below
            log.warning("sampling failed for the batch (%s); sampling row by row", batch_error)
        outputs, failed = [], {}
        i = 0
        for group, s in zip(per_request, step.sampling):
            sl = slice(i, i + len(group))
            try:
                outputs.append(self.sampler(logits[sl], group, _grammar_rows(grammar, i, len(group))))
            except Exception as e:  # noqa: BLE001 - this request's error, reported to it alone
                failed[s.request_id] = f"{type(e).__name__}: {e}"
                outputs.append(self.sampler(logits[sl], [SamplingRow(SamplingParams(temperature=0))] * len(group)))
            i += len(group)
        return _concat_outputs(outputs), failed

    def execute_model(self, dev: DeviceStep, step: StepInput) -> torch.Tensor | None:
        """Run the model on an uploaded step: logits in the model dtype of its sampling rows, then of its prompt
        logprob rows ([M + R, V]; None when there are none)."""
        input_ids = dev.input_ids_from(self.carried)
        batch = dev.batch
        self._input_ids = input_ids  # kept for the MTP drafter (speculative decoding)
        if self.graphs is not None and self.graphs.can_run(batch):
            self._hidden, logits = self.graphs.run(input_ids, batch)  # every token of a uniform step, in order
            every_token = not step.prompt_logprobs and step.logits_rows.shape[0] == step.num_tokens
            return logits if every_token else logits[batch.logits_indices]
        key = self.varlen_graphs.key_for(step) if self.varlen_graphs is not None else None
        if key is not None:
            self._hidden, logits = self.varlen_graphs.run(key, step, input_ids)
            return logits if logits.shape[0] else None
        if batch.logits_indices.shape[0] == 0:
            self._hidden = self.model(input_ids, batch, self.cache)
            return None
        self._hidden = hidden = self.model(input_ids, batch, self.cache)
        return self.model.compute_logits(hidden[batch.logits_indices], upcast=False)

    def apply_copies(self, states: Sequence[StateCopy] = (), pages: Sequence[PageCopy] = ()) -> None:
        """GDN state copies between slots and KV copies between pages, queued on the device in order with the
        steps (a snapshot taken now sees every step launched before it)."""
        self.commit_verified()
        if states:
            self.cache.copy_states(self._ids([c.src for c in states]), self._ids([c.dst for c in states]))
        if pages:
            self.cache.copy_pages(self._ids([c.src for c in pages]), self._ids([c.dst for c in pages]))

    def commit_verified(self) -> None:
        """Queue the last verify step's commit (`uncommitted`), if not done yet: before anything reads its slots."""
        pending, self.uncommitted = self.uncommitted, None
        if pending is None:
            return
        assert self.drafter is not None
        self.cache.commit_verified(pending.dev.batch.state_slots[:pending.kept.shape[0]], pending.kept)
        self.drafter.keep_kept_hidden(pending.dev, pending.hidden, pending.first_rows + pending.kept - 1)

    def keep_fewer(self, request_id: str, num: int) -> None:
        """The last verify step commits the state `num` positions before the request's last kept one (its output
        ended there: the engine's stop checks dropped tokens after it). 0 < num < the tokens it kept."""
        pending = self.uncommitted
        verify = [] if pending is None else pending.step.sampling[:pending.kept.shape[0]]
        rows = [i for i, s in enumerate(verify) if s.request_id == request_id]
        if not rows:
            raise RuntimeError(f"request {request_id!r} is in no verify step whose states are still uncommitted: its "
                               "end must be placed before anything reads the slots (a state copy or the next step)")
        assert pending is not None
        if not 0 < num < int(pending.kept[rows[0]]):  # a sync, on the rare path of an end inside accepted drafts
            raise ValueError(f"request {request_id!r} kept {int(pending.kept[rows[0]])} positions; cannot commit "
                             f"{num} fewer")
        kept = pending.kept.clone()  # (the step's own copy may be what collect() read)
        kept[rows[0]] -= num
        self.uncommitted = replace(pending, kept=kept)

    def _ids(self, values: list[int]) -> torch.Tensor:
        """An index tensor on the device, sent from pinned memory (a pageable copy would wait for the GPU)."""
        host = torch.tensor(values, dtype=torch.long)
        return host.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else host

    def _sampling_row(self, s: SamplingRequest) -> SamplingRow:
        outputs = s.output_token_ids if s.output_token_ids is not None else ()
        return SamplingRow(params=s.params, prompt_token_ids=self._prompt_for_sampler(s), output_token_ids=outputs,
                           eos_token_ids=self.eos_token_ids, num_unlisted=s.num_output_tokens - len(outputs))

    def _sampling_rows(self, s: SamplingRequest) -> list[SamplingRow]:
        """One row per logits row of the request: row j samples as if drafts 1..j had been appended (its output
        position, hence its seeded noise and min_tokens, and the history its penalties read). Rows after the first
        of a request with placeholder drafts sample too (the step's shape is uniform); nothing reads their tokens."""
        first = self._sampling_row(s)
        if not s.draft_token_ids:
            return [first]
        rows = [first]
        listed = s.output_token_ids is not None
        for j in range(1, len(s.draft_token_ids) + 1):
            drafts = list(s.draft_token_ids[:j])
            outputs = list(first.output_token_ids) + drafts if listed else ()
            unlisted = first.num_unlisted + (0 if listed else j)
            rows.append(SamplingRow(params=s.params, prompt_token_ids=first.prompt_token_ids, output_token_ids=outputs,
                                    eos_token_ids=self.eos_token_ids, num_unlisted=unlisted))
        return rows

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
        lists. With MTP drafts, each request's drafts come as `device_draft` markers (the next step reads them on the
        device) and the wait ends before the drafter's, unless their values are needed: a request of the step whose
        sampling reads its outputs (its next step's penalties read the drafts as outputs), or a step-time budget
        (its cost model learns the step's device time, drafter included, from `device_ms`)."""
        sampling = launched.step.sampling
        values = self.config.scheduler.step_budget_ms is not None or any(s.params.reads_outputs for s in sampling)
        device_ms = None
        if launched.tokens_ready is not None and not values:
            launched.tokens_ready.synchronize()
        elif launched.ready is not None:
            launched.ready.synchronize()
            if launched.started is not None:
                device_ms = launched.started.elapsed_time(launched.ready)
        scored = {} if launched.scored is None else prompt_logprobs_lists(launched.scored, launched.step)
        tokens: dict[str, list[int]] = {}
        logprobs: dict[str, list[TokenLogprob]] = {}
        sampled = launched.sampled
        if sampled is None:
            return StepResult(tokens, logprobs, scored)
        token_ids = sampled.token_ids.tolist()
        kept = launched.kept.tolist() if launched.kept is not None else [1] * len(sampling)
        first = 0
        for s, count in zip(sampling, kept):
            rows = range(first, first + count)
            first += s.num_logits_rows
            if s.request_id in launched.failed:
                continue
            tokens[s.request_id] = [token_ids[i] for i in rows]
            n = s.params.logprobs
            if n is not None:
                logprobs[s.request_id] = [
                    TokenLogprob(token_ids[i], float(sampled.logprobs[i]),
                                 tuple(zip(sampled.top_ids[i, :n].tolist(), sampled.top_logprobs[i, :n].tolist())))
                    for i in rows]
        drafts = {}
        if launched.drafts is not None:
            k = launched.drafts.shape[1]
            rows = launched.drafts.tolist() if values else ([device_draft(j) for j in range(k)] for _ in sampling)
            drafts = {s.request_id: d for s, d in zip(sampling, rows) if s.request_id not in launched.failed}
        return StepResult(tokens, logprobs, scored, launched.failed, drafts, device_ms)

    def release(self, request_ids: Iterable[str]) -> None:
        """Drop what the runner keeps for requests that ended (their device prompts)."""
        for rid in request_ids:
            self.prompt_tensors.pop(rid, None)
