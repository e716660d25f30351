"""The trainer's rounds: buffer clicks, then train, gate and publish (no Kafka here).

The consumer (:mod:`stream.learning.consumer`) feeds :meth:`LearningLoop.add` and decides
when a round is due; tests drive :meth:`LearningLoop.round` directly.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from model.data import ItemMap, read_clicks
from model.errors import UserError
from model.inference import Recommender
from model.train import train
from stream.kafka.wire import Click
from stream.learning.buffer import BufferedSession, SessionBuffer, sessions_log
from stream.learning.gate import gate
from stream.learning.metrics import TrainerMetrics
from stream.learning.replay import MAX_REPLAY_LOG_SESSIONS, ReplaySample, SessionPool
from stream.learning.settings import TrainerSettings
from stream.registry import ModelRegistry

#: Share of a round's budget kept for replayed sessions when fresh ones would fill it:
#: a trainer that only just keeps up with the stream must not stop replaying, or it forgets.
REPLAY_SHARE = 0.25
#: Training speed (clicks x epochs per second) assumed until a round has measured it:
#: about what one CPU thread does for the default network (100 units) with a core's
#: worth of other work on the machine.
PRIOR_THROUGHPUT = 5000.0


@dataclass(frozen=True)
class Admission:
    """The items a round's training sessions click that the current model does not know:
    those that join the catalogue and those held back."""

    admitted: frozenset[str]
    held_back: frozenset[str]
    #: the catalogue has ``max_items`` items: no new item joins until the limit is raised
    catalogue_full: bool


def admit_new_items(
    sessions: Sequence[BufferedSession], known: ItemMap, settings: TrainerSettings
) -> Admission:
    """Which new items ``sessions`` bring into the catalogue. Any producer can put any id
    in a click, and an admitted item costs a row in every later version (memory, index,
    save time) for good: so an item joins only once clicked ``admit_min_clicks`` times in
    ``admit_min_sessions`` distinct sessions, the most clicked first, at most
    ``max_new_items_per_round`` of them and never past ``max_items`` in all.

    A round leaves the clicks on held-back items out of the sessions it trains on, rather
    than giving them some shared row: a worker skips a click on an item its model does not
    know (the session's state stays as it was), so the session without those clicks is
    the one serving sees, and training adds rows only for the ids it is given. The
    sessions themselves stay whole in the replay sample, so later rounds count those
    clicks again."""
    clicks: Counter[str] = Counter()
    sessions_with: Counter[str] = Counter()
    for session in sessions:
        new = [item for item in session.items if item not in known]
        clicks.update(new)
        sessions_with.update(set(new))
    qualified = [
        item
        for item, n in clicks.most_common()
        if n >= settings.admit_min_clicks and sessions_with[item] >= settings.admit_min_sessions
    ]
    room = settings.max_new_items_per_round
    if settings.max_items:
        room = min(room, max(settings.max_items - len(known), 0))
    admitted = frozenset(qualified[:room])
    return Admission(
        admitted,
        frozenset(clicks) - admitted,
        catalogue_full=0 < settings.max_items <= len(known) + len(admitted),
    )


class LearningLoop:
    """Buffer, replay sample and rounds of train-gate-publish (no Kafka: the consumer
    feeds :meth:`add`, and tests drive :meth:`round` directly)."""

    def __init__(
        self,
        settings: TrainerSettings,
        registry: ModelRegistry,
        out: TextIO = sys.stdout,
        metrics: TrainerMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or TrainerMetrics()
        self.registry = registry
        self.out = out
        self.buffer = SessionBuffer(
            settings.session_timeout_s, settings.max_buffer_sessions, settings.max_session_age_s
        )
        self.replay = ReplaySample(settings.replay_sample, random.Random(settings.seed))
        self.replay_log: SessionPool | None = None
        if settings.replay_log and settings.replay_log_sample:
            self.replay_log = SessionPool(
                read_clicks(settings.replay_log),
                MAX_REPLAY_LOG_SESSIONS,
                random.Random(settings.seed + 1),
            )
        self.rejected_clicks = 0
        self.rounds = 0
        #: measured training speed, clicks x epochs per second (None until a round ran)
        self.throughput: float | None = None
        self._budget_rng = random.Random(settings.seed + 2)
        self.clicks = 0  # valid clicks added so far
        self._clicks_at_last_round = 0
        self._current: Recommender | None = None
        #: what ``CURRENT`` said when :attr:`_current` was loaded: not its version when the
        #: registry fell back from a version that fails verification
        self._pointer: str | None = None
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
        return (
            complete >= settings.min_sessions or (idle and complete > settings.holdout_sessions)
        ), idle

    def new_item_sessions(self) -> int:
        """Complete sessions that a round started now would train on (not hold out) and
        that hold an item the current model does not know and the round would admit to
        the catalogue (judged on these sessions alone: replayed ones may add clicks, which
        the clock's round then takes into account); 0 if a round now would not train at
        all. Ids that would be held back call for no round: junk must not keep the
        trainer busy."""
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
        trained = set(map(id, complete[: -self.settings.holdout_sessions]))
        waiting = [session for session in waiting if id(session) in trained]
        admitted = admit_new_items(waiting, known, self.settings).admitted
        return sum(any(item in admitted for item in session.items) for session in waiting)

    def current(self) -> Recommender:
        """The registry's current model, reloaded only when the pointer moved (a version
        loaded in place of a corrupt current one is kept, not reloaded at every call)."""
        pointer = self.registry.current_version()
        if self._current is None or self._pointer != pointer:
            self._current = self.registry.current(device=self.settings.device, optimizer_state=True)
            self._pointer = pointer
        return self._current

    def budget_events(self) -> int | None:
        """Clicks a round may train on (each for every epoch) within the budget, at the
        training speed measured so far (None: no budget)."""
        budget = self.settings.budget_s
        if budget is None:
            return None
        speed = self.throughput if self.throughput is not None else PRIOR_THROUGHPUT
        return int(budget * speed / self.settings.epochs)

    def _within_budget(
        self, fresh: list[BufferedSession], older: list[BufferedSession]
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
        return (
            kept_fresh,
            kept_older,
            {
                "seconds": self.settings.budget_s,
                "events": limit,
                "throughput": None if self.throughput is None else round(self.throughput, 1),
                "fresh_left_out": len(fresh) - len(kept_fresh),
                "replay_left_out": len(older) - len(kept_older),
            },
        )

    def round(
        self, late_s: float | None = None, trigger: str = "clock", **started_for: Any
    ) -> dict[str, Any]:
        """Train, gate and maybe publish if enough sessions are complete; log and return
        the decision. ``late_s``: how long after it was due the round started;
        ``trigger``: what started it (``clock`` or ``new_items``), logged with
        ``started_for`` (e.g. how many sessions with new items were waiting)."""
        settings = self.settings
        started, clock = time.time(), time.perf_counter()
        record: dict[str, Any] = {
            "event": "trainer_round",
            "buffered": len(self.buffer),
            "evicted": self.buffer.evicted,
            "stale": self.buffer.stale,
            "rejected_clicks": self.rejected_clicks,
            "trigger": trigger,
            **started_for,
        }
        if late_s is not None:
            record["late_s"] = round(late_s, 3)
        complete = self.buffer.complete_count()
        enough, idle = self._enough(complete)
        self._clicks_at_last_round = self.clicks
        if not enough:
            return self._log(
                {
                    **record,
                    "decision": "wait",
                    "complete_sessions": complete,
                    "min_sessions": settings.min_sessions,
                }
            )
        record.update(idle=idle, started_at=round(started, 3))
        self.rounds += 1
        sessions = self.buffer.take_complete()
        holdout = sessions[-settings.holdout_sessions :]
        fresh = sessions[: -settings.holdout_sessions]
        replayed = list(self.replay.sessions)
        self.replay.offer(fresh + holdout)  # for later rounds; this one has its copy
        from_log = (
            self.replay_log.draw(settings.replay_log_sample) if self.replay_log is not None else []
        )
        fresh, older, budget = self._within_budget(fresh, from_log + replayed)
        if budget:
            record["budget"] = budget
            kept = set(map(id, older))
            from_log = [s for s in from_log if id(s) in kept]
            replayed = [s for s in replayed if id(s) in kept]
        current, pointer = self.current(), self._pointer
        trained_on = from_log + replayed + fresh
        admission = admit_new_items(trained_on, current.item_map, settings)
        resume = current.optimizer_state is not None
        learning_rate = settings.learning_rate if resume else settings.fresh_learning_rate
        record.update(
            base_version=current.version,
            round=self.rounds,
            sessions={
                "fresh": len(fresh),
                "replay": len(replayed),
                "replay_log": len(from_log),
                "holdout": len(holdout),
            },
            resumed_optimizer=resume,
            learning_rate=learning_rate,
            new_items=len(admission.admitted),
            new_items_held_back=len(admission.held_back),
            catalogue_full=admission.catalogue_full,
        )
        prepared = time.perf_counter()
        record["prepare_seconds"] = round(prepared - clock, 3)
        try:
            candidate, stats = train(
                sessions_log(trained_on, "trainer buffer", drop=admission.held_back),
                current.config.replace(n_epochs=settings.epochs, learning_rate=learning_rate),
                seed=settings.seed + self.rounds,
                device=settings.device,
                base=current,
                progress=False,
            )
        except UserError as exc:
            return self._log({**record, "decision": "failed", "reason": str(exc)})
        trained = time.perf_counter()
        speed = stats.n_events * stats.epochs / max(trained - prepared, 1e-6)
        self.throughput = speed if self.throughput is None else 0.5 * self.throughput + 0.5 * speed
        # The index first (extending the base's: under a second at a million items): the
        # gate then ranks both models as a worker would (``auto``), which at a million
        # items is through their indexes, 7x faster than scoring every item.
        index_seconds = candidate.build_index(base=current)
        current.use_ranking("auto")
        candidate.use_ranking("auto")
        indexed = time.perf_counter()
        result = gate(
            current, candidate, sessions_log(holdout, "trainer holdout"), settings.gate_margin
        )
        gated = time.perf_counter()
        record.update(
            gate=result.to_dict(),
            train_seconds=round(stats.train_seconds, 3),
            fit_seconds=round(trained - prepared, 3),
            index_seconds=round(index_seconds, 3),
            gate_seconds=round(gated - indexed, 3),
            train_events=stats.n_events,
            epochs=stats.epochs,
            final_loss=stats.final_loss,
        )
        if not result.passed:
            return self._log({**record, "decision": "rejected", "reason": result.reason()})
        training = {
            "base_version": current.version,
            "epochs": stats.epochs,
            "n_events": stats.n_events,
            "final_loss": stats.final_loss,
            "train_seconds": stats.train_seconds,
            "round": self.rounds,
            "learning_rate": learning_rate,
            "resumed_optimizer": stats.resumed_optimizer,
            **record["sessions"],
        }
        try:
            version = self.registry.publish(
                candidate,
                training=training,
                metrics={"gate": result.to_dict()},
                # the pointer it was trained under: a version trained from a fallback
                # replaces the corrupt one that CURRENT names
                if_current=pointer,
            )
        except UserError as exc:
            return self._log({**record, "decision": "not_published", "reason": str(exc)})
        self._current, self._pointer = candidate, candidate.version
        published = time.perf_counter()
        return self._log(
            {
                **record,
                "decision": "promoted",
                "version": version,
                "publish_seconds": round(published - gated, 3),
                "round_seconds": round(published - clock, 3),
                "published_at": round(time.time(), 3),
                "reason": result.reason(),
            }
        )

    def _log(self, record: dict[str, Any]) -> dict[str, Any]:
        print(json.dumps(record, sort_keys=True), file=self.out, flush=True)
        self.metrics.record(record)
        return record
