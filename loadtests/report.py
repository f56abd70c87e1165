"""The one writer of result files: OUT.json, OUT.md and (where there is a plot) OUT.png.

Every experiment and benchmark hands its figures to this module, which adds
the same four facts to each (`metadata`): when it was measured, on what
machine, by which command, at which commit. A figure without those cannot be
compared with another one or reproduced, and a reader (or the test over
docs/results/) finds them in the same place in every file.

    {"date": "2026-11-25T11:43:07+00:00",
     "machine": {"cpu": ..., "cores": 2, "python": ..., "os": ..., "kernel": ...},
     "command": "python -m loadtests.benchmarks.efficiency",
     "commit": "7205ff9",
     ...the figures...}

A machine fact is null only in files converted from before this layout, where
the run did not record it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import shlex
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loadtests import REPO_ROOT
from loadtests.harness import machine
from loadtests.harness.lock import exclusive

RESULTS = REPO_ROOT / "docs" / "results"
METADATA = ("date", "machine", "command", "commit")
MACHINE = ("cpu", "cores", "python", "os", "kernel")

Report = dict[str, Any]
Markdown = Callable[[Report], str]
Plot = Callable[[Report, Path], None]


def command_line(module: str, argv: Sequence[str] = ()) -> str:
    """The command that repeats a run: `python -m MODULE ARGV...`."""
    return shlex.join(["python", "-m", module, *argv])


def git_commit() -> str | None:
    """The checkout's commit (short), or None outside a git checkout."""
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    return None


def metadata(command: str) -> Report:
    """The four facts every result file starts with, taken now."""
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine.describe(),
        "command": command,
        "commit": git_commit(),
    }


def stamped(command: str, figures: Report) -> Report:
    """`figures` as a report: the metadata first, then the figures."""
    clash = set(METADATA) & set(figures)
    if clash:
        raise ValueError(f"figures may not carry the report's own keys: {sorted(clash)}")
    return metadata(command) | figures


# What a result's command may run: an experiment or benchmark, or a tool of the lab.
RUNNABLE = ("python -m loadtests.", "python -m deploy.")


def problems(report: Report) -> list[str]:
    """Every way `report` strays from the one metadata layout (empty: it keeps it)."""
    found = [f"no {key!r}" for key in METADATA if key not in report]
    date = report.get("date")
    try:
        parsed = datetime.fromisoformat(date) if isinstance(date, str) else None
    except ValueError:
        parsed = None
    if parsed is None or parsed.utcoffset() is None:
        found.append(f"date {date!r} is not an ISO 8601 time with its UTC offset")
    facts = report.get("machine")
    if not isinstance(facts, dict) or sorted(facts) != sorted(MACHINE):
        found.append(f"machine must have exactly {list(MACHINE)}, not {facts!r}")
    elif not (facts["cores"] is None or isinstance(facts["cores"], int)):
        found.append(f"machine cores {facts['cores']!r} is not a whole number")
    command = report.get("command")
    module = command.split()[2] if isinstance(command, str) and command.count(" ") >= 2 else ""
    if isinstance(command, str) and command.startswith("python -m pytest "):
        # A result the test suite writes (the hardening table): its tests must exist.
        found += [
            f"command {command!r} names {path}, which this checkout lacks"
            for path in command.split()[3:]
            if not path.startswith("-") and not (REPO_ROOT / path.split("::")[0]).exists()
        ]
    elif not (
        isinstance(command, str)
        and command.startswith(("python -m loadtests.", "python -m deploy."))
    ):
        found.append(
            f"command {command!r} is not `python -m loadtests.<...>`, `python -m deploy.<...>` "
            "or `python -m pytest`"
        )
    elif importlib.util.find_spec(module) is None:
        found.append(f"command {command!r} names no module of this checkout")
    if not (report.get("commit") is None or isinstance(report.get("commit"), str)):
        found.append(f"commit {report.get('commit')!r} is neither a hash nor null")
    # Machine facts live under "machine" only, not also in a setup or versions block.
    for key, value in report.items():
        if key != "machine" and isinstance(value, dict):
            stray = {"measured_at", "cpus", "cores", "python", "kernel"} & set(value)
            found += [f"{key}.{name} belongs in the metadata" for name in sorted(stray)]
    if "measured_at" in report:
        found.append("measured_at is now date")
    return found


def when(report: Report) -> str:
    """The report's date for reading: 2026-11-25 11:43 UTC."""
    return datetime.fromisoformat(report["date"]).astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def measured(report: Report) -> str:
    """The sentence every rendered report opens with: when, on what, at which commit."""
    facts = report["machine"]
    date = when(report)
    cores = f" ({facts['cores']} cores)" if facts["cores"] is not None else ""
    where = [f"on {facts['cpu'] or 'an unrecorded CPU'}{cores}"]
    if facts["os"]:
        where.append(facts["os"])
    if facts["kernel"]:
        where.append(f"kernel {facts['kernel']}")
    if facts["python"]:
        where.append(f"Python {facts['python']}")
    commit = f"commit {report['commit']}" if report["commit"] else "commit not recorded"
    return f"Measured {date} {', '.join(where)}; {commit}."


def how_measured(report: Report) -> list[str]:
    """The heading every report's method section starts with, and its command."""
    return ["## How it was measured", "", "```", report["command"], "```", ""]


def write(report: Report, out: Path, markdown: Markdown, plot: Plot | None = None) -> None:
    """OUT.json (the figures), OUT.md (them, for reading) and OUT.png when there is a plot."""
    wrong = problems(report)
    if wrong:
        raise ValueError(f"{out}: the report strays from the metadata layout: {wrong}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    draw(report, out, markdown, plot)


def draw(report: Report, out: Path, markdown: Markdown, plot: Plot | None = None) -> None:
    """OUT.md (and OUT.png) from `report`, leaving OUT.json as it is."""
    out.with_suffix(".md").write_text(markdown(report))
    if plot is not None:
        plot(report, out.with_suffix(".png"))


def render(out: Path, markdown: Markdown, plot: Plot | None = None) -> Report:
    """Rewrite OUT.md (and OUT.png) from the saved OUT.json: a new layout, no new run."""
    report: Report = json.loads(out.with_suffix(".json").read_text())
    wrong = problems(report)
    if wrong:
        raise ValueError(f"{out}.json strays from the metadata layout: {wrong}")
    draw(report, out, markdown, plot)
    return report


@contextlib.contextmanager
def terminated_like_interrupted() -> Iterator[None]:
    """SIGTERM ends a measurement as Ctrl+C does: its `finally` blocks run.

    Python's default SIGTERM ends the process at once, which would leave an
    experiment's lab (nodes, HAProxy, PostgreSQL) running with nobody to
    stop it. Here SIGTERM raises SystemExit in the main thread instead; the
    previous handler is back afterwards. (Off the main thread, as when a
    test drives an experiment from a worker, nothing changes.)
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(
    name: str,
    out: Path,
    *,
    render_only: bool,
    measure: Callable[[], Report],
    markdown: Markdown,
    plot: Plot | None = None,
    lock: bool = True,
) -> Report | None:
    """What every experiment's and benchmark's main does with its report.

    With `render_only`, OUT.md (and OUT.png) are rewritten from OUT.json and
    None is returned. Otherwise `measure()` runs (under the machine-wide lock
    unless `lock` is false, as for a smoke run) and its report is written.
    """
    if render_only:
        render(out, markdown, plot)
        return None
    with terminated_like_interrupted(), exclusive(name) if lock else contextlib.nullcontext():
        report = measure()
    write(report, out, markdown, plot)
    return report


def run_and_print(
    name: str,
    out: Path,
    *,
    render_only: bool,
    measure: Callable[[], Report],
    markdown: Markdown,
    plot: Plot | None = None,
    lock: bool = True,
) -> int:
    """A benchmark's main: `main` above, then the new report's Markdown on stdout."""
    report = main(
        name, out, render_only=render_only, measure=measure, markdown=markdown, plot=plot,
        lock=lock,
    )  # fmt: skip
    if report is not None:
        print(markdown(report))
    return 0
