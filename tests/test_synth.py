"""The synthetic generator's structure: what benchmarks and recall figures rely on."""

from __future__ import annotations

import numpy as np
import pytest

from model.data import ClickLog
from model.errors import UserError
from model.synth import SynthSpec, generate


def item_groups(log: ClickLog) -> list[int]:
    """Sizes of the groups of items linked by appearing in one session (union-find)."""
    parent = np.arange(int(log.items.max()) + 1)

    def root(item: int) -> int:
        while parent[item] != item:
            parent[item] = parent[parent[item]]
            item = int(parent[item])
        return item

    offsets = log.session_offsets()
    for first, end in zip(offsets[:-1], offsets[1:], strict=True):
        for item in log.items[first + 1 : end]:
            parent[root(int(item))] = root(int(log.items[first]))
    sizes = np.bincount([root(int(item)) for item in np.unique(log.items)])
    return sorted(sizes[sizes > 0].tolist(), reverse=True)


def test_sessions_stay_within_their_intent() -> None:
    """Without switches, sessions partition the catalogue into exactly ``intents`` groups
    of equal size: the cluster structure an approximate index is measured on."""
    log = generate(SynthSpec(sessions=6000, items=400, zipf=0.5, intents=8, switch=0.0, seed=2))
    assert item_groups(log) == [50] * 8


def test_one_intent_links_the_whole_catalogue() -> None:
    log = generate(SynthSpec(sessions=6000, items=400, zipf=0.5, seed=2))
    assert item_groups(log) == [400]


def test_switches_leave_most_transitions_within_an_intent() -> None:
    spec = SynthSpec(sessions=20_000, items=2000, intents=20, seed=4)
    log = generate(spec)
    # The documented dealing: popularity rank r (a seeded permutation) goes to r mod intents.
    ranks = np.random.default_rng(spec.seed).permutation(spec.items) + 1
    intent = ranks % spec.intents
    same_session = log.sessions[1:] == log.sessions[:-1]
    stays = (intent[log.items[1:]] == intent[log.items[:-1]])[same_session].mean()
    expected = 1 - (1 - spec.follow) * spec.switch * (1 - 1 / spec.intents)
    assert stays == pytest.approx(expected, abs=0.01)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"intents": 0}, "--intents must be in [1, --items]"),
        ({"intents": 101}, "--intents must be in [1, --items]"),
        ({"zipf": -1.0}, "--zipf must be >= 0"),
        ({"switch": 1.5}, "switch must be in [0, 1]"),
    ],
)
def test_invalid_shapes_are_refused(changes: dict, message: str) -> None:
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        SynthSpec(sessions=10, items=100, **changes)
