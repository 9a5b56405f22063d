"""Device side of Programmatic Dependent Launch (the host side, the switch, is `_device.pdl_launch`).

A kernel launched with PDL may be scheduled while its predecessor in the stream is still running. PTX ISA,
"Parallel Synchronization and Communication Instructions: griddepcontrol"
(https://docs.nvidia.com/cuda/parallel-thread-execution/index.html#parallel-synchronization-and-communication-instructions-griddepcontrol):
- `griddepcontrol.wait` "causes the executing thread to wait until all prerequisite grids in flight have completed
  and all the memory operations from the prerequisite grids are performed and made visible to the current grid";
- `griddepcontrol.launch_dependents` signals that the dependents "can be scheduled as soon as all other CTAs in the
  grid issue the same instruction or have completed"; it does not publish any memory, so a dependent sees our
  writes only through its own wait, which waits for our completion. Signalling early is therefore always safe.

The rules every participating kernel keeps (so the chain stays correct whatever runs before or after it):
1. Before `wait`, no store and no load of anything an earlier kernel may have written (activations, step metadata,
   caches, state pools): only index math and loads of weights. One exception, for hints only: the MoE down kernel
   reads the expert ids (written by the routing kernel, two launches back: complete by rule 3, as its predecessor,
   the gate/up kernel, released only after its own wait) to pick the weight rows it prefetches into L2; the ids it
   computes with are loaded again after the wait, so even a stale value would only cost a useless prefetch (the
   id is clamped to the expert range, so the hint's address is always inside the weights).
2. Every program reaches `wait` (no early return before it): a grid then completes only after its predecessor has,
   so "predecessor complete" covers every kernel before it too.
3. `launch_dependents` comes after `wait` (here: right after it), so the next kernel is scheduled only once ours
   has stopped waiting, and at most two grids of the chain overlap.
A kernel after a non-PDL kernel (cuBLAS, torch's own) simply waits for it as usual: that kernel's implicit trigger
is its completion; a non-PDL kernel after ours waits for our completion. Both instructions are no-ops when the
kernel was not launched with PDL. Under the interpreter (no inline PTX) the switch is always off.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def prefetch_l2(ptrs, mask):
    """`prefetch.global.L2` of every address where mask is set: a hint that holds no registers and returns
    nothing, for a PDL prologue to pull weights into L2 while the previous kernel finishes (PTX only: never under
    the interpreter, where PDL is off)."""
    tl.inline_asm_elementwise("{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; }", "=r,l,r",
                              [ptrs, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def wait_then_release(PDL: tl.constexpr):
    """With PDL: wait for the previous kernel's completion and memory, then let the next kernel be scheduled.
    Without: nothing (compiles to no instruction)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
