"""A three-broker cluster: a worker rides through a leader's death and a rolling restart,
losing no click and changing no state.

The cluster (``streamrec broker --brokers 3``'s :class:`KafkaCluster`: replication 3,
``min.insync.replicas`` 2) starts once for the module. The scenarios are those of
``streamrec bench faults`` (:mod:`stream.bench.faults`), which sends clicks at a steady
rate while brokers die or restart and checks every click against an uninterrupted run.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from stream.bench.faults import run_scenario
from stream.cli.main import main
from stream.devtools.brokers import KafkaCluster
from stream.devtools.processes import StreamNames
from stream.devtools.testing import REPO

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaCluster]:
    running = KafkaCluster(3, tmp_path_factory.mktemp("cluster"))
    running.start()
    yield running
    running.kill()  # nothing to keep: a graceful stop of every node only takes longer


def test_broker_faults_lose_no_click_and_change_no_state(
    cluster: KafkaCluster, small_model: Path, tmp_path: Path
) -> None:
    """At 500 clicks/s, the leaders of the input and of the changelog SIGKILLed in turn
    and restarted, then every broker restarted in turn (one worker run for both, to keep
    the suite short): every click answered, duplicates identical, final states equal a
    click-by-click run within 1e-5."""
    scenario = "leader-kill+rolling-restart"
    run = run_scenario(cluster.bootstrap, cluster, small_model, tmp_path, scenario, 500)
    assert run.sent > 1000 and run.answered == run.written >= run.sent, run
    assert (run.lost, run.diverged, run.differing_duplicates) == (0, 0, 0), run
    # the faults fell in mid-stream: answers stopped for a while and resumed
    assert run.longest_answer_gap_s > 0.5, run
    print(run)


def test_workers_killed_in_rebalances_between_model_swaps_lose_no_click(
    cluster: KafkaCluster, small_model: Path, tmp_path: Path
) -> None:
    """Ten times: a new model version published and answering, a worker started, and the
    oldest SIGKILLed while the group rebalances for it. Every click answered; a
    duplicate differs only when the version that gave it differs; final states equal a
    click-by-click run, each click applied by the version that answered it."""
    run = run_scenario(cluster.bootstrap, cluster, small_model, tmp_path, "worker-kill", 200)
    print(run)
    assert (run.worker_kills, run.model_swaps) == (10, 11), run
    assert run.sent > 1000 and run.answered == run.written >= run.sent, run
    assert (run.lost, run.diverged, run.differing_duplicates) == (0, 0, 0), run


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


@pytest.mark.parametrize("scenario", ["leader-kill", "rolling-restart"])
def test_the_bench_refuses_to_fault_brokers_it_did_not_start(
    scenario: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A user's cluster (``--broker``) gets only the scenarios that leave its brokers alone."""
    code = main(["bench", "faults", "--broker", "kafka://127.0.0.1:1", "--scenarios", scenario])
    assert code == 2
    assert "leave out leader-kill and rolling-restart there" in capsys.readouterr().err
