"""Free TCP ports for the processes the tests, benchmarks and demo start on 127.0.0.1."""

from __future__ import annotations

import itertools
import random
import socket
from pathlib import Path


def ephemeral_ports() -> range:
    """The ports the kernel gives outgoing connections (Linux's own range, else its
    default)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


def port_candidates(ephemeral: range) -> range:
    """Where :func:`free_port` looks: outside the ``ephemeral`` range (below it, or above it
    where that is larger), so that no outgoing connection takes the port between the probe
    and its use; the ports from 10000 up when that range leaves none outside it."""
    below, above = range(10000, ephemeral.start), range(ephemeral.stop, 65536)
    return max(below, above, key=len) or range(10000, 65536)


#: Searched from a random start, so that another process picking at the same moment
#: rarely tries the same ports.
_CANDIDATES = port_candidates(ephemeral_ports())
_next_candidate = itertools.count(random.randrange(len(_CANDIDATES)))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for a worker's
    ``--web-port`` or a local broker), never one the kernel may hand to a client."""
    for _ in range(len(_CANDIDATES)):
        port = _CANDIDATES[next(_next_candidate) % len(_CANDIDATES)]
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise OSError(f"no free TCP port in {_CANDIDATES.start}-{_CANDIDATES.stop - 1}")
