"""Prometheus metrics, liveness and readiness of a worker, on ``--web-port``.

Each worker serves three paths on its own small HTTP server (a thread; Faust's web server
is disabled, so table contents are never served):

- ``/metrics``: Prometheus text format (the names are listed in :data:`METRICS`);
- ``/healthz``: 200 while the worker's event loop is alive (a 1 s timer on the loop stamps
  a heartbeat; 503 when it has not run for :data:`STALL_S` seconds);
- ``/readyz``: 200 once the model is loaded, partitions are assigned and table recovery is
  over; 503 with the reason otherwise.

Counting stays where it was: :class:`stream.serving.app.WorkerCounters` (updated by the agent and
by :mod:`stream.serving.hot_swap`) is read at scrape time by a collector, so nothing is counted
twice. What needs observations (latency and batch histograms, prequential quality) lives
in :class:`ProcessorMetrics`, one per :class:`stream.serving.app.ClickProcessor`, with its own
registry (several workers in one process, as in tests, never collide). Values that need
Faust (assignment, consumer lag, table size) are computed on the event loop by the
heartbeat timer; the scrape thread only reads plain numbers.

Live quality is prequential: the list published after a session's click is judged by the
session's next click, exactly as :func:`stream.quality.online_quality` does
offline (same :func:`~stream.quality.rank_in`, targets the judged model does not
know are counted apart). Counters are labelled with the version that published the
judged list, so ``rate(streamrec_online_hits_total{k="20"}[5m]) /
rate(streamrec_online_predictions_total[5m])`` is Recall@20 per model version.
"""

from __future__ import annotations

import datetime as dt
import logging
import statistics
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector

from model.errors import UserError
from stream.kafka.probe import BrokerProbe
from stream.quality import rank_in

if TYPE_CHECKING:  # stream.serving.app imports this module
    import faust

    from stream.serving.app import ClickProcessor

logger = logging.getLogger("streamrec.metrics")

ONLINE_KS = (5, 20)          # cutoffs of streamrec_online_hits_total{k}
MRR_CUTOFF = 20              # streamrec_online_reciprocal_rank_sum is MRR@20's numerator
MAX_TRACKED_SESSIONS = 200_000  # previous lists kept for prequential quality (LRU)
REFRESH_S = 1.0              # heartbeat / lag / table-size refresh on the event loop
STALL_S = 60.0               # /healthz fails when the loop has not refreshed for this long

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5,
                   5.0, 10.0, 30.0, 60.0)
SCORING_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)

# name -> (type, help). Counter names are given without "_total" (the exposition adds it).
METRICS: dict[str, tuple[str, str]] = {
    "streamrec_events_consumed": ("counter", "Click-topic messages consumed (valid clicks, "
                                             "duplicates and rejected events)"),
    "streamrec_recommendations_published": ("counter", "Recommendation messages published "
                                                       "and acknowledged by the broker"),
    "streamrec_events_rejected": ("counter", "Clicks sent to the dead-letter topic, by "
                                             "reason"),
    "streamrec_unknown_items": ("counter", "Clicks on items the serving model does not know"),
    "streamrec_duplicate_events": ("counter", "Redelivered clicks recognised by offset and "
                                              "not answered again"),
    "streamrec_expired_sessions": ("counter", "Sessions deleted after the session timeout"),
    "streamrec_model_swaps": ("counter", "Models swapped in from the registry"),
    "streamrec_models_rejected": ("counter", "Registry versions that failed verification "
                                             "and were never served"),
    "streamrec_online_predictions": ("counter", "Published lists judged by the session's "
                                                "next click, by the version that published"),
    "streamrec_online_hits": ("counter", "Judged lists whose next click was in the top k"),
    "streamrec_online_reciprocal_rank_sum": ("counter", "Sum of 1/rank of the next click "
                                                        "(0 beyond rank 20): MRR@20 "
                                                        "numerator"),
    "streamrec_online_skipped_unknown": ("counter", "Next clicks not judged: the item is "
                                                    "unknown to the model that published"),
    "streamrec_active_sessions": ("gauge", "Sessions in this worker's table"),
    "streamrec_model_info": ("gauge", "The model version being served (value 1)"),
    "streamrec_model_age_seconds": ("gauge", "Seconds since the served model was created"),
    "streamrec_consumer_lag_messages": ("gauge", "Click-topic end offset minus the next "
                                                 "offset to process, per assigned partition"),
    "streamrec_assigned_partitions": ("gauge", "Click-topic partitions assigned to this "
                                               "worker"),
    "streamrec_ready": ("gauge", "1 when /readyz answers 200"),
    "streamrec_event_to_publish_seconds": ("histogram", "Click event time to its "
                                                        "recommendation's delivery"),
    "streamrec_ingest_to_publish_seconds": ("histogram", "Click's Kafka record timestamp to "
                                                         "its recommendation's delivery"),
    "streamrec_consume_to_publish_seconds": ("histogram", "Click handed to the agent to its "
                                                          "recommendation's delivery"),
    "streamrec_batch_scoring_seconds": ("histogram", "Model time (state update and ranking) "
                                                     "per batch"),
    "streamrec_batch_size": ("histogram", "Clicks per scored batch"),
}

# What ``streamrec trainer`` serves (same conventions).
TRAINER_METRICS: dict[str, tuple[str, str]] = {
    "streamrec_trainer_buffered_sessions": ("gauge", "Sessions in the trainer's buffer"),
    "streamrec_trainer_rounds": ("counter", "Trainer rounds, by decision (wait, promoted, "
                                            "rejected, not_published, failed)"),
    "streamrec_trainer_retrain_seconds": ("histogram", "Fine-tuning time per round"),
    "streamrec_trainer_training_loss": ("gauge", "Final training loss of the last round"),
    "streamrec_trainer_gate_recall": ("gauge", "Recall@20 of the candidate and the current "
                                               "model on the last round's holdout"),
}
# Faust's own numbers, read from its default monitor at scrape time. (Faust's
# PrometheusMonitor updates labelled metrics on every message and event instead: measured
# at 40k items, it took ~70 us of a worker's ~380 us of CPU per click.)
FAUST_METRICS: dict[str, tuple[str, str]] = {
    "faust_messages_received": ("counter", "Messages Faust's consumer received, all topics"),
    "faust_events": ("counter", "Events Faust's streams handed to agents"),
    "faust_active_events": ("gauge", "Events being processed"),
    "faust_rebalances": ("counter", "Consumer group rebalances this worker took part in"),
    "faust_commit_latency_seconds": ("gauge", "Median time of Faust's recent offset commits"),
}
RETRAIN_BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


def exported_names(families: dict[str, tuple[str, str]] | None = None) -> set[str]:
    """Every sample name (``_total``, ``_bucket``, ...) of ``families`` (default: the
    worker's and the trainer's), besides the standard ``process_*`` ones."""
    names: set[str] = set()
    for name, (kind, _) in (families or {**METRICS, **TRAINER_METRICS}).items():
        if kind == "counter":
            names.add(name + "_total")
        elif kind == "histogram":
            names.update(name + suffix
                         for suffix in ("_bucket", "_sum", "_count", "_created"))
        else:
            names.add(name)
    return names


def _help(name: str) -> str:
    return {**METRICS, **TRAINER_METRICS, **FAUST_METRICS}[name][1]


class OnlineQualityTracker:
    """Prequential Recall@k / MRR@20 of the published lists, per model version.

    Keeps each session's last published list (bounded, least recently clicked dropped
    first; expired sessions are dropped by the processor) with the version and the item
    map of the model that produced it.
    """

    def __init__(self, max_sessions: int = MAX_TRACKED_SESSIONS) -> None:
        self.max_sessions = max_sessions
        self._previous: OrderedDict[str, tuple[Sequence[str], str, Container[str]]] = \
            OrderedDict()
        self.predictions: dict[str, int] = defaultdict(int)
        self.skipped_unknown: dict[str, int] = defaultdict(int)
        self.hits: dict[tuple[str, int], int] = defaultdict(int)
        self.reciprocal_rank_sum: dict[str, float] = defaultdict(float)

    def observe(self, session_id: str, item_id: str, published: Sequence[str], version: str,
                known_items: Container[str]) -> None:
        """A click of ``session_id`` was answered with ``published`` (in click order)."""
        previous = self._previous.pop(session_id, None)
        if previous is not None:
            items, judged_version, known = previous
            if item_id not in known:
                self.skipped_unknown[judged_version] += 1
            else:
                self.predictions[judged_version] += 1
                rank = rank_in(items[:max(ONLINE_KS)], item_id)
                if rank is not None:
                    for k in ONLINE_KS:
                        if rank <= k:
                            self.hits[(judged_version, k)] += 1
                    if rank <= MRR_CUTOFF:
                        self.reciprocal_rank_sum[judged_version] += 1.0 / rank
        self._previous[session_id] = (published, version, known_items)
        if len(self._previous) > self.max_sessions:
            self._previous.popitem(last=False)

    def forget(self, session_ids: Iterable[str]) -> None:
        for session_id in session_ids:
            self._previous.pop(session_id, None)

    def versions(self) -> set[str]:
        return set(self.predictions) | set(self.skipped_unknown)

    def __len__(self) -> int:
        return len(self._previous)


class ProcessorMetrics:
    """Histograms and live quality of one processor, and the numbers the loop refreshes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)

        def histogram(name: str, buckets: Sequence[float]) -> Histogram:
            return Histogram(name, _help(name), buckets=buckets, registry=self.registry)

        self.event_latency = histogram("streamrec_event_to_publish_seconds", LATENCY_BUCKETS)
        self.ingest_latency = histogram("streamrec_ingest_to_publish_seconds", LATENCY_BUCKETS)
        self.consume_latency = histogram("streamrec_consume_to_publish_seconds",
                                         LATENCY_BUCKETS)
        self.scoring_time = histogram("streamrec_batch_scoring_seconds", SCORING_BUCKETS)
        self.batch_size = histogram("streamrec_batch_size", BATCH_BUCKETS)
        self.online = OnlineQualityTracker()
        # Next offset to process per (topic, partition), from processed batches.
        self.positions: dict[tuple[str, int], int] = {}
        # Refreshed on the event loop (see install()); read by the scrape thread.
        self.heartbeat = time.monotonic()
        self.lag: dict[tuple[str, int], int] = {}
        self.assigned = 0
        self.active_sessions = 0
        self.not_ready_reason: str | None = "not started"
        self.broker: BrokerProbe | None = None  # set once the worker is connected

    def observe_published(self, published_at: float, consumed_at: float,
                          event_times: Sequence[float], kafka_times: Sequence[float]) -> None:
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


class _CountersCollector:
    """Reads the processor's plain counters and the loop-refreshed numbers at scrape."""

    def __init__(self, processor: ClickProcessor) -> None:
        self.processor = processor
        self._created: tuple[str, float | None] = ("", None)

    def _model_created(self, recommender: Any) -> float | None:
        if self._created[0] != recommender.version:
            stamp = None
            try:
                stamp = dt.datetime.fromisoformat(
                    str(recommender.metadata["created"])).timestamp()
            except (KeyError, TypeError, ValueError):
                pass
            self._created = (recommender.version, stamp)
        return self._created[1]

    def collect(self) -> Iterator[Metric]:
        processor = self.processor
        metrics = processor.metrics
        counters = processor.counters
        rejected = dict(counters.rejected)

        def counter(name: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, _help(name), value=value)

        def gauge(name: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, _help(name), value=value)

        yield counter("streamrec_events_consumed", counters.events + sum(rejected.values()))
        yield counter("streamrec_recommendations_published", counters.published)
        family = CounterMetricFamily("streamrec_events_rejected",
                                     _help("streamrec_events_rejected"), labels=["reason"])
        for reason, count in sorted(rejected.items()):
            family.add_metric([reason], count)
        yield family
        yield counter("streamrec_unknown_items", counters.unknown_items)
        yield counter("streamrec_duplicate_events", counters.duplicates)
        yield counter("streamrec_expired_sessions", counters.expired)
        yield counter("streamrec_model_swaps", counters.swaps)
        yield counter("streamrec_models_rejected", counters.rejected_models)

        online = metrics.online
        predictions, skipped = dict(online.predictions), dict(online.skipped_unknown)
        hits, reciprocal = dict(online.hits), dict(online.reciprocal_rank_sum)
        families = {name: CounterMetricFamily(name, _help(name), labels=labels) for name, labels
                    in (("streamrec_online_predictions", ["model_version"]),
                        ("streamrec_online_hits", ["model_version", "k"]),
                        ("streamrec_online_reciprocal_rank_sum", ["model_version"]),
                        ("streamrec_online_skipped_unknown", ["model_version"]))}
        for version in sorted(set(predictions) | set(skipped)):
            families["streamrec_online_predictions"].add_metric(
                [version], predictions.get(version, 0))
            families["streamrec_online_skipped_unknown"].add_metric(
                [version], skipped.get(version, 0))
            families["streamrec_online_reciprocal_rank_sum"].add_metric(
                [version], reciprocal.get(version, 0.0))
            for k in ONLINE_KS:
                families["streamrec_online_hits"].add_metric([version, str(k)],
                                                             hits.get((version, k), 0))
        yield from families.values()

        recommender = processor.recommender
        info = GaugeMetricFamily("streamrec_model_info", _help("streamrec_model_info"),
                                 labels=["model_version"])
        info.add_metric([recommender.version], 1)
        yield info
        created = self._model_created(recommender)
        if created is not None:
            yield gauge("streamrec_model_age_seconds", max(time.time() - created, 0.0))
        lag = GaugeMetricFamily("streamrec_consumer_lag_messages",
                                _help("streamrec_consumer_lag_messages"),
                                labels=["topic", "partition"])
        for (topic, partition), value in sorted(dict(metrics.lag).items()):
            lag.add_metric([topic, str(partition)], value)
        yield lag
        yield gauge("streamrec_assigned_partitions", metrics.assigned)
        yield gauge("streamrec_active_sessions", metrics.active_sessions)
        yield gauge("streamrec_ready", 1 if readiness(processor)[0] else 0)


def liveness(processor: ClickProcessor) -> tuple[bool, str]:
    stalled = time.monotonic() - processor.metrics.heartbeat
    if stalled > STALL_S:
        return False, f"event loop has not run for {stalled:.0f} s"
    return True, "ok"


def readiness(processor: ClickProcessor) -> tuple[bool, str]:
    alive, why = liveness(processor)
    if not alive:
        return False, why
    if processor.recommender is None:
        return False, "no model loaded"
    reason = processor.metrics.not_ready_reason
    if reason is None and processor.metrics.broker is not None:
        reason = processor.metrics.broker.problem
    return (False, reason) if reason else (True, "ok")


def refresh(app: faust.App, processor: ClickProcessor) -> None:
    """On the event loop: heartbeat, assignment, readiness, lag, table size."""
    metrics = processor.metrics
    metrics.heartbeat = time.monotonic()
    topic = processor.settings.input_topic
    try:
        assignment = {tp for tp in app.consumer.assignment() if tp.topic == topic}
    except Exception:  # consumer not started yet
        assignment = set()
    metrics.assigned = len(assignment)
    if not assignment:
        metrics.not_ready_reason = "no partitions assigned"
    elif getattr(app, "in_recovery", False) or getattr(app, "rebalancing", False):
        metrics.not_ready_reason = "rebalancing or recovering the session table"
    else:
        metrics.not_ready_reason = None
    committed = getattr(app.consumer, "_committed_offset", {})
    lag: dict[tuple[str, int], int] = {}
    for tp in assignment:
        try:
            end = app.consumer.highwater(tp)
        except Exception:
            end = None
        if end is None:
            continue
        position = metrics.positions.get((tp.topic, tp.partition))
        if position is None:
            position = committed.get(tp) if hasattr(committed, "get") else None
        lag[(tp.topic, tp.partition)] = max(int(end) - int(position or 0), 0)
    metrics.lag = lag
    try:
        metrics.active_sessions = len(processor.table)
    except Exception:
        pass


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


class TrainerMetrics:
    """What ``streamrec trainer`` exports: its buffer, and each round's decision and gate.

    Every round's decision record passes through :meth:`record`; the consume loop calls
    :meth:`beat` as it polls. During a training round the loop does not poll, so liveness
    reports "training" rather than a stall.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.buffered = Gauge("streamrec_trainer_buffered_sessions",
                              _help("streamrec_trainer_buffered_sessions"),
                              registry=self.registry)
        self.rounds = Counter("streamrec_trainer_rounds", _help("streamrec_trainer_rounds"),
                              ["decision"], registry=self.registry)
        self.retrain_seconds = Histogram("streamrec_trainer_retrain_seconds",
                                         _help("streamrec_trainer_retrain_seconds"),
                                         buckets=RETRAIN_BUCKETS, registry=self.registry)
        self.loss = Gauge("streamrec_trainer_training_loss",
                          _help("streamrec_trainer_training_loss"), registry=self.registry)
        self.gate_recall = Gauge("streamrec_trainer_gate_recall",
                                 _help("streamrec_trainer_gate_recall"), ["model"],
                                 registry=self.registry)
        self.heartbeat = time.monotonic()
        self.training = False
        self.not_ready_reason: str | None = "not consuming yet"

    def beat(self, buffered: int) -> None:
        self.heartbeat = time.monotonic()
        self.buffered.set(buffered)

    def record(self, decision: dict[str, Any]) -> None:
        """Count a round's decision record (as logged by the trainer)."""
        self.rounds.labels(decision["decision"]).inc()
        self.buffered.set(decision.get("buffered", 0))
        if "train_seconds" in decision:
            self.retrain_seconds.observe(decision["train_seconds"])
            self.loss.set(decision["final_loss"])
        gate = decision.get("gate")
        if gate:
            self.gate_recall.labels("candidate").set(gate["candidate_recall"])
            self.gate_recall.labels("current").set(gate["current_recall"])

    def liveness(self) -> tuple[bool, str]:
        if self.training:
            return True, "training"
        stalled = time.monotonic() - self.heartbeat
        return (stalled < STALL_S, "ok" if stalled < STALL_S else
                f"consume loop stalled for {stalled:.0f} s")

    def readiness(self) -> tuple[bool, str]:
        return (self.not_ready_reason is None, self.not_ready_reason or "ok")

    def app(self) -> Callable[..., Iterable[bytes]]:
        return wsgi_app(self.registry, self.liveness, self.readiness)


Check = Callable[[], tuple[bool, str]]


def wsgi_app(registry: CollectorRegistry, liveness_check: Check,
             readiness_check: Check) -> Callable[..., Iterable[bytes]]:
    """/metrics from ``registry``, /healthz and /readyz from the checks, 404 otherwise."""
    metrics_app = make_wsgi_app(registry)
    checks = {"/healthz": liveness_check, "/readyz": readiness_check}

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path in checks:
            ok, why = checks[path]()
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "text/plain; charset=utf-8")])
            return [why.encode() + b"\n"]
        if path == "/metrics":
            return metrics_app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: try /metrics, /healthz or /readyz\n"]

    return app


def worker_app(processor: ClickProcessor) -> Callable[..., Iterable[bytes]]:
    """The worker's HTTP endpoints."""
    return wsgi_app(processor.metrics.registry, lambda: liveness(processor),
                    lambda: readiness(processor))


class _FaustCollector:
    """Faust's engine numbers (``faust_*``), from the app's default monitor at scrape."""

    def __init__(self, app: faust.App) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        monitor = self.app.monitor
        for name, value in (("faust_messages_received", monitor.messages_received_total),
                            ("faust_events", monitor.events_total),
                            ("faust_rebalances", monitor.rebalances)):
            yield CounterMetricFamily(name, _help(name), value=value)
        yield GaugeMetricFamily("faust_active_events", _help("faust_active_events"),
                                value=monitor.events_active)
        commits = list(monitor.commit_latency)
        if commits:
            yield GaugeMetricFamily("faust_commit_latency_seconds",
                                    _help("faust_commit_latency_seconds"),
                                    value=statistics.median(commits))


def register(processor: ClickProcessor) -> None:
    """Add the counters collector (and process_* metrics) to the processor's registry."""
    registry = processor.metrics.registry
    registry.register(_CountersCollector(processor))  # type: ignore[arg-type]
    try:
        ProcessCollector(registry=registry)
    except Exception:  # platforms without /proc
        pass


def serve(app: Callable[..., Iterable[bytes]], port: int, addr: str = "0.0.0.0") -> WSGIServer:
    """Serve ``app`` (see :func:`wsgi_app`) in a daemon thread; returns the server."""
    try:
        server = make_server(addr, port, app, _ThreadingWSGIServer,
                             handler_class=_QuietHandler)
    except OSError as exc:
        raise UserError(f"cannot serve metrics on {addr}:{port}: {exc.strerror or exc}") \
            from None
    threading.Thread(target=server.serve_forever, name="streamrec-metrics",
                     daemon=True).start()
    return server


def install(app: faust.App, processor: ClickProcessor, port: int,
            addr: str = "0.0.0.0") -> WSGIServer | None:
    """Register the collectors (Faust's ``faust_*`` numbers among them) and the loop
    refresher; serve HTTP unless ``port`` is 0."""
    register(processor)
    processor.metrics.registry.register(_FaustCollector(app))  # type: ignore[arg-type]

    async def refresh_metrics() -> None:
        refresh(app, processor)

    app.timer(REFRESH_S, on_leader=False, name="streamrec.metrics")(refresh_metrics)
    if port == 0:
        return None
    server = serve(worker_app(processor), port, addr)
    logger.info("metrics on http://%s:%d/metrics", addr, port)
    return server
