"""The worker's check that every click of a partition reaches its agent, on a real broker.

Faust's consumer once handed a worker's agent offset 52 of a partition first, after a
rebalance that sought it to the committed offset 23; 23..51 were never applied by anyone
and the commit moved past them (the fault bench, ``worker-kill``). These tests give the
check such holes and assert that their clicks come back from the broker, in order, and that
what the broker does not hold (transaction markers) is counted, not invented."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from confluent_kafka import Producer

from stream.devtools.processes import StreamNames
from stream.kafka.config import producer_config
from stream.kafka.partition_reader import FetchedRecord, PartitionReader
from stream.kafka.topics import ensure_topics
from stream.kafka.wire import Click, encode_click
from stream.serving.metrics import WorkerCounters
from stream.serving.sequence import REFETCHED_LOG, InputSequence


@pytest.fixture
def names(kafka_bootstrap: str) -> StreamNames:
    names = StreamNames("sequence")
    ensure_topics(kafka_bootstrap, {names.clicks: 1})
    return names


@pytest.fixture
def reader(kafka_bootstrap: str, names: StreamNames) -> Iterator[PartitionReader]:
    reader = PartitionReader(kafka_bootstrap, names.clicks, names.app_id, timeout_s=20)
    yield reader
    reader.close()


def produce(bootstrap: str, topic: str, n: int) -> None:
    producer = Producer(producer_config(bootstrap))
    for k in range(n):
        key, value = encode_click(Click(f"s{k % 3}", f"item{k}", 1000.0 + k))
        producer.produce(topic, value, key, partition=0)
    assert producer.flush(30) == 0


def received(reader: PartitionReader, offsets: range) -> list[FetchedRecord]:
    """What the agent is handed: the topic's records at ``offsets``."""
    return reader.read(0, offsets.start, offsets.stop)


def test_a_hole_after_the_committed_offset_is_read_from_the_broker(
    kafka_bootstrap: str,
    names: StreamNames,
    reader: PartitionReader,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """After a rebalance the first click must be at the committed offset the consumer was
    sought to: offsets 2..5 never handed over come back, the broker's own records, to be
    applied before offset 6."""
    produce(kafka_bootstrap, names.clicks, 10)
    counters = WorkerCounters()
    sequence = InputSequence(reader, counters, sought=lambda partition: 2)

    holes = asyncio.run(sequence.holes(received(reader, range(6, 10))))

    assert list(holes) == [(0, 6)]
    assert [r.offset for r in holes[(0, 6)]] == [2, 3, 4, 5]
    assert holes[(0, 6)] == received(reader, range(2, 6))  # keys, values, timestamps
    assert (counters.skipped_offsets, counters.refetched_clicks) == (4, 4)
    # what bench faults counts in the workers' logs
    assert REFETCHED_LOG.findall(caplog.text) == ["4"]


def test_a_hole_within_an_assignment_is_read_and_replays_are_not(
    kafka_bootstrap: str, names: StreamNames, reader: PartitionReader
) -> None:
    """A hole between two batches is read as well; clicks received again after a seek back
    are replays (the idempotence guard's), and never make a hole of their own."""
    produce(kafka_bootstrap, names.clicks, 12)
    counters = WorkerCounters()
    sequence = InputSequence(reader, counters, sought=lambda partition: 0)

    first = asyncio.run(sequence.holes(received(reader, range(0, 4))))
    later = asyncio.run(sequence.holes(received(reader, range(7, 9))))
    again = asyncio.run(sequence.holes(received(reader, range(2, 12))))

    assert first == {} and again == {}
    assert [r.offset for r in later[(0, 7)]] == [4, 5, 6]
    assert (counters.skipped_offsets, counters.refetched_clicks) == (3, 3)


def test_the_check_starts_again_from_the_commit_after_every_rebalance(
    kafka_bootstrap: str, names: StreamNames, reader: PartitionReader
) -> None:
    """The offsets received before a rebalance say nothing about the next assignment: a
    partition given back starts at the committed offset, wherever the last batch ended."""
    produce(kafka_bootstrap, names.clicks, 8)
    sequence = InputSequence(reader, WorkerCounters(), sought=lambda partition: 3)
    asyncio.run(sequence.holes(received(reader, range(3, 8))))

    sequence.reset()
    holes = asyncio.run(sequence.holes(received(reader, range(7, 8))))

    assert [r.offset for r in holes[(0, 7)]] == [3, 4, 5, 6]


def test_offsets_holding_no_click_are_counted_not_read(
    kafka_bootstrap: str, names: StreamNames, reader: PartitionReader
) -> None:
    """A transactional producer's commit markers take offsets no consumer receives: two
    transactions of three clicks leave a hole at offset 3 that holds no click."""
    producer = Producer(producer_config(kafka_bootstrap, **{"transactional.id": names.app_id}))
    producer.init_transactions(30)
    for transaction in range(2):
        producer.begin_transaction()
        for k in range(3):
            key, value = encode_click(Click(f"s{k}", f"item{k}", 1000.0 + transaction))
            producer.produce(names.clicks, value, key, partition=0)
        producer.commit_transaction(30)
    counters = WorkerCounters()
    sequence = InputSequence(reader, counters, sought=lambda partition: 0)

    records = received(reader, range(0, 8))
    holes = asyncio.run(sequence.holes(records))

    assert [r.offset for r in records] == [0, 1, 2, 4, 5, 6]
    assert holes == {(0, 4): []}
    assert (counters.skipped_offsets, counters.refetched_clicks) == (1, 0)


def test_a_group_that_never_committed_starts_where_its_first_click_is(
    kafka_bootstrap: str, names: StreamNames, reader: PartitionReader
) -> None:
    """Before a group's first commit the consumer says nothing of where it started (its
    reset policy did): the first click is taken as the start, and nothing is read."""
    produce(kafka_bootstrap, names.clicks, 6)
    counters = WorkerCounters()
    sequence = InputSequence(reader, counters, sought=lambda partition: None)

    holes = asyncio.run(sequence.holes(received(reader, range(4, 6))))

    assert holes == {} and counters.skipped_offsets == 0
