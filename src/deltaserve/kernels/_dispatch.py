"""Pick the Triton kernel for CUDA tensors and the pure-torch reference otherwise, behind one signature.

`DELTASERVE_KERNELS=ref` forces the references everywhere (for debugging a kernel against its spec on GPU).
The Triton module is imported lazily, on the first CUDA call, so CPU-only machines never need Triton.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, Callable

import torch

from deltaserve.config import env_flag


def parse_kernels(value: str) -> bool:
    """DELTASERVE_KERNELS -> whether the references are forced: 'ref' forces them, unset / empty / 'auto' picks per
    device. Anything else is refused: a typo ('reference') would silently run the kernels it meant to check."""
    key = value.strip().lower()
    if key not in ("", "auto", "ref"):
        raise ValueError(f"DELTASERVE_KERNELS={value!r}: expected 'ref' (the pure-torch references everywhere) or "
                         "'auto' (Triton kernels on CUDA, the default), or leave it unset")
    return key == "ref"


_FORCE_REF = parse_kernels(env_flag("DELTASERVE_KERNELS"))


def _first_tensor(kwargs: dict[str, Any]) -> torch.Tensor | None:
    for value in kwargs.values():
        if isinstance(value, torch.Tensor):
            return value
    return None


def dispatch(ref_fn: Callable[..., Any], triton_module: str) -> Callable[..., Any]:
    """Return a function with ref_fn's keyword-only signature that runs `triton_module.<same name>` on CUDA."""
    name = ref_fn.__name__
    fast: list[Callable[..., Any]] = []

    @functools.wraps(ref_fn)
    def run(**kwargs: Any) -> Any:
        t = _first_tensor(kwargs)
        if _FORCE_REF or t is None or not t.is_cuda:
            return ref_fn(**kwargs)
        if not fast:
            fast.append(getattr(importlib.import_module(triton_module), name))
        return fast[0](**kwargs)

    run.reference = ref_fn  # type: ignore[attr-defined]
    return run
