"""`streamrec replay`: send a click log to Kafka in event-time order, as live traffic would come.

The demo, the benchmarks and the end-to-end tests all need realistic input for the
streaming workers: clicks of many sessions interleaved in time, each keyed by its session so
that it lands on the partition (and worker) that holds the session's state. A click log is
stored session by session, so replaying it means re-sorting it by time across sessions.

Guarantees:

* **Order.** Events are sent globally sorted by event time. The sort is stable: events with
  equal times keep the order :func:`model.data.read_clicks` gives them (session by first
  appearance, then file order), so a session's clicks never swap places and a replay is
  the same sequence on every run.
* **Partitioning.** The key is the raw UTF-8 session id and the producer hashes it with
  murmur2 like Java, aiokafka and Faust (:func:`stream.kafka.config.producer_config`), so
  a session's clicks share one partition with everything else the product writes for it.
  The idempotent producer (``acks=all``) keeps each partition in send order despite retries.
* **Nothing silently lost.** The producer is flushed before returning, also after Ctrl-C;
  every event is either acknowledged by the broker or counted as a delivery error. After
  the first delivery error no new events are sent (later clicks of a session would arrive
  without the earlier one), and the command exits non-zero.
* **Tolerant input.** Unlike the trainer's :func:`model.data.read_clicks`, which stops at
  the first bad row, replay skips rows the consumers would reject anyway (empty ids, a
  time that is not a finite non-negative number, ...) and reports how many, with the line
  numbers of the first few: a demo should not fail on one broken line of a 30-million-row
  log. A missing file or column still stops it.

The Kafka message timestamp is left to the producer (the send time): setting it to a
2014 event time would make a broker with time-based retention delete the data at once.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from confluent_kafka import KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient
from tqdm import tqdm

from model.data import DEFAULT_COLUMNS, ClickLog, check_header, read_columns
from model.errors import UserError
from stream.kafka.config import bootstrap_servers, client_config, producer_config
from stream.kafka.wire import MAX_FUTURE_SKEW_S, MAX_ID_BYTES, Click, encode_click

if TYPE_CHECKING:
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]

DEFAULT_TOPIC = "clicks"
#: How many bad rows are described individually; the rest are only counted.
MAX_REPORTED_BAD_ROWS = 10
#: Producer settings of a replay. ``linger.ms`` 5 batches a full-speed replay well while
#: adding at most 5 ms to a paced one.
REPLAY_PRODUCER_SETTINGS: Mapping[str, Any] = {
    "linger.ms": 5,
    "enable.idempotence": True,
    "acks": "all",
}
_CHUNK = 4096  # events converted to Python objects at a time
_POLL_EVERY = 1024  # serve delivery reports at least this often while sending
_MAX_SLEEP_S = 0.1  # longest single sleep while pacing, so Ctrl-C and reports stay prompt
_LOG = logging.getLogger(__name__)
# librdkafka prints every refused connection (and, on a fresh broker, its retries of the
# idempotent producer id) to stderr; failures surface as UserError or delivery errors, so
# its chatter goes to a logger that is silent unless the application configures logging.
_LIBRDKAFKA_LOG = logging.getLogger("stream.kafka.log_sender.librdkafka")
_LIBRDKAFKA_LOG.addHandler(logging.NullHandler())


@dataclass(frozen=True, slots=True)
class BadRow:
    """A skipped input row: its line in the file (the header is line 1) and why."""

    line: int | None  # None for in-memory events; the reason then names the event's index
    reason: str

    def __str__(self) -> str:
        return self.reason if self.line is None else f"line {self.line}: {self.reason}"


@dataclass
class ReplayLog:
    """The good events of a click log in replay order, plus what was skipped.

    Like :class:`model.data.ClickLog`, events are integer codes into id tables, which keeps
    a 30-million-event log in memory without 60 million Python strings; strings are made
    only for the chunk being sent.
    """

    sessions: np.ndarray
    items: np.ndarray
    times: np.ndarray
    session_ids: list[str]
    item_ids: list[str]
    bad_rows: int = 0
    bad_row_examples: tuple[BadRow, ...] = ()
    source: str = "<memory>"

    def __len__(self) -> int:
        return len(self.times)

    def clicks(self, limit: int | None = None) -> Iterator[Click]:
        """The first ``limit`` (default: all) events, in the order a replay sends them."""
        n = len(self) if limit is None else min(limit, len(self))
        session_ids, item_ids = self.session_ids, self.item_ids
        for start in range(0, n, _CHUNK):
            stop = min(start + _CHUNK, n)
            for s, i, t in zip(
                self.sessions[start:stop].tolist(),
                self.items[start:stop].tolist(),
                self.times[start:stop].tolist(),
            ):
                yield Click(session_ids[s], item_ids[i], t)


@dataclass
class ReplayStats:
    """What a replay did; :meth:`as_json` is the CLI's machine-readable result."""

    topic: str
    partitions: int
    events_sent: int  # acknowledged by the broker
    seconds: float  # from the first send until the final flush returned
    bad_rows: int
    delivery_errors: int = 0
    first_error: str | None = None
    bad_row_examples: tuple[BadRow, ...] = ()
    interrupted: bool = False

    @property
    def failed(self) -> bool:
        """Whether anything went wrong in delivery (lost events or a fatal producer error)."""
        return bool(self.delivery_errors or self.first_error)

    @property
    def events_per_s(self) -> float:
        return self.events_sent / self.seconds if self.seconds > 0 else 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "events_sent": self.events_sent,
            "seconds": round(self.seconds, 3),
            "events_per_s": round(self.events_per_s, 1),
            "bad_rows": self.bad_rows,
            "topic": self.topic,
            "partitions": self.partitions,
            "delivery_errors": self.delivery_errors,
        }


class ReplayInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`replay`, raised after the flush; ``stats`` says what was sent.

    A KeyboardInterrupt, so a caller that does not care still stops as on any Ctrl-C.
    """

    def __init__(self, stats: ReplayStats) -> None:
        super().__init__(f"replay interrupted after {stats.events_sent} event(s)")
        self.stats = stats


# --- reading -------------------------------------------------------------------------------


def read_replay_log(
    path: str | os.PathLike[str], columns: Sequence[str] = DEFAULT_COLUMNS, sep: str | None = None
) -> ReplayLog:
    """Read a click log for replay, skipping (and counting) rows the consumers would reject.

    ``columns`` names the session, item and time columns; ``sep`` defaults to ``,`` for
    ``.csv`` files and a tab otherwise, as for :func:`model.data.read_clicks`. Ids are kept
    verbatim (``NA`` is an id, not a missing value). Bad rows: a blank line, an empty id, an
    id over :data:`stream.kafka.wire.MAX_ID_BYTES`, or a time that is not a finite number >= 0
    and at most a day ahead. Raises UserError for a missing file, a missing column or a file
    the CSV parser cannot split into rows at all (an unterminated quote).
    """
    path, sep = check_header(path, columns, sep)
    session_col, item_col, time_col = columns
    frame = read_columns(path, columns, sep, verbatim=True)
    time_text = frame[time_col]
    times = pd.to_numeric(time_text, errors="coerce").to_numpy(dtype=np.float64)
    return _build(
        frame[session_col].cat,
        frame[item_col].cat,
        times,
        time_text.to_numpy(),
        (session_col, item_col, time_col),
        source=str(path),
        lines=True,
    )


def as_replay_log(
    source: str | os.PathLike[str] | ReplayLog | ClickLog | Iterable[Click],
    columns: Sequence[str] = DEFAULT_COLUMNS,
    sep: str | None = None,
) -> ReplayLog:
    """Any supported replay source as a :class:`ReplayLog` (a file is read tolerantly)."""
    if isinstance(source, ReplayLog):
        return source
    if isinstance(source, (str, os.PathLike)):
        return read_replay_log(source, columns, sep)
    names = ("session_id", "item_id", "timestamp")
    if isinstance(source, ClickLog):
        sessions = pd.Categorical.from_codes(source.sessions, categories=source.session_ids)
        items = pd.Categorical.from_codes(source.items, categories=source.item_ids)
        return _build(
            pd.Series(sessions).cat,
            pd.Series(items).cat,
            np.asarray(source.times, dtype=np.float64),
            None,
            names,
            source=source.source,
            lines=False,
        )
    clicks = list(source)
    sessions = pd.Series([c.session_id for c in clicks], dtype="category")
    items = pd.Series([c.item_id for c in clicks], dtype="category")
    times = np.array([_as_float(c.timestamp) for c in clicks], dtype=np.float64)
    return _build(sessions.cat, items.cat, times, None, names, source="<memory>", lines=False)


def _as_float(value: object) -> float:
    if isinstance(value, bool):
        return math.nan
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def _build(
    sessions: Any,
    items: Any,
    times: np.ndarray,
    time_text: np.ndarray | None,
    names: Sequence[str],
    source: str,
    lines: bool,
) -> ReplayLog:
    """Validate rows in input order, drop the bad ones and sort the rest for replay.

    ``sessions``/``items`` are pandas ``.cat`` accessors; checks run once per distinct id
    and are mapped to rows through the codes, which keeps a 30M-row log fast.
    """
    session_col, item_col, time_col = names
    s_codes = sessions.codes.to_numpy()
    i_codes = items.codes.to_numpy()
    s_empty, s_long = _id_problems(sessions.categories, s_codes)
    i_empty, i_long = _id_problems(items.categories, i_codes)
    with np.errstate(invalid="ignore"):
        not_finite = ~np.isfinite(times)
        negative = times < 0
        future = times > time.time() + MAX_FUTURE_SKEW_S
    bad = s_empty | i_empty | s_long | i_long | not_finite | negative | future
    examples: list[BadRow] = []
    for row in np.flatnonzero(bad)[:MAX_REPORTED_BAD_ROWS].tolist():
        text = repr(time_text[row]) if time_text is not None else repr(float(times[row]))
        if s_empty[row] and i_empty[row] and time_text is not None and time_text[row] == "":
            reason = "blank line or no fields"
        elif s_empty[row]:
            reason = f"{session_col} is empty"
        elif i_empty[row]:
            reason = f"{item_col} is empty"
        elif s_long[row] or i_long[row]:
            column = session_col if s_long[row] else item_col
            reason = f"{column} is longer than {MAX_ID_BYTES} bytes"
        elif time_text is not None and time_text[row] == "":
            reason = f"{time_col} is empty"
        elif not_finite[row]:
            reason = f"{time_col} {text} is not a finite number"
        elif negative[row]:
            reason = f"{time_col} {text} is negative (times are Unix seconds)"
        else:
            reason = f"{time_col} {text} is more than a day in the future"
        examples.append(
            BadRow(row + 2, reason) if lines else BadRow(None, f"event #{row}: {reason}")
        )

    good = np.flatnonzero(~bad)
    # Sessions numbered by first appearance, as read_clicks does: the tie-break for equal
    # times, then input order (lexsort is stable).
    first_seen, session_uniques = pd.factorize(s_codes[good], sort=False)
    item_codes, item_uniques = pd.factorize(i_codes[good], sort=False)
    good_times = times[good]
    order = np.lexsort((first_seen, good_times))
    return ReplayLog(
        sessions=first_seen[order].astype(np.int64),
        items=item_codes[order].astype(np.int64),
        times=good_times[order],
        session_ids=[str(x) for x in sessions.categories[session_uniques]],
        item_ids=[str(x) for x in items.categories[item_uniques]],
        bad_rows=int(bad.sum()),
        bad_row_examples=tuple(examples),
        source=source,
    )


def _id_problems(categories: pd.Index, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row masks (empty, too long) computed once per distinct id."""
    values = [str(c) for c in categories]
    empty = np.array([v == "" for v in values] + [True], dtype=bool)  # code -1: missing
    long = np.array([len(v.encode("utf-8")) > MAX_ID_BYTES for v in values] + [False])
    return empty[codes], long[codes]


# --- Kafka -----------------------------------------------------------------------------------


def parse_speed(speed: float | str | None) -> float | None:
    """``"max"``/None -> None (no pacing); a positive number -> the time-compression factor."""
    if speed is None or (isinstance(speed, str) and speed.strip().lower() == "max"):
        return None
    try:
        factor = float(speed)
    except (TypeError, ValueError):
        factor = math.nan
    if not math.isfinite(factor) or factor <= 0:
        raise UserError(
            f"bad speed {speed!r}: use 'max' or a positive factor (2 = twice real time)"
        )
    return factor


def check_topic(bootstrap: str, topic: str, timeout: float = 10.0) -> int:
    """The topic's partition count; UserError if it is missing or the broker is unreachable.

    Done before sending because a producer would otherwise wait for a missing topic until
    its messages time out, and for a dead broker forever. Lists all topics (a request for
    one named topic can auto-create it on brokers that allow that), with the security
    settings from the environment.
    """
    servers = bootstrap_servers(bootstrap)
    admin = AdminClient(client_config(servers, logger=_LIBRDKAFKA_LOG))
    try:
        metadata = admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        raise UserError(
            f"cannot reach a Kafka broker at {servers} within {timeout:g} s "
            f"({exc.args[0].str()}); is it running? `streamrec broker` starts a local one"
        ) from None
    found = metadata.topics.get(topic)
    if found is None:
        raise UserError(
            f"topic {topic!r} does not exist on {servers}; create it first "
            "(streamrec never auto-creates topics: the partition count matters)"
        )
    if found.error is not None:
        raise UserError(f"topic {topic!r} on {servers}: {found.error.str()}")
    return len(found.partitions)


class _Deliveries:
    """Delivery reports and client errors, gathered by librdkafka's callbacks."""

    def __init__(self) -> None:
        self.delivered = 0
        self.failed = 0
        self.first_error: str | None = None
        self.fatal: str | None = None

    def on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is None:
            self.delivered += 1
        else:
            self.failed += 1
            if self.first_error is None:
                self.first_error = err.str()

    def on_error(self, err: KafkaError) -> None:
        # Transient errors (a broker restarting) are retried by librdkafka and surface as
        # delivery errors if they last; only a fatal one (idempotence broken) stops us here.
        if err.fatal():
            self.fatal = err.str()
            if self.first_error is None:
                self.first_error = f"fatal producer error: {err.str()}"
        else:
            _LOG.debug("librdkafka: %s", err.str())


def replay(
    source: str | os.PathLike[str] | ReplayLog | ClickLog | Iterable[Click],
    bootstrap: str,
    topic: str = DEFAULT_TOPIC,
    speed: float | str | None = "max",
    limit: int | None = None,
    *,
    columns: Sequence[str] = DEFAULT_COLUMNS,
    sep: str | None = None,
    progress: bool = False,
    connect_timeout: float = 10.0,
    delivery_timeout: float = 60.0,
    producer_overrides: Mapping[str, Any] | None = None,
) -> ReplayStats:
    """Send a click log to ``topic`` in event-time order; return once all is acknowledged.

    ``source`` is a log file (read tolerantly, see :func:`read_replay_log`), a
    :class:`ReplayLog`, a :class:`model.data.ClickLog` or :class:`~stream.kafka.wire.Click`
    objects; in-memory events are validated and sorted the same way. ``bootstrap`` may be
    any form :func:`stream.kafka.config.bootstrap_servers` accepts. ``speed`` is ``"max"``
    or a factor: event-time gaps are divided by it (1 = real time), so a paced replay
    reproduces the log's burstiness; if sending cannot keep up, events go out as fast as
    possible. ``limit`` sends only the first events of the replay order.

    The topic must exist (UserError otherwise, or if no broker answers within
    ``connect_timeout`` s). Delivery errors, including events still unacknowledged
    ``delivery_timeout`` s after being sent, are counted in the result rather than raised;
    after the first one nothing new is sent. Ctrl-C flushes what was sent and raises
    :class:`ReplayInterrupted` carrying the stats.
    """
    servers = bootstrap_servers(bootstrap)
    factor = parse_speed(speed)
    if limit is not None and limit < 0:
        raise UserError(f"bad limit {limit}: must be 0 or more")
    log = as_replay_log(source, columns, sep)
    if log.bad_rows and not isinstance(source, ReplayLog):  # else the caller has seen them
        _LOG.warning(
            "%s: skipped %d bad row(s): %s",
            log.source,
            log.bad_rows,
            "; ".join(map(str, log.bad_row_examples)),
        )
    partitions = check_topic(servers, topic, connect_timeout)
    n = len(log) if limit is None else min(limit, len(log))

    deliveries = _Deliveries()
    config = producer_config(
        servers,
        **{
            **REPLAY_PRODUCER_SETTINGS,
            "message.timeout.ms": max(1, int(delivery_timeout * 1000)),
            "logger": _LIBRDKAFKA_LOG,
            "error_cb": deliveries.on_error,
            "on_delivery": deliveries.on_delivery,
            **(producer_overrides or {}),
        },
    )
    try:
        producer = Producer(config)
    except KafkaException as exc:
        raise UserError(f"bad Kafka producer settings: {exc.args[0].str()}") from None

    bar = tqdm(
        total=n,
        unit="ev",
        unit_scale=True,
        file=sys.stderr,
        disable=not progress,
        desc=f"replay -> {topic}",
        mininterval=0.5,
        smoothing=0.1,
    )
    interrupted = False
    start = time.monotonic()
    try:
        _send(producer, topic, log, n, factor, deliveries, bar, start)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    # Every event enqueued is delivered or failed within message.timeout.ms; the margin
    # only guards against a stuck client.
    unacknowledged = producer.flush(delivery_timeout + 5.0)
    seconds = time.monotonic() - start
    failed = deliveries.failed + unacknowledged
    first_error = deliveries.first_error
    if unacknowledged and first_error is None:
        first_error = f"{unacknowledged} event(s) still unacknowledged after the final flush"
    stats = ReplayStats(
        topic=topic,
        partitions=partitions,
        events_sent=deliveries.delivered,
        seconds=seconds,
        bad_rows=log.bad_rows,
        delivery_errors=failed,
        first_error=first_error,
        bad_row_examples=log.bad_row_examples,
        interrupted=interrupted,
    )
    if interrupted:
        raise ReplayInterrupted(stats)
    return stats


def _send(
    producer: Producer,
    topic: str,
    log: ReplayLog,
    n: int,
    factor: float | None,
    deliveries: _Deliveries,
    bar: tqdm,
    start: float,
) -> None:
    """The send loop: pace (if asked), produce, serve delivery reports, update progress."""
    first_time = float(log.times[0]) if n else 0.0
    produce = producer.produce
    unreported = 0  # events sent but not yet shown on the progress bar
    for sent, click in enumerate(log.clicks(n), start=1):
        if factor is not None:
            due = start + (click.timestamp - first_time) / factor
            if due > time.monotonic():
                bar.update(unreported)
                unreported = 0
                _wait_until(producer, due)
                if deliveries.failed or deliveries.fatal:
                    return
        key, value = encode_click(click)
        try:
            produce(topic, value, key)
        except BufferError:  # the local queue is full: wait for the broker to catch up
            _produce_when_room(producer, topic, key, value)
        unreported += 1
        if sent % _POLL_EVERY == 0:
            producer.poll(0)
            bar.update(unreported)
            unreported = 0
            if deliveries.failed or deliveries.fatal:
                return
    bar.update(unreported)


def _wait_until(producer: Producer, due: float) -> None:
    """Sleep until ``due`` (monotonic) in bounded slices, serving delivery reports."""
    while (remaining := due - time.monotonic()) > 0:
        if remaining < 0.001:  # poll() counts whole milliseconds: 0 would spin
            time.sleep(remaining)
        else:
            producer.poll(min(remaining, _MAX_SLEEP_S))


def _produce_when_room(producer: Producer, topic: str, key: bytes, value: bytes) -> None:
    while True:
        producer.poll(0.05)
        try:
            producer.produce(topic, value, key)
            return
        except BufferError:
            continue
