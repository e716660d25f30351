"""Catalogue-wide top-k: the two-stage search and the int8 first pass return exactly the
answer of torch.topk over the float32 scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model import native, ranking
from model.config import GRU4RecConfig
from model.data import ItemMap
from model.inference import RANKED_TOGETHER, Recommender
from model.network import GRU4RecNetwork
from model.ranking import LARGE_CATALOGUE, Int8Catalogue, int8_supported, top_k_rows


@pytest.mark.parametrize("n_items", [100, LARGE_CATALOGUE, 40_000, 40_037, 100_001])
@pytest.mark.parametrize("k", [1, 20, 200])
def test_equals_torch_topk_on_distinct_scores(n_items: int, k: int) -> None:
    k = min(k, n_items)
    generator = torch.Generator().manual_seed(n_items + k)
    scores = torch.randn(17, n_items, generator=generator)
    # the hardest rows for blocks: the whole top in one block, or in the partial tail
    scores[1, 128 : 128 + k] += 100.0
    scores[2, n_items - min(k, n_items % 64 or 64) :] += 100.0
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
    scores = torch.randn(3, LARGE_CATALOGUE)
    k = LARGE_CATALOGUE // 64 + 1
    indices, values = top_k_rows(scores, k)
    assert torch.equal(values, torch.topk(scores, k, dim=1).values)


def test_recommender_ranks_many_states_in_parts_with_the_same_answer() -> None:
    n_items = 10_000
    network = GRU4RecNetwork(GRU4RecConfig(), n_items, generator=torch.Generator().manual_seed(3))
    recommender = Recommender(
        network,
        ItemMap(str(i) for i in range(n_items)),
        np.arange(n_items, 0, -1, dtype=np.float64),
        GRU4RecConfig(),
    )
    generator = torch.Generator().manual_seed(5)
    states = torch.randn(2 * RANKED_TOGETHER + 7, network.state_size, generator=generator)
    started = torch.rand(len(states), generator=generator) < 0.8  # some rank by popularity
    indices, values = recommender.top_k(states, started, 20)
    scores = recommender.scores(states, started)
    expected = torch.topk(scores, 20, dim=1).values
    torch.testing.assert_close(scores.gather(1, indices), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(values, expected, rtol=0, atol=1e-5)
    assert torch.equal(indices[~started], indices[~started][:1].expand(int((~started).sum()), -1))


def _assert_same_ranking(
    catalogue: Int8Catalogue,
    vectors: torch.Tensor,
    bias: torch.Tensor,
    outputs: torch.Tensor,
    k: int,
) -> None:
    """The items returned have the k best float32 scores, in order, up to the rounding
    by which two ways of summing a product differ (a pair ~1e-7 apart may swap)."""
    scores = torch.addmm(bias.view(1, -1), outputs, vectors.t())
    indices, values = catalogue.top_k(outputs, k)
    expected = torch.topk(scores, k, dim=1).values
    torch.testing.assert_close(scores.gather(1, indices), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(values, expected, rtol=0, atol=1e-5)
    assert all(len(set(row)) == k for row in indices.tolist())


@pytest.mark.skipif(not int8_supported(torch.device("cpu")), reason="no int8 product")
@pytest.mark.parametrize("n_items", [LARGE_CATALOGUE, 40_000, 40_037])
@pytest.mark.parametrize("k", [1, 20, 200])
@pytest.mark.parametrize("search", ["native", "torch"])
def test_int8_first_pass_ranks_exactly(
    n_items: int, k: int, search: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if search == "torch":
        monkeypatch.setenv("STREAMREC_NATIVE", "0")
    elif native._library() is None:
        pytest.skip("no C compiler")
    generator = torch.Generator().manual_seed(n_items + k)
    # heavy tails, as trained weights have: a few large rows and entries
    vectors = torch.randn(n_items, 100, generator=generator) ** 3 * 0.05
    bias = torch.randn(n_items, 1, generator=generator) * 0.5
    outputs = torch.tanh(torch.randn(33, 100, generator=generator) * 2)
    outputs[0] = 0.0  # scores are the biases alone
    outputs[1] = outputs[1].sign()  # saturated
    catalogue = Int8Catalogue(vectors, bias)
    _assert_same_ranking(catalogue, vectors, bias, outputs, k)
    # the best items in the partial last block
    bias[-5:] += 100.0
    _assert_same_ranking(Int8Catalogue(vectors, bias), vectors, bias, outputs, k)


@pytest.mark.skipif(not int8_supported(torch.device("cpu")), reason="no int8 product")
def test_int8_first_pass_keeps_few_candidates(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bound is tight enough to be worth it: a few dozen items per state are
    re-scored, not the catalogue (a loose bound would still be exact, but slow)."""
    network = GRU4RecNetwork(GRU4RecConfig(), 40_000, generator=torch.Generator().manual_seed(1))
    catalogue = Int8Catalogue(network.item_output, network.item_bias)
    outputs = torch.tanh(torch.randn(64, network.state_size))
    rescored = []
    best_per_row = ranking._best_per_row

    def counting(row: torch.Tensor, *args: object) -> tuple[torch.Tensor, torch.Tensor]:
        rescored.append(len(row) / len(outputs))
        return best_per_row(row, *args)

    monkeypatch.setattr(ranking, "_best_per_row", counting)
    monkeypatch.setenv("STREAMREC_NATIVE", "0")  # the torch search, whose steps are visible
    catalogue.top_k(outputs, 20)
    assert 20 <= rescored[0] < 200


@pytest.mark.skipif(not int8_supported(torch.device("cpu")), reason="no int8 product")
def test_recommender_remakes_the_int8_copy_when_weights_change() -> None:
    n_items = 20_000
    network = GRU4RecNetwork(GRU4RecConfig(), n_items, generator=torch.Generator().manual_seed(4))
    recommender = Recommender(
        network, ItemMap(str(i) for i in range(n_items)), np.ones(n_items), GRU4RecConfig()
    )
    states = torch.randn(5, network.state_size)
    started = torch.ones(5, dtype=torch.bool)
    recommender.top_k(states, started, 20)
    with torch.no_grad():
        network.item_bias[123] += 1000.0  # in place, as training updates rows
    indices, _ = recommender.top_k(states, started, 20)
    assert (indices[:, 0] == 123).all()


@pytest.mark.skipif(not int8_supported(torch.device("cpu")), reason="no int8 product")
def test_native_search_refuses_inconsistent_tensors() -> None:
    catalogue = Int8Catalogue(torch.randn(640, 8), torch.zeros(640, 1))
    products = torch.zeros(2, 10, 64, dtype=torch.int32)
    with pytest.raises(ValueError, match="inconsistent shapes"):
        native.rank_blocks(
            products,
            torch.ones(3),
            torch.ones(2),
            catalogue.padded_bias,
            catalogue.block_max_bias,
            torch.zeros(2, 8),
            catalogue.vectors,
            catalogue.bias,
            5,
        )
