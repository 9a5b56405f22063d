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
   caches, state pools): only index math and loads of weights.
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
def wait_then_release(PDL: tl.constexpr):
    """With PDL: wait for the previous kernel's completion and memory, then let the next kernel be scheduled.
    Without: nothing (compiles to no instruction)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
