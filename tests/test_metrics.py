"""Worker metrics: prequential counters, the /metrics exposition, /healthz and /readyz,
and an end-to-end run scraped by a real Prometheus server."""

from __future__ import annotations

import json
import random
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from stream import observability
from stream.devtools.processes import REPO
from stream.devtools.testing import free_port, http_get, produce_raw, wait_for_http
from stream.kafka.wire import Click
from stream.learning.metrics import TrainerMetrics
from stream.quality import ONLINE_KS, PrequentialQuality, online_quality
from stream.serving import metrics
from stream.serving.metrics import WorkerCounters

# ---------------------------------------------------------------- prequential counters


def _messages(sessions: dict[str, list[tuple[str, list[str]]]]) -> list[dict]:
    """Output messages: per session, (clicked item, published list) in click order."""
    out, offset = [], 0
    for session, clicks in sessions.items():
        for item, published in clicks:
            out.append(
                {
                    "session_id": session,
                    "item_id": item,
                    "timestamp": 0.0,
                    "recommendations": [{"item_id": i, "score": 0.0} for i in published],
                    "model_version": "v1",
                    "source": {"partition": 0, "offset": offset},
                }
            )
            offset += 1
    return out


def _track(messages: list[dict], known) -> PrequentialQuality:
    tracker = PrequentialQuality()
    for m in sorted(messages, key=lambda m: (m["source"]["partition"], m["source"]["offset"])):
        tracker.observe(
            m["session_id"],
            m["item_id"],
            [r["item_id"] for r in m["recommendations"]],
            m["model_version"],
            known,
        )
    return tracker


def _assert_agrees(tracker: PrequentialQuality, messages, known, version="v1"):
    for k in ONLINE_KS:
        offline = online_quality(messages, k, known)
        assert tracker.predictions.get(version, 0) == offline.n_predictions
        assert tracker.skipped_unknown.get(version, 0) == offline.n_skipped_unknown
        assert tracker.hits.get((version, k), 0) == offline.hits
    offline20 = online_quality(messages, 20, known)
    assert tracker.reciprocal_rank_sum.get(version, 0.0) == pytest.approx(
        offline20.reciprocal_rank_sum
    )


def test_hand_built_sequence():
    top = [f"i{n}" for n in range(20)]
    known = set(top) | {"x"}
    sessions = {
        "a": [("i0", top), ("i0", top), ("i3", top), ("i19", top)],  # ranks 1, 4, 20
        "b": [("i1", top), ("x", top), ("unknown", top)],  # miss, skipped
        "c": [("i5", top)],  # nothing judged
        "d": [("i7", top[:3]), ("i2", top)],  # rank 3 in a short list
    }
    messages = _messages(sessions)
    tracker = _track(messages, known)
    assert tracker.predictions["v1"] == 5
    assert tracker.skipped_unknown["v1"] == 1
    assert tracker.hits[("v1", 5)] == 3 and tracker.hits[("v1", 20)] == 4
    assert tracker.reciprocal_rank_sum["v1"] == pytest.approx(1 + 1 / 4 + 1 / 20 + 1 / 3)
    _assert_agrees(tracker, messages, known)


@pytest.mark.parametrize("seed", range(5))
def test_random_sequences_agree_with_online_quality(seed):
    rng = random.Random(seed)
    catalogue = [f"i{n}" for n in range(40)]
    known = set(catalogue[:35])
    sessions = {}
    for s in range(30):
        clicks = []
        for _ in range(rng.randint(1, 8)):
            item = rng.choice(catalogue + ["new-item"])
            clicks.append((item, rng.sample(catalogue, rng.choice([5, 20, 30]))))
        sessions[f"s{s}"] = clicks
    messages = _messages(sessions)
    rng.shuffle(messages)  # sessions interleave; click order is the source order
    _assert_agrees(_track(messages, known), messages, known)


def test_counts_go_to_the_version_that_published_the_judged_list():
    tracker = PrequentialQuality()
    tracker.observe("s", "a", ["b", "c"], "old", {"a", "b", "c"})
    tracker.observe("s", "b", ["c", "new"], "new", {"a", "b", "c", "new"})  # judges "old"
    tracker.observe("s", "new", ["a"], "new", {"a", "b", "c", "new"})  # judges "new"
    assert dict(tracker.predictions) == {"old": 1, "new": 1}
    assert tracker.hits[("old", 5)] == 1 and tracker.hits[("new", 5)] == 1
    assert tracker.reciprocal_rank_sum == {"old": 1.0, "new": 0.5}


def test_previous_lists_are_bounded_and_forgotten_on_expiry():
    tracker = PrequentialQuality(max_sessions=3)
    for n in range(5):
        tracker.observe(f"s{n}", "a", ["a"], "v", {"a"})
    assert len(tracker) == 3
    tracker.observe("s0", "a", ["a"], "v", {"a"})  # s0 was evicted: not judged
    assert tracker.predictions["v"] == 0
    tracker.forget(["s0", "s4", "missing"])
    tracker.observe("s4", "a", ["a"], "v", {"a"})
    assert tracker.predictions["v"] == 0
    tracker.observe("s3", "a", ["a"], "v", {"a"})
    assert tracker.predictions["v"] == 1


# ---------------------------------------------------------------- exposition and HTTP


def _fake_processor():
    recommender = SimpleNamespace(
        version="v7", item_map={"a", "b"}, metadata={"created": "2020-01-01T00:00:00+00:00"}
    )
    processor = SimpleNamespace(
        counters=WorkerCounters(
            events=10,
            published=8,
            duplicates=2,
            unknown_items=1,
            expired=3,
            rejected={"bad_json": 2, "missing_field": 1},
            swaps=1,
            rejected_models=4,
        ),
        metrics=metrics.WorkerMetrics(),
        health=metrics.Health(),
        recommender=recommender,
        availability=None,
    )
    metrics.register(processor)
    return processor


def _samples(text: str) -> dict[str, float]:
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_exposition_names_and_values():
    processor = _fake_processor()
    processor.metrics.online.observe("s", "a", ["a", "b"], "v7", {"a", "b"})
    processor.metrics.online.observe("s", "b", ["a"], "v7", {"a", "b"})
    processor.metrics.observe_published(100.0, 99.9, [99.0, 98.0], [99.5, None])
    processor.health.lag = {("clicks", 2): 5}
    text = generate_latest(processor.metrics.registry).decode()
    values = _samples(text)
    names = {re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", k).group(0) for k in values}
    streamrec = {n for n in names if n.startswith("streamrec_")}
    assert streamrec <= observability.exported_names(observability.METRICS)
    # Every declared metric shows up (labelled families once they have a sample).
    assert observability.exported_names(observability.METRICS) <= streamrec
    assert values["streamrec_events_consumed_total"] == 13
    assert values["streamrec_recommendations_published_total"] == 8
    assert values['streamrec_events_rejected_total{reason="bad_json"}'] == 2
    assert values["streamrec_duplicate_events_total"] == 2
    assert values["streamrec_model_swaps_total"] == 1
    assert values["streamrec_models_rejected_total"] == 4
    assert values['streamrec_model_info{model_version="v7"}'] == 1
    assert values["streamrec_model_age_seconds"] > 365 * 86400
    assert values['streamrec_online_predictions_total{model_version="v7"}'] == 1
    assert values['streamrec_online_hits_total{k="5",model_version="v7"}'] == 1
    assert values['streamrec_online_reciprocal_rank_sum_total{model_version="v7"}'] == 0.5
    assert values['streamrec_consumer_lag_messages{partition="2",topic="clicks"}'] == 5
    assert values["streamrec_event_to_publish_seconds_count"] == 2
    assert values["streamrec_ingest_to_publish_seconds_count"] == 1
    assert values['streamrec_consume_to_publish_seconds_bucket{le="0.1"}'] == 2


def test_http_endpoints():
    processor = _fake_processor()
    server = observability.serve(metrics.worker_app(processor), 0, "127.0.0.1")
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        assert http_get(base + "/healthz") == (200, "ok\n")
        status, body = http_get(base + "/readyz")
        assert status == 503 and "not started" in body
        processor.health.not_ready_reason = None
        assert http_get(base + "/readyz") == (200, "ok: serving v7\n")  # the served version
        status, body = http_get(base + "/metrics")
        assert status == 200 and "streamrec_ready 1.0" in body
        assert http_get(base + "/tables")[0] == 404
        processor.health.heartbeat -= observability.STALL_S + 1
        assert http_get(base + "/healthz")[0] == 503
        assert http_get(base + "/readyz")[0] == 503
    finally:
        server.shutdown()
        server.server_close()


def test_port_in_use_is_a_clear_error():
    from model.errors import UserError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(UserError, match="cannot serve metrics"):
            observability.serve(
                metrics.worker_app(_fake_processor()), taken.getsockname()[1], "127.0.0.1"
            )


# ---------------------------------------------------------------- end to end, real Prometheus


def dashboard_queries() -> list[str]:
    dashboard = json.loads(
        (REPO / "deploy" / "grafana" / "dashboards" / "streamrec.json").read_text()
    )
    return [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


def _prometheus_binary() -> str:
    found = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None
    )
    if found is None:
        try:
            subprocess.run(
                ["apt-get", "install", "-y", "-qq", "prometheus"],
                check=True,
                capture_output=True,
                timeout=300,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            pytest.skip(
                f"prometheus is not installed and apt-get could not install it "
                f"({exc}); `make system-deps` installs it"
            )
        found = shutil.which("prometheus") or "/usr/bin/prometheus"
    return found


class _Prometheus:
    def __init__(self, binary: str, target_port: int, work: Path) -> None:
        self.port = free_port()
        config = work / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            "  - job_name: streamrec-worker\n"
            "    scrape_interval: 1s\n"
            "    scrape_timeout: 1s\n"
            f"    static_configs: [{{targets: ['127.0.0.1:{target_port}']}}]\n"
        )
        self.log = work / "prometheus.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={work / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def query(self, expr: str) -> list[dict]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": expr}
        )
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def value(self, expr: str) -> float | None:
        try:
            result = self.query(expr)
        except (OSError, urllib.error.URLError):
            return None
        return float(result[0]["value"][1]) if len(result) == 1 else None

    def wait_value(self, expr: str, expected: float, timeout: float = 20.0) -> float | None:
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            value = self.value(expr)
            if value is not None and abs(value - expected) < 1e-6:
                return value
            time.sleep(0.25)
        return value

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.mark.kafka
def test_prometheus_scrapes_the_worker(kafka_bootstrap, small_model, tmp_path):
    from model.artifact import load_model
    from stream.devtools.testing import StreamNames, WorkerProcess, produce_clicks, read_topic

    binary = _prometheus_binary()
    recommender = load_model(small_model)
    ids = recommender.item_map.ids
    rng = random.Random(1)
    sessions = {
        f"s{k}": [
            ids[rng.randrange(60)] if rng.random() > 0.1 else f"new-{k}"
            for _ in range(rng.randint(1, 6))
        ]
        for k in range(60)
    }
    longest = max(len(items) for items in sessions.values())
    clicks = [
        Click(s, items[j], 1000.0 + j)
        for j in range(longest)
        for s, items in sessions.items()
        if j < len(items)
    ]
    web_port = free_port()
    names = StreamNames("metrics")
    prometheus = _Prometheus(binary, web_port, tmp_path)
    try:
        with WorkerProcess(
            kafka_bootstrap,
            small_model,
            names,
            tmp_path,
            "--web-port",
            str(web_port),
            "--web-host",
            "127.0.0.1",
        ) as worker:
            base = f"http://127.0.0.1:{web_port}"
            wait_for_http(base + "/readyz", lambda status, _: status == 200, worker, timeout=60)
            assert http_get(base + "/healthz")[0] == 200
            # --web-host 127.0.0.1: another address of this machine is not served
            assert not _accepts("127.0.0.2", web_port)
            # A first scrape before any click, so rates have a zero to start from.
            assert (
                prometheus.wait_value("streamrec_recommendations_published_total", 0, timeout=30)
                == 0
            ), prometheus.log.read_text()[-2000:]
            produce_clicks(kafka_bootstrap, names.clicks, clicks)
            produce_raw(kafka_bootstrap, names.clicks, [(b"s0", b"not json")])  # one reject
            messages = read_topic(
                kafka_bootstrap,
                names.recommendations,
                lambda ms: len(ms) >= len(clicks),
                timeout=60,
            )
            unique = {(m["source"]["partition"], m["source"]["offset"]): m for m in messages}
            assert len(unique) == len(clicks), worker.log()[-3000:]
            assert prometheus.wait_value(
                "streamrec_recommendations_published_total", len(messages)
            ) == len(messages)
            assert (
                prometheus.wait_value('streamrec_events_rejected_total{reason="not_json"}', 1) == 1
            )
            assert (
                prometheus.wait_value("streamrec_events_consumed_total", len(clicks) + 1)
                == len(clicks) + 1
            )
            q20 = online_quality(messages, 20, recommender.item_map)
            q5 = online_quality(messages, 5, recommender.item_map)
            v = recommender.version
            assert q20.n_predictions > 50 and q20.n_skipped_unknown > 0
            assert (
                prometheus.wait_value(
                    f'streamrec_online_predictions_total{{model_version="{v}"}}', q20.n_predictions
                )
                == q20.n_predictions
            )
            assert (
                prometheus.value(f'streamrec_online_skipped_unknown_total{{model_version="{v}"}}')
                == q20.n_skipped_unknown
            )
            assert prometheus.value('streamrec_online_hits_total{k="20"}') == q20.hits
            assert prometheus.value('streamrec_online_hits_total{k="5"}') == q5.hits
            assert prometheus.value("streamrec_online_reciprocal_rank_sum_total") == pytest.approx(
                q20.reciprocal_rank_sum
            )
            unknown = sum(1 for c in clicks if c.item_id not in recommender.item_map)
            assert prometheus.value("streamrec_unknown_items_total") == unknown
            assert prometheus.wait_value("streamrec_active_sessions", len(sessions)) == len(
                sessions
            )
            assert prometheus.wait_value("sum(streamrec_consumer_lag_messages)", 0) == 0
            assert len(prometheus.query("streamrec_consumer_lag_messages")) == 4
            assert prometheus.value("streamrec_ready") == 1
            assert prometheus.value(f'streamrec_model_info{{model_version="{v}"}}') == 1
            # Throughput, latency and quality as a dashboard computes them.
            assert prometheus.value("increase(streamrec_recommendations_published_total[1m])") > 0
            assert prometheus.value("streamrec_consume_to_publish_seconds_count") == len(messages)
            p99 = prometheus.value(
                "histogram_quantile(0.99, sum by (le) "
                "(streamrec_consume_to_publish_seconds_bucket))"
            )
            assert p99 is not None and 0 < p99 < 60
            recall = prometheus.value(
                'sum(streamrec_online_hits_total{k="20"}) / sum(streamrec_online_predictions_total)'
            )
            assert recall == pytest.approx(q20.recall)
            assert prometheus.value("faust_messages_received_total") >= len(clicks)
            # The dashboard's queries, rendered against this Prometheus, return data (all
            # but the trainer's panels: no trainer runs in this test). rate() needs two
            # scrapes of a series: allow a few seconds for the newest ones.
            deadline = time.monotonic() + 20
            for expr in dashboard_queries():
                if "streamrec_trainer_" in expr:
                    continue
                while not prometheus.query(expr) and time.monotonic() < deadline:
                    time.sleep(0.5)
                assert prometheus.query(expr), f"no data for dashboard query {expr!r}"
        assert worker.process.returncode == 0, worker.log()[-2000:]
    finally:
        prometheus.stop()


def test_trainer_metrics_follow_its_decisions():
    trainer = TrainerMetrics()
    trainer.record({"decision": "wait", "buffered": 10})
    trainer.record(
        {
            "decision": "promoted",
            "buffered": 3,
            "train_seconds": 4.5,
            "final_loss": 5.25,
            "gate": {"candidate_recall": 0.61, "current_recall": 0.55},
        }
    )
    text = generate_latest(trainer.registry).decode()
    values = _samples(text)
    names = {re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", k).group(0) for k in values}
    assert observability.exported_names(observability.TRAINER_METRICS) <= names
    assert values['streamrec_trainer_rounds_total{decision="promoted"}'] == 1
    assert values['streamrec_trainer_rounds_total{decision="wait"}'] == 1
    assert values["streamrec_trainer_buffered_sessions"] == 3
    assert values["streamrec_trainer_training_loss"] == 5.25
    assert values['streamrec_trainer_gate_recall{model="candidate"}'] == 0.61
    assert values["streamrec_trainer_retrain_seconds_count"] == 1

    server = observability.serve(trainer.app(), 0, "127.0.0.1")
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        assert http_get(base + "/readyz")[0] == 503
        trainer.not_ready_reason = None
        assert http_get(base + "/readyz") == (200, "ok\n")
        trainer.heartbeat -= observability.STALL_S + 1
        assert http_get(base + "/healthz")[0] == 503
        trainer.training = True  # a long round is not a stall
        assert http_get(base + "/healthz") == (200, "training\n")
        assert "streamrec_trainer_rounds_total" in http_get(base + "/metrics")[1]
    finally:
        server.shutdown()
        server.server_close()


def test_faust_numbers_are_read_from_its_monitor_at_scrape(tmp_path) -> None:
    import faust

    app = faust.App(
        "faust-numbers", broker="kafka://127.0.0.1:1", datadir=str(tmp_path), autodiscover=False
    )
    registry = CollectorRegistry()
    registry.register(metrics._FaustCollector(app))
    values = _samples(generate_latest(registry).decode())
    assert values["faust_messages_received_total"] == 0
    assert "faust_commit_latency_seconds" not in values  # no commit yet
    app.monitor.messages_received_total = 7
    app.monitor.events_total = 5
    app.monitor.commit_latency.extend([0.010, 0.030, 0.020])
    values = _samples(generate_latest(registry).decode())
    assert values["faust_messages_received_total"] == 7
    assert values["faust_events_total"] == 5
    assert values["faust_commit_latency_seconds"] == pytest.approx(0.020)
    assert set(values) == observability.exported_names(observability.FAUST_METRICS)


def _accepts(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        return False
    return True


def _checks_app() -> object:
    return observability.wsgi_app(
        CollectorRegistry(), lambda: (True, "alive"), lambda: (True, "ready")
    )


def test_the_http_server_binds_the_host_it_is_given() -> None:
    everywhere, loopback = free_port(), free_port()
    servers = [
        observability.serve(_checks_app(), everywhere, "0.0.0.0"),  # type: ignore[arg-type]
        observability.serve(_checks_app(), loopback, "127.0.0.1"),  # type: ignore[arg-type]
    ]
    try:
        assert _accepts("127.0.0.2", everywhere) and _accepts("127.0.0.1", everywhere)
        assert _accepts("127.0.0.1", loopback) and not _accepts("127.0.0.2", loopback)
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


def test_idle_connections_hold_a_bounded_number_of_threads_and_only_briefly() -> None:
    """Clients that connect and send nothing got a thread each, for as long as they
    liked: now at most ``max_requests`` are served at once, each for at most the request
    timeout, and a probe behind them is answered once they time out."""
    port = free_port()
    before = threading.active_count()
    server = observability.serve(
        _checks_app(),  # type: ignore[arg-type]
        port,
        "127.0.0.1",
        max_requests=4,
        request_timeout_s=0.5,
    )
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(8)]
    try:
        most = 0
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and most < 8:
            most = max(most, threading.active_count() - before - 1)  # minus the accept loop
            time.sleep(0.01)
        assert most <= 4
        started = time.monotonic()
        assert http_get(f"http://127.0.0.1:{port}/healthz") == (200, "alive\n")
        assert time.monotonic() - started < 5.0
    finally:
        for connection in idle:
            connection.close()
        server.shutdown()
        server.server_close()


@pytest.mark.kafka
def test_the_first_click_after_a_restart_is_not_judged(
    kafka_bootstrap: str, small_model: Path, tmp_path: Path
) -> None:
    """Online quality judges a list by the session's next click, and the lists live in
    the worker's memory: after a restart, each session's first click has nothing to judge
    (the README says so), and its second click is judged as usual."""
    from model.artifact import load_model
    from stream.devtools.testing import StreamNames, WorkerProcess, produce_clicks, read_topic

    ids = load_model(small_model, device="cpu").item_map.ids
    waves = [
        [Click(f"s{k}", ids[(k + 3 * w) % 50], 1000.0 + 10 * w + k) for k in range(20)]
        for w in range(3)
    ]
    names = StreamNames("restart-quality")

    def judged(port: int) -> float:
        text = http_get(f"http://127.0.0.1:{port}/metrics")[1]
        return sum(
            value
            for name, value in _samples(text).items()
            if name.startswith(
                ("streamrec_online_predictions_total", "streamrec_online_skipped_unknown_total")
            )
        )

    def answered(count: int) -> None:
        read_topic(kafka_bootstrap, names.recommendations, lambda ms: len(ms) >= count, timeout=60)

    first_port, second_port = free_port(), free_port()
    with WorkerProcess(
        kafka_bootstrap, small_model, names, tmp_path, "--web-port", str(first_port)
    ):
        produce_clicks(kafka_bootstrap, names.clicks, waves[0])
        answered(20)
        produce_clicks(kafka_bootstrap, names.clicks, waves[1])
        answered(40)
        deadline = time.monotonic() + 20
        while judged(first_port) < 20:  # before a restart: every second click is judged
            assert time.monotonic() < deadline
            time.sleep(0.3)
    with WorkerProcess(
        kafka_bootstrap, small_model, names, tmp_path, "--web-port", str(second_port)
    ):
        produce_clicks(kafka_bootstrap, names.clicks, waves[2])
        answered(60)
        assert judged(second_port) == 0  # the lists before the restart are gone
        produce_clicks(kafka_bootstrap, names.clicks, waves[0])  # a fourth click each
        answered(80)
        deadline = time.monotonic() + 20
        while judged(second_port) < 20:
            assert time.monotonic() < deadline, judged(second_port)
            time.sleep(0.3)
        assert judged(second_port) == 20
