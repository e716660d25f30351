"""Event time per input partition: when a session is over, for workers and trainer alike.

A session is over once ``timeout`` of event time has passed since its last click. "Event
time now" is the watermark of the session's partition, never one across partitions: a
session's clicks share one partition, and partitions are read at different paces, so a
watermark taken from a partition read ahead would end the sessions of one lagging behind.
Workers expire session state by this rule and the trainer calls a buffered session
complete by it, so both see the same sessions end.

**A few clicks cannot move a watermark.** Clicks up to a day ahead of the clock are valid
(:data:`stream.kafka.wire.MAX_FUTURE_SKEW_S`), so the largest event time seen is whatever
the worst producer clock says: one click stamped 23 h ahead made the next expiry pass
delete its partition's live sessions (measured: 4 of 5 then answered their next click like
a new session). The watermark is therefore the :data:`WATERMARK_RANK`-th latest event time
among the partition's last :data:`WATERMARK_WINDOW` clicks, and it never moves back: fewer
than ``WATERMARK_RANK`` outliers in any ``WATERMARK_WINDOW`` consecutive clicks of a
partition leave it where the partition's other clicks put it (the outliers themselves are
answered as usual; only the watermark ignores them).

Not a cap at the wall clock of arrival: a worker catching up on an hour of backlog would
take an outlier capped at "now" for its partition's progress and end the backlog's live
sessions; a replayed log lies years behind the clock anyway; and the Kafka timestamp a
producer sets comes from the same wrong clock as its event times.

The cost: a watermark trails its partition's latest clicks by ``WATERMARK_RANK - 1``
clicks (sessions end that much later), and a partition ends no session before
``WATERMARK_RANK`` clicks were read on it (after a restart too): "everything before now is
over" needs that many clicks of event time, not one.
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections import deque

#: Clicks that must reach an event time before a partition's watermark does.
WATERMARK_RANK = 16
#: Recent clicks per partition that the watermark is taken from, so that outliers stop
#: counting once this many clicks followed them.
WATERMARK_WINDOW = 256


class _Partition:
    """One partition's recent event times (in arrival order and sorted) and watermark."""

    __slots__ = ("recent", "ranked", "mark")

    def __init__(self) -> None:
        self.recent: deque[float] = deque()
        self.ranked: list[float] = []
        self.mark = -math.inf


class PartitionWatermarks:
    """Each input partition's watermark: the robust latest event time of its clicks."""

    def __init__(self) -> None:
        self._partitions: dict[int, _Partition] = {}

    def advance(self, partition: int, event_time: float) -> None:
        state = self._partitions.get(partition)
        if state is None:
            state = self._partitions[partition] = _Partition()
        if len(state.recent) == WATERMARK_WINDOW:
            del state.ranked[bisect_left(state.ranked, state.recent.popleft())]
        state.recent.append(event_time)
        insort(state.ranked, event_time)
        if len(state.ranked) >= WATERMARK_RANK:
            state.mark = max(state.mark, state.ranked[-WATERMARK_RANK])

    def forget(self, partitions: set[int]) -> None:
        """Drop these partitions (no longer read here); one read again starts afresh."""
        for partition in partitions:
            self._partitions.pop(partition, None)

    def __getitem__(self, partition: int) -> float:
        """The partition's watermark; ``-inf`` until it is known (see the module doc)."""
        state = self._partitions.get(partition)
        return -math.inf if state is None else state.mark

    def cutoffs(self, timeout: float) -> dict[int, float]:
        """Per partition with a known watermark, the event time before which sessions
        are over."""
        return {
            partition: state.mark - timeout
            for partition, state in self._partitions.items()
            if state.mark > -math.inf
        }

    def is_over(self, partition: int, last_click: float, timeout: float) -> bool:
        return last_click <= self[partition] - timeout
