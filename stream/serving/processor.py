"""What the worker does with one batch of events: clicks in, states and answers out.

For each batch the agent hands over (:mod:`stream.serving.app`):

0. Each partition's clicks are checked to follow on from the ones before (from the
   committed offset after a rebalance); the clicks of a hole Faust left are read from the
   broker and take their place (:mod:`stream.serving.sequence`).
1. Each message is validated (:mod:`stream.kafka.wire`); a bad one goes to the
   dead-letter topic with its reason and original bytes (:mod:`stream.serving.dead_letters`),
   and the batch goes on. Expiry markers go to :mod:`stream.serving.expiry`.
2. The sessions' states are read from the ``sessions`` table (one that does not decode
   restarts its session empty: counted and logged, never a reason to stop); a click on
   another partition than its session's is dead-lettered as ``wrong_partition`` (see
   ``ClickProcessor._split_misplaced``); the rest of the batch is scored with one model
   call per wave (:mod:`stream.serving.scoring`).
3. The recommendations are published and their delivery awaited; only then is each new
   state written to the table, its changelog record sent to the click's partition
   (what a table write in the event's context does; faust-streaming #497). Because a
   state is never written before its click's output was delivered, a click found
   already applied after a crash (offset check) already has its output: state is
   exactly-once, output at least once.

Nothing is written (states, expiry tombstones) unless the worker's group membership of
the batch's start is confirmed (:mod:`stream.serving.fencing`): a worker that wakes up
from a pause longer than its group session, its partitions already someone else's,
raises :class:`~stream.serving.fencing.MembershipLost` instead.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Awaitable, Sequence, Set
from typing import Any, cast

import faust
import torch
from faust.types import TP, AppT, EventT, TableT
from mode.types.signals import BaseSignalT

from model.inference import Recommender
from stream.kafka.partition_reader import PartitionReader
from stream.kafka.wire import Rejected, encode_recommendation, parse_click
from stream.serving import faust_patches
from stream.serving.availability import AvailabilityFollower
from stream.serving.dead_letters import WRONG_PARTITION, DeadLetters
from stream.serving.expiry import EXPIRY_DELETES_FLOOR, SessionExpiry
from stream.serving.fencing import GroupFence, MembershipLost
from stream.serving.metrics import REBALANCING, Health, WorkerCounters, WorkerMetrics
from stream.serving.scoring import SourcedClick, apply_clicks
from stream.serving.sequence import InputRecord, InputSequence
from stream.serving.settings import WorkerSettings
from stream.serving.state import SessionState, UndecodableState, sessions_by_partition
from stream.serving.topics import expiry_topic

logger = logging.getLogger("streamrec.worker")


class ClickProcessor:
    """Everything the agent does with one batch; holds the current model.

    ``recommender`` is read once per batch, so a hot swap (:mod:`stream.serving.hot_swap`)
    falls between two batches and no batch mixes model versions.
    """

    def __init__(
        self,
        settings: WorkerSettings,
        recommender: Recommender,
        table: TableT,
        output: faust.TopicT,
        dead_letters: faust.TopicT,
    ) -> None:
        self.settings = settings
        self.recommender = recommender
        #: Set once the worker has read the availability topic (``follow_availability``).
        self.availability: AvailabilityFollower | None = None
        self._rules_sequence = 0  # the last availability change the recommender has
        self.table = table
        self.output = output
        self.counters = WorkerCounters()
        self.metrics = WorkerMetrics()
        self.health = Health()
        self.dead_letters = DeadLetters(dead_letters, self.counters.rejected)
        self.expiry = SessionExpiry(table, settings.session_timeout_s, self._expired)
        self.fence = GroupFence(
            settings.app_id, settings.group_session_timeout_s, settings.broker_wait_s
        )
        self._expiry_topic = expiry_topic(settings)
        # Faust's consumer group is the app id
        reader = PartitionReader(settings.bootstrap, settings.input_topic, settings.app_id)
        self.sequence = InputSequence(
            reader,
            self.counters,
            lambda p: faust_patches.sought_offset(output.app, TP(settings.input_topic, p)),
        )
        self._serving = False
        self._owned: set[int] = set()  # input partitions assigned at the last rebalance
        self._state_writes: list[Awaitable[Any]] = []  # changelog records in flight
        self._write_failure: Exception | None = None  # the first record refused

    async def process(self, events: Sequence[EventT]) -> None:
        logger.debug("batch of %d events", len(events))
        dead_letters = self.apply_availability()
        if not self._serving:
            # Everything alive when serving starts (Faust, aiokafka, torch, the model, the
            # recovered table) lives as long as the worker: freeze it out of the cyclic
            # collector, whose full passes over it stopped the event loop for 200-230 ms
            # (measured at 40k items), a stall that every click in flight waited for.
            gc.freeze()
            self._serving = True
        await self.await_state_writes()
        generation = self.fence.generation()
        now = time.time()
        received = [e.message for e in events if e.message.topic != self._expiry_topic]
        holes = await self.sequence.holes(received)
        clicks: list[tuple[InputRecord, SourcedClick]] = []
        for event in events:
            message = event.message
            if message.topic == self._expiry_topic:
                self.expiry.on_marker(event)
                continue
            for record in [*holes.pop((message.partition, message.offset), ()), message]:
                parsed = parse_click(record.key, record.value, now)
                if isinstance(parsed, Rejected):
                    dead_letters.append(self.dead_letters.send(record, parsed))
                    continue
                clicks.append((record, SourcedClick(parsed, record.partition, record.offset)))
                self.expiry.watermarks.advance(record.partition, parsed.timestamp)
        stored = self._stored_states(clicks)
        clicks, misplaced = self._split_misplaced(clicks, stored)
        dead_letters += [self.dead_letters.send(record, why) for record, why in misplaced]
        # Dead letters are sent together with the answers and all delivered before the
        # batch is committed: awaiting each one's delivery in turn would cap a worker at
        # about 130 bad messages/s, and a flood of them would delay every good click.
        answers = [self._answer(clicks, stored, now, generation)] if clicks else []
        await asyncio.gather(*dead_letters, *answers)
        await self.fence.confirm(generation)
        self.expiry.delete_idle(max(EXPIRY_DELETES_FLOOR, len(events)))
        for event in events:
            self.metrics.processed(
                event.message.topic, event.message.partition, event.message.offset
            )

    def apply_availability(self) -> list[Awaitable[None]]:
        """Bring the served model's unavailable items up to date with the availability
        topic (before every batch, and on a timer); returns the dead letters of the bad
        records read since, to be awaited."""
        if self.availability is None:
            return []
        if self.availability.failed is not None:  # serving on would ignore new changes
            raise RuntimeError(f"availability topic no longer followed: {self.availability.failed}")
        self._catch_up(self.availability)
        return [
            self.dead_letters.send(bad, bad.rejected)
            for bad in self.availability.take_bad_records()
        ]

    def _catch_up(self, availability: AvailabilityFollower) -> None:
        """Apply the availability changes the served model has not had yet."""
        changes = availability.changes_since(self._rules_sequence)
        if changes is None:  # fell behind what the follower keeps: start again
            self._rules_sequence = self._restrict(self.recommender)
        elif changes:
            latest = {change.item_id: change.available for change in changes}
            item_map, now = self.recommender.item_map, time.time()
            for available in (True, False):
                indexes = [item_map.index_of(i) for i, a in latest.items() if a is available]
                known = torch.tensor([i for i in indexes if i >= 0], dtype=torch.int64)
                self.recommender.set_available(known, available)
            # Measured while serving: changes read during start-up wait for the event
            # loop, but no answer is published before they are applied.
            for change in changes if self._serving else ():
                self.metrics.availability_delay.observe(max(now - change.acknowledged, 0.0))
            self._rules_sequence = changes[-1].sequence

    def _restrict(self, recommender: Recommender) -> int:
        """Give ``recommender`` the availability read so far; its sequence number."""
        assert self.availability is not None
        sequence, unavailable = self.availability.snapshot()
        recommender.restrict(unavailable)
        return sequence

    def prepare_model(self, recommender: Recommender) -> tuple[Recommender, int]:
        """A model about to be swapped in, given the current availability (in a thread:
        at a million items and many unavailable ones it takes tens of milliseconds)."""
        if self.availability is None:
            return recommender, 0
        return recommender, self._restrict(recommender)

    def swap_model(self, recommender: Recommender, rules_sequence: int) -> None:
        """Serve ``recommender`` from the next batch on; it obeys the availability up to
        ``rules_sequence`` and is brought up to date now, on the event loop."""
        self.recommender, self._rules_sequence = recommender, rules_sequence
        if self.availability is not None:
            self._catch_up(self.availability)

    def _stored_states(
        self, clicks: list[tuple[InputRecord, SourcedClick]]
    ) -> dict[str, SessionState | None]:
        """The stored state of each clicked session (None: a new session).

        The table holds whatever its changelog held, and anyone can write there: a value
        that does not decode (another format, garbage) would stop the worker at every
        restart, since the batch is redelivered. Its session restarts empty instead,
        counted and logged; the state written after its click replaces the bad value."""
        stored: dict[str, SessionState | None] = {}
        store = self.table.data  # read as _answer writes: the store, without per-key sensors
        for record, sourced in clicks:
            session_id = sourced.click.session_id
            if session_id in stored:
                continue
            raw = store.get(record.key)
            try:
                stored[session_id] = None if raw is None else SessionState.decode(raw)
            except UndecodableState as exc:
                stored[session_id] = None
                self.counters.undecodable_states += 1
                logger.warning(
                    "session %r: its stored state does not decode (%s); it restarts empty",
                    session_id,
                    exc,
                )
        return stored

    @staticmethod
    def _split_misplaced(
        clicks: list[tuple[InputRecord, SourcedClick]], stored: dict[str, SessionState | None]
    ) -> tuple[list[tuple[InputRecord, SourcedClick]], list[tuple[InputRecord, Rejected]]]:
        """Split off the clicks on another partition than their session's.

        A session lives on one partition: its state's changelog record, its expiry and its
        idempotence guard (offsets order clicks within a partition only) all rely on it. A
        producer that does not partition by murmur2 (librdkafka's default, partitions
        added, a re-created topic) can put a session's click elsewhere; its offset then
        says nothing about whether the state has applied it, and the click was dropped
        as a duplicate, silently. It is dead-lettered instead, with its own reason (and
        counted under it), to be re-sent once the producer is fixed: applying it would
        write the session's state to a second changelog partition, and recovery, which
        replays partitions in no set order, could then bring back either copy. A
        session's partition is its stored state's, or, for a new one, its first click's
        in the batch. (A worker only sees the states of its own partitions: a click whose
        session lives on another worker's starts a session of its own there.)"""
        home = {session: s.partition for session, s in stored.items() if s is not None}
        kept: list[tuple[InputRecord, SourcedClick]] = []
        misplaced: list[tuple[InputRecord, Rejected]] = []
        for record, sourced in clicks:
            partition = home.setdefault(sourced.click.session_id, sourced.partition)
            if sourced.partition == partition:
                kept.append((record, sourced))
            else:
                detail = (
                    f"session {sourced.click.session_id!r} lives on partition {partition}, "
                    f"this click is on partition {sourced.partition}: producers must "
                    "partition by murmur2 on the session id"
                )
                misplaced.append((record, Rejected(WRONG_PARTITION, detail)))
        return kept, misplaced

    async def _answer(
        self,
        clicks: list[tuple[InputRecord, SourcedClick]],
        stored: dict[str, SessionState | None],
        consumed_at: float,
        generation: int | None,
    ) -> None:
        store = self.table.data
        recommender = self.recommender  # one version for the whole batch
        started = time.perf_counter()
        outcomes = apply_clicks(
            recommender,
            [c for _, c in clicks],
            stored,
            self.settings.top_n,
            self.settings.exclude_seen,
        )
        self.metrics.scoring_time.observe(time.perf_counter() - started)
        self.metrics.batch_size.observe(len(clicks))
        deliveries = []
        for (record, sourced), outcome in zip(clicks, outcomes):
            self.counters.events += 1
            if outcome.state is None:
                self.counters.duplicates += 1
                continue
            self.counters.unknown_items += not outcome.known_item
            self.counters.shortened_answers += len(outcome.items) < self.settings.top_n
            value = encode_recommendation(
                sourced.click,
                outcome.items,
                outcome.scores,
                recommender.version,
                sourced.partition,
                sourced.offset,
            )
            # The app's producer directly: Topic.send's bookkeeping cost more than the
            # model per click (profiled), and attachments must be bypassed here anyway.
            deliveries.append(
                await self.output.app.producer.send(
                    self.output.get_topic_name(),
                    record.key,
                    value,
                    sourced.partition,
                    None,
                    None,
                )
            )
        await asyncio.gather(*deliveries)
        self.counters.published += len(deliveries)
        answered = [(e, s, o, o.state) for (e, s), o in zip(clicks, outcomes) if o.state]
        if len(answered) < len(clicks) and logger.isEnabledFor(logging.INFO):
            replayed = sorted(
                {(s.partition, s.offset) for (_, s), o in zip(clicks, outcomes) if o.state is None}
            )
            logger.info(
                "%d clicks already applied, not answered again: %s",
                len(replayed),
                _ranges(replayed),
            )
        self.metrics.observe_published(
            time.time(),
            consumed_at,
            [s.click.timestamp for _, s, _, _ in answered],
            [r.timestamp for r, _, _, _ in answered],
        )
        for _, sourced, outcome, _ in answered:
            self.metrics.online.observe(
                sourced.click.session_id,
                sourced.click.item_id,
                outcome.items,
                recommender.version,
                recommender.item_map,
            )
        # What ``table[key] = state`` does in the event's context, without Faust's
        # per-write bookkeeping (a pending-message object, a buffer task, sensors: ~7 % of
        # a worker's CPU, profiled): the state goes into the table's store and its
        # changelog record to the click's partition, sent like the answers. They are
        # awaited before the next batch and before any offset commit; a refused record
        # stops the worker with its clicks uncommitted (see :meth:`await_state_writes`).
        await self.fence.confirm(generation)
        changelog = self.table.changelog_topic.get_topic_name()
        for record, sourced, _, state in answered:
            key, value = cast(bytes, record.key), state.encode()  # clicks have keys
            store[key] = value
            self._state_writes.append(
                await self.output.app.producer.send(
                    changelog, key, value, sourced.partition, None, None
                )
            )
            self.expiry.idle.touch(sourced.partition, key, state.last_time)

    async def await_state_writes(self) -> None:
        """Wait for the changelog records in flight (by now mostly delivered): before a
        batch, and before every offset commit (:func:`faust_patches.hold_commits_until`).

        A record the broker refused raises here, then at every later call: no offset is
        committed past it, and the worker exits instead of going on with a table its
        changelog no longer matches; its clicks are redelivered to the next one."""
        writes, self._state_writes = self._state_writes, []
        if self._write_failure is None:
            try:
                await asyncio.gather(*writes)
            except Exception as exc:  # the delivery error, whatever its type
                self._write_failure = exc
        if isinstance(self._write_failure, MembershipLost):  # failed by the producer's fence
            raise MembershipLost(str(self._write_failure)) from self._write_failure
        if self._write_failure is not None:
            raise RuntimeError(
                f"a changelog record was refused: {self._write_failure!r}"
            ) from self._write_failure

    def _expired(self, keys: list[bytes]) -> None:
        self.counters.expired += len(keys)
        self._forget(keys)

    def _forget(self, keys: list[bytes]) -> None:
        """Stop judging the live quality of these sessions: they are gone from the table."""
        self.metrics.online.forget(key.decode("utf-8", "replace") for key in keys)

    def on_rebalance(
        self,
        app: AppT,
        /,
        *partitions: Set[TP],
        signal: BaseSignalT[Any] | None = None,
        **_: Any,
    ) -> None:
        """Faust's partition signals, revoked then assigned (``partitions``: the one set
        each sends). The worker is not ready until a refresh finds the rebalance over.
        Expiry's knowledge of the sessions may be stale now. Once the new
        assignment is known, the sessions of the input partitions this worker lost are
        dropped (:meth:`_drop_sessions`); only then: under Kafka's eager protocol the
        revoked signal names every partition, those the worker keeps too, and anything
        but the assigned signal drops nothing."""
        self.expiry.reset()
        self.health.not_ready_reason = REBALANCING
        self.sequence.reset()
        if signal is None or signal is not app.on_partitions_assigned:
            return
        topic = self.settings.input_topic
        owned = {tp.partition for tps in partitions for tp in tps if tp.topic == topic}
        lost, self._owned = self._owned - owned, owned
        if lost:
            self._drop_sessions(owned)
            # Their expiry markers are their new owner's to send.
            self.expiry.watermarks.forget(lost)

    def _drop_sessions(self, owned: set[int]) -> None:
        """Drop from this worker's memory the sessions that do not live on ``owned``.

        Nothing else would: the memory store forgets at recovery only the keys it
        recovered itself (``stores/memory.py``), never those the worker wrote, and a
        session of another worker's partition never clicks here again to be expired, so
        the table (``streamrec_active_sessions``) and the quality tracker only grew with
        every partition that moved away.

        They are dropped from the store itself, not deleted from the table: a table
        deletion writes a changelog tombstone, and the changelog partition is the new
        owner's now, holding the sessions it serves. Dropping loses nothing: the
        changelog keeps every state this worker wrote (each was delivered before its
        batch was committed, and the rebalance waited for the batch), the new owner
        recovers them from it, and if a partition comes back here Faust replays it from
        the start, as it forgot the partition's recovery offset at revocation
        (``Recovery.revoke``; the memory store has no persisted offset). Recovery writes
        only the partitions assigned, and the agent reads nothing between the
        revocation and the end of recovery, so nothing of ``owned`` is missed.

        The expiry index has been reset by the rebalance (it is rebuilt from the table,
        now holding only ``owned``, at the next marker). Entries that do not decode have
        no known partition and stay: they come only from changelog recovery, so the
        store drops them itself once recovery is over. Costs one scan of the table's
        headers (~1 us a session) per rebalance that takes partitions away."""
        store = self.table.data
        by_partition, _ = sessions_by_partition(store.items())
        dropped = [key for p, times in by_partition.items() if p not in owned for key in times]
        for key in dropped:
            del store[key]
        self._forget(dropped)
        logger.info(
            "dropped %d sessions of partitions no longer assigned; %d held for partitions %s",
            len(dropped),
            len(store),
            sorted(owned),
        )


def _ranges(sources: list[tuple[int, int]]) -> str:
    """``[(partition, offset)]`` (sorted) as ``p3 10..12 15, p4 7``, for the logs."""
    parts: dict[int, list[list[int]]] = {}
    for partition, offset in sources:
        runs = parts.setdefault(partition, [])
        if runs and runs[-1][1] == offset - 1:
            runs[-1][1] = offset
        else:
            runs.append([offset, offset])
    return ", ".join(
        f"p{partition} " + " ".join(f"{a}..{b}" if a < b else str(a) for a, b in runs)
        for partition, runs in parts.items()
    )
