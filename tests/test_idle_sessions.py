"""IdleSessions: expiry's index of last event times, and why it is rebuilt at rebalances."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from stream.bench.serving import untrained_model
from stream.serving.app import create_app
from stream.serving.expiry import IdleSessions
from stream.serving.settings import WorkerSettings
from stream.serving.state import SessionState


def state(partition: int, last_time: float) -> bytes:
    return SessionState(
        hidden=np.zeros(2, np.float32),
        recent_items=("i",),
        last_offset=0,
        last_time=last_time,
        started=True,
        model_version="v",
        partition=partition,
    ).encode()


def test_first_query_scans_the_table_then_writes_keep_it_current() -> None:
    table = {b"old": state(0, 100.0), b"new": state(0, 900.0), b"other": state(1, 0.0)}
    idle = IdleSessions()
    assert idle.idle_before(0, 500.0, table) == [b"old"]
    table[b"old"] = state(0, 950.0)  # the worker writes a newer state ...
    idle.touch(0, b"old", 950.0)  # ... and tells the index
    table[b"late"] = state(0, 10.0)
    idle.touch(0, b"late", 10.0)
    assert sorted(idle.idle_before(0, 920.0, table)) == [b"late", b"new"]
    assert idle.idle_before(1, 1.0, table) == [b"other"]  # partitions are separate


def test_forgotten_sessions_are_not_returned_again() -> None:
    table = {b"a": state(2, 1.0), b"b": state(2, 2.0)}
    idle = IdleSessions()
    doomed = idle.idle_before(2, 10.0, table)
    for key in doomed:
        del table[key]
    idle.forget(2, doomed)
    assert idle.idle_before(2, 10.0, table) == []


def test_sessions_recovered_from_the_changelog_are_seen_after_a_rebalance() -> None:
    """Recovery fills the table behind the worker's back: the index only learns of
    those sessions by the rescan that a rebalance's invalidate() forces."""
    table = {b"a": state(0, 1.0)}
    idle = IdleSessions()
    assert idle.idle_before(0, 10.0, table) == [b"a"]
    table[b"restored"] = state(0, 2.0)
    assert idle.idle_before(0, 10.0, table) == [b"a"]
    idle.invalidate()
    assert sorted(idle.idle_before(0, 10.0, table)) == [b"a", b"restored"]


def test_the_worker_app_drops_the_index_at_every_rebalance(tmp_path: Path) -> None:
    """create_app connects invalidate() to Faust's partition signals (a worker whose
    index survived a rebalance would never expire the sessions it took over)."""
    recommender = untrained_model(10, tmp_path / "model")
    settings = WorkerSettings(model=str(tmp_path / "model"), data_dir=str(tmp_path / "data"))
    app, processor = create_app(settings, recommender)
    table = {b"a": state(0, 1.0)}
    for restored, signal in (
        (b"r1", app.on_partitions_assigned),
        (b"r2", app.on_partitions_revoked),
    ):
        known = sorted(processor.expiry.idle.idle_before(0, 10.0, table))
        table[restored] = state(0, 2.0)
        assert sorted(processor.expiry.idle.idle_before(0, 10.0, table)) == known
        asyncio.run(signal.send(set()))
        assert sorted(processor.expiry.idle.idle_before(0, 10.0, table)) == sorted(
            known + [restored]
        )


def test_the_scan_skips_entries_that_do_not_decode() -> None:
    """Garbage recovered from the changelog (another format, a cut header) must not stop
    the expiry pass: the readable sessions are indexed, the rest left to their next click."""
    table = {b"a": state(0, 1.0), b"short": b"\x01\x00", b"other": b"\x07" + bytes(60)}
    idle = IdleSessions()
    assert idle.idle_before(0, 10.0, table) == [b"a"]
