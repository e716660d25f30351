"""Is the Kafka broker reachable? A probe for the worker's ``/readyz``.

When the broker goes away, aiokafka keeps retrying quietly and Faust keeps its partition
assignment, so nothing the worker knows from inside says that it can neither consume nor
publish. The probe asks the broker for one topic's metadata every few seconds, from its own
thread with its own client (confluent-kafka, with the worker's security settings), and
remembers since when it has failed. It never touches the event loop, so a blocked loop and a
lost broker stay two different diagnoses (``/healthz`` and ``/readyz``).
"""

from __future__ import annotations

import threading
import time

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from stream.kafka.config import client_config


class BrokerProbe:
    """Polls ``topic``'s metadata every ``interval_s``; :attr:`problem` says what is wrong."""

    def __init__(
        self, bootstrap: str, topic: str, interval_s: float = 2.0, timeout_s: float = 5.0
    ) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._admin = AdminClient(client_config(bootstrap))
        self._failing_since: float | None = None
        self._reason = ""
        self._stop = threading.Event()

    @property
    def problem(self) -> str | None:
        """None while the last probe succeeded, else since when and why it fails."""
        since = self._failing_since
        if since is None:
            return None
        return (
            f"Kafka broker at {self.bootstrap} unreachable for "
            f"{time.monotonic() - since:.0f} s ({self._reason})"
        )

    def check(self) -> bool:
        """Probe once; True if the broker answered."""
        try:
            self._admin.list_topics(self.topic, timeout=self.timeout_s)
        except KafkaException as exc:
            self._reason = exc.args[0].str()
            if self._failing_since is None:
                self._failing_since = time.monotonic()
            return False
        self._failing_since = None
        return True

    def start(self) -> BrokerProbe:
        threading.Thread(target=self._run, name="streamrec-broker-probe", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.check()
            self._stop.wait(self.interval_s)
