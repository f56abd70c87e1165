"""`make demo` in a real terminal: tmux starts it, a drill is sent from another
process, the pane is read back as the room would see it; Prometheus's graph
of the same moment is photographed by headless Chromium; Ctrl+C leaves nothing.

One demo serves the module's tests, in order: drill, picture, Ctrl+C.
`WORKSHOP_WRITE=1` also keeps the picture as docs/workshop-drill.png.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from deploy.lab import procs
from deploy.lab.cluster import REPO_ROOT, Lab
from deploy.lab.demo import graph_url
from tests.conftest import scratch_dir
from tests.support import require, wait_until

pytestmark = pytest.mark.cluster

DRILL_PICTURE = REPO_ROOT / "docs" / "workshop-drill.png"
# For the docs' picture, the graph needs history on both sides of the drill.
WRITE_PICTURE = bool(os.environ.get("WORKSHOP_WRITE"))
BEFORE_DRILL_S, AFTER_DRILL_S = (45.0, 25.0) if WRITE_PICTURE else (0.0, 0.0)


@dataclass
class Demo:
    """`make demo` running in a detached tmux session on a private tmux server."""

    run_dir: Path
    socket: str = field(default_factory=lambda: f"cattle-demo-{secrets.token_hex(4)}")
    session: str = "demo"
    screens: list[str] = field(default_factory=list)

    def tmux(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["tmux", "-L", self.socket, *args], capture_output=True, text=True, timeout=10
        )

    def start(self) -> None:
        command = f"make demo RUN_DIR={self.run_dir}"
        started = self.tmux(
            "new-session", "-d", "-s", self.session, "-x", "180", "-y", "50", "-c",
            str(REPO_ROOT), command, ";", "set-option", "remain-on-exit", "on",
        )  # fmt: skip
        assert started.returncode == 0, started.stderr

    def screen(self) -> str:
        text = self.tmux("capture-pane", "-p", "-t", self.session).stdout
        self.screens.append(text)
        return text

    def rows(self) -> dict[str, list[str]]:
        """The live view's node rows on screen now, by node id."""
        rows = {}
        for line in self.screen().splitlines():
            cells = [c.strip() for c in line.strip().strip("│").split("│")]
            if len(cells) >= 8 and cells[0].startswith("n") and cells[0][1:].isdigit():
                rows[cells[0]] = cells
        return rows

    def load(self) -> dict[str, object]:
        try:
            counts: dict[str, object] = json.loads((self.run_dir / "load.json").read_text())
        except (OSError, ValueError):
            return {}
        return counts

    def pane_dead(self) -> bool:
        panes = self.tmux("list-panes", "-t", self.session, "-F", "#{pane_dead}")
        return panes.returncode != 0 or panes.stdout.strip() == "1"

    def stop(self) -> None:
        """Ctrl+C as a presenter would, then end the private tmux server (this test's only)."""
        if not self.pane_dead():
            self.tmux("send-keys", "-t", self.session, "C-c")
            wait_until(self.pane_dead, timeout_s=60, interval_s=0.5)
        self.tmux("kill-server")


def _require_demo_parts() -> None:
    for tool in ("tmux", "prometheus", "make"):
        require(shutil.which(tool) is not None, f"{tool} is not installed")
    require(
        shutil.which("haproxy") is not None or Path("/usr/sbin/haproxy").exists(),
        "haproxy is not installed",
    )


@pytest.fixture(scope="module")
def demo() -> Iterator[Demo]:
    _require_demo_parts()
    base = scratch_dir("cattle-demo-")
    running = Demo(base / "run")
    lab = Lab(running.run_dir)
    try:
        running.start()
        ready = wait_until(
            lambda: (
                [r[1] for r in running.rows().values()] == ["ready"] * 3
                and int(str(running.load().get("requests", 0))) > 100
            ),
            timeout_s=120,
            interval_s=0.5,
        )
        assert ready is not None, running.screens[-1] if running.screens else "no screen"
        yield running
    finally:
        running.stop()  # the demo tears its lab down; then make sure
        load_pid = running.load().get("pid")
        if isinstance(load_pid, int):
            procs.stop(load_pid, str(running.run_dir / "load.json"), timeout_s=10)
        with_state = lab.state_path.exists()
        if with_state:
            wait_until(lambda: lab.live_processes(lab.load()) == [], timeout_s=30, interval_s=0.5)
            lab.down()
        shutil.rmtree(base, ignore_errors=True)


def test_a_drain_shows_draining_then_gone_with_no_failed_request(demo: Demo) -> None:
    time.sleep(BEFORE_DRILL_S)
    drill = subprocess.run(
        [sys.executable, "-m", "deploy.lab", "drain", "n2", "--run-dir", str(demo.run_dir)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert drill.returncode == 0, drill.stderr
    assert "watch for:" in drill.stdout and "drained and stopped" in drill.stdout
    seen: list[str] = []

    def n2_gone() -> bool:
        state = demo.rows().get("n2", ["", "?"])[1]
        if not seen or seen[-1] != state:
            seen.append(state)
        return state == "gone"

    # The drill returned once n2 exited; the view may still be a refresh behind.
    assert wait_until(n2_gone, timeout_s=10, interval_s=0.2) is not None, demo.screens[-1]
    screen = demo.screens[-1]
    # The event log timed it by what the view showed: draining, then gone.
    drain_row = next(
        (line for line in screen.splitlines() if "│ drain n2" in line.replace("  ", " ")), screen
    )
    assert "draining +" in drain_row and "gone +" in drain_row, drain_row
    assert drain_row.index("draining +") < drain_row.index("gone +")
    # Not one request of the steady load failed, as the view and the load agree.
    assert "failed requests 0" in screen, screen
    assert demo.load()["failures"] == 0, demo.load()


def test_prometheus_graph_of_the_drill_is_a_picture(demo: Demo, tmp_path: Path) -> None:
    chromium = shutil.which("chromium")
    require(chromium is not None, "chromium is not installed (apt-get install chromium)")
    assert chromium is not None
    state = Lab(demo.run_dir).load()
    time.sleep(AFTER_DRILL_S)
    picture = tmp_path / "graph.png"
    shot = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,900",
         "--virtual-time-budget=8000", f"--screenshot={picture}",
         graph_url(state["prometheus"]["url"], range_input="90s")],
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert shot.returncode == 0 and picture.exists(), shot.stderr[-2000:]
    from PIL import Image

    with Image.open(picture) as image:
        assert image.size == (1400, 900)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
    # A blank page (or an error page) has a handful of colours; a graph with
    # its lines, axes and legend has many.
    assert colours is None or len(colours) > 50, f"{len(colours)} colours: blank?"
    if WRITE_PICTURE:
        shutil.copyfile(picture, DRILL_PICTURE)


def test_ctrl_c_stops_the_load_and_tears_the_lab_down(demo: Demo) -> None:
    lab = Lab(demo.run_dir)
    state = lab.load()
    load_pid = demo.load()["pid"]
    assert demo.tmux("send-keys", "-t", demo.session, "C-c").returncode == 0
    ended = wait_until(lambda: "stopped:" in demo.screen(), timeout_s=60, interval_s=0.5)
    assert ended is not None, demo.screens[-1]
    screen = demo.screens[-1]
    assert "load:" in screen and " 0 failed" in screen, screen
    assert lab.live_processes(state) == [], screen
    assert isinstance(load_pid, int)
    assert not procs.is_ours(load_pid, str(demo.run_dir / "load.json"))
    # And the demo itself has ended (its pane stays, dead, for this check).
    dead = wait_until(demo.pane_dead, timeout_s=10, interval_s=0.2)
    assert dead is not None, demo.screen()
