"""``streamrec demo``: the whole product on one machine in about a minute, no Docker.

Starts a local broker (Tansu by default: pip-only, no Java), makes a synthetic click log
(or uses ``--data``), trains a small GRU4Rec on the earlier part, starts a worker
process, replays the later part into Kafka, shows live recommendations as they are
consumed from the output topic, and ends with a summary: throughput, latencies, and
the recommendation quality measured on the stream (compared with the offline evaluation of
the same clicks).

Latency is reported in three spans, each containing the one before:

* ``worker_consume_to_publish``: the worker's own time from consuming a click to
  publishing its answer, from the worker's ``/metrics`` histogram (the mean, which is
  exact, and the bucket bound that holds the p99).
* ``click_to_answer``: from the click's Kafka timestamp (stamped by the replaying producer
  as it sends) to the answer's (stamped by the worker's producer as it publishes), so it
  adds the click's way to the worker's code: the broker's answer to the worker's fetch,
  Faust's buffers, and any queue when the worker or the machine is busy.
* ``produced_to_consumed``: from the click's Kafka timestamp to the moment the demo's own
  reader has the answer, so it adds the broker's answer to that reader's fetch.

The embedded Tansu broker answers waiting fetches late, so with it the outer spans were
hundreds of milliseconds, varying from run to run, around the worker's ten or twenty.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Container
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import Message

from model.artifact import save_model
from model.config import GRU4RecConfig
from model.data import ClickLog, read_clicks, time_split
from model.errors import UserError
from model.evaluate import RecommenderScorer, evaluate
from model.synth import SynthSpec, generate
from model.train import train
from stream.cli.base import print_json
from stream.devtools.brokers import LocalKafka, Tansu, tansu_binary
from stream.devtools.ports import free_port
from stream.devtools.processes import (
    Received,
    StreamNames,
    WorkerProcess,
    scrape_histogram,
    start_readers,
)
from stream.kafka.log_sender import replay
from stream.quality import online_quality

PARTITIONS = 4


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _demo_log(args: argparse.Namespace) -> ClickLog:
    if args.data:
        return read_clicks(args.data)
    return generate(SynthSpec(sessions=args.sessions, items=args.items, seed=args.seed))


def _show(received: Received) -> str:
    value = received.value
    top = ", ".join(r["item_id"] for r in value["recommendations"][:5])
    return f"  session {value['session_id']:>8} clicked {value['item_id']:>10} -> {top}, ..."


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if args.engine == "tansu":
        tansu_binary()  # not installed: say so now, not after training
    log = _demo_log(args)
    train_log, stream_log = time_split(log, 0.8)
    _say(f"[1/4] training GRU4Rec on {len(train_log):,} clicks ({train_log.n_sessions:,} sessions)")
    recommender, stats = train(
        train_log, GRU4RecConfig(n_epochs=args.epochs, n_sample=512), seed=args.seed, progress=True
    )
    offline = evaluate(RecommenderScorer(recommender), stream_log, ks=(20,))
    broker = LocalKafka(port=0) if args.engine == "kafka" else Tansu(port=0)
    with tempfile.TemporaryDirectory(prefix="streamrec-demo-") as tmp, broker:
        work = Path(tmp)
        model_dir = save_model(recommender, work / "model")
        _say(f"[2/4] {args.engine} broker ready at {broker.bootstrap}; starting a worker")
        names = StreamNames("demo")
        inputs, outputs = start_readers(broker.bootstrap, names, PARTITIONS)
        web_port = free_port()  # for the worker's /metrics, read at the end
        worker = WorkerProcess(
            broker.bootstrap,
            model_dir,
            names,
            work,
            "--web-port",
            str(web_port),
            partitions=PARTITIONS,
        ).start()
        try:
            worker.wait_until_consuming(broker.bootstrap, names.app_id)
            span = float(stream_log.times.max() - stream_log.times.min())
            speed = max(span / args.replay_seconds, 1.0)
            _say(
                f"[3/4] replaying {len(stream_log):,} clicks into '{names.clicks}' at "
                f"{speed:,.0f}x real time"
            )
            sent = replay(stream_log, broker.bootstrap, names.clicks, speed=speed)
            if sent.failed:
                raise UserError(f"replay failed: {sent.first_error}")
            shown = 0
            deadline = time.monotonic() + args.timeout
            while len(outputs.messages) < sent.events_sent and time.monotonic() < deadline:
                while shown < min(5, len(outputs.messages)):
                    _say(_show(outputs.messages[shown]))
                    shown += 1
                time.sleep(0.1)
            inputs.wait_for(sent.events_sent, 10)
            worker_time = _worker_consume_to_publish(web_port)
        finally:
            exit_code = worker.stop()
            inputs.close()
            outputs.close()
        if len(outputs.messages) < sent.events_sent:
            raise UserError(
                f"only {len(outputs.messages)} of {sent.events_sent} clicks were "
                f"answered within {args.timeout} s; worker log:\n" + worker.log()[-2000:]
            )
        summary = _summarise(inputs.messages, outputs.messages, recommender.item_map)
    summary.update(worker_time)
    summary.update(
        {
            "engine": args.engine,
            "worker_exit_code": exit_code,
            "offline_recall@20": offline.recall(20),
            "offline_mrr@20": offline.mrr(20),
            "train_seconds": stats.train_seconds,
            "model_version": recommender.version,
            "demo_seconds": time.perf_counter() - started,
        }
    )
    _say(
        f"[4/4] {summary['events']:,} clicks answered at {summary['events_per_s']:,.0f}/s "
        f"as replayed (the pace --replay-seconds sets, not the worker's limit)\n"
        f"{_latency_lines(summary)}"
        f"      online Recall@20 {summary['online_recall@20']:.3f} "
        f"(offline {offline.recall(20):.3f}), MRR@20 {summary['online_mrr@20']:.3f}"
    )
    print_json(summary)
    return 0


def _summarise(
    inputs: list[Message], outputs: list[Received], known_items: Container[str]
) -> dict[str, Any]:
    """Throughput, the latencies measured on Kafka timestamps (see the module docstring)
    and online quality."""
    produced = {(m.partition(), m.offset()): m.timestamp()[1] / 1000.0 for m in inputs}
    to_answer, to_consumed = [], []
    for received in outputs:
        source = received.value["source"]
        sent_at = produced.get((source["partition"], source["offset"]))
        if sent_at is not None:
            to_answer.append(received.kafka_time - sent_at)
            to_consumed.append(received.consumed_at - sent_at)
    first = min(produced.values())
    last = max(r.consumed_at for r in outputs)
    quality = online_quality([r.value for r in outputs], 20, known_items)
    return {
        "events": len(outputs),
        "events_per_s": len(outputs) / max(last - first, 1e-9),
        **_percentiles_ms("click_to_answer", to_answer),
        **_percentiles_ms("produced_to_consumed", to_consumed),
        "online_recall@20": quality.recall,
        "online_mrr@20": quality.mrr,
        "n_predictions": quality.n_predictions,
    }


def _percentiles_ms(name: str, seconds: list[float]) -> dict[str, float]:
    values = np.array(seconds) * 1000
    return {
        f"{name}_p50_ms": float(np.percentile(values, 50)),
        f"{name}_p99_ms": float(np.percentile(values, 99)),
    }


def _latency_lines(summary: dict) -> str:
    mean, p99 = (
        summary["worker_consume_to_publish_mean_ms"],
        summary["worker_consume_to_publish_p99_at_most_ms"],
    )
    worker = (
        "its /metrics did not answer" if mean is None else f"mean {mean:.1f} ms, p99 <= {p99:g} ms"
    )
    spans = [("worker alone: click consumed -> answer published", worker)]
    for key, span in (
        ("click_to_answer", "click produced -> answer published"),
        ("produced_to_consumed", "click produced -> answer read by this demo"),
    ):
        p50, p99 = summary[f"{key}_p50_ms"], summary[f"{key}_p99_ms"]
        spans.append((span, f"p50 {p50:.1f} ms, p99 {p99:.1f} ms"))
    lines = [f"      {span + ':':<51} {figures}\n" for span, figures in spans]
    lines.append(
        "      each span holds the one above; the rest is the click's way to the "
        "worker's code and\n      the answer's to this demo: broker fetches, "
        "buffers and, on a busy machine, queues"
    )
    lines.append(
        "\n      (Tansu, the embedded broker, answers waiting fetches late)\n"
        if summary["engine"] == "tansu"
        else "\n"
    )
    return "".join(lines)


def _worker_consume_to_publish(web_port: int) -> dict[str, float | None]:
    """The worker's own time from consuming a click to publishing its answer, from the
    histogram on its /metrics: the mean (exact) and the bound of the bucket with the p99."""
    summary = scrape_histogram(web_port, "streamrec_consume_to_publish_seconds")
    return {
        "worker_consume_to_publish_mean_ms": summary.mean * 1000 if summary else None,
        "worker_consume_to_publish_p99_at_most_ms": summary.at_most(0.99) * 1000
        if summary
        else None,
    }


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the whole pipeline locally and print a summary",
        description="Broker, training, worker, replay and live recommendations on one "
        "machine. Last stdout line is a JSON summary.",
    )
    parser.add_argument(
        "--engine",
        choices=("tansu", "kafka"),
        default="tansu",
        help="local broker: tansu (pip only, default) or kafka (needs Java)",
    )
    parser.add_argument("--data", default=None, help="click log to use instead of synthetic clicks")
    parser.add_argument("--sessions", type=int, default=5000, help="synthetic sessions")
    parser.add_argument("--items", type=int, default=1000, help="synthetic catalogue size")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--replay-seconds",
        type=float,
        default=20.0,
        help="compress the replayed clicks' event time into about this long",
    )
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for all recommendations"
    )
    parser.set_defaults(run=run)
