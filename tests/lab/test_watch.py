"""`deploy.lab watch` draws the fleet from bus heartbeats alone (no node is asked over HTTP)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deploy.lab.cluster import Lab
from deploy.lab.watch import watch
from tests.bus.conftest import PeerProcess


def test_watch_shows_each_node_as_its_heartbeats_describe_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    n1 = PeerProcess("n1")
    try:
        _watch_and_check(tmp_path, n1, capsys)
    finally:
        n1.kill()


def _watch_and_check(tmp_path: Path, n1: PeerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    lab = Lab(tmp_path)
    state = {
        "run_dir": str(tmp_path),
        "front": None,
        "options": {"backend": "sqlite"},
        "haproxy": None,
        # n2's endpoint has nobody behind it: never heard.
        "nodes": [{"id": "n1", "bus": n1.endpoint}, {"id": "n2", "bus": "tcp://127.0.0.1:9"}],
    }
    lab.state_path.write_text(json.dumps(state))
    watch(lab, interval_s=0.5, count=2)
    last = capsys.readouterr().out.split("\x1b[2J\x1b[H")[-1]
    rows = {line.split()[0]: line.split() for line in last.splitlines()[3:]}
    assert rows["n1"][1] == "ready", last
    assert rows["n2"][1] == "unheard", last
