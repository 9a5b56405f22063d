"""Token sampling: logits [N, V] + per-row sampling state -> one token per row, with logprobs.

Processing order (each step only touches the rows that need it):
  1. logit_bias                      (added to the raw logits), then allowed_token_ids (every other id -> -inf)
     and bad words                   (a bad word's last token -> -inf once the output ends with the rest of it)
  2. min_tokens                      (stop ids -> -inf while len(output) < min_tokens)
  3. repetition penalty              (HF/vLLM: over prompt + output tokens, positive / p, negative * p)
  4. frequency / presence penalties  (OpenAI: over output tokens, logit -= f * count + p * (count > 0))
  5. grammar mask                    (structured outputs: tokens the row's grammar forbids -> -inf)
  -- greedy rows (temperature 0) take the argmax here --
  6. temperature
  7. min-p (p >= min_p * p_max), then top-k (ties with the k-th logit are kept), top-p (smallest set with mass >= p
     of what min-p and top-k left), in vLLM's order
  8. sample with the exponential race: argmax(probs / q), q ~ Exp(1)

Returned logprobs are those of the model's raw distribution (log_softmax of the unprocessed logits), as vLLM
reports by default, so that a client sees the model's confidence, not the sampler's.

Seeded rows draw their noise from a generator seeded with a hash of (request seed, number of tokens sampled so
far), so a row's draw depends only on its own seed and position: not on the batch around it, not on how many
times the sampler ran before (preemption, recompute or rejected speculative tokens cannot shift the stream).
For n > 1, give each child a distinct seed (vLLM's convention is seed + index). The stream is reproducible per
device type (a CPU run and a CUDA run of the same seed draw different noise).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from deltaserve.kernels.token_mask import apply_token_bitmask_
from deltaserve.sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1
_GOLDEN64 = 0x9E3779B97F4A7C15


@dataclass(frozen=True, eq=False)
class SamplingRow:
    """What the sampler needs to know about one row (one sequence) of the batch.

    prompt_token_ids / output_token_ids: the sequence so far (lists or 1-D int tensors); they feed the penalties
    (and may be left empty for a row without penalties). len(output_token_ids) + num_unlisted is the row's position
    for min_tokens and for seeded sampling.
    eos_token_ids: the model's end-of-sequence ids. While num_output_tokens < params.min_tokens the sampler suppresses
    eos_token_ids (unless params.ignore_eos, where eos does not stop the request anyway) and params.stop_token_ids.
    """

    params: SamplingParams
    prompt_token_ids: Sequence[int] | torch.Tensor = ()
    output_token_ids: Sequence[int] | torch.Tensor = ()
    eos_token_ids: frozenset[int] = frozenset()
    # outputs that count for the position but are not in output_token_ids: sampled by a step still in flight (no
    # penalty reads them yet), or not sent because no penalty reads the history
    num_unlisted: int = 0

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids) + self.num_unlisted

    def suppressed_ids(self) -> list[int]:
        """Token ids that must not be sampled now, because they would end the request before min_tokens."""
        if self.num_output_tokens >= self.params.min_tokens:
            return []
        ids = set(self.params.stop_token_ids)
        if not self.params.ignore_eos:
            ids |= self.eos_token_ids
        return sorted(ids)


class SamplerOutput(NamedTuple):
    """token_ids: [N] int64; logprobs: [N] fp32 (sampled token, raw distribution; NaN when no row of the batch
    asks for logprobs, which spares a pass over the logits); top_ids / top_logprobs: [N, k] int64 / fp32, best
    first, with k the largest `logprobs` requested in the batch (rows asking for fewer use their first columns;
    k may be 0)."""

    token_ids: torch.Tensor
    logprobs: torch.Tensor
    top_ids: torch.Tensor
    top_logprobs: torch.Tensor


class GrammarBitmask(NamedTuple):
    """Allowed tokens of some rows, on the logits' device: rows [R] int64 (row indices into the batch), bitmask
    [R, W] int32 with bit b of word w for token 32 * w + b (W * 32 >= V; ids past W * 32 are forbidden)."""

    rows: torch.Tensor
    bitmask: torch.Tensor


def _splitmix64(x: int) -> int:
    x = (x + _GOLDEN64) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def step_seed(seed: int, step: int) -> int:
    """The generator seed for a seeded row's `step`-th sampled token; mixing decorrelates neighbouring steps."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ step) >> 1  # manual_seed wants a value that fits int64


def _upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without waiting for the stream: on CUDA it goes through pinned memory (a copy
    from pageable memory may first wait for the stream to drain, stalling an engine that overlaps steps)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _to_device(values: Sequence[int] | Sequence[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return _upload(torch.tensor(values, dtype=dtype), device)


def _row_tensor(values: Sequence[float], device: torch.device) -> torch.Tensor:
    return _to_device(values, torch.float32, device).unsqueeze(1)


# ---- logits processors: in place on fp32 logits [N, V], in the order the module docstring gives -----------------

def apply_logit_bias(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    vocab = logits.shape[1]
    r_idx: list[int] = []
    c_idx: list[int] = []
    vals: list[float] = []
    for i, row in enumerate(rows):
        for token_id, bias in (row.params.logit_bias or {}).items():
            if token_id < vocab:  # ids past the (padded) vocab cannot be sampled; a bias on them is moot
                r_idx.append(i)
                c_idx.append(token_id)
                vals.append(float(bias))
    if r_idx:
        dev = logits.device
        index = (_to_device(r_idx, torch.long, dev), _to_device(c_idx, torch.long, dev))
        logits.index_put_(index, _to_device(vals, logits.dtype, dev), accumulate=True)


def apply_allowed_tokens(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Rows with allowed_token_ids keep those logits; every other id of theirs becomes -inf."""
    sel = [i for i, row in enumerate(rows) if row.params.allowed_token_ids is not None]
    if not sel:
        return
    dev = logits.device
    r_idx = [j for j, i in enumerate(sel) for _ in rows[i].params.allowed_token_ids]
    c_idx = [t for i in sel for t in rows[i].params.allowed_token_ids]
    keep = torch.full((len(sel), logits.shape[1]), float("-inf"), dtype=logits.dtype, device=dev)
    keep[_to_device(r_idx, torch.long, dev), _to_device(c_idx, torch.long, dev)] = 0.0
    idx = _to_device(sel, torch.long, dev)
    logits[idx] = logits[idx] + keep


def apply_bad_words(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """vLLM's bad words: a sequence's last token is banned where the output ends with the tokens before it (a
    one-token word always)."""
    r_idx: list[int] = []
    c_idx: list[int] = []
    for i, row in enumerate(rows):
        seqs = row.params.bad_words_token_ids
        if not seqs:
            continue
        longest = max(len(q) for q in seqs) - 1
        tail = _as_list(row.output_token_ids[-longest:]) if longest else []
        for q in seqs:
            if len(q) == 1 or tail[len(tail) - len(q) + 1:] == q[:-1]:
                r_idx.append(i)
                c_idx.append(q[-1])
    if r_idx:
        dev = logits.device
        logits[_to_device(r_idx, torch.long, dev), _to_device(c_idx, torch.long, dev)] = float("-inf")


def _as_list(ids: Sequence[int] | torch.Tensor) -> list[int]:
    return ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)


def apply_min_tokens(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    vocab = logits.shape[1]
    r_idx: list[int] = []
    c_idx: list[int] = []
    for i, row in enumerate(rows):
        ids = [t for t in row.suppressed_ids() if t < vocab]
        r_idx += [i] * len(ids)
        c_idx += ids
    if r_idx:
        dev = logits.device
        index = (_to_device(r_idx, torch.long, dev), _to_device(c_idx, torch.long, dev))
        # A filled tensor, not a Python scalar: assigning a scalar through tensor indices syncs on GPU.
        logits.index_put_(index, torch.full((len(r_idx),), float("-inf"), device=dev))


def _flat_ids(rows: Sequence[SamplingRow], device: torch.device,
              include_prompt: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index, token id) pairs over every row's output (and prompt), as two flat int64 tensors on device.

    Lists go to the device in one copy; tensors already on the device stay there (an engine that keeps a long
    prompt as a device tensor skips the per-step list conversion).
    """
    host_ids: list[np.ndarray] = []
    host_rows: list[int] = []
    dev_ids: list[torch.Tensor] = []
    dev_rows: list[torch.Tensor] = []
    for i, row in enumerate(rows):
        for ids in (row.output_token_ids, row.prompt_token_ids) if include_prompt else (row.output_token_ids,):
            if isinstance(ids, torch.Tensor) and ids.device == device:
                dev_ids.append(ids.reshape(-1).long())
                dev_rows.append(torch.full_like(dev_ids[-1], i))
            else:
                # numpy converts a list of ints about twice as fast as torch.tensor does.
                host_ids.append(np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids, np.int64).ravel())
                host_rows.append(i)
    if host_ids:
        lengths = [len(a) for a in host_ids]
        flat = _upload(torch.from_numpy(np.concatenate(host_ids)), device)
        row_idx = _upload(torch.from_numpy(np.repeat(np.asarray(host_rows, np.int64), lengths)), device)
        dev_ids, dev_rows = [flat, *dev_ids], [row_idx, *dev_rows]
    if not dev_ids:
        return torch.zeros(0, dtype=torch.long, device=device), torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat(dev_rows), torch.cat(dev_ids)


def _token_counts(rows: Sequence[SamplingRow], vocab: int, device: torch.device,
                  include_prompt: bool) -> torch.Tensor:
    """[R, V] fp32 count of each token in each row's output (and prompt if include_prompt), in one scatter."""
    row_idx, ids = _flat_ids(rows, device, include_prompt)
    # Ids past the (padded) vocab cannot be penalised; weight them 0 rather than filter (a filter syncs on GPU).
    counts = torch.zeros(len(rows), vocab, dtype=torch.float32, device=device)
    counts.index_put_((row_idx, ids.clamp(max=vocab - 1)), (ids < vocab).float(), accumulate=True)
    return counts


def apply_repetition_penalty(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    sel = [i for i, row in enumerate(rows) if row.params.repetition_penalty != 1.0]
    if not sel:
        return
    dev = logits.device
    seen = _token_counts([rows[i] for i in sel], logits.shape[1], dev, include_prompt=True) > 0
    penalty = _row_tensor([rows[i].params.repetition_penalty for i in sel], dev)
    idx = _to_device(sel, torch.long, dev)
    sub = logits[idx]
    penalised = torch.where(sub > 0, sub / penalty, sub * penalty)
    logits[idx] = torch.where(seen, penalised, sub)


def apply_frequency_presence_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    sel = [i for i, row in enumerate(rows)
           if row.params.frequency_penalty != 0.0 or row.params.presence_penalty != 0.0]
    if not sel:
        return
    dev = logits.device
    counts = _token_counts([rows[i] for i in sel], logits.shape[1], dev, include_prompt=False)
    freq = _row_tensor([rows[i].params.frequency_penalty for i in sel], dev)
    pres = _row_tensor([rows[i].params.presence_penalty for i in sel], dev)
    idx = _to_device(sel, torch.long, dev)
    logits[idx] = logits[idx] - freq * counts - pres * (counts > 0).float()


def _has_processors(row: SamplingRow) -> bool:
    p = row.params
    return bool(p.logit_bias) or p.allowed_token_ids is not None or bool(p.bad_words_token_ids) or \
        p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 or \
        bool(row.suppressed_ids())


def process_logits(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Steps 1-4 on an fp32 copy of `logits: [N, V]`; the input is never modified. When no row has anything to
    apply, returns `logits` itself, in its own dtype: callers must not write to it."""
    if not any(_has_processors(row) for row in rows):
        return logits  # a plain batch skips a pass over [N, V]; argmax reads any float dtype exactly
    out = logits.to(torch.float32, copy=True)
    apply_logit_bias(out, rows)
    apply_allowed_tokens(out, rows)
    apply_bad_words(out, rows)
    apply_min_tokens(out, rows)
    apply_repetition_penalty(out, rows)
    apply_frequency_presence_penalties(out, rows)
    return out


def apply_grammar(logits: torch.Tensor, grammar: GrammarBitmask, *, copy: bool) -> torch.Tensor:
    """Step 5: -inf where a constrained row's grammar forbids the token; other rows untouched. With copy, `logits`
    is left as it was (process_logits may hand back the model's own logits). Device ops only: no host sync."""
    out = logits.to(torch.float32, copy=True) if copy or logits.dtype != torch.float32 else logits
    apply_token_bitmask_(logits=out, rows=grammar.rows, bitmask=grammar.bitmask)
    return out


# ---- warpers: fp32 logits [R, V] of random rows, per-row parameters [R] --------------------------------------------

def filter_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor) -> torch.Tensor:
    """Steps 6-7: temperature, then min-p, top-k and top-p as -inf masks; returns new logits [R, V], shifted so
    each row's max is 0 (same softmax).

    temperature: [R] > 0; top_k: [R] int64 (<= 0 or >= V: off); top_p: [R] in (0, 1]; min_p: [R] in [0, 1].
    Pass the parameters on the CPU: which filters run is decided there, so a GPU batch needs no host sync.
    """
    vocab, dev = logits.shape[1], logits.device
    k = torch.where((top_k <= 0) | (top_k > vocab), torch.full_like(top_k, vocab), top_k)
    use_top_k_top_p = bool((k < vocab).any()) or bool((top_p < 1.0).any())
    use_min_p = bool((min_p > 0).any())
    # Subtracting the row max first keeps a tiny temperature from overflowing to inf (and softmax to NaN).
    out = (logits - logits.max(dim=1, keepdim=True).values) / _upload(temperature, dev).unsqueeze(1)
    if use_min_p:
        # Before top-k/top-p, as vLLM does: top-p then measures mass over the renormalised survivors, so the
        # order changes which tokens top-p keeps. p_i < min_p * p_max <=> logit_i < logit_max + log(min_p).
        threshold = out.max(dim=1, keepdim=True).values + _upload(torch.log(min_p), dev).unsqueeze(1)
        out = out.masked_fill(out < threshold, float("-inf"))
    if use_top_k_top_p:
        out = _top_k_top_p(out, _upload(k, dev), _upload(top_p, dev))
    return out


def _top_k_top_p(logits: torch.Tensor, k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_logits, sorted_idx = logits.sort(dim=1, descending=True)
    # Keep every logit tied with the k-th (as HF and vLLM do), so the result does not depend on sort order.
    kth = sorted_logits.gather(1, (k - 1).unsqueeze(1))
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    probs = sorted_logits.softmax(dim=1)
    mass_before = probs.cumsum(dim=1) - probs
    # Drop a token once the strictly better tokens already hold p; rows with top_p == 1 skip this, since
    # rounding in the cumsum could otherwise cut tail tokens the user never asked to cut.
    drop = (mass_before >= top_p.unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, sorted_idx, sorted_logits)


class Sampler:
    """Picks one token per row. Stateless apart from the generator used for unseeded rows.

    generator: the RNG for unseeded rows (None: torch's default generator of the logits' device). It must live
    on the logits' device.
    """

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow],
                 grammar: GrammarBitmask | None = None) -> SamplerOutput:
        """logits: [N, V] any float dtype, one row per entry of `rows`; grammar: the rows whose tokens a grammar
        restricts (structured outputs)."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be [N, V] with N = len(rows) = {len(rows)}, got {tuple(logits.shape)}")
        processed = process_logits(logits, rows)
        if grammar is not None and grammar.rows.numel():
            processed = apply_grammar(processed, grammar, copy=processed is logits)
        token_ids = processed.argmax(dim=1)
        random_rows = [i for i, row in enumerate(rows) if not row.params.greedy]
        if random_rows:
            idx = _to_device(random_rows, torch.long, logits.device)
            token_ids[idx] = self._sample(processed[idx].float(), [rows[i] for i in random_rows])
        return self._logprobs(logits, rows, token_ids)

    def _sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        filtered = filter_logits(
            logits,
            temperature=torch.tensor([r.params.temperature for r in rows], dtype=torch.float32),
            top_k=torch.tensor([r.params.top_k for r in rows], dtype=torch.long),
            top_p=torch.tensor([r.params.top_p for r in rows], dtype=torch.float32),
            min_p=torch.tensor([r.params.min_p for r in rows], dtype=torch.float32),
        )
        probs = filtered.softmax(dim=1)
        return (probs / self._exponential_noise(rows, logits.shape[1], logits.device)).argmax(dim=1)

    def _exponential_noise(self, rows: Sequence[SamplingRow], vocab: int, device: torch.device) -> torch.Tensor:
        """[R, V] Exp(1) noise: seeded rows from their own (seed, step) generator, the rest from one shared draw."""
        noise = torch.empty(len(rows), vocab, dtype=torch.float32, device=device)
        unseeded = [i for i, r in enumerate(rows) if r.params.seed is None]
        if unseeded:
            shared = torch.empty(len(unseeded), vocab, dtype=torch.float32, device=device)
            noise[_to_device(unseeded, torch.long, device)] = shared.exponential_(generator=self.generator)
        for i, row in enumerate(rows):
            if row.params.seed is not None:
                gen = torch.Generator(device=device)
                gen.manual_seed(step_seed(row.params.seed, row.num_output_tokens))
                noise[i].exponential_(generator=gen)
        # A zero draw would turn probs / q into inf (or 0 / 0 = NaN, which argmax prefers) for a masked token.
        return noise.clamp_min_(torch.finfo(torch.float32).tiny)

    @staticmethod
    def _logprobs(logits: torch.Tensor, rows: Sequence[SamplingRow], token_ids: torch.Tensor) -> SamplerOutput:
        if all(row.params.logprobs is None for row in rows):
            none = torch.full(token_ids.shape, float("nan"), device=logits.device)
            empty = torch.empty(len(rows), 0, device=logits.device)
            return SamplerOutput(token_ids, none, empty.long(), empty)
        # logsumexp + gather instead of a full [N, V] log_softmax: only N + N*k values are ever read.
        raw = logits.float()
        lse = raw.logsumexp(dim=1, keepdim=True)
        sampled = (raw.gather(1, token_ids.unsqueeze(1)) - lse).squeeze(1)
        k = max((row.params.logprobs or 0 for row in rows), default=0)
        k = min(k, raw.shape[1])
        top_vals, top_ids = raw.topk(k, dim=1, largest=True, sorted=True)
        return SamplerOutput(token_ids, sampled, top_ids, top_vals - lse)

