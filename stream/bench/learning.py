"""``streamrec bench incremental`` and ``streamrec bench drift``: learning while serving.

Both run the real processes on a local Kafka (or ``--broker``): ``streamrec trainer`` as a
subprocess following the click topic and publishing to a temporary registry, and, for
``drift``, a ``streamrec worker`` following that registry.

**incremental.** Train on TRAIN (defaults, ``--initial-epochs``), publish it (with its
optimizer state); replay STREAM into the click topic (event-time order, compressed by
``--speed``) while the trainer fine-tunes the current model round by round, replaying
sessions of TRAIN too (``--replay-log``, what a trainer deployed next to an offline-trained
model is given; ``--no-replay-log`` leaves it out); evaluate the registry's final model
offline on TEST (Recall@20), against a model trained from scratch on TRAIN+STREAM with
the same defaults. The trainer's fine-tuning settings default to ``streamrec
trainer``'s. The end of a finite stream is not the end of its sessions: the trainer only
learns from a session once its partition's event time has moved
``--session-timeout-s`` past the session's last click. After STREAM, single-click "flush"
sessions are produced to each partition (explicitly; as many as it takes to move a
partition's watermark, :data:`stream.event_time.WATERMARK_RANK`) with an event time
``3 x session-timeout`` past the stream's last click: they complete every real session
and are never trained on themselves (single-click sessions hold no transition). The
bench then waits until the trainer reports two consecutive idle rounds with nothing new
(``decision: wait`` with unchanged counts); complete sessions still waiting then (fewer
than ``--min-sessions``) are reported as ``untrained_complete_sessions``.

**drift.** Synthetic: phase A (items 1..N) trains the initial model; then A' (more A
traffic, max speed, cut where B starts) and phase B are replayed through a worker following
the registry, once with the trainer running and once without. Phase B is a mix: new-item
sessions (items N+1..2N, ``follow`` 0.9: strong sequential patterns) and, a third as many,
A sessions, all starting uniformly over the phase, so that it is sent at ``--rate``
events/s throughout (event time compressed ``--speed`` times). (The A traffic in B is
needed: the trainer's gate compares candidate and current model only on targets the
current model knows, and a holdout of new-item sessions only would give it no evidence.)
Online Recall@20 is computed from the consumed output messages (:func:`online_quality`)
with ``known_items`` = every item of A and B: a target the served model cannot rank
counts as a miss, which is the point (the old model cannot recommend new items). It is
measured on the answers to phase-B sessions' clicks from the event time of the first one
answered by a model that knows new items (in the run with retraining), the same window in
both runs. ``--base-model`` serves a model trained elsewhere (a million-item catalogue)
instead of training one on phase A; its A traffic then comes from ``--base-data``.

The timing figures (run with retraining):

- ``new_items_first_recommended_after_s``: from the first click on a new item, as sent
  (its Kafka timestamp, set by the replay's producer), to the first output message that
  recommends any new item, as consumed. ``new_items_timeline`` says where that time went,
  relative to the same click: each training round's start and end, its training seconds
  and sessions, the round whose version first recommended a new item, and when the
  worker first answered with that version. The bar of issue #4 (within one retraining
  interval) is ``new_items_within_one_interval``, with ``retrain_interval_s`` next to it:
  with rounds on a fixed clock the first click can come just after a round started, so
  the figure is at most about the interval (waiting for the next round, once some
  new-item sessions are complete), plus one round, plus the worker's poll: that bound,
  for this run's round and poll, is ``new_items_worst_phase_after_s``.
- ``max_swap_gap_ms``: for each swap to a new version during phase B, the longest gap
  between two consecutive output messages within ``--swap-window-s`` of the first output
  of the new version, timed by the messages' Kafka timestamps (set by the worker's
  producer when it sends them); the largest over the swaps. ``swap_windows`` gives, per
  swap, the gap at the swap itself (last output of the old version to first of the new),
  that window's longest gap and the longest gap between the clicks sent in it;
  ``max_gap_ms_phase_b_with/without_retraining`` and the p99 gaps are the same measure
  over all of phase B, for reference. ``max_swap_gap_consumed_ms`` is the old measure,
  timed when the bench's reader consumed the messages.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import Producer

from model.artifact import load_model, save_model
from model.config import GRU4RecConfig
from model.data import ClickLog, read_clicks
from model.errors import UserError
from model.evaluate import RecommenderScorer, evaluate
from model.synth import SynthSpec, generate
from model.train import train
from stream.devtools.brokers import kafka_or_local
from stream.devtools.processes import (
    StreamNames,
    TrainerProcess,
    WorkerProcess,
    start_readers,
    work_directory,
)
from stream.event_time import WATERMARK_RANK
from stream.kafka.config import producer_config
from stream.kafka.log_sender import replay
from stream.kafka.topics import ensure_topics
from stream.kafka.wire import Click, encode_click
from stream.learning.settings import TrainerSettings
from stream.quality import online_quality
from stream.registry import ModelRegistry

PARTITIONS = 4
#: ``streamrec trainer`` options each benchmark takes (declared once, by TrainerSettings)
#: and where its defaults differ from the trainer's.
INCREMENTAL_TRAINER_OPTIONS = (
    "interval_s",
    "epochs",
    "learning_rate",
    "session_timeout_s",
    "min_sessions",
    "holdout_sessions",
    "replay_sample",
    "replay_log_sample",
    "gate_margin",
    "round_budget_s",
)
INCREMENTAL_TRAINER_DEFAULTS = {
    "interval_s": 5.0,
    "session_timeout_s": 3600.0,  # 99.9 % of RSC15's gaps between clicks are shorter
    "min_sessions": 300,
    # no budget: the stream is compressed into a few intervals and every round trains
    # on all it has
    "round_budget_s": 0.0,
}
DRIFT_TRAINER_OPTIONS = (
    "interval_s",
    "epochs",
    "session_timeout_s",
    "min_sessions",
    "holdout_sessions",
    "replay_sample",
    "gate_margin",
    "round_budget_s",
    "nice",
)
DRIFT_TRAINER_DEFAULTS = {
    "interval_s": 5.0,
    "epochs": 3,
    "session_timeout_s": 120.0,  # event time; the worker's too: passes in ~1 s of phase B
    "min_sessions": 200,
    "replay_sample": 2000,
    "gate_margin": 0.05,
}  # the gate sees only the A sessions of a 100-session holdout


def _add_trainer_options(
    parser: argparse.ArgumentParser, options: tuple[str, ...], defaults: dict[str, Any]
) -> None:
    """The trainer's own flags for ``options``, with this benchmark's ``defaults``."""
    group = parser.add_argument_group("streamrec trainer options")
    TrainerSettings.add_arguments(group, only=options, defaults=defaults, env=False)
    trainer_defaults = {f.name: f.default for f in fields(TrainerSettings)}
    parser.set_defaults(**({name: trainer_defaults[name] for name in options} | defaults))


def _trainer_argv(args: argparse.Namespace, options: tuple[str, ...]) -> list[str]:
    return TrainerSettings.command_line(**{name: getattr(args, name) for name in options})


def _log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _log_decision(record: dict[str, Any]) -> None:
    keys = (
        "decision",
        "round",
        "late_s",
        "complete_sessions",
        "buffered",
        "sessions",
        "budget",
        "new_items",
        "train_seconds",
        "round_seconds",
        "reason",
        "version",
    )
    _log(f"trainer: {json.dumps({k: record[k] for k in keys if k in record})}")


def _clicks(log: ClickLog, prefix: str, time_shift: float = 0.0) -> list[Click]:
    """The log's events as clicks (session ids prefixed), in event-time order."""
    order = np.argsort(log.times, kind="stable")
    sessions = log.session_ids[log.sessions[order]]
    items = log.item_ids[log.items[order]]
    times = log.times[order] + time_shift
    return [Click(f"{prefix}{s}", str(i), float(t)) for s, i, t in zip(sessions, items, times)]


def _concat(logs: Sequence[ClickLog], source: str) -> ClickLog:
    return ClickLog.from_arrays(
        np.concatenate([log.session_ids[log.sessions] for log in logs]),
        np.concatenate([log.item_ids[log.items] for log in logs]),
        np.concatenate([log.times for log in logs]),
        source=source,
    )


def _produce_to_partitions(
    bootstrap: str, topic: str, clicks: Sequence[Click], partitions: Sequence[int]
) -> None:
    """Produce ``clicks[k]`` explicitly to ``partitions[k]`` (the flush clicks)."""
    producer = Producer(producer_config(bootstrap))
    for click, partition in zip(clicks, partitions):
        key, value = encode_click(click)
        producer.produce(topic, key=key, value=value, partition=partition)
    if producer.flush(30):
        raise UserError("flush clicks were not delivered within 30 s")


def _wait(
    predicate: Callable[[], bool],
    timeout: float,
    what: str,
    alive: Callable[[], None] | None = None,
) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if alive is not None:
            alive()
        if time.monotonic() > deadline:
            _log(f"timed out after {timeout:g} s waiting for {what}")
            return False
        time.sleep(0.2)
    return True


def _trainer_settled(trainer: TrainerProcess, since: int) -> Callable[[], bool]:
    """True once two consecutive decisions after record ``since`` are 'wait' with the
    same counts: nothing new consumed, nothing left that a round would train on."""

    def settled() -> bool:
        records = trainer.decisions()[since:]
        if len(records) < 2:
            return False
        a, b = records[-2], records[-1]
        same = all(a.get(k) == b.get(k) for k in ("buffered", "complete_sessions"))
        return a.get("decision") == b.get("decision") == "wait" and same

    return settled


def _trainer_stats(decisions: Iterable[dict[str, Any]]) -> dict[str, Any]:
    decisions = list(decisions)
    trained = [d for d in decisions if d.get("decision") in ("promoted", "rejected")]
    return {
        "rounds": len(trained),
        "promotions": sum(d["decision"] == "promoted" for d in trained),
        "rejections": sum(d["decision"] == "rejected" for d in trained),
        "not_published": sum(d.get("decision") == "not_published" for d in decisions),
        "failed": sum(d.get("decision") == "failed" for d in decisions),
        "round_train_seconds": [d["train_seconds"] for d in trained],
    }


# --------------------------------------------------------------------------- incremental


def run_incremental(args: argparse.Namespace) -> dict[str, Any]:
    initial_log = read_clicks(args.initial)
    stream_log = read_clicks(args.stream)
    test_log = read_clicks(args.test)
    config = GRU4RecConfig(n_epochs=args.initial_epochs)

    _log(
        f"training the initial model on {args.initial} ({len(initial_log):,} events, "
        f"{args.initial_epochs} epochs)"
    )
    initial, initial_stats = train(
        initial_log, config, seed=args.seed, device=args.device, progress=False
    )
    initial_recall = evaluate(RecommenderScorer(initial), test_log, ks=(20,)).recall(20)
    _log(
        f"initial model: Recall@20 {initial_recall:.4f} on {args.test}, "
        f"{initial_stats.train_seconds:.1f} s"
    )

    span = float(stream_log.times.max() - stream_log.times.min())
    speed: float | str = (
        args.speed
        if args.speed is not None
        else max(span / (args.stream_rounds * args.interval_s), 1.0)
    )
    trainer_args = _trainer_argv(args, INCREMENTAL_TRAINER_OPTIONS) + TrainerSettings.command_line(
        max_session_age_s=max(86400.0, 10 * args.session_timeout_s),
        seed=args.seed,
        device=args.device,
        replay_log=None if args.no_replay_log else str(Path(args.initial).resolve()),
    )

    with (
        kafka_or_local(args.broker) as bootstrap,
        tempfile.TemporaryDirectory(prefix="streamrec-bench-incr-") as tmp,
    ):
        work = Path(tmp)
        registry = ModelRegistry(work / "registry")
        registry.publish(
            initial, training={"epochs": initial_stats.epochs, "data": str(args.initial)}
        )
        names = StreamNames("incr")
        ensure_topics(bootstrap, {names.clicks: PARTITIONS})
        trainer = TrainerProcess(
            bootstrap, registry.root, names.clicks, work, *trainer_args, on_record=_log_decision
        ).start()
        try:
            started = time.perf_counter()
            _log(
                f"replaying {args.stream} ({len(stream_log):,} events, {span / 3600:.1f} h "
                f"of event time) at speed {speed}"
            )
            replay(_clicks(stream_log, ""), bootstrap, names.clicks, speed=speed)
            trainer.check_alive()
            flush_time = float(stream_log.times.max()) + 3 * args.session_timeout_s
            flush = [
                Click(f"__flush-{uuid.uuid4().hex[:6]}-{p}-{k}", "__flush", flush_time)
                for p in range(PARTITIONS)
                for k in range(WATERMARK_RANK)
            ]
            since = len(trainer.records)
            _produce_to_partitions(
                bootstrap, names.clicks, flush, [c // WATERMARK_RANK for c in range(len(flush))]
            )
            stream_seconds = time.perf_counter() - started
            _log("stream and flush clicks produced; waiting for the trainer to settle")
            settled = _wait(
                _trainer_settled(trainer, since),
                args.settle_timeout,
                "the trainer to settle",
                trainer.check_alive,
            )
            wall_seconds = time.perf_counter() - started
        finally:
            trainer.stop()
        final = registry.current()
        decisions = trainer.decisions()
    incremental_recall = evaluate(RecommenderScorer(final), test_log, ks=(20,)).recall(20)
    stats = _trainer_stats(decisions)
    last = decisions[-1] if decisions else {}
    _log(f"incremental model {final.version}: Recall@20 {incremental_recall:.4f}")

    if args.scratch:
        scratch_log, scratch_source = read_clicks(args.scratch), str(args.scratch)
    else:
        scratch_log = _concat([initial_log, stream_log], "initial+stream")
        scratch_source = "initial+stream"
    _log(f"training from scratch on {scratch_source} ({len(scratch_log):,} events)")
    scratch, scratch_stats = train(
        scratch_log, config, seed=args.seed, device=args.device, progress=False
    )
    scratch_recall = evaluate(RecommenderScorer(scratch), test_log, ks=(20,)).recall(20)

    return {
        "incremental_recall@20": incremental_recall,
        "scratch_recall@20": scratch_recall,
        "incremental_seconds": float(sum(stats["round_train_seconds"])),
        "scratch_seconds": scratch_stats.train_seconds,
        "initial_recall@20": initial_recall,
        "initial_train_seconds": initial_stats.train_seconds,
        "difference": incremental_recall - scratch_recall,
        **{
            k: stats[k]
            for k in (
                "rounds",
                "promotions",
                "rejections",
                "not_published",
                "failed",
                "round_train_seconds",
            )
        },
        "untrained_complete_sessions": last.get("complete_sessions", 0),
        "trainer_settled": settled,
        "stream_replay_seconds": stream_seconds,
        "stream_wall_seconds": wall_seconds,
        "speed": speed,
        "interval_s": args.interval_s,
        "epochs_per_round": args.epochs,
        "round_budget_s": args.round_budget_s,
        "replay_sample": args.replay_sample,
        "learning_rate": args.learning_rate,
        "replay_log_sample": 0 if args.no_replay_log else args.replay_log_sample,
        "rounds_resumed_optimizer": sum(bool(d.get("resumed_optimizer")) for d in decisions),
        "min_sessions": args.min_sessions,
        "holdout_sessions": args.holdout_sessions,
        "gate_margin": args.gate_margin,
        "session_timeout_s": args.session_timeout_s,
        "initial_epochs": args.initial_epochs,
        "final_version": final.version,
        "final_items": final.n_items,
        "scratch_items": scratch.n_items,
        "scratch_source": scratch_source,
    }


# --------------------------------------------------------------------------------- drift


def _retimed(log: ClickLog, start: float, window: float, rng: np.random.Generator) -> ClickLog:
    """``log``'s sessions moved to start uniformly at random in ``[start, start + window)``
    (gaps within a session kept), with the clicks past the window's end dropped: a
    stationary stream of sessions, as live traffic is."""
    offsets = log.session_offsets()
    first = log.times[offsets[:-1]]
    starts = start + np.sort(rng.uniform(0.0, window, len(first)))
    lengths = np.diff(offsets)
    times = log.times + np.repeat(starts - first, lengths)
    keep = times < start + window
    return ClickLog.from_arrays(
        log.session_ids[log.sessions[keep]],
        log.item_ids[log.items[keep]],
        times[keep],
        source=log.source,
    )


def _phase_a_traffic(args: argparse.Namespace, n_sessions: int) -> tuple[ClickLog, np.ndarray, int]:
    """Phase A's clicks, each event's session rank in start-time order, and the largest
    item number of phase A (phase B's new items are numbered after it).

    Synthetic by default; with ``--base-model``, the sessions of ``--base-data`` (a log
    the base model knows, such as its held-out part), so that a large trained catalogue
    serves traffic it has learnt."""
    if args.base_model is None:
        rate_a = 5.0  # sessions per event-time second of A traffic (training and A')
        log = generate(
            SynthSpec(
                sessions=n_sessions, items=args.items, seed=args.seed + 1, sessions_per_s=rate_a
            )
        )
        return log, log.sessions, args.items  # generated sessions are numbered by start
    log = read_clicks(args.base_data)
    if log.n_sessions < n_sessions:
        raise UserError(
            f"{args.base_data}: {log.n_sessions} sessions; --a-sessions and a third of "
            f"--b-sessions need {n_sessions}"
        )
    starts = log.times[log.session_offsets()[:-1]]
    rank = np.empty(log.n_sessions, dtype=np.int64)
    rank[np.argsort(starts, kind="stable")] = np.arange(log.n_sessions)
    known = load_model(args.base_model, device="cpu").item_map.ids
    numbers = [int(item) for item in known if item.isdecimal()]
    return log, rank[log.sessions], max(numbers, default=0)


def _drift_data(args: argparse.Namespace) -> dict[str, Any]:
    """Phase A (train / A' / A traffic during B) and phase B (new items), as clicks.

    Phase B is stationary: its sessions (new-item ones and a third as many A ones) start
    uniformly over an event-time window sized so that, replayed at ``--speed``, it lasts
    its clicks / ``--rate`` seconds; the replay speed is then set from the clicks kept so
    that phase B is sent at ``--rate`` events/s on average and at about that rate
    throughout (sessions starting at the generator's fixed rate instead put 80 % of
    phase B's clicks into its first 4 s, at 5-8x the nominal rate). With ``--base-model``
    nothing is trained on: A' and the A traffic in B come from ``--base-data``."""
    train_sessions = 0 if args.base_model else args.train_sessions
    a_total = train_sessions + args.a_sessions + args.b_sessions // 3
    a_log, session_rank, last_a_item = _phase_a_traffic(args, a_total)
    first_a2, first_mix = train_sessions, train_sessions + args.a_sessions

    def part(lo: int, hi: int) -> ClickLog:
        keep = (session_rank >= lo) & (session_rank < hi)
        return ClickLog.from_arrays(
            a_log.session_ids[a_log.sessions[keep]],
            a_log.item_ids[a_log.items[keep]],
            a_log.times[keep],
            source="phase A",
        )

    a_train, a_prime, a_mix = (
        part(0, first_a2),
        part(first_a2, first_mix),
        part(first_mix, a_total),
    )
    b_start = float(a_mix.times.min())
    # A' ends where B starts: its sessions' later clicks would be sent before B with
    # event times far into B, moving the watermarks (session completion, expiry) ahead.
    before_b = a_prime.times < b_start
    a_prime = ClickLog.from_arrays(
        a_prime.session_ids[a_prime.sessions[before_b]],
        a_prime.item_ids[a_prime.items[before_b]],
        a_prime.times[before_b],
        source="phase A'",
    )
    b_log = generate(
        SynthSpec(
            sessions=args.b_sessions,
            items=args.items,
            seed=args.seed + 2,
            item_offset=last_a_item,
            follow=0.9,
            start_time=b_start,
        )
    )
    window = (len(b_log) + len(a_mix)) / args.rate * args.speed
    rng = np.random.default_rng(args.seed + 3)
    b_log = _retimed(b_log, b_start, window, rng)
    a_mix = _retimed(a_mix, b_start, window, rng)
    phase_b = sorted(_clicks(b_log, "b") + _clicks(a_mix, "a"), key=lambda c: c.timestamp)
    b_span = phase_b[-1].timestamp - phase_b[0].timestamp
    return {
        "a_train": a_train,
        "a_prime": _clicks(a_prime, "a"),
        "phase_b": phase_b,
        "b_speed": max(args.rate * b_span / len(phase_b), 1e-3),
        "b_sessions": {f"b{s}" for s in b_log.session_ids},
        "phase_b_sessions": {c.session_id for c in phase_b},
        "new_items": set(str(i) for i in b_log.item_ids),
        "all_items": set(str(i) for i in a_log.item_ids) | set(str(i) for i in b_log.item_ids),
    }


def _drift_run(
    bootstrap: str,
    data: dict[str, Any],
    model_dir: Path,
    work: Path,
    args: argparse.Namespace,
    retraining: bool,
) -> dict[str, Any]:
    """One pass of A' then B through a worker following a registry; returns raw
    observations (output messages, input timestamps, trainer decisions)."""
    registry = ModelRegistry(work / f"registry-{'on' if retraining else 'off'}")
    registry.publish_directory(model_dir)
    initial_version = registry.current_version()
    names = StreamNames("drift")
    inputs, outputs = start_readers(bootstrap, names, PARTITIONS)
    worker = WorkerProcess(
        bootstrap,
        registry.root,
        names,
        work,
        "--model-poll-s",
        str(args.model_poll_s),
        "--session-timeout-s",
        str(args.session_timeout_s),
        partitions=PARTITIONS,
    ).start()
    trainer = None
    if retraining:
        trainer = TrainerProcess(
            bootstrap,
            registry.root,
            names.clicks,
            work,
            *_trainer_argv(args, DRIFT_TRAINER_OPTIONS),
            *TrainerSettings.command_line(seed=args.seed, device=args.device or "cpu"),
            env={"OMP_NUM_THREADS": str(args.trainer_threads)},
            on_record=_log_decision,
        )
    total = len(data["a_prime"]) + len(data["phase_b"])
    try:
        worker.wait_until_consuming(bootstrap, names.app_id)
        if trainer is not None:
            # Its first decision (a 'wait') shows it is consuming: A' must reach it.
            trainer.start()
            _wait(
                lambda: bool(trainer.records), 120, "the trainer's first round", trainer.check_alive
            )
        _log(
            f"retraining {'on' if retraining else 'off'}: replaying A' "
            f"({len(data['a_prime']):,} clicks) at max speed"
        )
        replay(data["a_prime"], bootstrap, names.clicks, speed="max")
        # Let the worker catch up, so that phase B's pacing measures serving, not backlog.
        _wait(lambda: len(outputs.messages) >= len(data["a_prime"]), 120, "A' answers")
        _log(
            f"replaying phase B ({len(data['phase_b']):,} clicks) at ~{args.rate:g}/s "
            f"(speed {data['b_speed']:.1f})"
        )
        b_started = time.time()
        with _without_gc_pauses():
            replay(data["phase_b"], bootstrap, names.clicks, speed=data["b_speed"])
        b_seconds = time.time() - b_started
        if not outputs.wait_for(total, timeout=120):
            _log(f"only {len(outputs.messages)} of {total} answered")
        inputs.wait_for(total, timeout=30)
    finally:
        if trainer is not None:
            trainer.stop()
        worker.stop()
        inputs.close()
        outputs.close()
    return {
        "outputs": list(outputs.messages),
        "inputs": list(inputs.messages),
        "decisions": trainer.decisions() if trainer else [],
        "records": list(trainer.records) if trainer else [],
        "initial_version": initial_version,
        "b_seconds": b_seconds,
    }


@contextlib.contextmanager
def _without_gc_pauses() -> Iterator[None]:
    """No cyclic garbage collection in this process meanwhile. The bench holds every
    click and answer of both runs as Python objects; a full collection over them stopped
    the replay for 200-390 ms once per phase B (the answers' reader threads too), a gap
    in the input that the worker's output then showed, inside swap windows or not.
    Reference counting still frees almost everything; what is left is collected after."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


def _dump(path: Path, run: dict[str, Any], new_items: set[str]) -> None:
    """A run's raw observations as JSON lines, for looking at a timeline afterwards."""
    with open(path, "w") as out:
        for m in run["inputs"]:
            value = json.loads(m.value())
            out.write(
                json.dumps(
                    {
                        "kind": "input",
                        "produced_at": m.timestamp()[1] / 1000.0,
                        "partition": m.partition(),
                        "offset": m.offset(),
                        "session_id": value["session_id"],
                        "item_id": value["item_id"],
                        "event_time": value["timestamp"],
                    }
                )
                + "\n"
            )
        for r in run["outputs"]:
            v = r.value
            out.write(
                json.dumps(
                    {
                        "kind": "output",
                        "consumed_at": r.consumed_at,
                        "created_at": r.kafka_time,
                        "session_id": v["session_id"],
                        "event_time": v["timestamp"],
                        "version": v["model_version"],
                        "source": v["source"],
                        "new_item_recommended": any(
                            e["item_id"] in new_items for e in v["recommendations"]
                        ),
                    }
                )
                + "\n"
            )
        for read_at, record in run.get("records", []):
            out.write(json.dumps({"kind": "trainer", "read_at": read_at, **record}) + "\n")


def _b_window_quality(
    outputs: Sequence[Any],
    sessions: set[str],
    threshold: float,
    known: set[str],
    only: set[str] | None = None,
) -> dict[str, Any]:
    """Online quality of the answers to phase-B clicks (of ``only``'s sessions, if given)
    from event time ``threshold`` on."""
    messages = [
        r.value
        for r in outputs
        if r.value["session_id"] in sessions
        and r.value["timestamp"] >= threshold
        and (only is None or r.value["session_id"] in only)
    ]
    return online_quality(messages, 20, known).to_dict()


def _max_gap_ms(times: Sequence[float] | np.ndarray) -> float:
    return float(np.max(np.diff(times)) * 1000) if len(times) > 1 else 0.0


def _swap_windows(
    outputs: Sequence[Any],
    input_times: np.ndarray,
    initial_version: str,
    phase: tuple[float, float],
    window_s: float,
) -> list[dict[str, Any]]:
    """For each version's first output (a swap) inside ``phase`` (output creation times),
    the output gaps around it, timed by the worker: the messages' Kafka timestamps, set
    by its producer when it sends them (the reader's consume times add the bench's own
    scheduling). ``boundary_gap_ms`` is the gap between the last output of the old
    version and the first of the new one, where the swap happened; ``max_gap_ms`` the
    longest gap within ``window_s`` of the swap; ``max_input_gap_ms`` the longest gap
    between the clicks sent in that window, the part of a gap the input itself makes."""
    created = np.array([r.kafka_time for r in outputs])
    versions = [r.value["model_version"] for r in outputs]
    seen = {initial_version}
    windows = []
    for i, version in enumerate(versions):
        if version in seen:
            continue
        seen.add(version)
        at = created[i]
        if not phase[0] + window_s <= at <= phase[1] - window_s:
            continue  # a swap between two phases, or at an end: no traffic to measure
        around = (created >= at - window_s) & (created <= at + window_s)
        sent = (input_times >= at - window_s) & (input_times <= at + window_s)
        windows.append(
            {
                "version": version,
                "at": float(at),
                "boundary_gap_ms": float((created[i] - created[i - 1]) * 1000),
                "max_gap_ms": _max_gap_ms(created[around]),
                "max_input_gap_ms": _max_gap_ms(np.sort(input_times[sent])),
            }
        )
    return windows


def _first_new_item_timeline(
    on: dict[str, Any], new_items: set[str], first_click: float, first_rec: Any | None
) -> dict[str, Any]:
    """Where the time went between the first click on a new item and the first
    recommendation of one: each round around it, relative to that click."""
    rounds = []
    for read_at, d in on["records"]:
        if d.get("decision") not in ("promoted", "rejected", "not_published", "failed"):
            continue
        started = d.get("started_at", math.nan)
        rounds.append(
            {
                "round": d.get("round"),
                "decision": d["decision"],
                "started_after_s": started - first_click,
                "ended_after_s": d.get("published_at", read_at) - first_click,
                "train_seconds": d.get("train_seconds"),
                "round_seconds": d.get("round_seconds"),
                "late_s": d.get("late_s"),
                "sessions": d.get("sessions"),
                "train_events": d.get("train_events"),
                "new_items": d.get("new_items"),
                "version": d.get("version"),
            }
        )
    timeline: dict[str, Any] = {"rounds": rounds}
    if first_rec is not None:
        version = first_rec.value["model_version"]
        served = [r.kafka_time for r in on["outputs"] if r.value["model_version"] == version]
        learnt = next((r for r in rounds if r["version"] == version), None)
        timeline.update(
            version=version,
            round_started_after_s=learnt["started_after_s"] if learnt else math.nan,
            round_seconds=learnt["round_seconds"] if learnt else math.nan,
            published_after_s=learnt["ended_after_s"] if learnt else math.nan,
            first_served_after_s=min(served) - first_click,
            first_recommended_after_s=first_rec.consumed_at - first_click,
        )
    return timeline


def drift_figures(
    on: dict[str, Any], off: dict[str, Any], data: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """The drift benchmark's figures from the raw observations of the two runs."""
    new_items = data["new_items"]
    phase_b_sessions = data["phase_b_sessions"]
    promoted = [d for d in on["decisions"] if d.get("decision") == "promoted"]
    new_versions = {d["version"] for d in promoted if d.get("new_items", 0) > 0}
    # Versions published after the first one that learnt new items also know them.
    if new_versions:
        first_new = min(new_versions)
        new_versions |= {d["version"] for d in promoted if d["version"] >= first_new}
    on_outputs = sorted(on["outputs"], key=lambda r: (r.kafka_time, r.consumed_at))
    served_new = [
        r
        for r in on_outputs
        if r.value["model_version"] in new_versions and r.value["session_id"] in phase_b_sessions
    ]
    threshold = served_new[0].value["timestamp"] if served_new else math.inf

    # The first click on a new item, as sent (its Kafka timestamp, set by the replay's
    # producer) -> the first output message recommending any new item, as consumed.
    def sent_times(run: dict[str, Any], only_new: bool = False) -> np.ndarray:
        times = []
        for m in run["inputs"]:
            value = json.loads(m.value())
            if value["session_id"] in phase_b_sessions and (
                not only_new or value["item_id"] in new_items
            ):
                times.append(m.timestamp()[1] / 1000.0)
        return np.sort(np.array(times))

    on_sent, off_sent = sent_times(on), sent_times(off)
    new_sent = sent_times(on, only_new=True)
    first_new_click = float(new_sent[0]) if len(new_sent) else math.nan
    first_rec = min(
        (
            r
            for r in on_outputs
            if any(e["item_id"] in new_items for e in r.value["recommendations"])
        ),
        key=lambda r: r.consumed_at,
        default=None,
    )
    after_s = first_rec.consumed_at - first_new_click if first_rec else math.nan
    timeline = _first_new_item_timeline(on, new_items, first_new_click, first_rec)

    def phase_b_created(outputs: Sequence[Any]) -> np.ndarray:
        return np.sort(
            np.array([r.kafka_time for r in outputs if r.value["session_id"] in phase_b_sessions])
        )

    on_b, off_b = phase_b_created(on["outputs"]), phase_b_created(off["outputs"])
    windows = _swap_windows(
        on_outputs,
        on_sent,
        on["initial_version"],
        (float(on_b[0]), float(on_b[-1])) if len(on_b) else (0.0, 0.0),
        args.swap_window_s,
    )
    on_consumed = np.sort(np.array([r.consumed_at for r in on_outputs]))
    consumed_gaps = [
        _max_gap_ms(
            on_consumed[
                (on_consumed >= w["at"] - args.swap_window_s)
                & (on_consumed <= w["at"] + args.swap_window_s)
            ]
        )
        for w in windows
    ]

    known = data["all_items"]
    with_q = _b_window_quality(on["outputs"], phase_b_sessions, threshold, known)
    without_q = _b_window_quality(off["outputs"], phase_b_sessions, threshold, known)
    with_new = _b_window_quality(
        on["outputs"], phase_b_sessions, threshold, known, data["b_sessions"]
    )
    without_new = _b_window_quality(
        off["outputs"], phase_b_sessions, threshold, known, data["b_sessions"]
    )
    first_new_round = next((d for d in promoted if d["version"] in new_versions), None)
    stats = _trainer_stats(on["decisions"])

    def rate(times: np.ndarray) -> float:
        return float((len(times) - 1) / (times[-1] - times[0])) if len(times) > 1 else 0.0

    return {
        "recall@20_with_retraining": with_q["recall@20"],
        "recall@20_without_retraining": without_q["recall@20"],
        "new_items_first_recommended_after_s": after_s,
        "retrain_seconds": first_new_round["train_seconds"] if first_new_round else math.nan,
        "max_swap_gap_ms": max((w["max_gap_ms"] for w in windows), default=math.nan),
        "retrain_interval_s": args.interval_s,
        "new_items_within_one_interval": bool(after_s <= args.interval_s),
        # Had the first new-item click come just after a round started, it would have
        # waited a whole interval for the next one, then the same round and poll.
        "new_items_worst_phase_after_s": args.interval_s
        + after_s
        - timeline.get("round_started_after_s", math.nan),
        "new_items_timeline": timeline,
        "swap_windows": windows,
        "max_swap_gap_consumed_ms": max(consumed_gaps, default=math.nan),
        "max_gap_ms_phase_b_with_retraining": _max_gap_ms(on_b),
        "max_gap_ms_phase_b_without_retraining": _max_gap_ms(off_b),
        "p99_gap_ms_phase_b_with_retraining": float(np.percentile(np.diff(on_b), 99) * 1000)
        if len(on_b) > 1
        else math.nan,
        "p99_gap_ms_phase_b_without_retraining": float(np.percentile(np.diff(off_b), 99) * 1000)
        if len(off_b) > 1
        else math.nan,
        "max_input_gap_ms_phase_b_with_retraining": _max_gap_ms(on_sent),
        "max_input_gap_ms_phase_b_without_retraining": _max_gap_ms(off_sent),
        "phase_b_sent_events_per_s": rate(on_sent),
        "phase_b_sent_events_per_s_without": rate(off_sent),
        "new_item_sessions_recall@20_with_retraining": with_new["recall@20"],
        "new_item_sessions_recall@20_without_retraining": without_new["recall@20"],
        "n_predictions": with_q["n_predictions"],
        "n_predictions_without": without_q["n_predictions"],
        "swaps": len({r.value["model_version"] for r in on_outputs} - {on["initial_version"]}),
        **{k: stats[k] for k in ("rounds", "promotions", "rejections", "round_train_seconds")},
        "round_seconds": [
            d.get("round_seconds") for d in on["decisions"] if d.get("decision") == "promoted"
        ],
        "phase_b_events": len(data["phase_b"]),
        "phase_b_seconds": on["b_seconds"],
        "phase_b_seconds_without": off["b_seconds"],
        "a_prime_events": len(data["a_prime"]),
        "a_train_events": len(data["a_train"]),
        "items_per_phase": args.items,
        "answered": len(on["outputs"]),
        "answered_without": len(off["outputs"]),
    }


def run_drift(args: argparse.Namespace) -> dict[str, Any]:
    if (args.base_model is None) != (args.base_data is None):
        raise UserError("--base-model and --base-data go together")
    data = _drift_data(args)
    with kafka_or_local(args.broker) as bootstrap, work_directory(args.work_dir, "drift") as work:
        if args.base_model is not None:
            model_dir = Path(args.base_model)
        else:
            _log(
                f"training the phase-A model ({len(data['a_train']):,} events, {args.items} "
                f"items, {args.initial_epochs} epochs)"
            )
            config = GRU4RecConfig(n_epochs=args.initial_epochs)
            initial, _ = train(
                data["a_train"], config, seed=args.seed, device=args.device, progress=False
            )
            model_dir = work / "phase-a-model"
            save_model(initial, model_dir)
        on = _drift_run(bootstrap, data, model_dir, work, args, retraining=True)
        off = _drift_run(bootstrap, data, model_dir, work, args, retraining=False)
        if args.work_dir:
            _dump(work / "observations-on.jsonl", on, data["new_items"])
            _dump(work / "observations-off.jsonl", off, data["new_items"])
    return drift_figures(on, off, data, args)


# ------------------------------------------------------------------------------ parsers


def add_parsers(benches: argparse._SubParsersAction) -> None:
    p = benches.add_parser(
        "incremental",
        help="trainer fine-tuning on a stream vs training from scratch",
        description="Train on TRAIN, publish; replay STREAM while `streamrec trainer` "
        "fine-tunes; compare the final model's Recall@20 on TEST with a model "
        "trained from scratch on TRAIN+STREAM.",
    )
    p.add_argument("--initial", required=True, help="click log the initial model is trained on")
    p.add_argument("--stream", required=True, help="click log replayed to the trainer")
    p.add_argument("--test", required=True, help="click log for the offline evaluation")
    p.add_argument(
        "--scratch",
        default=None,
        help="training log of the scratch model (default: INITIAL+STREAM)",
    )
    p.add_argument(
        "--initial-epochs",
        type=int,
        default=10,
        help="epochs of the initial and the scratch model (default 10)",
    )
    p.add_argument(
        "--no-replay-log",
        action="store_true",
        help="do not give the trainer INITIAL as --replay-log",
    )
    p.add_argument(
        "--speed",
        default=None,
        help="replay speed: 'max' or a time-compression factor (default: the "
        "stream's event-time span over STREAM_ROUNDS x INTERVAL)",
    )
    p.add_argument(
        "--stream-rounds",
        type=int,
        default=6,
        help="with the default speed: trainer intervals the stream lasts (6)",
    )
    p.add_argument(
        "--settle-timeout",
        type=float,
        default=300.0,
        help="longest wait for the trainer's last round (s)",
    )
    p.add_argument("--broker", default=None, help="use this Kafka instead of a local one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    _add_trainer_options(p, INCREMENTAL_TRAINER_OPTIONS, INCREMENTAL_TRAINER_DEFAULTS)
    p.set_defaults(measure=run_incremental)

    p = benches.add_parser(
        "drift",
        help="new items appear: online Recall@20 with and without the trainer",
        description="Synthetic drift (phase B brings new items) served by a worker following "
        "a registry, with and without `streamrec trainer`.",
    )
    p.add_argument(
        "--items",
        type=int,
        default=300,
        help="items per phase (300); with --base-model, the new items of phase B",
    )
    p.add_argument(
        "--base-model",
        default=None,
        help="serve this trained model directory instead of training one on phase A "
        "(a large catalogue); needs --base-data",
    )
    p.add_argument(
        "--base-data",
        default=None,
        help="click log of sessions the base model knows (e.g. its held-out part): "
        "the A traffic of A' and of phase B",
    )
    p.add_argument(
        "--train-sessions",
        type=int,
        default=4000,
        help="phase-A sessions of the initial model (4000)",
    )
    p.add_argument("--a-sessions", type=int, default=1500, help="A' sessions (1500)")
    p.add_argument(
        "--b-sessions",
        type=int,
        default=6000,
        help="new-item sessions of phase B (6000; plus a third as many A ones)",
    )
    p.add_argument("--rate", type=float, default=1000.0, help="phase-B events/s (1000)")
    p.add_argument(
        "--speed",
        type=float,
        default=120.0,
        help="event-time seconds per wall second in phase B (120: the 120 s "
        "session timeout passes in about 1 s)",
    )
    p.add_argument("--initial-epochs", type=int, default=5)
    p.add_argument("--model-poll-s", type=float, default=1.0, help="worker --model-poll-s")
    p.add_argument(
        "--trainer-threads",
        type=int,
        default=1,
        help="OMP_NUM_THREADS of the trainer (1: leave a core to the worker)",
    )
    p.add_argument(
        "--swap-window-s",
        type=float,
        default=1.0,
        help="max_swap_gap_ms looks at outputs this close to a swap",
    )
    p.add_argument("--broker", default=None, help="use this Kafka instead of a local one")
    p.add_argument(
        "--work-dir",
        default=None,
        help="keep the worker and trainer logs and the raw observations "
        "(observations-on/off.jsonl) in this directory",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cpu for the trainer)")
    _add_trainer_options(p, DRIFT_TRAINER_OPTIONS, DRIFT_TRAINER_DEFAULTS)
    p.set_defaults(measure=run_drift)
