"""Faults against the real Kafka broker: outages, refused changelog records, redelivery.

The promise under test (README "Guarantees"): output at least once, state exactly once.
Workers SIGKILLed in rebalances are tested on the three-broker cluster
(``tests/test_cluster.py``).
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource

from model.artifact import load_model
from stream.devtools.brokers import LocalKafka
from stream.devtools.processes import StreamNames, WorkerProcess, start_readers
from stream.devtools.testing import (
    answered_sources,
    committed_offsets,
    end_offsets,
    final_states,
    free_port,
    http_get,
    produce_clicks,
    read_all,
    read_topic,
    same_up_to_ties,
    uninterrupted,
    wait_for_http,
)
from stream.kafka.config import client_config
from stream.kafka.wire import Click
from stream.serving.state import SessionState

pytestmark = pytest.mark.kafka


def readyz(port: int, status: int, worker: WorkerProcess) -> str:
    """The body of the worker's first ``/readyz`` answer with ``status``."""
    url = f"http://127.0.0.1:{port}/readyz"
    return wait_for_http(url, lambda seen, _: seen == status, worker)[1]


def test_broker_outage_at_start_and_midstream_the_worker_waits_and_resumes_in_order(
    small_model: Path, tmp_path: Path
) -> None:
    """The broker is down when the worker starts, then stops (cleanly, log kept on disk)
    in the middle of the stream: the worker stays alive, reports not ready, and resumes;
    every click is answered and each session's clicks were applied in order."""
    recommender = load_model(small_model, device="cpu")
    ids = recommender.item_map.ids
    sessions = {f"s{k}": [ids[(13 * k + 5 * j) % len(ids)] for j in range(6)] for k in range(20)}
    clicks = [Click(s, items[j], 1000.0 + j) for j in range(6) for s, items in sessions.items()]
    broker = LocalKafka(port=free_port(), data_dir=tmp_path / "kafka")
    bootstrap = f"127.0.0.1:{broker._requested_port}"
    names = StreamNames("outage")
    web_port = free_port()
    worker = WorkerProcess(bootstrap, small_model, names, tmp_path, "--web-port", str(web_port))
    worker.start()
    try:
        reason = readyz(web_port, 503, worker)
        assert "broker" in reason, reason
        time.sleep(3)  # a few failed attempts: the worker must retry, not exit
        broker.start()
        readyz(web_port, 200, worker)
        produce_clicks(bootstrap, names.clicks, clicks[:40])
        assert len(read_topic(bootstrap, names.recommendations, lambda ms: len(ms) >= 40)) >= 40

        produce_clicks(bootstrap, names.clicks, clicks[40:80])
        broker.stop()  # while those clicks are being answered
        reason = readyz(web_port, 503, worker)
        assert "broker" in reason, reason
        time.sleep(10)  # longer than the group session timeout: the group must re-form
        assert http_get(f"http://127.0.0.1:{web_port}/healthz")[0] == 200
        broker.start()
        readyz(web_port, 200, worker)
        produce_clicks(bootstrap, names.clicks, clicks[80:])
        messages = read_topic(
            bootstrap,
            names.recommendations,
            lambda ms: (
                len({(m["source"]["partition"], m["source"]["offset"]) for m in ms}) >= len(clicks)
            ),
            timeout=90,
        )
    finally:
        worker.stop()
        broker.stop()
    answered: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
    for m in messages:
        answered[m["session_id"]][m["source"]["offset"]] = m
    assert sum(len(a) for a in answered.values()) == len(clicks), worker.log()[-3000:]
    for session, items in sessions.items():
        in_order = [answered[session][o] for o in sorted(answered[session])]
        assert [m["item_id"] for m in in_order] == items
        _, top = uninterrupted(recommender, items, 20)
        assert same_up_to_ties(
            [(r["item_id"], r["score"]) for r in in_order[-1]["recommendations"]], top
        )


def test_clicks_whose_changelog_records_failed_are_never_committed(
    kafka_bootstrap: str, small_model: Path, tmp_path: Path
) -> None:
    """The broker refuses the changelog records of a batch (here: the changelog topic's
    max.message.bytes lowered below a state's size) while the answers go through. The
    worker must not commit those clicks' offsets: committed, they would never be
    redelivered, and their sessions would go on from states without them. It stops
    instead, and its replacement (the limit restored) applies them."""
    recommender = load_model(small_model, device="cpu")
    ids = recommender.item_map.ids
    first = [Click(f"s{k}", ids[k], 1000.0 + k) for k in range(8)]
    second = [Click(f"s{k}", ids[k + 10], 2000.0 + k) for k in range(8)]
    names = StreamNames("refused")
    changelog = f"{names.app_id}-sessions-changelog"
    admin = AdminClient(client_config(kafka_bootstrap))

    def changelog_limit(value: str) -> None:
        entry = ConfigEntry("max.message.bytes", value, incremental_operation=AlterConfigOpType.SET)
        resource = ConfigResource("topic", changelog, incremental_configs=[entry])
        admin.incremental_alter_configs([resource])[resource].result(10)

    worker = WorkerProcess(kafka_bootstrap, small_model, names, tmp_path).start()
    try:
        produce_clicks(kafka_bootstrap, names.clicks, first)
        read_topic(kafka_bootstrap, names.recommendations, lambda ms: len(ms) >= len(first))
        deadline = time.monotonic() + 30  # the first clicks committed (every second)
        while committed_offsets(kafka_bootstrap, names.app_id, names.clicks) != end_offsets(
            kafka_bootstrap, names.clicks
        ):
            assert time.monotonic() < deadline, worker.log()[-3000:]
            time.sleep(0.5)
        committed_before = committed_offsets(kafka_bootstrap, names.app_id, names.clicks)
        changelog_limit("100")  # a state is ~430 bytes
        produce_clicks(kafka_bootstrap, names.clicks, second)
        deadline = time.monotonic() + 30
        while worker.process is not None and worker.process.poll() is None:
            assert time.monotonic() < deadline, "the worker went on: " + worker.log()[-3000:]
            time.sleep(0.2)
        assert worker.process.returncode != 0
        assert "changelog record was refused" in worker.log(), worker.log()[-3000:]
        assert committed_offsets(kafka_bootstrap, names.app_id, names.clicks) == committed_before
        # the refusal was the changelog's: answers to the second clicks were published
        answers = read_topic(
            kafka_bootstrap, names.recommendations, lambda ms: len(ms) > len(first), timeout=30
        )
        assert len(answers) > len(first)
    finally:
        worker.stop()
    changelog_limit("1048588")
    with WorkerProcess(kafka_bootstrap, small_model, names, tmp_path):
        deadline = time.monotonic() + 60
        while True:  # the refused clicks, redelivered, reach every session's state
            states = final_states(kafka_bootstrap, changelog)
            if all(
                (state := states.get(f"s{k}")) and len(state.recent_items) == 2 for k in range(8)
            ):
                break
            assert time.monotonic() < deadline, states
            time.sleep(0.5)


def test_redelivered_clicks_already_applied_are_counted_as_duplicates_not_answered_again(
    kafka_bootstrap: str, small_model: Path, tmp_path: Path
) -> None:
    """A worker SIGKILLed right after answering leaves clicks answered but uncommitted; the
    next worker gets them again. Those whose states reached the changelog are counted in
    ``streamrec_duplicate_events_total`` and not answered twice; the others are applied
    and answered. The expected count comes from the broker: the group's committed offset
    and each session's last applied offset in the changelog."""
    ids = load_model(small_model, device="cpu").item_map.ids
    names = StreamNames("dups")
    inputs, outputs = start_readers(kafka_bootstrap, names, partitions=1)
    changelog = f"{names.app_id}-sessions-changelog"
    sessions = [f"s{k}" for k in range(10)]
    sent = 0
    try:
        # What the rest depends on: a kill that leaves applied clicks uncommitted (offsets
        # are committed every second, so nearly every kill right after answers does).
        for attempt in range(3):
            clicks = [
                Click(s, ids[(attempt * 7 + j + k) % len(ids)], 1000.0 + 10 * attempt + j)
                for j in range(3)
                for k, s in enumerate(sessions)
            ]
            with WorkerProcess(kafka_bootstrap, small_model, names, tmp_path, partitions=1) as w:
                produce_clicks(kafka_bootstrap, names.clicks, clicks)
                sent += len(clicks)
                assert outputs.wait_for(sent, timeout=90), w.log()[-3000:]
                w.kill()
            committed = committed_offsets(kafka_bootstrap, names.app_id, names.clicks).get(0, 0)
            applied = {
                m.key().decode(): SessionState.decode(m.value()).last_offset
                for m in read_all(kafka_bootstrap, changelog)
            }
            redelivered = [m for m in inputs.messages if m.offset() >= committed]
            duplicates = sum(m.offset() <= applied[m.key().decode()] for m in redelivered)
            if duplicates:
                break
        else:
            raise AssertionError("no kill left an applied click uncommitted")

        port = free_port()
        args = ("--web-port", str(port), "--log-level", "info")
        with WorkerProcess(
            kafka_bootstrap, small_model, names, tmp_path, *args, partitions=1
        ) as worker:
            consumed = f"\nstreamrec_events_consumed_total {len(redelivered)}.0\n"
            metrics = wait_for_http(
                f"http://127.0.0.1:{port}/metrics", lambda _, body: consumed in body, worker
            )[1]
    finally:
        inputs.close()
        outputs.close()
    # and the log names them, for tracing a click that was never answered
    logged = set()
    for ranges in re.findall(
        r"clicks already applied, not answered again: p0 ([\d. ]+)", worker.log()
    ):
        for run in ranges.split():
            first, _, last = run.partition("..")
            logged.update(range(int(first), int(last or first) + 1))
    assert logged == {m.offset() for m in redelivered if m.offset() <= applied[m.key().decode()]}
    assert f"\nstreamrec_duplicate_events_total {duplicates}.0\n" in metrics, metrics
    assert f"\nstreamrec_recommendations_published_total {len(redelivered) - duplicates}.0\n" in (
        metrics
    ), metrics
    assert answered_sources(outputs.messages) == {(0, m.offset()) for m in inputs.messages}
