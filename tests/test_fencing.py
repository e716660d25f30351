"""A worker paused past its group session (a long GC, SIGSTOP, a frozen VM) through a real
broker: when it wakes up, another worker owns its partitions, and it must not write
session states there any more. It exits (status 75) without writing the batch it was in,
and the other worker answers every click.

Each session's changelog records must advance: their ``last_offset`` never goes back
along the changelog partition. A stale record written by the paused worker after the new
owner's would, and recovery (which keeps the last record of each key, as compaction
does) would then bring back a state without the new owner's clicks; with their offsets
committed, those clicks would never be applied again.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from model.artifact import load_model
from stream.devtools.processes import StreamNames, WorkerProcess, start_readers
from stream.devtools.testing import PacedClicks, answered_sources, read_all
from stream.kafka.wire import Click
from stream.serving import fencing
from stream.serving.fencing import MEMBERSHIP_LOST_EXIT, GroupFence, MembershipLost
from stream.serving.state import SessionState

PARTITIONS = 2
SESSIONS = 40
RATE = 500  # clicks/s
PAUSES = 4


def pause(worker: WorkerProcess, seconds: float) -> None:
    assert worker.process is not None
    os.kill(worker.process.pid, signal.SIGSTOP)
    time.sleep(seconds)
    os.kill(worker.process.pid, signal.SIGCONT)


@pytest.mark.kafka
def test_a_worker_paused_past_its_session_writes_no_stale_state(
    kafka_bootstrap: str, small_model: Path, tmp_path: Path
) -> None:
    items = list(load_model(small_model, device="cpu").item_map.ids)
    names = StreamNames("fence")
    inputs, outputs = start_readers(kafka_bootstrap, names, partitions=PARTITIONS)
    workers = [
        WorkerProcess(kafka_bootstrap, small_model, names, tmp_path / n, partitions=PARTITIONS)
        for n in ("a", "b")
    ]
    for n in ("a", "b"):
        (tmp_path / n).mkdir()
    clicks = PacedClicks(
        kafka_bootstrap,
        names.clicks,
        lambda k: Click(f"s{k % SESSIONS}", items[k % len(items)], 1000.0 + k / RATE),
        per_s=RATE,
    )
    paused = workers[0]
    try:
        for worker in workers:
            worker.start()
            worker.wait_until_consuming(kafka_bootstrap, names.app_id)
        clicks.start()
        # What the test depends on: a pause that falls inside a batch. Most do at this
        # rate; one that falls between two batches only makes the worker join again.
        for _ in range(PAUSES):
            time.sleep(3)
            pause(paused, seconds=10)  # past the group session (6 s): b takes over
            try:
                status = paused.process.wait(timeout=15)
                break
            except subprocess.TimeoutExpired:
                continue
        else:
            raise AssertionError(f"none of {PAUSES} pauses fell inside a batch")
        assert status == MEMBERSHIP_LOST_EXIT, paused.log()[-3000:]
        # found in the batch it was in, or first at an offset commit: either way it leaves
        assert any(
            f"exiting without {what}" in paused.log()
            for what in ("writing the batch", "committing")
        )
        time.sleep(3)
        sent = clicks.stop()
        deadline = time.monotonic() + 90
        while len(answered_sources(outputs.messages)) < sent and time.monotonic() < deadline:
            time.sleep(0.3)
        assert len(answered_sources(outputs.messages)) == sent
    finally:
        for worker in workers:
            if worker.process is not None and worker.process.poll() is None:
                os.kill(worker.process.pid, signal.SIGCONT)
                worker.stop()
        inputs.close()
        outputs.close()

    changelog = read_all(kafka_bootstrap, f"{names.app_id}-sessions-changelog")
    last: dict[tuple[int, bytes], int] = {}
    regressions = []
    for message in changelog:
        if message.value() is None:
            continue
        state = SessionState.decode(message.value())
        where = (message.partition(), message.key())
        if state.last_offset < last.get(where, -1):
            regressions.append((where, last[where], state.last_offset, message.offset()))
        last[where] = max(last.get(where, -1), state.last_offset)
    assert regressions == [], regressions[:10]


def test_the_fence_lets_a_confirmed_membership_write_and_stops_a_lapsed_one() -> None:
    """The lease rule itself, with the membership records the consumer thread writes."""
    group = f"g-{time.monotonic_ns()}"
    fence = GroupFence(group, session_timeout_s=0.5)  # lease 0.4 s
    assert fence.generation() is None  # no consumer of the group here: nothing to fence
    asyncio.run(fence.confirm(None))

    fencing.confirmed(group, 3, time.monotonic())
    assert fence.generation() == 3
    asyncio.run(fence.confirm(3))  # confirmed just now

    # Woken up after the lease: waits for the next heartbeat's answer, then writes.
    fencing.confirmed(group, 3, time.monotonic() - 0.45)
    threading.Timer(0.1, fencing.confirmed, (group, 3, time.monotonic())).start()
    started = time.monotonic()
    asyncio.run(fence.confirm(3))
    assert time.monotonic() - started >= 0.09

    # Evicted meanwhile: the answer resets the membership.
    fencing.confirmed(group, 3, time.monotonic() - 0.45)
    threading.Timer(0.1, fencing.lapsed, (group,)).start()
    with pytest.raises(MembershipLost, match="generation 3 ended"):
        asyncio.run(fence.confirm(3))

    # Rejoined under a new generation: a batch begun under the old one writes nothing.
    fencing.confirmed(group, 4, time.monotonic())
    with pytest.raises(MembershipLost, match="generation 3 ended"):
        asyncio.run(fence.confirm(3))

    # No heartbeat answered within a whole session.
    fencing.confirmed(group, 4, time.monotonic() - 0.45)
    with pytest.raises(MembershipLost, match="no heartbeat confirmed"):
        asyncio.run(fence.confirm(4))


def test_a_commit_that_finds_the_membership_lapsed_exits_like_a_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker woken past its group session can find the lapse first at an offset commit
    (changelog records the producer's fence failed) rather than in a batch. It must leave
    the same way, with status 75 and nothing committed; it crashed with another status
    instead (seen in CI: "not committing: MembershipLost(...)")."""
    from faust.types import TP

    from stream.bench.serving import untrained_model
    from stream.serving import faust_patches
    from stream.serving.app import create_app
    from stream.serving.settings import WorkerSettings

    recommender = untrained_model(10, tmp_path / "model")
    settings = WorkerSettings(model=str(tmp_path / "model"), data_dir=str(tmp_path / "data"))
    app, processor = create_app(settings, recommender)

    async def fenced_write() -> None:
        raise MembershipLost("no heartbeat confirmed the group membership")

    processor._state_writes.append(fenced_write())
    committed: list[object] = []

    async def commit(self: object, offsets: object) -> None:
        committed.append(offsets)

    def leave(status: int) -> None:
        raise SystemExit(status)

    monkeypatch.setattr(faust_patches, "_handle_attached", commit)
    monkeypatch.setattr(os, "_exit", leave)
    consumer = type("Consumer", (), {"app": app})()
    with pytest.raises(SystemExit) as left:
        asyncio.run(
            faust_patches._handle_attached_after_barrier(consumer, {TP(settings.input_topic, 0): 5})
        )
    assert (left.value.code, committed) == (MEMBERSHIP_LOST_EXIT, [])


def test_a_batch_waits_out_a_broker_outage_longer_than_the_session() -> None:
    """While the broker is down no heartbeat can be answered, yet the membership may have
    survived (a coordinator that restarts reloads its groups), and the next answer says so.
    The batch waits for that answer up to the fence's patience (the worker's broker wait)
    instead of exiting after one session: the worker then paused through an outage, as the
    README promises, where it exited with status 75 (CI, test_crash_recovery's outage)."""
    group = f"g-{time.monotonic_ns()}"
    fence = GroupFence(group, session_timeout_s=0.3, patience_s=3.0)
    fencing.confirmed(group, 5, time.monotonic() - 0.3)  # the last answer before the outage
    threading.Timer(0.8, lambda: fencing.confirmed(group, 5, time.monotonic())).start()
    started = time.monotonic()
    asyncio.run(fence.confirm(5))
    assert time.monotonic() - started >= 0.75

    impatient = GroupFence(group, session_timeout_s=0.3, patience_s=0.6)
    fencing.confirmed(group, 5, time.monotonic() - 0.3)
    with pytest.raises(MembershipLost, match="waited 0.6 s"):
        asyncio.run(impatient.confirm(5))
