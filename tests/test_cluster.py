"""A three-broker cluster: a worker rides through a leader's death and a rolling restart,
losing no click and changing no state.

The cluster (``streamrec broker --brokers 3``'s :class:`KafkaCluster`: replication 3,
``min.insync.replicas`` 2) starts once for the module. Each test sends clicks at a steady
rate while brokers die or restart, then checks every click against an uninterrupted,
click-by-click run: all answered, final states equal within 1e-5, duplicates identical.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from model.artifact import load_model
from stream.devtools.brokers import KafkaCluster
from stream.devtools.processes import StreamNames, WorkerProcess, start_readers
from stream.devtools.testing import (
    REPO,
    STATE_TOLERANCE,
    PacedClicks,
    answered_sources,
    final_states,
    same_up_to_ties,
)
from stream.kafka.wire import Click
from stream.serving.scoring import rebuild_states

pytestmark = pytest.mark.kafka

SESSIONS = 30


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaCluster]:
    running = KafkaCluster(3, tmp_path_factory.mktemp("cluster"))
    running.start()
    yield running
    running.kill()  # nothing to keep: a graceful stop of every node only takes longer


def run_through(
    cluster: KafkaCluster,
    model: Path,
    work: Path,
    faults: Callable[[StreamNames], None],
    per_s: float,
) -> None:
    """Send clicks of ``SESSIONS`` sessions at ``per_s`` to one worker for as long as
    ``faults(names)`` runs, then check the run against an uninterrupted one."""
    recommender = load_model(model, device="cpu")
    ids = recommender.item_map.ids

    def click(n: int) -> Click:
        session, position = n % SESSIONS, n // SESSIONS
        return Click(f"s{session}", ids[(13 * session + 7 * position) % len(ids)], 1000.0 + n)

    names = StreamNames("cluster")
    worker = WorkerProcess(cluster.bootstrap, model, names, work, "--min-replication", "3")
    worker.start()
    inputs = outputs = None
    try:
        worker.wait_until_consuming(cluster.bootstrap, names.app_id, timeout=90)
        inputs, outputs = start_readers(cluster.bootstrap, names, partitions=4)
        producer = PacedClicks(cluster.bootstrap, names.clicks, click, per_s=per_s)
        producer.start()
        faults(names)
        sent = producer.stop()
        deadline = time.monotonic() + 120
        while len(answered_sources(outputs.messages)) < sent:
            assert time.monotonic() < deadline, (
                f"{len(answered_sources(outputs.messages))} of {sent} answered:\n"
                + worker.log()[-3000:]
            )
            time.sleep(0.2)
    finally:
        worker.stop()
        for reader in (inputs, outputs):
            if reader is not None:
                reader.close()
    assert inputs is not None and outputs is not None
    produced = {(m.partition(), m.offset()) for m in inputs.messages}
    assert len(produced) == sent  # the idempotent producer wrote each click once
    by_source: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for received in outputs.messages:
        source = received.value["source"]
        by_source[(source["partition"], source["offset"])].append(received.value)
    assert set(by_source) == produced
    for answers in by_source.values():
        for again in answers[1:]:
            assert same_up_to_ties(
                [(r["item_id"], r["score"]) for r in again["recommendations"]],
                [(r["item_id"], r["score"]) for r in answers[0]["recommendations"]],
            )
    sessions: dict[str, list[str]] = defaultdict(list)
    for n in range(sent):
        sessions[click(n).session_id].append(click(n).item_id)
    states = final_states(cluster.bootstrap, f"{names.app_id}-sessions-changelog")
    assert set(states) == set(sessions)
    # the uninterrupted run: every session stepped click by click, all sessions at once
    hidden, _ = rebuild_states(recommender, list(sessions.values()))
    for row, (session, items) in enumerate(sessions.items()):
        assert states[session].recent_items == tuple(items[-20:])
        np.testing.assert_allclose(
            states[session].hidden, hidden[row], rtol=0, atol=STATE_TOLERANCE, err_msg=session
        )


def test_killed_leaders_of_the_input_and_the_changelog_lose_nothing(
    cluster: KafkaCluster, small_model: Path, tmp_path: Path
) -> None:
    killed: list[int] = []

    def kill_leaders(names: StreamNames) -> None:
        for topic in (names.clicks, f"{names.app_id}-sessions-changelog"):
            time.sleep(2.0)
            leader = cluster.leader(topic, 0)
            cluster.node(leader).kill()
            killed.append(leader)
            time.sleep(4.0)
            cluster.node(leader).start()
        time.sleep(2.0)

    run_through(cluster, small_model, tmp_path, kill_leaders, per_s=150)
    assert len(killed) == 2


def test_a_rolling_restart_loses_nothing(
    cluster: KafkaCluster, small_model: Path, tmp_path: Path
) -> None:
    def roll(names: StreamNames) -> None:
        for node in cluster.nodes.values():
            time.sleep(1.0)
            node.stop()  # SIGTERM: a controlled shutdown moves its leaderships first
            node.start()
        time.sleep(1.0)

    run_through(cluster, small_model, tmp_path, roll, per_s=500)


def test_a_changelog_under_the_minimum_replication_is_refused(
    kafka_bootstrap: str, small_model: Path, tmp_path: Path
) -> None:
    names = StreamNames("replication")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "stream.cli",
            "worker",
            "--broker",
            f"kafka://{kafka_bootstrap}",
            "--model",
            str(small_model),
            "--data-dir",
            str(tmp_path),
            "--min-replication",
            "3",
            *names.worker_args(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        check=False,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "replicated to 1 broker(s), fewer than --min-replication 3" in done.stderr
