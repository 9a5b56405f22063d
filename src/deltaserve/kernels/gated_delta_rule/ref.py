"""Reference gated delta rule (Gated DeltaNet core) over a pool of recurrent states [S, HV, K, V], stored in fp32 or
bf16 (the state_dtype option) and always computed in fp32: read, widened, updated, rounded once on the write back.

Per value head, per token (docs/MODEL.md, "Gated DeltaNet"):
    S = exp(g_t) * S;  delta = beta_t * (v_t - S^T k_t);  S = S + outer(k_t, delta);  o_t = S^T (scale * q_t)
Value head h reads key head h // (HV // H) (repeat_interleave, not tiling).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deltaserve.kernels._varlen import numbered_live_sequences

_L2_EPS = 1e-6


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    # eps inside the rsqrt, as FLA and transformers do
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + _L2_EPS)


def l2norm_qk(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k: [T, H, K] (any strides) -> L2-normalised contiguous copies, computed in fp32 and rounded to their dtype
    (the q/k preparation the GPU prefill path feeds to fla-core's chunk forward)."""
    return _l2norm(q.float()).to(q.dtype).contiguous(), _l2norm(k.float()).to(k.dtype).contiguous()


def _prep_qk(
    q: torch.Tensor, k: torch.Tensor, num_v_heads: int, scale: float, use_qk_l2norm: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k: [..., H, K] -> fp32 [..., HV, K], normalised, q scaled after the norm, key heads repeated per group."""
    q, k = q.float(), k.float()
    if use_qk_l2norm:
        q, k = _l2norm(q), _l2norm(k)
    group = num_v_heads // q.shape[-2]
    return (q * scale).repeat_interleave(group, dim=-2), k.repeat_interleave(group, dim=-2)


def _to_chunks(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """[L, HV, ...] -> [HV, n, C, ...], zero-padded at the end to a whole number of chunks.

    Zero padding is inert: beta = 0 and k = 0 write nothing, g = 0 decays nothing, padded outputs are dropped."""
    length = x.shape[0]
    num_chunks = -(-length // chunk_size)
    pad = num_chunks * chunk_size - length
    x = F.pad(x, [0, 0] * (x.dim() - 1) + [0, pad])
    return x.reshape(num_chunks, chunk_size, *x.shape[1:]).movedim(2, 0)


def _chunk_sequence(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    state: torch.Tensor, chunk_size: int, chunk_states: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence in the chunked WY/UT form. q, k: [L, HV, K], v: [L, HV, V], g, beta: [L, HV], all fp32 with
    q, k already normalised/scaled/expanded; state: [HV, K, V] fp32. Returns o: [L, HV, V] and the final state;
    chunk_states ([ceil(L / chunk_size), HV, K, V]), when given, receives the state at the start of each chunk."""
    length = q.shape[0]
    q, k, v, g, beta = (_to_chunks(t, chunk_size) for t in (q, k, v, g, beta))  # [HV, n, C, ...]
    cum = g.cumsum(-1)  # log of the decay from the chunk start through token i
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    # decay[i, j] = exp(cum_i - cum_j) for j <= i; masking before exp keeps every exponent <= 0 (no overflow)
    decay = (cum.unsqueeze(-1) - cum.unsqueeze(-2)).masked_fill(~causal, float("-inf")).exp()
    k_beta = k * beta.unsqueeze(-1)
    # Token i's write u_i depends on the earlier writes of its chunk: (I + A) u = beta*v - beta*exp(cum)*k S0,
    # A[i, j] = beta_i (k_i . k_j) exp(cum_i - cum_j) for j < i. Solve for both right-hand sides at once.
    eye = torch.eye(chunk_size, device=q.device)
    system = (k_beta @ k.transpose(-1, -2) * decay).tril(-1) + eye
    u_in = torch.linalg.solve_triangular(system, v * beta.unsqueeze(-1), upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(system, k_beta * cum.exp().unsqueeze(-1), upper=False, unitriangular=True)
    attn = q @ k.transpose(-1, -2) * decay  # intra-chunk read-out, diagonal included (o reads the updated state)
    q_decayed = q * cum.exp().unsqueeze(-1)
    # decay from token j to the chunk end, in log space so fully decayed tokens give 0 instead of 0/0
    k_to_end = k * (cum[..., -1:] - cum).exp().unsqueeze(-1)
    chunk_decay = cum[..., -1].exp()[..., None, None]  # [HV, n, 1, 1]
    o = torch.empty_like(v)
    for c in range(q.shape[1]):
        if chunk_states is not None:
            chunk_states[c] = state.to(chunk_states.dtype)
        u = u_in[:, c] - w[:, c] @ state  # [HV, C, V] this chunk's writes given the state at its start
        o[:, c] = q_decayed[:, c] @ state + attn[:, c] @ u
        state = state * chunk_decay[:, c] + k_to_end[:, c].transpose(-1, -2) @ u
    return o.movedim(0, 2).flatten(0, 1)[:length], state


def chunk_gated_delta_rule(
    *,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    cu_seqlens: torch.Tensor,
    slots: torch.Tensor,
    has_initial_state: torch.Tensor,
    scale: float,
    use_qk_l2norm: bool = True,
    chunk_size: int = 64,
    chunk_indices: torch.Tensor | None = None,
    any_padding: bool = True,
    chunk_states: torch.Tensor | None = None,
) -> torch.Tensor:
    """Prefill over N sequences packed flat; reads and writes their recurrent states in place.

    q, k: [T, H, K]; v: [T, HV, V] (HV % H == 0); g: [T, HV] fp32 log-decay (<= 0); beta: [T, HV];
    state: [S, HV, K, V] fp32 or bf16; cu_seqlens: [N+1] int32 or int64; slots: [N] int64 (< 0: skip, rows stay zero);
    has_initial_state: [N] bool (False: start from zeros, the slot's content is ignored); scale: applied to q
    after the optional L2 norm. Returns o: [T, HV, V] in v.dtype; state[slot] holds the final state.

    chunk_states ([C, HV, K, V], C = sum over sequences of ceil(len / chunk_size)): when given, receives the state
    at the start of every chunk of every sequence, in order (the first of a sequence is its initial state, the one
    at relative position j * chunk_size is the state after its first j * chunk_size tokens: prefix-cache
    checkpoints). Entries of skipped (slot < 0) sequences are left as they are.
    chunk_indices ([C, 2] int64 (sequence, chunk) pairs, built on the host) and any_padding (False: no slot is < 0)
    are hints that let the GPU path skip a host sync and a masking pass; the result does not depend on them.
    """
    num_v_heads, k_dim, v_dim = v.shape[1], k.shape[2], v.shape[2]
    q32, k32 = _prep_qk(q, k, num_v_heads, scale, use_qk_l2norm)
    v32, g32, beta32 = v.float(), g.float(), beta.float()
    o = torch.zeros_like(v)
    chunk_start = _chunk_offsets(cu_seqlens, chunk_size)
    for n, (lo, hi, slot, init) in numbered_live_sequences(cu_seqlens, slots, has_initial_state):
        if init:
            s0 = state[slot].float()
        else:
            s0 = torch.zeros(num_v_heads, k_dim, v_dim, dtype=torch.float32, device=v.device)
        seq_states = None if chunk_states is None else chunk_states[chunk_start[n]:chunk_start[n + 1]]
        o_seq, s_final = _chunk_sequence(
            q32[lo:hi], k32[lo:hi], v32[lo:hi], g32[lo:hi], beta32[lo:hi], s0, chunk_size, seq_states
        )
        o[lo:hi] = o_seq.to(v.dtype)
        state[slot] = s_final.to(state.dtype)
    return o


def _chunk_offsets(cu_seqlens: torch.Tensor, chunk_size: int) -> list[int]:
    """Index of each sequence's first chunk in the flat list of chunks (and the total at the end)."""
    bounds = cu_seqlens.tolist()
    offsets = [0]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        offsets.append(offsets[-1] + -(-(hi - lo) // chunk_size))
    return offsets


def fused_recurrent_gated_delta_rule(
    *,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    slots: torch.Tensor,
    scale: float,
    use_qk_l2norm: bool = True,
) -> torch.Tensor:
    """Decode: one token per sequence, one recurrence step, state updated in place.

    q, k: [N, H, K]; v: [N, HV, V]; g, beta: [N, HV]; state: [S, HV, K, V] fp32 or bf16; slots: [N] int64 (< 0: skip,
    row stays zero). Returns o: [N, HV, V] in v.dtype.
    """
    o = torch.zeros_like(v)
    valid = (slots >= 0).nonzero().squeeze(1)
    if valid.numel() == 0:
        return o
    idx = slots[valid]
    q32, k32 = _prep_qk(q[valid], k[valid], v.shape[1], scale, use_qk_l2norm)  # [n, HV, K]
    s = state[idx].float() * g[valid].float().exp()[..., None, None]  # decay first
    predicted = (k32.unsqueeze(-2) @ s).squeeze(-2)  # S^T k on the decayed state: [n, HV, V]
    delta = beta[valid].float().unsqueeze(-1) * (v[valid].float() - predicted)
    s = s + k32.unsqueeze(-1) * delta.unsqueeze(-2)
    o[valid] = (q32.unsqueeze(-2) @ s).squeeze(-2).to(v.dtype)  # read-out from the updated state
    state[idx] = s.to(state.dtype)
    return o


def gdn_gating(
    *, a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor,
    beta_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """a, b: [T, HV]; A_log, dt_bias: [HV]. Returns (g fp32, beta in beta_dtype), both [T, HV]; g <= 0 is the
    log-decay; beta is computed in fp32 and rounded once to beta_dtype."""
    g = -A_log.float().exp() * F.softplus(a.float() + dt_bias.float())
    return g, b.float().sigmoid().to(beta_dtype)


def fused_gdn_decode(
    *,
    mixed_qkv: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_state: torch.Tensor,
    ssm_state: torch.Tensor,
    slots: torch.Tensor,
    num_k_heads: int,
    head_k_dim: int,
    num_v_heads: int,
    head_v_dim: int,
    scale: float,
) -> torch.Tensor:
    """One decode step of a GDN layer's core for N single-token rows: conv update + SiLU, gating, q/k L2 norm and
    scale, one recurrence step; conv and recurrent states updated in place through the slots.

    mixed_qkv: [N, conv_dim] pre-conv in_proj_qkv output, conv_dim = 2*H*K + HV*V (q | k | v); a, b: [N, HV];
    A_log, dt_bias: [HV]; conv_weight: [conv_dim, W]; conv_state: [S, W-1, conv_dim] (model dtype);
    ssm_state: [S, HV, K, V] fp32 or bf16; slots: [N] int64 (< 0: skip, row stays zero, no state touched).
    Returns o: [N, HV, V] in mixed_qkv.dtype. Composed from the other references, rounding where the unfused layer
    rounds: the conv output and beta to the activation dtype.
    """
    # the sibling op's reference, imported here so that neither op package imports the other at load time
    from deltaserve.kernels.conv1d.ref import causal_conv1d_update

    y = causal_conv1d_update(x=mixed_qkv, weight=conv_weight, conv_state=conv_state, slots=slots)
    g, beta = gdn_gating(a=a, b=b, A_log=A_log, dt_bias=dt_bias)
    return _recurrent_from_rows(y, g, beta.to(mixed_qkv.dtype), ssm_state, slots, num_k_heads, head_k_dim,
                                num_v_heads, head_v_dim, scale)


def fused_gdn_multistep(
    *,
    mixed_qkv: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_state: torch.Tensor,
    ssm_state: torch.Tensor,
    slots: torch.Tensor,
    tokens_per_row: int,
    num_k_heads: int,
    head_k_dim: int,
    num_v_heads: int,
    head_v_dim: int,
    scale: float,
    conv_states_out: torch.Tensor,
    y_out: torch.Tensor,
    gates_out: torch.Tensor,
) -> torch.Tensor:
    """k = tokens_per_row decode steps of a GDN layer's core for each of N rows, leaving the pools as they were (the
    verify step of speculative decoding: how many positions to keep is known only after sampling). What the commit
    needs is kept per position: the conv window after it (small), and instead of the recurrent state the inputs of
    its recurrence step, from which replay_kept_states recomputes the kept state.

    mixed_qkv: [N*k, conv_dim] and a, b: [N*k, HV], row n's tokens at [n*k, (n+1)*k); conv_state, ssm_state: the
    pools as in fused_gdn_decode, read and left unchanged; slots: [N] int64 (< 0: padding row, output zero, nothing
    written); conv_states_out: [N, k, W-1, conv_dim] receives the conv window after each position, y_out:
    [N, k, conv_dim] (mixed_qkv's dtype) each position's post-conv activations (q | k | v), gates_out: [N, k, 2, HV]
    fp32 its log-decay g and its beta (rounded to the activation dtype, as the step used it). Returns o:
    [N*k, HV, V] in mixed_qkv.dtype, equal to k successive fused_gdn_decode calls.
    """
    from deltaserve.kernels.conv1d.ref import causal_conv1d_update

    n, k = slots.shape[0], tokens_per_row
    valid = slots >= 0
    rows = torch.where(valid, torch.arange(n, device=slots.device), torch.full_like(slots, -1))
    # Work on copies of the rows' states (row i in scratch slot i): the pools stay as they were.
    conv = conv_state[slots.clamp(min=0)].clone()
    ssm = ssm_state[slots.clamp(min=0)].clone()
    o = mixed_qkv.new_zeros(n, k, num_v_heads, head_v_dim)
    step = (lambda t: t.view(n, k, *t.shape[1:]))
    for j in range(k):  # fused_gdn_decode's body, keeping its intermediates
        y = causal_conv1d_update(x=step(mixed_qkv)[:, j], weight=conv_weight, conv_state=conv, slots=rows)
        g, beta = gdn_gating(a=step(a)[:, j], b=step(b)[:, j], A_log=A_log, dt_bias=dt_bias)
        beta = beta.to(mixed_qkv.dtype)
        o[:, j] = _recurrent_from_rows(y, g, beta, ssm, rows, num_k_heads, head_k_dim, num_v_heads, head_v_dim,
                                       scale)
        conv_states_out[valid, j] = conv[valid].to(conv_states_out.dtype)
        y_out[valid, j] = y[valid].to(y_out.dtype)
        gates_out[valid, j] = torch.stack([g, beta.float()], dim=1)[valid]
    return o.view(n * k, num_v_heads, head_v_dim)


def _recurrent_from_rows(y: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, state: torch.Tensor,
                         slots: torch.Tensor, num_k_heads: int, head_k_dim: int, num_v_heads: int, head_v_dim: int,
                         scale: float) -> torch.Tensor:
    """One recurrence step of post-conv rows y [N, conv_dim] (q | k | v) on state[slots] (< 0: skipped)."""
    n, key_dim = y.shape[0], num_k_heads * head_k_dim
    q, k, v = y.split([key_dim, key_dim, num_v_heads * head_v_dim], dim=-1)
    return fused_recurrent_gated_delta_rule(
        q=q.reshape(n, num_k_heads, head_k_dim), k=k.reshape(n, num_k_heads, head_k_dim),
        v=v.reshape(n, num_v_heads, head_v_dim), g=g, beta=beta, state=state, slots=slots, scale=scale,
        use_qk_l2norm=True)


def commit_gdn_states(
    *, conv_state: torch.Tensor, ssm_state: torch.Tensor, slots: torch.Tensor, conv_states_out: torch.Tensor,
    y_out: torch.Tensor, gates_out: torch.Tensor, num_accepted: torch.Tensor, num_k_heads: int, head_k_dim: int,
    num_v_heads: int, head_v_dim: int,
) -> None:
    """Install in each row's slot the states after its num_accepted-th position of a fused_gdn_multistep call (one
    layer; the cache commits all layers at once with install_kept_states and replay_kept_states).

    slots: [N] int64 (< 0: skipped); num_accepted: [N] int64 in [0, k] (0: the slot keeps its state); the buffers as
    fused_gdn_multistep filled them."""
    keep = (slots >= 0) & (num_accepted > 0)
    rows = keep.nonzero().squeeze(1)
    if rows.numel() == 0:
        return
    slots, num_kept = slots[rows], num_accepted[rows]
    # one layer: a stack of one (views, so the pools themselves are written)
    install_kept_states(states=conv_state.unsqueeze(0), kept_states=conv_states_out.unsqueeze(0), slots=slots,
                        rows=rows, num_kept=num_kept)
    replay_kept_states(states=ssm_state.unsqueeze(0), ys=y_out.unsqueeze(0), gates=gates_out.unsqueeze(0),
                       slots=slots, rows=rows, num_kept=num_kept, num_k_heads=num_k_heads, head_k_dim=head_k_dim,
                       num_v_heads=num_v_heads, head_v_dim=head_v_dim)


def install_kept_states(*, states: torch.Tensor, kept_states: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor,
                        num_kept: torch.Tensor) -> None:
    """states[:, slots[i]] = kept_states[:, rows[i], num_kept[i] - 1] for every i: the conv windows' commit, over a
    stack of L layers at once (the cache keeps every GDN layer's slots in one tensor and commits them in one op per
    kind).

    states: [L, S, ...]; kept_states: [L, R, k, ...] as fused_gdn_multistep filled them per layer; slots, rows,
    num_kept: [n] int64 on the states' device, every slot real and distinct, num_kept in [1, k]. No host sync, so the
    caller that already knows its rows are all real (ModelCache.commit_verified) pays none. (This gather + index
    copy moves the bytes twice; the GPU kernel, triton.install_kept_states, copies each state once.)"""
    states.index_copy_(1, slots, kept_states[:, rows, num_kept - 1].to(states.dtype))


def replay_kept_states(*, states: torch.Tensor, ys: torch.Tensor, gates: torch.Tensor, slots: torch.Tensor,
                       rows: torch.Tensor, num_kept: torch.Tensor, num_k_heads: int, head_k_dim: int,
                       num_v_heads: int, head_v_dim: int) -> None:
    """The recurrent states' commit, over a stack of L layers: each slot's state advanced by the first num_kept[i]
    positions of verify row rows[i], recomputed from what fused_gdn_multistep kept of them (the same steps on the
    same values as the verify step ran, rounded to the pool dtype between positions: the same state it computed
    there, without storing one per position).

    states: [L, S, HV, K, V]; ys: [L, R, k, conv_dim]; gates: [L, R, k, 2, HV] fp32 (g, beta); slots, rows,
    num_kept: [n] int64 on the states' device, every slot real and distinct, num_kept in [1, k]. No host sync."""
    n, k = slots.shape[0], ys.shape[2]
    scratch_rows = torch.arange(n, device=slots.device)
    for layer in range(states.shape[0]):
        state = states[layer][slots].clone()
        y, gate = ys[layer][rows], gates[layer][rows]
        for t in range(k):
            live = torch.where(num_kept > t, scratch_rows, torch.full_like(scratch_rows, -1))
            _recurrent_from_rows(y[:, t], gate[:, t, 0], gate[:, t, 1], state, live, num_k_heads, head_k_dim,
                                 num_v_heads, head_v_dim, 1.0)
        states[layer].index_copy_(0, slots, state)
