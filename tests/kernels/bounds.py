"""Out-of-bounds checks for Triton kernels run under the interpreter (TRITON_INTERPRET=1).

The interpreter loads and stores through raw host addresses, so a wrong mask does not fail a test: it reads whatever
lies past a tensor, or corrupts the heap. install() wraps the interpreter's memory ops (every load / store path, block
pointers and descriptors included, ends in create_masked_load / create_masked_store) and checks each active lane
against the storages of the launch's tensor arguments *before* the access runs, so a bad access raises instead of
happening. Written against Triton 3.6's interpreter internals; install() declines with a warning if they differ.
"""

from __future__ import annotations

import inspect
import os
import warnings

import numpy as np

# [(lo, hi, label)] byte spans of the running launch's tensor arguments, and the kernel's name
_spans: list[tuple[int, int, str]] = []
_kernel = ["?"]
violations: list[str] = []  # every violation is also kept here, in case the code under test swallows the raise
checking = False  # the hooks stay installed for the session; only tests/kernels' fixture turns them on
_installed: list[bool] = []


class OutOfBounds(AssertionError):
    pass


def enabled() -> bool:
    """Check only interpreted runs (compiled GPU kernels never go through these hooks); DELTASERVE_BOUNDS_CHECK=0
    turns it off."""
    import torch

    return (os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available()
            and os.environ.get("DELTASERVE_BOUNDS_CHECK", "1") != "0")


def _record_spans(name, arg, unwrap):
    if isinstance(arg, tuple):
        for i, a in enumerate(arg):
            _record_spans(f"{name}[{i}]", a, unwrap)
    elif hasattr(arg, "base") and hasattr(arg, "block_shape"):  # TensorDescriptor
        _record_spans(name, arg.base, unwrap)
    elif hasattr(arg, "data_ptr"):
        t = unwrap(arg)
        # the whole storage, not the view: a view's elements need not be contiguous nor start at the storage's start,
        # and a kernel may legitimately reach any of its storage through the view's pointer
        st = t.untyped_storage()
        if st.nbytes():
            _spans.append((st.data_ptr(), st.data_ptr() + st.nbytes(),
                           f"{name} ({t.dtype} {tuple(t.shape)}, storage of {st.nbytes()} bytes)"))


def _check(op, ptrs, mask):
    if not checking:
        return
    # masks are not always bool (`scalar_cond & block_mask` comes out int32): as fancy indices they would pick
    # elements by number, so cast them the way the interpreter's C++ load / store does (nonzero = active); a
    # descriptor load's mask comes as a memoryview
    addrs = ptrs.data if mask is None else ptrs.data[np.broadcast_to(np.asarray(mask.data).astype(bool, copy=False),
                                                                     ptrs.data.shape)]
    if addrs.size == 0:
        return
    size = max(1, getattr(ptrs.get_element_ty(), "primitive_bitwidth", 64) // 8)
    lo, hi = int(addrs.min()), int(addrs.max()) + size
    if any(a <= lo and hi <= b for a, b, _ in _spans):  # the usual case: every lane in one tensor, no per-lane work
        return
    ok = np.zeros(addrs.shape, bool)
    for a, b, _ in _spans:
        ok |= (addrs >= a) & (addrs + size <= b)
    if ok.all():
        return
    bad = addrs[~ok].astype(np.int64)
    first = int(bad.min())
    near = min(_spans, key=lambda s: min(abs(first - s[0]), abs(first - s[1])), default=None)
    where = f"; nearest argument {near[2]} at [{near[0]:#x}, {near[1]:#x}), the first bad byte is at offset " \
            f"{first - near[0]}" if near else "; the launch has no tensor arguments"
    msg = (f"Triton kernel {_kernel[0]}: {op} of {bad.size} active lane(s) of {size} byte(s) outside every tensor "
           f"argument, at bytes [{first:#x}, {int(bad.max()) + size:#x}){where}")
    violations.append(msg)
    raise OutOfBounds(msg)


def install() -> bool:
    """Wrap the interpreter once; False (with a warning) where its internals are not the ones expected."""
    if _installed:
        return _installed[0]
    try:
        import triton.runtime.interpreter as interp

        B, G = interp.InterpreterBuilder, interp.GridExecutor
        expected = {B.create_masked_load: ["self", "ptrs", "mask", "other"],
                    B.create_masked_store: ["self", "ptrs", "value", "mask"],
                    B.create_atomic_rmw: ["self", "rmwOp", "ptr", "val", "mask"],
                    B.create_atomic_cas: ["self", "ptr", "cmp", "val"],
                    G.__init__: ["self", "fn", "arg_names"],
                    G._init_args_hst: ["self", "args_dev", "kwargs"]}
        for fn, names in expected.items():
            got = list(inspect.signature(fn).parameters)[:len(names)]
            if got != names:
                raise TypeError(f"{fn.__qualname__}{got}, expected {names}")
        unwrap = interp._unwrap_tensor
    except Exception as e:  # noqa: BLE001 - any mismatch means: do not check, do not break the suite
        warnings.warn(f"Triton interpreter bounds checks off: its internals changed ({e!r})", stacklevel=2)
        _installed.append(False)
        return False

    load, store, rmw, cas, init_args = (B.create_masked_load, B.create_masked_store, B.create_atomic_rmw,
                                        B.create_atomic_cas, G._init_args_hst)

    def init_args_hst(self, args_dev, kwargs):
        # the host copies are what the interpreter dereferences (the same storages for CPU tensors)
        args_hst, kwargs_hst = init_args(self, args_dev, kwargs)
        _spans.clear()
        _kernel[0] = getattr(self.fn, "__name__", "?")
        for name, arg in [*zip(self.arg_names, args_hst), *kwargs_hst.items()]:
            _record_spans(name, arg, unwrap)
        return args_hst, kwargs_hst

    def masked_load(self, ptrs, mask, *a, **k):
        _check("load", ptrs, mask)
        return load(self, ptrs, mask, *a, **k)

    def masked_store(self, ptrs, value, mask, *a, **k):
        _check("store", ptrs, mask)
        return store(self, ptrs, value, mask, *a, **k)

    def atomic_rmw(self, op, ptr, val, mask, *a, **k):
        _check("atomic", ptr, mask)
        return rmw(self, op, ptr, val, mask, *a, **k)

    def atomic_cas(self, ptr, *a, **k):
        _check("atomic", ptr, None)
        return cas(self, ptr, *a, **k)

    B.create_masked_load, B.create_masked_store = masked_load, masked_store
    B.create_atomic_rmw, B.create_atomic_cas = atomic_rmw, atomic_cas
    G._init_args_hst = init_args_hst
    _installed.append(True)
    return True
