"""A partition's records and a group's committed offset, read straight from the broker.

For the worker's check that its agent receives every click (:mod:`stream.serving.sequence`):
when Faust's consumer hands the agent a partition's clicks with a hole in them, the hole is
read here. Its clients commit nothing, never join the worker's group and never touch the
worker's own consumer. Every call blocks; the worker makes them in a
thread, and only when a rebalance is over or a hole was found.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar, cast

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from stream.kafka.config import client_config

#: librdkafka's "no committed offset"
_NO_OFFSET = -1001
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class FetchedRecord:
    """A record read by :class:`PartitionReader`, shaped like the Faust message the agent
    would have received (``timestamp`` in seconds, as Faust's)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: float


class PartitionReader:
    """Reads one topic's partitions, and one group's committed offsets on it.

    Records are read uncommitted, as the worker's own consumer (aiokafka's default) reads
    them, so the reader finds exactly what the agent should have been handed. Broker
    errors are retried for ``timeout_s``; then :class:`TimeoutError` names what failed.
    """

    def __init__(self, bootstrap: str, topic: str, group_id: str, timeout_s: float = 30.0):
        self.topic = topic
        self.group_id = group_id
        self.timeout_s = timeout_s
        self._bootstrap = bootstrap
        self._group: Consumer | None = None  # of the worker's group, for its offsets
        self._consumer: Consumer | None = None  # of no group, for records

    def committed(self, partition: int) -> int | None:
        """The group's committed offset on ``partition`` (None: it has committed none)."""
        tp = TopicPartition(self.topic, partition)

        def ask() -> int | None:
            (answer,) = self._group_client().committed([tp], timeout=5)
            if answer.error is not None:  # e.g. the group's coordinator is moving
                raise KafkaException(answer.error)
            return None if answer.offset == _NO_OFFSET else int(answer.offset)

        return self._retried(ask, f"the committed offset of group {self.group_id!r}", partition)

    def first_offset(self, partition: int) -> int:
        """The first offset ``partition`` still holds (its log start offset)."""
        tp = TopicPartition(self.topic, partition)

        def ask() -> int:
            low, _ = self._group_client().get_watermark_offsets(tp, timeout=5)
            return int(low)

        return self._retried(ask, "the first offset", partition)

    def _retried(self, ask: Callable[[], T], what: str, partition: int) -> T:
        """``ask()`` until it answers or ``timeout_s`` passes: a leader or coordinator
        that just died is replaced within seconds, and librdkafka does not retry these."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                return ask()
            except KafkaException as exc:
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"no answer for {what} of {self.topic}/{partition} within "
                        f"{self.timeout_s:g} s: {exc}"
                    ) from exc
                time.sleep(0.5)

    def read(self, partition: int, start: int, end: int) -> list[FetchedRecord]:
        """The records of ``partition`` from ``start`` up to, not including, ``end``.

        Offsets in between that hold no record (transaction markers, records removed by
        retention or compaction) are simply not in the list."""
        consumer = self._reader()
        consumer.assign([TopicPartition(self.topic, partition, start)])
        found: list[FetchedRecord] = []
        last_error: KafkaError | None = None
        deadline = time.monotonic() + self.timeout_s
        try:
            while (left := deadline - time.monotonic()) > 0:
                message = consumer.poll(min(left, 1.0))
                if message is None:
                    continue
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        return found
                    if error.fatal():
                        raise KafkaException(error)
                    last_error = error  # the client retries on its own
                    continue
                offset = cast(int, message.offset())  # a record always has one
                if offset >= end:
                    return found
                found.append(
                    FetchedRecord(
                        self.topic,
                        partition,
                        offset,
                        message.key(),
                        message.value(),
                        message.timestamp()[1] / 1000.0,
                    )
                )
                if offset == end - 1:
                    return found
        finally:
            consumer.unassign()
        raise TimeoutError(
            f"could not read {self.topic}/{partition} offsets {start}..{end - 1} within "
            f"{self.timeout_s:g} s (read {len(found)} records; last error: {last_error})"
        )

    def close(self) -> None:
        for client in (self._group, self._consumer):
            if client is not None:
                client.close()
        self._group = self._consumer = None

    def _group_client(self) -> Consumer:
        """A consumer of the worker's group that never subscribes, so it never joins the
        group, and never commits: it only asks the group's coordinator. (An AdminClient
        cannot be used for that: librdkafka 2.x crashes the process when the coordinator
        answers an admin OffsetFetch with NOT_COORDINATOR, as it does while it moves,
        confluentinc/librdkafka#5040; a rolling restart killed a worker that way.)"""
        if self._group is None:
            self._group = Consumer(
                client_config(
                    self._bootstrap,
                    **{"group.id": self.group_id, "enable.auto.commit": False},
                )
            )
        return self._group

    def _reader(self) -> Consumer:
        if self._consumer is None:
            self._consumer = Consumer(
                client_config(
                    self._bootstrap,
                    **{
                        "group.id": f"{self.group_id}-reader",
                        "enable.auto.commit": False,
                        "enable.auto.offset.store": False,
                        "enable.partition.eof": True,
                        "auto.offset.reset": "earliest",
                        "isolation.level": "read_uncommitted",
                    },
                )
            )
        return self._consumer
