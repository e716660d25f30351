"""top_k_rows: the two-stage search returns exactly torch.topk's answer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.config import GRU4RecConfig
from model.data import ItemMap
from model.inference import RANKED_TOGETHER, TWO_STAGE_TOP_K_ITEMS, Recommender, top_k_rows
from model.network import GRU4RecNetwork


@pytest.mark.parametrize("n_items", [100, TWO_STAGE_TOP_K_ITEMS, 40_000, 40_037, 100_001])
@pytest.mark.parametrize("k", [1, 20, 200])
def test_equals_torch_topk_on_distinct_scores(n_items: int, k: int) -> None:
    k = min(k, n_items)
    generator = torch.Generator().manual_seed(n_items + k)
    scores = torch.randn(17, n_items, generator=generator)
    # the hardest rows for blocks: the whole top in one block, or in the partial tail
    scores[1, 128:128 + k] += 100.0
    scores[2, n_items - min(k, n_items % 64 or 64):] += 100.0
    indices, values = top_k_rows(scores, k)
    expected = torch.topk(scores, k, dim=1)
    assert torch.equal(values, expected.values)
    assert torch.equal(indices, expected.indices)


def test_ties_give_the_same_values_and_valid_indexes() -> None:
    scores = torch.randint(0, 5, (9, 50_000)).float()  # massive ties
    indices, values = top_k_rows(scores, 20)
    assert torch.equal(values, torch.topk(scores, 20, dim=1).values)
    assert torch.equal(scores.gather(1, indices), values)
    assert all(len(set(row.tolist())) == 20 for row in indices)


def test_fewer_blocks_than_k_falls_back() -> None:
    scores = torch.randn(3, TWO_STAGE_TOP_K_ITEMS)
    k = TWO_STAGE_TOP_K_ITEMS // 64 + 1
    indices, values = top_k_rows(scores, k)
    assert torch.equal(values, torch.topk(scores, k, dim=1).values)


def test_recommender_ranks_many_states_in_parts_with_the_same_answer() -> None:
    n_items = 10_000
    network = GRU4RecNetwork(GRU4RecConfig(), n_items, generator=torch.Generator().manual_seed(3))
    recommender = Recommender(network, ItemMap(str(i) for i in range(n_items)),
                              np.arange(n_items, 0, -1, dtype=np.float64), GRU4RecConfig())
    states = torch.randn(2 * RANKED_TOGETHER + 7, network.state_size)
    started = torch.rand(len(states)) < 0.8  # some rank by popularity
    indices, values = recommender.top_k(states, started, 20)
    expected = top_k_rows(recommender.scores(states, started), 20)
    assert torch.equal(indices, expected[0]) and torch.equal(values, expected[1])
