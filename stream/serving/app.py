"""The Faust worker: clicks in, per-session GRU state in a table, top-N out.

Where a click goes:

1. The ``clicks`` agent (concurrency 1) takes micro-batches of events
   (``batch_size``/``batch_ms``).
2. Each message is validated (:mod:`stream.kafka.wire`); a bad one goes to the dead-letter
   topic with its reason and original bytes, and the batch goes on.
3. The sessions' states are read from the ``sessions`` table and the whole batch is scored
   with one model call per wave (:mod:`stream.serving.scoring`).
4. The recommendations are published and their delivery awaited; only then is each new
   state written to the table, its changelog record sent to the click's partition
   (what a table write in the event's context does; faust-streaming #497). Because a
   state is never written before its click's output was delivered, a click found
   already applied after a crash (offset check) already has its output: state is
   exactly-once, output at least once.
5. Expiry: a timer sends, per assigned partition, a marker to the co-partitioned
   ``<app>-expiry`` topic; when the agent reads it, it deletes that partition's sessions
   idle by then (event time, found by :mod:`stream.serving.expiry` without scanning the
   table) in the marker's context, which writes changelog tombstones.

An unexpected exception (a bug, not bad input) stops the process without committing the
batch, so it is redelivered to the restarted worker instead of being acked and lost.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import math
import os
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import faust
from aiokafka.errors import MessageSizeTooLargeError, RecordListTooLargeError
from faust.exceptions import ProducerSendError
from faust.streams import _current_event
from faust.types import EventT

from model.inference import Recommender
from stream.kafka.wire import MAX_MESSAGE_BYTES, Rejected, encode_recommendation, parse_click
from stream.serving.metrics import ProcessorMetrics
from stream.serving.expiry import IdleSessions
from stream.kafka.config import faust_credentials
from stream.serving.scoring import SourcedClick, apply_clicks
from stream.serving.settings import WorkerSettings
from stream.serving.state import SessionState

logger = logging.getLogger("streamrec.worker")


# Compacted, with small segments: the active segment is never compacted, and a state is
# rewritten on every click, so large segments would make recovery replay stale copies.
CHANGELOG_CONFIG = {"cleanup.policy": "compact", "segment.ms": "600000",
                    "min.cleanable.dirty.ratio": "0.2"}


# A dead letter is the rejected message plus headers, so a message the broker accepted
# near its max.message.bytes may not fit the dead-letter topic. The client does not refuse
# it first (aiokafka's own default limit is below the broker's: such a message used to stop
# the worker at every restart); if the broker refuses it, the copy keeps this many bytes of
# the key and of the value, and a streamrec-truncated header gives the original lengths.
PRODUCER_MAX_REQUEST_BYTES = 64 * 1024 * 1024
TRUNCATED_DEAD_LETTER_BYTES = MAX_MESSAGE_BYTES


# Most idle sessions deleted (changelog tombstones written) when a marker arrives, and
# after a batch, one per event of the batch (at least the floor): a large expiry pass is
# spread over the following batches instead of stopping the worker for it, and its cost
# follows the load. A flat 256 per batch made small batches (5 clicks at 1,000 clicks/s)
# carry 50x their own work in tombstones, and the pass left after a burst held every
# click for up to ~0.6 s (40k items); expiry still outpaces session starts (a session is
# several clicks).
EXPIRY_DELETES_PER_MARKER = 256
EXPIRY_DELETES_FLOOR = 4


def _too_large(exc: BaseException) -> bool:
    """A producer error meaning the message exceeds a size limit (client's or broker's)."""
    cause = exc.__cause__ if isinstance(exc, ProducerSendError) else exc
    return isinstance(cause, (MessageSizeTooLargeError, RecordListTooLargeError))


def changelog_topic(settings: WorkerSettings) -> str:
    return f"{settings.app_id}-sessions-changelog"


def expiry_topic(settings: WorkerSettings) -> str:
    return f"{settings.app_id}-expiry"


@dataclass
class WorkerCounters:
    """Plain counts, exported as metrics and printed by the demo."""

    events: int = 0
    published: int = 0
    duplicates: int = 0
    unknown_items: int = 0
    expired: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    swaps: int = 0            # models swapped in by the registry watcher (stream.serving.hot_swap)
    rejected_models: int = 0  # registry versions that failed verification, never served


class ClickProcessor:
    """Everything the agent does with one batch; holds the current model."""

    def __init__(self, settings: WorkerSettings, recommender: Recommender, table: faust.Table,
                 output: faust.TopicT, dead_letters: faust.TopicT) -> None:
        self.settings = settings
        self.recommender = recommender
        self.table = table
        self.output = output
        self.dead_letters = dead_letters
        self.counters = WorkerCounters()
        self.watermarks: dict[int, float] = {}
        self._expiry_topic = expiry_topic(settings)
        self.metrics = ProcessorMetrics()  # histograms, live quality (stream.serving.metrics)
        self._serving = False
        self.idle = IdleSessions()  # what expiry deletes (dropped at each rebalance)
        # partition -> (its last expiry marker, the cut-off, idle sessions left to delete)
        self._expiring: dict[int, tuple[EventT, float, list[bytes]]] = {}
        self._state_writes: list[asyncio.Future] = []  # changelog records in flight

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
                self._expire(event)
                continue
            parsed = parse_click(message.key, message.value, now)
            if isinstance(parsed, Rejected):
                dead_letters.append(self._dead_letter(event, parsed))
                continue
            clicks.append((event, SourcedClick(parsed, message.partition, message.offset)))
            mark = self.watermarks.get(message.partition, 0.0)
            self.watermarks[message.partition] = max(mark, parsed.timestamp)
        # Dead letters are sent together with the answers and all delivered before the
        # batch is committed (awaiting each one's delivery in turn capped a worker at about
        # 130 bad messages/s, a flood of which then delayed every good click behind it).
        await asyncio.gather(*dead_letters, *([self._answer(clicks, now)] if clicks else []))
        self._delete_expired(max(EXPIRY_DELETES_FLOOR, len(events)))
        for event in events:
            self.metrics.processed(event.message.topic, event.message.partition,
                                   event.message.offset)

    async def _answer(self, clicks: list[tuple[EventT, SourcedClick]],
                      consumed_at: float) -> None:
        stored: dict[str, SessionState | None] = {}
        store = self.table.data  # read as written below: the store, without per-key sensors
        for event, sourced in clicks:
            session_id = sourced.click.session_id
            if session_id not in stored:
                raw = store.get(event.message.key)
                stored[session_id] = SessionState.decode(raw) if raw is not None else None
        recommender = self.recommender  # one version for the whole batch
        started = time.perf_counter()
        outcomes = apply_clicks(recommender, [c for _, c in clicks], stored,
                                self.settings.top_n)
        self.metrics.scoring_time.observe(time.perf_counter() - started)
        self.metrics.batch_size.observe(len(clicks))
        deliveries = []
        for (event, sourced), outcome in zip(clicks, outcomes):
            self.counters.events += 1
            if outcome.state is None:
                self.counters.duplicates += 1
                continue
            self.counters.unknown_items += not outcome.known_item
            value = encode_recommendation(sourced.click, outcome.items, outcome.scores,
                                          recommender.version, sourced.partition,
                                          sourced.offset)
            # The app's producer directly: Topic.send's bookkeeping cost more than the
            # model per click (profiled), and attachments must be bypassed here anyway.
            deliveries.append(await self.output.app.producer.send(
                self.output.get_topic_name(), event.message.key, value, sourced.partition,
                None, None))
        await asyncio.gather(*deliveries)
        self.counters.published += len(deliveries)
        answered = [(e, s, o) for (e, s), o in zip(clicks, outcomes) if o.state is not None]
        self.metrics.observe_published(time.time(), consumed_at,
                                       [s.click.timestamp for _, s, _ in answered],
                                       [e.message.timestamp for e, _, _ in answered])
        for _, sourced, outcome in answered:
            self.metrics.online.observe(sourced.click.session_id, sourced.click.item_id,
                                        outcome.items, recommender.version,
                                        recommender.item_map)
        # What ``table[key] = state`` does in the event's context, without Faust's
        # per-write bookkeeping (a pending-message object, a buffer task, sensors: ~7 % of
        # a worker's CPU, profiled): the state goes into the table's store and its
        # changelog record to the click's partition, sent like the answers. Faust flushes
        # the producer before it commits offsets; a failed write stops the worker at the
        # next batch (see :meth:`_await_state_writes`).
        changelog = self.table.changelog_topic.get_topic_name()
        for event, sourced, outcome in answered:
            key, value = event.message.key, outcome.state.encode()
            store[key] = value
            self._state_writes.append(await self.output.app.producer.send(
                changelog, key, value, sourced.partition, None, None))
            self.idle.touch(sourced.partition, key, outcome.state.last_time)

    async def _await_state_writes(self) -> None:
        """Wait for the previous batch's changelog records (by now mostly delivered).

        A record the broker refused raises here, and the worker exits instead of going on
        with a table its changelog no longer matches."""
        writes, self._state_writes = self._state_writes, []
        await asyncio.gather(*writes)

    async def _dead_letter(self, event: EventT, rejected: Rejected) -> None:
        message = event.message
        self.counters.rejected[rejected.reason] = self.counters.rejected.get(rejected.reason, 0) + 1
        headers = [("streamrec-reason", rejected.reason.encode()),
                   ("streamrec-detail", rejected.detail.encode("utf-8", "replace")[:1000]),
                   ("streamrec-source", f"{message.topic}/{message.partition}/"
                                        f"{message.offset}".encode())]
        key, value = message.key, message.value or b""
        try:
            await self._send_dead_letter(key, value, headers)
        except Exception as exc:
            limit = TRUNCATED_DEAD_LETTER_BYTES
            if not _too_large(exc) or (len(key or b"") <= limit and len(value) <= limit):
                raise
            logger.warning("dead letter of %s/%s/%s too large (%s): truncated", message.topic,
                           message.partition, message.offset, exc)
            headers.append(("streamrec-truncated",
                            f"key={len(key or b'')} value={len(value)}".encode()))
            await self._send_dead_letter(key if key is None else key[:limit], value[:limit],
                                         headers)
        logger.info("rejected %s/%s/%s: %s", message.topic, message.partition,
                    message.offset, rejected.detail)

    async def _send_dead_letter(self, key: bytes | None, value: bytes,
                                headers: list[tuple[str, bytes]]) -> None:
        """Send and await delivery. The app's producer directly, as for the answers: a
        failed Topic.send also leaves an unretrieved future that logs a spurious error."""
        delivery = await self.dead_letters.app.producer.send(
            self.dead_letters.get_topic_name(), key, value, None, None, headers)
        await delivery

    def expiry_markers(self) -> dict[int, float]:
        """Per partition with sessions, the event time before which sessions expire."""
        timeout = self.settings.session_timeout_s
        return {p: mark - timeout for p, mark in self.watermarks.items()}

    def _expire(self, event: EventT) -> None:
        """Delete the marker's partition's idle sessions, in the marker's context.

        The cut-off is the later of the marker's (computed when it was sent) and the one
        the partition's clicks applied since then give: under a backlog a marker reaches
        the agent long after it was sent, and its own cut-off would keep sessions that
        have meanwhile gone idle (bench soak measured tables 2.5-4x too large)."""
        try:
            sent_before = float(json.loads(event.message.value)["before"])
        except (ValueError, KeyError, TypeError):
            logger.warning("ignored a malformed expiry marker")
            return
        partition = event.message.partition
        before = max(sent_before, self.watermarks.get(partition, -math.inf)
                     - self.settings.session_timeout_s)
        self._expiring[partition] = (event, before,
                                     self.idle.idle_before(partition, before, self.table))
        self._delete_expired(EXPIRY_DELETES_PER_MARKER)

    def _delete_expired(self, budget: int) -> None:
        """Delete up to ``budget`` sessions that markers found idle.

        Called for each marker and after each batch: a pass that finds thousands of idle
        sessions (a burst of sessions ending together, a backlog) would otherwise write
        thousands of tombstones in one step and hold every click behind it. A session
        that clicked since its marker is kept."""
        for partition in list(self._expiring):
            event, before, keys = self._expiring[partition]
            chunk, rest = keys[:budget], keys[budget:]
            if rest:
                self._expiring[partition] = (event, before, rest)
            else:
                del self._expiring[partition]
            budget -= len(chunk)
            doomed = [key for key in chunk if self.idle.still_idle(partition, key, before)]
            with _in_context_of(event):
                for key in doomed:
                    del self.table[key]
            self.idle.forget(partition, doomed)
            self.counters.expired += len(doomed)
            self.metrics.online.forget(key.decode("utf-8", "replace") for key in doomed)
            if budget <= 0:
                return

    def on_rebalance(self, *_: object, **__: object) -> None:
        """Partitions moved: what this worker knew of its sessions' idleness may be wrong
        (revoked partitions are another worker's now, assigned ones were recovered)."""
        self.idle.invalidate()
        self._expiring.clear()


class _in_context_of:
    """Make ``event`` Faust's current event, so table writes go to its partition.

    Inside ``take_events()`` the agent task has no current event (a background drainer
    fills the buffer: faust-streaming #497), and Faust refuses table writes. Setting the
    private ``_current_event`` ContextVar for the duration of the write is the verified
    workaround; it is confined to this class.
    """

    def __init__(self, event: EventT) -> None:
        self._event = event

    def __enter__(self) -> None:
        self._token = _current_event.set(weakref.ref(self._event))

    def __exit__(self, *exc: object) -> None:
        _current_event.reset(self._token)


def faust_app(settings: WorkerSettings) -> faust.App:
    """A Faust app configured for low-latency serving (also used by the no-op benchmark)."""
    data_dir = settings.faust_data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    session_timeout = settings.group_session_timeout_s
    return faust.App(
        settings.app_id,
        broker=f"kafka://{settings.bootstrap}",
        broker_credentials=faust_credentials(),
        store="memory://",
        datadir=str(data_dir),
        autodiscover=False,
        topic_partitions=settings.partitions,
        topic_replication_factor=1,
        topic_disable_leader=True,
        table_standby_replicas=0,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=session_timeout,
        broker_heartbeat_interval=session_timeout / 5,
        broker_rebalance_timeout=max(2 * session_timeout, 20.0),
        broker_request_timeout=max(3 * session_timeout, 30.0),
        broker_commit_interval=1.0,
        # The agent waits for its answers' delivery before writing states, so the
        # linger is paid by every batch: at 40k items 1 ms instead of 5 gave p50 17-18
        # instead of 27-30 ms and 2,967-3,038 instead of 2,882-2,988 events/s.
        producer_linger_ms=1,
        producer_max_request_size=PRODUCER_MAX_REQUEST_BYTES,  # the broker's limit applies
        # The worker serves /metrics, /healthz and /readyz itself (stream.serving.metrics):
        # Faust's web server (which can expose table contents) stays off.
        web_enabled=False,
    )


def raw_topic(app: faust.App, settings: WorkerSettings, *names: str) -> faust.TopicT:
    """A topic of raw bytes. Faust's default JSON codec would drop undecodable clicks
    before the agent could route them to the dead-letter topic."""
    return app.topic(*names, key_type=bytes, value_type=bytes, key_serializer="raw",
                     value_serializer="raw", partitions=settings.partitions)


def create_app(settings: WorkerSettings, recommender: Recommender) -> tuple[faust.App, ClickProcessor]:
    """The Faust app (topics, table, agent, expiry timer) and its processor."""
    app = faust_app(settings)
    clicks = raw_topic(app, settings, settings.input_topic, expiry_topic(settings))
    output = raw_topic(app, settings, settings.output_topic)
    dead_letters = raw_topic(app, settings, settings.dlq_topic)
    expiry = raw_topic(app, settings, expiry_topic(settings))
    table = app.Table("sessions", key_type=bytes, value_type=bytes, default=None,
                      partitions=settings.partitions, extra_topic_configs=CHANGELOG_CONFIG)
    processor = ClickProcessor(settings, recommender, table, output, dead_letters)
    app.on_partitions_revoked.connect(processor.on_rebalance)
    app.on_partitions_assigned.connect(processor.on_rebalance)

    @app.agent(clicks, concurrency=1)
    async def answer_clicks(stream: faust.StreamT) -> None:
        async for events in stream.take_events(settings.batch_size,
                                               within=settings.batch_ms / 1000.0):
            try:
                await processor.process(events)
            except Exception:  # a bug: do not let take_events() ack the batch
                logger.critical("unexpected error; exiting so the batch is redelivered",
                                exc_info=True)
                logging.shutdown()
                os._exit(70)

    @app.timer(settings.expiry_interval_s)
    async def send_expiry_markers() -> None:
        for partition, before in processor.expiry_markers().items():
            await expiry.send(key=b"expiry", value=json.dumps({"before": before}).encode(),
                              partition=partition, force=True)

    return app, processor
