"""The workshop as a new user meets it: `make demo` in a real terminal, timed.

`TmuxDemo` runs `make demo` in a detached tmux session on a private tmux
server and reads the pane back as the room sees it (the workshop's tests
drive it). `python -m deploy.lab.workshop` clones this repository afresh,
runs `make demo` there twice (a fresh clone: the environment is built first;
then again, as a presenter's second run) and writes how long each took to
show the live view, and how long Ctrl+C took to leave nothing running, to
docs/results/workshop-times.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy.lab.cluster import REPO_ROOT, Lab

RESULTS = REPO_ROOT / "docs" / "results"
NODE_ROW = re.compile(r"^n\d+$")


@dataclass
class TmuxDemo:
    """`make demo RUN_DIR=...` in a detached tmux session of its own tmux server."""

    run_dir: Path
    repo: Path = REPO_ROOT
    socket: str = field(default_factory=lambda: f"cattle-demo-{secrets.token_hex(4)}")
    session: str = "demo"
    screens: list[str] = field(default_factory=list)
    pane_pid: int | None = None  # make's: it leads the pane's process group

    def tmux(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["tmux", "-L", self.socket, *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )

    def start(self, make_args: str = "") -> None:
        command = f"make demo RUN_DIR={self.run_dir} {make_args}".strip()
        started = self.tmux(
            "new-session", "-d", "-s", self.session, "-x", "180", "-y", "50", "-c",
            str(self.repo),
            # A detached session's panes may be handed COLUMNS=80: say the real size.
            "-e", "COLUMNS=180", "-e", "LINES=50",
            command, ";", "set-option", "remain-on-exit", "on",
        )  # fmt: skip
        if started.returncode != 0:
            raise RuntimeError(f"tmux did not start the demo: {started.stderr}")
        pane = self.tmux("list-panes", "-t", self.session, "-F", "#{pane_pid}").stdout.strip()
        self.pane_pid = int(pane) if pane.isdigit() else None

    def screen(self) -> str:
        text = self.tmux("capture-pane", "-p", "-t", self.session).stdout
        self.screens.append(text)
        del self.screens[:-20]
        return text

    def history(self) -> str:
        """The pane with its scrollback: what the demo printed before the live view."""
        return self.tmux("capture-pane", "-p", "-S", "-200", "-t", self.session).stdout

    def printed_command(self, words: str) -> list[str]:
        """The command line the demo printed that contains `words`, ready to run."""
        for line in self.history().splitlines():
            if words in line:
                return shlex.split(re.split(r"\s{2,}", line.strip())[0])
        raise LookupError(f"the demo printed no command with {words!r}")

    def rows(self) -> dict[str, list[str]]:
        """The live view's node rows on screen now, by node id."""
        rows = {}
        for line in self.screen().splitlines():
            cells = [c.strip() for c in line.strip().strip("│").split("│")]
            if len(cells) >= 8 and NODE_ROW.match(cells[0]):
                rows[cells[0]] = cells
        return rows

    def load(self) -> dict[str, Any]:
        try:
            counts: dict[str, Any] = json.loads((self.run_dir / "load.json").read_text())
        except (OSError, ValueError):
            return {}
        return counts

    def pane_dead(self) -> bool:
        panes = self.tmux("list-panes", "-t", self.session, "-F", "#{pane_dead}")
        return panes.returncode != 0 or panes.stdout.strip() == "1"

    def wait(self, predicate: Any, timeout_s: float, interval_s: float = 0.25) -> float | None:
        """Seconds until `predicate()` held, None past `timeout_s` (or once the demo died)."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if predicate():
                return time.monotonic() - started
            if self.pane_dead():
                return None
            time.sleep(interval_s)
        return None

    def live(self, nodes: int = 3) -> bool:
        """The live view is up: every node's row reads ready."""
        return [row[1] for row in self.rows().values()] == ["ready"] * nodes

    def interrupt(self, timeout_s: float = 60) -> float | None:
        """Ctrl+C, as the presenter would; seconds until the demo had ended."""
        started = time.monotonic()
        self.tmux("send-keys", "-t", self.session, "C-c")
        while time.monotonic() - started < timeout_s:
            if self.pane_dead():
                return time.monotonic() - started
            time.sleep(0.2)
        return None

    def stop(self) -> None:
        """End the demo (Ctrl+C first, so it tears its lab down), then the tmux server.

        If Ctrl+C did not end it, SIGTERM goes to the pane's process group (make
        and the demo it runs: the demo tears down on SIGTERM too), then SIGKILL.
        """
        if not self.pane_dead():
            self.interrupt()
        if self.pane_pid is not None and not self.pane_dead():
            for sig, wait_s in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 5.0)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pane_pid, sig)
                deadline = time.monotonic() + wait_s
                while time.monotonic() < deadline and not self.pane_dead():
                    time.sleep(0.2)
        self.tmux("kill-server")  # this demo's private server only


# The drills of docs/workshop.md, in its order, as the demo prints them.
DRILLS = (
    "deploy.lab drain n2",
    "deploy.lab kill n3",
    "deploy.lab restart n3",
    "deploy.lab scale 4",
)
# The workshop's short experiments, run in the clone after the demo.
EXPERIMENTS = {
    "scaleout": [".venv/bin/python", "-m", "loadtests.experiments.scaleout", "--ns", "1,2,4",
                 "--min-pairs", "2", "--max-pairs", "2", "--out", "run/workshop/scaleout"],
    "failover": [".venv/bin/python", "-m", "loadtests.experiments.failover",
                 "--out", "run/workshop/failover"],
}  # fmt: skip


def _drill(demo: TmuxDemo, words: str, repo: Path) -> dict[str, Any]:
    command = demo.printed_command(words)
    started = time.monotonic()
    done = subprocess.run(
        command, cwd=repo, capture_output=True, text=True, timeout=120, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout}{done.stderr}")
    took_s = time.monotonic() - started
    time.sleep(5)  # the room watches the view settle
    return {"drill": words.removeprefix("deploy.lab "), "seconds": round(took_s, 1)}


def _time_one(repo: Path, run_dir: Path, timeout_s: float, *, drills: bool) -> dict[str, Any]:
    demo = TmuxDemo(run_dir, repo=repo)
    started = time.monotonic()
    demo.start()
    try:
        to_live = demo.wait(demo.live, timeout_s)
        if to_live is None:
            raise RuntimeError("the live view never came up:\n" + "\n".join(demo.screens[-1:]))
        to_live_s = time.monotonic() - started
        time.sleep(5)  # the room watches for a moment
        done = [_drill(demo, words, repo) for words in DRILLS] if drills else []
        counts = demo.load()
        teardown = demo.interrupt()
        if teardown is None:
            raise RuntimeError("Ctrl+C did not end the demo within 60 s")
        state = json.loads((run_dir / "lab.json").read_text())
        left = Lab(run_dir).live_processes(state)
        demo_own = json.loads((run_dir / "demo-timing.json").read_text())
    finally:
        demo.stop()
    return {
        "seconds_to_live_view": round(to_live_s, 1),
        "demo_own_seconds_to_live_view": demo_own["seconds_to_live_view"],
        "drills": done,
        "seconds_to_tear_down": round(teardown, 1),
        "left_running": left,
        "seconds_in_all": round(time.monotonic() - started, 1),
        "requests_seen": counts.get("requests"),
        "failed_requests": counts.get("failures"),
    }


def _experiment(repo: Path, argv: list[str]) -> dict[str, Any]:
    started = time.monotonic()
    done = subprocess.run(argv, cwd=repo, capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return {"command": " ".join(argv), "seconds": round(time.monotonic() - started, 1)}


def measure(timeout_s: float = 300) -> dict[str, Any]:
    from loadtests.harness.machine import describe

    commit = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    base = Path(tempfile.mkdtemp(prefix="cattle-workshop-", dir="/tmp"))
    base.chmod(0o755)
    clone = base / "cattle"
    started = time.monotonic()
    try:
        subprocess.run(
            ["git", "clone", "--quiet", str(REPO_ROOT), str(clone)], check=True, timeout=120
        )
        fresh = _time_one(clone, base / "run-1", timeout_s, drills=True)
        experiments = {name: _experiment(clone, argv) for name, argv in EXPERIMENTS.items()}
        whole_s = time.monotonic() - started
        again = _time_one(clone, base / "run-2", timeout_s, drills=False)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M+00:00", time.gmtime()),
        "machine": describe(),
        "command": "python -m deploy.lab.workshop",
        "commit": commit,
        "what": "a fresh `git clone` of this repository on this machine (uv's package "
        "cache already filled); `make demo` in tmux until every node row of the live view "
        "reads ready; the drills of docs/workshop.md as the demo printed them, 5 s apart; "
        "Ctrl+C until the demo has ended; then the workshop's two short experiments; "
        "then `make demo` once more in the same clone",
        "fresh_clone": fresh,
        "experiments": experiments,
        "seconds_whole_script": round(whole_s, 1),
        "second_run": again,
    }


def write(result: dict[str, Any]) -> None:
    from loadtests import report as reports

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "workshop-times.json").write_text(json.dumps(result, indent=2) + "\n")
    fresh, again = result["fresh_clone"], result["second_run"]
    lines = [
        "# Workshop: `make demo` to live view",
        "",
        f"{reports.measured(result)} Reproduce with `{result['command']}`.",
        "",
        f"What: {result['what']}.",
        "",
        "| run | to live view s | demo's own count s | Ctrl+C to ended s | left running |",
        "|---|---:|---:|---:|---|",
    ]
    for name, run in (("fresh clone (builds .venv first)", fresh), ("second run", again)):
        lines.append(
            f"| {name} | {run['seconds_to_live_view']} | "
            f"{run['demo_own_seconds_to_live_view']} | {run['seconds_to_tear_down']} | "
            f"{', '.join(run['left_running']) or 'nothing'} |"
        )
    lines += ["", "| step of the fresh run | seconds |", "|---|---:|"]
    lines += [f"| `{d['drill']}` (the command, until it returned) | {d['seconds']} |"
              for d in fresh["drills"]]  # fmt: skip
    lines += [f"| `{e['command']}` | {e['seconds']} |" for e in result["experiments"].values()]
    lines += [
        "",
        f"The load's requests during the fresh run: {fresh['requests_seen']}, failed: "
        f"**{fresh['failed_requests']}**.",
        "",
        f"**The whole script, clone to the last plot: {result['seconds_whole_script'] / 60:.1f} "
        f"minutes** ({result['seconds_whole_script']} s).",
    ]
    (RESULTS / "workshop-times.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.lab.workshop", description=__doc__)
    parser.add_argument("--timeout-s", type=float, default=300, help="per run, to live view")
    args = parser.parse_args(argv)
    result = measure(args.timeout_s)
    write(result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
