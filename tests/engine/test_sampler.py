from __future__ import annotations

import math

import pytest
import torch

from deltaserve.engine.sampler import (
    Sampler,
    SamplingRow,
    filter_logits,
    process_logits,
    step_seed,
)
from deltaserve.sampling_params import SamplingParams

NUM_DRAWS = 20000


def _row(**kwargs: object) -> SamplingRow:
    prompt = kwargs.pop("prompt", ())
    output = kwargs.pop("output", ())
    eos = frozenset(kwargs.pop("eos", ()))
    return SamplingRow(SamplingParams(**kwargs), prompt, output, eos)  # type: ignore[arg-type]


def _frequencies(logits: torch.Tensor, seed: int = 0, **params: object) -> torch.Tensor:
    """Empirical token frequencies from NUM_DRAWS unseeded rows that all share `logits: [V]`."""
    rows = [_row(**params)] * NUM_DRAWS
    gen = torch.Generator().manual_seed(seed)
    out = Sampler(gen)(logits.expand(NUM_DRAWS, -1), rows)
    return torch.bincount(out.token_ids, minlength=logits.numel()).double() / NUM_DRAWS


def _assert_matches(freq: torch.Tensor, probs: torch.Tensor) -> None:
    """Each frequency within 5 binomial standard deviations of its probability; zero-probability never drawn."""
    probs = probs.double()
    sigma = (probs * (1 - probs) / NUM_DRAWS).sqrt()
    assert torch.all(freq[probs == 0] == 0), (freq, probs)
    assert torch.all((freq - probs).abs() <= 5 * sigma + 1e-9), (freq, probs)


def _filter(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
            min_p: float = 0.0) -> torch.Tensor:
    return filter_logits(logits.unsqueeze(0), torch.tensor([temperature]), torch.tensor([top_k]),
                         torch.tensor([top_p]), torch.tensor([min_p]))[0]


LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.3, -0.5, -1.0, 0.0, 0.7])


# ---- greedy, temperature ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax_and_input_untouched(dtype: torch.dtype) -> None:
    logits = torch.randn(9, 101, generator=torch.Generator().manual_seed(1)).to(dtype)
    before = logits.clone()
    rows = [_row(temperature=0.0, top_k=3, top_p=0.1, min_p=0.5, seed=i) for i in range(9)]
    out = Sampler()(logits, rows)
    assert out.token_ids.dtype == torch.int64 and out.token_ids.shape == (9,)
    assert torch.equal(out.token_ids, logits.float().argmax(dim=1))
    assert torch.equal(logits, before)


def test_unprocessed_fp32_logits_are_not_modified_by_random_rows() -> None:
    """With no processor to apply the sampler reads the caller's fp32 logits without copying them first."""
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(2))
    before = logits.clone()
    Sampler()(logits, [_row(temperature=0.7, top_k=5, top_p=0.8, min_p=0.1, seed=i) for i in range(4)])
    assert torch.equal(logits, before)


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_temperature_matches_softmax_of_scaled_logits(temperature: float) -> None:
    freq = _frequencies(LOGITS, temperature=temperature)
    _assert_matches(freq, torch.softmax(LOGITS / temperature, dim=0))


def test_tiny_temperature_is_argmax_not_nan() -> None:
    logits = torch.tensor([[30.0, 29.0, -5.0], [-1.0, 2.0, 1.99]]).expand(4, 2, 3).reshape(8, 3)
    out = Sampler()(logits, [_row(temperature=1e-40, top_p=0.9, min_p=0.1)] * 8)
    assert out.token_ids.tolist() == [0, 1] * 4


def test_low_temperature_concentrates() -> None:
    peaks = [_frequencies(LOGITS, temperature=t)[0].item() for t in (2.0, 1.0, 0.2, 0.05)]
    assert peaks == sorted(peaks) and peaks[-1] > 0.99


# ---- top-k, top-p, min-p ------------------------------------------------------------------------------------------

def test_top_k_never_leaves_the_top_k_and_renormalises() -> None:
    freq = _frequencies(LOGITS, top_k=3)
    top3 = torch.tensor([0, 1, 2])
    expected = torch.zeros_like(LOGITS)
    expected[top3] = torch.softmax(LOGITS[top3], dim=0)
    _assert_matches(freq, expected)


def test_top_k_keeps_ties_and_ignores_off_values() -> None:
    logits = torch.tensor([1.0, 3.0, 2.0, 2.0, 0.0])
    kept = torch.isfinite(_filter(logits, top_k=2))
    assert kept.tolist() == [False, True, True, True, False]
    for off in (0, -1, 5, 99):
        assert torch.equal(_filter(logits, top_k=off), logits - logits.max())  # shifted, nothing masked


@pytest.mark.parametrize("top_p,kept", [
    (0.3, [0]), (0.39, [0]), (0.41, [0, 1]), (0.65, [0, 1]), (0.75, [0, 1, 2]), (0.95, [0, 1, 2, 3]),
    (1.0, [0, 1, 2, 3]),
])
def test_top_p_keeps_smallest_set_reaching_p(top_p: float, kept: list[int]) -> None:
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    out = _filter(probs.log(), top_p=top_p)
    assert torch.isfinite(out).nonzero().flatten().tolist() == kept


def test_top_p_sampling_frequencies() -> None:
    probs = torch.softmax(LOGITS, dim=0)
    freq = _frequencies(LOGITS, top_p=0.6)
    order = probs.argsort(descending=True)
    cum = probs[order].cumsum(0)
    n_keep = int((cum < 0.6).sum()) + 1
    expected = torch.zeros_like(probs)
    expected[order[:n_keep]] = probs[order[:n_keep]] / probs[order[:n_keep]].sum()
    _assert_matches(freq, expected)


def test_top_k_then_top_p_uses_renormalised_mass() -> None:
    # After top-k=2 the two survivors have mass 0.4/0.7 and 0.3/0.7: top_p=0.5 keeps only the first.
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    out = _filter(probs.log(), top_k=2, top_p=0.5)
    assert torch.isfinite(out).tolist() == [True, False, False, False]


def test_min_p_drops_tokens_below_fraction_of_max() -> None:
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    out = _filter(probs.log(), min_p=0.25)  # threshold 0.125
    assert torch.isfinite(out).tolist() == [True, True, True, False]
    freq = _frequencies(probs.log(), min_p=0.25)
    _assert_matches(freq, torch.tensor([0.5, 0.25, 0.15, 0.0]) / 0.9)


def test_min_p_is_applied_after_temperature() -> None:
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    # T=2 flattens to ratios sqrt(p/p_max): 1, 0.707, 0.548, 0.447; min_p 0.5 keeps three.
    out = _filter(probs.log(), temperature=2.0, min_p=0.5)
    assert torch.isfinite(out).tolist() == [True, True, True, False]



def test_min_p_runs_before_top_p_as_in_vllm() -> None:
    # vLLM applies min-p (after temperature) before top-k/top-p. min_p 0.3 keeps 0.5 and 0.3 (renormalised 0.625,
    # 0.375); top_p 0.6 over that renormalised mass keeps only the first. Top-p first would keep two tokens.
    probs = torch.tensor([0.5, 0.3, 0.1, 0.1])
    out = _filter(probs.log(), top_p=0.6, min_p=0.3)
    assert torch.isfinite(out).tolist() == [True, False, False, False]
    freq = _frequencies(probs.log(), top_p=0.6, min_p=0.3)
    _assert_matches(freq, torch.tensor([1.0, 0.0, 0.0, 0.0]))

# ---- penalties, bias, min_tokens ----------------------------------------------------------------------------------

def test_penalties_follow_the_formulas_exactly() -> None:
    logits = torch.tensor([[1.0, -2.0, 3.0, -0.5, 0.25, 4.0]])
    prompt, output = [1, 4], [2, 3, 3]
    rp, freq_pen, pres_pen = 1.5, 0.4, 0.3
    row = _row(repetition_penalty=rp, frequency_penalty=freq_pen, presence_penalty=pres_pen,
               prompt=prompt, output=output)
    expected = logits[0].tolist()
    for t in set(prompt) | set(output):  # HF/vLLM: over prompt + output
        expected[t] = expected[t] / rp if expected[t] > 0 else expected[t] * rp
    for t in set(output):  # OpenAI: over output only
        count = output.count(t)
        expected[t] -= freq_pen * count + pres_pen
    assert torch.allclose(process_logits(logits, [row])[0], torch.tensor(expected), atol=1e-6, rtol=0)


def test_penalties_apply_per_row_and_leave_other_rows_alone() -> None:
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(3))
    rows = [_row(output=[1, 1]), _row(presence_penalty=1.0, output=[1, 1]), _row(repetition_penalty=2.0, prompt=[5])]
    out = process_logits(logits, rows)
    assert torch.equal(out[0], logits[0])
    assert out[1, 1] == logits[1, 1] - 1.0 and torch.equal(out[1, 2:], logits[1, 2:])
    r = logits[2, 5]
    assert out[2, 5] == (r / 2 if r > 0 else r * 2)
    assert torch.equal(out[2, :5], logits[2, :5])


def test_token_ids_may_be_tensors() -> None:
    logits = torch.randn(2, 10, generator=torch.Generator().manual_seed(4))
    kw = dict(repetition_penalty=1.3, frequency_penalty=0.2, presence_penalty=-0.4)
    as_lists = [_row(prompt=[1, 2, 2], output=[3, 3, 9], **kw), _row(prompt=[], output=[], **kw)]
    as_tensors = [SamplingRow(r.params, torch.tensor(r.prompt_token_ids, dtype=torch.long),
                              torch.tensor(r.output_token_ids, dtype=torch.int32)) for r in as_lists]
    assert torch.equal(process_logits(logits, as_lists), process_logits(logits, as_tensors))
    assert torch.equal(process_logits(logits, as_lists)[1], logits[1])


def test_penalties_change_what_is_sampled() -> None:
    logits = torch.tensor([[5.0, 4.5, 0.0, 0.0]])
    assert Sampler()(logits, [_row(temperature=0.0, output=[0])]).token_ids.item() == 0
    assert Sampler()(logits, [_row(temperature=0.0, output=[0], frequency_penalty=1.0)]).token_ids.item() == 1
    assert Sampler()(logits, [_row(temperature=0.0, prompt=[0], repetition_penalty=1.2)]).token_ids.item() == 1
    freq = _frequencies(logits[0], presence_penalty=2.0, output=[0, 0, 0])
    _assert_matches(freq, torch.softmax(torch.tensor([3.0, 4.5, 0.0, 0.0]), dim=0))


def test_logit_bias_is_added() -> None:
    logits = torch.zeros(2, 6)
    logits[:, 0] = 3.0
    rows = [_row(logit_bias={5: 4.0, 1: -1.5}), _row()]
    out = process_logits(logits, rows)
    assert out[0].tolist() == [3.0, -1.5, 0.0, 0.0, 0.0, 4.0] and torch.equal(out[1], logits[1])
    greedy = Sampler()(logits, [_row(temperature=0.0, logit_bias={5: 4.0}), _row(temperature=0.0)])
    assert greedy.token_ids.tolist() == [5, 0]
    assert _frequencies(logits[0], logit_bias={4: -100.0, 0: -100.0})[[0, 4]].sum() == 0


def test_allowed_token_ids_restrict_the_distribution() -> None:
    """The other ids leave it (-inf), after logit_bias; sampling draws from the softmax over the allowed ids alone,
    greedy takes their argmax, and the logprobs returned stay those of the raw distribution."""
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.5, -1.0], [3.0, 1.0, 2.0, 0.5, -1.0]])
    rows = [_row(allowed_token_ids=[1, 3, 4], logit_bias={4: 2.0}), _row()]
    out = process_logits(logits, rows)
    inf = float("inf")
    assert out[0].tolist() == [-inf, 1.0, -inf, 0.5, 1.0] and torch.equal(out[1], logits[1])
    greedy = Sampler()(logits, [_row(temperature=0.0, allowed_token_ids=[2, 3], logprobs=1), _row(temperature=0.0)])
    assert greedy.token_ids.tolist() == [2, 0]
    assert torch.allclose(greedy.logprobs[0], torch.log_softmax(logits[0], dim=0)[2])
    want = torch.zeros(5)
    want[[1, 3, 4]] = torch.softmax(torch.tensor([1.0, 0.5, -1.0]), dim=0)
    _assert_matches(_frequencies(logits[0], allowed_token_ids=[1, 3, 4]), want)


def test_bad_words_ban_the_last_token_after_the_rest() -> None:
    """vLLM's rule: a one-token word is always banned, a longer one's last token once the output ends with the
    tokens before it (the prompt does not count)."""
    logits = torch.zeros(3, 6)
    seqs = [[5], [1, 2], [3, 1, 4]]
    rows = [_row(bad_words_token_ids=seqs, output=[0, 1]), _row(bad_words_token_ids=seqs, prompt=[1], output=[3, 1]),
            _row(bad_words_token_ids=seqs, output=torch.tensor([1, 3]))]
    banned = [[i for i, v in enumerate(row.tolist()) if v == float("-inf")] for row in process_logits(logits, rows)]
    assert banned == [[2, 5], [2, 4, 5], [5]]


def test_min_tokens_suppresses_eos_and_stop_token_ids() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, 9.0, 8.0]])  # 3 = eos, 4 = a stop token id
    params = dict(temperature=0.0, min_tokens=2, stop_token_ids=[4], eos=[3])
    pick = lambda **kw: Sampler()(logits, [_row(**{**params, **kw})]).token_ids.item()  # noqa: E731
    assert pick(output=[1]) == 2
    assert pick(output=[1, 1]) == 3
    assert pick(output=[1], ignore_eos=True) == 3  # eos does not end this request, so it need not be hidden
    suppressed = process_logits(logits, [_row(**{**params, "output": []})])[0]
    assert suppressed[3] == -math.inf and suppressed[4] == -math.inf and suppressed[2] == 2.0
    freq = _frequencies(logits[0], min_tokens=1, eos=[3], stop_token_ids=[4])
    assert freq[3] == 0 and freq[4] == 0 and freq[2] > 0.5


# ---- seeds ------------------------------------------------------------------------------------------------------

def _seeded_sequence(seed: int, steps: int, table: torch.Tensor, batch: bool) -> list[int]:
    """Sample `steps` tokens for a seeded row with logits table[step]; in batch mode surround it with noise rows."""
    other = torch.Generator().manual_seed(seed + 1000)
    sampler = Sampler(torch.Generator().manual_seed(seed + 7))
    output: list[int] = []
    for step in range(steps):
        target = _row(seed=seed, top_k=20, output=list(output))
        if not batch:
            output.append(int(sampler(table[step : step + 1], [target]).token_ids[0]))
            continue
        pos = step % 4
        noise = torch.randn(4, table.shape[1], generator=other)
        logits = torch.cat([noise[:pos], table[step : step + 1], noise[pos:]])
        rows = [_row(temperature=0.7, output=[0] * k) for k in range(4)]
        rows[(pos + 1) % 4] = _row(seed=seed + 1, output=[1] * step)
        rows.insert(pos, target)
        output.append(int(sampler(logits, rows).token_ids[pos]))
    return output


def test_seeded_row_ignores_batch_composition() -> None:
    table = torch.randn(24, 64, generator=torch.Generator().manual_seed(5))
    alone = _seeded_sequence(42, 24, table, batch=False)
    assert alone == _seeded_sequence(42, 24, table, batch=True)
    assert alone != _seeded_sequence(43, 24, table, batch=False)


def test_seeded_draw_depends_on_position_not_call_count() -> None:
    logits = torch.zeros(1, 1000)
    draws = [Sampler()(logits, [_row(seed=9, output=[0] * 3)]).token_ids.item() for _ in range(3)]
    assert len(set(draws)) == 1
    later = {Sampler()(logits, [_row(seed=9, output=[0] * k)]).token_ids.item() for k in range(4, 12)}
    assert len(later) > 4  # positions give fresh draws
    assert step_seed(9, 3) != step_seed(9, 4) and 0 <= step_seed(-1, 0) < 2**63


def test_seeded_rows_are_still_distributed_correctly() -> None:
    rows = [_row(seed=s, output=[0] * (s % 5)) for s in range(NUM_DRAWS // 4)]
    out = Sampler()(LOGITS.expand(len(rows), -1), rows)
    freq = torch.bincount(out.token_ids, minlength=LOGITS.numel()).double() / len(rows)
    probs = torch.softmax(LOGITS, dim=0).double()
    assert torch.all((freq - probs).abs() <= 5 * (probs * (1 - probs) / len(rows)).sqrt())


# ---- logprobs ---------------------------------------------------------------------------------------------------

def test_logprobs_are_raw_log_softmax_sorted_and_normalised() -> None:
    logits = torch.randn(4, 12, generator=torch.Generator().manual_seed(11)).to(torch.bfloat16)
    rows = [_row(logprobs=12, temperature=0.5, logit_bias={3: 5.0}), _row(logprobs=2), _row(logprobs=0),
            _row(temperature=0.0, repetition_penalty=1.7, prompt=list(range(12)))]
    out = Sampler(torch.Generator().manual_seed(0))(logits, rows)
    reference = torch.log_softmax(logits.float(), dim=1)
    assert out.logprobs.dtype == torch.float32 and out.top_ids.shape == (4, 12) == out.top_logprobs.shape
    assert torch.allclose(out.logprobs, reference.gather(1, out.token_ids[:, None])[:, 0], atol=1e-6)
    assert torch.all(out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:])
    assert torch.allclose(out.top_logprobs, reference.gather(1, out.top_ids), atol=1e-6)
    assert torch.equal(out.top_ids[:, 0], logits.float().argmax(dim=1))
    assert torch.allclose(out.top_logprobs.exp().sum(dim=1), torch.ones(4), atol=1e-5)  # k = V: whole vocab


def test_no_logprobs_requested_gives_empty_top_and_empty_batch_works() -> None:
    out = Sampler()(torch.randn(3, 7), [_row(), _row(temperature=0.0), _row(seed=1)])
    assert out.top_ids.shape == (3, 0) and out.top_logprobs.shape == (3, 0) and out.logprobs.shape == (3,)
    assert out.logprobs.isnan().all()  # not computed: no row asked
    empty = Sampler()(torch.randn(0, 7), [])
    assert empty.token_ids.shape == (0,) and empty.top_ids.shape == (0, 0)


def test_shape_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError, match="len\\(rows\\)"):
        Sampler()(torch.randn(2, 5), [_row()])
