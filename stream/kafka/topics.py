"""Create and check the product's Kafka topics before anything reads or writes them.

The local brokers run with ``auto.create.topics.enable=false`` and the product never relies on
auto-creation: a topic auto-created by a first producer gets the broker's default partition
count, and a partition count that differs from what the workers expect silently breaks key
co-partitioning (a session's clicks and its state would live on different partitions). So
topics are created explicitly with :func:`ensure_topics`, and :func:`check_topics` lets a
component that must not create anything fail fast with one clear line instead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ClusterMetadata, NewTopic

from model.errors import UserError
from stream.kafka.config import client_config

# librdkafka prints every refused connection to stderr; routed to a logger it stays quiet
# unless someone asks, and failures still surface as UserError.
_LIBRDKAFKA_LOG = logging.getLogger("stream.kafka.topics.librdkafka")
_LIBRDKAFKA_LOG.setLevel(logging.CRITICAL)  # lower it to see librdkafka's own lines


def ensure_topics(
    bootstrap: str,
    topics: Mapping[str, int],
    configs: Mapping[str, Mapping[str, str]] | None = None,
    timeout: float = 30.0,
) -> None:
    """Create the missing ``topics`` (name -> partition count) and verify the existing ones.

    Idempotent and safe to run concurrently from several processes. ``configs`` gives
    per-topic settings (e.g. ``{"cleanup.policy": "compact"}``) that are applied only when
    the topic is created here; an existing topic keeps its settings. The replication factor
    is the cluster's ``default.replication.factor``. Returns once every topic is visible with
    a leader for each partition, so a producer that starts right after does not race the
    creation.

    Raises UserError if the broker cannot be reached within ``timeout`` seconds, a topic
    cannot be created, or an existing topic has a different partition count (which cannot be
    fixed by adding partitions without moving keys, so it is never changed here).
    """
    _validate_counts(topics)
    configs = configs or {}
    deadline = time.monotonic() + timeout
    admin = _Admin(bootstrap)
    existing = _metadata(admin, bootstrap, timeout)
    _raise_on_mismatch(existing, topics, bootstrap)
    missing = [name for name in topics if name not in existing.topics]
    if missing:
        new = [
            NewTopic(name, topics[name], replication_factor=-1, config=dict(configs.get(name, {})))
            for name in missing
        ]
        futures = admin.create_topics(new, operation_timeout=timeout, request_timeout=timeout)
        for name, future in futures.items():
            try:
                future.result(timeout=max(deadline - time.monotonic(), 0.1))
            except KafkaException as exc:
                error: KafkaError = exc.args[0]
                # Another process created it between our metadata read and our request;
                # its partition count is checked below like any existing topic's.
                if error.code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise UserError(
                        f"could not create topic {name!r} on {bootstrap}: {error.str()}"
                    ) from exc
            except TimeoutError as exc:
                # A broker just started, or busy, can take longer: waiting may cure it
                # (a worker retries for --broker-wait-s instead of exiting).
                raise BrokerUnreachable(
                    f"creating topic {name!r} on {bootstrap} did not finish within {timeout:g} s"
                ) from exc
    _wait_until_led(admin, bootstrap, topics, deadline, timeout)


def check_topics(bootstrap: str, topics: Mapping[str, int], timeout: float = 30.0) -> None:
    """Raise UserError unless every topic exists with exactly the given partition count.

    For components that must not create topics (workers, the demo's consumers): a missing
    topic or a wrong partition count is reported in one line naming the topics, and an
    unreachable broker gives a UserError after ``timeout`` seconds instead of a hang.
    """
    _validate_counts(topics)
    metadata = _metadata(_Admin(bootstrap), bootstrap, timeout)
    missing = [name for name in topics if name not in metadata.topics]
    if missing:
        names = ", ".join(repr(name) for name in missing)
        raise UserError(f"missing topic(s) on {bootstrap}: {names}")
    _raise_on_mismatch(metadata, topics, bootstrap)


def check_replication(bootstrap: str, topic: str, minimum: int, timeout: float = 30.0) -> None:
    """Raise UserError unless every partition of ``topic`` has at least ``minimum``
    replicas (a topic created before the cluster grew keeps its replication).

    A topic just created reaches the brokers' metadata one after another, so one that is
    missing is asked for again until ``timeout`` s have passed."""
    admin = _Admin(bootstrap)
    deadline = time.monotonic() + timeout
    while True:
        metadata = _metadata(admin, bootstrap, max(deadline - time.monotonic(), 0.1))
        if topic in metadata.topics and metadata.topics[topic].error is None:
            break
        if time.monotonic() >= deadline:
            raise UserError(f"topic {topic!r} is not on {bootstrap} after {timeout:g} s")
        time.sleep(0.1)
    partitions = metadata.topics[topic].partitions.values()
    replicas = min((len(p.replicas) for p in partitions), default=0)
    if replicas < minimum:
        raise UserError(
            f"topic {topic!r} on {bootstrap} is replicated to {replicas} broker(s), "
            f"fewer than --min-replication {minimum}: recreate it on a cluster with "
            f"default.replication.factor >= {minimum}, or add replicas with "
            "kafka-reassign-partitions"
        )


def _validate_counts(topics: Mapping[str, int]) -> None:
    bad = [name for name, count in topics.items() if count < 1]
    if bad:
        counts = ", ".join(f"{name!r}: {topics[name]}" for name in bad)
        raise UserError(f"partition counts must be at least 1; got {counts}")


class _Admin(AdminClient):
    """An admin client that remembers refused logins: librdkafka reports a failed SASL
    authentication only through ``error_cb``, while the request itself just times out."""

    def __init__(self, bootstrap: str) -> None:
        self.refusals: list[str] = []
        super().__init__(client_config(bootstrap, logger=_LIBRDKAFKA_LOG, error_cb=self._on_error))

    def _on_error(self, error: KafkaError) -> None:
        if error.code() == KafkaError._AUTHENTICATION:
            self.refusals.append(error.str())


class BrokerUnreachable(UserError):
    """No broker answered in time, or it did not finish creating topics in time (just
    started, or busy): unlike a wrong topic, waiting may cure it."""


def _metadata(admin: _Admin, bootstrap: str, timeout: float) -> ClusterMetadata:
    """All topics' metadata (listing all topics never triggers broker-side auto-creation).

    Bad credentials are a configuration error (UserError, no point in waiting); anything
    else is :class:`BrokerUnreachable`."""
    try:
        return admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        admin.poll(0.1)  # serve error_cb
        if admin.refusals:
            raise UserError(
                f"the Kafka broker at {bootstrap} refused the credentials "
                f"({admin.refusals[-1]}); check STREAMREC_KAFKA_SASL_USERNAME, "
                "STREAMREC_KAFKA_SASL_PASSWORD and STREAMREC_KAFKA_SASL_MECHANISM"
            ) from None
        raise BrokerUnreachable(
            f"cannot reach a Kafka broker at {bootstrap} within {timeout:g} s "
            f"({exc.args[0].str()}); is it running? `streamrec broker` starts a local one"
        ) from exc


def _raise_on_mismatch(
    metadata: ClusterMetadata, topics: Mapping[str, int], bootstrap: str
) -> None:
    wrong = [
        f"topic {name!r} has {len(metadata.topics[name].partitions)} partitions "
        f"but {wanted} are required"
        for name, wanted in topics.items()
        if name in metadata.topics and len(metadata.topics[name].partitions) != wanted
    ]
    if wrong:
        raise UserError(
            f"{'; '.join(wrong)} (on {bootstrap}; delete the topic or use its partition count)"
        )


def _wait_until_led(
    admin: _Admin,
    bootstrap: str,
    topics: Mapping[str, int],
    deadline: float,
    timeout: float,
) -> None:
    """Wait until metadata shows every topic with all its partitions led.

    Right after CreateTopics returns, the broker may still answer NOT_LEADER for a new
    partition (aiokafka logs and retries it); waiting here keeps that out of every caller.
    """
    while True:
        metadata = _metadata(admin, bootstrap, max(deadline - time.monotonic(), 0.1))
        _raise_on_mismatch(metadata, topics, bootstrap)
        pending = [
            name
            for name in topics
            if name not in metadata.topics
            or metadata.topics[name].error is not None
            or any(
                p.leader < 0 or p.error is not None
                for p in metadata.topics[name].partitions.values()
            )
        ]
        if not pending:
            return
        if time.monotonic() >= deadline:
            names = ", ".join(repr(name) for name in pending)
            raise BrokerUnreachable(
                f"topic(s) {names} on {bootstrap} had no leader for every partition "
                f"within {timeout:g} s"
            )
        time.sleep(0.05)
