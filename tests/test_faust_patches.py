"""The corrections to Faust internals (stream.serving.faust_patches), pinned one behaviour each.

The races they fix need a rebalance at the wrong millisecond, so these tests drive the
patched methods directly, on a stand-in that has exactly the attributes Faust's consumer
gives them; ``test_faust_still_has_what_the_fixes_patch`` fails if an upgrade moves them.
The two-worker tests (test_hot_swap, test_stream_worker) exercise the fixes end to end.
"""

from __future__ import annotations

import asyncio
import inspect
from types import SimpleNamespace
from typing import Any

from faust.transport.consumer import Consumer
from faust.types import TP
from mode.utils.queues import FlowControlEvent, FlowControlQueue

from stream.serving import faust_patches as faust_fixes

CLICKS0, CLICKS1 = TP("clicks", 0), TP("clicks", 1)
CHANGELOG1 = TP("app-sessions-changelog", 1)


class RoundRobin:
    """Faust's default scheduler's order: one record per partition in turn."""

    def iterate(self, records: dict[TP, list[Any]]):
        iterators = {tp: iter(batch) for tp, batch in records.items()}
        while iterators:
            for tp in list(iterators):
                record = next(iterators[tp], None)
                if record is None:
                    del iterators[tp]
                else:
                    yield tp, record


class StandInConsumer:
    """What ``getmany`` touches on Faust's consumer; records what it is asked to do."""

    def __init__(
        self,
        records: dict[TP, list[int]],
        *,
        flow_active: bool = True,
        active: set[TP] | None = None,
        new_generation_after: int | None = None,
    ):
        self.records = {
            tp: [SimpleNamespace(offset=o) for o in offsets] for tp, offsets in records.items()
        }
        self.flow_active = flow_active
        self.active = active if active is not None else set(records)
        self.new_generation_after = new_generation_after
        self.app = SimpleNamespace(
            consumer_generation_id=7, monitor=SimpleNamespace(track_tp_end_offset=lambda *a: None)
        )
        self.scheduler = RoundRobin()
        self.should_stop = False
        self._buffered_partitions: set[TP] = set()
        self.sought: list[dict[TP, int]] = []
        self.sought_to_committed = 0
        self.revoked_during_seek = False

    async def _wait_next_records(self, timeout: float):
        return self.records, self.active

    def highwater(self, tp: TP) -> int:
        return 1000

    def _to_message(self, tp: TP, record: Any) -> tuple[TP, int]:
        return tp, record.offset

    def assignment(self) -> set[TP]:
        return {CLICKS0, CLICKS1, CHANGELOG1}

    async def seek_wait(self, offsets: dict[TP, int]) -> None:
        self.sought.append(dict(offsets))

    async def perform_seek(self) -> None:
        self.sought_to_committed += 1
        if self.revoked_during_seek:
            raise RuntimeError("No current assignment for partition (revoked meanwhile)")


def drain(consumer: StandInConsumer) -> list[tuple[TP, int]]:
    async def run() -> list[tuple[TP, int]]:
        delivered = []
        async for _tp, message in faust_fixes._getmany(consumer, 1.0):
            delivered.append(message)
            if consumer.new_generation_after == len(delivered):
                consumer.app.consumer_generation_id += 1
        return delivered

    return asyncio.run(run())


def test_everything_delivered_means_no_seek() -> None:
    consumer = StandInConsumer({CLICKS0: [5, 6], CLICKS1: [9]})
    assert drain(consumer) == [(CLICKS0, 5), (CLICKS1, 9), (CLICKS0, 6)]
    assert consumer.sought == [] and consumer.sought_to_committed == 0


def test_records_fetched_while_flow_is_stopped_are_fetched_again() -> None:
    """The observed hang: recovery had sought the changelog to 139, the records arrived
    while the rebalance still held flow, and Faust dropped them for good."""
    consumer = StandInConsumer({CHANGELOG1: [139, 140, 141], CLICKS1: [154]}, flow_active=False)
    assert drain(consumer) == []
    assert consumer.sought == [{CHANGELOG1: 139, CLICKS1: 154}]
    assert consumer.sought_to_committed == 1  # Faust's rule for stream partitions still runs


def test_a_new_generation_rewinds_each_partition_to_its_first_undelivered_record() -> None:
    consumer = StandInConsumer({CLICKS0: [5, 6, 7], CLICKS1: [9, 10]}, new_generation_after=3)
    assert drain(consumer) == [(CLICKS0, 5), (CLICKS1, 9), (CLICKS0, 6)]
    assert consumer.sought == [{CLICKS0: 7, CLICKS1: 10}]


def test_a_paused_partition_is_held_back_whole_and_rewound() -> None:
    consumer = StandInConsumer({CLICKS0: [5, 6], CHANGELOG1: [3, 4]}, active={CLICKS0})
    assert drain(consumer) == [(CLICKS0, 5), (CLICKS0, 6)]
    assert consumer.sought == [{CHANGELOG1: 3}]


def test_a_revocation_during_the_seek_to_committed_offsets_does_not_crash_the_fetcher() -> None:
    consumer = StandInConsumer({CLICKS0: [4]}, flow_active=False)
    consumer.revoked_during_seek = True
    assert drain(consumer) == [] and consumer.sought_to_committed == 1


def test_a_partition_revoked_meanwhile_is_not_sought() -> None:
    gone = TP("clicks", 5)
    consumer = StandInConsumer({gone: [1, 2], CLICKS0: [4]}, flow_active=False)
    drain(consumer)
    assert consumer.sought == [{CLICKS0: 4}]


def test_resuming_flow_clears_queues_only_after_a_suspension() -> None:
    async def run() -> tuple[int, int]:
        flow = FlowControlEvent(initially_suspended=False)
        queue: FlowControlQueue = FlowControlQueue(flow_control=flow, clear_on_resume=True)
        faust_fixes._resume(flow)  # not suspended: a no-op, fetched events stay
        queue.put_nowait("click")
        kept = queue.qsize()
        flow.suspend()
        faust_fixes._resume(flow)  # after a suspension: stale events go
        return kept, queue.qsize()

    assert asyncio.run(run()) == (1, 0)


def test_a_commit_awaits_the_barrier_and_a_failing_one_commits_nothing(monkeypatch) -> None:
    """What ``hold_commits_until`` promises the worker: Faust's commit of attached
    messages (which precedes every offset commit) first awaits the app's barrier (the
    changelog records in flight); if they were refused, nothing is committed.

    End to end, the next batch's own check usually stops the worker first, so only this
    test tells a missing barrier apart (see stream.devtools.seeded_bugs)."""
    from faust.exceptions import ProducerSendError

    committed: list[dict[TP, int]] = []

    async def faust_handle_attached(self: Any, offsets: dict[TP, int]) -> None:
        committed.append(offsets)

    monkeypatch.setattr(faust_fixes, "_handle_attached", faust_handle_attached)

    class App:  # the barriers are held per app, weakly
        pass

    consumer = SimpleNamespace(app=App())
    awaited: list[str] = []

    async def delivered() -> None:
        awaited.append("delivered")

    async def refused() -> None:
        raise RuntimeError("a changelog record was refused")

    faust_fixes.hold_commits_until(consumer.app, delivered)
    asyncio.run(faust_fixes._handle_attached_after_barrier(consumer, {CLICKS0: 5}))
    assert (awaited, committed) == (["delivered"], [{CLICKS0: 5}])

    faust_fixes.hold_commits_until(consumer.app, refused)
    try:
        asyncio.run(faust_fixes._handle_attached_after_barrier(consumer, {CLICKS0: 9}))
    except ProducerSendError as error:
        assert "refused" in str(error)
    else:
        raise AssertionError("a commit went ahead past refused changelog records")
    assert committed == [{CLICKS0: 5}]


def test_the_producer_fails_guarded_records_once_the_membership_lapsed(monkeypatch) -> None:
    """Records handed to the producer before a long pause would go out on waking: the
    sender's produce request first confirms the group membership for guarded topics
    (the changelog), fails their batches if it lapsed, and sends the rest."""
    import time

    from aiokafka.structs import TopicPartition

    from stream.serving import fencing

    sent: list[set[Any]] = []

    async def aiokafka_send(self: Any, node_id: int, batches: dict[Any, Any]) -> None:
        sent.append(set(batches))
        self._in_flight.remove(node_id)
        for tp in batches:
            self._muted_partitions.remove(tp)

    monkeypatch.setattr(faust_fixes, "_send_produce_req", aiokafka_send)

    class Batch:
        def __init__(self) -> None:
            self.error: BaseException | None = None

        def failure(self, exception: BaseException) -> None:
            self.error = exception

    group = f"g-{time.monotonic_ns()}"
    changelog, answers = TopicPartition("sessions-changelog", 0), TopicPartition("recs", 0)
    fencing.guard(changelog.topic, fencing.GroupFence(group, session_timeout_s=0.5))

    def request(lapsed: bool) -> tuple[SimpleNamespace, dict[Any, Batch]]:
        if lapsed:
            fencing.lapsed(group)
        else:
            fencing.confirmed(group, 3, time.monotonic())
        sender = SimpleNamespace(_in_flight={1}, _muted_partitions={changelog, answers})
        batches = {changelog: Batch(), answers: Batch()}
        asyncio.run(faust_fixes._send_produce_req_fenced(sender, 1, dict(batches)))
        return sender, batches

    sender, batches = request(lapsed=False)
    assert sent.pop() == {changelog, answers} and batches[changelog].error is None
    sender, batches = request(lapsed=True)
    assert sent.pop() == {answers}  # the answers still go out (at least once)
    assert isinstance(batches[changelog].error, fencing.MembershipLost)
    assert sender._in_flight == set() and sender._muted_partitions == set()


def test_faust_still_has_what_the_fixes_patch() -> None:
    """The fixes replace methods of pinned versions; an upgrade that changes them must be
    looked at again, not silently patched over."""
    import faust.transport.consumer as faust_consumer

    source = inspect.getsource(faust_consumer)  # the module's text, whatever is patched
    assert "Cancelling getmany" in source and "Seek back to committed offsets" in source
    for name in (
        "_wait_next_records",
        "perform_seek",
        "seek_wait",
        "_to_message",
        "highwater",
        "assignment",
    ):
        assert callable(getattr(Consumer, name, None)), name
    assert "self._buffered_partitions = set()" in source
    assert {"_suspend", "_resume"} <= set(vars(FlowControlEvent(initially_suspended=False)))


def test_the_offset_sought_to_is_what_faust_seeks_to_at_the_end_of_a_rebalance() -> None:
    """The input check takes where an assignment starts from Faust's own seek to committed
    offsets, without asking the group's coordinator. Faust's real ``perform_seek`` fills it
    (a committed 0 is stored as None: unknown, so the check asks the broker); a revocation
    empties it."""

    class Sought:
        def __init__(self) -> None:
            self._read_offset: dict[TP, int | None] = {}
            self._committed_offset: dict[TP, int | None] = {}

        async def seek_to_committed(self) -> dict[TP, int]:
            return {CLICKS0: 23, CLICKS1: 0}

    consumer = Sought()
    app = SimpleNamespace(consumer=consumer)
    assert faust_fixes.sought_offset(app, CLICKS0) is None  # not sought yet

    asyncio.run(Consumer.perform_seek(consumer))  # type: ignore[arg-type]

    assert faust_fixes.sought_offset(app, CLICKS0) == 23
    assert faust_fixes.sought_offset(app, CLICKS1) is None
    source = inspect.getsource(Consumer.on_partitions_revoked)
    assert "self._committed_offset.pop(tp, None)" in source
