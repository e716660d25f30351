"""What every command prints: one JSON object as its last stdout line, errors as one line.

Progress and explanations go to stderr, so that ``streamrec COMMAND | tail -1 | jq``
always reads the result.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import threading
from collections.abc import Iterator, Mapping
from types import FrameType
from typing import Any

#: The type of the ``subparsers`` object each command file registers itself with.
SubParsers = argparse._SubParsersAction  # noqa: SLF001 (argparse names it privately)


def print_json(result: Mapping[str, Any]) -> None:
    """The machine-readable result: one JSON object as the last stdout line."""
    print(json.dumps(dict(result), sort_keys=True), flush=True)


@contextlib.contextmanager
def signals_as_interrupt(*signums: signal.Signals) -> Iterator[None]:
    """Turn ``signums`` into ``KeyboardInterrupt`` for the duration, so that every way of
    asking a command to stop takes the path that cleans up (flushes, stops a broker).
    Set explicitly, because a shell starting a command in the background ignores SIGINT;
    a no-op outside the main thread, where signals cannot be set."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _interrupt) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt
