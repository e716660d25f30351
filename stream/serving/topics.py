"""The worker's topics: names, the changelog's configuration, creation at start-up.

Every topic a worker reads or writes is co-partitioned with the click topic (same
partition count), because a session's clicks, state, answers and expiry markers must all
live on one partition. Everything that can be wrong with them is checked before Faust
starts consuming and reported as one line; a broker that does not answer is not a
configuration error but possibly one still starting, and is retried with backoff.
"""

from __future__ import annotations

import logging
import time

from stream.kafka.topics import BrokerUnreachable, check_replication, check_topics, ensure_topics
from stream.serving.availability import AVAILABILITY_CONFIG
from stream.serving.metrics import Health
from stream.serving.settings import WorkerSettings

logger = logging.getLogger("streamrec.worker")

# Compacted, with small segments: the active segment is never compacted, and a state is
# rewritten on every click, so large segments would make recovery replay stale copies.
CHANGELOG_CONFIG = {
    "cleanup.policy": "compact",
    "segment.ms": "600000",
    "min.cleanable.dirty.ratio": "0.2",
}


def changelog_topic(settings: WorkerSettings) -> str:
    return f"{settings.app_id}-sessions-changelog"


def expiry_topic(settings: WorkerSettings) -> str:
    return f"{settings.app_id}-expiry"


def worker_topics(settings: WorkerSettings) -> dict[str, tuple[int, dict[str, str]]]:
    """Every topic a worker needs: name -> (partition count, configuration when created).
    The co-partitioned ones, and the availability topic (one partition: every worker reads
    all of it)."""
    topics: dict[str, tuple[int, dict[str, str]]] = {
        name: (settings.partitions, {})
        for name in (
            settings.input_topic,
            settings.output_topic,
            settings.dlq_topic,
            expiry_topic(settings),
        )
    }
    topics[changelog_topic(settings)] = (settings.partitions, CHANGELOG_CONFIG)
    if settings.availability_topic:
        topics[settings.availability_topic] = (1, AVAILABILITY_CONFIG)
    return topics


def prepare_topics(settings: WorkerSettings, timeout: float = 30.0) -> None:
    """Create (or, with ``create_topics`` off, require) the worker's topics
    (:func:`worker_topics`); refuse a changelog replicated to fewer brokers than
    ``min_replication``."""
    wanted = worker_topics(settings)
    counts = {name: count for name, (count, _) in wanted.items()}
    if settings.create_topics:
        configs = {name: config for name, (_, config) in wanted.items() if config}
        ensure_topics(settings.bootstrap, counts, configs=configs, timeout=timeout)
    else:
        check_topics(settings.bootstrap, counts, timeout=timeout)
    check_replication(
        settings.bootstrap, changelog_topic(settings), settings.min_replication, timeout
    )


def prepare_topics_patiently(settings: WorkerSettings, health: Health) -> None:
    """:func:`prepare_topics`, retrying an unreachable broker with exponential backoff (1 s
    doubling up to 30 s, each attempt waiting up to 5 s for an answer) for
    ``broker_wait_s``, while ``/readyz`` says what the worker waits for; every other
    problem fails at once."""
    deadline = time.monotonic() + settings.broker_wait_s
    delay = 1.0
    health.not_ready_reason = f"connecting to the Kafka broker at {settings.bootstrap}"
    while True:
        health.heartbeat = time.monotonic()  # alive, and saying so on /healthz
        try:
            remaining = deadline - time.monotonic()
            prepare_topics(settings, timeout=max(1.0, min(5.0, remaining)))
            return
        except BrokerUnreachable as exc:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerUnreachable(
                    f"{exc} (retried for {settings.broker_wait_s:g} s; "
                    "--broker-wait-s sets how long)"
                ) from None
            health.not_ready_reason = f"waiting for the Kafka broker: {exc}"
            logger.warning("%s; retrying in %.0f s", exc, min(delay, remaining))
            time.sleep(min(delay, remaining))
            delay = min(2 * delay, 30.0)
