"""Which sessions an expiry marker deletes (the worker's end-to-end expiry test, with
changelog tombstones on a real broker, is in test_stream_worker)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from stream.event_time import PartitionWatermarks
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
    meanwhile (event time ~2000 on its partition) decide, not its stale cut-off."""
    table = {
        b"idle": session(0, 1000.0),
        b"recent": session(0, 1950.0),
        b"elsewhere": session(1, 0.0),
    }
    processor = processor_with(tmp_path, table)
    for t in range(1900, 2001):  # the partition's clicks reached event time ~2000
        processor.expiry.watermarks.advance(0, float(t))
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


def test_a_few_clicks_far_ahead_do_not_move_the_watermark() -> None:
    """Clicks up to a day ahead are valid; a producer with a wrong clock must not make
    the partition's event time jump to its clock (every live session would expire)."""
    watermarks = PartitionWatermarks()
    for t in range(1000, 1300):
        watermarks.advance(0, float(t))
    before = watermarks[0]
    assert 1250.0 <= before <= 1299.0  # it follows the partition's clicks
    for k in range(3):
        watermarks.advance(0, 1299.0 + 23 * 3600 + k)
        watermarks.advance(0, 1300.0 + k)
    assert before <= watermarks[0] <= 1302.0
    assert watermarks.cutoffs(60.0)[0] == watermarks[0] - 60.0
    assert not watermarks.is_over(0, 1250.0, 60.0)


def test_a_partition_s_event_time_is_unknown_until_enough_clicks_agree() -> None:
    """One click alone cannot be told from an outlier: until enough clicks were read on
    a partition, it ends no session and gets no expiry marker."""
    watermarks = PartitionWatermarks()
    watermarks.advance(3, 1e9)
    assert watermarks[3] == -math.inf and watermarks.cutoffs(60.0) == {}
    for t in range(1000, 1100):
        watermarks.advance(3, float(t))
    assert 1050.0 <= watermarks[3] < 1100.0


def test_a_click_far_ahead_makes_the_next_marker_delete_nothing(tmp_path: Path) -> None:
    now = 1_700_000_000.0
    table = {f"live{k}".encode(): session(0, now - 10 * k) for k in range(5)}
    processor = processor_with(tmp_path, table)
    for k in range(100):
        processor.expiry.watermarks.advance(0, now - 100 + k)
    processor.expiry.watermarks.advance(0, now + 23 * 3600)
    (before,) = processor.expiry.markers().values()
    processor.expiry.on_marker(Marker(partition=0, before=before))
    assert len(table) == 5 and processor.counters.expired == 0
