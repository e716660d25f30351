"""Session expiry: delete the state of sessions idle for ``session_timeout_s`` of event time.

A timer sends, per assigned partition, a marker to the co-partitioned ``<app>-expiry``
topic; the agent reads it among the clicks, so the deletions happen in the marker's
context and write changelog tombstones to the right partition (:class:`SessionExpiry`).
"Idle" is judged in event time by :mod:`stream.event_time`'s per-partition rule.

Finding the idle sessions must not scan the table: one entry's header takes ~0.9 us to
decode, 30 ms for 35k sessions but a second for a million, during which the worker answers
nothing. :class:`IdleSessions` keeps each session's last event time per partition, updated
where the worker writes the state, so a marker only walks its own partition's times
(~50 ns each). The table is also filled by changelog recovery, which the worker does not
see, so the index is dropped at every rebalance and rebuilt from one scan of the table at
the next marker, when recovery is over (the agent reads no marker before it is).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping, MutableMapping

from faust.types import EventT

from stream.event_time import PartitionWatermarks
from stream.serving.faust_patches import in_context_of
from stream.serving.state import sessions_by_partition

logger = logging.getLogger("streamrec.worker")

#: Most idle sessions deleted (changelog tombstones written) when a marker arrives; after
#: a batch, one per event of the batch (at least :data:`EXPIRY_DELETES_FLOOR`). A large
#: pass is spread over the following batches instead of stopping the worker for it, and
#: its cost follows the load: a flat budget per batch made small batches carry many times
#: their own work in tombstones. Expiry still outpaces session starts (a session is
#: several clicks).
EXPIRY_DELETES_PER_MARKER = 256
EXPIRY_DELETES_FLOOR = 4


class IdleSessions:
    """Last event time of every session in the table, by input partition."""

    def __init__(self) -> None:
        self._times: dict[int, dict[bytes, float]] = {}
        self._complete = False

    def touch(self, partition: int, key: bytes, last_time: float) -> None:
        """Record a state just written to the table."""
        self._times.setdefault(partition, {})[key] = last_time

    def idle_before(
        self, partition: int, before: float, table: Mapping[bytes, bytes]
    ) -> list[bytes]:
        """Keys of ``partition``'s sessions whose last event is before ``before``."""
        if not self._complete:
            self._rebuild(table.items())
        times = self._times.get(partition, {})
        return [key for key, last_time in times.items() if last_time < before]

    def still_idle(self, partition: int, key: bytes, before: float) -> bool:
        """Whether a session returned by :meth:`idle_before` still is: it may have clicked
        since (or been deleted)."""
        last_time = self._times.get(partition, {}).get(key)
        return last_time is not None and last_time < before

    def forget(self, partition: int, keys: Iterable[bytes]) -> None:
        """Drop sessions deleted from the table."""
        times = self._times.get(partition, {})
        for key in keys:
            times.pop(key, None)

    def invalidate(self) -> None:
        """Forget everything (a rebalance moved partitions); the next query rescans."""
        self._times.clear()
        self._complete = False

    def _rebuild(self, entries: Iterable[tuple[bytes, bytes]]) -> None:
        """Index the table. An entry whose header does not decode (recovered from a
        changelog anyone can write to) has no partition or time to index it by: it is
        skipped, and its session restarts empty at its next click, whose state replaces
        it (the processor counts that)."""
        self._times, skipped = sessions_by_partition(entries)
        if skipped:
            logger.warning(
                "%d stored session states do not decode: not indexed for expiry", skipped
            )
        self._complete = True


class SessionExpiry:
    """Deletes the table's idle sessions, a bounded number at a time.

    ``on_expired`` is told the keys of every deletion (the worker counts them and stops
    judging those sessions' live quality).
    """

    def __init__(
        self,
        table: MutableMapping[bytes, bytes],
        session_timeout_s: float,
        on_expired: Callable[[list[bytes]], None],
    ) -> None:
        self.table = table
        self.session_timeout_s = session_timeout_s
        self.watermarks = PartitionWatermarks()
        self.idle = IdleSessions()
        self._on_expired = on_expired
        # partition -> (its last marker, the cut-off, idle sessions left to delete)
        self._pending: dict[int, tuple[EventT, float, list[bytes]]] = {}

    def markers(self) -> dict[int, float]:
        """Per partition with sessions, the event time before which sessions expire."""
        return self.watermarks.cutoffs(self.session_timeout_s)

    def on_marker(self, event: EventT) -> None:
        """Start deleting the marker's partition's idle sessions, in the marker's context.

        The cut-off is the later of the marker's (computed when it was sent) and the one
        the partition's clicks applied since then give: under a backlog a marker reaches
        the agent long after it was sent, and its own cut-off would keep sessions that
        have meanwhile gone idle (bench soak measured tables 2.5-4x too large)."""
        try:
            sent_before = float(json.loads(event.message.value or b"")["before"])
        except (ValueError, KeyError, TypeError):
            logger.warning("ignored a malformed expiry marker")
            return
        partition = event.message.partition
        before = max(sent_before, self.watermarks[partition] - self.session_timeout_s)
        self._pending[partition] = (
            event,
            before,
            self.idle.idle_before(partition, before, self.table),
        )
        self.delete_idle(EXPIRY_DELETES_PER_MARKER)

    def delete_idle(self, budget: int) -> None:
        """Delete up to ``budget`` sessions that markers found idle; a session that clicked
        since its marker is kept."""
        for partition in list(self._pending):
            event, before, keys = self._pending[partition]
            chunk, rest = keys[:budget], keys[budget:]
            if rest:
                self._pending[partition] = (event, before, rest)
            else:
                del self._pending[partition]
            budget -= len(chunk)
            doomed = [key for key in chunk if self.idle.still_idle(partition, key, before)]
            with in_context_of(event):
                for key in doomed:
                    del self.table[key]
            self.idle.forget(partition, doomed)
            self._on_expired(doomed)
            if budget <= 0:
                return

    def reset(self) -> None:
        """Partitions moved: what was known of the sessions' idleness may be wrong
        (revoked partitions are another worker's now, assigned ones were recovered)."""
        self.idle.invalidate()
        self._pending.clear()
