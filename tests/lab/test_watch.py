"""`deploy.lab watch` draws the fleet from bus heartbeats alone (no node is asked over
HTTP), and times each drill of the event log by what it shows afterwards."""

from __future__ import annotations

import io
import json
from pathlib import Path

from rich.console import Console

from deploy.lab import drills
from deploy.lab.cluster import Lab
from deploy.lab.watch import EventLog, Row, watch
from tests.bus.conftest import PeerProcess


def test_watch_shows_each_node_as_its_heartbeats_describe_it(tmp_path: Path) -> None:
    n1 = PeerProcess("n1")
    try:
        _watch_and_check(tmp_path, n1)
    finally:
        n1.kill()


def _watch_and_check(tmp_path: Path, n1: PeerProcess) -> None:
    lab = Lab(tmp_path)
    state = {
        "run_dir": str(tmp_path),
        "front": None,
        "options": {"backend": "sqlite", "front": "none"},
        "haproxy": None,
        # n2's endpoint has nobody behind it: never heard.
        "nodes": [{"id": "n1", "bus": n1.endpoint}, {"id": "n2", "bus": "tcp://127.0.0.1:9"}],
    }
    lab.state_path.write_text(json.dumps(state))
    (tmp_path / "load.json").write_text(
        json.dumps({"users": 4, "rps": 20.0, "requests": 400, "failures": 0})
    )
    out = io.StringIO()
    watch(lab, interval_s=0.5, count=2, console=Console(file=out, width=120))
    rows = {
        cells[0]: cells
        for line in out.getvalue().splitlines()
        if len(cells := [c.strip() for c in line.strip("│ ").split("│")]) > 2
    }
    assert rows["n1"][1] == "ready", out.getvalue()
    assert rows["n2"][1] == "unheard", out.getvalue()
    assert "failed requests 0" in out.getvalue()


def test_the_event_log_times_a_drain_by_what_the_view_shows(tmp_path: Path) -> None:
    drills.record(tmp_path, {"id": "e1", "verb": "drain", "target": "n2", "phase": "issued"})
    log = EventLog(tmp_path)
    log.read()
    log.observe({"n2": Row("n2", "ready", "UP")})
    assert log.events[0].shown == {}  # nothing happened yet: nothing is timed
    log.observe({"n2": Row("n2", "draining", "UP")})
    log.observe({"n2": Row("n2", "draining", "DRAIN")})
    log.observe({"n2": Row("n2", "gone", "DOWN")})
    drills.record(
        tmp_path,
        {"id": "e1", "verb": "drain", "target": "n2", "phase": "done", "took_s": 2.5,
         "detail": "drained and stopped"},
    )  # fmt: skip
    log.read()
    event = log.events[0]
    assert list(event.shown) == ["draining", "out of rotation", "gone"]
    assert event.shown["draining"] <= event.shown["out of rotation"] <= event.shown["gone"]
    assert event.done_s == 2.5 and not event.failed
