"""Four targeted corrections to faust-streaming 0.15 / mode 0.7, one observation of
aiokafka 0.14 and one guard in its producer, applied once at start-up, and the two
private hooks the worker needs (:class:`in_context_of`, :func:`sought_offset`).

1. **Lost events after recovery.** At the end of table recovery Faust resumes flow control,
   and mode's ``FlowControlEvent.resume()`` always clears the stream queues, dropping
   events that were already fetched (and marked read) when flow control had not actually
   been suspended: the agent sees a jump in offsets and those clicks are never answered.
   Here queues are cleared only when flow was suspended, which is the purpose of the
   clearing (discarding data fetched for partitions that were revoked meanwhile).
2. **Fetched records dropped without rewinding.** ``Consumer.getmany`` discards records
   that arrive while flow is stopped (a rebalance is under way), records of a partition
   that is paused, and the rest of a batch when the group generation changes, and only
   then seeks *stream* partitions back to their committed offsets. Nothing rewinds a
   changelog partition (it has no committed offset): table recovery, which had sought it
   to where it must start reading, then waits forever for records that were already
   consumed and dropped, and the worker never serves again (seen about once in twenty
   rebalances on a loaded machine). The same happens to a click partition of a new group
   before its first commit. Here every partition whose records were not all handed on is
   sought back to its first undelivered record before Faust's own seek to committed
   offsets, so a dropped record is always fetched again.
3. **Fetch latency.** Faust hard-codes ``fetch_max_wait_ms=1500`` for the worker consumer.
   Apache Kafka answers a waiting fetch as soon as data arrives, but brokers that do not
   (Tansu) then add the full wait to every click's latency; the worker's setting bounds it.

4. **Offsets committed past failed changelog records.** The worker writes its states'
   changelog records itself (see :mod:`stream.serving.processor`), not as Faust
   "attachments", so Faust's commit, which only flushes the producer, committed the
   offsets of clicks whose records the broker had refused: never redelivered, their
   sessions went on from states without them. :func:`hold_commits_until` makes each
   commit first await the app's barrier (the writes in flight), and a failure there
   crashes the app the way Faust handles a failed attachment: nothing is committed.

5. **Group membership, observed.** The consumer thread's group coordinator records, for
   :mod:`stream.serving.fencing`, when each heartbeat the coordinator accepted was sent,
   when a join completed, and when the member was dropped; aiokafka keeps the first in a
   local variable and exposes none of them.

6. **Fenced produce requests.** Before aiokafka's sender sends a produce request, the
   records of topics that :func:`stream.serving.fencing.guard` names wait for a confirmed
   group membership, and are failed instead of sent if it lapsed.

All touch private attributes of pinned versions (``faust-streaming>=0.15,<0.16``,
``mode-streaming`` 0.7); tests/test_faust_patches.py pins each behaviour, and the tests that
restart workers, rebalance groups and measure latency would catch a change in any.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from aiokafka.consumer.group_coordinator import GroupCoordinator
from aiokafka.producer.sender import Sender
from faust.exceptions import ProducerSendError
from faust.streams import _current_event
from faust.transport.consumer import Consumer
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.types import TP, EventT, Message
from mode.utils.queues import FlowControlEvent

from stream.serving import fencing

logger = logging.getLogger("streamrec.worker")

_fetch_max_wait_ms = 10
_applied = False


def _resume(self: FlowControlEvent) -> None:
    was_suspended = self._suspend.is_set()
    self._suspend.clear()
    self._resume.set()
    if was_suspended:
        self.clear()


async def _getmany(self: Consumer, timeout: float) -> AsyncIterator[tuple[TP, Message]]:
    """Faust's ``getmany`` (round-robin over partitions, stop on a stopped flow or a new
    generation), except that what it does not hand on is fetched again."""
    records, active_partitions = await self._wait_next_records(timeout)
    generation_id = self.app.consumer_generation_id
    if records is None or self.should_stop:
        return
    # Per partition, the first offset not handed on; a partition stays behind from its
    # first skipped record on, so that its later records are not delivered out of order.
    undelivered = {tp: batch[0].offset for tp, batch in records.items() if batch}
    held_back: set[TP] = set()
    if self.flow_active:
        for tp, record in self.scheduler.iterate(records):
            if not self.flow_active or self.app.consumer_generation_id != generation_id:
                break
            deliverable = (
                active_partitions is None
                or tp in active_partitions
                or tp in self._buffered_partitions
            )
            if tp in held_back or not deliverable:
                held_back.add(tp)
                continue
            self.app.monitor.track_tp_end_offset(tp, self.highwater(tp))
            undelivered[tp] = record.offset + 1
            yield tp, self._to_message(tp, record)
    rewind = {tp: offset for tp, offset in undelivered.items() if offset <= records[tp][-1].offset}
    if rewind:
        await _seek_back(self, rewind)
    if not self.flow_active:  # Faust's own rule for stream partitions, as Faust does it
        try:
            await self.perform_seek()
        except Exception as exc:  # a partition revoked meanwhile (IllegalStateError)
            logger.warning("could not seek to committed offsets while flow is stopped: %r", exc)


async def _seek_back(consumer: Consumer, offsets: Mapping[TP, int]) -> None:
    assigned = consumer.assignment()
    offsets = {tp: offset for tp, offset in offsets.items() if tp in assigned}
    if not offsets:
        return
    try:
        await consumer.seek_wait(offsets)
    except Exception as exc:  # revoked meanwhile: its new owner starts from the commit
        logger.warning("could not seek back to undelivered records %s: %r", offsets, exc)


#: Per app, what every offset commit awaits first (see :func:`hold_commits_until`).
_commit_barriers: weakref.WeakKeyDictionary[Any, Callable[[], Awaitable[None]]] = (
    weakref.WeakKeyDictionary()
)
_handle_attached = Consumer._handle_attached


def hold_commits_until(app: Any, barrier: Callable[[], Awaitable[None]]) -> None:
    """Make every offset commit of ``app`` first await ``barrier``; if it raises, the
    app crashes instead of committing (Faust's own rule for attached messages)."""
    _commit_barriers[app] = barrier


async def _handle_attached_after_barrier(self: Consumer, commit_offsets: Mapping[TP, int]) -> None:
    barrier = _commit_barriers.get(self.app)
    if barrier is not None:
        try:
            await barrier()
        except Exception as exc:
            raise ProducerSendError(f"not committing: {exc!r}") from exc
    await _handle_attached(self, commit_offsets)


_do_heartbeat = GroupCoordinator._do_heartbeat
_on_join_complete = GroupCoordinator._on_join_complete
_reset_generation = GroupCoordinator.reset_generation


async def _do_heartbeat_observed(self: GroupCoordinator) -> bool:
    sent_at, generation = time.monotonic(), self.generation
    accepted: bool = await _do_heartbeat(self)
    # True also while the group rebalances: the member is kept and still owns its
    # partitions until it has revoked them and joined again (eager protocol).
    if accepted and self.generation == generation:
        fencing.confirmed(self.group_id, generation, sent_at)
    return accepted


async def _on_join_complete_observed(self: GroupCoordinator, generation: int, *args: Any) -> None:
    fencing.confirmed(self.group_id, generation, time.monotonic())
    await _on_join_complete(self, generation, *args)


def _reset_generation_observed(self: GroupCoordinator) -> None:
    fencing.lapsed(self.group_id)
    _reset_generation(self)


_send_produce_req = Sender._send_produce_req


async def _send_produce_req_fenced(self: Sender, node_id: int, batches: dict[Any, Any]) -> None:
    """aiokafka's ``_send_produce_req``, after failing the batches of guarded topics whose
    group membership lapsed (the partitions stay muted until the original unmutes them)."""
    for topic in {tp.topic for tp in batches}:
        fence = fencing.guarding(topic)
        if fence is None:
            continue
        try:
            await fence.confirm_current()
        except fencing.MembershipLost as exc:
            for tp in [tp for tp in batches if tp.topic == topic]:
                batches.pop(tp).failure(exception=exc)
                self._muted_partitions.remove(tp)
    if batches:
        await _send_produce_req(self, node_id, batches)
    else:
        self._in_flight.remove(node_id)


def apply(fetch_max_wait_ms: int) -> None:
    """Install the fixes (idempotent); ``fetch_max_wait_ms`` bounds a fetch's wait."""
    global _fetch_max_wait_ms, _applied
    _fetch_max_wait_ms = fetch_max_wait_ms
    if _applied:
        return
    FlowControlEvent.resume = _resume  # type: ignore[method-assign]
    Consumer.getmany = _getmany  # type: ignore[method-assign]
    Consumer._handle_attached = _handle_attached_after_barrier  # type: ignore[method-assign]
    GroupCoordinator._do_heartbeat = _do_heartbeat_observed
    GroupCoordinator._on_join_complete = _on_join_complete_observed
    GroupCoordinator.reset_generation = _reset_generation_observed
    Sender._send_produce_req = _send_produce_req_fenced
    create = AIOKafkaConsumerThread._create_worker_consumer

    def _create_worker_consumer(self: Any, transport: Any) -> Any:  # Faust's signature
        consumer = create(self, transport)
        consumer._fetch_max_wait_ms = _fetch_max_wait_ms
        return consumer

    AIOKafkaConsumerThread._create_worker_consumer = _create_worker_consumer  # type: ignore
    _applied = True


def sought_offset(app: Any, tp: TP) -> int | None:
    """The offset Faust's consumer sought ``tp`` to when its assignment began, as Faust
    knows it without asking the broker: ``Consumer._committed_offset``, which the seek to
    committed offsets at the end of every rebalance fills (and the revocation empties).
    None when Faust does not know it (not sought yet, nothing committed, or 0, which Faust
    stores as None). Until the agent acknowledges a click of ``tp`` nothing else writes it,
    so for the first click of an assignment it is where the assignment starts."""
    offset = app.consumer._committed_offset.get(tp)
    return None if offset is None else int(offset)


class in_context_of:
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
