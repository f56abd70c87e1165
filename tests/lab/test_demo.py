"""`make demo` in a real terminal: tmux starts it, a drill is sent from another
process, the pane is read back as the room would see it; Prometheus's graph
of the same moment is photographed by headless Chromium; Ctrl+C leaves nothing.

One demo serves the module's tests, in order: drill, picture, Ctrl+C.
`WORKSHOP_WRITE=1` also keeps the picture as docs/workshop-drill.png.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.lab import procs
from deploy.lab.cluster import REPO_ROOT, Lab
from deploy.lab.demo import graph_url
from deploy.lab.workshop import TmuxDemo as Demo
from tests.conftest import scratch_dir
from tests.support import require, wait_until

pytestmark = pytest.mark.cluster

DRILL_PICTURE = REPO_ROOT / "docs" / "workshop-drill.png"
# For the docs' picture, the graph needs history on both sides of the drill.
WRITE_PICTURE = bool(os.environ.get("WORKSHOP_WRITE"))
BEFORE_DRILL_S, AFTER_DRILL_S = (45.0, 25.0) if WRITE_PICTURE else (0.0, 0.0)


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
        ready = running.wait(
            lambda: running.live() and int(running.load().get("requests", 0)) > 100,
            timeout_s=120,
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
    # The bring-up drew its bar in the terminal: every step done, time spent and left.
    history = demo.history()
    assert re.search(r"lab up +━+ 6/6 in \d:\d\d:\d\d left about \d:", history), history
    time.sleep(BEFORE_DRILL_S)
    # The drill as the demo printed it, run from another process as a presenter would.
    command = demo.printed_command("deploy.lab drain n2")
    assert command[-2:] == ["--run-dir", str(demo.run_dir)], command
    drill = subprocess.run(
        command,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert drill.returncode == 0, drill.stderr
    assert "watch for:" in drill.stdout and "drained and stopped" in drill.stdout
    DRILL["took_s"] = float(re.findall(r"done in ([\d.]+) s", drill.stdout)[0])
    seen: list[str] = []

    def n2_gone() -> bool:
        state = demo.rows().get("n2", ["", "?"])[1]
        if not seen or seen[-1] != state:
            seen.append(state)
        return state == "gone"

    # The drill returned once n2 exited; the view may still be a refresh behind.
    assert wait_until(n2_gone, timeout_s=10, interval_s=0.2) is not None, demo.screens[-1]

    rows: list[str] = []

    def drain_logged() -> bool:
        # The drain's row of the event log, in a fresh capture: one may land
        # while the view redraws, its events table still blank.
        rows.extend(
            line for line in demo.screen().splitlines() if "│ drain n2" in line.replace("  ", " ")
        )
        return bool(rows) and "gone +" in rows[-1]

    assert wait_until(drain_logged, timeout_s=5, interval_s=0.2) is not None, demo.screens[-1]
    screen = demo.screens[-1]
    # The event log timed it by what the view showed: draining, then gone.
    row = rows[-1]
    assert "draining +" in row and "gone +" in row, row
    assert row.index("draining +") < row.index("gone +")
    # Not one request of the steady load failed, as the view and the load agree.
    assert "failed requests 0" in screen, screen
    assert demo.load()["failures"] == 0, demo.load()
    DRILL["seen_after_s"] = {
        name: float(s)
        for name, s in re.findall(r"(draining|out of rotation|gone) \+([\d.]+)s", row)
    }
    DRILL["view"] = screen


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
        prometheus = Lab(demo.run_dir).prometheus(state)
        _write_drill_result(
            demo,
            before=prometheus.values(
                f"node:http_requests:rate15s offset {AFTER_DRILL_S + 10:.0f}s"
            ),
            after=prometheus.values("node:http_requests:rate15s"),
        )


DRILL: dict[str, object] = {}  # what the drill test saw, for the result file


def _write_drill_result(demo: Demo, *, before: dict[str, float], after: dict[str, float]) -> None:
    from loadtests import report as reports
    from loadtests.harness.machine import describe

    load = demo.load()
    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M+00:00", time.gmtime()),
        "machine": describe(),
        # Run with WORKSHOP_WRITE=1 (the Markdown says so); the layout's command is pytest's.
        "command": "python -m pytest tests/lab/test_demo.py",
        "commit": reports.git_commit(),
        "lab": "make demo: 3 nodes on SQLite behind HAProxy, Prometheus",
        "load": {"users": load["users"], "rate_per_user": load["rate_per_user"],
                 "requests": load["requests"], "failures": load["failures"]},
        "drill": "drain n2",
        "drill_took_s": DRILL["took_s"],
        "seen_in_view_after_s": DRILL["seen_after_s"],
        "rate_per_node_before": {k: round(v, 1) for k, v in sorted(before.items())},
        "rate_per_node_after": {k: round(v, 1) for k, v in sorted(after.items())},
        "picture": "docs/workshop-drill.png",
    }  # fmt: skip
    results = REPO_ROOT / "docs" / "results"
    (results / "workshop-drill.json").write_text(json.dumps(result, indent=2) + "\n")
    seen = ", ".join(f"{k} +{v:.1f} s" for k, v in DRILL["seen_after_s"].items())  # type: ignore[attr-defined]

    def rates(by_node: dict[str, float]) -> str:
        return ", ".join(f"{k} {v:.1f}" for k, v in by_node.items())

    lines = [
        "# Workshop: a drain drill on `make demo`",
        "",
        f"{reports.measured(result)} Reproduce with "
        f"`WORKSHOP_WRITE=1 .venv/bin/{result['command']}`.",
        "",
        f"{result['lab']}; steady load of {load['users']} locust users at "
        f"{load['rate_per_user']:g} req/s each. Drill: `drain n2`.",
        "",
        f"- the drill command returned after {DRILL['took_s']:.1f} s (n2 had exited)",
        f"- seen in the live view after: {seen}",
        f"- requests of the load: {load['requests']}, failed: **{load['failures']}**",
        f"- req/s per node before (Prometheus, node:http_requests:rate15s): "
        f"{rates(result['rate_per_node_before'])}",
        f"- req/s per node after: {rates(result['rate_per_node_after'])}",
        "",
        "The live view at that moment:",
        "",
        "```",
        str(DRILL["view"]).rstrip(),
        "```",
        "",
        "![Prometheus graph of the drill](../workshop-drill.png)",
    ]
    (results / "workshop-drill.md").write_text("\n".join(lines) + "\n")


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
