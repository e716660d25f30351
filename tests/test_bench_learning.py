"""``streamrec bench drift`` end to end on a tiny configuration (worker, trainer, broker)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.kafka
def test_tiny_drift_bench_runs_end_to_end(kafka_bootstrap: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "stream.cli", "bench", "drift", "--broker",
         f"kafka://{kafka_bootstrap}", "--items", "50", "--train-sessions", "300",
         "--a-sessions", "200", "--b-sessions", "900", "--rate", "400",
         "--initial-epochs", "1", "--epochs", "1", "--interval", "2",
         "--min-sessions", "60", "--holdout-sessions", "30", "--replay-sample", "300"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("recall@20_with_retraining", "recall@20_without_retraining",
                "new_items_first_recommended_after_s", "retrain_seconds", "max_swap_gap_ms"):
        assert key in figures
    assert figures["answered"] == figures["answered_without"] \
        == figures["a_prime_events"] + figures["phase_b_events"]
    assert 0.0 <= figures["recall@20_without_retraining"] <= 1.0
    if figures["promotions"] and not math.isnan(figures["new_items_first_recommended_after_s"]):
        assert figures["new_items_first_recommended_after_s"] > 0
