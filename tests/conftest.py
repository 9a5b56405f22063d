"""Test-wide setup."""

from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():
    # transformers switches its Qwen3.5 GDN path to fla's Triton kernels whenever `fla` imports, and those cannot
    # run without a GPU; the comparisons on CPU must use transformers' pure-torch reference path.
    sys.modules["fla"] = None  # type: ignore[assignment]
    # Triton reads TRITON_INTERPRET when a kernel is decorated, and some modules (triton.testing via the benchmark
    # scripts) fix it on import: set it before any test module is collected, so collection order does not matter.
    os.environ.setdefault("TRITON_INTERPRET", "1")
