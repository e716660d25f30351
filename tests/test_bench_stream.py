"""``streamrec bench stream``: a tiny run end to end, and the JSON it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def bench_stream(bootstrap: str, *args: str) -> dict:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "stream.cli.main",
            "bench",
            "stream",
            "--broker",
            f"kafka://{bootstrap}",
            *args,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.kafka
def test_tiny_stream_bench_reports_every_figure(kafka_bootstrap: str) -> None:
    figures = bench_stream(
        kafka_bootstrap, "--items", "300", "--events", "600", "--unavailable", "0.1"
    )
    assert figures["noop_events_per_s"] > 0 and figures["events_per_run"] == 600
    assert figures["cores"] >= 1
    [run] = figures["runs"]
    assert run["items"] == 300
    for key in ("events_per_s", "ceiling_events_per_s", "p50_ms", "p99_ms", "p99_ms_at_1000_per_s"):
        assert run[key] > 0, key
    assert run["p50_ms"] <= run["p99_ms"] == run["p99_ms_at_1000_per_s"]
    assert run["ratio"] == pytest.approx(
        run["events_per_s"] / min(run["ceiling_events_per_s"], figures["noop_events_per_s"])
    )
    # CPU accounting (Linux /proc): a worker spends some CPU on every click, and no
    # machine is busier than its cores.
    for per_event, busy in (
        (run["worker_cpu_us_per_event"], run["machine_busy_cores"]),
        (figures["noop_cpu_us_per_event"], figures["noop_machine_busy_cores"]),
    ):
        assert per_event > 0
        assert 0 < busy <= figures["cores"] + 0.2
    # Exact ranking serves exactly the exact top-20 (the replay here agrees with the worker),
    # both leaving out the same unavailable tenth of the catalogue.
    assert run["ranking"] == "exact" and run["recall_vs_exact@20"] == 1.0
    assert run["unavailable_items"] == 30 and run["availability_changes"] > 0
    assert run["availability_delay_p99_ms_at_most"] <= 1000
    assert run["index_build_seconds"] is None  # no index below 10,000 items
    assert run["worker_peak_rss_mib"] > 100


@pytest.mark.kafka
def test_approximate_ranking_is_measured_against_exact(kafka_bootstrap: str) -> None:
    figures = bench_stream(
        kafka_bootstrap, "--items", "12000", "--events", "600", "--ranking", "approximate"
    )
    [run] = figures["runs"]
    assert run["ranking"].startswith("approximate") and run["index_build_seconds"] > 0
    assert 0 < run["recall_vs_exact@20"] <= 1
