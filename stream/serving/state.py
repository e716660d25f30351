"""A session's serving state and its byte encoding (the value of the Faust table).

What a session needs to be answered on its next click, and no more:

- ``hidden``: the GRU hidden state (float32), the whole of what the model knows about the
  session;
- ``recent_items``: the last :data:`model.rules.RECENT_ITEMS` clicked item ids, so that
  a state computed by an older model version can be recomputed under a new one, and the
  items a session has seen can be left out of its lists (sessions are short: in
  RSC15 99% have at most 20 clicks, and a GRU's state depends little on clicks further
  back than that);
- ``last_offset``: the input offset of the last applied click, the idempotence guard
  (a replayed click with an offset not above it is not applied again);
- ``last_time``: event time of the last click, for idle-session expiry;
- ``partition``: the input partition the session lives on (expiry works per partition);
- ``started``: whether any click was on an item the model knows (else popularity
  answers);
- ``model_version``: the version that computed ``hidden``.

The encoding is a fixed binary header, length-prefixed strings and the raw float32
vector: compact (≈ 450 bytes for 100 units) and fast to decode on every click. The
partition has been in the header since the first format, so the idempotence guard can
tell a replayed click from one on another partition in every stored state.

Anything can be in a changelog (another format, a truncated record, bytes written by
another program): bytes that are not exactly one state raise :class:`UndecodableState`,
and nothing else, so the worker can restart that session empty instead of exiting.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from model.rules import RECENT_ITEMS

FORMAT = 1
# format, partition, offset, time, started, len(version), n_items, dims
_HEADER = struct.Struct("<BHqdBBBH")
_ITEM_LENGTH = struct.Struct("<H")


class UndecodableState(ValueError):
    """Stored bytes that are not a session state of this format."""


@dataclass(frozen=True, slots=True)
class SessionState:
    hidden: np.ndarray
    recent_items: tuple[str, ...]
    last_offset: int
    last_time: float
    started: bool
    model_version: str
    partition: int

    def encode(self) -> bytes:
        version = self.model_version.encode("utf-8")
        items = [item.encode("utf-8") for item in self.recent_items[-RECENT_ITEMS:]]
        hidden = np.ascontiguousarray(self.hidden, dtype=np.float32)
        parts = [
            _HEADER.pack(
                FORMAT,
                self.partition,
                self.last_offset,
                self.last_time,
                self.started,
                len(version),
                len(items),
                hidden.size,
            ),
            version,
        ]
        for item in items:
            parts.append(_ITEM_LENGTH.pack(len(item)))
            parts.append(item)
        parts.append(hidden.tobytes())
        return b"".join(parts)

    @staticmethod
    def peek_partition_and_time(data: bytes) -> tuple[int, float]:
        """(partition, last_time) from the header alone: cheap enough to scan a table."""
        _, partition, _, last_time, *_ = _header(data)
        return partition, last_time

    @classmethod
    def decode(cls, data: bytes) -> SessionState:
        _, partition, offset, time, started, version_len, n_items, dims = _header(data)
        try:
            pos = _HEADER.size
            version = data[pos : pos + version_len].decode("utf-8")
            pos += version_len
            items = []
            for _ in range(n_items):
                (length,) = _ITEM_LENGTH.unpack_from(data, pos)
                pos += _ITEM_LENGTH.size
                items.append(data[pos : pos + length].decode("utf-8"))
                pos += length
        except (struct.error, UnicodeDecodeError) as exc:
            raise UndecodableState(f"bad session state: {exc}") from None
        # A string announced longer than the data was cut by slicing: it shows here.
        if len(data) - pos != 4 * dims:
            raise UndecodableState(
                f"bad session state: {len(data) - pos} bytes left for {dims} float32 values"
            )
        hidden = np.frombuffer(data, dtype=np.float32, count=dims, offset=pos)
        return cls(
            hidden=hidden,
            recent_items=tuple(items),
            last_offset=offset,
            last_time=time,
            started=bool(started),
            model_version=version,
            partition=partition,
        )


def sessions_by_partition(
    entries: Iterable[tuple[bytes, bytes]],
) -> tuple[dict[int, dict[bytes, float]], int]:
    """The table's sessions by the partition they live on (key -> last event time), from
    the headers alone; and how many entries do not decode, whose partition is unknown."""
    by_partition: dict[int, dict[bytes, float]] = {}
    undecodable = 0
    for key, raw in entries:
        try:
            partition, last_time = SessionState.peek_partition_and_time(raw)
        except UndecodableState:
            undecodable += 1
            continue
        by_partition.setdefault(partition, {})[key] = last_time
    return by_partition, undecodable


def _header(data: bytes) -> tuple[int, int, int, float, int, int, int, int]:
    """The header's fields, checked to be of this format."""
    if len(data) < _HEADER.size:
        raise UndecodableState(f"bad session state: {len(data)} bytes, shorter than a header")
    fields: tuple[int, int, int, float, int, int, int, int] = _HEADER.unpack_from(data)
    if fields[0] != FORMAT:
        raise UndecodableState(f"unknown session state format {fields[0]}")
    return fields
