"""Weights into L2 ahead of their GEMV, on a side stream.

At decode sizes the middle of a layer (GDN: the conv update, the recurrence and the gated norm; attention: the
q/k norm with RoPE and the KV write, the paged attention and its output gate) is a run of latency-bound kernels that
leave the memory mostly idle for ~10 µs, and only then does the next weight stream, the output projection, start. A
layer asks for that projection's weights right after launching its input projection (`prefetch_l2`): a small
kernel on a second stream, ordered after what the main stream has queued so far, issues
`cp.async.bulk.prefetch.L2` over the weights while the main stream runs the middle, so the projection's GEMV finds
much of them in L2. The model's forward joins the side stream once at its end (`join`; a CUDA graph capture needs
every forked stream joined before it ends). A hint only: nothing reads what the kernel does, so it cannot change any
output; where it cannot run (CPU, the interpreter, before sm_90, the switch off) nothing is launched.

The earlier try, each GEMV prefetching its own first tiles just before its PDL wait (RESULTS.md, 2026-12-06, H100),
lost: it overlapped only the short kernel right before the GEMV, and competed with the previous weight stream.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import triton
import triton.language as tl

from deltaserve.kernels._device import capability

# None: on where supported (sm_90+, compiled kernels); False: off; benchmarks flip it (graphs captured before a flip
# keep what they were captured with).
ENABLED: bool | None = None
MAX_TOKENS = 256  # steps of more tokens are compute-bound: their GEMMs do not wait on the weights' bytes
MIN_BYTES = 1 << 16  # smaller tensors (biases, scales of small layers) are not worth a launch
_LANE_BYTES = 16 << 10  # one bulk prefetch per lane
_LANES = 32  # one warp a program

_streams: dict[int, torch.cuda.Stream] = {}
_pending: set[int] = set()


@triton.jit
def _prefetch_kernel(ptr, nbytes, LANE_BYTES: tl.constexpr, LANES: tl.constexpr):
    """Lane i of program p asks L2 for bytes [(p * LANES + i) * LANE_BYTES, +LANE_BYTES) of the tensor (the last
    lane's share cut to nbytes, a multiple of 16)."""
    offs = (tl.program_id(0) * LANES + tl.arange(0, LANES)).to(tl.int64) * LANE_BYTES
    size = tl.minimum(nbytes - offs, LANE_BYTES).to(tl.int32)
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; }", "=r,l,r",
        [ptr + offs, size], dtype=tl.int32, is_pure=False, pack=1)


def enabled(device: torch.device) -> bool:
    """Whether prefetches run on `device`: the switch, a CUDA device of sm_90+ (the bulk prefetch), compiled
    kernels."""
    return (ENABLED is not False and device.type == "cuda" and capability(device) >= (9, 0)
            and not triton.knobs.runtime.interpret)


def prefetch_l2(tensors: Iterable[torch.Tensor], tokens: int) -> None:
    """Ask L2 for the bytes of `tensors` (a projection's stored weights) on the device's side stream, once the work
    queued on the current stream so far has run; nothing where the step has more than MAX_TOKENS tokens or
    prefetching is off. The caller's model forward calls `join` before it returns."""
    tensors = [t for t in tensors if t.numel() * t.element_size() >= MIN_BYTES]
    if not tensors or tokens > MAX_TOKENS or not enabled(tensors[0].device):
        return
    device = tensors[0].device
    index = device.index if device.index is not None else torch.cuda.current_device()
    side = _streams.get(index)
    if side is None:
        side = _streams[index] = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for t in tensors:
            if not t.is_contiguous() or t.data_ptr() % 16:
                continue  # the bulk prefetch takes 16-byte aligned ranges
            nbytes = t.numel() * t.element_size() // 16 * 16
            grid = (triton.cdiv(nbytes, _LANE_BYTES * _LANES),)
            _prefetch_kernel[grid](t.detach().view(-1).view(torch.uint8), nbytes, LANE_BYTES=_LANE_BYTES,
                                   LANES=_LANES, num_warps=1)
    _pending.add(index)


def join(device: torch.device) -> None:
    """The current stream waits for the side stream's prefetch kernels (they finish within microseconds: they only
    issue the requests). Called once at the end of a model forward that may have prefetched."""
    if device.type != "cuda":
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index in _pending:
        torch.cuda.current_stream(device).wait_stream(_streams[index])
        _pending.discard(index)
