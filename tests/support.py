"""Helpers for the streaming integration tests: a worker subprocess and topic readers.

Every test gets its own app id and topic names, so the tests run unchanged against a
shared Kafka cluster (``STREAMREC_TEST_BROKER``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from model.data import ClickLog
from stream.events import Click, encode_click
from stream.kafka_config import producer_config

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "rsc15-100k"


class StreamNames:
    """Unique app id and topic names for one test."""

    def __init__(self, prefix: str = "t") -> None:
        tag = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.app_id = f"app-{tag}"
        self.clicks = f"clicks-{tag}"
        self.recommendations = f"recs-{tag}"
        self.dlq = f"dlq-{tag}"

    def worker_args(self) -> list[str]:
        return ["--app-id", self.app_id, "--input-topic", self.clicks,
                "--output-topic", self.recommendations, "--dlq-topic", self.dlq]


class WorkerProcess:
    """``streamrec worker`` in a subprocess, with its log in a file."""

    def __init__(self, bootstrap: str, model: Path, names: StreamNames, work_dir: Path,
                 *extra: str, partitions: int = 4) -> None:
        self.log_path = work_dir / f"worker-{uuid.uuid4().hex[:6]}.log"
        self.command = [sys.executable, "-m", "stream.cli", "worker",
                        "--broker", f"kafka://{bootstrap}", "--model", str(model),
                        "--partitions", str(partitions), "--web-port", "0",
                        "--data-dir", str(work_dir / "faust"), "--group-session-timeout-s", "6",
                        "--log-level", "info", *names.worker_args(), *extra]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                        cwd=REPO, start_new_session=True)
        log.close()
        return self

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, then wait; SIGKILL if it does not exit in time. Returns the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.wait()

    def kill(self) -> None:
        assert self.process is not None
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def produce_clicks(bootstrap: str, topic: str, clicks: list[Click]) -> None:
    """Send clicks keyed by session (murmur2), in order, and wait for delivery."""
    from confluent_kafka import Producer

    producer = Producer(producer_config(bootstrap))
    for click in clicks:
        key, value = encode_click(click)
        producer.produce(topic, key=key, value=value)
        producer.poll(0)
    assert producer.flush(30) == 0


def clicks_in_time_order(log: ClickLog) -> list[Click]:
    order = sorted(range(len(log)), key=lambda k: log.times[k])
    return [Click(str(log.session_ids[log.sessions[k]]), str(log.item_ids[log.items[k]]),
                  float(log.times[k])) for k in order]


def read_topic(bootstrap: str, topic: str, until: Callable[[list[Any]], bool],
               timeout: float = 60.0, decode: bool = True) -> list[Any]:
    """Read a topic from the beginning until ``until(messages)`` holds or time runs out."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4()}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    metadata = consumer.list_topics(topic, timeout=10)
    partitions = metadata.topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    messages: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and not until(messages):
            for message in consumer.consume(500, timeout=0.5):
                if message.error():
                    continue
                messages.append(json.loads(message.value()) if decode else message)
    finally:
        consumer.close()
    return messages
