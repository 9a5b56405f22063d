"""Predicted step time from a step's composition, learned online from measured steps (pure host code, no torch).

The scheduler asks it how long a step would take before deciding how many prefill tokens to put next to the decode
rows (`max_step_ms`); the engine feeds it the measured time of every step it collects. The model is linear in five
features of the step:

    ms = c0                                  fixed cost of any step (weights read once, launches)
       + c1 * decode_tokens                  tokens of one-token (decode) and verify rows
       + c2 * prefill_tokens                 tokens of prefill chunks (the matmuls)
       + c3 * attention_pairs / 1e6          causal query-key pairs of the prefill chunks: a chunk of n tokens after
                                             c tokens of context attends to n * (c + n / 2) of them
       + c4 * decode_context / 1e3           context tokens the decode rows read (their KV)

A sum, not a max: where a large chunk makes the step compute-bound the weight read overlaps the matmuls, so the
model over-predicts there, which only makes the chunks smaller than they could be (the safe side).

Fit: least squares on relative errors (a sample of t ms weighs 1 / t^2, so a 15 ms decode step counts as much as a
300 ms prefill step), exponentially forgetting (older samples decay by `forgetting` per sample), regularised towards
the prior as `prior_weight` pseudo-samples per feature (feature j alone at its typical size `SCALES[j]`, weighted
as the average measured sample), so a direction the data does not determine (e.g. the fixed cost vs the per-row
cost when the batch size never changes) stays at the prior; every coefficient is kept >= 0 (the prediction then
grows with every feature, which the scheduler's search relies on). Until `min_samples` steps were measured the
prior alone predicts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

FEATURES = ("base", "decode_tokens", "prefill_tokens", "attention_mpairs", "decode_kcontext")
# Typical size of each feature in one step: the prior counts as `prior_weight` samples of this size.
SCALES = (1.0, 32.0, 1024.0, 16.0, 64.0)

# Prior rates: below what an H100 measures (3.0 TB/s copy, 712-759 TFLOP/s bf16 matmul, benchmarks/RESULTS.md), so
# that before any measurement the model over-predicts on the cards deltaserve targets (small chunks: the safe side).
PRIOR_BYTES_PER_MS = 2.5e9   # 2.5 TB/s
PRIOR_FLOPS_PER_MS = 4.0e11  # 400 TFLOP/s


@dataclass(frozen=True)
class StepShape:
    """A step's composition, as the cost model reads it."""

    decode_tokens: int = 0     # tokens of rows that continue a sequence one token (plus drafts) at a time
    prefill_tokens: int = 0    # tokens of prefill chunks
    attention_pairs: float = 0.0  # causal query-key pairs of the prefill chunks
    decode_context: int = 0    # context tokens read by the decode rows

    def with_decode(self, context: int, tokens: int = 1) -> StepShape:
        return StepShape(self.decode_tokens + tokens, self.prefill_tokens, self.attention_pairs,
                         self.decode_context + context)

    def with_chunk(self, tokens: int, context: int) -> StepShape:
        """Plus a prefill chunk of `tokens` tokens after `context` computed ones."""
        return StepShape(self.decode_tokens, self.prefill_tokens + tokens,
                         self.attention_pairs + chunk_pairs(tokens, context), self.decode_context)

    def features(self) -> tuple[float, ...]:
        return (1.0, float(self.decode_tokens), float(self.prefill_tokens), self.attention_pairs / 1e6,
                self.decode_context / 1e3)

    @classmethod
    def of(cls, rows: Iterable[tuple[int, int, int]]) -> StepShape:
        """From (new tokens, computed tokens before the step, drafts) per row: a row with one token besides its
        drafts after some context is a decode row, any other a prefill chunk."""
        shape = cls()
        for new, computed, drafts in rows:
            if new - drafts == 1 and computed > 0:
                shape = shape.with_decode(computed, new)
            else:
                shape = shape.with_chunk(new, computed)
        return shape


def chunk_pairs(tokens: int, context: int) -> float:
    """Causal query-key pairs of a chunk of `tokens` queries after `context` keys: sum over i < tokens of
    context + i + 1."""
    return tokens * context + tokens * (tokens + 1) / 2


def prior_coefficients(*, weight_bytes: float, active_params: float, attention_flops_per_pair: float,
                       kv_bytes_per_token: float) -> tuple[float, ...]:
    """A prior from the model's size (one rank's share under tensor parallelism): the fixed cost reads every weight
    once, a token (decode or prefill) costs 2 flops per active parameter, an attention pair its flops, a decode row
    its context's KV bytes; all at the PRIOR_* rates."""
    per_token = 2 * active_params / PRIOR_FLOPS_PER_MS
    return (weight_bytes / PRIOR_BYTES_PER_MS, per_token, per_token,
            attention_flops_per_pair * 1e6 / PRIOR_FLOPS_PER_MS, kv_bytes_per_token * 1e3 / PRIOR_BYTES_PER_MS)


# A model-agnostic prior (a ~9B-class dense model on an H100): for schedulers built without a model.
DEFAULT_PRIOR = (6.0, 0.05, 0.05, 0.4, 0.02)


class StepCostModel:
    """Predicts a step's milliseconds from its StepShape; `observe` adds a measured step (see the module doc)."""

    def __init__(self, prior: Sequence[float] = DEFAULT_PRIOR, *, min_samples: int = 16, forgetting: float = 0.995,
                 prior_weight: float = 0.002, skip_first: int = 2, outlier_factor: float = 5.0) -> None:
        if len(prior) != len(FEATURES) or any(not np.isfinite(c) or c < 0 for c in prior):
            raise ValueError(f"the prior needs {len(FEATURES)} finite coefficients >= 0 ({FEATURES}), got {prior!r}")
        if not 0 < forgetting <= 1:
            raise ValueError(f"forgetting must be in (0, 1], got {forgetting!r}")
        self.prior = np.asarray(prior, dtype=np.float64)
        self.min_samples = min_samples
        self.forgetting = forgetting
        self.skip_first = skip_first  # the first steps compile kernels: not representative
        self.outlier_factor = outlier_factor
        # feature j at SCALES[j], weighted as the average measured sample (so the prior counts as prior_weight
        # samples however far off its scale is)
        self._penalty = prior_weight * np.square(np.asarray(SCALES))
        self._wsum = 0.0  # forgetting-weighted sums of the samples' weights and of the samples
        self._nsum = 0.0
        n = len(FEATURES)
        self._xtx = np.zeros((n, n))
        self._xty = np.zeros(n)
        self._coef = self.prior.copy()
        self._stale = False
        self.num_samples = 0     # samples in the fit
        self.num_skipped = 0     # warm-up steps and outliers left out

    @property
    def fitted(self) -> bool:
        """Whether predictions come from measurements (else from the prior)."""
        return self.num_samples >= self.min_samples

    @property
    def coefficients(self) -> tuple[float, ...]:
        """The coefficients predictions use now (the prior until `fitted`)."""
        if not self.fitted:
            return tuple(self.prior.tolist())
        if self._stale:
            self._coef = self._solve()
            self._stale = False
        return tuple(self._coef.tolist())

    def predict(self, shape: StepShape) -> float:
        return float(np.dot(self.coefficients, shape.features()))

    def observe(self, shape: StepShape, ms: float) -> bool:
        """Add a measured step; False when it was left out (a warm-up step, a non-finite or non-positive time, or
        once fitted an outlier: more than `outlier_factor` x the prediction + 50 ms, e.g. a kernel compile)."""
        if self.skip_first > 0:
            self.skip_first -= 1
            self.num_skipped += 1
            return False
        if not np.isfinite(ms) or ms <= 0 or (self.fitted and ms > self.outlier_factor * self.predict(shape) + 50):
            self.num_skipped += 1
            return False
        x = np.asarray(shape.features())
        w = 1.0 / (ms * ms)
        self._xtx *= self.forgetting
        self._xty *= self.forgetting
        self._wsum = self._wsum * self.forgetting + w
        self._nsum = self._nsum * self.forgetting + 1.0
        self._xtx += w * np.outer(x, x)
        self._xty += w * x * ms
        self.num_samples += 1
        self._stale = True
        return True

    def _solve(self) -> np.ndarray:
        """Ridge towards the prior, with coefficients that come out negative pinned at 0 (a small active set)."""
        penalty = self._penalty * (self._wsum / self._nsum)
        a = self._xtx + np.diag(penalty)
        b = self._xty + penalty * self.prior
        free = np.ones(len(FEATURES), dtype=bool)
        coef = np.zeros(len(FEATURES))
        for _ in range(len(FEATURES)):
            coef[:] = 0.0
            idx = np.flatnonzero(free)
            coef[idx] = np.linalg.solve(a[np.ix_(idx, idx)], b[idx])
            negative = coef < 0
            if not negative.any():
                break
            free &= ~negative
        return np.maximum(coef, 0.0)

    def largest_chunk(self, shape: StepShape, context: int, limit: int, max_ms: float) -> int:
        """The most tokens (0..limit) a prefill chunk after `context` tokens may have so that `shape` plus the
        chunk is predicted within `max_ms` (the prediction grows with the chunk: binary search)."""
        if limit <= 0 or self.predict(shape.with_chunk(1, context)) > max_ms:
            return 0
        lo, hi = 1, limit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.predict(shape.with_chunk(mid, context)) <= max_ms:
                lo = mid
            else:
                hi = mid - 1
        return lo
