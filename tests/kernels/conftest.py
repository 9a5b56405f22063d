"""Make tests/tolerances.py importable as `tolerances` however pytest roots this package."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)


@pytest.fixture(scope="module")
def interpreter_rounds_like_the_gpu():
    """The interpreter truncates fp32 -> bf16 casts (the GPU rounds to nearest even): make it round like the GPU so
    bf16 results compare as they would on the device. Also skip its int32 overflow checks (the GPU has none; they
    cost about a third of its time)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    import numpy as np
    import triton.language as tl
    import triton.runtime.interpreter as interp

    original, sanitize = interp._convert_float, interp.InterpreterOptions.sanitize_overflow

    def convert(data, src, dst, rounding_mode):
        if src == tl.float32 and dst == tl.bfloat16:
            bits = np.ascontiguousarray(data, dtype=np.float32).view(np.uint32).astype(np.uint64)
            out = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            return np.where(np.isnan(data), np.uint16(0x7FC0), out).reshape(np.shape(data))
        return original(data, src, dst, rounding_mode)

    interp._convert_float = convert
    interp.InterpreterOptions.sanitize_overflow = False
    yield
    interp._convert_float = original
    interp.InterpreterOptions.sanitize_overflow = sanitize
