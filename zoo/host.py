"""What this process may use of the machine it runs on."""

from __future__ import annotations

import os


def usable_cpus() -> int:
    """The cores this process may run on: its CPU affinity (a container or `taskset` may allow fewer
    than the machine has, and os.cpu_count() counts them all), else every core."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
