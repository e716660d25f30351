"""What a streamrec process exports: the metric names and the HTTP endpoints that serve them.

Every metric a worker or the trainer exports is declared once here, with its type and
help text, so that the exposition, the dashboards and alert rules (checked against these
names by tests/test_deploy.py) and the docs cannot drift apart. Both processes serve the
same three paths from a small HTTP server in a thread of their own (Faust's web server,
which can expose table contents, stays off):

- ``/metrics``: Prometheus text format;
- ``/healthz``: 200 while the process's main loop is alive (503 once it has not reported
  for :data:`STALL_S` seconds);
- ``/readyz``: 200 when the process does its job, 503 with the reason otherwise.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from model.errors import UserError

STALL_S = 60.0  # /healthz fails when the main loop has not reported for this long

# What a worker serves: name -> (type, help). Counter names are given without "_total"
# (the exposition adds it).
METRICS: dict[str, tuple[str, str]] = {
    "streamrec_events_consumed": (
        "counter",
        "Click-topic messages consumed (valid clicks, duplicates and rejected events)",
    ),
    "streamrec_recommendations_published": (
        "counter",
        "Recommendation messages published and acknowledged by the broker",
    ),
    "streamrec_events_rejected": ("counter", "Clicks sent to the dead-letter topic, by reason"),
    "streamrec_unknown_items": ("counter", "Clicks on items the serving model does not know"),
    "streamrec_duplicate_events": (
        "counter",
        "Redelivered clicks recognised by offset and not answered again",
    ),
    "streamrec_input_offsets_skipped": (
        "counter",
        "Click-topic offsets the consumer never handed the agent, from the committed offset "
        "on: transaction markers, records removed by retention, or dropped clicks (these "
        "are read again: streamrec_input_clicks_refetched)",
    ),
    "streamrec_input_clicks_refetched": (
        "counter",
        "Clicks the consumer dropped on their way to the agent, read from the broker and "
        "applied in their place (each would otherwise have been lost)",
    ),
    "streamrec_expired_sessions": ("counter", "Sessions deleted after the session timeout"),
    "streamrec_model_swaps": ("counter", "Models swapped in from the registry"),
    "streamrec_models_rejected": (
        "counter",
        "Registry versions that failed verification and were never served",
    ),
    "streamrec_undecodable_states": (
        "counter",
        "Stored session states that did not decode: the session restarted empty",
    ),
    "streamrec_shortened_answers": (
        "counter",
        "Recommendation lists shorter than --top-n: the catalogue rules left fewer items",
    ),
    "streamrec_unavailable_items": (
        "gauge",
        "Items the availability topic marks unavailable (known to the model or not)",
    ),
    "streamrec_availability_delay_seconds": (
        "histogram",
        "Broker acknowledgement of an availability change to its use by the served model",
    ),
    "streamrec_online_predictions": (
        "counter",
        "Published lists judged by the session's next click, by the version that published",
    ),
    "streamrec_online_hits": ("counter", "Judged lists whose next click was in the top k"),
    "streamrec_online_reciprocal_rank_sum": (
        "counter",
        "Sum of 1/rank of the next click (0 beyond rank 20): MRR@20 numerator",
    ),
    "streamrec_online_skipped_unknown": (
        "counter",
        "Next clicks not judged: the item is unknown to the model that published",
    ),
    "streamrec_active_sessions": ("gauge", "Sessions in this worker's table"),
    "streamrec_model_info": ("gauge", "The model version being served (value 1)"),
    "streamrec_model_age_seconds": ("gauge", "Seconds since the served model was created"),
    "streamrec_consumer_lag_messages": (
        "gauge",
        "Click-topic end offset minus the next offset to process, per assigned partition",
    ),
    "streamrec_assigned_partitions": ("gauge", "Click-topic partitions assigned to this worker"),
    "streamrec_ready": ("gauge", "1 when /readyz answers 200"),
    "streamrec_event_to_publish_seconds": (
        "histogram",
        "Click event time to its recommendation's delivery",
    ),
    "streamrec_ingest_to_publish_seconds": (
        "histogram",
        "Click's Kafka record timestamp to its recommendation's delivery",
    ),
    "streamrec_consume_to_publish_seconds": (
        "histogram",
        "Click handed to the agent to its recommendation's delivery",
    ),
    "streamrec_batch_scoring_seconds": (
        "histogram",
        "Model time (state update and ranking) per batch",
    ),
    "streamrec_batch_size": ("histogram", "Clicks per scored batch"),
}

# What ``streamrec trainer`` serves (same conventions).
TRAINER_METRICS: dict[str, tuple[str, str]] = {
    "streamrec_trainer_buffered_sessions": ("gauge", "Sessions in the trainer's buffer"),
    "streamrec_trainer_rounds": (
        "counter",
        "Trainer rounds, by decision (wait, promoted, rejected, not_published, failed)",
    ),
    "streamrec_trainer_retrain_seconds": ("histogram", "Fine-tuning time per round"),
    "streamrec_trainer_training_loss": ("gauge", "Final training loss of the last round"),
    "streamrec_trainer_gate_recall": (
        "gauge",
        "Recall@20 of the candidate and the current model on the last round's holdout",
    ),
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


def exported_names(families: dict[str, tuple[str, str]] | None = None) -> set[str]:
    """Every sample name (``_total``, ``_bucket``, ...) of ``families`` (default: the
    worker's and the trainer's), besides the standard ``process_*`` ones."""
    names: set[str] = set()
    for name, (kind, _) in (families or {**METRICS, **TRAINER_METRICS}).items():
        if kind == "counter":
            names.add(name + "_total")
        elif kind == "histogram":
            names.update(name + suffix for suffix in ("_bucket", "_sum", "_count", "_created"))
        else:
            names.add(name)
    return names


def help_text(name: str) -> str:
    return {**METRICS, **TRAINER_METRICS, **FAUST_METRICS}[name][1]


#: Requests served at once; further connections wait in the listen queue. A scrape or a
#: probe takes milliseconds, so a few threads serve any real poller, and a flood of
#: connections cannot grow the process by a thread each.
MAX_CONCURRENT_REQUESTS = 8
#: Seconds a connection may take to send its request or to read the answer. Short, so
#: that clients that connect and send nothing hold a slot only briefly: scrapers and
#: probes send their request at once.
REQUEST_TIMEOUT_S = 2.0


class _BoundedWSGIServer(ThreadingMixIn, WSGIServer):
    """A thread per request, at most ``max_requests`` at a time."""

    daemon_threads = True
    max_requests = MAX_CONCURRENT_REQUESTS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._slots = threading.BoundedSemaphore(self.max_requests)

    def process_request(self, request: Any, client_address: Any) -> None:
        self._slots.acquire()  # the accept loop waits here while every slot is busy
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


Check = Callable[[], tuple[bool, str]]


def wsgi_app(
    registry: CollectorRegistry, liveness_check: Check, readiness_check: Check
) -> Callable[..., Iterable[bytes]]:
    """/metrics from ``registry``, /healthz and /readyz from the checks, 404 otherwise."""
    metrics_app = make_wsgi_app(registry)
    checks = {"/healthz": liveness_check, "/readyz": readiness_check}

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path in checks:
            ok, why = checks[path]()
            start_response(
                "200 OK" if ok else "503 Service Unavailable",
                [("Content-Type", "text/plain; charset=utf-8")],
            )
            return [why.encode() + b"\n"]
        if path == "/metrics":
            return metrics_app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: try /metrics, /healthz or /readyz\n"]

    return app


def serve(
    app: Callable[..., Iterable[bytes]],
    port: int,
    host: str = "0.0.0.0",
    *,
    max_requests: int = MAX_CONCURRENT_REQUESTS,
    request_timeout_s: float = REQUEST_TIMEOUT_S,
) -> WSGIServer:
    """Serve ``app`` (see :func:`wsgi_app`) on ``host``:``port`` from a daemon thread,
    ``max_requests`` requests at a time; returns the server."""
    server_class = type("Server", (_BoundedWSGIServer,), {"max_requests": max_requests})
    handler = type("Handler", (_QuietHandler,), {"timeout": request_timeout_s})
    try:
        server: WSGIServer = make_server(host, port, app, server_class, handler_class=handler)
    except OSError as exc:
        raise UserError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
    threading.Thread(target=server.serve_forever, name="streamrec-metrics", daemon=True).start()
    return server
