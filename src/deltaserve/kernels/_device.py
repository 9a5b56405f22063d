"""Facts about the CUDA device that kernel wrappers size their grids by and choose their variants by (cached: the
wrappers ask on every call)."""

from __future__ import annotations

import functools

import torch

from deltaserve.config import env_flag


@functools.lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (the current one when the device has no index)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=8)
def _name(device_index: int) -> str:
    return torch.cuda.get_device_name(device_index)


def device_name(device: torch.device) -> str:
    """The CUDA device's name, e.g. "NVIDIA H200" (the key of per-card tuned tables)."""
    return _name(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=8)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) compute capability of a CUDA device (the current one when the device has no index)."""
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=8)
def _max_shared_mem(device_index: int) -> int:
    import triton

    return triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


def max_shared_mem(device: torch.device) -> int:
    """Bytes of shared memory one program may use on a CUDA device (the limit Triton checks at launch: 227 KB on an
    H100 or H200), for wrappers that fit their pipeline stages to it."""
    return _max_shared_mem(device.index if device.index is not None else torch.cuda.current_device())


# ---------------------------------------------------------------------------------------------------------------------
# Programmatic Dependent Launch (PDL): the one switch. A kernel launched with PDL may start while the kernel before it
# in the stream (or CUDA graph: a programmatic edge) is still finishing; it runs its prologue (index math, loads of
# weights) and then waits (griddepcontrol.wait) before reading anything an earlier kernel wrote. Kernels that take
# part have a `PDL: tl.constexpr = False` parameter and get `**pdl_launch(device)` at their launch: PDL=True
# compiles in the griddepcontrol instructions, launch_pdl=True makes Triton launch them with the programmatic
# stream-serialization attribute. With PDL off the kernels compile exactly as without the parameter.

_PDL_WORDS = {"": None, "auto": None, "1": True, "on": True, "true": True, "yes": True,
              "0": False, "off": False, "false": False, "no": False}


def parse_pdl(value: str) -> bool | None:
    """DELTASERVE_PDL: 0/off/false/no turns PDL off; 1/on/true/yes or unset/auto turns it on where the device
    supports it (on is never forced onto a device without it: that could not compile)."""
    key = value.strip().lower()
    if key not in _PDL_WORDS:
        raise ValueError(f"DELTASERVE_PDL={value!r}: expected 0/1, on/off, true/false, yes/no or auto")
    return _PDL_WORDS[key]


# The module-level switch: None follows the device (on at sm_90+), False turns PDL off everywhere, True asks for it
# where supported. Benchmarks flip it in-process (`_device.PDL = False`); kernels compiled and CUDA graphs captured
# before a flip keep what they were built with, so capture again after changing it.
PDL: bool | None = parse_pdl(env_flag("DELTASERVE_PDL"))

PDL_MIN_CAPABILITY = (9, 0)  # griddepcontrol: PTX ISA 7.8, sm_90 and later
PDL_MIN_CUDA = (12, 3)  # programmatic edges in captured CUDA graphs


@functools.lru_cache(maxsize=1)
def _cuda_version() -> tuple[int, int]:
    v = torch.version.cuda
    return tuple(int(p) for p in v.split(".")[:2]) if v else (0, 0)  # type: ignore[return-value]


def _interpreting() -> bool:
    try:
        import triton
    except ImportError:
        return False
    return bool(triton.knobs.runtime.interpret)


def pdl_supported(device: torch.device) -> bool:
    """PDL can be used on this device: a CUDA GPU of compute capability 9.0 or later, a CUDA >= 12.3 build of torch,
    and kernels compiled (not run by the Triton interpreter, which has no inline PTX)."""
    return (device.type == "cuda" and capability(device) >= PDL_MIN_CAPABILITY
            and _cuda_version() >= PDL_MIN_CUDA and not _interpreting())


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels launched on `device` use PDL now: the switch (PDL) unless it is False, gated by support."""
    return PDL is not False and device.type == "cuda" and pdl_supported(device)


_launch_kwargs: dict[tuple[str, int | None, bool | None], dict[str, bool]] = {}  # asked on every launch: cached


def pdl_launch(device: torch.device) -> dict[str, bool]:
    """Keyword arguments for a participating kernel's launch: `kernel[grid](..., **pdl_launch(x.device))` (a shared
    dict: do not modify it)."""
    key = (device.type, device.index, PDL)
    kwargs = _launch_kwargs.get(key)
    if kwargs is None:
        on = pdl_enabled(device)
        kwargs = _launch_kwargs[key] = {"PDL": on, "launch_pdl": on}
    return kwargs
