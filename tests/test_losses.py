"""The sampled losses against plain-Python versions of the formulas in model/losses.py.

Score matrix convention: row i's own target is column i; every other column of the row
(the other in-batch targets and the shared sampled items) is a negative.
"""

from __future__ import annotations

import math

import pytest
import torch

from model import losses

ScoreRows = list[list[float]]

SMALL: ScoreRows = [[1.0, -0.5, 0.3], [0.2, 0.8, -1.0]]
MEDIUM: ScoreRows = [[0.5, 1.5, -0.3, 0.0], [-1.2, 0.7, 0.7, 2.0], [0.1, -0.4, -2.5, 0.9]]


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def negatives(rows: ScoreRows, i: int) -> list[float]:
    return [s for j, s in enumerate(rows[i]) if j != i]


def softmax(values: list[float]) -> list[float]:
    top = max(values)
    e = [math.exp(v - top) for v in values]
    return [v / sum(e) for v in e]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def ref_cross_entropy(rows: ScoreRows) -> float:
    return mean([-(row[i] - math.log(sum(math.exp(s) for s in row))) for i, row in enumerate(rows)])


def ref_bpr(rows: ScoreRows) -> float:
    return mean(
        [
            mean([-math.log(sigmoid(rows[i][i] - n)) for n in negatives(rows, i)])
            for i in range(len(rows))
        ]
    )


def ref_top1(rows: ScoreRows) -> float:
    return mean(
        [
            mean([sigmoid(n - rows[i][i]) + sigmoid(n * n) for n in negatives(rows, i)])
            for i in range(len(rows))
        ]
    )


def ref_top1_max(rows: ScoreRows) -> float:
    out = []
    for i in range(len(rows)):
        neg = negatives(rows, i)
        weights = softmax(neg)
        out.append(
            sum(w * (sigmoid(n - rows[i][i]) + sigmoid(n * n)) for w, n in zip(weights, neg))
        )
    return mean(out)


def ref_bpr_max(rows: ScoreRows, bpreg: float) -> float:
    out = []
    for i in range(len(rows)):
        neg = negatives(rows, i)
        weights = softmax(neg)
        ranking = sum(w * sigmoid(rows[i][i] - n) for w, n in zip(weights, neg))
        regulariser = bpreg * sum(w * n * n for w, n in zip(weights, neg))
        out.append(-math.log(ranking) + regulariser)
    return mean(out)


REFERENCES = {
    "cross-entropy": ref_cross_entropy,
    "bpr": ref_bpr,
    "top1": ref_top1,
    "top1-max": ref_top1_max,
    "bpr-max": lambda rows: ref_bpr_max(rows, 1.0),
}
FUNCTIONS = {
    "cross-entropy": losses.cross_entropy,
    "bpr": losses.bpr,
    "top1": losses.top1,
    "top1-max": losses.top1_max,
    "bpr-max": lambda scores: losses.bpr_max(scores, 1.0),
}


def test_cross_entropy_worked_example() -> None:
    # row 0: -log(e^1 / (e^1 + e^-0.5 + e^0.3)); row 1: -log(e^0.8 / (e^0.2 + e^0.8 + e^-1))
    row0 = -1.0 + math.log(math.e + math.exp(-0.5) + math.exp(0.3))
    row1 = -0.8 + math.log(math.exp(0.2) + math.exp(0.8) + math.exp(-1.0))
    assert row0 == pytest.approx(0.54215, abs=1e-5)
    assert losses.cross_entropy(torch.tensor(SMALL, dtype=torch.float64)).item() == pytest.approx(
        (row0 + row1) / 2, rel=1e-12
    )


def test_bpr_worked_example() -> None:
    # row 0 negatives -0.5, 0.3 (target 1.0); row 1 negatives 0.2, -1.0 (target 0.8)
    row0 = (-math.log(sigmoid(1.5)) - math.log(sigmoid(0.7))) / 2
    row1 = (-math.log(sigmoid(0.6)) - math.log(sigmoid(1.8))) / 2
    assert losses.bpr(torch.tensor(SMALL, dtype=torch.float64)).item() == pytest.approx(
        (row0 + row1) / 2, rel=1e-12
    )


@pytest.mark.parametrize("rows", [SMALL, MEDIUM], ids=["2x3", "3x4"])
@pytest.mark.parametrize("name", list(REFERENCES))
def test_loss_matches_hand_computed_value(name: str, rows: ScoreRows) -> None:
    expected = REFERENCES[name](rows)
    for dtype, tolerance in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        value = FUNCTIONS[name](torch.tensor(rows, dtype=dtype))
        assert value.dim() == 0
        assert value.item() == pytest.approx(expected, rel=tolerance), (name, dtype)


@pytest.mark.parametrize("name", list(REFERENCES))
def test_make_loss_returns_the_named_loss(name: str) -> None:
    scores = torch.tensor(MEDIUM, dtype=torch.float64)
    assert losses.make_loss(name)(scores).item() == pytest.approx(
        REFERENCES[name](MEDIUM), rel=1e-12
    )


def test_make_loss_passes_bpreg_to_bpr_max() -> None:
    scores = torch.tensor(MEDIUM, dtype=torch.float64)
    for bpreg in (0.0, 0.5, 2.0):
        assert losses.make_loss("bpr-max", bpreg)(scores).item() == pytest.approx(
            ref_bpr_max(MEDIUM, bpreg), rel=1e-12
        )


def test_cross_entropy_gradient_is_softmax_minus_one_hot() -> None:
    scores = torch.tensor(MEDIUM, dtype=torch.float64, requires_grad=True)
    losses.cross_entropy(scores).backward()
    for i, row in enumerate(MEDIUM):
        probabilities = softmax(row)
        for j in range(len(row)):
            expected = (probabilities[j] - (1.0 if i == j else 0.0)) / len(MEDIUM)
            assert scores.grad[i, j].item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_target_column_is_the_diagonal() -> None:
    # moving the target's score up must lower every ranking loss
    low = torch.tensor(MEDIUM, dtype=torch.float64)
    high = low.clone()
    high.diagonal().add_(1.0)
    for name, function in FUNCTIONS.items():
        assert function(high).item() < function(low).item(), name


EXTREMES = {
    "target far above negatives": [[1e4, -1e4, -1e4], [-1e4, 1e4, -1e4]],
    "target far below negatives": [[-1e4, 1e4, 1e4], [1e4, -1e4, 1e4]],
    "all equal and large": [[1e4, 1e4, 1e4], [1e4, 1e4, 1e4]],
    "all equal and very negative": [[-1e4, -1e4, -1e4], [-1e4, -1e4, -1e4]],
    "mixed": [[1e4, -1e4, 0.0, 5e3], [-3e3, -1e4, 1e4, 0.0], [0.0, 1e4, -1e4, -5e3]],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(EXTREMES))
@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_losses_and_gradients_are_finite_for_extreme_scores(
    name: str, case: str, dtype: torch.dtype
) -> None:
    scores = torch.tensor(EXTREMES[case], dtype=dtype, requires_grad=True)
    loss = losses.make_loss(name)(scores)
    loss.backward()
    assert torch.isfinite(loss), f"{name} on {case}: loss {loss.item()}"
    assert torch.isfinite(scores.grad).all(), f"{name} on {case}: gradient {scores.grad}"
