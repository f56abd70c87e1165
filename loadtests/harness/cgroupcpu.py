"""CPU-seconds a lab node's cgroup has used: the work its requests actually cost.

Throughput per CPU-second used does not move when the machine's speed drifts
the way requests per wall-clock second do (a throttled node that gets its
slices later serves fewer requests per second, not fewer per CPU-second).

The lab puts each node in a cgroup v1 `cpu` group (deploy/lab/cgroups.py).
Where `cpuacct` is mounted with `cpu`, the group's own `cpuacct.usage` counts
everything that ran in it. Where it is mounted apart (as on the lab machine),
the group's `cgroup.procs` names its processes and /proc gives their CPU
time; a process that exited within the window takes its time with it, which
for a node (one process, alive for the whole measurement) loses nothing.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from loadtests.harness import machine


def usage_file(group: Path) -> Path | None:
    """The group's `cpuacct.usage` (nanoseconds) when cpuacct shares its hierarchy."""
    candidate = group / "cpuacct.usage"
    return candidate if candidate.exists() else None


def cpu_seconds(group: Path) -> tuple[float, str] | None:
    """(CPU-seconds used so far by the group, how it was read), None if it is gone."""
    usage = usage_file(group)
    if usage is not None:
        with contextlib.suppress(OSError, ValueError):
            return int(usage.read_text()) / 1e9, "cpuacct.usage"
    try:
        pids = [int(p) for p in (group / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return None
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += machine.cpu_seconds(pid)  # (a process may exit between the two reads)
    return total, "cgroup.procs + /proc/PID/stat"
