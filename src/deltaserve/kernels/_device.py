"""Facts about the CUDA device that kernel wrappers size their grids by and choose their variants by (cached: the
wrappers ask on every call)."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (the current one when the device has no index)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=8)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) compute capability of a CUDA device (the current one when the device has no index)."""
    return _capability(device.index if device.index is not None else torch.cuda.current_device())
