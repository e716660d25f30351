"""Announcements of registry moves on a Kafka topic, for whoever wants to react to them.

Workers do not need them: they poll the registry's ``CURRENT`` pointer, the single source
of truth (:mod:`stream.serving.hot_swap`). The topic is for other consumers (audit logs,
caches, dashboards' annotations) that want to know when a version was published or rolled
back without watching a file system.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from confluent_kafka import Producer

from stream.kafka.config import producer_config
from stream.kafka.topics import ensure_topics
from stream.registry import DEFAULT_UPDATES_TOPIC, POINTER


class KafkaAnnouncer:
    """Publishes ``{"version", "path", "action"}`` to the model-updates topic (one
    partition, so every reader sees the moves in order). A failed announcement is
    reported on stderr but does not undo the move: ``CURRENT`` is the truth and workers
    read it, so a lost announcement cannot leave a worker on an old model."""

    def __init__(
        self, bootstrap: str, topic: str = DEFAULT_UPDATES_TOPIC, timeout: float = 10.0
    ) -> None:
        ensure_topics(bootstrap, {topic: 1}, timeout=timeout)
        self.topic = topic
        self.timeout = timeout
        self._producer = Producer(producer_config(bootstrap))

    def announce(self, action: str, version: str, path: Path) -> None:
        value = json.dumps({"version": version, "path": str(path), "action": action})
        self._producer.produce(self.topic, key=b"model", value=value.encode("utf-8"))
        if self._producer.flush(self.timeout) != 0:
            print(
                f"streamrec: warning: announcing {action} of {version} to {self.topic} "
                f"timed out; workers still pick it up from {POINTER}",
                file=sys.stderr,
            )
