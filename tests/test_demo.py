"""`make demo`'s job end to end, as the README's first command runs it: `streamrec demo`
on the embedded broker (Tansu), its JSON summary checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_the_demo_answers_every_click_and_the_stream_equals_offline(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "stream.cli.main", "demo"],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # from any directory, as a user might
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["engine"] == "tansu" and summary["worker_exit_code"] == 0
    assert summary["events"] > 1000 and summary["n_predictions"] > 1000
    # (it fails unless every click is answered); the published lists, judged by each
    # session's next click, equal the offline evaluation of the same sessions
    assert summary["online_recall@20"] == pytest.approx(summary["offline_recall@20"], abs=1e-9)
    assert summary["online_mrr@20"] == pytest.approx(summary["offline_mrr@20"], abs=1e-9)
    assert summary["offline_recall@20"] > 0.5  # the synthetic sessions are learnable
    assert 0 < summary["click_to_answer_p50_ms"] <= summary["click_to_answer_p99_ms"]
