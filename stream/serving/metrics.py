"""A worker's metrics, liveness and readiness (served by :mod:`stream.observability`).

Counting stays where it happens: :class:`WorkerCounters` (updated by the processor, its
dead letters and expiry, and the hot swap) is read at scrape time by a collector, so
nothing is counted twice. What needs observations (latency and batch histograms,
prequential quality) lives in :class:`WorkerMetrics`, one per worker with its own registry
(several workers in one process, as in tests, never collide). :class:`Health` holds what
``/healthz`` and ``/readyz`` report; values that need Faust (assignment, consumer lag,
table size) are refreshed on the event loop (:func:`refresh`), and the scrape thread only
reads plain numbers.

Metrics read the worker through :class:`ServedWorker`, a narrow view, so this module
never depends on the processor that updates them.

Live quality is :class:`stream.quality.PrequentialQuality`, labelled with the version that
published the judged list, so ``rate(streamrec_online_hits_total{k="20"}[5m]) /
rate(streamrec_online_predictions_total[5m])`` is Recall@20 per model version.
"""

from __future__ import annotations

import datetime as dt
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass, field
from typing import Any, Protocol

import faust
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector

from model.inference import Recommender
from stream.kafka.probe import BrokerProbe
from stream.observability import STALL_S, help_text, wsgi_app
from stream.quality import ONLINE_KS, PrequentialQuality
from stream.serving.availability import AvailabilityFollower

REFRESH_S = 1.0  # heartbeat / lag / table-size refresh on the event loop
#: Not ready from the moment partitions are revoked (set by the rebalance signal, so that
#: a rebalance shorter than a refresh still shows) until a refresh finds it over.
REBALANCING = "rebalancing or recovering the session table"

LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
SCORING_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
# Availability changes must reach the served model within a second (docs/operations.md).
AVAILABILITY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 30.0)


@dataclass
class WorkerCounters:
    """Plain counts, exported as metrics and printed by the demo."""

    events: int = 0
    published: int = 0
    duplicates: int = 0
    #: click-topic offsets Faust never handed the agent (:mod:`stream.serving.sequence`)
    skipped_offsets: int = 0
    #: of those, clicks read from the broker and applied: Faust would have lost them
    refetched_clicks: int = 0
    unknown_items: int = 0
    expired: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    swaps: int = 0  # models swapped in by the registry watcher
    rejected_models: int = 0  # registry versions that failed verification, never served
    undecodable_states: int = 0  # stored states that did not decode: sessions restarted empty
    shortened_answers: int = 0  # lists the catalogue rules left shorter than --top-n


class WorkerMetrics:
    """Histograms and live quality of one worker, in its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)

        def histogram(name: str, buckets: Sequence[float]) -> Histogram:
            return Histogram(name, help_text(name), buckets=buckets, registry=self.registry)

        self.event_latency = histogram("streamrec_event_to_publish_seconds", LATENCY_BUCKETS)
        self.ingest_latency = histogram("streamrec_ingest_to_publish_seconds", LATENCY_BUCKETS)
        self.consume_latency = histogram("streamrec_consume_to_publish_seconds", LATENCY_BUCKETS)
        self.scoring_time = histogram("streamrec_batch_scoring_seconds", SCORING_BUCKETS)
        self.batch_size = histogram("streamrec_batch_size", BATCH_BUCKETS)
        self.availability_delay = histogram(
            "streamrec_availability_delay_seconds", AVAILABILITY_BUCKETS
        )
        self.online = PrequentialQuality()
        # Next offset to process per (topic, partition), from processed batches.
        self.positions: dict[tuple[str, int], int] = {}

    def observe_published(
        self,
        published_at: float,
        consumed_at: float,
        event_times: Sequence[float],
        kafka_times: Sequence[float],
    ) -> None:
        for event_time in event_times:
            self.event_latency.observe(max(published_at - event_time, 0.0))
        for kafka_time in kafka_times:
            if kafka_time:  # None when the record carries no timestamp
                self.ingest_latency.observe(max(published_at - kafka_time, 0.0))
        consume = max(published_at - consumed_at, 0.0)
        for _ in event_times:
            self.consume_latency.observe(consume)

    def processed(self, topic: str, partition: int, offset: int) -> None:
        self.positions[(topic, partition)] = offset + 1


class Health:
    """What ``/healthz`` and ``/readyz`` report, written on the event loop (or by the
    start-up code before it runs) and read by the HTTP thread."""

    def __init__(self) -> None:
        self.heartbeat = time.monotonic()
        self.not_ready_reason: str | None = "not started"
        self.broker: BrokerProbe | None = None  # set once the worker is connected
        self.assigned = 0
        self.lag: dict[tuple[str, int], int] = {}
        self.active_sessions = 0


class ServedWorker(Protocol):
    """What the metrics read of a worker."""

    counters: WorkerCounters
    metrics: WorkerMetrics
    health: Health
    recommender: Recommender
    availability: AvailabilityFollower | None


class _CountersCollector:
    """Reads the worker's plain counters and the loop-refreshed numbers at scrape."""

    def __init__(self, worker: ServedWorker) -> None:
        self.worker = worker
        self._created: tuple[str, float | None] = ("", None)

    def _model_created(self, recommender: Any) -> float | None:
        if self._created[0] != recommender.version:
            stamp = None
            try:
                stamp = dt.datetime.fromisoformat(str(recommender.metadata["created"])).timestamp()
            except (KeyError, TypeError, ValueError):
                pass
            self._created = (recommender.version, stamp)
        return self._created[1]

    def collect(self) -> Iterator[Metric]:
        worker = self.worker
        metrics, health, counters = worker.metrics, worker.health, worker.counters
        rejected = dict(counters.rejected)

        def counter(name: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, help_text(name), value=value)

        def gauge(name: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, help_text(name), value=value)

        yield counter("streamrec_events_consumed", counters.events + sum(rejected.values()))
        yield counter("streamrec_recommendations_published", counters.published)
        family = CounterMetricFamily(
            "streamrec_events_rejected", help_text("streamrec_events_rejected"), labels=["reason"]
        )
        for reason, count in sorted(rejected.items()):
            family.add_metric([reason], count)
        yield family
        yield counter("streamrec_unknown_items", counters.unknown_items)
        yield counter("streamrec_duplicate_events", counters.duplicates)
        yield counter("streamrec_input_offsets_skipped", counters.skipped_offsets)
        yield counter("streamrec_input_clicks_refetched", counters.refetched_clicks)
        yield counter("streamrec_expired_sessions", counters.expired)
        yield counter("streamrec_model_swaps", counters.swaps)
        yield counter("streamrec_models_rejected", counters.rejected_models)
        yield counter("streamrec_undecodable_states", counters.undecodable_states)
        yield counter("streamrec_shortened_answers", counters.shortened_answers)
        availability = worker.availability
        unavailable = availability.unavailable_count if availability is not None else 0
        yield gauge("streamrec_unavailable_items", unavailable)

        online = metrics.online
        predictions, skipped = dict(online.predictions), dict(online.skipped_unknown)
        hits, reciprocal = dict(online.hits), dict(online.reciprocal_rank_sum)
        families = {
            name: CounterMetricFamily(name, help_text(name), labels=labels)
            for name, labels in (
                ("streamrec_online_predictions", ["model_version"]),
                ("streamrec_online_hits", ["model_version", "k"]),
                ("streamrec_online_reciprocal_rank_sum", ["model_version"]),
                ("streamrec_online_skipped_unknown", ["model_version"]),
            )
        }
        for version in sorted(set(predictions) | set(skipped)):
            families["streamrec_online_predictions"].add_metric(
                [version], predictions.get(version, 0)
            )
            families["streamrec_online_skipped_unknown"].add_metric(
                [version], skipped.get(version, 0)
            )
            families["streamrec_online_reciprocal_rank_sum"].add_metric(
                [version], reciprocal.get(version, 0.0)
            )
            for k in ONLINE_KS:
                families["streamrec_online_hits"].add_metric(
                    [version, str(k)], hits.get((version, k), 0)
                )
        yield from families.values()

        recommender = worker.recommender
        info = GaugeMetricFamily(
            "streamrec_model_info", help_text("streamrec_model_info"), labels=["model_version"]
        )
        info.add_metric([recommender.version], 1)
        yield info
        created = self._model_created(recommender)
        if created is not None:
            yield gauge("streamrec_model_age_seconds", max(time.time() - created, 0.0))
        lag = GaugeMetricFamily(
            "streamrec_consumer_lag_messages",
            help_text("streamrec_consumer_lag_messages"),
            labels=["topic", "partition"],
        )
        for (topic, partition), value in sorted(dict(health.lag).items()):
            lag.add_metric([topic, str(partition)], value)
        yield lag
        yield gauge("streamrec_assigned_partitions", health.assigned)
        yield gauge("streamrec_active_sessions", health.active_sessions)
        yield gauge("streamrec_ready", 1 if readiness(worker)[0] else 0)


def liveness(worker: ServedWorker) -> tuple[bool, str]:
    stalled = time.monotonic() - worker.health.heartbeat
    if stalled > STALL_S:
        return False, f"event loop has not run for {stalled:.0f} s"
    return True, "ok"


def readiness(worker: ServedWorker) -> tuple[bool, str]:
    alive, why = liveness(worker)
    if not alive:
        return False, why
    if worker.recommender is None:
        return False, "no model loaded"
    health = worker.health
    reason = health.not_ready_reason
    if reason is None and health.broker is not None:
        reason = health.broker.problem
    if reason is None and worker.availability is not None and worker.availability.failed:
        reason = f"not following the availability topic: {worker.availability.failed}"
    # the version is said when ready too: a rollout or a fallback is visible to a probe
    return (False, reason) if reason else (True, f"ok: serving {worker.recommender.version}")


def refresh(
    app: faust.App,
    health: Health,
    input_topic: str,
    positions: dict[tuple[str, int], int],
    table: Sized,
) -> None:
    """On the event loop: heartbeat, assignment, readiness, lag, table size."""
    health.heartbeat = time.monotonic()
    try:
        assignment = {tp for tp in app.consumer.assignment() if tp.topic == input_topic}
    except Exception:  # consumer not started yet
        assignment = set()
    health.assigned = len(assignment)
    if not assignment:
        health.not_ready_reason = "no partitions assigned"
    elif getattr(app, "in_recovery", False) or getattr(app, "rebalancing", False):
        health.not_ready_reason = REBALANCING
    else:
        health.not_ready_reason = None
    committed = getattr(app.consumer, "_committed_offset", {})
    lag: dict[tuple[str, int], int] = {}
    for tp in assignment:
        try:
            end = app.consumer.highwater(tp)
        except Exception:
            end = None
        if end is None:
            continue
        position = positions.get((tp.topic, tp.partition))
        if position is None:
            position = committed.get(tp) if hasattr(committed, "get") else None
        lag[(tp.topic, tp.partition)] = max(int(end) - int(position or 0), 0)
    health.lag = lag
    try:
        health.active_sessions = len(table)
    except Exception:
        pass


def worker_app(worker: ServedWorker) -> Callable[..., Iterable[bytes]]:
    """The worker's HTTP endpoints."""
    return wsgi_app(worker.metrics.registry, lambda: liveness(worker), lambda: readiness(worker))


class _FaustCollector:
    """Faust's engine numbers (``faust_*``), from the app's default monitor at scrape."""

    def __init__(self, app: faust.App) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        monitor = self.app.monitor
        for name, value in (
            ("faust_messages_received", monitor.messages_received_total),
            ("faust_events", monitor.events_total),
            ("faust_rebalances", monitor.rebalances),
        ):
            yield CounterMetricFamily(name, help_text(name), value=value)
        yield GaugeMetricFamily(
            "faust_active_events", help_text("faust_active_events"), value=monitor.events_active
        )
        commits = list(monitor.commit_latency)
        if commits:
            yield GaugeMetricFamily(
                "faust_commit_latency_seconds",
                help_text("faust_commit_latency_seconds"),
                value=statistics.median(commits),
            )


def register(worker: ServedWorker, app: faust.App | None = None) -> None:
    """Add the counters collector, ``process_*`` metrics and, given the Faust ``app``, its
    engine numbers (``faust_*``) to the worker's registry."""
    registry = worker.metrics.registry
    registry.register(_CountersCollector(worker))
    if app is not None:
        registry.register(_FaustCollector(app))
    try:
        ProcessCollector(registry=registry)
    except Exception:  # platforms without /proc
        pass
