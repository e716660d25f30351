"""Fencing: a worker writes session states only while its group membership is confirmed.

A worker owns its partitions only as long as the group coordinator hears from it. Paused
past its group session (a long GC, SIGSTOP, a frozen VM), it is evicted and another
worker takes its partitions, recovers their states and goes on; but the paused process
does not know that when it wakes up. It would finish the batch it was in and write that
batch's states to the changelog *after* the new owner's records for the same sessions:
measured through a real broker, sessions whose last changelog record went back by over a
thousand clicks (tests/test_fencing.py). The next recovery, or the log cleaner, which
keeps each key's last record, then brings back states without the new owner's clicks,
whose offsets are already committed.

Kafka's own fence is a transactional producer, which Faust's ``exactly_once`` provides
with open problems (see the notes on Faust); streamrec uses a lease instead. The consumer
thread records when each heartbeat that the coordinator accepted was *sent* (and when a
join completed): the coordinator cannot evict the member earlier than one session after
that. Before a batch writes anything (states, expiry tombstones), :meth:`GroupFence.confirm`
requires the membership of the batch's start to be confirmed less than a session ago,
less one heartbeat interval as a margin. A worker that woke up from a long pause waits
for its next heartbeat's answer: still a member (a pause shorter than the session), it
writes; evicted, it raises :class:`MembershipLost` and the worker exits without writing
or committing, so the batch's clicks are applied by their new owner only. While no answer
can come (the broker is down), the batch waits for one up to the worker's broker wait, as
the worker waits for its broker everywhere else: a coordinator that restarts reloads its
groups, and its answer says whether the membership survived the outage.

Records already handed to the producer when the pause began would still go out on waking
(measured in CI: one batch of 7 states). So the check is made a second time where the
producer sends: a request carrying records for a guarded topic (the sessions' changelog,
:func:`guard`) waits until the lease is confirmed again, and if the membership lapsed
meanwhile, those records are failed instead of sent. Their writes then fail, and the
worker exits with status 75 without committing. What is left is the time between that
check and the socket write, in the same task with no wait between them.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

#: Heartbeats per group session: the worker heartbeats every session / 5 (Kafka's own
#: default ratio is 1/3); one interval is the lease's margin.
HEARTBEATS_PER_SESSION = 5
#: The worker's exit status when it finds its membership lapsed: EX_TEMPFAIL, "try again";
#: a restarted worker joins the group anew and recovers its partitions' states.
MEMBERSHIP_LOST_EXIT = 75
_POLL_S = 0.01


@dataclass(frozen=True)
class Membership:
    """A consumer's last known standing in its group: its generation (-1 when it must
    join again) and the monotonic time the last request the coordinator accepted was sent."""

    generation: int
    confirmed_at: float


#: Per group id, written by the consumer thread (:mod:`stream.serving.faust_patches`).
_memberships: dict[str, Membership] = {}
#: Topics whose records are sent only under a confirmed membership: topic -> its fence.
_guarded: dict[str, GroupFence] = {}


def confirmed(group_id: str, generation: int, sent_at: float) -> None:
    """The coordinator accepted a request of ``generation`` sent at ``sent_at``."""
    _memberships[group_id] = Membership(generation, sent_at)


def lapsed(group_id: str) -> None:
    """The coordinator no longer knows this member (it must join again)."""
    _memberships[group_id] = Membership(-1, -math.inf)


def heartbeat_interval(session_timeout_s: float) -> float:
    return session_timeout_s / HEARTBEATS_PER_SESSION


class MembershipLost(RuntimeError):
    """The worker's group membership lapsed during a batch: another worker may own its
    partitions, and nothing of the batch may be written."""


def guard(topic: str, fence: GroupFence) -> None:
    """Send ``topic``'s records only while ``fence``'s membership is confirmed."""
    _guarded[topic] = fence


def guarding(topic: str) -> GroupFence | None:
    return _guarded.get(topic)


class GroupFence:
    """Checks a group's membership before a batch writes (see the module docstring)."""

    def __init__(
        self, group_id: str, session_timeout_s: float, patience_s: float | None = None
    ) -> None:
        self.group_id = group_id
        self.session_timeout_s = session_timeout_s
        self.lease_s = session_timeout_s - heartbeat_interval(session_timeout_s)
        #: how long a batch waits for a heartbeat's answer (at least a session)
        self.patience_s = max(session_timeout_s, patience_s or 0.0)

    def generation(self) -> int | None:
        """The membership's generation now (at a batch's start); None before any join,
        when no consumer of this group runs in the process."""
        membership = _memberships.get(self.group_id)
        return None if membership is None else membership.generation

    async def confirm_current(self) -> None:
        """:meth:`confirm` for whatever generation is current: at the producer, which
        cannot tell which batch its records came from."""
        await self.confirm(self.generation())

    async def confirm(self, generation: int | None) -> None:
        """Return once the membership of ``generation`` is confirmed within the lease;
        raise :class:`MembershipLost` if it ended, or if no heartbeat was answered within
        the fence's patience."""
        if generation is None:
            return
        waited_from = time.monotonic()
        while True:
            membership = _memberships[self.group_id]
            now = time.monotonic()
            if membership.generation != generation:
                raise MembershipLost(
                    f"group generation {generation} ended during the batch (now "
                    f"{membership.generation}): another worker may own its partitions"
                )
            if now - membership.confirmed_at < self.lease_s:
                return
            if now - waited_from > self.patience_s:
                raise MembershipLost(
                    f"no heartbeat confirmed the group membership for "
                    f"{now - membership.confirmed_at:.1f} s (group session "
                    f"{self.session_timeout_s:g} s, waited {self.patience_s:g} s)"
                )
            await asyncio.sleep(_POLL_S)
