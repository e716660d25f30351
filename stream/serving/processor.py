"""What the worker does with one batch of events: clicks in, states and answers out.

For each batch the agent hands over (:mod:`stream.serving.app`):

1. Each message is validated (:mod:`stream.kafka.wire`); a bad one goes to the
   dead-letter topic with its reason and original bytes (:mod:`stream.serving.dead_letters`),
   and the batch goes on. Expiry markers go to :mod:`stream.serving.expiry`.
2. The sessions' states are read from the ``sessions`` table and the whole batch is scored
   with one model call per wave (:mod:`stream.serving.scoring`).
3. The recommendations are published and their delivery awaited; only then is each new
   state written to the table, its changelog record sent to the click's partition
   (what a table write in the event's context does; faust-streaming #497). Because a
   state is never written before its click's output was delivered, a click found
   already applied after a crash (offset check) already has its output: state is
   exactly-once, output at least once.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Awaitable, Sequence
from typing import Any, cast

import faust
from faust.types import EventT, TableT

from model.inference import Recommender
from stream.kafka.wire import Rejected, encode_recommendation, parse_click
from stream.serving.dead_letters import DeadLetters
from stream.serving.expiry import EXPIRY_DELETES_FLOOR, SessionExpiry
from stream.serving.metrics import Health, WorkerCounters, WorkerMetrics
from stream.serving.scoring import SourcedClick, apply_clicks
from stream.serving.settings import WorkerSettings
from stream.serving.state import SessionState
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
        self.table = table
        self.output = output
        self.counters = WorkerCounters()
        self.metrics = WorkerMetrics()
        self.health = Health()
        self.dead_letters = DeadLetters(dead_letters, self.counters.rejected)
        self.expiry = SessionExpiry(table, settings.session_timeout_s, self._expired)
        self._expiry_topic = expiry_topic(settings)
        self._serving = False
        self._state_writes: list[Awaitable[Any]] = []  # changelog records in flight

    async def process(self, events: Sequence[EventT]) -> None:
        logger.debug("batch of %d events", len(events))
        if not self._serving:
            # Everything alive when serving starts (Faust, aiokafka, torch, the model, the
            # recovered table) lives as long as the worker: freeze it out of the cyclic
            # collector, whose full passes over it stopped the event loop for 200-230 ms
            # (measured at 40k items), a stall that every click in flight waited for.
            gc.freeze()
            self._serving = True
        await self._await_state_writes()
        now = time.time()
        clicks: list[tuple[EventT, SourcedClick]] = []
        dead_letters = []
        for event in events:
            message = event.message
            if message.topic == self._expiry_topic:
                self.expiry.on_marker(event)
                continue
            parsed = parse_click(message.key, message.value, now)
            if isinstance(parsed, Rejected):
                dead_letters.append(self.dead_letters.send(message, parsed))
                continue
            clicks.append((event, SourcedClick(parsed, message.partition, message.offset)))
            self.expiry.watermarks.advance(message.partition, parsed.timestamp)
        # Dead letters are sent together with the answers and all delivered before the
        # batch is committed: awaiting each one's delivery in turn would cap a worker at
        # about 130 bad messages/s, and a flood of them would delay every good click.
        await asyncio.gather(*dead_letters, *([self._answer(clicks, now)] if clicks else []))
        self.expiry.delete_idle(max(EXPIRY_DELETES_FLOOR, len(events)))
        for event in events:
            self.metrics.processed(
                event.message.topic, event.message.partition, event.message.offset
            )

    async def _answer(self, clicks: list[tuple[EventT, SourcedClick]], consumed_at: float) -> None:
        stored: dict[str, SessionState | None] = {}
        store = self.table.data  # read as written below: the store, without per-key sensors
        for event, sourced in clicks:
            session_id = sourced.click.session_id
            if session_id not in stored:
                raw = store.get(event.message.key)
                stored[session_id] = SessionState.decode(raw) if raw is not None else None
        recommender = self.recommender  # one version for the whole batch
        started = time.perf_counter()
        outcomes = apply_clicks(recommender, [c for _, c in clicks], stored, self.settings.top_n)
        self.metrics.scoring_time.observe(time.perf_counter() - started)
        self.metrics.batch_size.observe(len(clicks))
        deliveries = []
        for (event, sourced), outcome in zip(clicks, outcomes):
            self.counters.events += 1
            if outcome.state is None:
                self.counters.duplicates += 1
                continue
            self.counters.unknown_items += not outcome.known_item
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
                    event.message.key,
                    value,
                    sourced.partition,
                    None,
                    None,
                )
            )
        await asyncio.gather(*deliveries)
        self.counters.published += len(deliveries)
        answered = [(e, s, o, o.state) for (e, s), o in zip(clicks, outcomes) if o.state]
        self.metrics.observe_published(
            time.time(),
            consumed_at,
            [s.click.timestamp for _, s, _, _ in answered],
            [e.message.timestamp for e, _, _, _ in answered],
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
        # changelog record to the click's partition, sent like the answers. Faust flushes
        # the producer before it commits offsets; a failed write stops the worker at the
        # next batch (see :meth:`_await_state_writes`).
        changelog = self.table.changelog_topic.get_topic_name()
        for event, sourced, _, state in answered:
            key, value = cast(bytes, event.message.key), state.encode()  # clicks have keys
            store[key] = value
            self._state_writes.append(
                await self.output.app.producer.send(
                    changelog, key, value, sourced.partition, None, None
                )
            )
            self.expiry.idle.touch(sourced.partition, key, state.last_time)

    async def _await_state_writes(self) -> None:
        """Wait for the previous batch's changelog records (by now mostly delivered).

        A record the broker refused raises here, and the worker exits instead of going on
        with a table its changelog no longer matches."""
        writes, self._state_writes = self._state_writes, []
        await asyncio.gather(*writes)

    def _expired(self, keys: list[bytes]) -> None:
        self.counters.expired += len(keys)
        self.metrics.online.forget(key.decode("utf-8", "replace") for key in keys)

    def on_rebalance(self, *_: object, **__: object) -> None:
        """Faust's partition signals: expiry's knowledge of the sessions may be stale."""
        self.expiry.reset()
