"""``streamrec bench stream``: end-to-end throughput and latency of one worker.

For each catalogue size (untrained GRU4Rec with 100 units, indexed as a trained version
would be: scoring cost does not depend on the weights), or each trained model given with
``--model``, one worker process serves a synthetic stream (or ``--data``'s sessions) on
the local Kafka with ``--ranking``:

- throughput: clicks replayed as fast as possible; events/s from the first click produced
  to the last recommendation consumed;
- latency: clicks replayed at 1,000 events/s; click produced -> recommendation consumed,
  p50 and p99;
- the scoring ceiling: the same model's batched GRU step + full-catalogue top-k in this
  process, without Kafka;
- and once, the engine ceiling: a no-op Faust agent (same Faust settings, consume ->
  produce, no model) on the same broker;
- ``recall_vs_exact@20``: over the throughput run's first sessions (``--recall-sample``
  clicks), the mean share of the exact top-20 that the served top-20 holds (1.0 when the
  ranking is exact). Random vectors say nothing about an index's recall: measure it on a
  model trained on structured clicks (``--model``, ``--data``);
- the worker's peak RSS and the seconds its model's index took to build.

``ratio`` = events/s / min(scoring ceiling, no-op ceiling): how much of the achievable
throughput the worker delivers. During each throughput run the worker's CPU time per
click (``worker_cpu_us_per_event``, all its threads) and the machine's busy cores
(``machine_busy_cores``: broker, clients and worker together) tell whether the worker was
bound by its own CPU or by a machine with no core to spare (Linux only; null elsewhere).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from confluent_kafka import Producer

from model.artifact import load_model, save_model
from model.config import GRU4RecConfig
from model.data import ClickLog, ItemMap, read_clicks
from model.errors import UserError
from model.inference import Recommender
from model.item_index import RANKINGS
from model.network import GRU4RecNetwork
from model.synth import SynthSpec, generate
from stream.devtools.brokers import kafka_or_local
from stream.devtools.ports import free_port
from stream.devtools.processes import (
    Received,
    StreamNames,
    WorkerProcess,
    collector_paused,
    scrape_histogram,
    start_readers,
)
from stream.devtools.procfs import cpu_seconds, machine_busy_seconds, peak_rss_mib
from stream.kafka.config import producer_config
from stream.kafka.log_sender import replay
from stream.kafka.wire import Click, encode_click
from stream.serving import faust_patches
from stream.serving.app import faust_app, raw_topic, run_app
from stream.serving.availability import availability_value, ensure_availability_topic
from stream.serving.settings import WorkerSettings

PARTITIONS = 4


def untrained_model(n_items: int, directory: Path, indexed: bool = False) -> Recommender:
    """A default-sized GRU4Rec over ``n_items`` synthetic items, saved to ``directory``
    (``indexed``: with the item index a trained version of that size gets)."""
    config = GRU4RecConfig()
    network = GRU4RecNetwork(config, n_items, generator=torch.Generator().manual_seed(0))
    popularity = 1.0 / np.arange(1, n_items + 1)
    recommender = Recommender(
        network, ItemMap(str(i + 1) for i in range(n_items)), popularity, config
    )
    seconds = recommender.build_index() if indexed else 0.0
    training = {"index_seconds": seconds} if recommender.index is not None else None
    save_model(recommender, directory, training=training)
    return recommender


def scoring_ceiling(recommender: Recommender, batch: int = 256, seconds: float = 3.0) -> float:
    """Events/s of the batched GRU step + top-20 over the catalogue, in this process."""
    states = torch.randn(batch, recommender.state_size) * 0.1
    items = torch.randint(0, recommender.n_items, (batch,))
    started = torch.ones(batch, dtype=torch.bool)
    done = 0
    begin = time.perf_counter()
    while time.perf_counter() - begin < seconds:
        new_states = recommender.step(states, items)
        recommender.top_k(new_states, started, 20)
        done += batch
    return done / (time.perf_counter() - begin)


class CpuMeter:
    """CPU seconds used by one process, and by the whole machine, since creation: whether
    a run was bound by the worker's own CPU, or by a machine with no core left."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self._start = (cpu_seconds(pid), machine_busy_seconds(), time.monotonic())

    def per_event_and_busy_cores(self, events: int) -> tuple[float | None, float | None]:
        """The process's CPU microseconds per event, and the machine's busy cores (None
        where /proc cannot tell)."""
        process, machine, begun = self._start
        per_event = (cpu_seconds(self._pid) - process) / events * 1e6
        busy = (machine_busy_seconds() - machine) / (time.monotonic() - begun)
        return (None if math.isnan(per_event) else per_event, None if math.isnan(busy) else busy)


def _clicks(prefix: str, count: int, n_items: int, seed: int, rate: float | None) -> list[Click]:
    """``count`` synthetic clicks; with ``rate``, event times spaced 1/rate apart."""
    log = generate(SynthSpec(sessions=max(count // 3, 1), items=n_items, seed=seed))
    order = np.argsort(log.times, kind="stable")[:count]
    times = (np.arange(len(order)) / rate) if rate else log.times[order]
    return [
        Click(f"{prefix}{log.session_ids[log.sessions[k]]}", log.item_ids[log.items[k]], float(t))
        for k, t in zip(order, times)
    ]


def _log_clicks(
    log: ClickLog, prefix: str, count: int, seed: int, rate: float | None
) -> list[Click]:
    """``count`` clicks of whole sessions of ``log`` (from a point ``seed`` picks), in
    event-time order; with ``rate``, event times spaced 1/rate apart."""
    offsets = log.session_offsets()
    first = np.random.default_rng(seed).integers(0, max(log.n_sessions - 1, 1))
    order = np.argsort(log.times[offsets[first] :], kind="stable")[:count] + offsets[first]
    times = (np.arange(len(order)) / rate) if rate else log.times[order]
    return [
        Click(f"{prefix}{log.session_ids[log.sessions[k]]}", log.item_ids[log.items[k]], float(t))
        for k, t in zip(order, times)
    ]


def recall_vs_exact(
    recommender: Recommender, clicks: list[Click], answers: list[Received], sample: int, k: int = 20
) -> float:
    """Mean share of the exact top-``k`` held by the served top-``k``, over the clicks of
    the first sessions (at least ``sample`` clicks), replayed here with exact ranking."""
    served: dict[str, dict[tuple[int, int], list[str]]] = {}
    for answer in answers:  # a redelivered click's answers share its source: kept once
        source = answer.value["source"]
        served.setdefault(answer.value["session_id"], {})[
            (source["partition"], source["offset"])
        ] = [r["item_id"] for r in answer.value["recommendations"][:k]]
    sessions: dict[str, list[str]] = {}
    taken = 0
    for click in clicks:
        if click.session_id in sessions or taken < sample:
            sessions.setdefault(click.session_id, []).append(click.item_id)
            taken += 1
    ranking = "approximate" if recommender.approximate else "exact"
    recommender.use_ranking("exact")
    shares = []
    ids = list(sessions)
    states = recommender.initial_states(len(ids))
    started = torch.zeros(len(ids), dtype=torch.bool)
    for position in range(max(map(len, sessions.values()), default=0)):
        rows = [i for i, s in enumerate(ids) if position < len(sessions[s])]
        items = torch.tensor(
            [recommender.item_map.index_of(sessions[ids[i]][position]) for i in rows]
        )
        index = torch.tensor(rows)
        states[index] = recommender.step(states[index], items)
        started[index] |= items >= 0
        exact, _ = recommender.top_k(states[index], started[index], k)
        for row, best in zip(rows, exact.tolist()):
            answered = served.get(ids[row], {})
            if position < len(answered):
                wanted = {recommender.item_map.ids[i] for i in best}
                published = answered[sorted(answered)[position]]
                shares.append(len(wanted & set(published)) / len(wanted))
    recommender.use_ranking(ranking)
    return float(np.mean(shares)) if shares else math.nan


def _produce_paced(bootstrap: str, topic: str, clicks: list[Click], rate: float) -> None:
    """Send ``clicks`` at ``rate`` per second from a producer that is already connected.

    A fresh producer holds its first messages while it connects, and their creation time
    would count that wait as pipeline latency; the last click is sent first as a warm-up
    (its duplicate is harmless: it is answered twice, and measured once).
    """
    producer = Producer(producer_config(bootstrap, **{"linger.ms": 1}))
    key, value = encode_click(clicks[-1])
    producer.produce(topic, key=key, value=value)
    producer.flush(30)
    started = time.perf_counter()
    for i, click in enumerate(clicks):
        delay = started + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        key, value = encode_click(click)
        producer.produce(topic, key=key, value=value)
        producer.poll(0)
    if producer.flush(30):
        raise UserError("paced clicks were not all delivered within 30 s")


ClickMaker = Callable[[str, int, int, "float | None"], list[Click]]


def measure(
    bootstrap: str,
    model_dir: Path,
    make_clicks: ClickMaker,
    events: int,
    work: Path,
    subcommand: tuple[str, ...] = ("worker",),
    *worker_args: str,
    unavailable: Sequence[str] = (),
) -> dict[str, Any]:
    """Throughput (max speed) then latency (1,000 events/s) of one worker process; also
    the burst's clicks and answers and the worker's peak RSS. With ``unavailable`` items,
    the worker starts with them unavailable, and during the latency run they are switched
    on and off again (:class:`AvailabilityFlips`): the worker's propagation delays."""
    with collector_paused():  # the readers' consume times are the measurement
        names = StreamNames("bench")
        inputs, outputs = start_readers(bootstrap, names, PARTITIONS)
        web_port = free_port()
        flips = AvailabilityFlips(bootstrap, names.availability, list(unavailable))
        worker = WorkerProcess(
            bootstrap,
            model_dir,
            names,
            work,
            "--web-port",
            str(web_port),
            *worker_args,
            partitions=PARTITIONS,
            subcommand=subcommand,
        ).start()
        try:
            worker.wait_until_consuming(bootstrap, names.app_id)
            burst = make_clicks("a", events, 1, None)
            cpu = CpuMeter(worker.process.pid)  # type: ignore[union-attr]
            replay(burst, bootstrap, names.clicks, speed="max")
            if not outputs.wait_for(len(burst), timeout=300):
                raise UserError(
                    f"only {len(outputs.messages)} of {len(burst)} answered:\n"
                    + worker.log()[-2000:]
                )
            cpu_us_per_event, busy_cores = cpu.per_event_and_busy_cores(len(burst))
            inputs.wait_for(len(burst), timeout=30)
            first_sent = min(m.timestamp()[1] for m in inputs.messages) / 1000.0
            throughput = len(burst) / (outputs.messages[len(burst) - 1].consumed_at - first_sent)
            paced = make_clicks("b", min(events, 5000), 2, 1000.0)
            with flips:
                _produce_paced(bootstrap, names.clicks, paced, rate=1000.0)
            total = len(burst) + len(paced) + 1
            outputs.wait_for(total, timeout=120)
            inputs.wait_for(total, timeout=30)
            rss = peak_rss_mib(worker.process.pid)  # type: ignore[union-attr]
            delays = scrape_histogram(web_port, "streamrec_availability_delay_seconds")
        finally:
            worker.stop()
            inputs.close()
            outputs.close()
    sent = {(m.partition(), m.offset()): m.timestamp()[1] / 1000.0 for m in inputs.messages}
    latencies = [
        r.consumed_at - sent[(r.value["source"]["partition"], r.value["source"]["offset"])]
        for r in outputs.messages[len(burst) + 1 :]
        if (r.value["source"]["partition"], r.value["source"]["offset"]) in sent
    ]
    p50, p99 = np.percentile(latencies, [50, 99]) * 1000
    return {
        "events_per_s": throughput,
        "p50_ms": float(p50),
        "p99_ms": float(p99),
        "cpu_us_per_event": cpu_us_per_event,
        "busy_cores": busy_cores,
        "peak_rss_mib": rss,
        "clicks": burst,
        "answers": outputs.messages[: len(burst)],
        "availability_changes": delays.count if delays else 0,
        "availability_delay_p50_ms_at_most": delays.at_most(0.5) * 1000 if delays else None,
        "availability_delay_p99_ms_at_most": delays.at_most(0.99) * 1000 if delays else None,
    }


class AvailabilityFlips:
    """The bench's availability topic: ``items`` marked unavailable at creation; while
    entered, one of them switched available and back every 50 ms (20 changes/s), so the
    worker measures its propagation delay under load."""

    def __init__(self, bootstrap: str, topic: str, items: list[str]) -> None:
        self.topic, self.items = topic, items
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._flip, daemon=True)
        if not items:
            return
        ensure_availability_topic(bootstrap, topic)
        self._producer = Producer(producer_config(bootstrap, **{"linger.ms": 5}))
        for item in items:
            self._send(item, available=False)
        if self._producer.flush(60):
            raise UserError("the bench's availability records were not delivered in 60 s")

    def _send(self, item: str, available: bool) -> None:
        value = availability_value(available)
        self._producer.produce(self.topic, key=item.encode(), value=value)
        self._producer.poll(0)

    def _flip(self) -> None:
        for n in range(len(self.items) * 2):
            if self._stop.wait(0.05):
                return
            self._send(self.items[n // 2], available=n % 2 == 0)

    def __enter__(self) -> AvailabilityFlips:
        if self.items:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.items:
            self._stop.set()
            self._thread.join()
            self._producer.flush(30)


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.torch_threads)
    log = read_clicks(args.data) if args.data else None
    with (
        kafka_or_local(args.broker) as bootstrap,
        tempfile.TemporaryDirectory(prefix="streamrec-bench-") as tmp,
    ):
        work = Path(tmp)
        noop_model = work / "noop-model"
        untrained_model(10, noop_model)
        print("measuring the no-op Faust agent", file=sys.stderr)
        noop = measure(
            bootstrap,
            noop_model,
            _synthetic_clicks(10),
            args.events,
            work,
            ("bench", "noop-worker"),
        )
        runs = []
        for model_dir in _models(args, work):
            started = time.perf_counter()
            recommender = load_model(model_dir)
            load_seconds = time.perf_counter() - started
            ranking = recommender.use_ranking(args.ranking)
            unavailable = _unavailable(recommender, args.unavailable)
            recommender.restrict(unavailable)  # the ceiling and the exact lists obey them
            ceiling = scoring_ceiling(recommender)
            print(
                f"{recommender.n_items:,} items, ranking {ranking}: scoring ceiling "
                f"{ceiling:,.0f} events/s; measuring the worker",
                file=sys.stderr,
            )
            make_clicks = (
                functools.partial(_log_clicks, log)
                if log is not None
                else _synthetic_clicks(recommender.n_items)
            )
            result = measure(
                bootstrap,
                model_dir,
                make_clicks,
                args.events,
                work,
                ("worker",),
                "--torch-threads",
                str(args.torch_threads),
                "--ranking",
                args.ranking,
                unavailable=unavailable,
            )
            recall = recall_vs_exact(
                recommender, result["clicks"], result["answers"], args.recall_sample
            )
            runs.append(
                {
                    "items": recommender.n_items,
                    "model": str(model_dir) if args.model else "untrained",
                    "ranking": ranking,
                    "events_per_s": result["events_per_s"],
                    "ceiling_events_per_s": ceiling,
                    "ratio": result["events_per_s"] / min(ceiling, noop["events_per_s"]),
                    "p50_ms": result["p50_ms"],
                    "p99_ms": result["p99_ms"],
                    "p99_ms_at_1000_per_s": result["p99_ms"],
                    "worker_cpu_us_per_event": result["cpu_us_per_event"],
                    "machine_busy_cores": result["busy_cores"],
                    "worker_peak_rss_mib": result["peak_rss_mib"],
                    "model_load_seconds": load_seconds,
                    "index_build_seconds": recommender.metadata.get("training", {}).get(
                        "index_seconds"
                    ),
                    "recall_vs_exact@20": recall,
                    "unavailable_items": len(unavailable),
                    **{k: v for k, v in result.items() if k.startswith("availability_")},
                }
            )
            print(json.dumps(runs[-1]), file=sys.stderr)
    return {
        "noop_events_per_s": noop["events_per_s"],
        "noop_p99_ms": noop["p99_ms"],
        "noop_cpu_us_per_event": noop["cpu_us_per_event"],
        "noop_machine_busy_cores": noop["busy_cores"],
        "cores": os.cpu_count(),
        "events_per_run": args.events,
        "torch_threads": args.torch_threads,
        "runs": runs,
    }


def _models(args: argparse.Namespace, work: Path) -> Iterator[Path]:
    """The models to serve: those given, or an untrained (indexed) one per size."""
    if args.model:
        yield from map(Path, args.model)
        return
    for n_items in args.items:
        model_dir = work / f"model-{n_items}"
        untrained_model(n_items, model_dir, indexed=True)
        yield model_dir
        shutil.rmtree(model_dir)  # a 5M-item model is 2 GB of disk


def _unavailable(recommender: Recommender, share: float) -> list[str]:
    """A random ``share`` of the catalogue (seeded): the items the run marks unavailable."""
    count = int(round(share * recommender.n_items))
    chosen = np.random.default_rng(0).choice(recommender.n_items, count, replace=False)
    return [recommender.item_map.ids[i] for i in sorted(chosen)]


def _synthetic_clicks(n_items: int) -> ClickMaker:
    return lambda prefix, count, seed, rate: _clicks(prefix, count, n_items, seed, rate)


def run_noop_worker(args: argparse.Namespace) -> int:
    """A Faust agent that answers each click with its source and nothing else."""
    settings = WorkerSettings.from_args(args)
    faust_patches.apply(settings.fetch_max_wait_ms)
    app = faust_app(settings)
    clicks = raw_topic(app, settings, settings.input_topic)
    output = raw_topic(app, settings, settings.output_topic)

    @app.agent(clicks, concurrency=1)
    async def echo(stream: Any) -> None:  # a faust.StreamT (faust stays in serving)
        async for events in stream.take_events(
            settings.batch_size, within=settings.batch_ms / 1000.0
        ):
            deliveries = []
            for event in events:
                message = event.message
                value = json.dumps(
                    {
                        "session_id": message.key.decode(),
                        "item_id": "",
                        "recommendations": [],
                        "source": {"partition": message.partition, "offset": message.offset},
                    }
                ).encode()
                deliveries.append(
                    await output.send(
                        key=message.key, value=value, partition=message.partition, force=True
                    )
                )
            await asyncio.gather(*deliveries)

    return run_app(app, settings)


def add_parsers(benches: argparse._SubParsersAction) -> None:
    p = benches.add_parser(
        "stream",
        help="end-to-end throughput and latency of one worker",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "--items",
        type=int,
        nargs="+",
        default=[3000, 40000, 100000],
        help="catalogue sizes to measure (default: 3000 40000 100000)",
    )
    p.add_argument(
        "--model",
        nargs="+",
        default=None,
        help="trained model directories to serve instead of untrained ones per --items",
    )
    p.add_argument(
        "--data",
        default=None,
        help="click log whose sessions are sent (default: synthetic clicks over the "
        "catalogue); with --model, the log the model was trained on or its test part",
    )
    p.add_argument(
        "--ranking",
        choices=RANKINGS,
        default="auto",
        help="the worker's --ranking (default auto)",
    )
    p.add_argument(
        "--recall-sample",
        type=int,
        default=2000,
        help="clicks whose served lists are compared with the exact top-20 (default 2000)",
    )
    p.add_argument(
        "--unavailable",
        type=_share,
        default=0.0,
        help="share of the catalogue marked unavailable on the availability topic "
        "(e.g. 0.1); one of them is switched on and off every 50 ms during the latency "
        "run, for the propagation delay (default 0: no rules)",
    )
    p.add_argument("--events", type=int, default=20000, help="clicks per throughput run")
    p.add_argument("--broker", default=None, help="use this Kafka instead of starting a local one")
    p.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch threads of the worker and of the scoring ceiling (default 1)",
    )
    p.set_defaults(measure=run)
    p = benches.add_parser(
        "noop-worker",
        help="(used by bench stream) a no-op Faust agent",
        description="Consume clicks and produce an empty answer for each: "
        "the Faust engine's own ceiling.",
    )
    WorkerSettings.add_arguments(p)
    p.set_defaults(run=run_noop_worker)


def _share(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value
