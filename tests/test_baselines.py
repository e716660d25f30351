"""POP, S-POP and Item-KNN on hand-built logs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model.baselines import ItemKNN, Pop, SessionPop, make_baseline
from model.data import ClickLog, sessions_log
from model.errors import UserError
from model.evaluate import evaluate


def log_of(sessions: dict[str, list[str]]) -> ClickLog:
    return sessions_log(sessions)


# training counts: A 4, C 3, B 2, D 1
TRAIN = log_of(
    {
        "t1": ["A", "B", "A", "C"],
        "t2": ["A", "B", "C"],
        "t3": ["C", "D"],
        "t4": ["A"],
    }
)


def ranking(scorer, states, row: int = 0) -> list[str]:  # noqa: ANN001
    """Item ids by decreasing score for one row (stable for equal scores)."""
    scores = scorer.score(states, np.array([row]))[0]
    order = sorted(range(len(scores)), key=lambda j: -float(scores[j]))
    return [scorer.item_map.ids[j] for j in order]


def indexes(scorer, ids: list[str]) -> np.ndarray:  # noqa: ANN001
    return np.array([scorer.item_map.index_of(i) for i in ids], dtype=np.int64)


def test_pop_ranks_by_training_counts() -> None:
    pop = Pop(TRAIN)
    assert sorted(pop.item_map.ids) == ["A", "B", "C", "D"]
    states = pop.start(2)
    states = pop.advance(states, indexes(pop, ["D", "B"]))
    scores = pop.score(states, np.array([0, 1]))
    assert scores.shape == (2, 4)
    counts = {"A": 4, "B": 2, "C": 3, "D": 1}
    for row in range(2):
        assert ranking(pop, states, row) == ["A", "C", "B", "D"]
        for item, count in counts.items():
            assert scores[row, pop.item_map.index_of(item)].item() == count


def test_pop_through_the_evaluation_loop() -> None:
    test = log_of({"x": ["D", "A", "D"], "y": ["B", "C"]})
    result = evaluate(Pop(TRAIN), test, ks=(1, 2, 4))
    # targets A (rank 1), D (rank 4), C (rank 2)
    assert result.n_predictions == 3
    assert result.recall(1) == pytest.approx(1 / 3)
    assert result.recall(2) == pytest.approx(2 / 3)
    assert result.mrr(4) == pytest.approx((1 + 1 / 4 + 1 / 2) / 3)


def test_spop_ranks_the_sessions_own_items_first() -> None:
    spop = SessionPop(TRAIN)
    states = spop.start(3)
    # row 0 clicks D, D, B; row 1 clicks B then an unknown item twice; row 2 only unknowns
    states = spop.advance(states, indexes(spop, ["D", "B", "Z"]))
    states = spop.advance(states, indexes(spop, ["D", "Z", "Z"]))
    states = spop.advance(states, indexes(spop, ["B", "Z", "Z"]))
    # row 0: D twice, B once; then training popularity for the rest (A 4 > C 3)
    assert ranking(spop, states, 0) == ["D", "B", "A", "C"]
    # row 1: B once (the unknown click changed nothing), then A > C > D
    assert ranking(spop, states, 1) == ["B", "A", "C", "D"]
    # row 2: nothing known clicked: plain popularity
    assert ranking(spop, states, 2) == ["A", "C", "B", "D"]


def test_spop_one_session_click_beats_any_popularity() -> None:
    spop = SessionPop(TRAIN)
    states = spop.advance(spop.start(1), indexes(spop, ["D"]))  # D is the least popular
    scores = spop.score(states, np.array([0]))[0]
    d = spop.item_map.index_of("D")
    assert int(scores.argmax()) == d and (scores < scores[d]).sum() == 3


def test_spop_sessions_do_not_share_counts() -> None:
    spop = SessionPop(TRAIN)
    states = spop.start(2)
    states = spop.advance(states, indexes(spop, ["D", "B"]))
    assert ranking(spop, states, 0)[0] == "D"
    assert ranking(spop, states, 1)[0] == "B"
    fresh = spop.start(1)
    assert ranking(spop, fresh, 0) == ["A", "C", "B", "D"]


# --- Item-KNN -------------------------------------------------------------------------------

# sessions containing each item: A 2, B 3, C 1, D 1 (A twice in k1 counts once);
# co-occurrence: A-B 2, A-C 1, B-C 1, B-D 1, A-D 0, C-D 0
KNN_TRAIN = log_of(
    {
        "k1": ["A", "B", "A", "C"],
        "k2": ["A", "B"],
        "k3": ["B", "D"],
    }
)
N = {"A": 2, "B": 3, "C": 1, "D": 1}
CO = {frozenset("AB"): 2, frozenset("AC"): 1, frozenset("BC"): 1, frozenset("BD"): 1}


def hand_similarity(i: str, j: str, lam: float = 20.0, alpha: float = 0.5) -> float:
    if i == j:
        return 0.0
    co = CO.get(frozenset((i, j)), 0)
    return co / ((N[i] + lam) ** alpha * (N[j] + lam) ** (1 - alpha))


def test_itemknn_similarity_matches_the_formula() -> None:
    knn = ItemKNN(KNN_TRAIN)
    assert hand_similarity("A", "B") == pytest.approx(2 / math.sqrt(22 * 23))
    for last in "ABCD":
        states = knn.advance(knn.start(1), indexes(knn, [last]))
        scores = knn.score(states, np.array([0]))[0]
        for other in "ABCD":
            assert scores[knn.item_map.index_of(other)].item() == pytest.approx(
                hand_similarity(last, other), rel=1e-6, abs=1e-9
            ), (last, other)


def test_itemknn_uses_the_last_known_item() -> None:
    knn = ItemKNN(KNN_TRAIN)
    states = knn.start(2)
    states = knn.advance(states, indexes(knn, ["A", "C"]))
    states = knn.advance(states, indexes(knn, ["D", "Z"]))  # row 1: unknown, stays at C
    scores = knn.score(states, np.array([0, 1]))
    for row, last in ((0, "D"), (1, "C")):
        for other in "ABCD":
            assert scores[row, knn.item_map.index_of(other)].item() == pytest.approx(
                hand_similarity(last, other), rel=1e-6, abs=1e-9
            )
    # no known item yet: nothing to say, all zero
    assert torch.count_nonzero(knn.score(knn.start(1), np.array([0]))) == 0


def test_itemknn_keeps_only_the_strongest_neighbours() -> None:
    knn = ItemKNN(KNN_TRAIN, neighbours=1)
    states = knn.advance(knn.start(1), indexes(knn, ["B"]))
    scores = knn.score(states, np.array([0]))[0]
    # B's neighbours: A 2/sqrt(23*22) > C = D 1/sqrt(23*21): only A survives
    assert torch.count_nonzero(scores) == 1
    assert scores[knn.item_map.index_of("A")].item() == pytest.approx(
        hand_similarity("B", "A"), rel=1e-6
    )


def test_make_baseline() -> None:
    assert isinstance(make_baseline("pop", TRAIN), Pop)
    assert isinstance(make_baseline("spop", TRAIN), SessionPop)
    assert isinstance(make_baseline("itemknn", TRAIN), ItemKNN)
    with pytest.raises(UserError, match="itemknn"):
        make_baseline("knn", TRAIN)
