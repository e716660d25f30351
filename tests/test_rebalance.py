"""A rebalance through a real broker: a worker keeps only the sessions of its partitions.

Two workers share one group. Worker ``a`` answers clicks of sessions on every partition,
then ``b`` joins and takes some of its partitions: each must end up holding (and reporting
in ``streamrec_active_sessions``) only the sessions of the partitions it owns, and ``a``
writes no tombstone for those it lost (``b`` owns them now). When ``b`` leaves, ``a`` gets
those sessions back from the changelog and their states go on where they were.
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
from faust.types import TP

from model.artifact import load_model
from stream.bench.serving import untrained_model
from stream.devtools.processes import StreamNames, TopicReader, WorkerProcess, start_readers
from stream.devtools.testing import free_port, http_get, produce_clicks, read_all
from stream.event_time import WATERMARK_RANK
from stream.kafka.wire import Click
from stream.serving.app import create_app
from stream.serving.metrics import REBALANCING
from stream.serving.settings import WorkerSettings
from stream.serving.state import SessionState

PARTITIONS = 4
SESSIONS = 60
T = TypeVar("T")


@dataclass(frozen=True)
class Scrape:
    """What a ready worker's ``/metrics`` said."""

    assigned: int
    active_sessions: int
    partitions: frozenset[int]  # input partitions it reports a lag for: its assignment


class Worker:
    """A worker process serving its metrics on a port of its own."""

    def __init__(
        self, name: str, bootstrap: str, model: Path, names: StreamNames, work: Path
    ) -> None:
        self.name = name
        self.port = free_port()
        self.input_topic = names.clicks
        work.mkdir()
        self.process = WorkerProcess(
            bootstrap, model, names, work, "--web-port", str(self.port), partitions=PARTITIONS
        )

    def scrape(self) -> Scrape | None:
        """None unless the worker is ready and its lag lists every partition it owns (so
        that its partition set is whole)."""
        self.process.check_alive()
        base = f"http://127.0.0.1:{self.port}"
        try:
            with urllib.request.urlopen(base + "/metrics", timeout=5) as response:
                text = response.read().decode()
            with urllib.request.urlopen(base + "/readyz", timeout=5):
                pass
        except OSError:  # not listening yet, or 503 (urllib's HTTPError): not ready
            return None

        def gauge(name: str) -> int:
            match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
            assert match, f"{name} not in /metrics"
            return int(float(match.group(1)))

        lagging = re.findall(
            r'^streamrec_consumer_lag_messages\{partition="(\d+)",topic="([^"]+)"\}',
            text,
            re.MULTILINE,
        )
        scrape = Scrape(
            assigned=gauge("streamrec_assigned_partitions"),
            active_sessions=gauge("streamrec_active_sessions"),
            partitions=frozenset(int(p) for p, topic in lagging if topic == self.input_topic),
        )
        return scrape if scrape.assigned == len(scrape.partitions) else None


def wait_until(
    probe: Callable[[], T | None], what: str, workers: Sequence[Worker], timeout: float = 90.0
) -> T:
    """``probe()``'s first answer that is not None; fails with the workers' logs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = probe()
        if result is not None:
            return result
        time.sleep(0.3)
    logs = "\n---\n".join(f"{w.name}:\n{w.process.log()[-3000:]}" for w in workers)
    raise AssertionError(f"no {what} within {timeout:g} s:\n{logs}")


def stop_all(workers: Sequence[Worker], *readers: TopicReader) -> None:
    """Stop the workers that were started, then the readers."""
    for worker in workers:
        if worker.process.process is not None:
            worker.process.stop()
    for reader in readers:
        reader.close()


def holding(worker: Worker, sessions: int, timeout: float) -> Scrape:
    """The worker's first scrape reporting ``sessions`` active sessions, or its
    last one when none did within ``timeout``."""
    deadline = time.monotonic() + timeout
    last = wait_until(worker.scrape, f"{worker.name} ready", [worker])
    while last.active_sessions != sessions and time.monotonic() < deadline:
        time.sleep(0.3)
        last = worker.scrape() or last
    return last


@pytest.mark.kafka
def test_a_worker_that_loses_partitions_keeps_only_the_sessions_it_owns(
    kafka_bootstrap: str, small_model: Path, tmp_path: Path
) -> None:
    ids = load_model(small_model, device="cpu").item_map.ids
    sessions = {
        f"s{k}": [ids[(7 * k + 3 * j) % len(ids)] for j in range(3)] for k in range(SESSIONS)
    }

    def clicks(j: int) -> list[Click]:
        return [Click(s, items[j], 1000.0 + j) for s, items in sessions.items()]

    names = StreamNames("rebalance")
    inputs, outputs = start_readers(kafka_bootstrap, names, partitions=PARTITIONS)
    a = Worker("a", kafka_bootstrap, small_model, names, tmp_path / "a")
    b = Worker("b", kafka_bootstrap, small_model, names, tmp_path / "b")

    def a_alone(active_sessions: int) -> Scrape | None:
        scrape = a.scrape()
        if scrape and scrape.assigned == PARTITIONS:
            return scrape if scrape.active_sessions == active_sessions else None
        return None

    def split() -> tuple[Scrape, Scrape] | None:
        scrapes = a.scrape(), b.scrape()
        if not (scrapes[0] and scrapes[1] and scrapes[0].assigned and scrapes[1].assigned):
            return None
        owned = scrapes[0].partitions | scrapes[1].partitions
        disjoint = scrapes[0].assigned + scrapes[1].assigned == PARTITIONS
        return (scrapes[0], scrapes[1]) if disjoint and owned == set(range(PARTITIONS)) else None

    try:
        a.process.start()
        wait_until(lambda: a_alone(0), "a owning every partition", [a])
        produce_clicks(kafka_bootstrap, names.clicks, clicks(0) + clicks(1))
        assert outputs.wait_for(2 * SESSIONS, timeout=90), a.process.log()[-3000:]
        home = {r.value["session_id"]: r.value["source"]["partition"] for r in outputs.messages}
        assert set(home.values()) == set(range(PARTITIONS))  # sessions on every partition
        wait_until(lambda: a_alone(SESSIONS), f"a holding all {SESSIONS} sessions", [a])

        b.process.start()
        # What the rest depends on: partitions moved from a to b.
        moved = wait_until(split, "split of the partitions between a and b", [a, b])
        for worker, owned in zip((a, b), moved):
            expected = sum(home[s] in owned.partitions for s in sessions)
            held = holding(worker, expected, timeout=20.0)
            assert held.active_sessions == expected, (
                f"{worker.name} holds {held.active_sessions} sessions, owns {expected} "
                f"(partitions {sorted(held.partitions)}):\n" + worker.process.log()[-3000:]
            )
            assert held.partitions == owned.partitions  # no other rebalance in between

        # b leaves: a gets every session back from the changelog, and their states go on.
        b.process.stop()
        wait_until(lambda: a_alone(SESSIONS), f"a holding all {SESSIONS} sessions again", [a])
        produce_clicks(kafka_bootstrap, names.clicks, clicks(2))
        assert outputs.wait_for(3 * SESSIONS, timeout=90), a.process.log()[-3000:]
    finally:
        stop_all((a, b), inputs, outputs)

    changelog = read_all(kafka_bootstrap, f"{names.app_id}-sessions-changelog")
    assert len(changelog) >= 3 * SESSIONS
    assert [m.key() for m in changelog if m.value() is None] == []  # no tombstone
    final = {m.key().decode(): SessionState.decode(m.value()) for m in changelog}
    assert {s: list(state.recent_items) for s, state in final.items()} == sessions


def test_the_quality_tracker_forgets_the_sessions_of_lost_partitions(tmp_path: Path) -> None:
    """What the broker test cannot see over HTTP, with the worker app's own signals: the
    sessions dropped from the table are no longer tracked for live quality either; and
    the revoked signal, which names every partition (kept ones too), drops nothing."""
    recommender = untrained_model(10, tmp_path / "model")
    settings = WorkerSettings(model=str(tmp_path / "model"), data_dir=str(tmp_path / "data"))
    app, processor = create_app(settings, recommender)
    store, online = processor.table.data, processor.metrics.online
    for partition in range(PARTITIONS):
        session = f"s{partition}"
        store[session.encode()] = SessionState(
            np.zeros(2, np.float32), ("i",), 0, 1.0, True, "v", partition
        ).encode()
        online.observe(session, "i", ["i"], "v", {"i"})
    changelog = processor.table.changelog_topic.get_topic_name()
    everything = {TP(t, p) for t in (settings.input_topic, changelog) for p in range(PARTITIONS)}
    asyncio.run(app.on_partitions_assigned.send(everything))
    asyncio.run(app.on_partitions_revoked.send(everything))
    assert (len(store), len(online)) == (PARTITIONS, PARTITIONS)
    asyncio.run(app.on_partitions_assigned.send({tp for tp in everything if tp.partition % 2}))
    assert set(store) == {b"s1", b"s3"}
    assert len(online) == 2
    online.observe("s0", "i", ["i"], "v", {"i"})  # a first click again: nothing to judge
    assert sum(online.predictions.values()) == 0


def test_expiry_markers_go_only_to_the_partitions_still_owned(tmp_path: Path) -> None:
    """A partition's expiry markers are sent by its owner: a worker that lost partitions
    stops sending theirs (it used to, from their last watermarks, for ever)."""
    recommender = untrained_model(10, tmp_path / "model")
    settings = WorkerSettings(model=str(tmp_path / "model"), data_dir=str(tmp_path / "data"))
    app, processor = create_app(settings, recommender)
    for partition in range(PARTITIONS):
        for k in range(WATERMARK_RANK):
            processor.expiry.watermarks.advance(partition, 1000.0 + k)
    changelog = processor.table.changelog_topic.get_topic_name()
    everything = {TP(t, p) for t in (settings.input_topic, changelog) for p in range(PARTITIONS)}
    asyncio.run(app.on_partitions_assigned.send(everything))
    assert set(processor.expiry.markers()) == set(range(PARTITIONS))
    asyncio.run(app.on_partitions_revoked.send(everything))
    asyncio.run(app.on_partitions_assigned.send({tp for tp in everything if tp.partition % 2}))
    assert set(processor.expiry.markers()) == {1, 3}


@pytest.mark.kafka
def test_a_worker_is_not_ready_while_its_group_rebalances(
    kafka_bootstrap: str, small_model: Path, tmp_path: Path
) -> None:
    """``/readyz`` answers 503 with the reason while the group rebalances and the table
    recovers (a load balancer stops sending it traffic), then 200 again."""
    names = StreamNames("ready")
    inputs, outputs = start_readers(kafka_bootstrap, names, partitions=PARTITIONS)
    a = Worker("a", kafka_bootstrap, small_model, names, tmp_path / "a")
    b = Worker("b", kafka_bootstrap, small_model, names, tmp_path / "b")
    seen: list[tuple[float, int, str]] = []
    try:
        a.process.start()
        wait_until(a.scrape, "a ready", [a])
        b.process.start()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            status, body = http_get(f"http://127.0.0.1:{a.port}/readyz")
            seen.append((time.monotonic(), status, body.strip()))
            if status == 200 and any(s == 503 for _, s, _ in seen):
                break
            time.sleep(0.05)
    finally:
        stop_all((a, b), inputs, outputs)
    reasons = {body for _, status, body in seen if status == 503}
    assert "rebalancing or recovering the session table" in reasons, seen[:5]
    assert seen[-1][1] == 200 and seen[-1][2].startswith("ok: serving"), seen[-5:]


def test_revoking_partitions_makes_the_worker_not_ready_at_once(tmp_path: Path) -> None:
    """With the worker app's own signals: the revocation marks the worker not ready before
    any refresh runs, so a rebalance shorter than the refresh interval still shows (the
    broker test above sees it only when the rebalance outlasts a refresh tick)."""
    recommender = untrained_model(10, tmp_path / "model")
    settings = WorkerSettings(model=str(tmp_path / "model"), data_dir=str(tmp_path / "data"))
    app, processor = create_app(settings, recommender)
    processor.health.not_ready_reason = None  # serving
    partitions = {TP(settings.input_topic, p) for p in range(PARTITIONS)}
    asyncio.run(app.on_partitions_revoked.send(partitions))
    assert processor.health.not_ready_reason == REBALANCING
