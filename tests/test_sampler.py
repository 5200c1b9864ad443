"""Unit tests for server/engine/sampler.py: filter tables, per-position noise, decide_tokens.

Statistical tests use fixed seeds, so they are deterministic; ALPHA is the p-value below which a
sampler is declared wrong. 1e-4 means a correct sampler would be flagged for about one choice of
seeds in 10^4, while the deliberately broken samplers below score p-values far below it, which
shows the tests have the power to fail.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from server.engine import sampler
from server.engine.sampler import batch_noise, decide_tokens, noise_seed, position_noise, process_logits
from server.engine.types import SamplingParams
from server.runtime.host import TRANSFERS
from tests.chi_square import chi_square_pvalue

ALPHA = 1e-4
NEG_INF = float("-inf")


def kept(logits: list[float], temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> set[int]:
    """Token ids that process_logits keeps for one row."""
    out = process_logits(
        torch.tensor([logits]), torch.tensor([temperature]), torch.tensor([top_k]), torch.tensor([top_p])
    )
    return set(torch.nonzero(out[0] > NEG_INF).flatten().tolist())


# ---- process_logits: filter tables -----------------------------------------------------------

LOGITS = [1.0, 3.0, 2.0, 5.0, 4.0]


@pytest.mark.parametrize(
    ("top_k", "expected"),
    [(0, {0, 1, 2, 3, 4}), (1, {3}), (2, {3, 4}), (3, {1, 3, 4}), (5, {0, 1, 2, 3, 4}), (99, {0, 1, 2, 3, 4})],
)
def test_top_k_table(top_k: int, expected: set[int]) -> None:
    assert kept(LOGITS, top_k=top_k) == expected


def test_top_k_ties_keep_lower_token_ids() -> None:
    assert kept([2.0, 1.0, 2.0, 2.0], top_k=2) == {0, 2}
    assert kept([0.0, 0.0, 0.0, 0.0], top_k=1) == {0}


# probs of [log .5, log .25, log .125, log .125] are .5 .25 .125 .125 (cumulative .5 .75 .875 1)
DYADIC = [math.log(0.5), math.log(0.25), math.log(0.125), math.log(0.125)]


@pytest.mark.parametrize(
    ("top_p", "expected"),
    [(1e-6, {0}), (0.49, {0}), (0.51, {0, 1}), (0.74, {0, 1}), (0.76, {0, 1, 2}), (0.9, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3})],
)
def test_top_p_table(top_p: float, expected: set[int]) -> None:
    assert kept(DYADIC, top_p=top_p) == expected


def test_top_p_keeps_the_smallest_prefix_reaching_top_p_exactly() -> None:
    # four equal logits: probs are exactly .25 in float32, so the boundary is exact; ties keep lower ids
    assert kept([0.0] * 4, top_p=0.25) == {0}
    assert kept([0.0] * 4, top_p=0.5) == {0, 1}  # mass .5 >= .5: no third token
    assert kept([0.0] * 4, top_p=0.75) == {0, 1, 2}


def test_top_p_uses_temperature_scaled_probabilities() -> None:
    # T = 1: probs ~ [.665, .245, .090]; T = 0.5: probs ~ [.867, .117, .016]
    assert kept([2.0, 1.0, 0.0], temperature=1.0, top_p=0.7) == {0, 1}
    assert kept([2.0, 1.0, 0.0], temperature=0.5, top_p=0.7) == {0}
    assert kept([2.0, 1.0, 0.0], temperature=0.5, top_p=0.9) == {0, 1}


def test_top_p_applies_after_top_k_renormalised() -> None:
    logits = [math.log(x) for x in (0.4, 0.3, 0.2, 0.1)]
    # Within the top 2 the probs are 4/7 = .571 and 3/7: 0.55 is already covered by token 0 alone
    # (without renormalising, 0.4 < 0.55 would have kept token 1 too).
    assert kept(logits, top_k=2, top_p=0.55) == {0}
    assert kept(logits, top_k=2, top_p=0.6) == {0, 1}
    assert kept(logits, top_k=3, top_p=0.6) == {0, 1}  # .444 + .333 >= .6


def test_filtered_values_unchanged_and_float32() -> None:
    x = torch.tensor([LOGITS], dtype=torch.bfloat16)
    out = process_logits(x, torch.tensor([0.7]), torch.tensor([3]), torch.tensor([1.0]))
    assert out.dtype == torch.float32
    assert out[0].tolist() == [NEG_INF, 3.0, NEG_INF, 5.0, 4.0]  # kept logits are not rescaled
    off = process_logits(x, torch.tensor([0.7]), torch.tensor([0]), torch.tensor([1.0]))
    assert off.dtype == torch.float32 and torch.equal(off, x.float())


def test_greedy_rows_are_not_filtered() -> None:
    out = process_logits(torch.tensor([LOGITS]), torch.tensor([0.0]), torch.tensor([1]), torch.tensor([0.1]))
    assert torch.equal(out, torch.tensor([LOGITS]))


def test_rows_are_filtered_independently() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 50, generator=gen)
    temperature = torch.tensor([1.0, 0.0, 0.6, 2.0])
    top_k = torch.tensor([0, 3, 10, 7])
    top_p = torch.tensor([0.8, 0.5, 1.0, 0.3])
    batched = process_logits(x, temperature, top_k, top_p)
    for i in range(4):
        row = process_logits(x[i : i + 1], temperature[i : i + 1], top_k[i : i + 1], top_p[i : i + 1])
        assert torch.equal(batched[i : i + 1], row)


# ---- position_noise ------------------------------------------------------------------------------


def test_noise_is_a_function_of_seed_and_position() -> None:
    a = position_noise(7, 3, 100, "cpu")
    assert a.shape == (100,) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, position_noise(7, 3, 100, "cpu"))
    assert not torch.equal(a, position_noise(7, 4, 100, "cpu"))
    assert not torch.equal(a, position_noise(8, 3, 100, "cpu"))
    # no aliasing between neighbouring seeds at shifted positions (a seed + position scheme would)
    assert noise_seed(7, 4) != noise_seed(8, 3)
    assert not torch.equal(position_noise(7, 4, 100, "cpu"), position_noise(8, 3, 100, "cpu"))


def test_noise_is_standard_gumbel() -> None:
    g = position_noise(123, 0, 20_000, "cpu").double().numpy()
    assert stats.kstest(g, "gumbel_r").pvalue > ALPHA
    # the test can fail: uniform noise, or Gumbel with the wrong scale, is rejected
    assert stats.kstest(torch.rand(20_000, generator=torch.Generator().manual_seed(1)).numpy(), "gumbel_r").pvalue < ALPHA
    assert stats.kstest(1.2 * g, "gumbel_r").pvalue < ALPHA


def test_batch_noise_rows_match_position_noise() -> None:
    rows = batch_noise([5, 5, 6, 5], [0, 1, 0, 0], 30, "cpu")  # (4, 30), rows 0 and 3 shared
    assert rows.shape == (4, 30)
    for r, (s, t) in enumerate([(5, 0), (5, 1), (6, 0), (5, 0)]):
        assert torch.equal(rows[r], position_noise(s, t, 30, "cpu"))


# ---- decide_tokens ---------------------------------------------------------------------------------


def test_greedy_rows_are_argmax_whatever_the_seed() -> None:
    x = torch.randn(6, 40, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0.0, top_k=2, top_p=0.3)] * 6
    out = decide_tokens(x, params, [None, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5])
    assert out.dtype == torch.int64 and torch.equal(out, x.argmax(-1))
    out2 = decide_tokens(x, params, [9, 9, 9, 9, 9, 9], [7, 7, 7, 7, 7, 7])
    assert torch.equal(out2, out)


def test_sampled_rows_need_a_seed() -> None:
    with pytest.raises(ValueError, match="seed"):
        decide_tokens(torch.zeros(1, 4), [SamplingParams(temperature=1.0)], [None], [0])


def test_same_seed_and_position_same_token_whatever_the_batch() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 64, generator=gen) * 0.3  # flat rows: the noise decides
    params = [
        SamplingParams(temperature=t, top_k=k, top_p=p)
        for t, k, p in [(1.0, None, 1.0), (0.0, None, 1.0), (0.7, 20, 0.9), (1.5, None, 0.95)] * 2
    ]
    seeds = [11, 12, 13, 14, 11, 12, 13, 15]
    positions = [0, 0, 5, 2, 1, 0, 5, 2]
    batched = decide_tokens(x, params, seeds, torch.tensor(positions))
    for i in range(8):  # one row alone: same token
        assert decide_tokens(x[i : i + 1], params[i : i + 1], seeds[i : i + 1], positions[i : i + 1]).item() == batched[i]
    perm = [5, 2, 7, 0, 3, 1, 6, 4]  # reordered batch: same tokens
    shuffled = decide_tokens(x[perm], [params[i] for i in perm], [seeds[i] for i in perm], [positions[i] for i in perm])
    assert torch.equal(shuffled, batched[perm])
    assert torch.equal(decide_tokens(x, params, seeds, positions), batched)  # rerun: reproducible


def test_top_k_beyond_int64_is_top_k_off() -> None:
    """A top_k of 2**63 or more once overflowed the int64 tensor (a 500): it keeps every token, like off."""
    x = torch.randn(3, 50, generator=torch.Generator().manual_seed(3))
    huge = [SamplingParams(temperature=1.0, top_k=k) for k in (2**63, 2**70, 50)]
    off = [SamplingParams(temperature=1.0)] * 3
    assert torch.equal(decide_tokens(x, huge, [5, 6, 7], [0, 1, 2]), decide_tokens(x, off, [5, 6, 7], [0, 1, 2]))


def test_sampled_token_stays_in_filtered_support() -> None:
    x = torch.randn(200, 30, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(temperature=5.0, top_k=3)] * 200
    out = decide_tokens(x, params, list(range(200)), [0] * 200)
    top3 = x.topk(3, dim=-1).indices
    assert (top3 == out[:, None]).any(-1).all()


N_DRAWS = 20_000
TOY_LOGITS = torch.tensor([1.2, 0.3, -0.5, 0.9, 0.0, -1.5])


def draw_counts(params: SamplingParams, position: int = 3) -> torch.Tensor:
    """Token counts (V,) of N_DRAWS rows of TOY_LOGITS decided with seeds 0..N_DRAWS-1."""
    x = TOY_LOGITS.expand(N_DRAWS, -1)
    tokens = decide_tokens(x, [params] * N_DRAWS, list(range(N_DRAWS)), [position] * N_DRAWS)
    return torch.bincount(tokens, minlength=x.shape[1])


def target_probs(params: SamplingParams) -> torch.Tensor:
    filtered = process_logits(
        TOY_LOGITS[None], torch.tensor([params.temperature]), torch.tensor([params.top_k or 0]), torch.tensor([params.top_p])
    )
    return torch.softmax(filtered[0] / params.temperature, dim=-1)


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=1.0), SamplingParams(temperature=0.5), SamplingParams(temperature=1.3, top_k=4, top_p=0.8)],
)
def test_samples_follow_softmax_of_filtered_logits(params: SamplingParams) -> None:
    counts = draw_counts(params)
    probs = target_probs(params)
    assert counts[probs == 0].sum() == 0
    assert chi_square_pvalue(counts[probs > 0], probs[probs > 0]) > ALPHA


def test_biased_samplers_are_detected(monkeypatch: pytest.MonkeyPatch) -> None:
    params = SamplingParams(temperature=1.0)
    probs = target_probs(params)
    # wrong temperature
    assert chi_square_pvalue(draw_counts(SamplingParams(temperature=1.15)), probs) < ALPHA

    # wrong noise: the uniforms themselves instead of their Gumbel transform
    monkeypatch.setattr(sampler, "gumbel", lambda u: u)
    assert chi_square_pvalue(draw_counts(params), probs) < ALPHA


def draw_counts_pair(params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    x = TOY_LOGITS.expand(N_DRAWS, -1)
    seeds = list(range(N_DRAWS))
    first = decide_tokens(x, [params] * N_DRAWS, seeds, [0] * N_DRAWS)
    second = decide_tokens(x, [params] * N_DRAWS, seeds, [1] * N_DRAWS)
    return first, second


def test_positions_are_independent(monkeypatch: pytest.MonkeyPatch) -> None:
    params = SamplingParams(temperature=1.0)

    def table() -> torch.Tensor:
        """6 x 6 contingency table of (token at position 0, token at position 1) over seeds."""
        a, b = draw_counts_pair(params)
        return torch.bincount(a * 6 + b, minlength=36).reshape(6, 6)

    assert stats.chi2_contingency(table().numpy()).pvalue > ALPHA
    # the test can fail: noise that ignores the position makes both tokens equal
    real_noise_seed = sampler.noise_seed
    monkeypatch.setattr(sampler, "noise_seed", lambda seed, position: real_noise_seed(seed, 0))
    assert stats.chi2_contingency(table().numpy()).pvalue < ALPHA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_noise_and_decisions_are_reproducible() -> None:
    g = position_noise(3, 2, 1000, "cuda")
    assert g.device.type == "cuda" and torch.equal(g, position_noise(3, 2, 1000, "cuda"))
    x = torch.randn(16, 1000, device="cuda")
    params = [SamplingParams(temperature=0.8, top_k=50, top_p=0.9), SamplingParams(temperature=0.0)] * 8
    out = decide_tokens(x, params, list(range(16)), list(range(16)))
    assert out.device.type == "cuda"
    assert torch.equal(out, decide_tokens(x, params, list(range(16)), list(range(16))))
    assert torch.equal(out[1::2], x[1::2].argmax(-1))


def test_deciding_makes_no_copy_to_the_host() -> None:
    """The all-nodes step decides every node on the device: greedy, sampled and filtered rows alike
    (whether any filter is on is known from the parameters, not asked of the device)."""
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.9, seed=1),
              SamplingParams(temperature=0.7, top_k=5, seed=2), SamplingParams(temperature=1.0, top_p=0.8, seed=3)]
    before = TRANSFERS.snapshot()
    tokens = decide_tokens(logits, params, [None, 1, 2, 3], [0, 3, 3, 7])
    assert (TRANSFERS.snapshot() - before).transfers == 0
    assert tokens.shape == (4,) and tokens[0] == logits[0].argmax()
