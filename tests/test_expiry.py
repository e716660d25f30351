"""Which sessions an expiry marker deletes (the worker's end-to-end expiry test, with
changelog tombstones on a real broker, is in test_stream_worker)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from stream.app import ClickProcessor
from stream.settings import WorkerSettings
from stream.state import SessionState


class Marker:
    """An expiry-topic event as the agent sees it (weak-referenceable, like Faust's)."""

    def __init__(self, partition: int, before: float) -> None:
        self.message = type("Message", (), {"partition": partition,
                                            "value": json.dumps({"before": before}).encode()})


def session(partition: int, last_time: float) -> bytes:
    return SessionState(hidden=np.zeros(4, np.float32), recent_items=("a",), last_offset=1,
                        last_time=last_time, started=True, model_version="v",
                        partition=partition).encode()


def processor_with(tmp_path: Path, table: dict[bytes, bytes]) -> ClickProcessor:
    (tmp_path / "model").mkdir(exist_ok=True)
    settings = WorkerSettings(model=str(tmp_path / "model"), session_timeout_s=60.0)
    return ClickProcessor(settings, None, table, None, None)  # type: ignore[arg-type]


def test_a_late_marker_expires_what_the_clicks_applied_since_make_idle(tmp_path: Path) -> None:
    """Under a backlog the marker arrives long after it was sent: the clicks applied
    meanwhile (event time 2000 on its partition) decide, not its stale cut-off."""
    table = {b"idle": session(0, 1000.0), b"recent": session(0, 1950.0),
             b"elsewhere": session(1, 0.0)}
    processor = processor_with(tmp_path, table)
    processor.watermarks[0] = 2000.0
    processor._expire(Marker(partition=0, before=900.0))
    assert set(table) == {b"recent", b"elsewhere"}  # other partitions wait for their marker
    assert processor.counters.expired == 1


def test_without_applied_clicks_the_marker_cut_off_applies(tmp_path: Path) -> None:
    """E.g. right after a restart, before any click of the partition was applied."""
    table = {b"idle": session(0, 1000.0), b"recent": session(0, 1950.0)}
    processor = processor_with(tmp_path, table)
    processor._expire(Marker(partition=0, before=1960.0))
    assert table == {} and processor.counters.expired == 2
