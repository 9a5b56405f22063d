"""Reference quantized linear and MoE ops: dequantize the weight, round it to the activation dtype, then run the same
math as the unquantized references (kernels/linear/ref.py, kernels/moe/ref.py). Their outputs are those of the model
whose weights were dequantized ahead of time, which is what the GPU kernels are tested against.

Internal weight layouts (what every checkpoint format is converted to at load time, layers/quant.py):
  int4: qweight int32 [..., N, ceil(K/8)]: unsigned 4-bit codes packed along K, 8 per word, lowest nibble first;
        scales fp32 [..., N, ceil(K/G)]; zeros uint8 [..., N, ceil(K/G)] (unsigned zero-point codes);
        W[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G]. An optional perm [K] (act-order GPTQ) says which
        input column each stored column reads: y = x[..., perm] @ W^T. Act-order experts: w13_perm [E, D], one
        order per expert for its gate and up rows (stored column j of expert e reads input column perm[e, j]); their
        down projections' orders are folded into the gate and up rows at load (layers/quant.py), so w2 has none.
  fp8:  weight float8_e4m3fn [..., N, K]; scale fp32 [..., N, ceil(K/block_k)] (one scale per row and K block: a
        checkpoint's [N/128, K/128] block scales are repeated over their rows); W[n, k] = w[n, k] * scale[n, k // bk].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deltaserve.kernels.activation.ref import silu_and_mul

_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """int32 [..., C] (8 codes per word along the last dim, lowest nibble first) -> uint8 codes [..., k]."""
    u = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 0xF
    return u.reshape(*packed.shape[:-1], -1)[..., :k].to(torch.uint8)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8/int codes [..., K] in [0, 15] -> int32 [..., ceil(K/8)], lowest nibble first (inverse of unpack_int4)."""
    k = codes.shape[-1]
    pad = (-k) % 8
    c = F.pad(codes.to(torch.int32), (0, pad)).reshape(*codes.shape[:-1], -1, 8)
    words = (c << _SHIFTS.to(codes.device)).sum(dim=-1, dtype=torch.int64)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def dequant_int4(*, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                 k: int) -> torch.Tensor:
    """-> fp32 [..., N, k]."""
    q = unpack_int4(qweight, k).float()
    z = zeros.float().repeat_interleave(group_size, dim=-1)[..., :k]
    s = scales.float().repeat_interleave(group_size, dim=-1)[..., :k]
    return (q - z) * s


def dequant_fp8(*, weight: torch.Tensor, scale: torch.Tensor, block_k: int) -> torch.Tensor:
    """-> fp32 [..., N, K]."""
    k = weight.shape[-1]
    return weight.float() * scale.float().repeat_interleave(block_k, dim=-1)[..., :k]


def int4_linear(*, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group_size: int, perm: torch.Tensor | None = None, silu_gate: bool = False) -> torch.Tensor:
    """x: [..., K] -> x @ W^T [..., N] in x.dtype (W dequantized, rounded to x.dtype, then torch's GEMM). silu_gate:
    x is [..., 2K] = [gate | up] and the input is silu_and_mul's silu(gate) * up (a dense MLP's down projection)."""
    x = silu_and_mul(x=x) if silu_gate else x
    k = x.shape[-1]
    if perm is not None:
        x = x.index_select(-1, perm)
    w = dequant_int4(qweight=qweight, scales=scales, zeros=zeros, group_size=group_size, k=k).to(x.dtype)
    return F.linear(x, w)


def int4_linear_tail(*, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     group_size: int, tail: torch.Tensor, perm: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """int4_linear and a dense weight's product with the same x (never permuted): (x @ W^T, x @ tail^T). tail: [N_TAIL,
    K] in x's dtype (a merged projection's unquantized rows after its int4 ones: the GDN in_proj's b|a)."""
    return (int4_linear(x=x, qweight=qweight, scales=scales, zeros=zeros, group_size=group_size, perm=perm),
            F.linear(x, tail))


FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_RECIPROCAL = float(torch.tensor(1 / FP8_MAX, dtype=torch.float32))  # scales multiply by it (as the kernel does)
ACT_GROUP = 128  # columns per activation scale under dynamic FP8 activations (the peers' 1 x 128 token groups)


def quantize_fp8_act(x: torch.Tensor, group: int = ACT_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token-group FP8 activations: x [M, K] -> (xq float8_e4m3fn [M, K], scales fp32 [M, ceil(K/group)])
    with x ~= xq * scale, scale = amax(|x| over the group) times fp32(1/448) (a group of zeros gets scale 0 and codes
    0), codes = x / scale (correctly rounded) rounded to nearest even. The GPU GEMM computes the same codes from each
    x tile it loads (triton._quantize_fp8_rows)."""
    m, k = x.shape
    pad = (-k) % group
    xg = F.pad(x.float(), (0, pad)).view(m, (k + pad) // group, group)
    scale = xg.abs().amax(dim=-1) * FP8_RECIPROCAL  # a Python scalar: no host-to-device copy
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    xq = (xg / safe.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return xq.view(m, k + pad)[:, :k].contiguous(), scale


def dequant_fp8_act(xq: torch.Tensor, scale: torch.Tensor, group: int = ACT_GROUP) -> torch.Tensor:
    """-> fp32 [M, K]: xq * its group's scale."""
    k = xq.shape[-1]
    return xq.float() * scale.repeat_interleave(group, dim=-1)[..., :k]


def fp8_linear(*, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block_k: int,
               act_fp8: bool = False, silu_gate: bool = False) -> torch.Tensor:
    """x: [..., K] -> x @ W^T [..., N] in x.dtype (bf16/fp16/fp32 activations; the weight is dequantized). act_fp8:
    W8A8, the activations quantized per token and ACT_GROUP columns first (quantize_fp8_act), the product of the
    two dequantized operands taken in fp32. silu_gate: as int4_linear's."""
    x = silu_and_mul(x=x) if silu_gate else x
    w = dequant_fp8(weight=weight, scale=scale, block_k=block_k)
    if not act_fp8:
        return F.linear(x, w.to(x.dtype))
    x2 = x.reshape(-1, x.shape[-1])
    xq, sx = quantize_fp8_act(x2)
    return F.linear(dequant_fp8_act(xq, sx), w).to(x.dtype).view(*x.shape[:-1], weight.shape[0])


def fp8_linear_tail(*, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block_k: int, tail: torch.Tensor,
                    act_fp8: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8_linear and a dense weight's product with the same x: (x @ W^T, x @ tail^T), as int4_linear_tail."""
    return fp8_linear(x=x, weight=weight, scale=scale, block_k=block_k, act_fp8=act_fp8), F.linear(x, tail)


def pair_rows(x: torch.Tensor, topk_ids: torch.Tensor, perm: torch.Tensor, shared_slot: bool = False) -> torch.Tensor:
    """Each routed pair's input row in its expert's column order: x [T, D], topk_ids [T, k], perm [E, D] ->
    [T * (k + shared_slot), D] with row t * (k + shared_slot) + j = x[t, perm[topk_ids[t, j]]] (a slot with no expert,
    id < 0, reads expert 0's order: its row is never used), and with shared_slot a last row per token holding x[t]
    itself (the shared expert's, which has no order)."""
    t, k = topk_ids.shape
    rows = x.index_select(0, torch.arange(t, device=x.device).repeat_interleave(k))
    rows = rows.gather(1, perm.index_select(0, topk_ids.reshape(-1).clamp(min=0)).long())
    if not shared_slot:
        return rows
    return torch.cat([rows.view(t, k, -1), x.unsqueeze(1)], dim=1).reshape(t * (k + 1), -1)


def shared_weights(w13, w2, d: int, inter: int) -> tuple | None:
    """The shared expert's weights as the MoE ops take them, checked: None; each a tuple in the experts' format
    (returned flat, w13's tensors then w2's); or each one dense tensor, bf16 / fp16 / fp32 [2I, D] and [D, I] with
    unit column stride (a shared expert kept unquantized, as Qwen's GPTQ-Int4 layout keeps it), returned as
    (w13, w2). D and I are the experts' hidden and intermediate sizes."""
    if w13 is None and w2 is None:
        return None
    if w13 is None or w2 is None:
        raise ValueError("shared_w13 and shared_w2 come together")
    dense = isinstance(w13, torch.Tensor)
    if dense != isinstance(w2, torch.Tensor):
        raise ValueError("shared_w13 and shared_w2 are both dense tensors or both tuples in the experts' format")
    if not dense:
        return (*w13, *w2)
    for name, w, shape in (("shared_w13", w13, (2 * inter, d)), ("shared_w2", w2, (d, inter))):
        if tuple(w.shape) != shape or not w.is_floating_point() or w.element_size() < 2 or w.stride(-1) != 1:
            raise ValueError(f"{name}: a dense shared expert's weight is {list(shape)} (the experts' sizes) in bf16, "
                             f"fp16 or fp32 with unit column stride; got {list(w.shape)} {w.dtype} with strides "
                             f"{w.stride()} (quantized weights come as a tuple in the experts' format)")
    return w13, w2


def _shared(w13, w2, dequant, d: int, inter: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The shared expert's (w13, w2) for _moe: dense as given, or dequantized from the experts' format."""
    shared = shared_weights(w13, w2, d, inter)
    if shared is None or len(shared) == 2:
        return shared
    half = len(shared) // 2
    return dequant(shared[:half], d), dequant(shared[half:], inter)


def _moe(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, expert, shared=None,
         shared_gate: torch.Tensor | None = None, shared_out: torch.Tensor | None = None) -> torch.Tensor:
    """The routed-expert sum of kernels/moe/ref.fused_moe with expert e's weights from expert(e) -> (w13, w2), and
    with `shared` ((w13, w2) dequantized) one more expert per token weighted by sigmoid(shared_gate), or with
    `shared_out` (its output [T, D], from its own layers) that output so weighted, added in fp32."""
    if shared is not None and shared_out is not None:
        raise ValueError("the shared expert comes as weights (shared_w13, shared_w2) or as its output, not both")
    x32 = x.float()
    y = torch.zeros_like(x32)
    if shared_out is not None:
        y += torch.sigmoid(shared_gate.float()) * shared_out.float()

    def ffn(rows: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        gate_up = rows @ w13.to(x.dtype).float().T
        half = w13.shape[0] // 2
        return (F.silu(gate_up[:, :half]) * gate_up[:, half:]) @ w2.to(x.dtype).float().T

    if shared is not None:
        y += torch.sigmoid(shared_gate.float()) * ffn(x32, *shared)
    for e in torch.unique(topk_ids).tolist():
        if e < 0:
            continue
        tokens, picks = (topk_ids == e).nonzero(as_tuple=True)
        y.index_add_(0, tokens, ffn(x32[tokens], *expert(e)) * topk_weights[tokens, picks].float().unsqueeze(-1))
    return y.to(x.dtype)


def int4_fused_moe(*, x: torch.Tensor, w13_qweight: torch.Tensor, w13_scales: torch.Tensor,
                   w13_zeros: torch.Tensor, w2_qweight: torch.Tensor, w2_scales: torch.Tensor,
                   w2_zeros: torch.Tensor, group_size: int, topk_weights: torch.Tensor,
                   topk_ids: torch.Tensor, shared_w13: tuple[torch.Tensor, ...] | torch.Tensor | None = None,
                   shared_w2: tuple[torch.Tensor, ...] | torch.Tensor | None = None,
                   shared_gate: torch.Tensor | None = None, w13_perm: torch.Tensor | None = None,
                   shared_out: torch.Tensor | None = None) -> torch.Tensor:
    """The routed experts with int4 weights: w13 [E, 2I, D] (gate rows then up rows), w2 [E, D, I], in the int4
    layout above. x: [T, D]; topk_*: [T, top_k] -> [T, D] in x.dtype. shared_w13 / shared_w2: the shared expert's
    (qweight, scales, zeros) [2I, ...] / [D, ...] in the same format and group size, or its dense (bf16 / fp16)
    weights [2I, D] / [D, I] as two tensors, added as one more expert per token weighted by sigmoid(shared_gate
    [T, 1]); or shared_out: its output [T, D] where it runs in another format, added so weighted. w13_perm:
    act-order experts' column orders (layout above)."""
    d, inter = x.shape[-1], w13_qweight.shape[1] // 2

    def dequant(w: tuple[torch.Tensor, ...], k: int) -> torch.Tensor:
        return dequant_int4(qweight=w[0], scales=w[1], zeros=w[2], group_size=group_size, k=k)

    def expert(e: int):
        w13 = dequant((w13_qweight[e], w13_scales[e], w13_zeros[e]), d)
        if w13_perm is not None:  # back in input-column order: stored column j multiplies x[perm[e, j]]
            w13 = torch.empty_like(w13).index_copy_(1, w13_perm[e].long(), w13)
        return w13, dequant((w2_qweight[e], w2_scales[e], w2_zeros[e]), inter)
    shared = _shared(shared_w13, shared_w2, dequant, d, inter)
    return _moe(x, topk_weights, topk_ids, expert, shared, shared_gate, shared_out)


def fp8_fused_moe(*, x: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor,
                  w2_scale: torch.Tensor, block_k: int, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, shared_w13: tuple[torch.Tensor, ...] | torch.Tensor | None = None,
                  shared_w2: tuple[torch.Tensor, ...] | torch.Tensor | None = None,
                  shared_gate: torch.Tensor | None = None, shared_out: torch.Tensor | None = None) -> torch.Tensor:
    """The routed experts with fp8 weights (layout above): w13 [E, 2I, D], w2 [E, D, I]; shared_w13 / shared_w2:
    the shared expert's (weight, scale) with the same block_k or its dense weights, or shared_out, as in
    int4_fused_moe."""
    def dequant(w: tuple[torch.Tensor, ...], k: int | None = None) -> torch.Tensor:  # k: unused (the scales tell)
        return dequant_fp8(weight=w[0], scale=w[1], block_k=block_k)

    def expert(e: int):
        return dequant((w13[e], w13_scale[e])), dequant((w2[e], w2_scale[e]))
    shared = _shared(shared_w13, shared_w2, dequant, x.shape[-1], w2.shape[2])
    return _moe(x, topk_weights, topk_ids, expert, shared, shared_gate, shared_out)
