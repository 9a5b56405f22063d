"""Which rank a tensor-parallel failure is blamed on, without starting ranks: torch.distributed's calls as the group
wraps them, and rank 0's diagnosis reading a real (in-process) store the way it reads rank 0's TCP store."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from deltaserve.parallel import group
from deltaserve.parallel.runner import TPDriver


def _raise(error: BaseException):
    def fn(*args, **kwargs):
        raise error
    return fn


def test_a_failing_call_is_the_groups_error_but_a_devices_own_error_is_not():
    with pytest.raises(group.CollectiveError, match="all_reduce failed: RuntimeError: Connection closed by peer"):
        group.call_collective("all_reduce", _raise(RuntimeError("Connection closed by peer")))
    # out of memory (and a sticky CUDA error) inside NCCL's call is this rank's: it reports it, not the group
    with pytest.raises(torch.OutOfMemoryError):
        group.call_collective("all_reduce", _raise(torch.OutOfMemoryError("CUDA out of memory")))


def test_a_workers_reported_error_is_named_even_when_rank_0_met_another(monkeypatch):
    """With NCCL a worker's exit can reach rank 0 as an ordinary error at a later sync; the worker's own report is
    the cause to name, not rank 0's error."""
    store = dist.HashStore()
    store.set(f"{group.FAILED}1", "launch: ValueError: bad shard")
    monkeypatch.setattr(group, "_GROUP", group.TPGroup(0, 2, torch.device("cpu"), None, store))
    message = TPDriver(None, [])._diagnose(RuntimeError("CUDA error: an illegal memory access"))
    assert "rank 1 failed (launch: ValueError: bad shard" in message and "rank 0" not in message


@pytest.mark.parametrize("value", ["abc", "nan", "inf", "0", "-5"])
def test_a_bad_dist_timeout_is_refused_naming_the_variable(monkeypatch, value):
    """It reached torch as it was: 'abc' failed with "could not convert string to float", 0 and negative values with
    a traceback from gloo's process group (after the workers were spawned)."""
    monkeypatch.setenv("DELTASERVE_DIST_TIMEOUT", value)
    with pytest.raises(ValueError, match=r"DELTASERVE_DIST_TIMEOUT=.*seconds > 0 \(default 300\)"):
        group.collective_timeout()


def test_the_dist_timeout_is_read_in_seconds(monkeypatch):
    monkeypatch.setenv("DELTASERVE_DIST_TIMEOUT", " 60.5 ")
    assert group.collective_timeout().total_seconds() == 60.5
    monkeypatch.setenv("DELTASERVE_DIST_TIMEOUT", "")  # set but empty: the default, as unset
    assert group.collective_timeout().total_seconds() == group.DEFAULT_TIMEOUT_S
