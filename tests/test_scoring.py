"""stream.serving.scoring: the worker's batch computation, checked against the Recommender stepped
one click at a time (the offline path)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch

from model.config import GRU4RecConfig
from model.inference import Recommender
from model.synth import SynthSpec, generate
from model.train import train
from stream.kafka.wire import Click
from stream.serving.scoring import Outcome, SourcedClick, apply_clicks, rebuild_states
from stream.serving.state import RECENT_ITEMS, SessionState

TOP_N = 10
ATOL = 1e-5
UNKNOWN = "not-an-item"


@pytest.fixture(scope="module")
def recommender() -> Recommender:
    log = generate(SynthSpec(sessions=500, items=60, seed=1))
    rec, _ = train(log, GRU4RecConfig(layers=(8,), n_sample=16, n_epochs=1), seed=0, progress=False)
    return rec


@pytest.fixture(scope="module")
def items(recommender: Recommender) -> list[str]:
    return list(recommender.item_map.ids)


def sc(
    session: str, item: str, offset: int, time: float = 1000.0, partition: int = 0
) -> SourcedClick:
    return SourcedClick(Click(session, item, time), partition, offset)


def reference(
    rec: Recommender, history: Sequence[str], top_n: int = TOP_N
) -> tuple[np.ndarray, bool, tuple[str, ...], np.ndarray]:
    """Hidden state, started flag and top-N after ``history``, one Recommender.step per click."""
    hidden = rec.initial_states(1)
    started = False
    for item in history:
        index = rec.item_map.index_of(item)
        hidden = rec.step(hidden, torch.tensor([index]))
        started = started or index >= 0
    top, scores = rec.top_k(hidden, torch.tensor([started]), top_n)
    ids = rec.item_map.ids
    return (
        hidden[0].cpu().numpy(),
        started,
        tuple(ids[k] for k in top[0].tolist()),
        scores[0].cpu().numpy(),
    )


def assert_outcomes_equal(a: Outcome, b: Outcome) -> None:
    assert a.items == b.items
    np.testing.assert_allclose(a.scores, b.scores, atol=ATOL)
    assert (a.known_item, a.rebuilt) == (b.known_item, b.rebuilt)
    assert (a.state is None) == (b.state is None)
    if a.state is not None and b.state is not None:
        assert_states_equal(a.state, b.state)


def assert_states_equal(a: SessionState, b: SessionState, atol: float = ATOL) -> None:
    np.testing.assert_allclose(a.hidden, b.hidden, atol=atol)
    assert (
        a.recent_items,
        a.last_offset,
        a.last_time,
        a.started,
        a.model_version,
        a.partition,
    ) == (b.recent_items, b.last_offset, b.last_time, b.started, b.model_version, b.partition)


def run_batches(
    rec: Recommender,
    batches: Sequence[Sequence[SourcedClick]],
    stored: dict[str, SessionState | None] | None = None,
    top_n: int = TOP_N,
) -> tuple[list[Outcome], dict[str, SessionState | None]]:
    """Apply batches in turn, storing each non-duplicate state as the worker's table would."""
    table: dict[str, SessionState | None] = dict(stored or {})
    outcomes: list[Outcome] = []
    for batch in batches:
        wanted = {c.click.session_id: table.get(c.click.session_id) for c in batch}
        result = apply_clicks(rec, batch, wanted, top_n)
        assert len(result) == len(batch)
        for click, outcome in zip(batch, result):
            if outcome.state is not None:
                table[click.click.session_id] = outcome.state
        outcomes.extend(result)
    return outcomes, table


def test_same_batch_equals_separate_batches_equals_click_by_click(recommender, items) -> None:
    a1, a2, a3, b1, c1, c2 = items[0], items[5], items[9], items[3], items[7], items[7]
    clicks = [
        sc("A", a1, 1, 10.0),
        sc("B", b1, 2, 11.0),
        sc("A", a2, 3, 12.0),
        sc("C", c1, 4, 13.0),
        sc("A", a3, 5, 14.0),
        sc("C", c2, 6, 15.0),
    ]
    one_batch, _ = run_batches(recommender, [clicks])
    split, _ = run_batches(recommender, [clicks[:2], clicks[2:4], clicks[4:]])
    singles, _ = run_batches(recommender, [[c] for c in clicks])
    for x, y, z in zip(one_batch, split, singles):
        assert_outcomes_equal(x, y)
        assert_outcomes_equal(x, z)

    histories: dict[str, list[str]] = {}
    for click, outcome in zip(clicks, one_batch):
        history = histories.setdefault(click.click.session_id, [])
        history.append(click.click.item_id)
        hidden, started, top, scores = reference(recommender, history)
        assert outcome.state is not None
        np.testing.assert_allclose(outcome.state.hidden, hidden, atol=ATOL)
        assert outcome.state.started is started is True
        assert outcome.items == top
        np.testing.assert_allclose(outcome.scores, scores, atol=ATOL)
        assert outcome.state.recent_items == tuple(history)
        assert outcome.state.last_offset == click.offset
        assert outcome.state.model_version == recommender.version
        assert outcome.known_item and not outcome.rebuilt


def test_outcomes_are_in_input_order(recommender, items) -> None:
    clicks = [sc("A", items[1], 1), sc("A", items[2], 2), sc("B", items[3], 3)]
    outcomes = apply_clicks(recommender, clicks, {}, TOP_N)
    assert [o.state.last_offset for o in outcomes] == [1, 2, 3]  # type: ignore[union-attr]
    assert [o.state.recent_items for o in outcomes] == [  # type: ignore[union-attr]
        (items[1],),
        (items[1], items[2]),
        (items[3],),
    ]


def test_stored_dict_is_not_mutated(recommender, items) -> None:
    first, table = run_batches(recommender, [[sc("A", items[0], 1)]])
    stored = dict(table)
    apply_clicks(recommender, [sc("A", items[1], 2), sc("B", items[2], 3)], stored, TOP_N)
    assert stored == table and stored["A"] is first[0].state


def test_duplicate_offsets_change_nothing(recommender, items) -> None:
    _, table = run_batches(recommender, [[sc("A", items[0], 10, 50.0, partition=2)]])
    before = table["A"]
    assert before is not None
    stored = dict(table)
    outcomes = apply_clicks(
        recommender,
        [
            sc("A", items[4], 10, 60.0, partition=2),
            sc("A", items[5], 3, 70.0, partition=2),
            sc("B", items[6], 11, 80.0, partition=2),
        ],
        stored,
        TOP_N,
    )
    for duplicate in outcomes[:2]:
        assert duplicate == Outcome(None, (), (), False, False)
    assert outcomes[2].state is not None  # another session's click is still applied
    assert stored["A"] is before
    assert before.last_offset == 10 and before.recent_items == (items[0],)


def test_duplicate_after_newer_click_in_same_batch(recommender, items) -> None:
    # a replay of offset 5 that arrives after offset 6 was applied in the same batch
    outcomes = apply_clicks(
        recommender, [sc("A", items[0], 6), sc("A", items[1], 5), sc("A", items[0], 6)], {}, TOP_N
    )
    assert outcomes[0].state is not None
    assert outcomes[1].state is None and outcomes[2].state is None


def test_replayed_batch_is_idempotent(recommender, items) -> None:
    clicks = [sc("A", items[0], 1), sc("A", items[1], 2), sc("B", items[2], 3)]
    outcomes, table = run_batches(recommender, [clicks])
    again, table_after = run_batches(recommender, [clicks], stored=table)
    assert all(o.state is None for o in again)
    assert table_after == table


def test_stale_model_version_is_rebuilt_from_recent_items(recommender, items) -> None:
    history = (items[2], UNKNOWN, items[8], items[2])
    stale = SessionState(
        hidden=np.full(recommender.state_size, 7.0, np.float32),
        recent_items=history,
        last_offset=40,
        last_time=500.0,
        started=False,
        model_version="old-version",
        partition=1,
    )
    [outcome] = apply_clicks(
        recommender, [sc("A", items[11], 41, 600.0, partition=1)], {"A": stale}, TOP_N
    )
    assert outcome.rebuilt and outcome.known_item
    assert outcome.state is not None
    hidden, started, top, scores = reference(recommender, [*history, items[11]])
    np.testing.assert_allclose(outcome.state.hidden, hidden, atol=ATOL)
    assert outcome.state.started is started is True
    assert outcome.items == top
    np.testing.assert_allclose(outcome.scores, scores, atol=ATOL)
    assert outcome.state.model_version == recommender.version
    assert outcome.state.recent_items == (*history, items[11])
    assert (outcome.state.last_offset, outcome.state.last_time) == (41, 600.0)

    # the rebuilt part alone equals the state computed from scratch on the recent items
    rebuilt_hidden, rebuilt_started = rebuild_states(recommender, [history])
    ref_hidden, ref_started, _, _ = reference(recommender, history)
    np.testing.assert_allclose(rebuilt_hidden[0].cpu().numpy(), ref_hidden, atol=ATOL)
    assert bool(rebuilt_started[0]) is ref_started is True


def test_stale_state_mixed_with_current_states_in_one_wave(recommender, items) -> None:
    _, table = run_batches(recommender, [[sc("B", items[1], 1), sc("B", items[2], 2)]])
    stale = SessionState(
        hidden=np.zeros(recommender.state_size, np.float32),
        recent_items=(items[3], items[4]),
        last_offset=5,
        last_time=1.0,
        started=True,
        model_version="other",
        partition=0,
    )
    stored = {"A": stale, "B": table["B"]}
    outcomes = apply_clicks(
        recommender,
        [sc("B", items[6], 3), sc("A", items[5], 6), sc("C", items[7], 7), sc("A", items[1], 8)],
        stored,
        TOP_N,
    )
    expected = {
        0: [items[1], items[2], items[6]],
        1: [items[3], items[4], items[5]],
        2: [items[7]],
        3: [items[3], items[4], items[5], items[1]],
    }
    for k, history in expected.items():
        hidden, _, top, _ = reference(recommender, history)
        np.testing.assert_allclose(outcomes[k].state.hidden, hidden, atol=ATOL)  # type: ignore[union-attr]
        assert outcomes[k].items == top
    assert [o.rebuilt for o in outcomes] == [False, True, False, False]


def test_stale_state_with_only_unknown_items_stays_unstarted(recommender, items) -> None:
    stale = SessionState(
        hidden=np.ones(recommender.state_size, np.float32),
        recent_items=(UNKNOWN, "other-unknown"),
        last_offset=1,
        last_time=1.0,
        started=True,
        model_version="old",
        partition=0,
    )
    [outcome] = apply_clicks(recommender, [sc("A", "third-unknown", 2)], {"A": stale}, TOP_N)
    assert outcome.rebuilt and not outcome.known_item
    assert outcome.state is not None and outcome.state.started is False
    np.testing.assert_array_equal(outcome.state.hidden, np.zeros(recommender.state_size))
    assert outcome.items == reference(recommender, [])[2]


def test_unknown_item_leaves_hidden_unchanged(recommender, items) -> None:
    _, table = run_batches(recommender, [[sc("A", items[0], 1), sc("A", items[3], 2)]])
    before = table["A"]
    assert before is not None and before.started
    [outcome] = apply_clicks(recommender, [sc("A", UNKNOWN, 3, 2000.0)], {"A": before}, TOP_N)
    assert outcome.known_item is False and outcome.rebuilt is False
    assert outcome.state is not None
    np.testing.assert_array_equal(outcome.state.hidden, before.hidden)
    assert outcome.state.started is True
    assert outcome.state.recent_items == (items[0], items[3], UNKNOWN)
    assert outcome.state.last_offset == 3
    _, _, top, scores = reference(recommender, [items[0], items[3]])
    assert outcome.items == top
    np.testing.assert_allclose(outcome.scores, scores, atol=ATOL)


def test_session_with_only_unknown_clicks_gets_popularity(recommender) -> None:
    outcomes, table = run_batches(
        recommender, [[sc("A", UNKNOWN, 1)], [sc("A", "other-unknown", 2), sc("A", UNKNOWN, 3)]]
    )
    top, scores = recommender.top_k(recommender.initial_states(1), torch.tensor([False]), TOP_N)
    expected_items = tuple(recommender.item_map.ids[k] for k in top[0].tolist())
    peak = recommender.popularity.max()
    expected_scores = np.sort(recommender.popularity)[::-1][:TOP_N] / peak
    for outcome in outcomes:
        assert outcome.known_item is False
        assert outcome.state is not None and outcome.state.started is False
        np.testing.assert_array_equal(outcome.state.hidden, np.zeros(recommender.state_size))
        assert outcome.items == expected_items
        np.testing.assert_allclose(outcome.scores, expected_scores, rtol=1e-6)
    # the most popular item leads the list
    assert outcomes[0].items[0] == recommender.item_map.ids[int(np.argmax(recommender.popularity))]
    assert table["A"].recent_items == (UNKNOWN, "other-unknown", UNKNOWN)  # type: ignore[union-attr]


def test_first_known_click_after_unknown_ones_starts_the_session(recommender, items) -> None:
    outcomes, _ = run_batches(recommender, [[sc("A", UNKNOWN, 1), sc("A", items[4], 2)]])
    assert outcomes[0].state.started is False  # type: ignore[union-attr]
    assert outcomes[1].state.started is True  # type: ignore[union-attr]
    hidden, _, top, _ = reference(recommender, [UNKNOWN, items[4]])
    np.testing.assert_allclose(outcomes[1].state.hidden, hidden, atol=ATOL)  # type: ignore[union-attr]
    assert outcomes[1].items == top


def test_recent_items_keep_the_last_ones(recommender, items) -> None:
    history = [items[k % len(items)] for k in range(RECENT_ITEMS + 6)]
    clicks = [sc("A", item, offset) for offset, item in enumerate(history, start=1)]
    outcomes, table = run_batches(recommender, [clicks[:7], clicks[7:]])
    final = table["A"]
    assert final is not None
    assert final.recent_items == tuple(history[-RECENT_ITEMS:])
    for k, outcome in enumerate(outcomes):
        assert outcome.state.recent_items == tuple(history[: k + 1][-RECENT_ITEMS:])  # type: ignore[union-attr]
    # the state itself still reflects the whole session, not only the kept items
    hidden, _, _, _ = reference(recommender, history)
    np.testing.assert_allclose(final.hidden, hidden, atol=ATOL)


def test_last_time_is_the_max_event_time(recommender, items) -> None:
    clicks = [
        sc("A", items[0], 1, 100.0),
        sc("A", items[1], 2, 50.0),
        sc("A", items[2], 3, 200.0),
        sc("A", items[3], 4, 150.0),
    ]
    outcomes, _ = run_batches(recommender, [clicks[:2], clicks[2:]])
    assert [o.state.last_time for o in outcomes] == [100.0, 100.0, 200.0, 200.0]  # type: ignore[union-attr]


def test_partition_and_top_n(recommender, items) -> None:
    [outcome] = apply_clicks(recommender, [sc("A", items[0], 1, partition=5)], {}, 3)
    assert outcome.state is not None and outcome.state.partition == 5
    assert len(outcome.items) == len(outcome.scores) == 3
    assert list(outcome.scores) == sorted(outcome.scores, reverse=True)
    [everything] = apply_clicks(recommender, [sc("B", items[0], 2)], {}, 10_000)
    assert sorted(everything.items) == sorted(recommender.item_map.ids)


def test_empty_batch(recommender) -> None:
    assert apply_clicks(recommender, [], {}, TOP_N) == []


def test_rebuild_states_equals_stepping_one_by_one(recommender, items) -> None:
    histories = [
        [],
        [items[0]],
        [UNKNOWN],
        [UNKNOWN, items[1], "zz"],
        [items[k % len(items)] for k in range(3, 3 + RECENT_ITEMS)],
        [items[5], items[5], UNKNOWN, items[9]],
    ]
    hidden, started = rebuild_states(recommender, histories)
    assert hidden.shape == (len(histories), recommender.state_size)
    assert started.dtype == torch.bool and started.shape == (len(histories),)
    for row, history in enumerate(histories):
        ref_hidden, ref_started, _, _ = reference(recommender, history)
        np.testing.assert_allclose(hidden[row].cpu().numpy(), ref_hidden, atol=ATOL)
        assert bool(started[row]) is ref_started
    assert started.tolist() == [False, True, False, True, True, True]


def test_rebuild_states_of_nothing(recommender) -> None:
    hidden, started = rebuild_states(recommender, [])
    assert hidden.shape == (0, recommender.state_size) and started.shape == (0,)
