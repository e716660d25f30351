"""The deployment files: compose file, Prometheus config and rules, Grafana dashboard.

Every metric name used in a dashboard or alert expression must be one a worker exports
(stream.serving.metrics), so a renamed metric cannot silently empty a panel or disable an alert.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from stream.observability import exported_names

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
# Names Prometheus itself provides.
BUILTIN = {"up"}


def _metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords,
    label names, label values, durations or grouping labels."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges, subqueries
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\boffset\s+\w+", "", expr)
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        rest = expr[match.end() :].lstrip()
        word = match.group(0)
        if rest.startswith("(") or word in {
            "and",
            "or",
            "unless",
            "bool",
            "by",
            "without",
            "on",
            "ignoring",
            "offset",
            "inf",
            "nan",
        }:
            continue
        if re.fullmatch(r"\d+[smhdwy]", word):
            continue
        names.add(word)
    return names


def test_metric_name_parser():
    assert _metric_names(
        'sum by (model_version) (rate(a_total{k="20"}[5m])) / '
        'sum(rate(b_total[1d] offset 1h)) > 0.8 and up{job="x"} == 0'
    ) == {"a_total", "b_total", "up"}
    assert _metric_names("histogram_quantile(0.99, sum by (le) (rate(h_bucket[1m])))") == {
        "h_bucket"
    }


def _dashboard_exprs() -> list[str]:
    exprs = []
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            exprs += [t["expr"] for t in panel.get("targets", []) if t.get("expr")]
    return exprs


def _alert_exprs() -> list[str]:
    yaml = pytest.importorskip("yaml")
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def _assert_known(exprs: list[str]) -> None:
    assert exprs
    known = exported_names() | BUILTIN
    for expr in exprs:
        names = _metric_names(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= known, f"{sorted(names - known)} not exported (in {expr!r})"


def test_dashboard_uses_only_exported_metrics():
    assert DASHBOARDS
    _assert_known(_dashboard_exprs())


def test_alerts_use_only_exported_metrics():
    _assert_known(_alert_exprs())


def test_dashboard_covers_the_operations_view():
    text = " ".join(_dashboard_exprs())
    for needed in (
        "streamrec_recommendations_published_total",
        "histogram_quantile(0.99",
        "streamrec_consumer_lag_messages",
        'streamrec_online_hits_total{k="20"}',
        "streamrec_online_reciprocal_rank_sum_total",
        "streamrec_active_sessions",
        "streamrec_model_age_seconds",
        "streamrec_model_swaps_total",
    ):
        assert needed in text, needed


@pytest.mark.parametrize("check,path", [("config", "prometheus.yml"), ("rules", "alerts.yml")])
def test_promtool(check, path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (make system-deps installs prometheus)")
    result = subprocess.run(
        [promtool, "check", check, str(DEPLOY / "prometheus" / path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_file_parses_and_references_existing_files():
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {
        "kafka",
        "topic-init",
        "worker-1",
        "worker-2",
        "trainer",
        "prometheus",
        "grafana",
        "replay",
    } <= set(services)
    assert services["replay"]["profiles"] == ["replay"]
    for name, service in services.items():
        build = service.get("build")
        if build:
            context = REPO / build["context"]
            assert context.is_dir(), name
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), name
        for dependency in service.get("depends_on", {}):
            assert dependency in services, (name, dependency)
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith((".", "/")) and source != "./data":  # ./data: user's logs
                assert (REPO / source).exists(), (name, source)
            elif not source.startswith((".", "/")):
                assert source in compose.get("volumes", {}), (name, source)
    # Workers scraped by Prometheus are the compose workers, on their web port.
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {
        t
        for job in prometheus["scrape_configs"]
        if job["job_name"] == "streamrec-worker"
        for c in job["static_configs"]
        for t in c["targets"]
    }
    assert targets == {"worker-1:6066", "worker-2:6066"}
    assert services["worker-1"]["environment"]["STREAMREC_WEB_PORT"] == "6066"


def test_topic_init_creates_every_worker_topic():
    yaml = pytest.importorskip("yaml")
    from stream.serving.settings import WorkerSettings
    from stream.serving.topics import worker_topics

    script = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["topic-init"][
        "command"
    ][0]
    settings = WorkerSettings(model=str(REPO))  # defaults: app id "streamrec"
    for topic, (_, config) in worker_topics(settings).items():
        assert re.search(rf"(?<![\w-]){re.escape(topic)}(?![\w-])", script), topic
        for key, value in config.items():
            assert f"--config {key}={value}" in script, (topic, key)


def test_dockerfile_runs_as_non_root_and_installs_pinned_versions():
    text = (DEPLOY / "Dockerfile").read_text()
    assert text.count("FROM ") >= 2
    assert re.search(r"^USER (?!root)\S+", text, re.M)
    assert "-c constraints.txt" in text
    for copied in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for source in copied.split():
            assert (REPO / source).exists(), source


def image_drops(text: str) -> list[str]:
    """The paths the Dockerfile's build stage deletes from its copy of the source tree."""
    return [path for line in re.findall(r"^RUN rm -rf (.+)$", text, re.M) for path in line.split()]


def test_dockerfile_image_holds_the_runtime_only():
    """model/ and stream/ are copied and installed without extras, less the development
    tools; what is dropped must exist, or a rename would silently ship it again.
    (tests/test_packaging.py installs the same tree and runs `streamrec --help` in it.)"""
    text = (DEPLOY / "Dockerfile").read_text()
    copied = {
        source
        for line in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M)
        for source in line.split()
    }
    assert {"pyproject.toml", "README.md", "model", "stream"} <= copied
    dropped = image_drops(text)
    assert {"stream/bench", "stream/devtools", "stream/cli/demo.py"} <= set(dropped)
    for path in dropped:
        assert path.startswith(("model/", "stream/")) and (REPO / path).exists(), path
    drop_at, install_at = text.index("RUN rm -rf "), text.index("RUN pip install -c ")
    assert drop_at < install_at
    install = text[install_at:].splitlines()[0]
    assert "pip install -c constraints.txt . " in install  # no [extras]
    assert "streamrec --help" in install
