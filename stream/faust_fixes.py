"""Two targeted corrections to faust-streaming 0.15 / mode 0.7, applied once at start-up.

1. **Lost events after recovery.** At the end of table recovery Faust resumes flow control,
   and mode's ``FlowControlEvent.resume()`` always clears the stream queues, dropping
   events that were already fetched (and marked read) when flow control had not actually
   been suspended: the agent sees a jump in offsets and those clicks are never answered.
   Here queues are cleared only when flow was suspended, which is the purpose of the
   clearing (discarding data fetched for partitions that were revoked meanwhile).
2. **Fetch latency.** Faust hard-codes ``fetch_max_wait_ms=1500`` for the worker consumer.
   Apache Kafka answers a waiting fetch as soon as data arrives, but brokers that do not
   (Tansu) then add the full wait to every click's latency; the worker's setting bounds it.

Both touch private attributes of pinned versions (``faust-streaming>=0.15,<0.16``,
``mode-streaming`` 0.7); the tests that restart workers and measure latency would catch a
change in either.
"""

from __future__ import annotations

from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from mode.utils.queues import FlowControlEvent

_fetch_max_wait_ms = 10
_applied = False


def _resume(self: FlowControlEvent) -> None:
    was_suspended = self._suspend.is_set()
    self._suspend.clear()
    self._resume.set()
    if was_suspended:
        self.clear()


def apply(fetch_max_wait_ms: int) -> None:
    """Install both fixes (idempotent); ``fetch_max_wait_ms`` bounds a fetch's wait."""
    global _fetch_max_wait_ms, _applied
    _fetch_max_wait_ms = fetch_max_wait_ms
    if _applied:
        return
    FlowControlEvent.resume = _resume  # type: ignore[method-assign]
    create = AIOKafkaConsumerThread._create_worker_consumer

    def _create_worker_consumer(self, transport):  # noqa: ANN001, ANN202 - Faust's signature
        consumer = create(self, transport)
        consumer._fetch_max_wait_ms = _fetch_max_wait_ms
        return consumer

    AIOKafkaConsumerThread._create_worker_consumer = _create_worker_consumer  # type: ignore
    _applied = True
