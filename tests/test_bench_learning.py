"""``streamrec bench drift`` end to end on a tiny configuration (worker, trainer, broker),
and its synthetic phase B."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from model.artifact import load_model
from model.data import ClickLog
from model.errors import UserError
from model.synth import SynthSpec, generate, write_clicks
from stream.bench.learning import _drift_data, _retimed, run_drift

REPO = Path(__file__).resolve().parents[1]


def drift_args(**changes: object) -> argparse.Namespace:
    values: dict[str, object] = dict(
        items=50,
        train_sessions=300,
        a_sessions=200,
        b_sessions=900,
        rate=400.0,
        speed=120.0,
        seed=0,
        base_model=None,
        base_data=None,
    )
    return argparse.Namespace(**{**values, **changes})


def test_phase_b_is_sent_at_the_rate_throughout_not_in_a_burst() -> None:
    """Sessions starting at the generator's fixed rate put most of phase B's clicks into
    its first seconds (5-8x the nominal rate at the default size); retimed, every second
    of phase B carries about ``--rate`` clicks."""
    args = drift_args(b_sessions=3000, rate=500.0)
    data = _drift_data(args)
    times = np.array([c.timestamp for c in data["phase_b"]])
    wall = (times - times[0]) / data["b_speed"]
    assert wall[-1] == pytest.approx(len(times) / args.rate, rel=0.01)
    per_second = np.histogram(wall, bins=np.arange(0, np.floor(wall[-1]) + 1))[0]
    assert per_second[1:].min() > 0.75 * args.rate and per_second.max() < 1.25 * args.rate
    # A' ends where B starts, so its clicks never carry event times inside phase B.
    assert max(c.timestamp for c in data["a_prime"]) < times[0]
    assert data["new_items"] and data["b_sessions"] <= data["phase_b_sessions"]


def test_a_base_model_is_served_its_own_traffic_and_phase_b_brings_items_it_lacks(
    small_model: Path, tmp_path: Path
) -> None:
    """With ``--base-model`` nothing is trained: A' is the earliest sessions of
    ``--base-data``, the A traffic in B the next ones, and B's items are numbered past
    every item of the model (the million-item variant serves a model trained elsewhere)."""
    known_log = generate(SynthSpec(sessions=700, items=200, seed=9))
    write_clicks(known_log, tmp_path / "known.tsv")
    args = drift_args(base_model=str(small_model), base_data=str(tmp_path / "known.tsv"), items=40)
    data = _drift_data(args)
    model_items = set(load_model(small_model).item_map.ids)
    assert len(data["a_train"]) == 0
    assert len(data["new_items"]) > 10 and not data["new_items"] & model_items
    a_clicks = data["a_prime"] + [c for c in data["phase_b"] if c.session_id.startswith("a")]
    assert {c.item_id for c in a_clicks} <= set(known_log.item_ids.astype(str))
    starts: dict[str, float] = {}
    for session, time in zip(known_log.session_ids[known_log.sessions], known_log.times):
        starts.setdefault(f"a{session}", time)
    earliest = sorted(starts, key=starts.__getitem__)[: args.a_sessions]
    a_prime_sessions = {c.session_id for c in data["a_prime"]}
    assert a_prime_sessions <= set(earliest) and len(a_prime_sessions) > 0.9 * args.a_sessions


def test_base_model_options_are_refused_alone_or_with_too_few_sessions(
    small_model: Path, tmp_path: Path
) -> None:
    with pytest.raises(UserError, match="go together"):
        run_drift(drift_args(base_model=str(small_model)))
    write_clicks(generate(SynthSpec(sessions=100, items=200, seed=9)), tmp_path / "few.tsv")
    with pytest.raises(UserError, match="100 sessions"):
        _drift_data(drift_args(base_model=str(small_model), base_data=str(tmp_path / "few.tsv")))


def test_retimed_sessions_keep_their_gaps_and_stay_inside_the_window() -> None:
    log = ClickLog.from_arrays(
        ["a", "a", "a", "b", "b"], ["1", "2", "3", "4", "5"], [0.0, 10.0, 500.0, 5.0, 6.0]
    )
    moved = _retimed(log, 1000.0, 100.0, np.random.default_rng(0))
    offsets = moved.session_offsets()
    by_session = {
        moved.session_ids[moved.sessions[offsets[k]]]: moved.times[offsets[k] : offsets[k + 1]]
        for k in range(len(offsets) - 1)
    }
    assert (moved.times >= 1000.0).all() and (moved.times < 1100.0).all()
    assert np.diff(by_session["b"]).tolist() == pytest.approx([1.0])
    assert len(by_session["a"]) == 2  # its click 490 s after the first is past the window
    assert np.diff(by_session["a"]).tolist() == pytest.approx([10.0])


@pytest.mark.kafka
def test_tiny_drift_bench_runs_end_to_end(kafka_bootstrap: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "stream.cli.main",
            "bench",
            "drift",
            "--broker",
            f"kafka://{kafka_bootstrap}",
            "--items",
            "50",
            "--train-sessions",
            "300",
            "--a-sessions",
            "200",
            "--b-sessions",
            "900",
            "--rate",
            "400",
            "--initial-epochs",
            "1",
            "--epochs",
            "1",
            "--interval",
            "2",
            "--min-sessions",
            "60",
            "--holdout-sessions",
            "30",
            "--replay-sample",
            "300",
            "--work-dir",
            str(tmp_path / "work"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    for key in (
        "recall@20_with_retraining",
        "recall@20_without_retraining",
        "new_items_first_recommended_after_s",
        "retrain_seconds",
        "max_swap_gap_ms",
        "retrain_interval_s",
        "new_items_timeline",
        "swap_windows",
    ):
        assert key in figures
    assert (
        figures["answered"]
        == figures["answered_without"]
        == figures["a_prime_events"] + figures["phase_b_events"]
    )
    assert 0.0 <= figures["recall@20_without_retraining"] <= 1.0
    assert figures["retrain_interval_s"] == 2.0
    assert figures["phase_b_sent_events_per_s"] == pytest.approx(400, rel=0.2)
    for name in ("observations-on.jsonl", "observations-off.jsonl"):
        assert (tmp_path / "work" / name).stat().st_size > 0
    # Learning while serving happened: a round learnt new items, was promoted, and the
    # worker recommended one of them. Without that, nothing below would be measured.
    assert figures["promotions"] >= 1, figures["new_items_timeline"]["rounds"]
    after = figures["new_items_first_recommended_after_s"]
    assert not math.isnan(after), "no answer recommended a new item"
    timeline = figures["new_items_timeline"]
    # the first new item is clicked (0), a round learns it and publishes, the worker
    # serves that version, and an answer recommends a new item: in that order
    assert timeline["first_recommended_after_s"] == after > 0
    # (published_at is taken after the announcement, which a worker may not wait for)
    assert (
        timeline["round_started_after_s"]
        < timeline["published_after_s"]
        <= timeline["first_served_after_s"] + 0.5
    )
    assert timeline["first_served_after_s"] <= after + 0.01
    assert timeline["round_seconds"] > 0
    assert figures["new_items_worst_phase_after_s"] == pytest.approx(
        2.0 + after - timeline["round_started_after_s"]
    )
    assert figures["swaps"] >= 1 and figures["swap_windows"]
    for window in figures["swap_windows"]:
        assert window["boundary_gap_ms"] <= window["max_gap_ms"]
