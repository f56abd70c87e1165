"""CPU caps for lab nodes: one cgroup v1 `cpu` group per node, so one machine
behaves like N small ones and a node's throughput is bounded by its share."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

CPU_ROOT = Path("/sys/fs/cgroup/cpu")
# The kernel's default period: a node capped at a tenth of a core runs 10 ms,
# then waits 90. A group may be given a shorter one (the scale-out experiment's
# 20 ms: see its Plan); its quota is then shorter too, and the kernel takes
# none under 1 ms.
PERIOD_US = 100_000
MIN_QUOTA_US = 1_000


class CgroupsUnavailable(RuntimeError):
    pass


def check_available() -> None:
    """Raise with what to do if CPU caps cannot be set on this machine."""
    if not (CPU_ROOT / "cpu.cfs_quota_us").exists():
        raise CgroupsUnavailable(
            f"no cgroup v1 cpu controller at {CPU_ROOT}: CPU caps (--cpu) need it; "
            "run without --cpu, or on a host with cgroup v1 mounted"
        )
    if not os.access(CPU_ROOT, os.W_OK):
        raise CgroupsUnavailable(
            f"{CPU_ROOT} is not writable: CPU caps (--cpu) need root; run without --cpu"
        )


@dataclass(frozen=True)
class CpuGroup:
    path: Path

    @classmethod
    def create(
        cls, name: str, cpu_fraction: float | None = None, period_us: int = PERIOD_US
    ) -> CpuGroup:
        """Make the group, capped at `cpu_fraction` of a core (None: uncapped for now)
        over CFS periods of `period_us`."""
        check_available()
        group = cls(CPU_ROOT / name)
        group.path.mkdir(exist_ok=True)
        (group.path / "cpu.cfs_period_us").write_text(str(period_us))
        group.cap(cpu_fraction)
        return group

    def cap(self, cpu_fraction: float | None) -> None:
        """Limit the group to `cpu_fraction` of a core in each of its periods; None lifts it."""
        if cpu_fraction is None:
            (self.path / "cpu.cfs_quota_us").write_text("-1")
            return
        if not 0.01 <= cpu_fraction <= (os.cpu_count() or 1):
            raise ValueError(f"--cpu {cpu_fraction}: give a fraction of a core, e.g. 0.5")
        period_us = int((self.path / "cpu.cfs_period_us").read_text())
        quota_us = int(cpu_fraction * period_us)
        if quota_us < MIN_QUOTA_US:
            raise ValueError(
                f"--cpu {cpu_fraction} in {period_us / 1000:g} ms periods is a quota of "
                f"{quota_us} µs, under the kernel's least ({MIN_QUOTA_US} µs): give a larger "
                "fraction or a longer period"
            )
        (self.path / "cpu.cfs_quota_us").write_text(str(quota_us))

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def pids(self) -> list[int]:
        with contextlib.suppress(FileNotFoundError):
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        return []

    def throttling(self) -> dict[str, int]:
        """nr_periods, nr_throttled, throttled_time (ns) since the group was made."""
        stats = {}
        with contextlib.suppress(FileNotFoundError):
            for line in (self.path / "cpu.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                stats[key] = int(value)
        return stats

    def remove(self, timeout_s: float = 5.0) -> None:
        """rmdir the group once its processes are gone (bounded wait)."""
        deadline = time.monotonic() + timeout_s
        while self.path.exists():
            try:
                self.path.rmdir()
            except FileNotFoundError:
                return
            except OSError:
                # Busy: a process (maybe a zombie not yet reaped) is still in it.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
