"""Next-item evaluation: tie handling, the evaluation loop on a hand-built scorer, and
GRU4Rec through RecommenderScorer against a slow per-session reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.data import ClickLog, ItemMap, sessions_log
from model.errors import UserError
from model.evaluate import RecommenderScorer, TopLists, evaluate, target_ranks
from model.inference import Recommender
from model.synth import SynthSpec, generate
from model.train import train
from stream.devtools.testing import TINY

# --- target_ranks ---------------------------------------------------------------------------

SCORES = torch.tensor(
    [
        [0.5, 0.9, 0.5, 0.1, 0.5],  # target 0: 1 above, tied with 2 others
        [0.1, 0.1, 0.3, 0.2, 0.0],  # target 1: 2 above, tied with 1 other
        [0.7, 0.2, 0.3, 0.1, 0.0],  # target 0: unique best
        [0.4, 0.4, 0.4, 0.4, 0.4],  # target 4: everything tied
        [0.9, 0.8, 0.7, 0.6, 0.5],  # target 4: unique worst
    ]
)
TARGETS = torch.tensor([0, 1, 0, 4, 4])


@pytest.mark.parametrize(
    ("ties", "expected"),
    [
        ("conservative", [4.0, 4.0, 1.0, 5.0, 5.0]),
        ("optimistic", [2.0, 3.0, 1.0, 1.0, 5.0]),
        ("median", [3.0, 3.5, 1.0, 3.0, 5.0]),
    ],
)
def test_target_ranks_under_each_tie_mode(ties: str, expected: list[float]) -> None:
    assert target_ranks(SCORES, TARGETS, ties).tolist() == expected


@pytest.mark.parametrize("ties", ["conservative", "optimistic", "median"])
def test_top_lists_rank_targets_as_their_dense_rows_do(ties: str) -> None:
    """Ranks counted from the lists alone equal those of the rows they stand for (every
    unlisted item at -inf): listed targets with ties among the lists, unlisted targets."""
    generator = torch.Generator().manual_seed(0)
    n_items, depth, rows = 50, 6, 200
    items = torch.stack([torch.randperm(n_items, generator=generator)[:depth] for _ in range(rows)])
    values = torch.randint(0, 4, (rows, depth), generator=generator).float()  # many ties
    lists = TopLists(items, values, n_items)
    listed = items[torch.arange(rows), torch.randint(0, depth, (rows,), generator=generator)]
    targets = torch.where(torch.arange(rows) % 3 == 0, torch.randint(0, n_items, (rows,)), listed)
    assert (lists.items != targets.unsqueeze(1)).all(dim=1).any()  # some targets unlisted
    assert torch.equal(
        target_ranks(lists, targets, ties), target_ranks(lists.dense(), targets, ties)
    )


# --- the evaluation loop on a hand-built scorer ---------------------------------------------

KNOWN = ["A", "B", "C", "D"]
# scores of (A, B, C, D) given the last known item clicked, or no known item yet
TABLE = {
    "A": [0.0, 3.0, 2.0, 1.0],  # B > C > D > A
    "B": [1.0, 0.0, 3.0, 2.0],  # C > D > A > B
    "C": [3.0, 2.0, 0.0, 1.0],  # A > B > D > C
    "D": [2.0, 2.0, 2.0, 0.0],  # A = B = C > D
    None: [1.0, 1.0, 1.0, 1.0],  # nothing known yet: all tied
}


class TableScorer:
    """A SessionScorer whose state is the last known item clicked."""

    def __init__(self) -> None:
        self.item_map = ItemMap(KNOWN)
        rows = [TABLE[i] for i in KNOWN] + [TABLE[None]]
        self.table = torch.tensor(rows)  # row -1 (the last) is "nothing known"
        self.advanced: list[list[int]] = []
        self.scored_rows = 0

    def start(self, n: int) -> np.ndarray:
        return np.full(n, -1, dtype=np.int64)

    def advance(self, states: np.ndarray, items: np.ndarray) -> np.ndarray:
        self.advanced.append([int(i) for i in items])
        return np.where(items >= 0, items, states)

    def score(self, states: np.ndarray, rows: np.ndarray) -> torch.Tensor:
        self.scored_rows += len(rows)
        return self.table[torch.from_numpy(states[rows])]


SESSIONS = {
    "s1": ["A", "B", "C"],  # A->B rank 1; B->C rank 1
    "s2": ["A", "D", "X", "B"],  # A->D rank 3; D->X unknown target, skipped;
    # X is unknown so the state stays D: D->B ties with A, C
    "s3": ["X", "C", "A"],  # nothing known -> C ties with all 4; C->A rank 1
    "s4": ["B"],  # no prediction
    "s5": ["C", "D"],  # C->D rank 3
}
# ranks of the 7 predictions, by hand, in the order above
HAND_RANKS = {
    "conservative": [1, 1, 3, 3, 4, 1, 3],
    "optimistic": [1, 1, 3, 1, 1, 1, 3],
    "median": [1, 1, 3, 2, 2.5, 1, 3],
}


def hand_log() -> ClickLog:
    return sessions_log(SESSIONS)


def metrics_from_ranks(ranks: list[float], ks: tuple[int, ...]) -> dict[str, float]:
    out: dict[str, float] = {}
    for k in ks:
        out[f"recall@{k}"] = sum(1 for r in ranks if r <= k) / len(ranks)
        out[f"mrr@{k}"] = sum(1 / r for r in ranks if r <= k) / len(ranks)
    return out


def test_conservative_metrics_by_hand() -> None:
    result = evaluate(TableScorer(), hand_log(), ks=(1, 3, 5))
    assert result.n_predictions == 7
    assert result.n_skipped_unknown == 1
    assert result.recall(1) == pytest.approx(3 / 7)
    assert result.mrr(1) == pytest.approx(3 / 7)
    assert result.recall(3) == pytest.approx(6 / 7)
    assert result.mrr(3) == pytest.approx((1 + 1 + 1 / 3 + 1 / 3 + 1 + 1 / 3) / 7)
    assert result.recall(5) == pytest.approx(1.0)
    assert result.mrr(5) == pytest.approx((3 + 1 + 1 / 4) / 7)


@pytest.mark.parametrize("ties", list(HAND_RANKS))
def test_metrics_match_hand_computed_ranks(ties: str) -> None:
    ks = (1, 2, 3, 4, 20)
    result = evaluate(TableScorer(), hand_log(), ks=ks, ties=ties).to_dict()
    expected = metrics_from_ranks(HAND_RANKS[ties], ks)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, rel=1e-9), key
    assert result["n_predictions"] == 7
    assert result["n_skipped_unknown"] == 1
    assert set(result) == set(expected) | {"n_predictions", "n_skipped_unknown"}


def test_unknown_items_are_passed_as_minus_one_and_never_scored() -> None:
    scorer = TableScorer()
    log = hand_log()
    evaluate(scorer, log, ks=(5,), sessions_per_batch=1)
    # with one session per batch, each session's clicks are the first column of its calls
    clicked = [row[0] for row in scorer.advanced]
    index = {item: k for k, item in enumerate(KNOWN)}
    expected = []
    for items in SESSIONS.values():
        expected += [index.get(item, -1) for item in items[:-1]]
    assert clicked == expected
    assert scorer.scored_rows == 7  # the skipped prediction is never scored


@pytest.mark.parametrize("per_batch", [1, 2, 3, 1000])
def test_session_batching_does_not_change_results(per_batch: int) -> None:
    reference = evaluate(TableScorer(), hand_log(), ks=(1, 3)).to_dict()
    assert (
        evaluate(TableScorer(), hand_log(), ks=(1, 3), sessions_per_batch=per_batch).to_dict()
        == reference
    )


def test_cutoffs_are_sorted_and_deduplicated() -> None:
    result = evaluate(TableScorer(), hand_log(), ks=[3, 1, 3])
    assert result.ks == (1, 3)


@pytest.mark.parametrize("ties", ["pessimistic", "", "Conservative"])
def test_invalid_tie_mode_is_a_user_error(ties: str) -> None:
    with pytest.raises(UserError, match="conservative"):
        evaluate(TableScorer(), hand_log(), ties=ties)


@pytest.mark.parametrize("ks", [[], [0], [5, -1]])
def test_invalid_cutoffs_are_a_user_error(ks: list[int]) -> None:
    with pytest.raises(UserError, match="cutoff"):
        evaluate(TableScorer(), hand_log(), ks=ks)


# --- GRU4Rec through RecommenderScorer ------------------------------------------------------


@pytest.fixture(scope="module")
def recommender() -> Recommender:
    log = generate(SynthSpec(sessions=300, items=50, seed=1))
    config = TINY
    model, _ = train(log, config, progress=False, device="cpu")
    return model


@pytest.fixture(scope="module")
def test_log() -> ClickLog:
    # items 31..80: the model knows 31..50, so known and unknown items are mixed
    return generate(SynthSpec(sessions=80, items=50, seed=9, item_offset=30))


def slow_reference(
    recommender: Recommender, log: ClickLog, ks: tuple[int, ...]
) -> dict[str, float]:
    """One session at a time, straight through Recommender.step / Recommender.scores."""
    hits = dict.fromkeys(ks, 0.0)
    reciprocal = dict.fromkeys(ks, 0.0)
    n_predictions = n_skipped = 0
    offsets = log.session_offsets()
    for start, end in zip(offsets[:-1], offsets[1:]):
        ids = [str(log.item_ids[i]) for i in log.items[start:end]]
        state = recommender.initial_states(1)
        started = False
        for position in range(len(ids) - 1):
            clicked = recommender.item_map.index_of(ids[position])
            if clicked >= 0:
                state = recommender.step(state, torch.tensor([clicked]))
                started = True
            target = recommender.item_map.index_of(ids[position + 1])
            if target < 0:
                n_skipped += 1
                continue
            scores = recommender.scores(state, torch.tensor([started]))[0].tolist()
            rank = sum(1 for s in scores if s >= scores[target])  # conservative
            n_predictions += 1
            for k in ks:
                if rank <= k:
                    hits[k] += 1
                    reciprocal[k] += 1 / rank
    out: dict[str, float] = {}
    for k in ks:
        out[f"recall@{k}"] = hits[k] / n_predictions
        out[f"mrr@{k}"] = reciprocal[k] / n_predictions
    out["n_predictions"] = n_predictions
    out["n_skipped_unknown"] = n_skipped
    return out


def test_recommender_scorer_is_repeatable(recommender: Recommender, test_log: ClickLog) -> None:
    first = evaluate(RecommenderScorer(recommender), test_log, ks=(1, 5, 20)).to_dict()
    second = evaluate(RecommenderScorer(recommender), test_log, ks=(1, 5, 20)).to_dict()
    assert first == second


def test_recommender_scorer_equals_slow_reference(
    recommender: Recommender, test_log: ClickLog
) -> None:
    ks = (1, 5, 20)
    result = evaluate(
        RecommenderScorer(recommender), test_log, ks=ks, sessions_per_batch=16
    ).to_dict()
    reference = slow_reference(recommender, test_log, ks)
    assert result["n_predictions"] == reference["n_predictions"] > 0
    assert result["n_skipped_unknown"] == reference["n_skipped_unknown"] > 0
    for key in reference:
        assert result[key] == pytest.approx(reference[key], rel=1e-9, abs=1e-12), key
