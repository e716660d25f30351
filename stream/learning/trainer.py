"""``streamrec trainer``: learning while serving.

A separate process (never a worker: training for seconds or minutes would stall a
worker's event loop and its partitions) that follows the click topic in its own consumer
group and keeps the registry's model current:

1. **Buffer.** Valid clicks (:func:`stream.kafka.wire.parse_click`; rejects are only counted,
   the workers dead-letter them) are grouped by session in a :class:`SessionBuffer`. A
   session is complete once the event-time watermark of its partition (the latest click
   time seen there) is ``session_timeout_s`` past its last click: the rule the workers
   use to expire state. Per partition, because a session's clicks share one partition and
   partitions are read at different paces: a watermark from a partition read ahead would
   cut the sessions of one lagging behind.
   The buffer is bounded in sessions (the least recently active is evicted), in clicks
   per session (the latest are kept) and in age (a complete session still waiting after
   ``max_session_age_s`` is stale and dropped).
2. **Train.** Every ``interval_s`` on a fixed clock (a round is due ``interval_s`` after
   the previous one was due, whatever it took; one that overran its slot is followed at
   once), when at least ``min_sessions`` sessions of two or more clicks are complete, the most recent ``holdout_sessions`` of them are held out and the
   rest, plus older sessions against forgetting what the model knew, fine-tune the
   current model warm-started (:func:`model.train.train` with ``base``: known items keep
   their indexes and rows, new items are appended). The older sessions are a uniform
   random sample of the sessions the trainer has seen (:class:`ReplaySample`) and, with
   ``replay_log``, a fresh random draw of ``replay_log_sample`` sessions of an offline
   click log, typically the one the first model was trained on (:class:`SessionPool`):
   a trainer that has just started (or restarted) has seen little, and fine-tuning on
   recent sessions alone forgets part of what the older ones taught.
   When the model carries its optimizer state (artifact format 3), the fine-tune resumes
   Adagrad from it at ``learning_rate``; a model without one starts a fresh accumulator,
   whose first steps are as large as the learning rate on every weight, at the smaller
   ``fresh_learning_rate``.
   A round trains within a budget (``round_budget_s``, by default 40 % of the interval)
   so that it ends well before the next is due: as many sessions as the training speed
   measured by the previous rounds allows, the most recent fresh ones first (a quarter
   of the budget kept for replayed ones), so new items are learnt by the next round
   even when the stream brings more than a round can train on.
   The trainer lowers its CPU priority (``nice``): on a machine it shares with workers,
   serving clicks comes first.
   A round that finds no new click since the previous round does not wait for
   ``min_sessions``: the stream has gone quiet, and the complete sessions (if more than
   the holdout) are trained on now rather than after the next burst of traffic.
   With ``new_item_rounds`` (the default) a round also starts before the clock when a
   round now would train on a complete session holding an item the current model does not
   know (enough sessions complete, and that session not among the held-out ones), at
   least ``max(0.5 s, interval_s / 10)`` after the previous round began; the clock then
   restarts from it. A catalogue change should not wait for the clock.
3. **Gate.** Candidate and current model are scored on the holdout with
   :func:`model.evaluate.evaluate` (Recall@20). The current model cannot rank items it
   has never seen, so both are compared on the predictions whose target the *current*
   model knows; the candidate's recall on targets only it knows is reported separately.
   The candidate is promoted when it is not worse than the current model by more than
   ``gate_margin``, and published to the registry only if the registry still points at
   the model it was trained from (a rollback made meanwhile wins).
4. **Log.** Every decision (wait, promoted, rejected, not_published, failed) is one JSON
   line on stdout, with what started the round (``trigger``: ``clock`` or ``new_items``).

Offsets are committed automatically as clicks are read, so a restarted trainer starts
with an empty buffer: it loses at most one buffer of sessions, which costs a little
training data, never correctness.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, TextIO

from confluent_kafka import Consumer, KafkaException

import numpy as np

from model.data import ClickLog, read_clicks
from model.errors import UserError
from model.evaluate import PredictionBatch, RecommenderScorer, evaluate
from model.inference import Recommender
from model.train import train
from stream.kafka.wire import Click, parse_click
from stream.kafka.config import bootstrap_servers, client_config
from stream.serving.metrics import TrainerMetrics, serve
from stream.registry import DEFAULT_KEEP, DEFAULT_UPDATES_TOPIC, KafkaAnnouncer, ModelRegistry

GATE_K = 20
#: Longest session kept whole; beyond it the latest clicks are kept (bots and crawlers).
MAX_SESSION_CLICKS = 200
#: Training holds the poll loop; librdkafka keeps heartbeating, and this is how long a
#: round may take before the broker considers the trainer gone.
MAX_POLL_INTERVAL_MS = 3_600_000
#: Clicks taken from the consumer at a time; a due round first takes what was fetched,
#: for at most ``CATCH_UP_S``.
CONSUME_BATCH = 1000
CATCH_UP_S = 1.0
#: Most sessions of ``--replay-log`` kept in memory (a uniform sample of the log's).
MAX_REPLAY_LOG_SESSIONS = 100_000
#: A round's training budget when ``--round-budget-s`` is not given: this share of the
#: interval, so that a round (plus gate and publish) ends well before the next is due.
DEFAULT_BUDGET_SHARE = 0.4
#: Share of a round's budget kept for replayed sessions when fresh ones would fill it:
#: a trainer that only just keeps up with the stream must not stop replaying, or it forgets.
REPLAY_SHARE = 0.25
#: Training speed (clicks x epochs per second) assumed until a round has measured it:
#: about what one CPU thread does for the default network (100 units) with a core's
#: worth of other work on the machine.
PRIOR_THROUGHPUT = 5000.0
#: A round for new items starts at least this long after the previous round began, and
#: at least this share of the interval after it: new items must not keep the trainer
#: training back to back.
NEW_ITEM_MIN_GAP_S = 0.5
NEW_ITEM_GAP_SHARE = 0.1
#: How often the consume loop looks for complete sessions with new items.
NEW_ITEM_CHECK_S = 0.25


@dataclass(frozen=True)
class TrainerSettings:
    """``streamrec trainer`` options, validated before anything connects."""

    broker: str
    registry: str
    interval_s: float = 300.0
    min_sessions: int = 500
    input_topic: str = "clicks"
    group: str = "streamrec-trainer"
    session_timeout_s: float = 1800.0
    max_session_age_s: float = 86400.0
    max_buffer_sessions: int = 200_000
    replay_sample: int = 5000
    replay_log: str | None = None
    replay_log_sample: int = 3000
    gate_margin: float = 0.01
    holdout_sessions: int = 100
    epochs: int = 3
    learning_rate: float = 0.1
    fresh_learning_rate: float = 0.02
    keep: int = DEFAULT_KEEP
    updates_topic: str = DEFAULT_UPDATES_TOPIC
    seed: int = 0
    device: str | None = None
    web_port: int = 6067
    round_budget_s: float | None = None
    nice: int = 10
    new_item_rounds: bool = True

    def __post_init__(self) -> None:
        bootstrap_servers(self.broker)
        if not 0 <= self.web_port <= 65535:
            raise UserError(f"--web-port must be a port number, got {self.web_port}")
        for flag, value in (("--interval", self.interval_s),
                            ("--session-timeout-s", self.session_timeout_s),
                            ("--max-session-age-s", self.max_session_age_s)):
            if not 0 < value < math.inf:
                raise UserError(f"{flag} must be a finite number > 0, got {value}")
        for flag, value in (("--learning-rate", self.learning_rate),
                            ("--fresh-learning-rate", self.fresh_learning_rate)):
            if not 0 < value < math.inf:
                raise UserError(f"{flag} must be a finite number > 0, got {value}")
        for name in ("min_sessions", "holdout_sessions", "max_buffer_sessions", "epochs",
                     "keep"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, "
                                f"got {getattr(self, name)}")
        for name in ("replay_sample", "replay_log_sample"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0, "
                                f"got {getattr(self, name)}")
        if self.round_budget_s is not None and not 0 <= self.round_budget_s < math.inf:
            raise UserError(f"--round-budget-s must be a finite number >= 0, "
                            f"got {self.round_budget_s}")
        if not 0 <= self.nice <= 19:
            raise UserError(f"--nice must be in 0..19, got {self.nice}")
        if self.replay_log is not None and not self.replay_log:
            raise UserError("--replay-log must name a click log")
        if not 0 <= self.gate_margin < 1:
            raise UserError(f"--gate-margin must be in [0, 1), got {self.gate_margin}")
        if self.holdout_sessions >= self.min_sessions:
            raise UserError(f"--holdout-sessions ({self.holdout_sessions}) must be below "
                            f"--min-sessions ({self.min_sessions}): some sessions must "
                            f"be left to train on")
        if self.max_buffer_sessions < self.min_sessions:
            raise UserError(f"--max-buffer-sessions ({self.max_buffer_sessions}) must be at "
                            f"least --min-sessions ({self.min_sessions})")
        if self.max_session_age_s < self.session_timeout_s:
            raise UserError("--max-session-age-s must be at least --session-timeout-s (a "
                            "session cannot be stale before it is complete)")
        for name in ("input_topic", "group", "updates_topic"):
            if not getattr(self, name):
                raise UserError(f"--{name.replace('_', '-')} must not be empty")

    @property
    def bootstrap(self) -> str:
        return bootstrap_servers(self.broker)

    @property
    def budget_s(self) -> float | None:
        """Training seconds a round may take (None: no limit)."""
        if self.round_budget_s is None:
            return DEFAULT_BUDGET_SHARE * self.interval_s
        return self.round_budget_s or None

    @property
    def new_item_gap_s(self) -> float:
        """Least time between the start of a round and a round started for new items."""
        return max(NEW_ITEM_MIN_GAP_S, NEW_ITEM_GAP_SHARE * self.interval_s)


@dataclass
class BufferedSession:
    """One session's clicks as buffered (at most ``MAX_SESSION_CLICKS``, the latest)."""

    partition: int = 0
    items: deque[str] = field(default_factory=lambda: deque(maxlen=MAX_SESSION_CLICKS))
    times: deque[float] = field(default_factory=lambda: deque(maxlen=MAX_SESSION_CLICKS))
    last_time: float = -math.inf

    def add(self, click: Click) -> None:
        self.items.append(click.item_id)
        self.times.append(click.timestamp)
        self.last_time = max(self.last_time, click.timestamp)


class SessionBuffer:
    """Sessions being collected, bounded in count, clicks per session and age.

    Completion and age are measured in event time against the session's partition's
    watermark (the latest click time seen there), so a replayed or lagging topic behaves
    as it did live.
    """

    def __init__(self, session_timeout_s: float, max_sessions: int,
                 max_age_s: float) -> None:
        self.session_timeout_s = session_timeout_s
        self.max_sessions = max_sessions
        self.max_age_s = max_age_s
        self.watermarks: dict[int, float] = {}
        self.evicted = 0   # dropped because the buffer was full
        self.stale = 0     # complete but dropped after waiting longer than max_age_s
        self._sessions: OrderedDict[str, BufferedSession] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def add(self, click: Click, partition: int = 0) -> None:
        session = self._sessions.get(click.session_id)
        if session is None:
            if len(self._sessions) >= self.max_sessions:
                self._sessions.popitem(last=False)  # the least recently active
                self.evicted += 1
            session = self._sessions[click.session_id] = BufferedSession(partition)
        else:
            self._sessions.move_to_end(click.session_id)
        session.add(click)
        mark = self.watermarks.get(partition, -math.inf)
        self.watermarks[partition] = max(mark, click.timestamp)

    def complete_count(self) -> int:
        """Complete sessions with two or more clicks (the ones that can be learnt from)."""
        self._drop_stale()
        return sum(1 for s in self._sessions.values() if self._complete(s) and len(s.items) >= 2)

    def complete_sessions(self) -> list[BufferedSession]:
        """The complete sessions of two or more clicks, left in the buffer, in the order
        :meth:`take_complete` would return them."""
        self._drop_stale()
        return sorted((s for s in self._sessions.values()
                       if self._complete(s) and len(s.items) >= 2), key=lambda s: s.last_time)

    def get(self, session_id: str) -> BufferedSession | None:
        return self._sessions.get(session_id)

    def is_complete(self, session: BufferedSession) -> bool:
        return self._complete(session)

    def take_complete(self) -> list[BufferedSession]:
        """Remove the complete sessions; return those with two or more clicks, oldest
        last click first. Single-click ones are dropped: they hold no transition."""
        self._drop_stale()
        done = [key for key, s in self._sessions.items() if self._complete(s)]
        taken = [self._sessions.pop(key) for key in done]
        return sorted((s for s in taken if len(s.items) >= 2), key=lambda s: s.last_time)

    def _complete(self, session: BufferedSession) -> bool:
        return session.last_time <= self.watermarks[session.partition] - self.session_timeout_s

    def _drop_stale(self) -> None:
        stale = [key for key, s in self._sessions.items()
                 if s.last_time < self.watermarks[s.partition] - self.max_age_s]
        for key in stale:
            del self._sessions[key]
        self.stale += len(stale)


class ReplaySample:
    """A uniform random sample of every session offered so far (reservoir sampling):
    bounded memory, and old behaviour stays represented however long the trainer runs."""

    def __init__(self, capacity: int, rng: random.Random) -> None:
        self.capacity = capacity
        self.rng = rng
        self.seen = 0
        self.sessions: list[BufferedSession] = []

    def offer(self, sessions: Sequence[BufferedSession]) -> None:
        for session in sessions:
            self.seen += 1
            if len(self.sessions) < self.capacity:
                self.sessions.append(session)
            else:
                slot = self.rng.randrange(self.seen)
                if slot < self.capacity:
                    self.sessions[slot] = session


class SessionPool:
    """Sessions of an offline click log to replay (``--replay-log``), held compactly: at
    most ``max_sessions`` (a uniform sample), the latest ``MAX_SESSION_CLICKS`` clicks of
    each, sessions of two or more clicks only. Each round draws a fresh random subset."""

    def __init__(self, log: ClickLog, max_sessions: int, rng: random.Random) -> None:
        offsets = log.session_offsets()
        usable = np.flatnonzero(np.diff(offsets) >= 2)
        if len(usable) > max_sessions:
            usable = np.sort(usable[rng.sample(range(len(usable)), max_sessions)])
        ends = offsets[usable + 1]
        starts = np.maximum(offsets[usable], ends - MAX_SESSION_CLICKS)
        lengths = ends - starts
        keep = (np.concatenate([np.arange(lo, hi) for lo, hi in zip(starts, ends)])
                if len(usable) else np.zeros(0, dtype=np.int64))
        self.item_ids = log.item_ids
        self.items = log.items[keep]
        self.times = log.times[keep]
        self.offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
        self.rng = rng
        self.source = log.source

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def draw(self, n: int) -> list[BufferedSession]:
        """``n`` distinct sessions at random (all of them if there are fewer)."""
        chosen = self.rng.sample(range(len(self)), min(n, len(self)))
        sessions = []
        for k in chosen:
            lo, hi = self.offsets[k], self.offsets[k + 1]
            session = BufferedSession(partition=-1)
            session.items.extend(str(i) for i in self.item_ids[self.items[lo:hi]])
            session.times.extend(float(t) for t in self.times[lo:hi])
            session.last_time = float(self.times[hi - 1])
            sessions.append(session)
        return sessions


def sessions_log(sessions: Sequence[BufferedSession], source: str) -> ClickLog:
    """A click log of ``sessions``, each under its own id (a session id seen again after
    its session completed must not merge two sessions into one)."""
    ids = [str(k) for k, s in enumerate(sessions) for _ in s.items]
    items = [item for s in sessions for item in s.items]
    times = [t for s in sessions for t in s.times]
    return ClickLog.from_arrays(ids, items, times, source=source)


@dataclass(frozen=True)
class GateResult:
    """The validation gate's numbers (Recall@``k`` on the holdout) and its verdict."""

    k: int
    margin: float
    current_recall: float
    candidate_recall: float
    n_predictions: int          # targets the current model knows: the compared ones
    candidate_new_item_recall: float | None
    n_new_item_predictions: int  # targets only the candidate knows
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def reason(self) -> str:
        if self.n_predictions == 0:
            return "no holdout prediction has a target the current model knows"
        relation = ">=" if self.passed else "<"
        return (f"candidate Recall@{self.k} {self.candidate_recall:.4f} {relation} current "
                f"{self.current_recall:.4f} - margin {self.margin:g}")


def gate(current: Recommender, candidate: Recommender, holdout: ClickLog, margin: float,
         k: int = GATE_K) -> GateResult:
    """Compare ``candidate`` with ``current`` on the holdout, fairly for new items.

    Both are compared on the predictions whose target ``current`` knows (it cannot rank
    the others, and counting them as its misses would promote any candidate that merely
    learnt new ids). The candidate ranks against its whole, larger catalogue, as it would
    when served. With no comparable prediction there is no evidence, and the gate fails.
    """
    baseline = evaluate(RecommenderScorer(current), holdout, ks=(k,))
    known_to_current = current.item_map.lookup(candidate.item_map.ids) >= 0
    hits = {True: 0, False: 0}
    counts = {True: 0, False: 0}

    def split(batch: PredictionBatch) -> None:
        known = known_to_current[batch.targets]
        hit = (batch.ranks <= k).numpy()
        for flag in (True, False):
            mask = known == flag
            counts[flag] += int(mask.sum())
            hits[flag] += int(hit[mask].sum())

    evaluate(RecommenderScorer(candidate), holdout, ks=(k,), on_batch=split)
    candidate_recall = hits[True] / counts[True] if counts[True] else 0.0
    passed = counts[True] > 0 and candidate_recall >= baseline.recall(k) - margin
    return GateResult(k=k, margin=margin, current_recall=baseline.recall(k),
                      candidate_recall=candidate_recall, n_predictions=counts[True],
                      candidate_new_item_recall=hits[False] / counts[False]
                      if counts[False] else None,
                      n_new_item_predictions=counts[False], passed=passed)


class LearningLoop:
    """Buffer, replay sample and rounds of train-gate-publish (no Kafka: the consumer
    feeds :meth:`add`, and tests drive :meth:`round` directly)."""

    def __init__(self, settings: TrainerSettings, registry: ModelRegistry,
                 out: TextIO = sys.stdout, metrics: TrainerMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or TrainerMetrics()
        self.registry = registry
        self.out = out
        self.buffer = SessionBuffer(settings.session_timeout_s, settings.max_buffer_sessions,
                                    settings.max_session_age_s)
        self.replay = ReplaySample(settings.replay_sample, random.Random(settings.seed))
        self.replay_log: SessionPool | None = None
        if settings.replay_log and settings.replay_log_sample:
            self.replay_log = SessionPool(read_clicks(settings.replay_log),
                                          MAX_REPLAY_LOG_SESSIONS,
                                          random.Random(settings.seed + 1))
        self.rejected_clicks = 0
        self.rounds = 0
        #: measured training speed, clicks x epochs per second (None until a round ran)
        self.throughput: float | None = None
        self._budget_rng = random.Random(settings.seed + 2)
        self.clicks = 0                 # valid clicks added so far
        self._clicks_at_last_round = 0
        self._current: Recommender | None = None
        #: ids of buffered sessions that got a click on an item the model did not know
        #: then (checked again against the current model before a round is started for it)
        self._new_item_sessions: set[str] = set()

    def add(self, click: Click, partition: int = 0) -> None:
        self.buffer.add(click, partition)
        self.clicks += 1
        if self.settings.new_item_rounds:
            model = self._current if self._current is not None else self.current()
            if click.item_id not in model.item_map:
                self._new_item_sessions.add(click.session_id)

    def _enough(self, complete: int) -> tuple[bool, bool]:
        """(enough, idle): whether a round with ``complete`` complete sessions trains,
        and whether it does so because the stream went quiet."""
        settings = self.settings
        quiet = self.clicks == self._clicks_at_last_round  # nothing new since last round
        idle = quiet and complete < settings.min_sessions
        return (complete >= settings.min_sessions
                or (idle and complete > settings.holdout_sessions)), idle

    def new_item_sessions(self) -> int:
        """Complete sessions that a round started now would train on (not hold out) and
        that hold an item the current model does not know; 0 if a round now would not
        train at all."""
        if not self._new_item_sessions:
            return 0
        known = self.current().item_map
        waiting = []
        for session_id in list(self._new_item_sessions):
            session = self.buffer.get(session_id)
            if session is None or all(item in known for item in session.items):
                self._new_item_sessions.discard(session_id)  # taken, evicted, or learnt
            elif len(session.items) >= 2 and self.buffer.is_complete(session):
                waiting.append(session)
        if not waiting:
            return 0
        complete = self.buffer.complete_sessions()
        if not self._enough(len(complete))[0]:
            return 0
        trained = set(map(id, complete[:-self.settings.holdout_sessions]))
        return sum(id(session) in trained for session in waiting)

    def current(self) -> Recommender:
        """The registry's current model, reloaded only when the pointer moved."""
        version = self.registry.current_version()
        if self._current is None or self._current.version != version:
            self._current = self.registry.current(device=self.settings.device,
                                                  optimizer_state=True)
        return self._current

    def budget_events(self) -> int | None:
        """Clicks a round may train on (each for every epoch) within the budget, at the
        training speed measured so far (None: no budget)."""
        budget = self.settings.budget_s
        if budget is None:
            return None
        speed = self.throughput if self.throughput is not None else PRIOR_THROUGHPUT
        return int(budget * speed / self.settings.epochs)

    def _within_budget(self, fresh: list[BufferedSession], older: list[BufferedSession]
                       ) -> tuple[list[BufferedSession], list[BufferedSession], dict[str, Any]]:
        """The fresh and older sessions a round trains on within the budget. The most
        recent fresh sessions come first (they carry what the model does not know yet),
        up to ``1 - REPLAY_SHARE`` of the budget when there are older sessions; then a
        random part of the older ones (replay, against forgetting); then more fresh ones
        if room is left. Fresh sessions left out stay in the replay sample like the rest."""
        limit = self.budget_events()
        if limit is None:
            return fresh, older, {}
        events = 0
        newest_first = list(reversed(fresh))
        taken = 0

        def take_fresh(up_to: int) -> None:
            nonlocal events, taken
            while taken < len(newest_first):
                clicks = len(newest_first[taken].items)
                if taken and events + clicks > up_to:
                    break
                events += clicks
                taken += 1

        take_fresh(int(limit * (1 - REPLAY_SHARE)) if older else limit)
        chosen = set()
        for session in self._budget_rng.sample(older, len(older)):
            if events + len(session.items) <= limit:
                chosen.add(id(session))
                events += len(session.items)
        take_fresh(limit)
        kept_fresh = newest_first[:taken][::-1]
        kept_older = [s for s in older if id(s) in chosen]  # in their original order
        return kept_fresh, kept_older, {
            "seconds": self.settings.budget_s, "events": limit,
            "throughput": None if self.throughput is None else round(self.throughput, 1),
            "fresh_left_out": len(fresh) - len(kept_fresh),
            "replay_left_out": len(older) - len(kept_older)}

    def round(self, late_s: float | None = None, trigger: str = "clock",
              **started_for: Any) -> dict[str, Any]:
        """Train, gate and maybe publish if enough sessions are complete; log and return
        the decision. ``late_s``: how long after it was due the round started;
        ``trigger``: what started it (``clock`` or ``new_items``), logged with
        ``started_for`` (e.g. how many sessions with new items were waiting)."""
        settings = self.settings
        started, clock = time.time(), time.perf_counter()
        record: dict[str, Any] = {"event": "trainer_round", "buffered": len(self.buffer),
                                  "evicted": self.buffer.evicted, "stale": self.buffer.stale,
                                  "rejected_clicks": self.rejected_clicks,
                                  "trigger": trigger, **started_for}
        if late_s is not None:
            record["late_s"] = round(late_s, 3)
        complete = self.buffer.complete_count()
        enough, idle = self._enough(complete)
        self._clicks_at_last_round = self.clicks
        if not enough:
            return self._log({**record, "decision": "wait", "complete_sessions": complete,
                              "min_sessions": settings.min_sessions})
        record.update(idle=idle, started_at=round(started, 3))
        self.rounds += 1
        sessions = self.buffer.take_complete()
        holdout = sessions[-settings.holdout_sessions:]
        fresh = sessions[:-settings.holdout_sessions]
        replayed = list(self.replay.sessions)
        self.replay.offer(fresh + holdout)  # for later rounds; this one has its copy
        from_log = (self.replay_log.draw(settings.replay_log_sample)
                    if self.replay_log is not None else [])
        fresh, older, budget = self._within_budget(fresh, from_log + replayed)
        if budget:
            record["budget"] = budget
            kept = set(map(id, older))
            from_log = [s for s in from_log if id(s) in kept]
            replayed = [s for s in replayed if id(s) in kept]
        current = self.current()
        resume = current.optimizer_state is not None
        learning_rate = settings.learning_rate if resume else settings.fresh_learning_rate
        record.update(base_version=current.version, round=self.rounds,
                      sessions={"fresh": len(fresh), "replay": len(replayed),
                                "replay_log": len(from_log), "holdout": len(holdout)},
                      resumed_optimizer=resume, learning_rate=learning_rate)
        prepared = time.perf_counter()
        record["prepare_seconds"] = round(prepared - clock, 3)
        try:
            candidate, stats = train(sessions_log(from_log + replayed + fresh,
                                                  "trainer buffer"),
                                     current.config.replace(n_epochs=settings.epochs,
                                                            learning_rate=learning_rate),
                                     seed=settings.seed + self.rounds, device=settings.device,
                                     base=current, progress=False)
        except UserError as exc:
            return self._log({**record, "decision": "failed", "reason": str(exc)})
        trained = time.perf_counter()
        speed = stats.n_events * stats.epochs / max(trained - prepared, 1e-6)
        self.throughput = speed if self.throughput is None else \
            0.5 * self.throughput + 0.5 * speed
        result = gate(current, candidate, sessions_log(holdout, "trainer holdout"),
                      settings.gate_margin)
        gated = time.perf_counter()
        record.update(gate=result.to_dict(), new_items=candidate.n_items - current.n_items,
                      train_seconds=round(stats.train_seconds, 3),
                      fit_seconds=round(trained - prepared, 3),
                      gate_seconds=round(gated - trained, 3),
                      train_events=stats.n_events, epochs=stats.epochs,
                      final_loss=stats.final_loss)
        if not result.passed:
            return self._log({**record, "decision": "rejected", "reason": result.reason()})
        training = {"base_version": current.version, "epochs": stats.epochs,
                    "n_events": stats.n_events, "final_loss": stats.final_loss,
                    "train_seconds": stats.train_seconds, "round": self.rounds,
                    "learning_rate": learning_rate,
                    "resumed_optimizer": stats.resumed_optimizer, **record["sessions"]}
        try:
            version = self.registry.publish(candidate, training=training,
                                            metrics={"gate": result.to_dict()},
                                            if_current=current.version)
        except UserError as exc:
            return self._log({**record, "decision": "not_published", "reason": str(exc)})
        self._current = candidate
        published = time.perf_counter()
        return self._log({**record, "decision": "promoted", "version": version,
                          "publish_seconds": round(published - gated, 3),
                          "round_seconds": round(published - clock, 3),
                          "published_at": round(time.time(), 3),
                          "reason": result.reason()})

    def _log(self, record: dict[str, Any]) -> dict[str, Any]:
        print(json.dumps(record, sort_keys=True), file=self.out, flush=True)
        self.metrics.record(record)
        return record


def consume(settings: TrainerSettings, loop: LearningLoop, stop: threading.Event) -> None:
    """Feed the loop from the click topic and run a round every ``interval_s`` (and, with
    ``new_item_rounds``, as soon as complete sessions with new items can be trained on)
    until ``stop`` is set."""
    consumer = Consumer(client_config(settings.bootstrap, **{
        "group.id": settings.group, "auto.offset.reset": "earliest",
        "enable.auto.commit": True, "max.poll.interval.ms": MAX_POLL_INTERVAL_MS}))
    try:
        try:
            topics = consumer.list_topics(timeout=30).topics
        except KafkaException as exc:
            raise UserError(f"cannot reach a Kafka broker at {settings.bootstrap}: "
                            f"{exc.args[0].str()}") from None
        if settings.input_topic not in topics:
            raise UserError(f"missing topic {settings.input_topic!r} on {settings.bootstrap}")
        consumer.subscribe([settings.input_topic])
        loop.metrics.not_ready_reason = None

        def read(timeout: float) -> int:
            messages = consumer.consume(CONSUME_BATCH, timeout=timeout)
            for message in messages:
                if message.error():
                    print(f"streamrec trainer: {message.error()}", file=sys.stderr)
                    continue
                parsed = parse_click(message.key(), message.value(), time.time())
                if isinstance(parsed, Click):
                    loop.add(parsed, message.partition() or 0)  # set on every fetched message
                else:
                    loop.rejected_clicks += 1
            return len(messages)

        # Rounds keep a fixed clock: one is due every interval_s from the start, whatever
        # the previous one took (a round that began `interval_s` after the previous one
        # ended drifted later by a round's length each time). A round that overran its
        # slot is followed at once, and the clock restarts from then.
        # A round for new items may come earlier (new_item_rounds): once a round now would
        # train on a complete session holding an item the current model does not know, and
        # new_item_gap_s after the previous round began. The clock then restarts from it,
        # so rounds are still never further apart than interval_s.
        due = time.monotonic() + settings.interval_s
        last_started = -math.inf
        next_check = 0.0
        while not stop.is_set():
            loop.metrics.beat(len(loop.buffer))
            read(0.2)
            now = time.monotonic()
            started_for: dict[str, Any] = {}
            if now >= due:
                trigger = "clock"
            elif (settings.new_item_rounds and now >= next_check
                  and now - last_started >= settings.new_item_gap_s):
                next_check = now + NEW_ITEM_CHECK_S
                waiting = loop.new_item_sessions()
                if not waiting:
                    continue
                trigger, started_for = "new_items", {"new_item_sessions": waiting}
            else:
                continue
            # Catch up with what was fetched meanwhile (a round blocks the loop), so the
            # round sees the stream as it is now.
            deadline = now + CATCH_UP_S
            while read(0.0) == CONSUME_BATCH and time.monotonic() < deadline:
                pass
            loop.metrics.training = True
            last_started = time.monotonic()
            try:
                loop.round(late_s=last_started - due if trigger == "clock" else None,
                           trigger=trigger, **started_for)
            finally:
                loop.metrics.training = False
            if trigger == "clock":
                due = max(due + settings.interval_s, time.monotonic())
            else:
                due = last_started + settings.interval_s
    finally:
        consumer.close()


def settings_from_args(args: argparse.Namespace) -> TrainerSettings:
    return TrainerSettings(**{f.name: getattr(args, f.name) for f in fields(TrainerSettings)})


def lower_priority(nice: int) -> int:
    """Add ``nice`` to this process's niceness (threads started later inherit it); return
    the new niceness. Training competes with the workers for the CPU when they share a
    machine: serving a click now matters more than finishing a round a little sooner."""
    return os.nice(nice) if nice else os.nice(0)


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    niceness = lower_priority(settings.nice)  # first: every thread started below inherits it
    registry = ModelRegistry(settings.registry, keep=settings.keep,
                             announcer=KafkaAnnouncer(settings.bootstrap,
                                                      settings.updates_topic))
    loop = LearningLoop(settings, registry)
    if settings.web_port:
        serve(loop.metrics.app(), settings.web_port)
    base = loop.current()
    budget = settings.budget_s
    print(f"streamrec trainer: following {settings.input_topic} as group {settings.group}; "
          f"current model {base.version} ({base.n_items} items); a round every "
          f"{settings.interval_s:g} s"
          f"{' (sooner for new items)' if settings.new_item_rounds else ''}, training budget "
          f"{'none' if budget is None else f'{budget:g} s'}, niceness {niceness}",
          file=sys.stderr)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    consume(settings, loop, stop)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``streamrec trainer``."""
    defaults = {f.name: f.default for f in fields(TrainerSettings)}
    parser = subparsers.add_parser(
        "trainer", help="learn while serving: fine-tune on the click stream, gate, publish",
        description="Consume the click topic in its own group, fine-tune the registry's "
                    "current model on recent sessions plus a replay sample, and publish "
                    "candidates that pass the holdout gate. One JSON line per decision.")
    parser.add_argument("--broker", required=True, help="Kafka bootstrap URL")
    parser.add_argument("--registry", required=True, help="model registry directory")

    def option(name: str, kind: type, help: str, flag: str | None = None) -> None:
        parser.add_argument(flag or "--" + name.replace("_", "-"), dest=name, type=kind,
                            default=defaults[name], help=f"{help} (default {defaults[name]})")

    option("interval_s", float, "seconds between training rounds", flag="--interval")
    option("min_sessions", int, "complete sessions (2+ clicks) needed for a round")
    option("input_topic", str, "click topic")
    option("group", str, "consumer group of the trainer")
    option("session_timeout_s", float, "event-time inactivity after which a session is "
                                       "complete")
    option("max_session_age_s", float, "drop a complete session still unused after this "
                                       "much event time")
    option("max_buffer_sessions", int, "most sessions buffered (least recently active are "
                                       "evicted)")
    option("replay_sample", int, "sessions seen earlier replayed in every round (a uniform "
                                 "sample of all the trainer has seen)")
    option("replay_log", str, "an offline click log whose sessions are replayed too, "
                              "typically the first model's training data (read at start; "
                              f"at most {MAX_REPLAY_LOG_SESSIONS:,} sessions kept)")
    option("replay_log_sample", int, "sessions of --replay-log drawn afresh for every round")
    option("gate_margin", float, "largest Recall@20 drop a promoted candidate may show")
    option("holdout_sessions", int, "most recent complete sessions held out for the gate")
    option("epochs", int, "fine-tuning epochs per round")
    option("learning_rate", float, "fine-tuning learning rate when the model carries its "
                                   "optimizer state (Adagrad resumes from it)")
    option("fresh_learning_rate", float, "fine-tuning learning rate for a model without "
                                         "optimizer state (format 2 artifacts): a fresh "
                                         "accumulator's first steps have the size of the "
                                         "learning rate, and the offline 0.2 wrecks a "
                                         "trained model")
    option("keep", int, "registry versions to retain")
    option("updates_topic", str, "topic announcing new versions")
    option("seed", int, "random seed (replay sample, training)")
    option("web_port", int, "HTTP port for /metrics, /healthz, /readyz (0 = none)")
    parser.add_argument("--round-budget-s", dest="round_budget_s", type=float, default=None,
                        help="training seconds a round may take: the most recent complete "
                             "sessions first, then replayed ones, as many as fit at the "
                             "training speed measured by earlier rounds (default "
                             f"{DEFAULT_BUDGET_SHARE * 100:.0f}%% of --interval; 0 = no limit)")
    option("nice", int, "niceness added to the trainer's (0..19), so that workers on the "
                        "same machine get the CPU first")
    parser.add_argument("--no-new-item-rounds", dest="new_item_rounds", action="store_false",
                        help="run rounds on the --interval clock only; by default a round "
                             "also starts as soon as one would train on a complete session "
                             "holding an item the current model does not know (at least "
                             f"max({NEW_ITEM_MIN_GAP_S:g} s, {NEW_ITEM_GAP_SHARE:g} x "
                             "--interval) after the previous round began)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if "
                                                       "available)")
    parser.set_defaults(run=run)
