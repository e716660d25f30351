"""``streamrec bench soak``: the session stream it generates, and a tiny run end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from model.synth import SynthSpec, generate
from stream.bench.soak import session_batches

REPO = Path(__file__).resolve().parents[1]


def test_session_batches_are_in_event_time_order_and_complete() -> None:
    batches = list(session_batches(3000, 100, seed=1, sessions_per_s=5.0, chunk=700))
    sessions, items, times = (np.concatenate(parts) for parts in zip(*batches))
    assert len(batches) == 5
    assert np.all(np.diff(times) >= 0)
    assert set(np.unique(sessions)) == set(range(3000))
    assert items.min() >= 0 and items.max() < 100
    # Each chunk is one synth log: same events, session indexes shifted by the chunk start.
    first = generate(SynthSpec(sessions=700, items=100, seed=100_003, sessions_per_s=5.0))
    in_first = sessions < 700
    assert in_first.sum() == len(first)
    for session in (0, 1, 699):
        mine = times[sessions == session]
        theirs = first.times[first.sessions == session]
        assert np.array_equal(mine, theirs)  # all clicks, in the session's order
        assert np.array_equal(items[sessions == session], first.items[first.sessions == session])


@pytest.mark.kafka
def test_tiny_soak_bench_bounds_the_table_by_expiry(kafka_bootstrap: str) -> None:
    # Paced below the worker's speed, so expiry markers are not queued behind a backlog;
    # 2,000 sessions start one per event-time second and expire after 30 s idle.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "stream.cli.main",
            "bench",
            "soak",
            "--broker",
            f"kafka://{kafka_bootstrap}",
            "--sessions",
            "2000",
            "--items",
            "200",
            "--session-timeout-s",
            "30",
            "--expiry-interval-s",
            "0.5",
            "--sessions-per-s",
            "1",
            "--rate",
            "300",
            "--sample-s",
            "0.5",
            "--max-samples",
            "10",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    for key in (
        "sessions",
        "events",
        "seconds",
        "events_per_s",
        "rss_growth_after_warmup_mib",
        "max_lag",
        "lag_at_end_of_production",
        "throughput_first_quarter_per_s",
        "throughput_last_quarter_per_s",
        "max_active_sessions",
        "max_changelog_live_keys",
        "changelog_records_at_end",
    ):
        assert isinstance(figures[key], (int, float)), key
    assert set(figures["rss_mib"]) == {"first", "max", "last"}
    assert 0 < figures["rss_mib"]["first"] <= figures["rss_mib"]["max"]
    assert figures["sessions"] == 2000 and figures["events"] > 2000
    assert 1 <= len(figures["samples"]) <= 10
    assert set(figures["samples"][0]) >= {
        "t",
        "rss_mib",
        "lag",
        "active_sessions",
        "window_events_per_s",
    }
    assert figures["samples"][-1]["answered"] == figures["events"]
    # Expiry bounded the table and the changelog's live keys far below the sessions sent.
    assert figures["expired_sessions"] > 1000
    assert 0 < figures["max_active_sessions"] < 2000 / 2
    assert figures["max_changelog_live_keys"] < 2000 / 2
    assert figures["changelog_records_at_end"] >= figures["events"]  # states + tombstones
