"""``streamrec bench faults``: clicks through workers while brokers or workers fail.

For each scenario, workers following a model registry (``--min-replication`` 3 on the local
cluster) serve sessions whose clicks an idempotent producer sends at ``--rate`` for as long
as the faults take; then every click is checked against an uninterrupted run of what the
input topic holds, each session stepped click by click by the model version that answered
it:

- ``sent``, ``written`` (clicks on the input topic: the producer's retries after a
  broker's death can write one twice), ``answered`` (clicks with at least one answer),
  ``lost`` (written, never answered; ``lost_by_partition`` says where and when),
  ``dead_lettered``, ``duplicates`` (answers beyond the first),
  ``differing_duplicates`` (a duplicate whose list differs beyond ties from the first
  answer by the same model version: never allowed) and ``duplicates_across_swaps`` (a
  duplicate from another version than the first answer: it may differ);
- ``diverged``: sessions whose final changelog state differs from the uninterrupted
  run's by more than 1e-5 (or is missing, or a click of it was lost), or whose first list
  under a model version differs from it (where a stale state is rebuilt);
- ``longest_answer_gap_s``: the longest time without any answer while clicks were being
  sent; ``recovery_s``: from the end of the faults to the last click answered;
- ``clicks_refetched``: clicks the workers' consumers skipped, which the workers read from
  the broker themselves (:mod:`stream.serving.sequence`; their logs say where);
- ``worker_kills`` and ``model_swaps``: what ``worker-kill`` did.

Scenarios:

- ``leader-kill``: SIGKILL the leader of input partition 0, restart it 4 s later; then
  the same for the changelog's partition 0;
- ``rolling-restart``: every broker in turn stopped (SIGTERM) and started again;
- ``worker-kill``: ten times, publish a new model version and wait until it answers, start
  another worker and SIGKILL the oldest while the group rebalances for the newcomer (two
  workers serve; the kills need no control of the brokers);
- ``none``: no fault, the baseline.

``leader-kill`` and ``rolling-restart`` act on the local three-broker cluster the command
starts; with ``--broker`` (a user's cluster, whose broker processes this command cannot
control) only ``worker-kill`` and ``none`` run.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.errors import UserError
from model.inference import Recommender
from stream.bench.serving import untrained_model
from stream.devtools.brokers import KafkaCluster
from stream.devtools.ports import free_port
from stream.devtools.processes import (
    StreamNames,
    TopicReader,
    WorkerProcess,
    start_readers,
    work_directory,
)
from stream.devtools.testing import (
    STATE_TOLERANCE,
    PacedClicks,
    answered_sources,
    final_states,
    http_get,
    read_all,
    same_up_to_ties,
    served_state,
)
from stream.kafka.config import bootstrap_servers
from stream.kafka.wire import Click
from stream.registry import ModelRegistry
from stream.serving.metrics import REBALANCING
from stream.serving.sequence import REFETCHED_LOG

SESSIONS = 30
WORKER_KILLS = 10


@dataclass
class Rig:
    """What a fault acts on: the brokers (None on a user's cluster), the stream, its
    workers (oldest first) and the registry they follow."""

    cluster: KafkaCluster | None
    bootstrap: str
    names: StreamNames
    work: Path
    registry: ModelRegistry
    outputs: TopicReader
    workers: list[WorkerProcess] = field(default_factory=list)
    #: every version published during the run, for the uninterrupted reference
    models: dict[str, Recommender] = field(default_factory=dict)
    worker_kills: int = 0

    def start_worker(self) -> WorkerProcess:
        """One more worker of the group; ``/readyz`` on a port of its own."""
        extra = ["--model-poll-s", "0.5", "--log-level", "info"]
        if self.cluster is not None:
            extra += ["--min-replication", "3"]
        worker = WorkerProcess(
            self.bootstrap, self.registry.root, self.names, self.work, *extra, web_port=free_port()
        ).start()
        self.workers.append(worker)
        return worker

    def swap_model(self) -> str:
        """Publish a new version (the current one's weights moved a little, as a round of
        training moves them) and wait until an answer carries it."""
        current = self.models[self.registry.current_version() or ""]
        version = self.registry.publish(perturbed(current, seed=len(self.models)))
        self.models[version] = self.registry.load(version)
        if not self.outputs.wait_until(
            lambda answers: any(a.value["model_version"] == version for a in answers[-200:]),
            timeout=120,
        ):
            raise UserError(f"no answer from model version {version} within 120 s")
        return version


Fault = Callable[[Rig], None]


@dataclass(frozen=True)
class FaultRun:
    """What one scenario did to the clicks (see the module docstring)."""

    scenario: str
    rate: float
    sent: int
    written: int
    answered: int
    lost: int
    #: partition -> [clicks lost, first and last offset lost, and the seconds after the
    #: first click when they were sent]: where to look in the logs
    lost_by_partition: dict[int, list[float]]
    #: clicks the workers dead-lettered (none here: every click is valid)
    dead_lettered: int
    duplicates: int
    differing_duplicates: int
    duplicates_across_swaps: int
    diverged: int
    longest_answer_gap_s: float
    recovery_s: float
    clicks_refetched: int
    worker_kills: int
    model_swaps: int


def perturbed(recommender: Recommender, seed: int) -> Recommender:
    """A copy of ``recommender`` with every weight moved by a tenth of its spread."""
    network = copy.deepcopy(recommender.network)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weights in network.parameters():
            noise = torch.randn(weights.shape, generator=generator)
            weights.add_(0.1 * float(weights.std()) * noise)
    return Recommender(network, recommender.item_map, recommender.popularity, recommender.config)


def kill_leaders(rig: Rig) -> None:
    cluster = rig.cluster
    assert cluster is not None
    for topic in (rig.names.clicks, f"{rig.names.app_id}-sessions-changelog"):
        time.sleep(2.0)
        leader = cluster.node(cluster.leader(topic, 0))
        leader.kill()
        time.sleep(4.0)
        leader.start()
    time.sleep(2.0)


def rolling_restart(rig: Rig) -> None:
    assert rig.cluster is not None
    for node in rig.cluster.nodes.values():
        time.sleep(1.0)
        node.stop()  # SIGTERM: a controlled shutdown moves its leaderships first
        node.start()
    time.sleep(1.0)


def kill_workers_in_rebalances(rig: Rig) -> None:
    for _ in range(WORKER_KILLS):
        rig.swap_model()
        rig.start_worker()
        oldest = rig.workers.pop(0)
        wait_until_rebalancing(oldest)
        oldest.kill()
        rig.worker_kills += 1
        print(
            f"worker-kill {rig.worker_kills}: SIGKILLed {oldest.log_path.name} "
            f"at {time.time():.1f}",
            file=sys.stderr,
        )
    rig.swap_model()  # and the survivors answer again


def wait_until_rebalancing(worker: WorkerProcess, timeout: float = 120.0) -> None:
    """Until ``worker``'s ``/readyz`` says its group is rebalancing."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        worker.check_alive()
        try:
            status, body = http_get(f"http://127.0.0.1:{worker.web_port}/readyz")
        except OSError:  # not serving its web page yet
            status, body = 0, ""
        if status == 503 and REBALANCING in body:
            return
        time.sleep(0.01)
    raise UserError(f"the worker never reported a rebalance within {timeout:g} s")


def no_fault(rig: Rig) -> None:
    time.sleep(5.0)


SCENARIOS: dict[str, Fault] = {
    "leader-kill": kill_leaders,
    "rolling-restart": rolling_restart,
    "worker-kill": kill_workers_in_rebalances,
    "none": no_fault,
}
#: the scenarios that kill or restart brokers: only on the cluster this command starts
BROKER_FAULTS = ("leader-kill", "rolling-restart")
#: workers serving from the start; one more joins and one dies at each worker kill
WORKERS = {"worker-kill": 2}


def run_scenario(
    bootstrap: str,
    cluster: KafkaCluster | None,
    model: Path,
    work: Path,
    scenario: str,
    rate: float,
) -> FaultRun:
    """Send clicks at ``rate`` to the workers while ``scenario``'s faults run (several
    scenarios joined by ``+`` run one after the other); check them."""
    parts = scenario.split("+")
    names = StreamNames("faults-" + scenario.replace("+", "-"))
    registry = ModelRegistry(work / "registry")
    first = registry.publish_directory(model)
    inputs, outputs = start_readers(bootstrap, names, partitions=4)
    rig = Rig(cluster, bootstrap, names, work, registry, outputs)
    rig.models[first] = registry.load(first)
    ids = rig.models[first].item_map.ids

    def click(n: int) -> Click:
        session, position = n % SESSIONS, n // SESSIONS
        return Click(f"s{session}", ids[(13 * session + 7 * position) % len(ids)], 1000.0 + n)

    try:
        for _ in range(max(WORKERS.get(part, 1) for part in parts)):
            rig.start_worker()
        for worker in rig.workers:
            worker.wait_until_consuming(bootstrap, names.app_id, timeout=120)
        producer = PacedClicks(bootstrap, names.clicks, click, per_s=rate)
        producer.start()
        for part in parts:
            SCENARIOS[part](rig)
        faults_over = time.time()
        sent = producer.stop()
        deadline = time.monotonic() + 180
        while len(answered_sources(outputs.messages)) < sent and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        for worker in rig.workers:
            worker.stop()
        inputs.close()
        outputs.close()
    return check(rig, inputs, scenario, rate, sent, faults_over)


def check(
    rig: Rig, inputs: TopicReader, scenario: str, rate: float, sent: int, faults_over: float
) -> FaultRun:
    """Every click of the input topic against its answers and the final changelog."""
    produced = {(m.partition(), m.offset()) for m in inputs.messages}
    by_source: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for received in rig.outputs.messages:
        source = received.value["source"]
        by_source[(source["partition"], source["offset"])].append(received.value)
    again = [(answers[0], later) for answers in by_source.values() for later in answers[1:]]
    across_swaps = sum(first["model_version"] != a["model_version"] for first, a in again)
    differing = sum(
        first["model_version"] == a["model_version"]
        and not same_up_to_ties(_scored(a), _scored(first))
        for first, a in again
    )
    # The reference is what the input topic holds, in offset order: an idempotent
    # producer can still write a click twice when a broker dies (measured: 2 of 35,820).
    # Each click is applied by the version of its last answer: the one whose state stayed.
    sessions: dict[str, list[tuple[str, dict[str, Any] | None]]] = defaultdict(list)
    for message in sorted(inputs.messages, key=lambda m: (m.partition(), m.offset())):
        clicked = json.loads(message.value())
        answers = by_source.get((message.partition(), message.offset()))
        sessions[clicked["session_id"]].append(
            (clicked["item_id"], answers[-1] if answers else None)
        )
    states = final_states(rig.bootstrap, f"{rig.names.app_id}-sessions-changelog")
    diverged = 0
    for session, clicks in sessions.items():
        items = [item for item, _ in clicks]
        answered = [answer for _, answer in clicks if answer is not None]
        state = states.get(session)
        if state is None or len(answered) < len(items):  # a click lost
            diverged += 1
            continue
        versions = [answer["model_version"] for answer in answered]
        # The first list under each version: where a state from another one is rebuilt
        swapped = [j for j, v in enumerate(versions) if j == 0 or v != versions[j - 1]]
        hidden, lists = served_state(rig.models, items, versions, ranked_at=swapped)
        diverged += (
            state.recent_items != tuple(items[-20:])
            or state.model_version != versions[-1]
            or not np.allclose(state.hidden, hidden, rtol=0, atol=STATE_TOLERANCE)
            or not all(same_up_to_ties(_scored(answered[j]), lists[j]) for j in swapped)
        )
    sent_at = {(m.partition(), m.offset()): m.timestamp()[1] / 1000.0 for m in inputs.messages}
    first_sent = min(sent_at.values())
    answered_at = sorted(r.consumed_at for r in rig.outputs.messages)
    flowing = [first_sent] + [t for t in answered_at if t <= faults_over]
    return FaultRun(
        scenario=scenario,
        rate=rate,
        sent=sent,
        written=len(produced),
        answered=len(set(by_source) & produced),
        lost=len(produced - set(by_source)),
        lost_by_partition=_by_partition(produced - set(by_source), sent_at, first_sent),
        dead_lettered=len(read_all(rig.bootstrap, rig.names.dlq)),
        duplicates=len(again),
        differing_duplicates=differing,
        duplicates_across_swaps=across_swaps,
        diverged=diverged,
        longest_answer_gap_s=float(np.diff(flowing).max()) if len(flowing) > 1 else 0.0,
        recovery_s=max(answered_at[-1] - faults_over, 0.0) if answered_at else float("nan"),
        clicks_refetched=sum(
            int(n)
            for log in rig.work.glob("worker-*.log")
            for n in REFETCHED_LOG.findall(log.read_text(errors="replace"))
        ),
        worker_kills=rig.worker_kills,
        model_swaps=len(rig.models) - 1,
    )


def _by_partition(
    sources: set[tuple[int, int]], sent_at: dict[tuple[int, int], float], start: float
) -> dict[int, list[float]]:
    offsets: dict[int, list[int]] = defaultdict(list)
    for partition, offset in sources:
        offsets[partition].append(offset)
    return {
        p: [len(o), min(o), max(o), sent_at[p, min(o)] - start, sent_at[p, max(o)] - start]
        for p, o in sorted(offsets.items())
    }


def _scored(answer: dict[str, Any]) -> list[tuple[str, float]]:
    return [(r["item_id"], r["score"]) for r in answer["recommendations"]]


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.broker and set(args.scenarios) & set(BROKER_FAULTS):
        raise UserError(
            "--broker names a cluster whose broker processes this command cannot kill or "
            f"restart: leave out {' and '.join(BROKER_FAULTS)} there (worker-kill and none "
            "run anywhere), or give no --broker (a local 3-broker cluster)"
        )
    if args.work_dir and Path(args.work_dir).exists() and any(Path(args.work_dir).iterdir()):
        raise UserError(f"--work-dir {args.work_dir}: not empty; give a new directory")
    with work_directory(args.work_dir, "faults") as work:
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
                if (result.lost or result.diverged or result.differing_duplicates) and not (
                    args.work_dir
                ):
                    print(
                        f"{scenario}: checks failed; rerun with --work-dir DIR to keep the "
                        "worker and broker logs",
                        file=sys.stderr,
                    )
                runs.append(asdict(result))
        finally:
            if cluster is not None:
                cluster.kill()
    return {"scenarios": runs}


def add_parsers(benches: argparse._SubParsersAction) -> None:
    p = benches.add_parser(
        "faults",
        help="clicks through workers while brokers or workers die and restart",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "--scenarios",
        nargs="+",
        choices=sorted(SCENARIOS),
        default=["leader-kill", "rolling-restart", "worker-kill"],
        help="what to do to the brokers or workers (default: leader-kill rolling-restart "
        "worker-kill)",
    )
    p.add_argument("--rate", type=float, default=500.0, help="clicks per second (default 500)")
    p.add_argument("--model", default=None, help="model to serve (default: an untrained one)")
    p.add_argument(
        "--broker",
        default=None,
        help="a running cluster instead of a local one (its brokers are not touched: "
        "--scenarios worker-kill none)",
    )
    p.add_argument(
        "--work-dir",
        default=None,
        help="keep the worker and broker logs and the model registry in this directory",
    )
    p.set_defaults(measure=run)
