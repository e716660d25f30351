"""``streamrec bench stream``: a tiny run end to end, and the JSON it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.kafka
def test_tiny_stream_bench_reports_every_figure(kafka_bootstrap: str) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "stream.cli.main",
            "bench",
            "stream",
            "--broker",
            f"kafka://{kafka_bootstrap}",
            "--items",
            "300",
            "--events",
            "600",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
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
