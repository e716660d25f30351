"""Adagrad with momentum: hand-computed updates, row updates touch only their rows."""

from __future__ import annotations

import math

import pytest
import torch

from model.optim import EPSILON, AdagradMomentum, FlatParameters


def reference(param: list[float], grads: list[list[float]], lr: float, mu: float,
              nesterov: bool) -> list[float]:
    """The update rule in plain Python, step by step."""
    p = list(param)
    acc = [0.0] * len(p)
    velocity = [0.0] * len(p)
    for grad in grads:
        for k, g in enumerate(grad):
            acc[k] += g * g
            scaled = g / math.sqrt(acc[k] + EPSILON)
            velocity[k] = mu * velocity[k] - lr * scaled
            p[k] += mu * velocity[k] - lr * scaled if nesterov else velocity[k]
    return p


GRADS = [[0.5, -1.0, 0.0], [0.25, 2.0, -0.5], [-1.0, 0.1, 0.3]]


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("mu", [0.0, 0.2])
def test_flat_update_matches_the_rule(nesterov: bool, mu: float) -> None:
    param = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    flat = FlatParameters([param])
    optimizer = AdagradMomentum(lr=0.2, momentum=mu, nesterov=nesterov)
    for grad in GRADS:
        flat.grads[0].copy_(torch.tensor(grad))
        optimizer.step_flat(flat)
    expected = reference([1.0, 2.0, 3.0], GRADS, 0.2, mu, nesterov)
    assert param.detach().tolist() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("nesterov", [False, True])
def test_row_updates_follow_the_rule_and_leave_other_rows_alone(nesterov: bool) -> None:
    table = torch.nn.Parameter(torch.arange(12, dtype=torch.float32).reshape(4, 3))
    before = table.detach().clone()
    optimizer = AdagradMomentum(lr=0.2, momentum=0.2, nesterov=nesterov)
    rows = torch.tensor([1, 3])
    for grad in GRADS:
        optimizer.step_rows(table, rows, torch.tensor([grad, [2 * g for g in grad]]))
    for row, scale in ((1, 1.0), (3, 2.0)):
        expected = reference(before[row].tolist(), [[scale * g for g in grad] for grad in GRADS],
                             0.2, 0.2, nesterov)
        assert table[row].tolist() == pytest.approx(expected, rel=1e-5)
    assert torch.equal(table[[0, 2]], before[[0, 2]])


def test_flat_parameters_are_views_of_one_vector() -> None:
    a = torch.nn.Parameter(torch.ones(2, 3))
    b = torch.nn.Parameter(torch.zeros(4))
    flat = FlatParameters([a, b])
    flat.values.add_(1.0)
    assert torch.equal(a.detach(), torch.full((2, 3), 2.0))
    assert torch.equal(b.detach(), torch.ones(4))
    flat.grads[1].fill_(5.0)
    assert flat.grad[-4:].tolist() == [5.0] * 4
