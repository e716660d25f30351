"""The online trainer: session buffer, replay sample, the fair gate, rounds, and Kafka."""

from __future__ import annotations

import argparse
import copy
import io
import json
import random
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from model.config import GRU4RecConfig
from model.data import ClickLog
from model.errors import UserError
from model.evaluate import RecommenderScorer, evaluate
from model.inference import Recommender
from model.synth import SynthSpec, generate
from model.train import train
from stream.cli import trainer as trainer_cli
from stream.devtools.testing import TINY, clicks_in_time_order, produce_clicks, produce_raw
from stream.event_time import WATERMARK_RANK
from stream.kafka.topics import ensure_topics
from stream.kafka.wire import Click
from stream.learning import buffer
from stream.learning import loop as loop_module
from stream.learning import settings as settings_module
from stream.learning.buffer import MAX_SESSION_CLICKS, SessionBuffer
from stream.learning.consumer import consume
from stream.learning.gate import gate
from stream.learning.loop import LearningLoop
from stream.learning.replay import ReplaySample, SessionPool
from stream.learning.settings import TrainerSettings
from stream.registry import ModelRegistry

FULL = generate(SynthSpec(sessions=2400, items=200, seed=1))
NEW_ITEMS = frozenset(str(i) for i in range(181, 201))  # unseen until the stream


def part(sessions: range, drop_items: frozenset[str] = frozenset()) -> ClickLog:
    """Sessions ``sessions`` of FULL, without the clicks on ``drop_items``."""
    item_ids = FULL.item_ids[FULL.items]
    keep = (
        (FULL.sessions >= sessions.start)
        & (FULL.sessions < sessions.stop)
        & ~np.isin(item_ids, list(drop_items))
    )
    return ClickLog.from_arrays(
        FULL.session_ids[FULL.sessions[keep]], item_ids[keep], FULL.times[keep]
    )


@pytest.fixture(scope="module")
def base() -> Recommender:
    recommender, _ = train(part(range(0, 1200), NEW_ITEMS), TINY, progress=False)
    return recommender


@pytest.fixture
def registry(tmp_path: Path, base: Recommender) -> ModelRegistry:
    registry = ModelRegistry(tmp_path / "reg")
    registry.publish(copy.deepcopy(base))
    return registry


def settings(**changes: Any) -> TrainerSettings:
    values: dict[str, Any] = dict(
        broker="127.0.0.1:9092",
        registry="unused",
        interval_s=1.0,
        min_sessions=200,
        holdout_sessions=100,
        session_timeout_s=1800.0,
        replay_sample=300,
        gate_margin=0.05,
        round_budget_s=0.0,
    )  # no budget
    return TrainerSettings(**{**values, **changes})


def unknown_to(model: Recommender) -> frozenset[str]:
    """The items of FULL that ``model`` does not know."""
    return frozenset(str(i) for i in FULL.item_ids) - set(model.item_map.ids)


def train_spy(monkeypatch: pytest.MonkeyPatch) -> list[ClickLog]:
    """The logs the loop's rounds train on, in order (training still happens)."""
    trained_on: list[ClickLog] = []

    def spy(log: ClickLog, config: GRU4RecConfig, **kwargs: Any) -> tuple[Recommender, Any]:
        trained_on.append(log)
        return train(log, config, **kwargs)

    monkeypatch.setattr(loop_module, "train", spy)
    return trained_on


def flush_clicks(after: float) -> list[Click]:
    """Single-click sessions an hour after ``after``, as many as it takes to move a
    partition's event time (one click alone is taken for an outlier): they complete every
    session before them and, single clicks, are never trained on."""
    return [Click(f"flush{k}", "1", after + 3600) for k in range(WATERMARK_RANK)]


def feed(loop: LearningLoop, log: ClickLog, extra: list[Click] | None = None) -> None:
    """Every click of ``log`` (and of ``extra``), then clicks an hour later that complete
    them all (synthetic gaps are ~30 s, so no session is cut by the 30 min timeout)."""
    clicks = sorted([*clicks_in_time_order(log), *(extra or [])], key=lambda c: c.timestamp)
    for click in [*clicks, *flush_clicks(clicks[-1].timestamp)]:
        loop.add(click)


def scrambled(recommender: Recommender, seed: int = 0) -> Recommender:
    """A deliberately broken copy: item output rows shuffled, so scores go to wrong items."""
    broken = copy.deepcopy(recommender)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        order = torch.randperm(broken.n_items, generator=generator)
        broken.network.item_output.copy_(broken.network.item_output[order])
        broken.network.item_bias.copy_(broken.network.item_bias[order])
    return broken


def click(session: str, time_s: float, item: str = "1") -> Click:
    return Click(session, item, time_s)


def tick(buffer: SessionBuffer, time_s: float, partition: int = 0) -> None:
    """Move ``partition``'s event time to ``time_s`` with single-click sessions (never
    counted as complete: they hold no transition)."""
    for k in range(WATERMARK_RANK):
        buffer.add(click(f"tick-{time_s}-{k}", time_s), partition)


# --- buffer and replay sample -------------------------------------------------------------


def test_a_session_completes_after_the_timeout_of_event_time() -> None:
    buffer = SessionBuffer(session_timeout_s=60, max_sessions=100, max_age_s=3600)
    buffer.add(click("a", 100))
    buffer.add(click("a", 130, "2"))
    buffer.add(click("single", 110))
    buffer.add(click("b", 150))
    buffer.add(click("b", 185, "3"))
    tick(buffer, 185)
    assert buffer.complete_count() == 0  # watermark 185: nothing idle for 60 s yet
    tick(buffer, 190)
    assert buffer.complete_count() == 1  # "a" (last 130); "single" has one click only
    tick(buffer, 245)
    assert buffer.complete_count() == 2  # and "b" (last 185) at exactly the timeout
    taken = buffer.take_complete()
    assert [list(s.items) for s in taken] == [["1", "2"], ["1", "3"]]  # oldest first
    # only the ticks at 190 and 245 are left; "single" was dropped with the complete ones
    assert len(buffer) == 2 * WATERMARK_RANK
    assert buffer.take_complete() == []


def test_completion_uses_the_watermark_of_the_session_s_own_partition() -> None:
    """A partition read ahead must not cut the sessions of a lagging one."""
    buffer = SessionBuffer(session_timeout_s=60, max_sessions=100, max_age_s=3600)
    buffer.add(click("lagging", 100), partition=0)
    buffer.add(click("lagging", 110), partition=0)
    buffer.add(click("ahead", 100), partition=1)
    buffer.add(click("ahead", 500), partition=1)
    buffer.add(click("ahead-2", 100), partition=1)
    buffer.add(click("ahead-2", 110), partition=1)
    tick(buffer, 500, partition=1)
    (taken,) = buffer.take_complete()
    assert taken.partition == 1 and taken.items[0] == "1" and taken.last_time == 110
    assert len(buffer) == 2 + WATERMARK_RANK  # "lagging", "ahead" and the ticks


def test_a_click_far_ahead_completes_no_session() -> None:
    """The trainer ends sessions by the workers' rule: a producer with a wrong clock (a
    valid click 23 h ahead) must not complete every session of its partition."""
    buffer = SessionBuffer(session_timeout_s=60, max_sessions=1000, max_age_s=3600)
    for k in range(100):
        buffer.add(click(f"live{k % 10}", 1000 + k, str(k)))
    buffer.add(click("skewed", 1099 + 23 * 3600))
    assert buffer.complete_count() == 0 and len(buffer) == 11  # none complete, none stale
    for k in range(100, 300):  # the partition's own clicks do move its event time
        buffer.add(click(f"later{k % 10}", 1000 + k))
    assert buffer.complete_count() == 10


def test_the_buffer_is_bounded_in_sessions_evicting_the_least_recently_active() -> None:
    buffer = SessionBuffer(session_timeout_s=60, max_sessions=3, max_age_s=3600)
    for session, t in (("a", 1), ("b", 2), ("c", 3), ("a", 4), ("d", 5)):
        buffer.add(click(session, t))
    assert len(buffer) == 3 and buffer.evicted == 1
    for k in range(WATERMARK_RANK):  # one session moves the event time: none evicted
        buffer.add(click("later", 1000 + k))
    assert {len(s.items) for s in buffer.take_complete()} == {2}  # "a" survived, "b" not


def test_the_buffer_is_bounded_in_age_and_clicks_per_session() -> None:
    buffer = SessionBuffer(session_timeout_s=60, max_sessions=100, max_age_s=600)
    buffer.add(click("old", 0))
    buffer.add(click("old", 10))
    for k in range(MAX_SESSION_CLICKS + 50):
        buffer.add(click("long", 100 + k, str(k)))
    tick(buffer, 700)
    (long_session,) = buffer.take_complete()
    assert buffer.stale == 1  # "old" waited more than 600 s of event time
    assert list(long_session.items) == [str(k) for k in range(50, MAX_SESSION_CLICKS + 50)]


def test_the_replay_sample_is_bounded_and_covers_old_sessions() -> None:
    sample = ReplaySample(capacity=50, rng=random.Random(0))
    offered = [buffer.BufferedSession() for _ in range(1000)]
    for k, session in enumerate(offered):
        session.add(click(str(k), float(k), str(k)))
    sample.offer(offered[:500])
    sample.offer(offered[500:])
    assert len(sample.sessions) == 50 and sample.seen == 1000
    kept = [int(s.items[0]) for s in sample.sessions]
    assert min(kept) < 500 < max(kept)  # uniform over all offered, not only the latest
    empty = ReplaySample(capacity=0, rng=random.Random(0))
    empty.offer(offered)
    assert empty.sessions == []


def test_the_replay_log_pool_is_bounded_and_draws_afresh_every_time() -> None:
    lengths = [1, 2, 5, 3, MAX_SESSION_CLICKS + 30] + [2] * 40
    ids, items, times = [], [], []
    for k, n in enumerate(lengths):
        ids += [f"s{k}"] * n
        items += [f"s{k}-{j}" for j in range(n)]
        times += [1000.0 * k + j for j in range(n)]
    log = ClickLog.from_arrays(ids, items, times)
    everything = SessionPool(log, max_sessions=1000, rng=random.Random(0))
    assert len(everything) == len(lengths) - 1  # the single-click session holds no transition
    drawn = everything.draw(1000)
    assert len(drawn) == len(everything)
    by_first = {s.items[-1].split("-")[0]: s for s in drawn}
    long = by_first["s4"]
    assert list(long.items) == [f"s4-{j}" for j in range(30, MAX_SESSION_CLICKS + 30)]
    assert list(long.times) == [4000.0 + j for j in range(30, MAX_SESSION_CLICKS + 30)]
    assert long.last_time == 4000.0 + MAX_SESSION_CLICKS + 29
    assert list(by_first["s2"].items) == [f"s2-{j}" for j in range(5)]
    bounded = SessionPool(log, max_sessions=10, rng=random.Random(0))
    assert len(bounded) == 10
    first, second = bounded.draw(4), bounded.draw(4)
    assert len(first) == len(second) == 4 and len({tuple(s.items) for s in first}) == 4
    assert [s.items for s in first] != [s.items for s in second]


# --- the gate -----------------------------------------------------------------------------


def test_the_gate_rejects_a_broken_candidate_and_passes_an_equal_one(base: Recommender) -> None:
    holdout = part(range(2200, 2400), NEW_ITEMS)
    broken = gate(base, scrambled(base), holdout, margin=0.02)
    assert not broken.passed
    assert broken.candidate_recall < broken.current_recall - 0.1, broken
    same = gate(base, base, holdout, margin=0.0)
    assert same.passed and same.candidate_recall == same.current_recall
    assert same.n_new_item_predictions == 0 and same.candidate_new_item_recall is None


def test_the_gate_compares_on_targets_the_current_model_knows(base: Recommender) -> None:
    """New items count separately: the candidate is neither helped by being able to rank
    them nor hurt by them being misses of the current model."""
    candidate, _ = train(part(range(1200, 1800)), TINY, base=base, progress=False)
    holdout = part(range(2200, 2400))
    result = gate(base, candidate, holdout, margin=0.05)
    current_only = evaluate(RecommenderScorer(base), holdout, ks=(20,))
    assert result.n_predictions == current_only.n_predictions
    assert result.current_recall == current_only.recall(20)
    targets = [
        holdout.item_ids[holdout.items[k + 1]]
        for k in range(len(holdout) - 1)
        if holdout.sessions[k] == holdout.sessions[k + 1]
    ]
    only_candidate = [t for t in targets if t not in base.item_map and t in candidate.item_map]
    assert result.n_new_item_predictions == len(only_candidate) > 0
    assert set(only_candidate) & NEW_ITEMS
    assert result.n_predictions == sum(t in base.item_map for t in targets)
    assert result.candidate_new_item_recall is not None


# --- rounds ---------------------------------------------------------------------------------


def test_a_round_grows_the_vocabulary_keeping_old_indexes_and_publishes(
    registry: ModelRegistry, base: Recommender
) -> None:
    first = registry.current_version()
    out = io.StringIO()
    loop = LearningLoop(settings(gate_margin=0.5), registry, out=out)
    feed(loop, part(range(1200, 1600)))
    decision = loop.round()
    assert decision["decision"] == "promoted", decision
    assert json.loads(out.getvalue().splitlines()[-1]) == decision
    published = registry.current()
    assert published.version == decision["version"] != first
    assert published.item_map.ids[: base.n_items] == base.item_map.ids
    added = set(published.item_map.ids[base.n_items :])
    # New ids come from the trained sessions (the holdout's are not trained on).
    assert added <= set(part(range(1200, 1600)).item_ids) - set(base.item_map.ids)
    assert added & NEW_ITEMS
    assert decision["new_items"] == published.n_items - base.n_items > 0
    assert decision["gate"]["n_new_item_predictions"] > 0
    assert decision["sessions"]["holdout"] == 100 and decision["sessions"]["replay"] == 0
    assert published.metadata["training"]["base_version"] == decision["base_version"] == first
    assert (published.popularity[: base.n_items] >= base.popularity).all()
    # The next round replays a sample of these sessions and trains from the new version.
    feed(loop, part(range(1600, 2000)))
    second = loop.round()
    assert second["base_version"] == published.version
    assert second["sessions"]["replay"] == 300


def test_a_round_resumes_the_optimizer_state_and_publishes_the_grown_one(
    registry: ModelRegistry, base: Recommender, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert base.optimizer_state is not None
    calls: list[tuple[Any, Any]] = []

    def spy(log: ClickLog, config: GRU4RecConfig, **kwargs: Any) -> tuple[Recommender, Any]:
        calls.append((config, kwargs["base"]))
        return train(log, config, **kwargs)

    monkeypatch.setattr(loop_module, "train", spy)
    loop = LearningLoop(settings(gate_margin=0.5, learning_rate=0.07), registry, out=io.StringIO())
    feed(loop, part(range(1200, 1600)))
    decision = loop.round()
    assert decision["decision"] == "promoted", decision
    assert decision["resumed_optimizer"] and decision["learning_rate"] == 0.07
    config, given_base = calls[0]
    assert config.learning_rate == 0.07 and config.n_epochs == loop.settings.epochs
    assert given_base.optimizer_state is not None  # loaded from the registry with the model
    published = registry.current(optimizer_state=True)
    assert published.metadata["training"]["resumed_optimizer"] is True
    state, old = published.optimizer_state, base.optimizer_state
    assert state is not None and state["item_output"].shape[0] == published.n_items
    # the known items' accumulators carried on; the new items' started from zero
    cols = base.network.item_output.shape[1]
    assert (state["item_output"][: base.n_items, :cols] >= old["item_output"][:, :cols]).all()
    assert published.n_items > base.n_items


def test_a_model_without_optimizer_state_is_fine_tuned_at_the_fresh_learning_rate(
    tmp_path: Path, base: Recommender, monkeypatch: pytest.MonkeyPatch
) -> None:
    stateless = copy.deepcopy(base)
    stateless.optimizer_state = None  # as an artifact of format 2
    registry = ModelRegistry(tmp_path / "reg")
    registry.publish(stateless)
    rates: list[float] = []

    def spy(log: ClickLog, config: GRU4RecConfig, **kwargs: Any) -> tuple[Recommender, Any]:
        rates.append(config.learning_rate)
        return train(log, config, **kwargs)

    monkeypatch.setattr(loop_module, "train", spy)
    loop = LearningLoop(
        settings(gate_margin=0.5, learning_rate=0.07, fresh_learning_rate=0.003),
        registry,
        out=io.StringIO(),
    )
    feed(loop, part(range(1200, 1600)))
    decision = loop.round()
    assert decision["decision"] == "promoted", decision
    assert not decision["resumed_optimizer"] and rates == [0.003]
    # the candidate now carries a state, so the next round resumes from it
    assert registry.current(optimizer_state=True).optimizer_state is not None


def test_a_round_replays_a_fresh_draw_of_the_replay_log(
    tmp_path: Path, registry: ModelRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    old_log = tmp_path / "old.tsv"
    old = part(range(0, 1200), NEW_ITEMS)
    order = np.argsort(old.sessions, kind="stable")
    old_log.write_text(
        "SessionId\tItemId\tTime\n"
        + "".join(
            f"{old.session_ids[old.sessions[k]]}\t{old.item_ids[old.items[k]]}\t{old.times[k]}\n"
            for k in order
        )
    )
    trained_on = train_spy(monkeypatch)
    loop = LearningLoop(
        settings(gate_margin=0.5, replay_log=str(old_log), replay_log_sample=150),
        registry,
        out=io.StringIO(),
    )
    feed(loop, part(range(1200, 1600)))
    first = loop.round()
    feed(loop, part(range(1600, 2000)))
    second = loop.round()
    for decision in (first, second):
        assert decision["decision"] in ("promoted", "rejected"), decision
        assert decision["sessions"]["replay_log"] == 150
    fresh_and_replay = [d["sessions"]["fresh"] + d["sessions"]["replay"] for d in (first, second)]
    assert [log.n_sessions for log in trained_on] == [n + 150 for n in fresh_and_replay]
    # each round draws its own old sessions: the earliest click times differ
    earliest = [sorted(log.times)[:20] for log in trained_on]
    assert min(earliest[0]) < min(FULL.times[FULL.sessions >= 1200])
    assert earliest[0] != earliest[1]


def test_a_round_within_its_budget_trains_the_newest_sessions_then_replay(
    registry: ModelRegistry, base: Recommender, monkeypatch: pytest.MonkeyPatch
) -> None:
    trained_on = train_spy(monkeypatch)
    loop = LearningLoop(
        settings(gate_margin=0.5, round_budget_s=2.0, epochs=2), registry, out=io.StringIO()
    )
    assert loop.budget_events() == int(2.0 * loop_module.PRIOR_THROUGHPUT / 2)
    feed(loop, part(range(1200, 1600)))
    first = loop.round()
    assert first["decision"] == "promoted", first
    assert first["budget"]["throughput"] is None  # nothing measured before this round
    assert loop.throughput is not None and loop.throughput > 0  # measured by it
    loop.throughput = 500.0  # clicks x epochs per second: 2 s x 500 / 2 epochs = 500 clicks
    assert loop.budget_events() == 500
    # known items only: the sessions compared below would lose their clicks on new items
    # the round holds back (too few clicks to join the catalogue)
    stream = part(range(1600, 2000), unknown_to(base))
    feed(loop, stream)
    second = loop.round()
    assert second["decision"] in ("promoted", "rejected"), second
    budget = second["budget"]
    assert budget["events"] == 500 and budget["seconds"] == 2.0 and budget["throughput"] == 500
    # What the round had: the stream's sessions of 2+ clicks by last click, the newest
    # 100 held out. Fresh ones first, newest first, up to 3/4 of the 500 clicks; then
    # replayed ones; then fresh ones again if room is left.
    offsets = stream.session_offsets()
    sessions = sorted(
        (tuple(stream.times[a:b]), tuple(stream.item_ids[stream.items[a:b]]))
        for a, b in zip(offsets[:-1], offsets[1:])
        if b - a >= 2
    )
    sessions.sort(key=lambda s: s[0][-1])
    fresh = sessions[:-100]
    log = trained_on[-1]
    offsets = log.session_offsets()
    trained = {
        (tuple(log.times[a:b]), tuple(log.item_ids[log.items[a:b]]))
        for a, b in zip(offsets[:-1], offsets[1:])
    }
    kept = second["sessions"]["fresh"]
    assert set(fresh[-kept:]) <= trained and not set(fresh[:-kept]) & trained  # the newest
    fresh_clicks = sum(len(s[0]) for s in fresh[-kept:])
    assert 500 * (1 - loop_module.REPLAY_SHARE) - 10 <= fresh_clicks <= 500
    replay_clicks = len(log) - fresh_clicks
    assert 500 * loop_module.REPLAY_SHARE - 10 <= replay_clicks and len(log) <= 500
    assert budget["fresh_left_out"] == len(fresh) - kept > 0
    assert budget["replay_left_out"] == 300 - second["sessions"]["replay"] > 200
    # left-out fresh sessions were still offered to the replay sample
    assert loop.replay.seen == 2 * 100 + first["sessions"]["fresh"] + len(fresh)


def test_no_budget_trains_everything(registry: ModelRegistry) -> None:
    unbounded = settings(round_budget_s=0.0)
    assert unbounded.budget_s is None
    assert settings(round_budget_s=None, interval_s=10.0).budget_s == pytest.approx(
        settings_module.DEFAULT_BUDGET_SHARE * 10.0
    )
    loop = LearningLoop(unbounded, registry, out=io.StringIO())
    assert loop.budget_events() is None
    feed(loop, part(range(1200, 1600)))
    decision = loop.round()
    assert "budget" not in decision
    with pytest.raises(UserError, match="--round-budget-s"):
        settings(round_budget_s=-1.0)
    with pytest.raises(UserError, match="--nice"):
        settings(nice=20)


def test_a_missing_replay_log_is_a_user_error(registry: ModelRegistry, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="nothing.tsv"):
        LearningLoop(
            settings(replay_log=str(tmp_path / "nothing.tsv")), registry, out=io.StringIO()
        )


def test_a_round_waits_for_enough_complete_sessions(registry: ModelRegistry) -> None:
    loop = LearningLoop(settings(), registry, out=io.StringIO())
    feed(loop, part(range(1200, 1250)))
    decision = loop.round()
    assert decision["decision"] == "wait" and decision["complete_sessions"] < 200
    assert loop.rounds == 0


def test_a_quiet_stream_trains_what_is_complete_without_waiting_for_min_sessions(
    registry: ModelRegistry,
) -> None:
    loop = LearningLoop(settings(min_sessions=500, gate_margin=0.5), registry, out=io.StringIO())
    feed(loop, part(range(1200, 1500)))  # ~300 complete sessions: fewer than 500
    waiting = loop.round()
    assert waiting["decision"] == "wait" and 100 < waiting["complete_sessions"] < 500
    again = loop.round()  # no click since: the stream is quiet
    assert again["decision"] == "promoted" and again["idle"], again
    assert again["sessions"]["fresh"] + again["sessions"]["holdout"] == waiting["complete_sessions"]
    assert loop.round()["decision"] == "wait"  # nothing left, and nothing new
    # a trickle of clicks is not quiet, and a holdout's worth is not enough to train on
    feed(loop, part(range(1500, 1560)))
    assert loop.round()["decision"] == "wait"
    assert loop.round()["decision"] == "wait"


def test_complete_sessions_with_new_items_call_for_a_round_only_if_it_would_learn_them(
    registry: ModelRegistry, base: Recommender
) -> None:
    unknown = unknown_to(base)
    assert NEW_ITEMS <= unknown
    loop = LearningLoop(settings(gate_margin=0.5), registry, out=io.StringIO())
    feed(loop, part(range(1200, 1600), unknown))
    assert loop.new_item_sessions() == 0  # enough complete sessions, but no new item
    loop.round()
    # Sessions with new items, but only a holdout's worth complete: a round would wait.
    stream = part(range(1600, 1700))
    offsets = stream.session_offsets()
    new_in_stream = sum(
        1
        for a, b in zip(offsets[:-1], offsets[1:])
        if b - a >= 2 and set(stream.item_ids[stream.items[a:b]]) & unknown
    )
    assert new_in_stream > 0
    feed(loop, stream)
    assert loop.new_item_sessions() == 0
    # More complete sessions: the oldest ones (those with new items among them) are no
    # longer held out, so a round would learn from them.
    feed(loop, part(range(1700, 1900), unknown))
    waiting = loop.new_item_sessions()
    assert 0 < waiting <= new_in_stream
    decision = loop.round(trigger="new_items", new_item_sessions=waiting)
    assert decision["decision"] == "promoted", decision
    assert decision["trigger"] == "new_items" and decision["new_item_sessions"] == waiting
    assert set(registry.current().item_map.ids) & unknown
    assert loop.new_item_sessions() == 0  # taken (and learnt)
    off = LearningLoop(
        settings(gate_margin=0.5, new_item_rounds=False), registry, out=io.StringIO()
    )
    feed(off, part(range(1900, 2300)))
    assert off.new_item_sessions() == 0
    assert off.round()["trigger"] == "clock"


def early_sessions(sessions: dict[str, list[str]], log: ClickLog) -> list[Click]:
    """Sessions ``{id: items}`` as clicks 30 s apart, ending before ``log`` starts: older
    than its holdout, so a round trains on them."""
    start = float(log.times.min()) - 600
    return [
        Click(session, item, start + 30 * k)
        for session, items in sessions.items()
        for k, item in enumerate(items)
    ]


def test_a_new_item_joins_the_catalogue_only_once_clicked_in_enough_sessions(
    registry: ModelRegistry, base: Recommender, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ids from a producer sending junk (each clicked once, or again and again in one
    session) stay out of the catalogue and call for no round; an item clicked in two
    sessions joins it. The junk sessions are still trained on, without those clicks."""
    unknown = unknown_to(base)
    a, b = base.item_map.ids[:2]
    stream = part(range(1200, 1600), unknown)
    junk = {f"junk-{k}": [a, f"junk{k}", b] for k in range(30)}
    extra = {**junk, "looping": [a, "bot", "bot", "bot", b]}
    extra.update({f"fan-{k}": [a, "hit", b] for k in range(3)})
    trained_on = train_spy(monkeypatch)
    loop = LearningLoop(settings(gate_margin=0.5), registry, out=io.StringIO())
    feed(loop, stream, early_sessions(extra, stream))
    waiting = loop.new_item_sessions()
    decision = loop.round()
    assert decision["decision"] == "promoted", decision
    published = registry.current()
    assert set(published.item_map.ids[base.n_items :]) == {"hit"}
    assert decision["new_items"] == 1 and decision["new_items_held_back"] == 31
    assert decision["catalogue_full"] is False
    (log,) = trained_on
    assert not {str(i) for i in log.item_ids} & ({"bot"} | {f"junk{k}" for k in range(30)})
    assert log.n_sessions == decision["sessions"]["fresh"]  # no session dropped
    assert waiting == 3  # the "hit" sessions only


@pytest.mark.parametrize(
    ("caps", "admitted", "full"),
    [
        ({"max_new_items_per_round": 2}, {"hot", "warm"}, False),
        ({"room": 1}, {"hot"}, True),
        ({"room": 0}, set(), True),
    ],
    ids=["per-round", "catalogue", "catalogue-full"],
)
def test_new_items_are_admitted_most_clicked_first_within_the_caps(
    caps: dict[str, int],
    admitted: set[str],
    full: bool,
    registry: ModelRegistry,
    base: Recommender,
) -> None:
    unknown = unknown_to(base)
    a, b = base.item_map.ids[:2]
    stream = part(range(1200, 1600), unknown)
    extra = {f"hot-{k}": [a, "hot", "hot", b] for k in range(3)}  # 6 clicks
    extra.update({f"warm-{k}": [a, "warm", "warm", b] for k in range(2)})  # 4
    extra.update({f"cool-{k}": [a, "cool", b] for k in range(2)})  # 2
    room = caps.pop("room", None)
    if room is not None:
        caps["max_items"] = base.n_items + room
    loop = LearningLoop(settings(gate_margin=0.5, **caps), registry, out=io.StringIO())
    feed(loop, stream, early_sessions(extra, stream))
    decision = loop.round()
    assert decision["decision"] == "promoted", decision
    assert set(registry.current().item_map.ids[base.n_items :]) == admitted
    assert decision["new_items"] == len(admitted)
    assert decision["new_items_held_back"] == 3 - len(admitted)
    assert decision["catalogue_full"] is full


def test_a_broken_candidate_is_rejected_and_never_published(
    registry: ModelRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = registry.current_version()

    def broken_train(*args: Any, **kwargs: Any) -> tuple[Recommender, Any]:
        candidate, stats = train(*args, **kwargs)
        return scrambled(candidate), stats

    monkeypatch.setattr(loop_module, "train", broken_train)
    loop = LearningLoop(settings(gate_margin=0.02), registry, out=io.StringIO())
    feed(loop, part(range(1200, 1600)))
    decision = loop.round()
    assert decision["decision"] == "rejected", decision
    assert "candidate Recall@20" in decision["reason"]
    assert registry.current_version() == before
    assert len(registry.list_versions()) == 1
    assert len(loop.replay.sessions) == 300  # the sessions are kept for later rounds


def test_a_candidate_is_not_published_over_a_pointer_moved_during_training(
    registry: ModelRegistry, base: Recommender, monkeypatch: pytest.MonkeyPatch
) -> None:
    def train_while_someone_publishes(*args: Any, **kwargs: Any) -> tuple[Recommender, Any]:
        registry.publish(copy.deepcopy(base))  # e.g. an operator's publish or rollback
        return train(*args, **kwargs)

    monkeypatch.setattr(loop_module, "train", train_while_someone_publishes)
    loop = LearningLoop(settings(gate_margin=0.5), registry, out=io.StringIO())
    feed(loop, part(range(1200, 1600)))
    decision = loop.round()
    moved_to = registry.current_version()
    assert decision["decision"] == "not_published" and "changed" in decision["reason"]
    assert moved_to.startswith("000002-") and len(registry.list_versions()) == 2


def test_cli_options_become_validated_settings() -> None:
    parser = argparse.ArgumentParser()
    trainer_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(
        [
            "trainer",
            "--broker",
            "kafka://h:9092",
            "--registry",
            "r",
            "--interval",
            "5",
            "--min-sessions",
            "50",
            "--holdout-sessions",
            "10",
            "--group",
            "g",
        ]
    )
    parsed = TrainerSettings.from_args(args, environ={})
    assert (parsed.interval_s, parsed.min_sessions, parsed.group) == (5.0, 50, "g")
    assert parsed.replay_sample == TrainerSettings.replay_sample
    with pytest.raises(UserError, match="--holdout-sessions"):
        settings(min_sessions=100, holdout_sessions=100)
    with pytest.raises(UserError, match="--interval must be a finite number"):
        settings(interval_s=float("nan"))
    with pytest.raises(UserError, match="--gate-margin"):
        settings(gate_margin=-0.1)
    with pytest.raises(UserError, match="--fresh-learning-rate"):
        settings(fresh_learning_rate=0.0)
    with pytest.raises(UserError, match="--replay-log-sample"):
        settings(replay_log_sample=-1)
    assert (parsed.learning_rate, parsed.fresh_learning_rate, parsed.replay_log) == (
        0.1,
        0.02,
        None,
    )
    args = parser.parse_args(
        [
            "trainer",
            "--broker",
            "kafka://h:9092",
            "--registry",
            "r",
            "--replay-log",
            "train.tsv",
            "--replay-log-sample",
            "10",
            "--fresh-learning-rate",
            "0.01",
        ]
    )
    parsed = TrainerSettings.from_args(args, environ={})
    assert (parsed.replay_log, parsed.replay_log_sample, parsed.fresh_learning_rate) == (
        "train.tsv",
        10,
        0.01,
    )
    assert parsed.new_item_rounds is True
    args = parser.parse_args(
        ["trainer", "--broker", "kafka://h:9092", "--registry", "r", "--no-new-item-rounds"]
    )
    assert TrainerSettings.from_args(args, environ={}).new_item_rounds is False
    with pytest.raises(UserError, match="bad broker URL"):
        settings(broker="http://x:1")


def test_catalogue_admission_options_become_validated_settings() -> None:
    parser = argparse.ArgumentParser()
    trainer_cli.add_parser(parser.add_subparsers())
    required = ["trainer", "--broker", "kafka://h:9092", "--registry", "r"]

    def admission(parsed: TrainerSettings) -> tuple[int, int, int, int]:
        return (
            parsed.admit_min_clicks,
            parsed.admit_min_sessions,
            parsed.max_new_items_per_round,
            parsed.max_items,
        )

    defaults = TrainerSettings.from_args(parser.parse_args(required), environ={})
    assert admission(defaults) == (2, 2, 10_000, 0)
    args = parser.parse_args(
        [
            *required,
            "--admit-min-clicks",
            "5",
            "--admit-min-sessions",
            "3",
            "--max-new-items-per-round",
            "50",
            "--max-items",
            "1000",
        ]
    )
    assert admission(TrainerSettings.from_args(args, environ={})) == (5, 3, 50, 1000)
    with pytest.raises(UserError, match="--admit-min-clicks"):
        settings(admit_min_clicks=0)
    with pytest.raises(UserError, match="--admit-min-sessions .* --admit-min-clicks"):
        settings(admit_min_clicks=2, admit_min_sessions=3)
    with pytest.raises(UserError, match="--max-new-items-per-round"):
        settings(max_new_items_per_round=0)
    with pytest.raises(UserError, match="--max-items"):
        settings(max_items=-1)


@pytest.mark.kafka
def test_the_trainer_learns_from_the_click_topic_and_publishes(
    kafka_bootstrap: str, topic_name: str, registry: ModelRegistry
) -> None:
    ensure_topics(kafka_bootstrap, {topic_name: 1})
    stream = part(range(1200, 1600))
    clicks = clicks_in_time_order(stream)
    produce_clicks(kafka_bootstrap, topic_name, [*clicks, *flush_clicks(clicks[-1].timestamp)])
    produce_raw(kafka_bootstrap, topic_name, [(b"x", b"not json")])
    config = settings(
        broker=kafka_bootstrap,
        registry=str(registry.root),
        input_topic=topic_name,
        group=f"{topic_name}-trainer",
        gate_margin=0.5,
        interval_s=0.5,
    )
    out = io.StringIO()
    loop = LearningLoop(config, registry, out=out)
    stop = threading.Event()
    worker = threading.Thread(target=consume, args=(config, loop, stop), daemon=True)
    worker.start()
    deadline = time.monotonic() + 60
    while registry.current_version().startswith("000001-") or loop.rejected_clicks == 0:
        assert time.monotonic() < deadline, out.getvalue()
        time.sleep(0.2)
    stop.set()
    worker.join(30)
    decisions = [json.loads(line) for line in out.getvalue().splitlines()]
    promoted = [d for d in decisions if d["decision"] == "promoted"]
    assert promoted and promoted[0]["version"] == registry.current_version()
    assert loop.rejected_clicks == 1  # the "not json" message, after every click
    assert promoted[0]["sessions"]["fresh"] + promoted[0]["sessions"]["holdout"] == sum(
        1
        for k in range(stream.n_sessions)
        if stream.session_offsets()[k + 1] - stream.session_offsets()[k] >= 2
    )


class TimedLoop(LearningLoop):
    """Rounds that only take time: ``durations`` seconds each, start times recorded."""

    def __init__(self, *args: Any, durations: list[float], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.durations = durations
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.lateness: list[float | None] = []

    def round(
        self, late_s: float | None = None, trigger: str = "clock", **started_for: Any
    ) -> dict[str, Any]:
        self.starts.append(time.monotonic())
        self.lateness.append(late_s)
        time.sleep(
            self.durations[len(self.starts) - 1] if len(self.starts) <= len(self.durations) else 0.0
        )
        self.ends.append(time.monotonic())
        return {"decision": "wait"}


@pytest.mark.kafka
def test_rounds_keep_a_fixed_clock_and_follow_an_overrun_at_once(
    kafka_bootstrap: str, topic_name: str, registry: ModelRegistry
) -> None:
    ensure_topics(kafka_bootstrap, {topic_name: 1})
    # Every bound below sits halfway between the scheduling rule and the nearest wrong
    # one, so a machine that runs late by up to ~0.5 s still tells them apart.
    interval = 2.0
    slack = 0.5
    config = settings(
        broker=kafka_bootstrap,
        registry=str(registry.root),
        input_topic=topic_name,
        group=f"{topic_name}-trainer",
        interval_s=interval,
    )
    loop = TimedLoop(config, registry, out=io.StringIO(), durations=[1.0, 1.0, 3.2, 0.2, 0.2])
    stop = threading.Event()
    thread = threading.Thread(target=consume, args=(config, loop, stop), daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while len(loop.ends) < 5:
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.05)
    stop.set()
    thread.join(30)
    starts, ends = loop.starts, loop.ends
    # On the clock: the second round is due one interval after the first was, not one
    # interval after it ended (that would be 3 s after its start).
    for gap in (starts[1] - starts[0], starts[2] - starts[1]):
        assert interval - 0.05 <= gap < interval + slack
    # The third overran its slot (3.2 s): the fourth starts at once, not at a later
    # slot, and it is late only by the consumer's poll after it, not by the overrun...
    assert starts[3] - ends[2] < slack
    assert loop.lateness[3] == pytest.approx(starts[3] - ends[2], abs=0.2)
    # ...and the clock restarts from the end of the overrun (the old slots would have
    # put the fifth round at 8 s, 1.2 s before that).
    assert interval - 0.05 <= starts[4] - ends[2] < interval + slack
    assert all(late is not None and late < slack for late in loop.lateness[:3])


@pytest.mark.kafka
def test_the_trainer_process_lowers_its_priority(
    kafka_bootstrap: str, topic_name: str, registry: ModelRegistry
) -> None:
    import os
    import subprocess
    import sys

    ensure_topics(kafka_bootstrap, {topic_name: 1})
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stream.cli.main",
            "trainer",
            "--broker",
            f"kafka://{kafka_bootstrap}",
            "--registry",
            str(registry.root),
            "--input-topic",
            topic_name,
            "--group",
            f"{topic_name}-trainer",
            "--updates-topic",
            f"{topic_name}-updates",
            "--web-port",
            "0",
            "--interval",
            "60",
            "--nice",
            "3",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        assert process.stderr is not None
        line = process.stderr.readline()
        assert "streamrec trainer: following" in line, line + process.stderr.read()
        expected = min(os.nice(0) + 3, 19)
        assert f"niceness {expected}" in line and "training budget 24 s" in line
        # /proc/PID/stat: field 19 is the nice value (after the parenthesised name)
        fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        assert int(fields[16]) == expected
    finally:
        process.terminate()
        process.wait(30)


def run_trainer_until(
    config: TrainerSettings, loop: LearningLoop, clicks: int, seconds_after: float
) -> float:
    """Consume until ``loop`` has read ``clicks`` clicks, then ``seconds_after`` more
    seconds (or until a round promotes); return when the last click had been read."""
    stop = threading.Event()
    thread = threading.Thread(target=consume, args=(config, loop, stop), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while loop.clicks < clicks:
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.05)
        read_all = time.monotonic()
        while time.monotonic() < read_all + seconds_after and loop.rounds == 0:
            assert thread.is_alive()
            time.sleep(0.05)
        while loop.metrics.training:  # let a round started meanwhile finish and log
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(60)
    return read_all


@pytest.mark.kafka
@pytest.mark.parametrize("new_item_rounds", [True, False], ids=["on", "off"])
def test_new_items_start_a_round_without_waiting_for_the_clock(
    kafka_bootstrap: str, topic_name: str, registry: ModelRegistry, new_item_rounds: bool
) -> None:
    """With a 60 s interval, complete sessions holding new items get a round (and a
    published version that knows the items) within seconds; with the option off, not."""
    ensure_topics(kafka_bootstrap, {topic_name: 1})
    stream = part(range(1200, 1600))
    clicks = clicks_in_time_order(stream)
    produce_clicks(kafka_bootstrap, topic_name, [*clicks, *flush_clicks(clicks[-1].timestamp)])
    config = settings(
        broker=kafka_bootstrap,
        registry=str(registry.root),
        input_topic=topic_name,
        group=f"{topic_name}-trainer",
        gate_margin=0.5,
        interval_s=60.0,
        new_item_rounds=new_item_rounds,
    )
    out = io.StringIO()
    loop = LearningLoop(config, registry, out=out)
    started = time.monotonic()
    read_all = run_trainer_until(
        config, loop, len(clicks) + WATERMARK_RANK, seconds_after=20.0 if new_item_rounds else 8.0
    )
    decisions = [json.loads(line) for line in out.getvalue().splitlines()]
    if not new_item_rounds:
        assert decisions == [] and registry.current_version().startswith("000001-")
        return
    assert decisions and decisions[0]["decision"] == "promoted", decisions
    first = decisions[0]
    assert first["trigger"] == "new_items" and first["new_item_sessions"] > 0
    assert "late_s" not in first
    assert registry.current_version() == first["version"]
    assert set(registry.current().item_map.ids) & NEW_ITEMS
    # Long before the clock's first round (60 s after the start): as soon as the clicks
    # were read, give or take a check (0.25 s) and the catch-up.
    assert time.monotonic() - started < 50
    round_started = first["started_at"] - (time.time() - time.monotonic())
    assert round_started - read_all < 3.0, (round_started - read_all, first)


def test_a_trainer_on_a_fallback_loads_it_once_and_its_version_replaces_the_corrupt_one(
    registry: ModelRegistry, base: Recommender, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CURRENT names a version that fails verification and the registry serves the one
    before it: the trainer loads that one once (not at every click, as a comparison of
    versions with the pointer would), and the version it trains from it replaces the
    corrupt one, which no worker could serve."""
    good = registry.current_version()
    bad = registry.publish(copy.deepcopy(base))
    weights = registry.path_of(bad) / "weights.safetensors"
    damaged = bytearray(weights.read_bytes())
    damaged[len(damaged) // 2] ^= 0x01
    weights.write_bytes(bytes(damaged))
    loads: list[str] = []
    load = registry.current

    def counted(*args: Any, **kwargs: Any) -> Recommender:
        loads.append(registry.current_version() or "")
        return load(*args, **kwargs)

    monkeypatch.setattr(registry, "current", counted)
    loop = LearningLoop(settings(gate_margin=0.5), registry, out=io.StringIO())
    feed(loop, part(range(1200, 1600)))
    assert loop.current().version == good and loads == [bad]
    decision = loop.round()
    assert decision["decision"] == "promoted", decision
    assert registry.current_version() == decision["version"]
    assert load().version == decision["version"] and decision["base_version"] == good
