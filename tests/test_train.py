"""Session-parallel mini-batches and the training loop (on tiny logs: seconds in total)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model.config import LOSSES, GRU4RecConfig
from model.data import ClickLog
from model.errors import UserError
from model.synth import SynthSpec, generate
from model.train import Batch, session_parallel_batches, train
from stream.devtools.testing import TINY

# --- session-parallel mini-batches ----------------------------------------------------------

LENGTHS = [3, 1, 5, 2, 1, 4, 2, 6, 2, 1, 3]


def layout(lengths: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Items with a distinct value per event (1000 + position), and session bounds."""
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    items = np.arange(offsets[-1], dtype=np.int64) + 1000
    return items, offsets[:-1], offsets[1:]


def replay(batches: list[Batch]) -> tuple[list[list[tuple[int, int]]], list[int]]:
    """Follow the slots as the Batch docstring says: keep rows, then reset flagged rows.

    Returns the (input, target) pairs of each run between resets, in the order the runs
    began, and the batch sizes.
    """
    runs: list[list[tuple[int, int]]] = []
    slots: list[int] = []  # index into runs, per row of the current state
    sizes = []
    for step, batch in enumerate(batches):
        n = len(batch.inputs)
        sizes.append(n)
        assert len(batch.targets) == n and len(batch.reset) == n
        if step == 0:
            assert batch.keep is None, "the first step has no state to keep"
            assert batch.reset.all(), "the first step starts a session in every slot"
            slots = [-1] * n
        elif batch.keep is not None:
            keep = list(batch.keep)
            assert keep == sorted(set(keep)) and all(0 <= k < len(slots) for k in keep)
            slots = [slots[k] for k in keep]
        assert len(slots) == n, "state rows and batch rows disagree"
        for row in range(n):
            if batch.reset[row]:
                runs.append([])
                slots[row] = len(runs) - 1
            runs[slots[row]].append((int(batch.inputs[row]), int(batch.targets[row])))
    return runs, sizes


def expected_pairs(
    items: np.ndarray, starts: np.ndarray, ends: np.ndarray
) -> list[list[tuple[int, int]]]:
    return [
        [(int(items[k]), int(items[k + 1])) for k in range(s, e - 1)]
        for s, e in zip(starts, ends)
        if e - s >= 2
    ]


def test_every_session_is_replayed_once_in_order_with_resets_at_session_starts() -> None:
    items, starts, ends = layout(LENGTHS)
    batches = list(session_parallel_batches(items, starts, ends, batch_size=3))
    runs, sizes = replay(batches)
    expected = expected_pairs(items, starts, ends)
    # each run between two resets of a slot is exactly one whole session, consecutive pairs
    # in order, and sessions start in their given order; length-1 sessions never appear
    assert runs == expected
    assert sum(sizes) == sum(n - 1 for n in LENGTHS) == sum(len(r) for r in runs)
    assert max(sizes) == 3


def test_batch_shrinks_at_the_end_instead_of_dropping_events() -> None:
    items, starts, ends = layout(LENGTHS)
    batches = list(session_parallel_batches(items, starts, ends, batch_size=3))
    sizes = [len(b.inputs) for b in batches]
    assert sizes == sorted(sizes, reverse=True), "the batch only ever shrinks"
    assert sizes[-1] < 3, "the tail of the epoch is trained with fewer slots"
    # the last session (length 3) and the long one (length 6) are fully covered
    pairs = {(int(i), int(t)) for b in batches for i, t in zip(b.inputs, b.targets)}
    for run in expected_pairs(items, starts, ends):
        assert set(run) <= pairs
    # full batches as long as there are sessions left to start
    n_usable = sum(1 for n in LENGTHS if n >= 2)
    started = 0
    for batch in batches:
        if started < n_usable:
            assert len(batch.inputs) == 3
        started += int(batch.reset.sum())


@pytest.mark.parametrize("batch_size", [1, 2, 3, 4, 50])
@pytest.mark.parametrize(
    "lengths", [LENGTHS, [2], [1, 1, 2, 1], [7, 2, 2, 2, 2, 2, 2], [2, 2, 2, 9]]
)
def test_replay_holds_for_any_batch_size(lengths: list[int], batch_size: int) -> None:
    items, starts, ends = layout(lengths)
    runs, sizes = replay(list(session_parallel_batches(items, starts, ends, batch_size)))
    assert runs == expected_pairs(items, starts, ends)
    assert max(sizes) == min(batch_size, sum(1 for n in lengths if n >= 2))


def test_no_usable_session_gives_no_batch() -> None:
    items, starts, ends = layout([1, 1, 1])
    assert list(session_parallel_batches(items, starts, ends, 3)) == []


# --- training -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_log() -> ClickLog:
    return generate(SynthSpec(sessions=300, items=50, seed=1))


def weights(recommender) -> dict[str, torch.Tensor]:  # noqa: ANN001
    return {k: v.detach().cpu().clone() for k, v in recommender.network.state_dict().items()}


def assert_finite(recommender) -> None:  # noqa: ANN001
    for name, tensor in recommender.network.state_dict().items():
        assert torch.isfinite(tensor).all(), f"{name} has non-finite values"


def test_training_is_deterministic_for_a_seed(tiny_log: ClickLog) -> None:
    first, stats1 = train(tiny_log, TINY, seed=5, progress=False, device="cpu")
    second, stats2 = train(tiny_log, TINY, seed=5, progress=False, device="cpu")
    other, _ = train(tiny_log, TINY, seed=6, progress=False, device="cpu")
    w1, w2, w3 = weights(first), weights(second), weights(other)
    assert w1.keys() == w2.keys()
    for name in w1:
        assert torch.equal(w1[name], w2[name]), f"{name} differs between identical runs"
    assert stats1.epoch_losses == stats2.epoch_losses
    assert first.item_map.ids == second.item_map.ids
    assert any(not torch.equal(w1[name], w3[name]) for name in w1), (
        "a different seed should give different weights"
    )


def test_train_stats_and_model_shape(tiny_log: ClickLog) -> None:
    recommender, stats = train(tiny_log, TINY.replace(n_epochs=2), progress=False, device="cpu")
    assert stats.epochs == 2 and len(stats.epoch_losses) == 2
    assert stats.final_loss == stats.epoch_losses[-1]
    assert stats.n_events == len(tiny_log)
    assert stats.events_per_s > 0 and stats.train_seconds > 0
    assert sorted(recommender.item_map.ids) == sorted(tiny_log.item_ids)
    n = len(recommender.item_map)
    assert recommender.network.item_output.shape == (n, 16)
    counts = np.bincount(tiny_log.item_indexes(recommender.item_map), minlength=n)
    np.testing.assert_array_equal(recommender.popularity, counts)
    assert_finite(recommender)


@pytest.mark.parametrize("loss", LOSSES)
def test_every_loss_trains_without_nan(tiny_log: ClickLog, loss: str) -> None:
    recommender, stats = train(tiny_log, TINY.replace(loss=loss), progress=False, device="cpu")
    assert all(math.isfinite(x) for x in stats.epoch_losses)
    assert_finite(recommender)


@pytest.mark.parametrize(
    ("embedding", "input_width"), [(0, 3 * 16), (8, 8)], ids=["one-hot", "separate-embedding"]
)
def test_untied_input_modes_train(tiny_log: ClickLog, embedding: int, input_width: int) -> None:
    config = TINY.replace(constrained_embedding=False, embedding=embedding)
    recommender, stats = train(tiny_log, config, progress=False, device="cpu")
    network = recommender.network
    assert network.item_input is not None
    assert network.item_input.shape == (len(recommender.item_map), input_width)
    assert math.isfinite(stats.final_loss)
    assert_finite(recommender)
    states = recommender.step(recommender.initial_states(2), torch.tensor([0, 1]))
    scores = recommender.scores(states, torch.tensor([True, True]))
    assert scores.shape == (2, len(recommender.item_map))
    assert torch.isfinite(scores).all()


def test_two_layers_train(tiny_log: ClickLog) -> None:
    recommender, stats = train(tiny_log, TINY.replace(layers=(16, 8)), progress=False, device="cpu")
    assert recommender.state_size == 24
    assert math.isfinite(stats.final_loss)
    assert_finite(recommender)


def test_warm_start_keeps_base_indexes_and_appends_new_items(tiny_log: ClickLog) -> None:
    base, _ = train(tiny_log, TINY, progress=False, device="cpu")
    base_ids = list(base.item_map.ids)
    base_weights = weights(base)
    base_popularity = base.popularity.copy()
    # items 26..75: half known to the base, half new
    log2 = generate(SynthSpec(sessions=150, items=50, seed=2, item_offset=25))
    new_ids = [i for i in log2.item_ids if i not in base.item_map]
    assert new_ids, "the second log must bring new items"

    # a learning rate so small that one epoch cannot move a weight by 1e-6 (and a fresh
    # optimizer state: a resumed one would carry the base's momentum)
    warm, _ = train(
        log2,
        TINY.replace(learning_rate=1e-12),
        base=base,
        progress=False,
        device="cpu",
        resume_optimizer=False,
    )

    n_base = len(base_ids)
    assert warm.item_map.ids[:n_base] == base_ids
    assert warm.item_map.ids[n_base:] == new_ids
    assert warm.network.item_output.shape == (n_base + len(new_ids), 16)
    # old rows carried over (and barely trained), new rows freshly initialised
    torch.testing.assert_close(
        warm.network.item_output[:n_base].detach().cpu(),
        base_weights["item_output"],
        atol=1e-6,
        rtol=0,
    )
    torch.testing.assert_close(
        warm.network.item_bias[:n_base].detach().cpu(), base_weights["item_bias"], atol=1e-6, rtol=0
    )
    new_rows = warm.network.item_output[n_base:].detach()
    assert torch.isfinite(new_rows).all() and (new_rows.abs().sum(dim=1) > 0).all()
    for name, value in weights(warm).items():
        if name not in ("item_output", "item_bias"):
            torch.testing.assert_close(value, base_weights[name], atol=1e-6, rtol=0)
    # popularity: the base's counts plus the new log's
    counts = np.bincount(log2.item_indexes(warm.item_map), minlength=len(warm.item_map))
    expected = counts.astype(np.float64)
    expected[:n_base] += base_popularity
    np.testing.assert_array_equal(warm.popularity, expected)
    # the base is left untouched
    assert base.item_map.ids == base_ids and len(base.item_map) == n_base
    for name, value in weights(base).items():
        assert torch.equal(value, base_weights[name]), name
    np.testing.assert_array_equal(base.popularity, base_popularity)


def test_warm_start_actually_trains_from_the_base(tiny_log: ClickLog) -> None:
    base, _ = train(tiny_log, TINY, progress=False, device="cpu")
    warm, _ = train(tiny_log, TINY, base=base, progress=False, device="cpu")
    assert warm.item_map.ids == base.item_map.ids
    assert not torch.equal(warm.network.item_output, base.network.item_output)
    # continuing from the base lands nearer to it than a fresh run from scratch does
    fresh, _ = train(tiny_log, TINY, seed=1, progress=False, device="cpu")
    to_warm = (warm.network.hidden_weights[0] - base.network.hidden_weights[0]).norm()
    to_fresh = (fresh.network.hidden_weights[0] - base.network.hidden_weights[0]).norm()
    assert to_warm < to_fresh


# No dropout and in-batch negatives only: training draws no random number, so a resumed
# run can be compared with an uninterrupted one exactly.
NO_RANDOM = TINY.replace(n_sample=0, dropout_p_hidden=0.0)


@pytest.mark.parametrize(
    "config",
    [
        NO_RANDOM,
        NO_RANDOM.replace(layers=(8, 4), constrained_embedding=False),
        NO_RANDOM.replace(nesterov=True),
    ],
    ids=["tied", "one-hot-two-layers", "nesterov"],
)
def test_resuming_the_optimizer_state_continues_training_exactly(
    tiny_log: ClickLog, config: GRU4RecConfig
) -> None:
    straight, _ = train(tiny_log, config.replace(n_epochs=2), progress=False, device="cpu")
    first, first_stats = train(tiny_log, config, progress=False, device="cpu")
    assert not first_stats.resumed_optimizer
    assert first.optimizer_state is not None
    assert set(first.optimizer_state) == set(dict(first.network.named_parameters()))
    resumed, stats = train(tiny_log, config, base=first, progress=False, device="cpu")
    assert stats.resumed_optimizer
    for name, value in weights(straight).items():
        torch.testing.assert_close(weights(resumed)[name], value, rtol=1e-4, atol=1e-5, msg=name)
    for name, value in straight.optimizer_state.items():
        torch.testing.assert_close(
            resumed.optimizer_state[name], value, rtol=1e-4, atol=1e-5, msg=name
        )
    # a fresh optimizer state takes other steps (the old behaviour)
    fresh, fresh_stats = train(
        tiny_log, config, base=first, progress=False, device="cpu", resume_optimizer=False
    )
    assert not fresh_stats.resumed_optimizer
    assert not torch.allclose(fresh.network.item_output, straight.network.item_output, atol=1e-3)


def test_a_resumed_state_grows_with_new_items(tiny_log: ClickLog) -> None:
    base, _ = train(tiny_log, TINY, progress=False, device="cpu")
    log2 = generate(SynthSpec(sessions=150, items=50, seed=2, item_offset=25))
    warm, stats = train(log2, TINY, base=base, progress=False, device="cpu")
    assert stats.resumed_optimizer
    n_base, width = base.n_items, 16
    for name in ("item_output", "item_bias"):
        old, new = base.optimizer_state[name], warm.optimizer_state[name]
        assert new.shape == (warm.n_items, old.shape[1])
        # accumulators only grow: old items kept theirs and added this run's squares
        cols = old.shape[1] // 2
        assert (new[:n_base, :cols] >= old[:, :cols]).all()
        # an old item the new log never used keeps its accumulator exactly
        unused = np.setdiff1d(np.arange(n_base), log2.item_indexes(warm.item_map))
        assert len(unused)
        torch.testing.assert_close(new[unused], old[unused], rtol=0, atol=0)
    # new items started from zero: their accumulators hold this run's squares only
    assert warm.optimizer_state["item_output"].shape == (warm.n_items, 2 * width)
    assert (warm.optimizer_state["item_output"][n_base:, :width] > 0).any()
    # the base's state is left untouched
    assert base.optimizer_state["item_output"].shape[0] == n_base


def test_warm_start_refuses_another_architecture(tiny_log: ClickLog) -> None:
    base, _ = train(tiny_log, TINY, progress=False, device="cpu")
    with pytest.raises(UserError, match="architecture"):
        train(tiny_log, TINY.replace(layers=(8,)), base=base, progress=False, device="cpu")


def test_log_without_a_two_click_session_is_refused() -> None:
    log = ClickLog.from_arrays(["a", "b"], ["1", "2"], [1, 2])
    with pytest.raises(UserError, match="two or more"):
        train(log, TINY, progress=False, device="cpu")


def test_fewer_usable_sessions_than_batch_slots_with_single_click_sessions() -> None:
    # 3 sessions of which only 2 can be trained on, batch_size 32: 2 slots, not 3
    log = ClickLog.from_arrays(
        ["a", "a", "b", "b", "c"], ["1", "2", "2", "3", "1"], [1, 2, 3, 4, 5]
    )
    recommender, stats = train(log, TINY, progress=False, device="cpu")
    assert math.isfinite(stats.final_loss)
    assert stats.n_events == 5
    assert_finite(recommender)


@pytest.mark.parametrize("loss", LOSSES)
def test_in_batch_negatives_only_trains(tiny_log: ClickLog, loss: str) -> None:
    # n_sample=0 is a valid setting (only the other targets of the batch are negatives);
    # the shrinking tail of the epoch must not turn the loss into NaN
    recommender, stats = train(
        tiny_log, TINY.replace(loss=loss, n_sample=0), progress=False, device="cpu"
    )
    assert all(math.isfinite(x) for x in stats.epoch_losses)
    assert_finite(recommender)
