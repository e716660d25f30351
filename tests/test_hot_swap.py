"""Hot swap: workers follow the registry's pointer, never serve a bad version, and
recompute old states under the new model."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import ConsumerGroupState
from confluent_kafka.admin import AdminClient
from safetensors.torch import load_file, save_file

from model.artifact import save_model
from model.inference import Recommender
from model.synth import SynthSpec, generate
from model.train import train
from stream.devtools.testing import (
    TINY,
    StreamNames,
    WorkerProcess,
    click_by_click,
    produce_clicks,
    read_topic,
)
from stream.kafka.wire import Click
from stream.registry import ModelRegistry
from stream.serving.hot_swap import ModelWatcher
from stream.serving.metrics import WorkerCounters


class WatchedWorker:
    """What the watcher drives, without Faust: the served model (no availability rules)
    and the counters."""

    def __init__(self, recommender: Recommender) -> None:
        self.recommender = recommender
        self.counters = WorkerCounters()

    def prepare_model(self, recommender: Recommender) -> tuple[Recommender, int]:
        return recommender, 0

    def swap_model(self, recommender: Recommender, rules_sequence: int) -> None:
        self.recommender = recommender


@pytest.fixture(scope="module")
def models() -> tuple[Recommender, Recommender]:
    """Two versions: ``old``, and ``new`` fine-tuned from it on other data (new items)."""
    old, _ = train(generate(SynthSpec(sessions=600, items=60, seed=5)), TINY, progress=False)
    new, _ = train(
        generate(SynthSpec(sessions=600, items=80, seed=6)), TINY, base=old, progress=False
    )
    return old, new


def publish_corrupt(registry: ModelRegistry, model: Recommender, version: str) -> None:
    """A version whose weights were damaged after it was written (bad checksum), made
    current by moving the pointer the way publish does."""
    path = save_model(copy.deepcopy(model), registry.path_of(version), version=version)
    weights = path / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    temporary = registry.root / "CURRENT.tmp-test"
    temporary.write_text(version + "\n")
    os.replace(temporary, registry.root / "CURRENT")


# --- the watcher alone ----------------------------------------------------------------------


def test_the_watcher_swaps_rejects_and_follows_rollback(
    tmp_path: Path, models: tuple[Recommender, Recommender], monkeypatch: pytest.MonkeyPatch
) -> None:
    old, new = (copy.deepcopy(m) for m in models)
    registry = ModelRegistry(tmp_path / "reg")
    v1 = registry.publish(old)
    processor = WatchedWorker(registry.current())
    watcher = ModelWatcher(registry, processor)  # type: ignore[arg-type]
    loading_threads: list[threading.Thread] = []
    real_load = registry.load

    def recording_load(version: str, device: str | None = "cpu", **options: Any) -> Recommender:
        loading_threads.append(threading.current_thread())
        return real_load(version, device, **options)

    monkeypatch.setattr(registry, "load", recording_load)

    watcher_loads: list[threading.Thread] = []  # publish and rollback verify on this thread

    async def check() -> None:
        before = len(loading_threads)
        await watcher.check()
        watcher_loads.extend(loading_threads[before:])
        assert threading.current_thread() not in watcher_loads  # loaded off the loop

    asyncio.run(check())
    assert processor.recommender.version == v1 and watcher_loads == []
    v2 = registry.publish(new)
    asyncio.run(check())
    assert processor.recommender.version == v2 and processor.counters.swaps == 1
    publish_corrupt(registry, old, "000003-vcorrupt")
    for _ in range(2):  # rejected once, not retried (versions are immutable)
        asyncio.run(check())
    assert processor.recommender.version == v2
    assert processor.counters.rejected_models == 1 and len(watcher_loads) == 2
    assert registry.rollback() == v2
    asyncio.run(check())
    assert processor.counters.swaps == 1  # already serving v2
    assert registry.rollback() == v1
    asyncio.run(check())
    assert processor.recommender.version == v1 and processor.counters.swaps == 2


def test_an_io_error_is_retried_not_rejected(
    tmp_path: Path, models: tuple[Recommender, Recommender], monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = ModelRegistry(tmp_path / "reg")
    registry.publish(copy.deepcopy(models[0]))
    processor = WatchedWorker(registry.current())
    watcher = ModelWatcher(registry, processor)  # type: ignore[arg-type]
    v2 = registry.publish(copy.deepcopy(models[1]))
    real_load = registry.load
    failures = [OSError("stale file handle")]

    def flaky_load(version: str, device: str | None = "cpu") -> Recommender:
        if failures:
            raise failures.pop()
        return real_load(version, device)

    monkeypatch.setattr(registry, "load", flaky_load)
    asyncio.run(watcher.check())
    assert processor.recommender.version != v2 and processor.counters.rejected_models == 0
    asyncio.run(watcher.check())
    assert processor.recommender.version == v2 and processor.counters.swaps == 1


def publish_by_hand(
    registry: ModelRegistry, model: Recommender, version: str, spoil: Callable[[Path], None]
) -> None:
    """A version that ``spoil`` made bad after it was written, its checksums recomputed
    (as a buggy trainer would have written it), made current like publish does."""
    path = save_model(copy.deepcopy(model), registry.path_of(version), version=version)
    spoil(path)
    metadata = json.loads((path / "metadata.json").read_text())
    for name in metadata["files"]:
        metadata["files"][name] = hashlib.sha256((path / name).read_bytes()).hexdigest()
    (path / "metadata.json").write_text(json.dumps(metadata))
    (registry.root / "CURRENT").write_text(version + "\n")


def nan_weights(path: Path) -> None:
    weights = load_file(str(path / "weights.safetensors"))
    weights["hidden_weights.0"][0, 0] = math.nan
    save_file(weights, str(path / "weights.safetensors"))


def config_change(**change: Any) -> Callable[[Path], None]:
    def spoil(path: Path) -> None:
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, **change}))

    return spoil


@pytest.mark.parametrize(
    "spoil, reason",
    [
        (nan_weights, "not finite"),
        (config_change(layers=100), "layers"),
        (config_change(batch_size="32"), "batch_size"),
        (config_change(layers=[10**9]), "too large"),
        (config_change(layers=[32]), "item_output"),
    ],
)
def test_the_watcher_refuses_a_bad_version_and_keeps_serving(
    tmp_path: Path,
    models: tuple[Recommender, Recommender],
    caplog: pytest.LogCaptureFixture,
    spoil: Callable[[Path], None],
    reason: str,
) -> None:
    registry = ModelRegistry(tmp_path / "reg")
    v1 = registry.publish(copy.deepcopy(models[0]))
    processor = WatchedWorker(registry.current())
    watcher = ModelWatcher(registry, processor)  # type: ignore[arg-type]
    publish_by_hand(registry, models[1], "000002-vbad", spoil)
    with caplog.at_level("ERROR", logger="streamrec.hot_swap"):
        for _ in range(2):  # refused once, not retried
            asyncio.run(watcher.check())
    assert processor.recommender.version == v1 and processor.counters.rejected_models == 1
    [line] = [r.getMessage() for r in caplog.records if "rejected model" in r.getMessage()]
    assert "000002-vbad" in line and reason in line, line


def test_a_watcher_started_on_a_fallback_counts_the_refused_version(
    tmp_path: Path, models: tuple[Recommender, Recommender], monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = ModelRegistry(tmp_path / "reg")
    v1 = registry.publish(copy.deepcopy(models[0]))
    publish_corrupt(registry, models[1], "000002-vcorrupt")
    processor = WatchedWorker(registry.current())
    assert processor.recommender.version == v1  # what a restarting worker starts on
    watcher = ModelWatcher(registry, processor)  # type: ignore[arg-type]
    assert processor.counters.rejected_models == 1
    loads: list[str] = []
    monkeypatch.setattr(registry, "load", lambda version, *a, **k: loads.append(version))
    asyncio.run(watcher.check())
    assert loads == [] and processor.counters.rejected_models == 1  # not verified again


# --- two workers on Kafka -------------------------------------------------------------------


def from_scratch(recommender: Recommender, items: list[str], top_n: int = 20) -> list[str]:
    """The top-N after ``items``, computed in-process from an empty state."""
    return [item for item, _ in click_by_click(recommender, items, top_n)[1][-1]]


def wait_until_both_consume(
    bootstrap: str, group: str, topic: str, workers: list[WorkerProcess], timeout: float = 120.0
) -> None:
    """Until the group is stable with two members, each owning a partition of ``topic``."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for worker in workers:
            assert worker.process is not None and worker.process.poll() is None, worker.log()[
                -3000:
            ]
        try:
            group_info = admin.describe_consumer_groups([group])[group].result(5)
        except Exception:  # the group does not exist yet
            group_info = None
        if (
            group_info is not None
            and group_info.state == ConsumerGroupState.STABLE
            and len(group_info.members) == 2
            and all(
                any(tp.topic == topic for tp in m.assignment.topic_partitions)
                for m in group_info.members
            )
        ):
            return
        time.sleep(0.3)
    raise AssertionError(f"group {group} never had two members consuming {topic}")


def wait_for_log(workers: list[WorkerProcess], text: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(text in worker.log() for worker in workers):
        assert time.monotonic() < deadline, f"no {text!r} in a worker log:\n" + "\n---\n".join(
            w.log()[-2000:] for w in workers
        )
        time.sleep(0.2)


def outputs(bootstrap: str, topic: str, n: int) -> list[dict[str, Any]]:
    """All ``n`` distinct outputs (by source), each once."""

    def distinct(ms: list[dict[str, Any]]) -> dict[tuple[int, int], dict[str, Any]]:
        return {(m["source"]["partition"], m["source"]["offset"]): m for m in ms}

    messages = read_topic(bootstrap, topic, lambda ms: len(distinct(ms)) >= n, timeout=90)
    found = distinct(messages)
    assert len(found) == n, f"{len(found)} of {n} outputs"
    return sorted(found.values(), key=lambda m: (m["source"]["partition"], m["source"]["offset"]))


@pytest.mark.kafka
def test_two_workers_swap_refuse_a_corrupt_version_and_follow_rollback(
    kafka_bootstrap: str, tmp_path: Path, models: tuple[Recommender, Recommender]
) -> None:
    old, new = (copy.deepcopy(m) for m in models)
    registry = ModelRegistry(tmp_path / "reg")
    v1 = registry.publish(old)
    ids = old.item_map.ids
    sessions = {f"s{k}": [ids[(5 * k + 3 * j) % len(ids)] for j in range(7)] for k in range(30)}
    phases = [range(0, 3), range(3, 5), range(5, 6), range(6, 7)]

    def clicks(phase: range) -> list[Click]:
        return [Click(s, items[j], 100.0 + j) for j in phase for s, items in sessions.items()]

    names = StreamNames("swap")
    workers = [
        WorkerProcess(
            kafka_bootstrap,
            registry.root,
            names,
            tmp_path / f"w{k}",
            "--model-poll-s",
            "0.5",
            partitions=2,
        )
        for k in range(2)
    ]
    for k, worker in enumerate(workers):
        (tmp_path / f"w{k}").mkdir()
        worker.start()
    try:
        wait_until_both_consume(kafka_bootstrap, names.app_id, names.clicks, workers)
        seen = 0

        def answer(phase: range) -> list[dict[str, Any]]:
            nonlocal seen
            produce_clicks(kafka_bootstrap, names.clicks, clicks(phase))
            seen += len(phase) * len(sessions)
            return outputs(kafka_bootstrap, names.recommendations, seen)

        first = answer(phases[0])
        assert {m["model_version"] for m in first} == {v1}

        v2 = registry.publish(new)
        wait_for_log(workers, f"swapped model {v1} -> {v2}")
        after_swap = [m for m in answer(phases[1]) if m["timestamp"] >= 103.0]
        assert len(after_swap) == 60
        assert {m["model_version"] for m in after_swap} == {v2}
        assert {m["source"]["partition"] for m in after_swap} == {0, 1}  # both workers
        for m in after_swap:  # states from v1 were recomputed under v2
            history = sessions[m["session_id"]][: int(m["timestamp"] - 100.0) + 1]
            assert [r["item_id"] for r in m["recommendations"]] == from_scratch(new, history)

        publish_corrupt(registry, old, "000003-vcorrupt")
        wait_for_log(workers, "rejected model 000003-vcorrupt")
        kept = [m for m in answer(phases[2]) if m["timestamp"] == 105.0]
        assert len(kept) == 30 and {m["model_version"] for m in kept} == {v2}

        assert registry.rollback() == v2  # from the corrupt one: workers already serve it
        assert registry.rollback() == v1
        wait_for_log(workers, f"swapped model {v2} -> {v1}")
        rolled = [m for m in answer(phases[3]) if m["timestamp"] == 106.0]
        assert len(rolled) == 30 and {m["model_version"] for m in rolled} == {v1}
        assert {m["source"]["partition"] for m in rolled} == {0, 1}
        for m in rolled:
            history = sessions[m["session_id"]]
            assert [r["item_id"] for r in m["recommendations"]] == from_scratch(old, history)
    finally:
        for worker in workers:
            worker.stop()


def test_a_swap_during_a_batch_takes_effect_from_the_next_batch(tmp_path: Path) -> None:
    """A hot swap is an assignment on the event loop, and a batch awaits its answers'
    delivery: a swap landing there must not reach the rest of the batch. Driven through
    the worker's real app and table, with a producer that swaps the model on its first
    send, as the registry watcher would between two awaits."""
    import asyncio

    from stream.bench.serving import untrained_model
    from stream.kafka.wire import Click, encode_click
    from stream.serving.app import create_app
    from stream.serving.settings import WorkerSettings
    from stream.serving.state import SessionState

    old = untrained_model(30, tmp_path / "old")
    new = untrained_model(30, tmp_path / "new")
    old.version, new.version = "v1", "v2"
    settings = WorkerSettings(model=str(tmp_path / "old"), data_dir=str(tmp_path / "data"))
    app, processor = create_app(settings, old)
    sent: list[tuple[str, bytes, bytes]] = []

    class SwappingProducer:
        async def send(self, topic: str, key: bytes, value: bytes, *_: object) -> asyncio.Future:
            sent.append((topic, key, value))
            processor.recommender = new  # the watcher's swap, between two awaits
            done: asyncio.Future = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done

    app._producer = SwappingProducer()  # type: ignore[assignment]
    processor.sequence.sought = lambda partition: 0  # as Faust's seek would say; no broker here

    def batch(first: int, sessions: list[str]) -> list[SimpleNamespace]:
        events = []
        for k, session in enumerate(sessions):
            key, value = encode_click(Click(session, "3", 1000.0 + first + k))
            message = SimpleNamespace(
                topic=settings.input_topic,
                partition=0,
                offset=first + k,
                key=key,
                value=value,
                timestamp=None,
            )
            events.append(SimpleNamespace(message=message))
        return events

    sessions = [f"s{k}" for k in range(5)]

    async def run() -> None:
        await processor.process(batch(0, sessions))
        await processor.process(batch(5, sessions))

    asyncio.run(run())
    answers = [json.loads(v) for t, _, v in sent if t == settings.output_topic]
    assert [a["model_version"] for a in answers] == ["v1"] * 5 + ["v2"] * 5
    states = [SessionState.decode(v) for t, _, v in sent if t.endswith("-changelog")]
    assert [s.model_version for s in states] == ["v1"] * 5 + ["v2"] * 5
