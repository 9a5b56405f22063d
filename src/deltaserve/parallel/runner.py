"""The runner of one tensor-parallel rank, rank 0's driver, and the workers' command loop.

Rank 0 runs the engine (scheduler, cache manager, outputs) and drives its own `TPModelRunner` through `TPDriver`,
which first broadcasts each call to the workers: ("launch", StepInput), ("sample",) for a step whose sampling waited
for its grammar mask, ("copies", states, pages), ("keep_fewer", request id, n) (speculative decoding: a request ended
inside its accepted drafts), ("stop",). Every rank then runs the same model code on its shard with its own caches,
so the model's collectives line up. Only rank 0 samples; it broadcasts the step's sampled tokens, from which every
rank updates its buffer of last tokens (what later steps read for input ids still pending on the host: async
scheduling) and, with MTP speculative decoding, keeps the verified tokens, commits its GDN states and runs the MTP
head's drafting passes (their collectives included), whose drafts rank 0 broadcasts too: every rank keeps rank 0's
drafts on the device for the next step's inputs, as it keeps rank 0's tokens.

A rank that dies or hangs: the next collective or command fails (the peer's connection closes, or the collective
times out after DELTASERVE_DIST_TIMEOUT seconds) and the driver raises `RankFailure` naming the rank when it can
tell (the spawned workers' exit codes), which stops the engine. A worker whose command raises leaves its error in the
group's store and exits: rank 0, waiting for it in the step's collectives, then fails at once and reports that error.
A call that raises on rank 0 stops the engine too (RankFailure naming rank 0): the workers may wait in a collective
that rank 0 never joins, so no later call's collectives could pair with theirs.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from deltaserve.cache.manager import PageCopy, StateCopy
from deltaserve.cache.planner import MemoryPlan
from deltaserve.config import EngineConfig
from deltaserve.engine.runner import LaunchedStep, ModelRunner
from deltaserve.engine.step_input import GrammarMask, StepInput
from deltaserve.parallel import group

log = logging.getLogger(__name__)


class RankFailure(RuntimeError):
    """A tensor-parallel rank died, hung or failed to start: the engine cannot run another step."""


class TPModelRunner(ModelRunner):
    """One rank's ModelRunner: its shard of the weights (config.rank_shapes() is this rank's) and its own caches."""

    def __init__(self, config: EngineConfig, *, eos_token_ids: frozenset[int] = frozenset()) -> None:
        self.rank = config.parallel.rank
        super().__init__(config, eos_token_ids=eos_token_ids)

    def plan_memory(self) -> MemoryPlan:
        """Report this rank's load (every rank has its weights now, or says why not), then the smallest plan of all
        ranks: rank 0's scheduler hands out pages and slots that every rank must have."""
        statuses = group.gather_status(None)
        failed = [(r, s) for r, s in enumerate(statuses) if s is not None]
        if failed:
            raise RankFailure("; ".join(f"tensor-parallel rank {r} failed to start: {s}" for r, s in failed))
        plan = super().plan_memory()
        sizes = torch.tensor([plan.num_pages, plan.num_slots, plan.num_checkpoints, plan.prefill_graph_tokens],
                             dtype=torch.long)
        group.call_collective("plan all_reduce", dist.all_reduce, sizes, op=dist.ReduceOp.MIN,
                              group=group.current_group().commands)
        pages, slots, checkpoints, graph_tokens = sizes.tolist()
        return dataclasses.replace(plan, num_pages=pages, num_slots=slots, num_checkpoints=checkpoints,
                                   prefill_graph_tokens=graph_tokens)

    def sample(self, launched: LaunchedStep, mask: GrammarMask | None) -> LaunchedStep:
        """Rank 0 samples; every rank then goes on from rank 0's tokens (`_share_tokens`): the pending input ids of
        later steps and, with speculative decoding, the kept tokens, the state commit and the MTP head's drafting,
        whose collectives every rank joins."""
        if self.rank == 0:
            return super().sample(launched, mask)
        if launched.step.sampling:
            assert launched.logits is not None
            tokens = torch.empty(launched.logits.shape[0], dtype=torch.long, device=self.device)
            self._take_tokens(launched, self._share_tokens(tokens))
        return LaunchedStep(launched.step, None, None)

    def _share_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        return group.broadcast(token_ids)  # the sampler's int64 ids; the workers' buffers are int64 too

    def _share_drafts(self, drafts: torch.Tensor) -> torch.Tensor:
        # Each rank's MTP head computes the same drafts from the same gathered logits; rank 0's are broadcast all the
        # same (the next step's inputs come from the device now, not from rank 0's StepInput), so that the ranks
        # verify one set of drafts by construction, as they keep one set of tokens.
        return group.broadcast(drafts)


def serve_commands(runner: TPModelRunner) -> None:
    """A worker's loop: run rank 0's commands until it says stop (or its connection fails)."""
    awaiting: LaunchedStep | None = None  # a launched step whose sampling waits for rank 0's grammar mask
    while True:
        command: Any = group.recv_command()
        kind = command[0]
        if kind == "stop":
            return
        try:
            if kind == "launch":
                launched = runner.launch(command[1])
                awaiting = launched if launched.awaits_grammar else None
            elif kind == "sample":
                if awaiting is not None:
                    runner.sample(awaiting, None)
                awaiting = None
            elif kind == "copies":
                runner.apply_copies(command[1], command[2])
            elif kind == "keep_fewer":
                runner.keep_fewer(command[1], command[2])
        except Exception as e:
            # Rank 0 may be waiting in this step's collectives for this rank (until their timeout), and the ranks'
            # collectives no longer line up: say why, then leave (the caller exits), which fails them at once.
            log.exception("rank %d: %s failed", runner.rank, kind)
            if not group.is_collective_error(e):  # else rank 0 meets the same failure of the group
                group.report_failure(f"{kind}: {type(e).__name__}: {e}")
            raise


def describe_reported_failures() -> str | None:
    """Rank 0: RankFailure's message for the errors workers left in the store (None when none did)."""
    reported = group.reported_failures()
    if not reported:
        return None
    return "; ".join(f"tensor-parallel rank {r} failed ({error}; its log has the traceback); the engine stopped"
                     for r, error in reported.items())


class TPDriver:
    """Rank 0's runner as the engine sees it: each call is broadcast to the workers, then run on rank 0's shard.
    Everything else (plan, device, dtype, collect, release, ...) is rank 0's runner's."""

    def __init__(self, runner: TPModelRunner, workers: Sequence[Any] = ()) -> None:
        self.runner = runner
        self.workers = list(workers)  # spawned multiprocessing.Process of ranks 1.. (empty under torchrun)
        self.failed: str | None = None
        self.stopped = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.runner, name)

    def launch(self, step: StepInput) -> LaunchedStep:
        return self._run(("launch", step), self.runner.launch, step)

    def sample(self, launched: LaunchedStep, mask: GrammarMask | None) -> LaunchedStep:
        return self._run(("sample",), self.runner.sample, launched, mask)

    def apply_copies(self, states: Sequence[StateCopy] = (), pages: Sequence[PageCopy] = ()) -> None:
        if states or pages:
            self._run(("copies", tuple(states), tuple(pages)), self.runner.apply_copies, states, pages)

    def keep_fewer(self, request_id: str, num: int) -> None:
        # every rank commits its shard of the request's GDN states at the same position
        self._run(("keep_fewer", request_id, num), self.runner.keep_fewer, request_id, num)

    def _run(self, command: tuple, fn, *args: Any) -> Any:
        if self.failed is not None or self.stopped:
            raise RankFailure(self.failed or "the tensor-parallel workers were shut down")
        try:
            group.send_command(command)
            return fn(*args)
        except BaseException as e:
            # Any error stops the engine, rank 0's own included (Ctrl-C too): raised part way through the call, it
            # leaves the workers in a collective that rank 0 never joins (or they failed too and left), so no later
            # call could pair the ranks' collectives (the next command, and the shutdown's stop, waited the collective
            # timeout; the next command then blamed a worker).
            self.failed = self._diagnose(e)
            if not isinstance(e, Exception):
                raise  # KeyboardInterrupt, SystemExit: as they are; later calls raise RankFailure
            log.error("%s", self.failed, exc_info=not group.is_collective_error(e))  # rank 0's own: its traceback
            raise RankFailure(self.failed) from e

    def _dead_workers(self) -> list[tuple[int, int | None]]:
        return [(rank, p.exitcode) for rank, p in enumerate(self.workers, start=1) if not p.is_alive()]

    def _diagnose(self, e: BaseException) -> str:
        """Which rank failed: a worker that reported its error, rank 0 (its own error, not a collective's), a spawned
        worker that exited (waiting briefly for its exit to be seen), else what the collective said."""
        reported = describe_reported_failures()  # first: a worker's error may surface on rank 0 as another one
        if reported:
            return reported
        if not group.is_collective_error(e):
            error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            return (f"tensor-parallel rank 0 failed ({error}); the other ranks cannot finish the step with it, and "
                    "the engine stopped")
        deadline = time.monotonic() + (0.0 if isinstance(e, group.CommandTimeout) else 3.0)
        dead = self._dead_workers()
        while not dead and self.workers and time.monotonic() < deadline:
            time.sleep(0.05)
            dead = self._dead_workers()
        if dead:
            return "; ".join(f"tensor-parallel rank {r} died (exit code {code}); the engine stopped"
                             for r, code in dead)
        if isinstance(e, group.CommandTimeout):
            return f"{e}; the engine stopped"
        return (f"a tensor-parallel collective failed ({type(e).__name__}: {e}); a rank hung, died or lost its "
                "connection, and the engine stopped")

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the workers and leave the process group (idempotent)."""
        if self.stopped:
            return
        self.stopped = True
        atexit.unregister(self.shutdown)  # the exit handler would keep this runner (and its model) alive
        if self.failed is None:
            try:
                group.send_command(("stop",))
            except Exception as e:  # noqa: BLE001 - a worker already gone
                log.debug("stop command: %s", e)
        deadline = time.monotonic() + (timeout if self.failed is None else 0.0)
        for p in self.workers:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(1.0)
        group.destroy_group()
