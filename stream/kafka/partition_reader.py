"""A partition's records and a group's committed offset, read straight from the broker.

For the worker's check that its agent receives every click (:mod:`stream.serving.sequence`):
when Faust's consumer hands the agent a partition's clicks with a hole in them, the hole is
read here. The reader's consumer belongs to no group of the worker's, commits nothing and
never touches the worker's own consumer. Every call blocks; the worker makes them in a
thread, and only when a rebalance is over or a hole was found.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar, cast

from confluent_kafka import (
    Consumer,
    ConsumerGroupTopicPartitions,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

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
        self._admin: AdminClient | None = None
        self._consumer: Consumer | None = None

    def committed(self, partition: int) -> int | None:
        """The group's committed offset on ``partition`` (None: it has committed none)."""
        if self._admin is None:
            self._admin = AdminClient(client_config(self._bootstrap))
        admin = self._admin
        request = ConsumerGroupTopicPartitions(
            self.group_id, [TopicPartition(self.topic, partition)]
        )

        def ask() -> int | None:
            futures = admin.list_consumer_group_offsets([request], request_timeout=5)
            answer = futures[self.group_id].result().topic_partitions[0]
            if answer.error is not None:  # e.g. the group's coordinator is moving
                raise KafkaException(answer.error)
            return None if answer.offset == _NO_OFFSET else int(answer.offset)

        return self._retried(ask, f"the committed offset of group {self.group_id!r}", partition)

    def first_offset(self, partition: int) -> int:
        """The first offset ``partition`` still holds (its log start offset)."""
        tp = TopicPartition(self.topic, partition)

        def ask() -> int:
            low, _ = self._reader().get_watermark_offsets(tp, timeout=5)
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
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None

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
