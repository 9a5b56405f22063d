"""Fixtures of the kernel tests. tests/ itself is never put on sys.path: its `kernels` package would shadow the
Hugging Face `kernels` package that transformers (>= 5.25) imports; tests import `tests.tolerances`."""

from __future__ import annotations

import os

import pytest

from tests.kernels import bounds


@pytest.fixture(autouse=True)
def triton_bounds_check():
    """Under the interpreter, fail any test whose kernels load or store outside their tensor arguments (see
    tests/kernels/bounds.py; DELTASERVE_BOUNDS_CHECK=0 turns it off)."""
    bounds.checking = bounds.enabled() and bounds.install()
    bounds.violations.clear()
    yield
    bounds.checking = False


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A check's raise fails the test where it propagates; one that the code under test swallowed fails it here."""
    report = (yield).get_result()
    if call.when == "call" and report.passed and bounds.violations:
        report.outcome, report.longrepr = "failed", "out-of-bounds Triton access:\n" + "\n".join(bounds.violations)


@pytest.fixture(scope="module")
def interpreter_rounds_like_the_gpu():
    """The interpreter truncates fp32 -> bf16 casts (the GPU rounds to nearest even): make it round like the GPU so
    bf16 results compare as they would on the device. Its fp8 e4m3 casts are wrong too (a rounding carry out of the
    mantissa lands in the exponent: 124.0 becomes 64.0): convert those through torch, which rounds to nearest even as
    the GPU's cvt does. Also skip its int32 overflow checks (the GPU has none; they cost about a third of its
    time)."""
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
        if tl.float8e4nv in (src, dst):
            return _convert_fp8_e4m3(data, src, dst)
        return original(data, src, dst, rounding_mode)

    interp._convert_float = convert
    interp.InterpreterOptions.sanitize_overflow = False
    yield
    interp._convert_float = original
    interp.InterpreterOptions.sanitize_overflow = sanitize


def _convert_fp8_e4m3(data, src, dst):
    """fp8 e4m3 <-> fp32 / bf16 / fp16 casts through torch (round to nearest even), on the interpreter's raw bits."""
    import numpy as np
    import torch
    import triton.language as tl

    torch_of = {tl.float8e4nv: torch.float8_e4m3fn, tl.float32: torch.float32, tl.bfloat16: torch.bfloat16,
                tl.float16: torch.float16}
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32}
    raw = torch.from_numpy(np.ascontiguousarray(data))
    value = raw.view(torch_of[src]) if src != tl.float32 else raw.float()
    out = value.to(torch_of[dst])
    out = out.view(bits[out.element_size()]) if dst != tl.float32 else out
    return out.numpy().view(np.dtype(f"uint{8 * out.element_size()}")).reshape(np.shape(data))
