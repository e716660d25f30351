"""Run the pipeline locally: worker and trainer processes, and readers of their topics.

Used by ``streamrec demo``, the stream benchmarks and the integration tests, so that all
three start and observe the worker and the trainer the same way a user would: as separate
``streamrec`` processes talking to a broker.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Self

from confluent_kafka import Consumer, ConsumerGroupState, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from model.errors import UserError
from stream.kafka.config import client_config, worker_client_id

REPO = Path(__file__).resolve().parents[2]


class StreamNames:
    """Unique app id and topic names, so runs never share groups, topics or state."""

    def __init__(self, prefix: str = "run") -> None:
        tag = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.app_id = f"app-{tag}"
        self.clicks = f"clicks-{tag}"
        self.recommendations = f"recs-{tag}"
        self.dlq = f"dlq-{tag}"
        self.availability = f"avail-{tag}"

    def worker_args(self) -> list[str]:
        return [
            "--availability-topic",
            self.availability,
            "--app-id",
            self.app_id,
            "--input-topic",
            self.clicks,
            "--output-topic",
            self.recommendations,
            "--dlq-topic",
            self.dlq,
        ]


@contextmanager
def work_directory(path: str | None, bench: str) -> Iterator[Path]:
    """A benchmark's working directory: ``path`` (created, and kept afterwards with the
    processes' logs, to look into a failure) or a temporary one."""
    if path:
        Path(path).mkdir(parents=True, exist_ok=True)
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix=f"streamrec-bench-{bench}-") as tmp:
        yield Path(tmp)


class CommandProcess:
    """``streamrec ARGS`` as a subprocess in its own process group, logging to a file."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.command = [sys.executable, "-m", "stream.cli", *args]
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen[Any] | None = None

    def start(self) -> Self:
        with open(self.log_path, "ab") as log:
            self.process = self._popen(log)
        return self

    def _popen(self, log: IO[bytes]) -> subprocess.Popen[Any]:
        return subprocess.Popen(
            self.command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
            env=self.env,
            start_new_session=True,
        )

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait; SIGKILL if it has not exited in time. Returns the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.wait()

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        assert self.process is not None
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def check_alive(self) -> None:
        """Raise with the end of the log if the process has exited."""
        assert self.process is not None
        if self.process.poll() is not None:
            raise UserError(
                f"{self.command[3]} exited with {self.process.returncode}:\n" + self.log()[-2000:]
            )

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class WorkerProcess(CommandProcess):
    """``streamrec worker`` (or another worker-like subcommand) for ``names``."""

    def __init__(
        self,
        bootstrap: str,
        model: str | os.PathLike[str],
        names: StreamNames,
        work_dir: Path,
        *extra: str,
        partitions: int = 4,
        subcommand: tuple[str, ...] = ("worker",),
        web_port: int = 0,
    ) -> None:
        self.web_port = web_port  # 0: any free port, unknown to the caller
        super().__init__(
            [
                *subcommand,
                "--broker",
                f"kafka://{bootstrap}",
                "--model",
                str(model),
                "--partitions",
                str(partitions),
                "--web-port",
                str(web_port),
                "--data-dir",
                str(work_dir / "faust"),
                "--group-session-timeout-s",
                "6",
                "--log-level",
                "info",
                *names.worker_args(),
                *extra,
            ],
            work_dir / f"worker-{uuid.uuid4().hex[:6]}.log",
        )

    def wait_until_consuming(self, bootstrap: str, group: str, timeout: float = 60.0) -> None:
        """Block until the worker's consumer group is stable with partitions assigned to
        this worker, so that what is measured next is processing, not start-up."""
        admin = AdminClient(client_config(bootstrap))
        assert self.process is not None, "start() the worker first"
        member = worker_client_id(self.process.pid)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                description = admin.describe_consumer_groups([group])[group].result(5)
                # Tansu reports a stable group without its members' assignments.
                if description.state == ConsumerGroupState.STABLE and (
                    not description.members
                    or any(
                        m.client_id == member and m.assignment.topic_partitions
                        for m in description.members
                    )
                ):
                    return
            except (KafkaException, TimeoutError):  # no coordinator yet, or a slow answer
                pass
            time.sleep(0.2)
        raise UserError(f"worker group {group} did not start consuming within {timeout:g} s")


class TrainerProcess(CommandProcess):
    """``streamrec trainer``; its JSON decision lines are collected with the wall time they
    were read (and each passed to ``on_record``)."""

    def __init__(
        self,
        bootstrap: str,
        registry: Path,
        topic: str,
        work: Path,
        *extra: str,
        env: dict[str, str] | None = None,
        on_record: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        tag = uuid.uuid4().hex[:8]
        super().__init__(
            [
                "trainer",
                "--broker",
                f"kafka://{bootstrap}",
                "--registry",
                str(registry),
                "--input-topic",
                topic,
                "--group",
                f"trainer-{tag}",
                "--updates-topic",
                f"model-updates-{tag}",
                *extra,
            ],
            work / f"trainer-{tag}.log",
            env,
        )
        self.records: list[tuple[float, dict[str, Any]]] = []
        self._on_record = on_record
        self._reader: threading.Thread | None = None

    def _popen(self, log: IO[bytes]) -> subprocess.Popen[Any]:
        process = subprocess.Popen(
            self.command,
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
            text=True,
            env=self.env,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._reader.start()
        return process

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            self.records.append((time.time(), record))
            if self._on_record is not None:
                self._on_record(record)

    def decisions(self) -> list[dict[str, Any]]:
        return [r for _, r in self.records]

    def stop(self, timeout: float = 60.0) -> int:
        code = super().stop(timeout)
        if self._reader is not None:
            self._reader.join(5)
        return code


@dataclass(frozen=True)
class Received:
    """A decoded message, the wall time it was consumed and its Kafka timestamp."""

    value: dict[str, Any]
    consumed_at: float
    kafka_time: float


@contextmanager
def collector_paused() -> Iterator[None]:
    """No cyclic garbage collection in this process for the duration: a measurement.

    A :class:`TopicReader` stamps ``consumed_at`` when its thread runs, and a full
    collection over the messages a benchmark holds stops every thread of the process:
    measured at 40k items, three pauses of 180-300 ms in one ``bench stream`` run, each
    counted as latency of every click in flight, the worker's or the no-op agent's alike.
    Reference counting still frees everything that is not part of a cycle."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class TopicReader(threading.Thread):
    """Reads a topic from the beginning in the background, recording consume times: the
    one topic reader of the benchmarks and the tests (``decode=False`` keeps the raw
    confluent-kafka messages, headers and all)."""

    def __init__(self, bootstrap: str, topic: str, *, decode: bool = True) -> None:
        super().__init__(daemon=True)
        self.topic = topic
        self.decode = decode
        self.messages: list[Any] = []
        self._stop_event = threading.Event()
        self._consumer = Consumer(
            client_config(
                bootstrap,
                **{
                    "group.id": f"reader-{uuid.uuid4()}",
                    "auto.offset.reset": "earliest",
                    "enable.auto.commit": False,
                    "fetch.wait.max.ms": 10,
                },
            )
        )
        partitions = self._consumer.list_topics(topic, timeout=15).topics[topic].partitions
        self._consumer.assign([TopicPartition(topic, p, 0) for p in partitions])

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                # poll() returns as soon as a message is there; consume(n, timeout) would
                # wait for n messages or the timeout, adding its wait to every latency.
                first = self._consumer.poll(0.1)
                if first is None:
                    continue
                for message in [first, *self._consumer.consume(1000, timeout=0)]:
                    if message.error():
                        continue
                    now = time.time()
                    if self.decode:
                        self.messages.append(
                            Received(
                                json.loads(message.value() or b"null"),
                                now,
                                message.timestamp()[1] / 1000.0,
                            )
                        )
                    else:
                        self.messages.append(message)
        finally:
            self._consumer.close()

    def wait_for(self, count: int, timeout: float) -> bool:
        """Wait until ``count`` messages were read; False on timeout."""
        return self.wait_until(lambda messages: len(messages) >= count, timeout)

    def wait_until(self, done: Callable[[list[Any]], bool], timeout: float) -> bool:
        """Wait until ``done(messages read so far)``; False on timeout."""
        deadline = time.monotonic() + timeout
        while not done(self.messages):
            if time.monotonic() > deadline or not self.is_alive():
                return False
            time.sleep(0.05)
        return True

    def close(self) -> None:
        self._stop_event.set()
        self.join(10)


def start_readers(
    bootstrap: str, names: StreamNames, partitions: int
) -> tuple[TopicReader, TopicReader]:
    """Create the run's topics and start reading clicks (raw) and recommendations."""
    from stream.kafka.topics import ensure_topics

    ensure_topics(
        bootstrap, {t: partitions for t in (names.clicks, names.recommendations, names.dlq)}
    )
    inputs = TopicReader(bootstrap, names.clicks, decode=False)
    outputs = TopicReader(bootstrap, names.recommendations)
    inputs.start()
    outputs.start()
    return inputs, outputs


@dataclass(frozen=True)
class HistogramSummary:
    """A Prometheus histogram as a process served it: how many observations, their mean,
    and the upper bound of the bucket holding each quantile (its value is at most that)."""

    count: float
    mean: float
    bounds: tuple[tuple[float, float], ...]  # (le, cumulative count), ascending

    def at_most(self, quantile: float) -> float:
        return next(le for le, below in self.bounds if below >= quantile * self.count)


def scrape_histogram(web_port: int, name: str) -> HistogramSummary | None:
    """``name`` from the /metrics of the process serving on ``web_port`` (None: not
    served, or nothing observed)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    samples = [
        sample
        for family in text_string_to_metric_families(text)
        if family.name == name
        for sample in family.samples
    ]
    count = sum(s.value for s in samples if s.name == f"{name}_count")
    if not count:
        return None
    total = sum(s.value for s in samples if s.name == f"{name}_sum")
    bounds = sorted((float(s.labels["le"]), s.value) for s in samples if s.name == f"{name}_bucket")
    return HistogramSummary(count, total / count, tuple(bounds))
