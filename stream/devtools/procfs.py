"""What Linux's /proc says about a process and the machine (NaN where it cannot be read).

The benchmarks use it to tell a run bound by the worker's own CPU from one bound by a
machine with no core left (broker, clients and worker together), and to follow a worker's
memory over a soak.
"""

from __future__ import annotations

import math
import os

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far, seconds; NaN if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            # Fields after the parenthesised name: utime and stime are the 12th and 13th.
            fields = stat.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, IndexError, ValueError):
        return math.nan


def machine_busy_seconds() -> float:
    """CPU time all cores of the machine spent busy since boot, seconds; NaN without /proc."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (
                int(v) for v in stat.readline().split()[1:9]
            )
        return (user + nice + system + irq + softirq + steal) / _TICK
    except (OSError, ValueError):
        return math.nan


def rss_mib(pid: int) -> float:
    """Resident memory of a process (VmRSS), MiB; NaN if it is gone."""
    return _status_mib(pid, "VmRSS:")


def peak_rss_mib(pid: int) -> float:
    """The most resident memory a process has held so far (VmHWM), MiB; NaN if it is gone."""
    return _status_mib(pid, "VmHWM:")


def _status_mib(pid: int, field: str) -> float:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return math.nan
