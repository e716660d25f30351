"""PopularitySampler: P(item) ~ support^alpha, from a pre-drawn store that is refilled."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.sampling import PopularitySampler, alias_table

SUPPORT = np.array([1, 4, 0, 9, 16, 0, 25, 2])
ZERO = np.flatnonzero(SUPPORT == 0)
N_ITEMS = len(SUPPORT)


def make(
    alpha: float = 0.5, store_size: int = 100_000, seed: int = 7, support: np.ndarray = SUPPORT
) -> PopularitySampler:
    return PopularitySampler(support, alpha, store_size, torch.Generator().manual_seed(seed))


def expected_probabilities(alpha: float) -> np.ndarray:
    weights = np.array([float(s) ** alpha if s > 0 else 0.0 for s in SUPPORT])
    return weights / weights.sum()


def draw_counts(sampler: PopularitySampler, calls: int, n: int) -> np.ndarray:
    counts = np.zeros(N_ITEMS, dtype=np.int64)
    for _ in range(calls):
        out = sampler.sample(n)
        assert out.shape == (n,) and out.dtype == torch.int64
        counts += np.bincount(out.numpy(), minlength=N_ITEMS)
    return counts


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_frequencies_follow_support_to_the_alpha(alpha: float) -> None:
    sampler = make(alpha)
    expected = expected_probabilities(alpha)
    np.testing.assert_allclose(sampler.probabilities, expected, rtol=1e-12)
    # 200,000 draws in slices of 2,000 through a 100,000-draw store (so it is refilled)
    counts = draw_counts(sampler, calls=100, n=2_000)
    total = counts.sum()
    assert total == 200_000
    assert (counts[ZERO] == 0).all(), "an item with zero support was drawn"
    positive = expected > 0
    expected_counts = expected[positive] * total
    chi2 = float((((counts[positive] - expected_counts) ** 2) / expected_counts).sum())
    # 5 degrees of freedom: P(chi2 > 30) is about 1.5e-5
    assert chi2 < 30, f"chi-square {chi2:.1f}: counts {counts} vs expected {expected_counts}"
    np.testing.assert_allclose(counts[positive] / total, expected[positive], atol=0.005)


def test_alpha_zero_is_uniform_over_items_with_support() -> None:
    probabilities = make(0.0).probabilities
    assert probabilities[ZERO].sum() == 0
    np.testing.assert_allclose(probabilities[SUPPORT > 0], 1 / 6)


@pytest.mark.parametrize("store_size", [0, 5, 9, 10, 1_000])
def test_store_keeps_working_across_many_calls(store_size: int) -> None:
    sampler = make(1.0, store_size=store_size)
    outputs = [sampler.sample(3) for _ in range(2_000)]
    draws = torch.cat(outputs).numpy()
    assert len(draws) == 6_000
    assert draws.min() >= 0 and draws.max() < N_ITEMS
    assert not np.isin(draws, ZERO).any()
    counts = np.bincount(draws, minlength=N_ITEMS)
    assert (counts[SUPPORT > 0] > 0).all(), "some item with support was never drawn"
    # consecutive stores must be fresh draws, not the same store handed out again
    blocks = {tuple(draws[k : k + 9]) for k in range(0, len(draws), 9)}
    assert len(blocks) > 100


def test_varying_sizes_and_zero() -> None:
    sampler = make(0.5, store_size=50)
    assert sampler.sample(0).shape == (0,)
    for n in (1, 7, 50, 3, 51, 2, 49):
        out = sampler.sample(n)
        assert out.shape == (n,)
        assert not np.isin(out.numpy(), ZERO).any()


def test_same_seed_same_draws_and_different_seed_different_draws() -> None:
    first = make(0.5, store_size=64, seed=3).sample(16)
    a, b, c = (
        make(0.5, store_size=64, seed=3),
        make(0.5, store_size=64, seed=3),
        make(0.5, store_size=64, seed=4),
    )
    seq_a = torch.cat([a.sample(16) for _ in range(20)])
    seq_b = torch.cat([b.sample(16) for _ in range(20)])
    seq_c = torch.cat([c.sample(16) for _ in range(20)])
    assert torch.equal(seq_a, seq_b)
    assert torch.equal(seq_a[:16], first)
    assert not torch.equal(seq_a, seq_c)


def test_single_item_with_support_is_always_drawn() -> None:
    sampler = make(0.5, support=np.array([0, 0, 3, 0]))
    assert set(sampler.sample(500).tolist()) == {2}


def test_all_zero_support_is_refused() -> None:
    with pytest.raises(ValueError):
        make(0.5, support=np.zeros(4))


@pytest.mark.parametrize("seed", range(5))
def test_alias_table_reproduces_the_probabilities_exactly(seed: int) -> None:
    rng = np.random.default_rng(seed)
    weights = rng.pareto(1.0, size=500) * (rng.random(500) < 0.8)  # heavy tail and zeros
    probabilities = weights / weights.sum()
    keep, alias = alias_table(probabilities)
    # P(item) = (its own column's keep + the columns that alias to it) / columns
    implied = keep.copy()
    np.add.at(implied, alias, 1.0 - keep)
    np.testing.assert_allclose(implied / len(probabilities), probabilities, atol=1e-12)
    assert (keep[probabilities == 0] == 0).all()
    assert (probabilities[alias[keep < 1]] > 0).all(), "a zero-probability item is an alias"
