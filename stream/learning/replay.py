"""Experience replay: older sessions trained on again in every round, against forgetting.

A trainer that fine-tunes on recent sessions alone forgets part of what older ones
taught, and one that has just (re)started has seen little. Each round therefore also
trains on a uniform random sample of every session the trainer has seen
(:class:`ReplaySample`) and, optionally, a fresh draw from an offline click log, typically
the one the first model was trained on (:class:`SessionPool`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np

from model.data import ClickLog
from stream.learning.buffer import MAX_SESSION_CLICKS, BufferedSession

#: Most sessions of ``--replay-log`` kept in memory (a uniform sample of the log's).
MAX_REPLAY_LOG_SESSIONS = 100_000


class ReplaySample:
    """A uniform random sample of every session offered so far (reservoir sampling):
    bounded memory, and old behaviour stays represented however long the trainer runs."""

    def __init__(self, capacity: int, rng: random.Random) -> None:
        self.capacity = capacity
        self.rng = rng
        self.seen = 0
        self.sessions: list[BufferedSession] = []

    def offer(self, sessions: Sequence[BufferedSession]) -> None:
        for session in sessions:
            self.seen += 1
            if len(self.sessions) < self.capacity:
                self.sessions.append(session)
            else:
                slot = self.rng.randrange(self.seen)
                if slot < self.capacity:
                    self.sessions[slot] = session


class SessionPool:
    """Sessions of an offline click log to replay (``--replay-log``), held compactly: at
    most ``max_sessions`` (a uniform sample), the latest ``MAX_SESSION_CLICKS`` clicks of
    each, sessions of two or more clicks only. Each round draws a fresh random subset."""

    def __init__(self, log: ClickLog, max_sessions: int, rng: random.Random) -> None:
        offsets = log.session_offsets()
        usable = np.flatnonzero(np.diff(offsets) >= 2)
        if len(usable) > max_sessions:
            usable = np.sort(usable[rng.sample(range(len(usable)), max_sessions)])
        ends = offsets[usable + 1]
        starts = np.maximum(offsets[usable], ends - MAX_SESSION_CLICKS)
        lengths = ends - starts
        keep = (
            np.concatenate([np.arange(lo, hi) for lo, hi in zip(starts, ends)])
            if len(usable)
            else np.zeros(0, dtype=np.int64)
        )
        self.item_ids = log.item_ids
        self.items = log.items[keep]
        self.times = log.times[keep]
        self.offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
        self.rng = rng
        self.source = log.source

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def draw(self, n: int) -> list[BufferedSession]:
        """``n`` distinct sessions at random (all of them if there are fewer)."""
        chosen = self.rng.sample(range(len(self)), min(n, len(self)))
        sessions = []
        for k in chosen:
            lo, hi = self.offsets[k], self.offsets[k + 1]
            session = BufferedSession(partition=-1)
            session.items.extend(str(i) for i in self.item_ids[self.items[lo:hi]])
            session.times.extend(float(t) for t in self.times[lo:hi])
            session.last_time = float(self.times[hi - 1])
            sessions.append(session)
        return sessions
