"""``streamrec bench soak``: bounded resources of one worker over many sessions.

Many synthetic sessions (default one million) go through one worker process, produced as
fast as the producer can send them, so that input outpaces the worker (backpressure).
While the worker catches up, the benchmark samples every ``--sample-s`` seconds:

- the worker's resident memory (``VmRSS`` of its process, from ``/proc``);
- the consumer lag (end offsets of the click topic minus the group's committed offsets);
- the worker's throughput over the last window (its ``/metrics`` counter of published
  recommendations);
- the live sessions in its table (the ``streamrec_active_sessions`` gauge);
- the changelog: records appended (high minus low watermarks; compaction drops superseded
  records from rolled segments, ``segment.ms`` 10 min, but does not move these offsets)
  and live keys (a reader of the changelog applies records and tombstones: what a
  recovering worker would load once the log is compacted).

Sessions come from :mod:`model.synth`, generated ``--chunk`` sessions at a time and merged
in event-time order, so the benchmark never holds all events in memory; event time
advances at ``--sessions-per-s`` session starts per second (synth's default 5/s: one
million sessions span 55 hours), so sessions idle for ``--session-timeout-s`` expire.

What it checks, as figures (not asserts): RSS after warm-up (a quarter of the events
answered; ``rss_growth_second_half_mib`` from half of them, once the table has reached
its steady size) does not grow; the table and the changelog's live keys stay near the
sessions alive within one timeout, far below the total; throughput in the last quarter
of the events is not below the first quarter's, and the worker's CPU time per event (which
depends much less than events/s on what else the machine runs) does not climb; and while
the lag climbs to nearly all events, memory stays flat. Under such a backlog the table
holds more than the sessions alive within one timeout: expiry markers reach the agent only
after the clicks fetched before them (README, Performance). ``min_window_events_per_s`` is
the slowest sampling window: an expiry pass that deletes many sessions at once (each
writes a changelog tombstone) pauses the worker.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import (
    Consumer,
    ConsumerGroupTopicPartitions,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from model.errors import UserError
from model.synth import SynthSpec, generate
from stream.bench.serving import untrained_model
from stream.devtools.brokers import kafka_or_local
from stream.devtools.ports import free_port
from stream.devtools.processes import StreamNames, WorkerProcess
from stream.devtools.procfs import cpu_seconds, rss_mib
from stream.kafka.config import client_config, producer_config
from stream.kafka.log_sender import REPLAY_PRODUCER_SETTINGS
from stream.kafka.topics import ensure_topics
from stream.kafka.wire import Click, encode_click
from stream.serving.settings import WorkerSettings
from stream.serving.topics import CHANGELOG_CONFIG, changelog_topic, expiry_topic

PARTITIONS = 4
# The output topic of a million-session run holds ~4 GB of recommendation lists that
# nothing reads: the broker may drop old segments (the benchmark counts outputs from the
# worker's /metrics, not from the topic).
OUTPUT_TOPIC_CONFIG = {"retention.bytes": str(64 * 2**20), "segment.bytes": str(16 * 2**20)}
WARMUP_FRACTION = 0.25
# librdkafka's informational chatter (a fresh idempotent producer retrying for its id, a
# background queue purged at close) goes to a logger nobody configures; errors still raise.
_QUIET = logging.getLogger("stream.bench.soak.librdkafka")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False


# --- input: synthetic sessions in event-time order, generated chunk by chunk ---------------


def session_batches(
    sessions: int, items: int, seed: int, sessions_per_s: float, chunk: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(session index, item index, event time) arrays, globally in event-time order.

    Each chunk of sessions is one :func:`model.synth.generate` call (its own seed, so its
    own popularity ranking) whose session starts continue where the previous chunk's
    ended. Events later than the last session start of the chunk may interleave with the
    next chunk's, so they are held back and merged with it; the rest is emitted. A
    session's clicks keep their order (the sort is stable and they were in order).
    """
    pending = (np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float64))
    start_time = SynthSpec(sessions=1, items=2).start_time
    for number, first in enumerate(range(0, sessions, chunk)):
        n = min(chunk, sessions - first)
        log = generate(
            SynthSpec(
                sessions=n,
                items=items,
                seed=seed * 100_003 + number,
                sessions_per_s=sessions_per_s,
                start_time=start_time,
            )
        )
        session_starts = log.times[np.r_[0, np.flatnonzero(np.diff(log.sessions)) + 1]]
        start_time = float(session_starts.max())  # every later chunk's events come after
        merged = [
            np.concatenate((old, new))
            for old, new in zip(pending, (log.sessions + first, log.items, log.times))
        ]
        order = np.argsort(merged[2], kind="stable")
        merged = [array[order] for array in merged]
        last = first + n >= sessions
        cut = len(order) if last else int(np.searchsorted(merged[2], start_time, side="right"))
        yield merged[0][:cut], merged[1][:cut], merged[2][:cut]
        pending = (merged[0][cut:], merged[1][cut:], merged[2][cut:])


def produce_all(
    bootstrap: str,
    topic: str,
    batches: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]],
    progress: Any = None,
    rate: float | None = None,
) -> tuple[int, float, float]:
    """Send every click (keyed by session, murmur2, idempotent) as fast as possible, or
    at ``rate`` events per second.

    Returns (events, first event time, last event time); UserError on a delivery error.
    """
    errors: list[str] = []

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is not None and len(errors) < 5:
            errors.append(err.str())

    producer = Producer(
        producer_config(
            bootstrap,
            **{
                **REPLAY_PRODUCER_SETTINGS,
                "linger.ms": 20,
                "delivery.report.only.error": True,
                "on_delivery": on_delivery,
                "logger": _QUIET,
            },
        )
    )
    sent = 0
    started = time.monotonic()
    first_time = last_time = math.nan
    for sessions, items, times in batches:
        if len(times) and sent == 0:
            first_time = float(times[0])
        for s, i, t in zip(sessions.tolist(), items.tolist(), times.tolist()):
            key, value = encode_click(Click(str(s + 1), str(i + 1), t))
            while True:
                try:
                    producer.produce(topic, value, key)
                    break
                except BufferError:  # local queue full: the broker takes what it can
                    producer.poll(0.05)
            sent += 1
            if rate is not None and sent % 16 == 0:
                while (ahead := started + sent / rate - time.monotonic()) > 0:
                    producer.poll(min(ahead, 0.1))
            if sent % 1024 == 0:
                producer.poll(0)
                if progress is not None:
                    progress(sent)
                if errors:
                    raise UserError(f"delivery failed: {errors[0]}")
        if len(times):
            last_time = float(times[-1])
        if progress is not None:
            progress(sent)
    if producer.flush(120) or errors:
        raise UserError(f"clicks not all delivered: {errors[0] if errors else 'timeout'}")
    return sent, first_time, last_time


# --- observation: worker memory, metrics, lag, changelog -----------------------------------


def scrape(port: int) -> dict[str, float]:
    """The worker's unlabelled metrics (``name value`` lines of /metrics)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode("utf-8", "replace")
    values = {}
    for line in text.splitlines():
        if line.startswith("streamrec_") and "{" not in line:
            name, _, value = line.partition(" ")
            values[name] = float(value)
    return values


class ChangelogKeys(threading.Thread):
    """Reads the changelog from the start and keeps the set of live keys (a record adds
    its key, a tombstone removes it): the table a recovering worker would rebuild."""

    def __init__(self, bootstrap: str, topic: str, partitions: int) -> None:
        super().__init__(daemon=True, name="changelog-keys")
        self.keys: set[bytes] = set()
        self.records = 0
        self._stop_event = threading.Event()
        self._consumer = Consumer(
            client_config(
                bootstrap,
                **{
                    "group.id": f"soak-changelog-{time.time_ns()}",
                    "enable.auto.commit": False,
                    "auto.offset.reset": "earliest",
                    "logger": _QUIET,
                },
            )
        )
        self._consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                for message in self._consumer.consume(2000, timeout=0.2):
                    if message.error():
                        continue
                    self.records += 1
                    key = message.key() or b""
                    if message.value() is None:
                        self.keys.discard(key)
                    else:
                        self.keys.add(key)
        finally:
            self._consumer.close()

    def close(self) -> None:
        self._stop_event.set()
        self.join(10)


class Sampler(threading.Thread):
    """Every ``interval`` seconds, one sample of the worker and its topics."""

    def __init__(
        self,
        bootstrap: str,
        names: StreamNames,
        changelog: str,
        pid: int,
        port: int,
        keys: ChangelogKeys,
        interval: float,
        clock_zero: float,
    ) -> None:
        super().__init__(daemon=True, name="soak-sampler")
        self.pid, self.port, self.keys, self.interval = pid, port, keys, interval
        self.group, self.clicks, self.changelog = names.app_id, names.clicks, changelog
        self.zero = clock_zero
        self.samples: list[dict[str, float]] = []
        self.produced = 0  # set by the producer's progress callback
        self.error: str | None = None
        self._lock = threading.Lock()
        self._stop_event = threading.Event()
        self._admin = AdminClient(client_config(bootstrap, logger=_QUIET))
        self._consumer = Consumer(
            client_config(
                bootstrap,
                **{
                    "group.id": f"soak-probe-{time.time_ns()}",
                    "enable.auto.commit": False,
                    "logger": _QUIET,
                },
            )
        )

    def _end_offsets(self, topic: str) -> list[tuple[int, int]]:
        return [
            self._consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False)
            for p in range(PARTITIONS)
        ]

    def lag(self) -> int:
        request = ConsumerGroupTopicPartitions(
            self.group, [TopicPartition(self.clicks, p) for p in range(PARTITIONS)]
        )
        result = self._admin.list_consumer_group_offsets([request])[self.group].result(10)
        committed = {tp.partition: tp.offset for tp in result.topic_partitions}
        total = 0
        for p, (low, high) in enumerate(self._end_offsets(self.clicks)):
            position = committed.get(p, -1)
            total += max(high - (position if position >= 0 else low), 0)
        return total

    def sample(self) -> dict[str, float]:
        with self._lock:
            t = time.monotonic() - self.zero
            metrics = scrape(self.port)
            record = {
                "t": t,
                "rss_mib": rss_mib(self.pid),
                "cpu_s": cpu_seconds(self.pid),
                "lag": self.lag(),
                "produced": self.produced,
                "answered": metrics.get("streamrec_recommendations_published_total", 0.0),
                "active_sessions": metrics.get("streamrec_active_sessions", 0.0),
                "expired": metrics.get("streamrec_expired_sessions_total", 0.0),
                "changelog_records": sum(
                    high - low for low, high in self._end_offsets(self.changelog)
                ),
                "changelog_live_keys": len(self.keys.keys),
            }
            previous = self.samples[-1] if self.samples else None
            record["window_events_per_s"] = (
                (record["answered"] - previous["answered"]) / max(t - previous["t"], 1e-9)
                if previous
                else 0.0
            )
            self.samples.append(record)
            return record

    def run(self) -> None:
        last_print = 0.0
        while not self._stop_event.wait(self.interval):
            try:
                record = self.sample()
            except (KafkaException, OSError) as exc:  # a slow answer: skip this sample
                print(f"sample skipped: {exc}", file=sys.stderr)
                continue
            except Exception as exc:  # noqa: BLE001 - reported by the main thread
                self.error = repr(exc)
                return
            if record["t"] - last_print >= 10:
                last_print = record["t"]
                print(
                    f"{record['t']:6.0f} s  produced {record['produced']:,}  answered "
                    f"{record['answered']:,.0f} ({record['window_events_per_s']:,.0f}/s)  "
                    f"lag {record['lag']:,}  rss {record['rss_mib']:.0f} MiB  "
                    f"active {record['active_sessions']:,.0f}  changelog live "
                    f"{record['changelog_live_keys']:,} of {record['changelog_records']:,}",
                    file=sys.stderr,
                )

    def close(self) -> None:
        self._stop_event.set()
        self.join(30)


# --- the run --------------------------------------------------------------------------------


def time_at(points: list[tuple[float, float]], count: float) -> float:
    """When the answered counter reached ``count``, interpolated between observations."""
    previous = (0.0, 0.0)
    for t, answered in points:
        if answered >= count:
            t0, a0 = previous
            return t if answered == a0 else t0 + (t - t0) * (count - a0) / (answered - a0)
        previous = (t, answered)
    return math.nan


def summarize(
    samples: list[dict[str, float]],
    points: list[tuple[float, float]],
    events: int,
    production_start: float,
    production_end: float,
    end_of_production: dict[str, float],
    max_samples: int,
) -> dict[str, Any]:
    """The JSON figures from the samples (see the module docstring)."""
    rss = [s["rss_mib"] for s in samples]
    finished = time_at(points, events)
    quarter = events * WARMUP_FRACTION
    t_first_quarter = time_at(points, quarter)
    t_last_quarter = time_at(points, events - quarter)
    warm = [s for s in samples if s["answered"] >= quarter] or samples[-1:]
    second_half = [s for s in samples if s["answered"] >= events / 2] or samples[-1:]
    ts = [s["t"] for s in samples]
    cpu = [s["cpu_s"] for s in samples]

    # Quarter q of the events: answered between bounds[q] and bounds[q + 1].
    bounds = [
        production_start,
        t_first_quarter,
        time_at(points, events / 2),
        t_last_quarter,
        finished,
    ]
    quarters = list(zip(bounds, bounds[1:]))
    cpu_ms_per_event = [
        float(np.interp(end, ts, cpu) - np.interp(start, ts, cpu)) / quarter * 1000
        for start, end in quarters
    ]
    throughput = [quarter / (end - start) for start, end in quarters]
    windows = [
        s["window_events_per_s"]
        for previous, s in zip(samples, samples[1:])
        if previous["answered"] > 0 and s["answered"] < events
    ]
    answered = np.array([s["answered"] for s in warm])
    slope = (
        float(np.polyfit(answered, [s["rss_mib"] for s in warm], 1)[0]) * 1e6
        if len(warm) >= 3 and np.ptp(answered) > 0
        else math.nan
    )
    keep = sorted(
        set(
            np.linspace(0, len(samples) - 1, min(max_samples, len(samples)))
            .round()
            .astype(int)
            .tolist()
        )
    )
    short = [
        {
            "t": round(samples[i]["t"], 1),
            "rss_mib": round(samples[i]["rss_mib"], 1),
            "lag": int(samples[i]["lag"]),
            "active_sessions": int(samples[i]["active_sessions"]),
            "window_events_per_s": round(samples[i]["window_events_per_s"], 1),
            "answered": int(samples[i]["answered"]),
            "worker_cpu_s": round(samples[i]["cpu_s"], 1),
            "changelog_live_keys": int(samples[i]["changelog_live_keys"]),
            "changelog_records": int(samples[i]["changelog_records"]),
        }
        for i in keep
    ]
    seconds = finished - production_start
    return _rounded(
        {
            "events": events,
            "seconds": seconds,
            "events_per_s": events / seconds,
            "production_seconds": production_end - production_start,
            "production_events_per_s": events / max(production_end - production_start, 1e-9),
            "rss_mib": {"first": rss[0], "max": max(rss), "last": rss[-1]},
            "rss_mib_at_warmup": warm[0]["rss_mib"],
            "rss_growth_after_warmup_mib": rss[-1] - warm[0]["rss_mib"],
            "rss_slope_after_warmup_mib_per_million_events": slope,
            "rss_growth_second_half_mib": rss[-1] - second_half[0]["rss_mib"],
            "max_lag": max(s["lag"] for s in samples),
            "lag_at_end_of_production": end_of_production["lag"],
            "rss_mib_at_end_of_production": end_of_production["rss_mib"],
            "throughput_first_quarter_per_s": throughput[0],
            "throughput_last_quarter_per_s": throughput[-1],
            "throughput_by_quarter_per_s": [round(x, 1) for x in throughput],
            "worker_cpu_ms_per_event_first_quarter": cpu_ms_per_event[0],
            "worker_cpu_ms_per_event_last_quarter": cpu_ms_per_event[-1],
            "worker_cpu_ms_per_event_by_quarter": [round(x, 3) for x in cpu_ms_per_event],
            "min_window_events_per_s": min(windows, default=math.nan),
            "max_active_sessions": max(s["active_sessions"] for s in samples),
            "active_sessions_at_end": samples[-1]["active_sessions"],
            "expired_sessions": samples[-1]["expired"],
            "max_changelog_live_keys": max(s["changelog_live_keys"] for s in samples),
            "changelog_live_keys_at_end": samples[-1]["changelog_live_keys"],
            "changelog_records_at_end": samples[-1]["changelog_records"],
            "n_samples": len(samples),
            "samples": short,
        }
    )


def _rounded(figures: dict[str, Any]) -> dict[str, Any]:
    """Floats to 2 decimals (nested dicts too): the figures are noisier than that."""
    return {
        k: round(v, 2) if isinstance(v, float) else _rounded(v) if isinstance(v, dict) else v
        for k, v in figures.items()
    }


def soak(bootstrap: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    model_dir = work / "model"
    untrained_model(args.items, model_dir)
    names = StreamNames("soak")
    settings = WorkerSettings(model=str(model_dir), app_id=names.app_id)
    changelog = changelog_topic(settings)
    topics = [names.clicks, names.recommendations, names.dlq, changelog, expiry_topic(settings)]
    ensure_topics(
        bootstrap,
        {t: PARTITIONS for t in topics},
        configs={changelog: CHANGELOG_CONFIG, names.recommendations: OUTPUT_TOPIC_CONFIG},
    )
    port = free_port()
    worker = WorkerProcess(
        bootstrap,
        model_dir,
        names,
        work,
        "--web-port",
        str(port),
        "--log-level",
        "warning",
        "--torch-threads",
        "1",
        "--group-session-timeout-s",
        "30",
        "--session-timeout-s",
        str(args.session_timeout_s),
        "--expiry-interval-s",
        str(args.expiry_interval_s),
        partitions=PARTITIONS,
    )
    keys = ChangelogKeys(bootstrap, changelog, PARTITIONS)
    sampler: Sampler | None = None
    try:
        worker.start()
        keys.start()
        _wait_until_consuming(worker, bootstrap, names.app_id, timeout=120)
        assert worker.process is not None
        zero = time.monotonic()
        sampler = Sampler(
            bootstrap, names, changelog, worker.process.pid, port, keys, args.sample_s, zero
        )
        sampler.sample()  # the baseline: the worker started, nothing sent yet
        sampler.start()
        print(
            f"worker pid {worker.process.pid} consuming; producing {args.sessions:,} sessions",
            file=sys.stderr,
        )

        def progress(sent: int) -> None:
            sampler.produced = sent

        production_start = time.monotonic() - zero
        batches = session_batches(
            args.sessions, args.items, args.seed, args.sessions_per_s, args.chunk
        )
        events, first_time, last_time = produce_all(
            bootstrap, names.clicks, batches, progress, args.rate
        )
        production_end = time.monotonic() - zero
        end_of_production = sampler.sample()
        print(
            f"produced {events:,} events in {production_end - production_start:.1f} s; "
            f"lag {end_of_production['lag']:,}",
            file=sys.stderr,
        )
        points: list[tuple[float, float]] = []
        last_progress = time.monotonic()
        while True:
            if worker.process.poll() is not None:
                raise UserError(
                    f"worker exited with {worker.process.returncode}:\n" + worker.log()[-2000:]
                )
            if sampler.error:
                raise UserError(f"sampling failed: {sampler.error}")
            answered = scrape(port).get("streamrec_recommendations_published_total", 0.0)
            now = time.monotonic()
            if not points or answered > points[-1][1]:
                last_progress = now
            points.append((now - zero, answered))
            if answered >= events:
                break
            if now - last_progress > args.stall_s:
                raise UserError(
                    f"the worker answered nothing for {args.stall_s:g} s "
                    f"({answered:,.0f} of {events:,}):\n" + worker.log()[-2000:]
                )
            time.sleep(0.25)
        sampler.close()
        sampler.sample()  # the final state
        samples = sampler.samples
    finally:
        if sampler is not None:
            sampler.close()
        keys.close()
        worker.stop()
        if args.broker and not args.keep_topics:
            _delete_topics(bootstrap, names)
    all_points = sorted([(s["t"], s["answered"]) for s in samples] + points)
    result = summarize(
        samples,
        all_points,
        events,
        production_start,
        production_end,
        end_of_production,
        args.max_samples,
    )
    return {
        "sessions": args.sessions,
        "items": args.items,
        "session_timeout_s": args.session_timeout_s,
        "expiry_interval_s": args.expiry_interval_s,
        "sessions_per_s_event_time": args.sessions_per_s,
        "rate_limit_events_per_s": args.rate,
        "event_time_span_s": last_time - first_time,
        "partitions": PARTITIONS,
        **result,
    }


def _wait_until_consuming(
    worker: WorkerProcess, bootstrap: str, group: str, timeout: float
) -> None:
    """:meth:`WorkerProcess.wait_until_consuming`, retried while its group description
    times out: on a fresh broker the group coordinator is still loading its offsets topic
    and librdkafka's describe request outlasts the 5 s the method waits for it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            worker.wait_until_consuming(bootstrap, group, max(deadline - time.monotonic(), 1))
            return
        except TimeoutError:
            if time.monotonic() > deadline:
                raise UserError(
                    f"worker group {group} did not start consuming within {timeout:g} s"
                ) from None


def _delete_topics(bootstrap: str, names: StreamNames) -> None:
    """Drop this run's topics from a broker the benchmark did not start (best effort)."""
    admin = AdminClient(client_config(bootstrap, logger=_QUIET))
    try:
        existing = admin.list_topics(timeout=10).topics
        doomed = [
            t
            for t in existing
            if t in (names.clicks, names.recommendations, names.dlq) or t.startswith(names.app_id)
        ]
        for future in admin.delete_topics(doomed, operation_timeout=30).values():
            future.result(30)
    except Exception as exc:  # noqa: BLE001 - cleanup must not hide the result
        print(f"could not delete the run's topics: {exc}", file=sys.stderr)


def run(args: argparse.Namespace) -> dict[str, Any]:
    for name in ("sessions", "items", "chunk", "max_samples"):
        if getattr(args, name) < (2 if name == "items" else 1):
            raise UserError(f"--{name.replace('_', '-')} is too small: {getattr(args, name)}")
    for name in (
        "session_timeout_s",
        "expiry_interval_s",
        "sample_s",
        "sessions_per_s",
        "stall_s",
        "rate",
    ):
        if getattr(args, name) is not None and not 0 < getattr(args, name) < math.inf:
            raise UserError(f"--{name.replace('_', '-')} must be a positive number")
    with (
        kafka_or_local(args.broker) as bootstrap,
        tempfile.TemporaryDirectory(prefix="streamrec-soak-") as tmp,
    ):
        result = soak(bootstrap, args, Path(tmp))
    return result


def add_parsers(benches: argparse._SubParsersAction) -> None:
    p = benches.add_parser(
        "soak",
        help="bounded memory, table and changelog over many sessions; backpressure",
        description=__doc__.split("\n\n")[0] + " Input is produced as "
        "fast as possible; the last stdout line is JSON.",
    )
    p.add_argument(
        "--sessions",
        type=int,
        default=1_000_000,
        help="synthetic sessions to send (default 1,000,000: ≈ 4 M clicks)",
    )
    p.add_argument("--items", type=int, default=3000, help="catalogue size (default 3000)")
    p.add_argument(
        "--session-timeout-s",
        type=float,
        default=1800.0,
        help="the worker's inactivity timeout, event-time seconds (default 1800)",
    )
    p.add_argument(
        "--expiry-interval-s",
        type=float,
        default=5.0,
        help="the worker's expiry pass interval, wall seconds (default 5)",
    )
    p.add_argument(
        "--sessions-per-s",
        type=float,
        default=5.0,
        help="session starts per second of event time (default 5)",
    )
    p.add_argument(
        "--rate",
        type=float,
        default=None,
        help="send at most this many events/s (default: as fast as possible, "
        "which outpaces the worker: backpressure)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--broker",
        default=None,
        help="use this Kafka (kafka://HOST:PORT; the run's topics are deleted at "
        "the end) instead of starting a local one",
    )
    p.add_argument(
        "--keep-topics", action="store_true", help="with --broker: keep the run's topics"
    )
    p.add_argument("--sample-s", type=float, default=2.0, help="sampling interval (default 2)")
    p.add_argument(
        "--max-samples",
        type=int,
        default=30,
        help="samples listed in the JSON, evenly spaced (default 30)",
    )
    p.add_argument(
        "--chunk", type=int, default=20_000, help="sessions generated at a time (default 20,000)"
    )
    p.add_argument(
        "--stall-s",
        type=float,
        default=180.0,
        help="give up when nothing is answered for this long (default 180)",
    )
    p.set_defaults(measure=run)
