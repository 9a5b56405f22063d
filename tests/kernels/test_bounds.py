"""The interpreter's out-of-bounds check (tests/kernels/bounds.py) catches a wrong mask, and does not flag in-bounds
accesses through views."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernel's @triton.jit

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from tests.kernels import bounds  # noqa: E402

pytestmark = pytest.mark.skipif(not (bounds.enabled() and bounds.install()),
                                reason="bounds checks run only under the Triton interpreter, on a known Triton")


@triton.jit
def _copy(x_ptr, y_ptr, n, stride, shift, LOAD_ONE_MORE: tl.constexpr, STORE_ONE_MORE: tl.constexpr,
          BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    # the wrong mask is `< n + 1`; `& (shift >= 0)` (a block mask and a scalar) makes it an int32 mask in the
    # interpreter, which the check must read as a mask, not as indices
    x = tl.load(x_ptr + shift + offs * stride, mask=(offs < n + LOAD_ONE_MORE) & (shift >= 0), other=0.0)
    tl.store(y_ptr + offs, x, mask=offs < n + STORE_ONE_MORE)


@triton.jit
def _count(c_ptr, n, ONE_MORE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.atomic_add(c_ptr + offs, 1, mask=offs < n + ONE_MORE)


def _run(x, y, load_one_more=0, store_one_more=0, shift=0):
    _copy[(1,)](x, y, y.numel(), x.stride(0), shift, LOAD_ONE_MORE=load_one_more, STORE_ONE_MORE=store_one_more,
                BLOCK=32)


def test_one_element_past_the_end_is_caught():
    # the check raises before the access runs, so nothing is read or written past the end (the interpreter re-raises
    # it as an InterpreterError). 15 fp32 = 60 bytes: were the check to miss, the stray 4 bytes at offset 60 would
    # fall in malloc's rounding slack, not in the heap's bookkeeping
    x, y = torch.arange(15, dtype=torch.float32), torch.zeros(15)
    _run(x, y)
    assert torch.equal(x, y)
    for op, kw in [("load", dict(load_one_more=1)), ("store", dict(store_one_more=1))]:
        with pytest.raises(Exception, match=rf"_copy: {op} of 1 active lane.*offset 60\b") as info:
            _run(x, y, **kw)
        assert isinstance(info.value.__cause__, bounds.OutOfBounds)  # raised by the check, not by something else
        assert len(bounds.violations) == 1
        bounds.violations.clear()  # expected: do not fail this test when it passes
    c = torch.zeros(15, dtype=torch.int32)
    _count[(1,)](c, 15, ONE_MORE=0, BLOCK=32)
    with pytest.raises(Exception, match=r"_count: atomic of 1 active lane.*offset 60\b"):
        _count[(1,)](c, 15, ONE_MORE=1, BLOCK=32)
    assert c.eq(1).all()
    bounds.violations.clear()


def test_views_are_bounded_by_their_storage():
    base = torch.arange(64, dtype=torch.float32)
    y = torch.zeros(16)
    _run(base[32:], y)  # an offset view
    assert torch.equal(y, base[32:48])
    _run(base[::4], y)  # a strided one, up to its last element
    assert torch.equal(y, base[::4])
    # past the view but inside its storage is not flagged (the bound is the storage)
    _run(base[40:56], y, load_one_more=1)
    # pointers far outside but every lane masked off: nothing is accessed, nothing to flag
    _run(base, y, load_one_more=1, shift=-1000)
    assert not y.any()
