"""What an experiment needs to know about the machine it measures on.

Throughput figures mean something only if nothing else competes for the
CPU: experiments take one machine-wide lock, so two never run at once, and
record the machine they ran on next to their figures.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Machine-wide on purpose: every checkout on this machine must see the same lock.
LOCK_PATH = Path("/tmp/cattle-experiments.lock")  # noqa: S108


@contextlib.contextmanager
def exclusive(name: str, timeout_s: float = 1800) -> Iterator[None]:
    """Hold the machine-wide experiment lock (waiting at most `timeout_s`)."""
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o666)
    deadline = time.monotonic() + timeout_s
    announced = False
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not announced:
                    print(f"{name}: waiting for another experiment to finish ({LOCK_PATH})")
                    announced = True
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name}: the experiment lock stayed busy") from None
                time.sleep(1.0)
        os.ftruncate(fd, 0)
        os.write(fd, f"{name} pid {os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)


Markdown = Callable[[dict[str, Any]], str]


def how_measured(command: str) -> list[str]:
    """The heading every report's method section starts with, and its command."""
    return ["## How it was measured", "", "```", command, "```", ""]


def write_report(report: dict[str, Any], out: Path, markdown: Markdown) -> None:
    """OUT.json (the figures) and OUT.md (them, rendered for reading)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))


def report_main(
    name: str,
    out: Path,
    render: Path | None,
    measure: Callable[[], dict[str, Any]],
    markdown: Markdown,
) -> dict[str, Any] | None:
    """What a benchmark's main does with its report.

    With `render` (a JSON report), only OUT.md is written anew from it, and
    None returned. Otherwise `measure()` runs under the machine lock and its
    report goes to OUT.json and OUT.md, and is returned.
    """
    if render is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(markdown(json.loads(render.read_text())))
        return None
    with exclusive(name):
        report = measure()
    write_report(report, out, markdown)
    return report


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_jiffies() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs from /proc/stat, for deltas."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    total = sum(values[:8])
    return float(total - idle), float(total)


def describe() -> dict[str, Any]:
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cores": os.cpu_count(),
        "cpu": _cpu_model(),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"
