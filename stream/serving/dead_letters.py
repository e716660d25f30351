"""Dead letters: a rejected click goes to the dead-letter topic with why, never lost.

The copy holds the original key and value bytes and three headers (``streamrec-reason``,
``streamrec-detail``, ``streamrec-source`` = topic/partition/offset), so an operator can
fix the producer and re-send. A message the broker accepted near its
``max.message.bytes`` may not fit the dead-letter topic once the headers are added; the
client does not refuse it first (aiokafka's own default limit is below the broker's, and
such a message would stop the worker at every restart). If the broker refuses it, the copy
keeps :data:`TRUNCATED_DEAD_LETTER_BYTES` of the key and of the value and a
``streamrec-truncated`` header gives the original lengths.
"""

from __future__ import annotations

import logging
from typing import Protocol

import faust
from aiokafka.errors import MessageSizeTooLargeError, RecordListTooLargeError
from faust.exceptions import ProducerSendError

from stream.kafka.wire import MAX_MESSAGE_BYTES, Rejected

logger = logging.getLogger("streamrec.worker")

TRUNCATED_DEAD_LETTER_BYTES = MAX_MESSAGE_BYTES
#: The worker's own reason code, besides :mod:`stream.kafka.wire`'s: a valid click on
#: another partition than its session's (see ``ClickProcessor._split_misplaced``).
WRONG_PARTITION = "wrong_partition"


class SourceRecord(Protocol):
    """What a dead letter copies: a Faust message, or an availability record."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...


def _too_large(exc: BaseException) -> bool:
    """A producer error meaning the message exceeds a size limit (client's or broker's)."""
    cause = exc.__cause__ if isinstance(exc, ProducerSendError) else exc
    return isinstance(cause, (MessageSizeTooLargeError, RecordListTooLargeError))


class DeadLetters:
    """Sends rejected messages to ``topic`` and counts them by reason in ``counts``."""

    def __init__(self, topic: faust.TopicT, counts: dict[str, int]) -> None:
        self.topic = topic
        self.counts = counts

    async def send(self, message: SourceRecord, rejected: Rejected) -> None:
        """Send the dead letter of ``message`` and await its delivery."""
        self.counts[rejected.reason] = self.counts.get(rejected.reason, 0) + 1
        headers = [
            ("streamrec-reason", rejected.reason.encode()),
            ("streamrec-detail", rejected.detail.encode("utf-8", "replace")[:1000]),
            ("streamrec-source", f"{message.topic}/{message.partition}/{message.offset}".encode()),
        ]
        key, value = message.key, message.value or b""
        try:
            await self._send(key, value, headers)
        except Exception as exc:
            limit = TRUNCATED_DEAD_LETTER_BYTES
            if not _too_large(exc) or (len(key or b"") <= limit and len(value) <= limit):
                raise
            logger.warning(
                "dead letter of %s/%s/%s too large (%s): truncated",
                message.topic,
                message.partition,
                message.offset,
                exc,
            )
            headers.append(
                ("streamrec-truncated", f"key={len(key or b'')} value={len(value)}".encode())
            )
            await self._send(key if key is None else key[:limit], value[:limit], headers)
        logger.info(
            "rejected %s/%s/%s: %s",
            message.topic,
            message.partition,
            message.offset,
            rejected.detail,
        )

    async def _send(
        self, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]
    ) -> None:
        """The app's producer directly, as for the answers: a failed ``Topic.send`` also
        leaves an unretrieved future that logs a spurious error."""
        delivery = await self.topic.app.producer.send(
            self.topic.get_topic_name(), key, value, None, None, headers
        )
        await delivery
