"""Every click of an input partition reaches the agent: checked, and holes read again.

The idempotence guard takes a click as applied when its session has applied a later offset,
and Faust commits past every click it acked. So a click that Faust's consumer never hands
the agent, while later ones of its partition are, is lost without a trace. This happened
in the fault bench: a worker given back, in one rebalance, the partition it already held
was sought to the group's committed offset 23, and the first click its agent received was
52. Offsets 23..51 had been fetched before the rebalance and never applied by anyone; the
commit moved past them. (The drop is inside Faust's fetch bookkeeping across rebalances;
which path, the records do not say.)

So the worker does not take the order it is handed on trust. Per input partition it knows
the offset it must receive next: for the first click after a rebalance, where the
assignment starts, the committed offset Faust's consumer has just sought the partition to;
then one past the highest offset received. (Before a group's first commit on a partition,
its first click is taken as the start. The start is not asked of the broker: the group's
coordinator and the partition's leader are exactly what a failing broker takes away, and
a worker kept waiting for them stopped answering for tens of seconds.)
A click above it shows a hole. The hole is read from the broker directly
(:class:`~stream.kafka.partition_reader.PartitionReader`) and its clicks are applied
before the click that showed it, as if Faust had delivered them. Offsets there that hold no
record (a transactional producer's commit markers, records removed by retention) are
only counted. A click below it was sought back to: a replay, which the guard leaves
unanswered.

A reading that fails (the broker unreachable past the reader's timeout) raises: the batch is
then not acked, the worker exits, and the clicks are redelivered to the next owner.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Sequence
from typing import Protocol

from stream.kafka.partition_reader import FetchedRecord, PartitionReader
from stream.serving.dead_letters import SourceRecord
from stream.serving.metrics import WorkerCounters

logger = logging.getLogger("streamrec.worker")
#: matches the warning a hole's read logs (below), for those who count them in the logs
REFETCHED_LOG = re.compile(r"read (\d+) clicks of them from the broker")


class InputRecord(SourceRecord, Protocol):
    """What the worker reads of a click-topic record (what a dead letter copies, and when
    it was written): a Faust message, or a
    :class:`~stream.kafka.partition_reader.FetchedRecord`."""

    @property
    def timestamp(self) -> float: ...


class InputSequence:
    """The offsets each input partition's next click must have, and the holes' clicks."""

    def __init__(
        self,
        reader: PartitionReader,
        counters: WorkerCounters,
        sought: Callable[[int], int | None] = lambda partition: None,
    ) -> None:
        self.reader = reader
        self.counters = counters
        #: where the consumer sought a partition to at the rebalance: its committed offset
        #: (None: nothing committed, or 0)
        self.sought = sought
        self._expected: dict[int, int] = {}  # partition -> the offset to receive next
        self._last: dict[int, int] = {}  # partition -> the offset received last

    def reset(self) -> None:
        """A rebalance: each partition's next click is checked against the commit again."""
        self._expected.clear()
        self._last.clear()

    async def holes(
        self, received: Sequence[InputRecord]
    ) -> dict[tuple[int, int], list[FetchedRecord]]:
        """For the click-topic records of one batch, in the order received: (partition,
        offset) of each record that came after a hole -> the hole's records, read from the
        broker, to be applied before it."""
        found: dict[tuple[int, int], list[FetchedRecord]] = {}
        for record in received:
            partition, offset = record.partition, record.offset
            expected = self._expected.get(partition)
            if expected is None:
                expected = self.sought(partition)
                logger.info(
                    "partition %d: first click since the rebalance at offset %d (sought to %s)",
                    partition,
                    offset,
                    expected,
                )
                if expected is None:  # nothing committed yet: the first click is the start
                    expected = offset
            if offset > expected:
                found[(partition, offset)] = await self._read_hole(partition, expected, offset)
            elif (last := self._last.get(partition)) is not None and offset <= last:
                logger.info(  # once per step back, not for every replay that follows
                    "partition %d: offset %d received again after %d", partition, offset, last
                )
            self._expected[partition] = max(expected, offset + 1)
            self._last[partition] = offset
        return found

    async def _read_hole(self, partition: int, start: int, end: int) -> list[FetchedRecord]:
        records = await asyncio.to_thread(self.reader.read, partition, start, end)
        self.counters.skipped_offsets += end - start
        self.counters.refetched_clicks += len(records)
        if records:
            logger.warning(
                "partition %d: offsets %d..%d skipped by the consumer; read %d clicks of "
                "them from the broker, applied before offset %d (the guard leaves those "
                "already applied)",
                partition,
                start,
                end - 1,
                len(records),
                end,
            )
        else:
            logger.info(
                "partition %d: offsets %d..%d hold no click (transaction markers, or "
                "records removed by retention)",
                partition,
                start,
                end - 1,
            )
        return records
