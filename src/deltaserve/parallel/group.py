"""The tensor-parallel process group of this process and the collectives the layers use.

Two groups: the default one carries the model's collectives (NCCL on CUDA, gloo on CPU) with a bounded timeout
(DELTASERVE_DIST_TIMEOUT seconds, default 300), so a rank that hangs makes the others fail instead of waiting
forever; a gloo group carries the host-side commands rank 0 broadcasts (step inputs), with no practical timeout,
since a worker legitimately waits as long as the server is idle.
"""

from __future__ import annotations

import logging
import math
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from deltaserve.config import ConfigError, env_flag

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300.0
IDLE_TIMEOUT = timedelta(days=365)  # the command group: workers wait for rank 0 as long as it lives
JOIN_TIMEOUT = timedelta(seconds=600)  # every rank joins within this (or the collective timeout, if longer)
JOINED = "deltaserve/joined"  # store counter of the ranks that joined
FAILED = "deltaserve/failed/"  # + rank: the error a worker's command raised, for rank 0 to report


def collective_timeout() -> timedelta:
    """DELTASERVE_DIST_TIMEOUT: seconds a model collective may wait for the other ranks (unset or empty: the
    default). Checked here, since torch's own errors for a bad value name neither the variable nor the fix."""
    text = env_flag("DELTASERVE_DIST_TIMEOUT").strip()
    try:
        seconds = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError(f"DELTASERVE_DIST_TIMEOUT={text!r}: expected a number of seconds > 0 (default "
                          f"{DEFAULT_TIMEOUT_S:.0f}), or leave it unset")
    return timedelta(seconds=seconds)


@dataclass
class TPGroup:
    rank: int
    world_size: int
    device: torch.device
    commands: dist.ProcessGroup  # gloo, host objects from rank 0
    store: dist.Store  # hosted by rank 0: where a worker leaves its error when it gives up
    statuses_gathered: bool = False  # the start handshake took place: a later error goes through the store

    @property
    def nccl(self) -> bool:
        return self.device.type == "cuda"


_GROUP: TPGroup | None = None


def init_group(*, rank: int, world_size: int, master_addr: str, master_port: int, device: torch.device,
               check_workers: Callable[[], None] | None = None) -> TPGroup:
    """Join the process group (every rank calls this; it returns once all have joined). Rank 0 hosts the store;
    while it waits for the others it calls check_workers, which raises when a spawned worker died before joining."""
    global _GROUP
    if _GROUP is not None:
        raise RuntimeError("this process already belongs to a tensor-parallel group")
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = collective_timeout()
    join = max(timeout, JOIN_TIMEOUT)  # starting a process and importing torch is not a collective's business
    store = dist.TCPStore(master_addr, master_port, world_size, is_master=rank == 0, timeout=join,
                          wait_for_workers=False)
    store.add(JOINED, 1)
    deadline = time.monotonic() + join.total_seconds()
    while rank == 0 and store.add(JOINED, 0) < world_size:
        if check_workers is not None:
            check_workers()
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {store.add(JOINED, 0)} of {world_size} tensor-parallel ranks joined "
                               f"{master_addr}:{master_port} within {join.total_seconds():.0f} s")
        time.sleep(0.05)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    commands = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    _GROUP = TPGroup(rank, world_size, device, commands, store)
    log.info("rank %d of %d joined the tensor-parallel group (%s, %s:%d)", rank, world_size, backend, master_addr,
             master_port)
    return _GROUP


def destroy_group() -> None:
    global _GROUP
    if _GROUP is None:
        return
    _GROUP = None
    try:
        dist.destroy_process_group()
    except Exception as e:  # noqa: BLE001 - a peer already gone: nothing left to tear down cleanly
        log.debug("destroy_process_group: %s", e)


def current_group() -> TPGroup:
    if _GROUP is None:
        raise RuntimeError("no tensor-parallel group in this process (a model built for tensor_parallel_size > 1 "
                           "runs inside the engine's ranks)")
    return _GROUP


# ---- the model's collectives ---------------------------------------------------------------------------------------

class CollectiveError(RuntimeError):
    """A collective or command of the group failed inside torch's call: a peer is gone, hung or unreachable, not this
    rank's own work, so a worker does not report it as its error (rank 0 meets the same failure). Told by the call
    that raised it, not by the text: gloo raises plain RuntimeErrors, and a rank's own error may say "timeout"."""

    @classmethod
    def of(cls, what: str, cause: BaseException) -> CollectiveError:
        return cls(f"{what} failed: {type(cause).__name__}: {cause}")


_DEVICE_ERRORS = tuple(t for t in (torch.OutOfMemoryError, getattr(torch, "AcceleratorError", None)) if t)


def call_collective(what: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """Run torch.distributed's `fn`; a RuntimeError it raises (DistError included) becomes a CollectiveError. Only the
    call itself: a tensor allocated around it that fails is this rank's own error, and so is a device's own error
    (out of memory, or a kernel's sticky CUDA error that NCCL's call is often the first to see)."""
    try:
        return fn(*args, **kwargs)
    except _DEVICE_ERRORS:
        raise
    except RuntimeError as e:
        raise CollectiveError.of(what, e) from e


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum over the ranks, in place (the partial outputs of row-parallel layers)."""
    call_collective("all_reduce", dist.all_reduce, x)
    return x


def all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The ranks' tensors concatenated along `dim`, in rank order (vocab-parallel logits)."""
    group, x = current_group(), x.contiguous()
    if group.nccl:
        out = torch.empty((group.world_size, *x.shape), dtype=x.dtype, device=x.device)
        call_collective("all_gather", dist.all_gather_into_tensor, out, x)
        parts = out.unbind(0)
    else:
        parts = [torch.empty_like(x) for _ in range(group.world_size)]
        call_collective("all_gather", dist.all_gather, parts, x)
    return torch.cat(parts, dim=dim)


def broadcast(x: torch.Tensor) -> torch.Tensor:
    """Rank 0's tensor on every rank, in place."""
    call_collective("broadcast", dist.broadcast, x, src=0)
    return x


# ---- host-side commands (rank 0 -> workers) ------------------------------------------------------------------------

class CommandTimeout(CollectiveError):
    """A worker did not take rank 0's command within the collective timeout."""

    def __init__(self, rank: int, seconds: float) -> None:
        super().__init__(f"tensor-parallel rank {rank} did not take the next command within {seconds:.0f} s "
                         "(DELTASERVE_DIST_TIMEOUT): it hung or its host is unreachable")
        self.rank = rank


def send_command(obj: object) -> None:
    """Rank 0: send a host object to each worker, failing after the collective timeout, naming the rank, when one
    does not take it (the command group itself has no practical timeout: that is how idle workers wait)."""
    payload = torch.frombuffer(bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)), dtype=torch.uint8)
    size = torch.tensor([payload.numel()], dtype=torch.long)
    group, timeout = current_group(), collective_timeout()
    sends = [(rank, [call_collective("command send", dist.isend, t, dst=rank, group=group.commands)
                     for t in (size, payload)])
             for rank in range(1, group.world_size)]  # all in flight at once, then waited for rank by rank
    for rank, works in sends:
        for work in works:
            try:
                work.wait(timeout)
            except RuntimeError as e:  # the wait's own error: a timeout (named by gloo's text) or a peer gone
                if "timed out" in str(e).lower():
                    raise CommandTimeout(rank, timeout.total_seconds()) from e
                raise CollectiveError.of(f"command send to rank {rank}", e) from e


def recv_command() -> object:
    """A worker: the next host object rank 0 sends (waits as long as rank 0 is idle)."""
    commands = current_group().commands
    size = torch.empty(1, dtype=torch.long)
    call_collective("command receive", dist.recv, size, src=0, group=commands)
    payload = torch.empty(int(size.item()), dtype=torch.uint8)
    call_collective("command receive", dist.recv, payload, src=0, group=commands)
    return pickle.loads(payload.numpy().tobytes())


def gather_status(status: object) -> list[object]:
    """Every rank's status (e.g. an error while loading) on every rank, over the command group: the start handshake,
    once (rank 0 waits in it just once; a worker that fails later reports in the store instead)."""
    group = current_group()
    out: list[object] = [None] * group.world_size
    group.statuses_gathered = True  # even if the gather fails: it was this rank's one go
    call_collective("status gather", dist.all_gather_object, out, status, group=group.commands)
    return out


# ---- a worker's failure (worker -> rank 0) -------------------------------------------------------------------------

def is_collective_error(e: BaseException) -> bool:
    """Whether `e` is a failure of the group itself (a peer gone or hung), not of this rank's own work: raised by a
    collective's call (CollectiveError), or one of torch.distributed's own error types (DistError: backend,
    network, store). An error of the rank's own work is not one, whatever its text says."""
    return isinstance(e, (CollectiveError, dist.DistError))


def report_failure(message: str) -> None:
    """A worker: leave `message` for rank 0 (which reports it when the worker's leaving fails its collectives)."""
    group = current_group()
    try:
        group.store.set(f"{FAILED}{group.rank}", message)
    except Exception as e:  # noqa: BLE001 - rank 0 is gone as well: nobody to tell
        log.warning("could not report the failure to rank 0: %s", e)


def reported_failures() -> dict[int, str]:
    """Rank 0: the errors workers reported, by rank (none before the group exists, e.g. when joining it failed)."""
    group = _GROUP
    if group is None:
        return {}
    keys = {rank: f"{FAILED}{rank}" for rank in range(1, group.world_size)}
    return {rank: group.store.get(key).decode(errors="replace") for rank, key in keys.items()
            if group.store.check([key])}
