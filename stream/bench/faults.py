"""``streamrec bench faults``: clicks through a worker while brokers of a cluster fail.

For each scenario, one worker (``--min-replication`` 3) serves sessions whose clicks an
idempotent producer sends at ``--rate`` for as long as the faults take; then every click
is checked against an uninterrupted run of what the input topic holds, each session
stepped click by click:

- ``sent``, ``written`` (clicks on the input topic: the producer's retries after a
  broker's death can write one twice), ``answered`` (clicks with at least one answer),
  ``lost`` (written, never answered), ``duplicates`` (answers beyond the first) and
  ``differing_duplicates`` (a duplicate whose list differs beyond ties);
- ``diverged``: sessions whose final changelog state differs from the uninterrupted
  run's by more than 1e-5 (or is missing);
- ``longest_answer_gap_s``: the longest time without any answer while clicks were being
  sent; ``recovery_s``: from the end of the faults to the last click answered.

Scenarios (on the local three-broker cluster the command starts):

- ``leader-kill``: SIGKILL the leader of input partition 0, restart it 4 s later; then
  the same for the changelog's partition 0;
- ``rolling-restart``: every broker in turn stopped (SIGTERM) and started again;
- ``none``: no fault, the baseline (the only one with ``--broker``: a user's cluster,
  whose broker processes this command cannot control).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model.artifact import load_model
from model.errors import UserError
from stream.bench.serving import untrained_model
from stream.devtools.brokers import KafkaCluster
from stream.devtools.processes import StreamNames, WorkerProcess, start_readers
from stream.devtools.testing import (
    STATE_TOLERANCE,
    PacedClicks,
    answered_sources,
    final_states,
    same_up_to_ties,
)
from stream.kafka.config import bootstrap_servers
from stream.kafka.wire import Click
from stream.serving.scoring import rebuild_states

SESSIONS = 30
Fault = Callable[[KafkaCluster | None, StreamNames], None]


@dataclass(frozen=True)
class FaultRun:
    """What one scenario did to the clicks (see the module docstring)."""

    scenario: str
    rate: float
    sent: int
    written: int
    answered: int
    lost: int
    duplicates: int
    differing_duplicates: int
    diverged: int
    longest_answer_gap_s: float
    recovery_s: float


def kill_leaders(cluster: KafkaCluster | None, names: StreamNames) -> None:
    assert cluster is not None
    for topic in (names.clicks, f"{names.app_id}-sessions-changelog"):
        time.sleep(2.0)
        leader = cluster.node(cluster.leader(topic, 0))
        leader.kill()
        time.sleep(4.0)
        leader.start()
    time.sleep(2.0)


def rolling_restart(cluster: KafkaCluster | None, names: StreamNames) -> None:
    assert cluster is not None
    for node in cluster.nodes.values():
        time.sleep(1.0)
        node.stop()  # SIGTERM: a controlled shutdown moves its leaderships first
        node.start()
    time.sleep(1.0)


def no_fault(cluster: KafkaCluster | None, names: StreamNames) -> None:
    time.sleep(5.0)


SCENARIOS: dict[str, Fault] = {
    "leader-kill": kill_leaders,
    "rolling-restart": rolling_restart,
    "none": no_fault,
}


def run_scenario(
    bootstrap: str,
    cluster: KafkaCluster | None,
    model: Path,
    work: Path,
    scenario: str,
    rate: float,
) -> FaultRun:
    """Send clicks at ``rate`` to one worker while ``scenario``'s faults run (several
    scenarios joined by ``+`` run one after the other); check them."""
    faults = [SCENARIOS[name] for name in scenario.split("+")]
    recommender = load_model(model, device="cpu")
    ids = recommender.item_map.ids

    def click(n: int) -> Click:
        session, position = n % SESSIONS, n // SESSIONS
        return Click(f"s{session}", ids[(13 * session + 7 * position) % len(ids)], 1000.0 + n)

    names = StreamNames("faults-" + scenario.replace("+", "-"))
    worker = WorkerProcess(bootstrap, model, names, work, "--min-replication", "3").start()
    inputs = outputs = None
    try:
        worker.wait_until_consuming(bootstrap, names.app_id, timeout=120)
        inputs, outputs = start_readers(bootstrap, names, partitions=4)
        producer = PacedClicks(bootstrap, names.clicks, click, per_s=rate)
        producer.start()
        for fault in faults:
            fault(cluster, names)
        faults_over = time.time()
        sent = producer.stop()
        deadline = time.monotonic() + 180
        while len(answered_sources(outputs.messages)) < sent and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        worker.stop()
        for reader in (inputs, outputs):
            if reader is not None:
                reader.close()
    assert inputs is not None and outputs is not None
    produced = {(m.partition(), m.offset()) for m in inputs.messages}
    by_source: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for received in outputs.messages:
        source = received.value["source"]
        by_source[(source["partition"], source["offset"])].append(received.value)
    differing = sum(
        not same_up_to_ties(_scored(again), _scored(answers[0]))
        for answers in by_source.values()
        for again in answers[1:]
    )
    # The reference is what the input topic holds, in offset order: an idempotent
    # producer can still write a click twice when a broker dies (measured: 2 of 35,820)
    sessions: dict[str, list[str]] = defaultdict(list)
    for message in sorted(inputs.messages, key=lambda m: (m.partition(), m.offset())):
        clicked = json.loads(message.value())
        sessions[clicked["session_id"]].append(clicked["item_id"])
    states = final_states(bootstrap, f"{names.app_id}-sessions-changelog")
    hidden, _ = rebuild_states(recommender, list(sessions.values()))
    diverged = sum(
        session not in states
        or states[session].recent_items != tuple(items[-20:])
        or not np.allclose(states[session].hidden, hidden[row], rtol=0, atol=STATE_TOLERANCE)
        for row, (session, items) in enumerate(sessions.items())
    )
    first_sent = min(m.timestamp()[1] for m in inputs.messages) / 1000.0
    answered_at = sorted(r.consumed_at for r in outputs.messages)
    flowing = [first_sent] + [t for t in answered_at if t <= faults_over]
    return FaultRun(
        scenario=scenario,
        rate=rate,
        sent=sent,
        written=len(produced),
        answered=len(set(by_source) & produced),
        lost=len(produced - set(by_source)),
        duplicates=len(outputs.messages) - len(by_source),
        differing_duplicates=differing,
        diverged=diverged,
        longest_answer_gap_s=float(np.diff(flowing).max()) if len(flowing) > 1 else 0.0,
        recovery_s=max(answered_at[-1] - faults_over, 0.0) if answered_at else float("nan"),
    )


def _scored(answer: dict[str, Any]) -> list[tuple[str, float]]:
    return [(r["item_id"], r["score"]) for r in answer["recommendations"]]


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.broker and set(args.scenarios) - {"none"}:
        raise UserError(
            "--broker names a cluster whose broker processes this command cannot kill or "
            "restart: use --scenarios none there, or no --broker (a local 3-broker cluster)"
        )
    with tempfile.TemporaryDirectory(prefix="streamrec-faults-") as tmp:
        work = Path(tmp)
        model = Path(args.model) if args.model else work / "model"
        if not args.model:
            untrained_model(300, model)
        cluster = None if args.broker else KafkaCluster(3, work / "cluster")
        runs = []
        try:
            if cluster is not None:
                print("starting a local 3-broker cluster", file=sys.stderr)
                cluster.start()
            bootstrap = bootstrap_servers(args.broker) if args.broker else cluster.bootstrap  # type: ignore[union-attr]
            for scenario in args.scenarios:
                print(f"scenario {scenario} at {args.rate:g} clicks/s", file=sys.stderr)
                (work / scenario).mkdir()
                result = run_scenario(
                    bootstrap, cluster, model, work / scenario, scenario, args.rate
                )
                print(asdict(result), file=sys.stderr)
                runs.append(asdict(result))
        finally:
            if cluster is not None:
                cluster.kill()
    return {"scenarios": runs}


def add_parsers(benches: argparse._SubParsersAction) -> None:
    p = benches.add_parser(
        "faults",
        help="clicks through a worker while brokers of a cluster die and restart",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "--scenarios",
        nargs="+",
        choices=sorted(SCENARIOS),
        default=["leader-kill", "rolling-restart"],
        help="what to do to the brokers (default: leader-kill rolling-restart)",
    )
    p.add_argument("--rate", type=float, default=500.0, help="clicks per second (default 500)")
    p.add_argument("--model", default=None, help="model to serve (default: an untrained one)")
    p.add_argument(
        "--broker",
        default=None,
        help="a running cluster instead of a local one (only --scenarios none)",
    )
    p.set_defaults(measure=run)
