"""Which sessions an expiry marker deletes (the worker's end-to-end expiry test, with
changelog tombstones on a real broker, is in test_stream_worker)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from stream.serving.expiry import EXPIRY_DELETES_PER_MARKER
from stream.serving.processor import ClickProcessor
from stream.serving.settings import WorkerSettings
from stream.serving.state import SessionState


class Marker:
    """An expiry-topic event as the agent sees it (weak-referenceable, like Faust's)."""

    def __init__(self, partition: int, before: float) -> None:
        self.message = type(
            "Message",
            (),
            {"partition": partition, "value": json.dumps({"before": before}).encode()},
        )


def session(partition: int, last_time: float) -> bytes:
    return SessionState(
        hidden=np.zeros(4, np.float32),
        recent_items=("a",),
        last_offset=1,
        last_time=last_time,
        started=True,
        model_version="v",
        partition=partition,
    ).encode()


def processor_with(tmp_path: Path, table: dict[bytes, bytes]) -> ClickProcessor:
    (tmp_path / "model").mkdir(exist_ok=True)
    settings = WorkerSettings(model=str(tmp_path / "model"), session_timeout_s=60.0)
    return ClickProcessor(settings, None, table, None, None)  # type: ignore[arg-type]


def test_a_late_marker_expires_what_the_clicks_applied_since_make_idle(tmp_path: Path) -> None:
    """Under a backlog the marker arrives long after it was sent: the clicks applied
    meanwhile (event time 2000 on its partition) decide, not its stale cut-off."""
    table = {
        b"idle": session(0, 1000.0),
        b"recent": session(0, 1950.0),
        b"elsewhere": session(1, 0.0),
    }
    processor = processor_with(tmp_path, table)
    processor.expiry.watermarks.advance(0, 2000.0)
    processor.expiry.on_marker(Marker(partition=0, before=900.0))
    assert set(table) == {b"recent", b"elsewhere"}  # other partitions wait for their marker
    assert processor.counters.expired == 1


def test_without_applied_clicks_the_marker_cut_off_applies(tmp_path: Path) -> None:
    """E.g. right after a restart, before any click of the partition was applied."""
    table = {b"idle": session(0, 1000.0), b"recent": session(0, 1950.0)}
    processor = processor_with(tmp_path, table)
    processor.expiry.on_marker(Marker(partition=0, before=1960.0))
    assert table == {} and processor.counters.expired == 2


def test_a_large_pass_is_spread_over_batches_and_spares_sessions_that_clicked(
    tmp_path: Path,
) -> None:
    """Thousands of tombstones in one step would hold every click behind them: a marker
    deletes EXPIRY_DELETES_PER_MARKER sessions, each following batch as many more as
    its budget; one that clicked meanwhile (its state written, hence touched) survives."""
    n = 2 * EXPIRY_DELETES_PER_MARKER + 10
    table = {f"s{i:04d}".encode(): session(0, float(i)) for i in range(n)}
    processor = processor_with(tmp_path, table)
    processor.expiry.on_marker(Marker(partition=0, before=10_000.0))
    assert len(table) == n - EXPIRY_DELETES_PER_MARKER
    survivor = max(table)  # deleted last: clicks before its turn
    table[survivor] = session(0, 20_000.0)
    processor.expiry.idle.touch(0, survivor, 20_000.0)
    processor.expiry.delete_idle(EXPIRY_DELETES_PER_MARKER)
    assert len(table) == n - 2 * EXPIRY_DELETES_PER_MARKER
    processor.expiry.delete_idle(5)  # a batch of 5 clicks deletes at most 5
    assert len(table) == 5
    processor.expiry.delete_idle(100)
    assert set(table) == {survivor}
    assert processor.counters.expired == n - 1


def test_a_rebalance_drops_pending_deletes(tmp_path: Path) -> None:
    """Sessions of a partition revoked meanwhile belong to another worker now."""
    table = {f"s{i:04d}".encode(): session(0, 1.0) for i in range(EXPIRY_DELETES_PER_MARKER + 5)}
    processor = processor_with(tmp_path, table)
    processor.expiry.on_marker(Marker(partition=0, before=10.0))
    processor.on_rebalance(object(), set())
    processor.expiry.delete_idle(EXPIRY_DELETES_PER_MARKER)
    assert len(table) == 5
