"""What a measurement needs to know about the machine: CPU use, and the facts it records.

Throughput figures mean something only next to the machine they were taken
on: every result file records `describe()` (loadtests.report adds it).
"""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path
from typing import Any


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pin_process(pid: int, cores: set[int]) -> None:
    """Every thread of `pid` (its main thread among them) onto `cores`. A thread
    that ends meanwhile is passed over (`taskset --all-tasks` fails on it: a
    server's request threads come and go); one started later takes its
    creator's affinity."""
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(task), cores)


def machine_jiffies() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs from /proc/stat, for deltas."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    total = sum(values[:8])
    return float(total - idle), float(total)


def describe() -> dict[str, Any]:
    """The machine facts of the report layout (loadtests.report.MACHINE), in its order."""
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "os": _os_name(),
        "kernel": platform.release(),
    }


def _os_name() -> str:
    """The distribution's own name where it says one (/etc/os-release), else the system's."""
    with contextlib.suppress(OSError):
        return platform.freedesktop_os_release().get("PRETTY_NAME") or platform.system()
    return platform.system()


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"
