"""Event time per input partition: when a session is over, for workers and trainer alike.

A session is over once ``timeout`` of event time has passed since its last click. "Event
time now" is the latest click time seen *on the session's partition*, never across
partitions: a session's clicks share one partition, and partitions are read at different
paces, so a watermark taken from a partition read ahead would end the sessions of one
lagging behind. Workers expire session state by this rule and the trainer calls a
buffered session complete by it, so both see the same sessions end.
"""

from __future__ import annotations

import math


class PartitionWatermarks:
    """The latest event time seen on each input partition."""

    def __init__(self) -> None:
        self._latest: dict[int, float] = {}

    def advance(self, partition: int, event_time: float) -> None:
        if event_time > self._latest.get(partition, -math.inf):
            self._latest[partition] = event_time

    def __getitem__(self, partition: int) -> float:
        """The partition's watermark; ``-inf`` before its first click."""
        return self._latest.get(partition, -math.inf)

    def cutoffs(self, timeout: float) -> dict[int, float]:
        """Per partition with clicks, the event time before which sessions are over."""
        return {partition: mark - timeout for partition, mark in self._latest.items()}

    def is_over(self, partition: int, last_click: float, timeout: float) -> bool:
        return last_click <= self[partition] - timeout
