"""Catalogue rules in every ranking path: unavailable items and seen items never listed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model import native, ranking
from model.config import GRU4RecConfig
from model.data import ItemMap
from model.errors import UserError
from model.inference import Recommender
from model.item_index import IndexParams, ItemIndex
from model.network import GRU4RecNetwork
from model.ranking import LARGE_CATALOGUE, Int8Catalogue, int8_supported
from model.rules import RECENT_ITEMS, obey, read_unavailable, seen_indexes
from stream.devtools.testing import clustered, states_of

CONFIG = GRU4RecConfig(layers=(16,))


def plain(n_items: int, seed: int = 0) -> Recommender:
    generator = torch.Generator().manual_seed(seed)
    network = GRU4RecNetwork(CONFIG, n_items, generator=generator)
    with torch.no_grad():
        network.item_bias.copy_(torch.randn(n_items, 1, generator=generator))
    popularity = np.arange(n_items, dtype=np.float64)
    return Recommender(network, ItemMap(str(i) for i in range(n_items)), popularity, CONFIG)


def reference(
    recommender: Recommender, states: torch.Tensor, started: torch.Tensor, k: int, seen=None
) -> torch.Tensor:
    """The rules' answer from the dense scores: the k best finite scores of each row."""
    scores = recommender.scores(states, started, seen)
    return torch.topk(scores, k, dim=1).indices


def unavailable_tops(recommender: Recommender, states: torch.Tensor, share: float) -> torch.Tensor:
    """A ``share`` of the catalogue made unavailable, including each state's current best
    three items (random items alone would rarely be in any list)."""
    started = torch.ones(len(states), dtype=torch.bool)
    tops = recommender.top_k(states, started, 3)[0].reshape(-1)
    generator = torch.Generator().manual_seed(7)
    chosen = torch.randperm(recommender.n_items, generator=generator)
    chosen = chosen[: int(share * recommender.n_items)]
    return torch.unique(torch.cat([tops, chosen]))


def paths() -> list[tuple[str, int]]:
    return [("float", 3_000), ("int8-native", 20_000), ("int8-torch", 20_000)]


@pytest.mark.parametrize(("path", "n_items"), paths())
def test_exact_paths_rank_only_available_items(
    path: str, n_items: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    if path.startswith("int8") and not int8_supported(torch.device("cpu")):
        pytest.skip("no int8 product")
    if path == "int8-torch":
        monkeypatch.setenv("STREAMREC_NATIVE", "0")
    elif path == "int8-native" and native._library() is None:
        pytest.skip("no C compiler")
    assert (n_items >= LARGE_CATALOGUE) == path.startswith("int8")
    recommender = plain(n_items)
    recommender.use_ranking("exact")
    states = states_of(recommender, 40)
    started = torch.ones(40, dtype=torch.bool)
    before = recommender.top_k(states, started, 20)[0]
    gone = unavailable_tops(recommender, states, 0.1)
    recommender.set_available(gone, False)
    items, values = recommender.top_k(states, started, 20)
    assert not torch.isin(items, gone).any()
    assert torch.isfinite(values).all()
    assert torch.equal(items, reference(recommender, states, started, 20))
    recommender.set_available(gone, True)
    assert torch.equal(recommender.top_k(states, started, 20)[0], before)


def test_approximate_ranking_skips_unavailable_items_in_lists_and_head() -> None:
    recommender = clustered(30_000)
    vectors, bias = recommender.network.item_output, recommender.network.item_bias
    params = IndexParams(n_lists=512, n_probe=64, candidates=100, head=256)
    index = recommender.index = ItemIndex.build(vectors, bias, params)
    recommender.use_ranking("approximate")
    states = states_of(recommender, 64)
    started = torch.ones(64, dtype=torch.bool)
    gone = unavailable_tops(recommender, states, 0.1)
    gone = torch.unique(torch.cat([gone, torch.from_numpy(index.head_items[:50])]))
    recommender.set_available(gone, False)
    items, values = recommender.top_k(states, started, 20)
    assert not torch.isin(items, gone).any()
    truth = reference(recommender, states, started, 20)
    recall = np.mean([len(set(a.tolist()) & set(b.tolist())) / 20 for a, b in zip(items, truth)])
    assert recall >= 0.99
    # every returned score is the model's own (re-ranked exactly)
    exact = recommender.scores(states, started).gather(1, items)
    torch.testing.assert_close(values, exact)


def test_an_index_made_later_gets_the_current_availability() -> None:
    recommender = clustered(30_000)
    states = states_of(recommender, 16)
    started = torch.ones(16, dtype=torch.bool)
    gone = unavailable_tops(recommender, states, 0.0)
    recommender.set_available(gone, False)
    recommender.use_ranking("approximate")  # builds the index now
    assert not torch.isin(recommender.top_k(states, started, 20)[0], gone).any()
    recommender.index = None
    recommender.build_index()
    recommender.use_ranking("approximate")
    assert not torch.isin(recommender.top_k(states, started, 20)[0], gone).any()


@pytest.mark.parametrize("n_items", [3_000, 20_000, 30_000])
def test_seen_items_are_left_out_and_lists_stay_full(n_items: int) -> None:
    recommender = clustered(n_items) if n_items == 30_000 else plain(n_items)
    recommender.use_ranking("approximate" if n_items == 30_000 else "exact")
    states = states_of(recommender, 30)
    started = torch.ones(30, dtype=torch.bool)
    tops = recommender.top_k(states, started, 25)[0]
    histories = [[str(i) for i in row[::2].tolist()] + ["unknown"] for row in tops]
    seen = seen_indexes(recommender.item_map, histories)
    assert seen.shape == (30, RECENT_ITEMS) and (seen[:, 13] == -1).all()
    items, values = recommender.top_k(states, started, 20, seen)
    assert torch.isfinite(values).all()
    assert not (items.unsqueeze(2) == seen.unsqueeze(1)).any()
    if n_items < 30_000:
        assert torch.equal(items, reference(recommender, states, started, 20, seen))
    else:  # the approximate lists hold what the exact lists held, minus the seen items
        kept = [[i for i in row.tolist() if str(i) not in h] for row, h in zip(tops, histories)]
        assert [row[:12] for row in items.tolist()] == [row[:12] for row in kept]


def test_sessions_without_a_known_item_get_the_most_popular_available_items() -> None:
    recommender = plain(20_000)
    recommender.use_ranking("exact")
    states = recommender.initial_states(2)
    started = torch.zeros(2, dtype=torch.bool)
    assert recommender.top_k(states, started, 3)[0].tolist() == [[19_999, 19_998, 19_997]] * 2
    recommender.set_available(torch.tensor([19_998]), False)
    assert recommender.top_k(states, started, 3)[0].tolist() == [[19_999, 19_997, 19_996]] * 2


def test_fewer_available_items_than_asked_shorten_the_list() -> None:
    recommender = plain(3_000)
    recommender.use_ranking("exact")
    recommender.set_available(torch.arange(2_995), False)
    items, values = recommender.top_k(states_of(recommender, 2), torch.ones(2, dtype=bool), 8)
    assert sorted(items[0, :5].tolist()) == [2995, 2996, 2997, 2998, 2999]
    assert items[:, 5:].eq(-1).all() and torch.isneginf(values[:, 5:]).all()


def test_restrict_sets_exactly_the_listed_known_items() -> None:
    recommender = plain(100)
    recommender.set_available(torch.tensor([1, 2]), False)
    assert recommender.restrict(["5", "7", "not-an-item"]) == 2
    assert recommender.unavailable.nonzero().view(-1).tolist() == [5, 7]


def test_obey_keeps_order_and_pads() -> None:
    items = torch.tensor([[4, 3, 2, 1]])
    values = torch.tensor([[4.0, -torch.inf, 2.0, 1.0]])
    kept = obey(items, values, torch.tensor([[2, -1]]), 3)
    assert kept[0].tolist() == [[4, 1, -1]]


def test_availability_snapshot_file(tmp_path) -> None:
    path = tmp_path / "unavailable.txt"
    path.write_text("# sold out\nA\n\n B \n")
    assert read_unavailable(path) == {"A", "B"}
    with pytest.raises(UserError, match="cannot read the availability snapshot"):
        read_unavailable(tmp_path / "missing.txt")


@pytest.mark.skipif(not int8_supported(torch.device("cpu")), reason="no int8 product")
def test_unavailable_items_do_not_widen_the_int8_search(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unavailable item's product must not lift its block's ceiling: the search would
    take the block for a best one and lower its threshold (3x the exact re-scores)."""
    monkeypatch.setenv("STREAMREC_NATIVE", "0")  # the torch search, whose steps are visible
    recommender = plain(40_000)
    with torch.no_grad():  # no bias: the products alone decide, as in an untrained model
        recommender.network.item_bias.zero_()
    outputs = recommender.network.last_output(states_of(recommender, 64))
    catalogue = Int8Catalogue(recommender.network.item_output, recommender.network.item_bias)
    pristine = catalogue.quantized_t.clone()
    candidates: list[int] = []
    counting = ranking._best_per_row

    def count(row, column, score, rows, k):  # type: ignore[no-untyped-def]
        candidates.append(len(row))
        return counting(row, column, score, rows, k)

    monkeypatch.setattr(ranking, "_best_per_row", count)
    catalogue.top_k(outputs, 20)
    gone = torch.randperm(40_000, generator=torch.Generator().manual_seed(3))[:4_000]
    catalogue.set_available(gone, False)
    items, _ = catalogue.top_k(outputs, 20)
    assert not torch.isin(items, gone).any()
    assert candidates[1] <= 1.2 * candidates[0], candidates
    catalogue.set_available(gone, True)
    assert torch.equal(catalogue.quantized_t, pristine)
