"""The trainer's buffer of sessions being collected from the click stream.

Completion and age are measured in event time by :mod:`stream.event_time`'s rule (the
one workers expire state by), so a replayed or lagging topic behaves as it did live.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from model.data import ClickLog
from stream.event_time import PartitionWatermarks
from stream.kafka.wire import Click

#: Longest session kept whole; beyond it the latest clicks are kept (bots and crawlers).
MAX_SESSION_CLICKS = 200


@dataclass
class BufferedSession:
    """One session's clicks as buffered (at most ``MAX_SESSION_CLICKS``, the latest)."""

    partition: int = 0
    items: deque[str] = field(default_factory=lambda: deque(maxlen=MAX_SESSION_CLICKS))
    times: deque[float] = field(default_factory=lambda: deque(maxlen=MAX_SESSION_CLICKS))
    last_time: float = -math.inf

    def add(self, click: Click) -> None:
        self.items.append(click.item_id)
        self.times.append(click.timestamp)
        self.last_time = max(self.last_time, click.timestamp)


class SessionBuffer:
    """Sessions being collected, bounded in count, clicks per session and age."""

    def __init__(self, session_timeout_s: float, max_sessions: int, max_age_s: float) -> None:
        self.session_timeout_s = session_timeout_s
        self.max_sessions = max_sessions
        self.max_age_s = max_age_s
        self.watermarks = PartitionWatermarks()
        self.evicted = 0  # dropped because the buffer was full
        self.stale = 0  # complete but dropped after waiting longer than max_age_s
        self._sessions: OrderedDict[str, BufferedSession] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def add(self, click: Click, partition: int = 0) -> None:
        session = self._sessions.get(click.session_id)
        if session is None:
            if len(self._sessions) >= self.max_sessions:
                self._sessions.popitem(last=False)  # the least recently active
                self.evicted += 1
            session = self._sessions[click.session_id] = BufferedSession(partition)
        else:
            self._sessions.move_to_end(click.session_id)
        session.add(click)
        self.watermarks.advance(partition, click.timestamp)

    def complete_count(self) -> int:
        """Complete sessions with two or more clicks (the ones that can be learnt from)."""
        self._drop_stale()
        return sum(1 for s in self._sessions.values() if self._complete(s) and len(s.items) >= 2)

    def complete_sessions(self) -> list[BufferedSession]:
        """The complete sessions of two or more clicks, left in the buffer, in the order
        :meth:`take_complete` would return them."""
        self._drop_stale()
        return sorted(
            (s for s in self._sessions.values() if self._complete(s) and len(s.items) >= 2),
            key=lambda s: s.last_time,
        )

    def get(self, session_id: str) -> BufferedSession | None:
        return self._sessions.get(session_id)

    def is_complete(self, session: BufferedSession) -> bool:
        return self._complete(session)

    def take_complete(self) -> list[BufferedSession]:
        """Remove the complete sessions; return those with two or more clicks, oldest
        last click first. Single-click ones are dropped: they hold no transition."""
        self._drop_stale()
        done = [key for key, s in self._sessions.items() if self._complete(s)]
        taken = [self._sessions.pop(key) for key in done]
        return sorted((s for s in taken if len(s.items) >= 2), key=lambda s: s.last_time)

    def _complete(self, session: BufferedSession) -> bool:
        return self.watermarks.is_over(session.partition, session.last_time, self.session_timeout_s)

    def _drop_stale(self) -> None:
        stale = [
            key
            for key, s in self._sessions.items()
            if s.last_time < self.watermarks[s.partition] - self.max_age_s
        ]
        for key in stale:
            del self._sessions[key]
        self.stale += len(stale)


def sessions_log(
    sessions: Sequence[BufferedSession], source: str, drop: AbstractSet[str] = frozenset()
) -> ClickLog:
    """A click log of ``sessions``, each under its own id (a session id seen again after
    its session completed must not merge two sessions into one), without the clicks on
    the items in ``drop``."""
    ids: list[str] = []
    items: list[str] = []
    times: list[float] = []
    for k, session in enumerate(sessions):
        for item, t in zip(session.items, session.times):
            if item not in drop:
                ids.append(str(k))
                items.append(item)
                times.append(t)
    return ClickLog.from_arrays(ids, items, times, source=source)
