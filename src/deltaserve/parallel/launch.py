"""Starting the ranks of a tensor-parallel engine.

One host (default): the engine's process is rank 0 and spawns ranks 1..N-1 as worker processes
(torch.multiprocessing, spawn), which join it over a free local port.

Several hosts (torchrun-style): every process is started by the user or a launcher with MASTER_ADDR, MASTER_PORT,
RANK, WORLD_SIZE and LOCAL_RANK set; the process with RANK 0 runs the engine (the server), the others run
`run_worker_from_env` (the CLI does this by itself when RANK is not 0). WORLD_SIZE must equal
tensor_parallel_size. On GPUs rank r uses cuda:LOCAL_RANK.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import signal
import socket

import torch

from deltaserve.config import ConfigError, EngineConfig, env_flag

log = logging.getLogger(__name__)

ENV_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


def build_runner(config: EngineConfig, *, eos_token_ids: frozenset[int] = frozenset()):
    """The engine's runner: a plain ModelRunner at tensor_parallel_size 1, else rank 0's driver of N ranks."""
    from deltaserve.engine.runner import ModelRunner

    if config.parallel.tensor_parallel_size == 1:  # whatever the environment says (e.g. one engine per process)
        return ModelRunner(config, eos_token_ids=eos_token_ids)
    return start_rank0(config, eos_token_ids)


def _env_int(name: str, default: int | None = None) -> int:
    """A torchrun-style variable that holds an integer (unset or empty: `default`); int() alone named neither the
    variable nor the fix."""
    text = env_flag(name).strip()
    if not text and default is not None:
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r}: expected an integer (the torchrun-style launch variables "
                          f"{list(ENV_VARS)}: see the README, 'Several hosts')") from None


def launched_world_size() -> int:
    """WORLD_SIZE from a torchrun-style launch (1 when not launched so)."""
    return _env_int("WORLD_SIZE", 1)


def is_worker_process(tensor_parallel_size: int) -> bool:
    """Whether this process was launched torchrun-style as a rank other than 0 of a tensor-parallel engine (it must
    run a worker, not the engine)."""
    return tensor_parallel_size > 1 and launched_world_size() > 1 and _env_int("RANK", 0) != 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_config(config: EngineConfig, rank: int, local_rank: int) -> EngineConfig:
    """The config as rank `rank` sees it: its rank, and its own GPU (cuda:LOCAL_RANK) on CUDA."""
    from deltaserve.engine.runner import resolve_device

    device = resolve_device(config.runner.device)
    runner = config.runner
    if device.type == "cuda":
        runner = dataclasses.replace(runner, device=f"cuda:{local_rank}")
    return dataclasses.replace(config, parallel=dataclasses.replace(config.parallel, rank=rank), runner=runner)


def _env_launch(config: EngineConfig) -> tuple[int, str, int, int]:
    """(rank, master address, port, local rank) of a torchrun-style launch; ConfigError when it does not match."""
    missing = [v for v in ENV_VARS if not env_flag(v)]
    if missing:
        raise ConfigError(f"WORLD_SIZE is set, so this is a multi-process launch, but {missing} are not; set all "
                          f"of {list(ENV_VARS)}")
    world, tp = launched_world_size(), config.parallel.tensor_parallel_size
    if world != tp:
        raise ConfigError(f"WORLD_SIZE is {world} but tensor_parallel_size is {tp}; they must be equal")
    return _env_int("RANK"), env_flag("MASTER_ADDR"), _env_int("MASTER_PORT"), _env_int("LOCAL_RANK")


def start_rank0(config: EngineConfig, eos_token_ids: frozenset[int]):
    from deltaserve.parallel import group
    from deltaserve.parallel.runner import RankFailure, TPDriver, TPModelRunner, describe_reported_failures

    tp = config.parallel.tensor_parallel_size
    group.collective_timeout()  # a bad DELTASERVE_DIST_TIMEOUT fails here, before any worker is spawned
    workers: list = []
    if launched_world_size() > 1:
        rank, addr, port, local_rank = _env_launch(config)
        if rank != 0:
            raise ConfigError(f"this process has RANK {rank}: only rank 0 runs the engine; the others run "
                              "`deltaserve serve ...` (which runs a worker when RANK is not 0)")
    else:
        addr, port, local_rank = "127.0.0.1", _free_port(), 0
        ctx = torch.multiprocessing.get_context("spawn")
        for r in range(1, tp):
            p = ctx.Process(target=_worker_main, args=(_rank_config(config, r, r), addr, port, True),
                            name=f"deltaserve-rank{r}", daemon=True)
            p.start()
            workers.append(p)
    config = _rank_config(config, 0, local_rank)
    try:
        device = torch.device(config.runner.device or "cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        elif workers:  # the ranks share this host's cores (oversubscribed OpenMP threads spin)
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp))
        group.init_group(rank=0, world_size=tp, master_addr=addr, master_port=port, device=device,
                         check_workers=lambda: _check_started(workers))
        driver = TPDriver(TPModelRunner(config, eos_token_ids=eos_token_ids), workers)
    except BaseException as e:
        # A worker that failed after the start handshake left its error in the store and left, failing a collective
        # of rank 0's start: report the worker's error, not the collective's.
        reported = describe_reported_failures() if group.is_collective_error(e) else None
        for p in workers:
            p.kill()
        group.destroy_group()
        if reported:
            raise RankFailure(reported) from e
        raise
    atexit.register(driver.shutdown)
    return driver


def _check_started(workers: list) -> None:
    from deltaserve.parallel.runner import RankFailure

    dead = [(r, p.exitcode) for r, p in enumerate(workers, start=1) if not p.is_alive()]
    if dead:
        raise RankFailure("; ".join(f"tensor-parallel rank {r} exited (code {c}) before joining" for r, c in dead)
                          + " (its log is above; a script that builds the engine must do so under "
                            "`if __name__ == \"__main__\":`, since the workers are spawned)")


def _worker_main(config: EngineConfig, addr: str, port: int, spawned: bool = False) -> None:
    """A spawned or launched worker: join the group, load this rank's shard, run rank 0's commands."""
    if spawned:  # Ctrl-C reaches the whole process group: rank 0 alone decides when its workers stop
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    from deltaserve.parallel import group
    from deltaserve.parallel.runner import TPModelRunner, serve_commands

    rank, tp = config.parallel.rank, config.parallel.tensor_parallel_size
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format=f"%(levelname)s rank{rank} %(name)s: %(message)s")
    device = torch.device(config.runner.device or "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # the ranks share the host's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp))
    group.init_group(rank=rank, world_size=tp, master_addr=addr, master_port=port, device=device)
    try:
        runner = TPModelRunner(config)
    except BaseException as e:
        log.exception("rank %d failed to start", rank)
        _report_start_failure(e)
        group.destroy_group()
        raise SystemExit(1)
    try:
        serve_commands(runner)
    except Exception as e:  # noqa: BLE001 - rank 0 went away or a collective failed: nothing left to serve
        log.error("rank %d stops: %s: %s", rank, type(e).__name__, e)
        raise SystemExit(1)
    finally:
        group.destroy_group()


def _report_start_failure(e: BaseException) -> None:
    """A worker that failed to start tells rank 0 why: in the start handshake, where rank 0 waits for every rank's
    status, or, once that took place, in the group's store (rank 0 reads it when this rank's leaving fails its next
    collective or command). Not when the failure is the group's (a collective's) or another rank's (the handshake
    raised RankFailure): rank 0 meets those itself."""
    from deltaserve.parallel import group
    from deltaserve.parallel.runner import RankFailure

    if isinstance(e, RankFailure) or group.is_collective_error(e):
        return
    message = f"{type(e).__name__}: {e}"
    if group.current_group().statuses_gathered:
        group.report_failure(f"start: {message}")
        return
    try:
        group.gather_status(message)
    except Exception:  # noqa: BLE001 - rank 0 is gone as well
        pass


def run_worker_from_env(config: EngineConfig) -> int:
    """A torchrun-style worker (RANK != 0): runs until rank 0 stops it."""
    rank, addr, port, local_rank = _env_launch(config)
    _worker_main(_rank_config(config, rank, local_rank), addr, port)
    return 0
