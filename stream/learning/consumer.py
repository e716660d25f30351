"""The trainer's Kafka side: follow the click topic, run rounds on time, until stopped.

Offsets are committed automatically as clicks are read, so a restarted trainer starts
with an empty buffer: it loses at most one buffer of sessions, which costs a little
training data, never correctness.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from typing import Any

from confluent_kafka import Consumer, KafkaException

from model.errors import UserError
from stream.kafka.announcer import KafkaAnnouncer
from stream.kafka.config import client_config
from stream.kafka.wire import Click, parse_click
from stream.learning.loop import LearningLoop
from stream.learning.settings import TrainerSettings
from stream.observability import serve
from stream.registry import ModelRegistry

#: Training holds the poll loop; librdkafka keeps heartbeating, and this is how long a
#: round may take before the broker considers the trainer gone.
MAX_POLL_INTERVAL_MS = 3_600_000
#: Clicks taken from the consumer at a time; a due round first takes what was fetched,
#: for at most ``CATCH_UP_S``.
CONSUME_BATCH = 1000
CATCH_UP_S = 1.0
#: How often the consume loop looks for complete sessions with new items.
NEW_ITEM_CHECK_S = 0.25


def consume(settings: TrainerSettings, loop: LearningLoop, stop: threading.Event) -> None:
    """Feed the loop from the click topic and run a round every ``interval_s`` (and, with
    ``new_item_rounds``, as soon as complete sessions with new items can be trained on)
    until ``stop`` is set."""
    consumer = Consumer(
        client_config(
            settings.bootstrap,
            **{
                "group.id": settings.group,
                "auto.offset.reset": "earliest",
                "enable.auto.commit": True,
                "max.poll.interval.ms": MAX_POLL_INTERVAL_MS,
            },
        )
    )
    try:
        try:
            topics = consumer.list_topics(timeout=30).topics
        except KafkaException as exc:
            raise UserError(
                f"cannot reach a Kafka broker at {settings.bootstrap}: {exc.args[0].str()}"
            ) from None
        if settings.input_topic not in topics:
            raise UserError(f"missing topic {settings.input_topic!r} on {settings.bootstrap}")
        consumer.subscribe([settings.input_topic])
        loop.metrics.not_ready_reason = None

        def read(timeout: float) -> int:
            messages = consumer.consume(CONSUME_BATCH, timeout=timeout)
            for message in messages:
                if message.error():
                    print(f"streamrec trainer: {message.error()}", file=sys.stderr)
                    continue
                parsed = parse_click(message.key(), message.value(), time.time())
                if isinstance(parsed, Click):
                    loop.add(parsed, message.partition() or 0)  # set on every fetched message
                else:
                    loop.rejected_clicks += 1
            return len(messages)

        # Rounds keep a fixed clock: one is due every interval_s from the start, whatever
        # the previous one took (a round that began `interval_s` after the previous one
        # ended drifted later by a round's length each time). A round that overran its
        # slot is followed at once, and the clock restarts from then.
        # A round for new items may come earlier (new_item_rounds): once a round now would
        # train on a complete session holding an item the current model does not know, and
        # new_item_gap_s after the previous round began. The clock then restarts from it,
        # so rounds are still never further apart than interval_s.
        due = time.monotonic() + settings.interval_s
        last_started = -math.inf
        next_check = 0.0
        while not stop.is_set():
            loop.metrics.beat(len(loop.buffer))
            read(0.2)
            now = time.monotonic()
            started_for: dict[str, Any] = {}
            if now >= due:
                trigger = "clock"
            elif (
                settings.new_item_rounds
                and now >= next_check
                and now - last_started >= settings.new_item_gap_s
            ):
                next_check = now + NEW_ITEM_CHECK_S
                waiting = loop.new_item_sessions()
                if not waiting:
                    continue
                trigger, started_for = "new_items", {"new_item_sessions": waiting}
            else:
                continue
            # Catch up with what was fetched meanwhile (a round blocks the loop), so the
            # round sees the stream as it is now.
            deadline = now + CATCH_UP_S
            while read(0.0) == CONSUME_BATCH and time.monotonic() < deadline:
                pass
            loop.metrics.training = True
            last_started = time.monotonic()
            try:
                loop.round(
                    late_s=last_started - due if trigger == "clock" else None,
                    trigger=trigger,
                    **started_for,
                )
            finally:
                loop.metrics.training = False
            if trigger == "clock":
                due = max(due + settings.interval_s, time.monotonic())
            else:
                due = last_started + settings.interval_s
    finally:
        consumer.close()


def lower_priority(nice: int) -> int:
    """Add ``nice`` to this process's niceness (threads started later inherit it); return
    the new niceness. Training competes with the workers for the CPU when they share a
    machine: serving a click now matters more than finishing a round a little sooner."""
    return os.nice(nice) if nice else os.nice(0)


def run(settings: TrainerSettings) -> int:
    """Follow the click topic and keep the registry's model current until SIGTERM/SIGINT."""
    niceness = lower_priority(settings.nice)  # first: every thread started below inherits it
    registry = ModelRegistry(
        settings.registry,
        keep=settings.keep,
        announcer=KafkaAnnouncer(settings.bootstrap, settings.updates_topic),
    )
    loop = LearningLoop(settings, registry)
    if settings.web_port:
        serve(loop.metrics.app(), settings.web_port, settings.web_host)
    base = loop.current()
    budget = settings.budget_s
    print(
        f"streamrec trainer: following {settings.input_topic} as group {settings.group}; "
        f"current model {base.version} ({base.n_items} items); a round every "
        f"{settings.interval_s:g} s"
        f"{' (sooner for new items)' if settings.new_item_rounds else ''}, training budget "
        f"{'none' if budget is None else f'{budget:g} s'}, niceness {niceness}",
        file=sys.stderr,
    )
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    consume(settings, loop, stop)
    return 0
