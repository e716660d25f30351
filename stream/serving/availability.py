"""Item availability: every worker follows the whole availability topic.

The topic (default ``item-availability``) is compacted: key = item id (UTF-8), value =
JSON ``{"available": bool}`` (other fields ignored), a tombstone (no value) = available
again. Unlike the clicks, it is not partitioned among the workers: each one ranks the whole
catalogue, so each needs every item's availability. Faust's ``GlobalTable`` would do that
but is unreliable with several instances (faust-streaming #283), so a plain consumer in a
thread of its own reads every partition from the beginning, outside any consumer group,
and never commits.

- **Start**: the worker reads the topic to the end offsets it found at start before it
  joins the click group (:meth:`AvailabilityFollower.wait_until_read`), so no click is
  answered with an older catalogue than the one the topic held at start.
- **Then**: changes are kept in order with a sequence number and the broker's timestamp
  of the record (the topic is created with ``message.timestamp.type=LogAppendTime``, so
  that is when the broker acknowledged the change). The event loop takes the changes it
  has not applied (:meth:`changes_since`) before every batch and on a short timer, and
  applies them to the served model (:meth:`model.inference.Recommender.set_available`).
- **Unknown ids** are remembered: a model version that learns the item later gets it
  unavailable at the swap (:meth:`snapshot`).
- **Bad records** (no key, a key or value that is not what the format says) change
  nothing; they are handed to the event loop to be dead-lettered with the clicks' reasons
  and headers (:mod:`stream.serving.dead_letters`). The topic is read again from the start
  by every worker at every start, so one bad record may be dead-lettered more than once.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from model.errors import UserError
from stream.kafka.config import client_config
from stream.kafka.topics import ensure_topics
from stream.kafka.wire import MAX_ID_BYTES, Rejected

logger = logging.getLogger("streamrec.availability")

#: The topic's configuration when a worker creates it: compacted (the latest record of
#: an item is its availability) and stamped by the broker (the propagation delay is
#: measured from the acknowledgement, whatever the producer's clock says).
AVAILABILITY_CONFIG = {
    "cleanup.policy": "compact",
    "message.timestamp.type": "LogAppendTime",
    "min.cleanable.dirty.ratio": "0.2",
}
BAD_AVAILABILITY = "bad_availability"
#: Changes kept for the event loop; a model that falls further behind is restricted
#: from a snapshot instead.
KEPT_CHANGES = 1_000_000
_POLL_S = 0.05
#: How often the worker applies changes between batches, seconds.
AVAILABILITY_INTERVAL_S = 0.1


@dataclass(frozen=True, slots=True)
class Change:
    """One availability record, in topic order; ``acknowledged`` is its broker timestamp
    (Unix seconds)."""

    sequence: int
    item_id: str
    available: bool
    acknowledged: float


@dataclass(frozen=True, slots=True)
class BadRecord:
    """An availability record that says nothing usable, with where it was read."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    rejected: Rejected


def ensure_availability_topic(bootstrap: str, topic: str) -> None:
    """Create the availability topic as a worker would, if it is missing."""
    ensure_topics(bootstrap, {topic: 1}, configs={topic: AVAILABILITY_CONFIG})


def availability_value(available: bool) -> bytes | None:
    """The record value that sets an item's availability (what
    :func:`parse_availability` reads): a tombstone makes it available again."""
    return None if available else b'{"available": false}'


def parse_availability(key: bytes | None, value: bytes | None) -> bool | Rejected:
    """The availability a record sets (a tombstone: available), or why it is refused."""
    if not key:
        return Rejected(BAD_AVAILABILITY, "record has no key: the key must be the item id")
    if len(key) > MAX_ID_BYTES:
        return Rejected(BAD_AVAILABILITY, f"item id of {len(key)} bytes, over {MAX_ID_BYTES}")
    try:
        key.decode("utf-8")
    except UnicodeDecodeError:
        return Rejected(BAD_AVAILABILITY, "item id is not UTF-8")
    if value is None:
        return True
    try:
        parsed = json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return Rejected(BAD_AVAILABILITY, f"value is not JSON: {exc}")
    if not isinstance(parsed, dict) or not isinstance(parsed.get("available"), bool):
        return Rejected(BAD_AVAILABILITY, 'value must be {"available": true|false}')
    return bool(parsed["available"])


class AvailabilityFollower:
    """Reads the availability topic in a thread and keeps its current state and changes."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self._consumer = Consumer(
            client_config(
                bootstrap,
                **{
                    "group.id": f"streamrec-availability-{topic}",  # required, never joined
                    "enable.auto.commit": False,
                    "enable.auto.offset.store": False,
                    "fetch.wait.max.ms": 20,
                },
            )
        )
        self._lock = threading.Lock()
        self._unavailable: set[str] = set()
        self._changes: deque[Change] = deque(maxlen=KEPT_CHANGES)
        self._sequence = 0
        self._bad: list[BadRecord] = []
        self._ends: dict[int, int] = {}  # end offsets at start, until read up to them
        self._read = threading.Event()
        self._error: BaseException | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="availability", daemon=True)

    def start(self, timeout: float = 30.0) -> AvailabilityFollower:
        """Assign every partition from its beginning and start following."""
        try:
            metadata = self._consumer.list_topics(self.topic, timeout=timeout)
        except KafkaException as exc:
            raise UserError(f"cannot read the availability topic {self.topic!r}: {exc}") from None
        partitions = sorted(metadata.topics[self.topic].partitions)
        if not partitions:
            raise UserError(f"the availability topic {self.topic!r} does not exist")
        deadline = time.monotonic() + timeout
        for partition in partitions:
            low, high = self._watermarks(partition, deadline)
            if high > low:
                self._ends[partition] = high
        self._consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in partitions])
        if not self._ends:
            self._read.set()
        self._thread.start()
        return self

    def _watermarks(self, partition: int, deadline: float) -> tuple[int, int]:
        """A partition's first and end offsets, retried while a new topic's leader
        settles (the broker answers NOT_LEADER for a moment after creation)."""
        while True:
            try:
                low, high = self._consumer.get_watermark_offsets(
                    TopicPartition(self.topic, partition), timeout=2.0
                )
                return int(low), int(high)
            except KafkaException as exc:
                if time.monotonic() > deadline:
                    raise UserError(
                        f"cannot read the end of the availability topic {self.topic!r}: {exc}"
                    ) from None
                time.sleep(0.1)

    def wait_until_read(self, timeout: float) -> None:
        """Block until the topic has been read to the end offsets it had at start."""
        deadline = time.monotonic() + timeout
        while not self._read.wait(0.1):
            if self._error is not None:
                raise UserError(f"reading the availability topic failed: {self._error}")
            if time.monotonic() > deadline:
                raise UserError(
                    f"the availability topic {self.topic!r} was not read to its end within "
                    f"{timeout:g} s (--broker-wait-s sets how long)"
                )

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)

    @property
    def failed(self) -> BaseException | None:
        """The error that stopped the thread, if one did."""
        return self._error

    def snapshot(self) -> tuple[int, frozenset[str]]:
        """The sequence number of the last change read, and every item unavailable then."""
        with self._lock:
            return self._sequence, frozenset(self._unavailable)

    def changes_since(self, sequence: int) -> list[Change] | None:
        """The changes after ``sequence``, in order; None if some are no longer kept (the
        caller then starts again from :meth:`snapshot`)."""
        with self._lock:
            if sequence >= self._sequence:
                return []
            if not self._changes or self._changes[0].sequence > sequence + 1:
                return None
            first = len(self._changes) - (self._sequence - sequence)
            return [self._changes[i] for i in range(first, len(self._changes))]

    def take_bad_records(self) -> list[BadRecord]:
        with self._lock:
            bad, self._bad = self._bad, []
            return bad

    @property
    def unavailable_count(self) -> int:
        return len(self._unavailable)

    def _follow(self) -> None:
        try:
            while not self._stopping.is_set():
                messages = self._consumer.consume(1000, timeout=_POLL_S)
                self._apply(messages)
                if not self._read.is_set() and self._caught_up():
                    self._read.set()
        except BaseException as exc:  # reported by wait_until_read and /readyz
            self._error = exc
            logger.error("following the availability topic failed: %s", exc)
        finally:
            self._consumer.close()

    def _apply(self, messages: Iterable[Message]) -> None:
        with self._lock:
            for message in messages:
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        continue
                    if error.fatal() or not error.retriable():
                        raise KafkaException(error)
                    logger.warning("availability topic: %s", error)
                    continue
                partition, offset = cast(int, message.partition()), cast(int, message.offset())
                key, value = cast(bytes | None, message.key()), message.value()
                parsed = parse_availability(key, value)
                if isinstance(parsed, Rejected):
                    self._bad.append(BadRecord(self.topic, partition, offset, key, value, parsed))
                    continue
                item_id = cast(bytes, key).decode("utf-8")  # parsed: a UTF-8 key
                if parsed:
                    self._unavailable.discard(item_id)
                else:
                    self._unavailable.add(item_id)
                self._sequence += 1
                _, stamp = message.timestamp()
                self._changes.append(Change(self._sequence, item_id, parsed, stamp / 1000.0))

    def _caught_up(self) -> bool:
        """Whether the position of every partition has passed its end offset at start
        (positions, not the last offsets seen: compaction may have removed those)."""
        positions = self._consumer.position([TopicPartition(self.topic, p) for p in self._ends])
        for position in positions:
            if position.offset >= self._ends[position.partition]:
                del self._ends[position.partition]
        return not self._ends
