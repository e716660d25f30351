"""A partition's records, read straight from the broker.

For the worker's check that its agent receives every click (:mod:`stream.serving.sequence`):
when Faust's consumer hands the agent a partition's clicks with a hole in them, the hole is
read here. Its consumer is in no group of the worker's, commits nothing and never touches
the worker's own consumer. A read blocks; the worker makes it in a thread, and only when
a hole was found.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import cast

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from stream.kafka.config import client_config


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
    """Reads ranges of one topic's partitions.

    Records are read uncommitted, as the worker's own consumer (aiokafka's default) reads
    them, so the reader finds exactly what the agent should have been handed. Broker
    errors are retried for ``timeout_s``; then :class:`TimeoutError` names what failed.
    """

    def __init__(self, bootstrap: str, topic: str, group_id: str, timeout_s: float = 30.0):
        self.topic = topic
        self.group_id = group_id
        self.timeout_s = timeout_s
        self._bootstrap = bootstrap
        self._consumer: Consumer | None = None

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
