"""`make demo FRONT=anycast`: the same demo on the anycast front. Its live view reads
each node's heartbeats from inside the node's namespace and shows the router's
view (announced); the load runs from the client's namespace; the end leaves nothing."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.lab import anycast
from deploy.lab.cluster import REPO_ROOT, Lab
from tests.conftest import scratch_dir
from tests.support import require

pytestmark = pytest.mark.cluster


def test_the_anycast_demo_shows_every_node_heard_and_announced() -> None:
    try:
        anycast.check_installed()
    except anycast.AnycastError as exc:
        require(False, str(exc))
    base = scratch_dir("cattle-demo-anycast-")
    run_dir = base / "run"
    try:
        _demo_and_check(run_dir)
    finally:
        lab = Lab(run_dir)
        if lab.state_path.exists():
            state = lab.load()
            lab.down()  # after a failure; after a pass there is nothing left to stop
            assert lab.live_processes(state) == []
        shutil.rmtree(base, ignore_errors=True)


def _demo_and_check(run_dir: Path) -> None:
    # The same entry point `make demo FRONT=anycast` runs, for a bounded number of refreshes.
    shown = subprocess.run(
        [sys.executable, "-m", "deploy.lab.demo", "--front", "anycast",
         "--run-dir", str(run_dir), "--count", "6", "--interval", "0.5"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "COLUMNS": "160"},
    )  # fmt: skip
    out = shown.stdout
    assert shown.returncode == 0, out + shown.stderr
    # Into a pipe, the bring-up says each step as it begins: all of them, counted right.
    steps = re.findall(r"^up: step (\d) of (\d), ", out, re.MULTILINE)
    assert steps == [(f"{k}", "5") for k in range(1, 6)], out
    assert "up: step 5 of 5, front (anycast)" in out and "up: lab up after" in out
    last_view = out.rsplit("cattle lab", 1)[-1]
    rows = {
        cells[0]: cells
        for line in last_view.splitlines()
        if len(cells := [c.strip() for c in line.strip().strip("│").split("│")]) >= 8
        and re.fullmatch(r"n\d", cells[0])
    }
    assert sorted(rows) == ["n1", "n2", "n3"], last_view
    assert all(r[1] == "ready" and r[2] == "announced" for r in rows.values()), last_view
    # Below the nodes, the router's own view: the ECMP route's next hops (from its kernel).
    assert "router ECMP next hops: n1, n2, n3" in last_view, last_view
    assert "scale 4" not in out  # not a drill of this front
    assert re.search(r"load: \d+ requests, 0 failed", out), out
    stopped = out.rsplit("stopped:", 1)[-1]
    assert "bird" in stopped and "namespace" in stopped, out
    assert Lab(run_dir).live_processes(Lab(run_dir).load()) == []
