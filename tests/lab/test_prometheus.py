"""Prometheus over real nodes: the config and rules pass promtool, every node is
scraped, the recording rules give per-node rates, and the dashboard asks only
valid PromQL over series the rules record."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.lab import prometheus
from deploy.lab.cluster import Lab, LabOptions
from deploy.lab.node import Node
from deploy.lab.postgres import free_port
from tests.conftest import scratch_dir
from tests.support import require, wait_until

DASHBOARD = prometheus.DEPLOY_DIR / "grafana" / "cattle-fleet.json"


def _promtool() -> str:
    found = shutil.which("promtool")
    require(found is not None, "promtool is not installed (apt-get install prometheus)")
    assert found is not None
    return found


def _check_rules(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=30
    )


def test_config_and_rules_pass_promtool_and_a_broken_rule_does_not(tmp_path: Path) -> None:
    config = prometheus.write_config(tmp_path)
    checked = subprocess.run(
        [_promtool(), "check", "config", str(config)], capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert _check_rules(prometheus.RULES).returncode == 0
    broken = tmp_path / "rules.yml"
    broken.write_text(
        prometheus.RULES.read_text().replace("sum by (node) (", "sum by (node) ((", 1)
    )
    assert _check_rules(broken).returncode != 0, "promtool accepted a broken rule"


def _recorded() -> set[str]:
    return set(re.findall(r"^\s*- record: (\S+)$", prometheus.RULES.read_text(), re.MULTILINE))


def test_the_dashboard_asks_valid_promql_over_recorded_series(tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and isinstance(dashboard["schemaVersion"], int)
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels), "panel ids repeat"
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    assert exprs and all(p["gridPos"]["w"] > 0 and p["gridPos"]["h"] > 0 for p in panels)
    # Every expression parses: promtool checks it as a rule of its own.
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:check_{i}", "expr": e} for i, e in enumerate(exprs)
                ],
            }
        ]
    }
    checked_file = tmp_path / "dashboard-rules.yml"
    checked_file.write_text(json.dumps(rules))  # JSON is YAML
    checked = _check_rules(checked_file)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # Every recorded series it reads is one the rules record.
    used = {name for e in exprs for name in re.findall(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", e)}
    assert used and used <= _recorded(), used - _recorded()


@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator[list[Node]]:
    nodes = [
        Node(tmp_path / f"n{i}.log", name=f"n{i}", env={"CATTLE_DATA_DIR": str(tmp_path / f"n{i}"),
                                                        "CATTLE_NODE_ID": f"n{i}"})
        for i in (1, 2)
    ]  # fmt: skip
    try:
        for node in nodes:
            node.start(timeout_s=60)
        yield nodes
    finally:
        for node in nodes:
            node.kill()


def test_prometheus_scrapes_every_node_and_the_rules_follow_them(
    tmp_path: Path, two_nodes: list[Node]
) -> None:
    require(shutil.which("prometheus") is not None, "prometheus is not installed")
    run_dir = tmp_path / "prom"
    run_dir.mkdir()
    prometheus.write_targets(
        run_dir, [prometheus.Target(n.name, "127.0.0.1", n.port) for n in two_nodes]
    )
    prometheus.write_config(run_dir)
    server = prometheus.start(run_dir, port=free_port())
    try:
        both_up = wait_until(
            lambda: server.values('up{job="cattle"}') == {"n1": 1.0, "n2": 1.0},
            timeout_s=20,
            interval_s=0.2,
        )
        assert both_up is not None, f"nodes never both up: {server.values('up')}"
        # Traffic on n1 only: the per-node rate must say so.
        created = two_nodes[0].request(
            "POST",
            "/v1/notes",
            body=b'{"title": "p"}',
            headers={"content-type": "application/json"},
        )
        assert created.status == 201, created.text
        location = created.headers["location"]

        def n1_busier() -> bool:
            for _ in range(50):
                assert two_nodes[0].get(location).status == 200
            rates = server.values("node:http_requests:rate15s")
            return rates.get("n1", 0) > 1 and rates.get("n1", 0) > rates.get("n2", 0)

        busier = wait_until(n1_busier, timeout_s=30, interval_s=0.5)
        assert busier is not None, server.values("node:http_requests:rate15s")
        assert server.values("fleet:nodes_up:count") == {"": 2.0}
        # The cache answered the repeated reads: its hit ratio is recorded for n1.
        hits = wait_until(
            lambda: 0.5 < server.values("node:cattle_cache_hit_ratio:rate15s").get("n1", 0) <= 1,
            timeout_s=20,
            interval_s=0.2,
        )
        assert hits is not None, server.values("node:cattle_cache_hit_ratio:rate15s")
        # A node that dies is seen as down at the next scrapes.
        two_nodes[1].kill()
        gone = wait_until(
            lambda: server.values('up{job="cattle"}').get("n2") == 0.0,
            timeout_s=15,
            interval_s=0.2,
        )
        assert gone is not None, server.values('up{job="cattle"}')
    finally:
        server.stop()


@pytest.fixture(scope="module")
def prometheus_lab() -> Iterator[Lab]:
    """`up --prometheus`: 2 nodes behind HAProxy (room for a third), Prometheus over them."""
    require(shutil.which("prometheus") is not None, "prometheus is not installed")
    require(shutil.which("haproxy") is not None or Path("/usr/sbin/haproxy").exists(),
            "haproxy is not installed")  # fmt: skip
    base = scratch_dir("cattle-prom-lab-")
    lab = Lab(base / "run")
    try:
        lab.up(LabOptions(nodes=2, max_nodes=3, prometheus=True))
        yield lab
    finally:
        state = lab.load() if lab.state_path.exists() else None
        lab.down()
        if state is not None:
            assert lab.live_processes(state) == []
        shutil.rmtree(base, ignore_errors=True)


def _get(url: str) -> int:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 (the lab's loopback)
        return int(response.status)


@pytest.mark.cluster
def test_the_lab_prometheus_sees_every_node_and_the_front_and_follows_scale(
    prometheus_lab: Lab,
) -> None:
    lab = prometheus_lab
    state = lab.load()
    server = lab.prometheus(state)
    assert "prometheus" in lab.status() and state["prometheus"]["url"] == server.url
    front = state["front"]

    def every_node_serves() -> bool:
        for _ in range(40):
            assert _get(f"{front}/v1/notes?limit=1") == 200
        rates = server.values("node:http_requests:rate15s")
        return set(rates) == {"n1", "n2"} and all(r > 0 for r in rates.values())

    seen = wait_until(every_node_serves, timeout_s=30, interval_s=0.5)
    assert seen is not None, server.values("node:http_requests:rate15s")
    # HAProxy's own exporter is scraped too: its view of each server.
    states = {
        s["metric"].get("server"): float(s["value"][1])
        for s in server.query('haproxy_server_status{job="haproxy",proxy="nodes",state="UP"}')
    }
    assert states == {"n1": 1.0, "n2": 1.0}, states

    # A node added live is in HAProxy's backend and Prometheus's targets.
    assert lab.scale(3) == {"added": ["n3"], "removed": []}
    third = wait_until(
        lambda: server.values('up{job="cattle"}').get("n3") == 1.0, timeout_s=20, interval_s=0.5
    )
    assert third is not None, server.values('up{job="cattle"}')
    assert lab.scale(2) == {"added": [], "removed": ["n3"]}
    assert [n["id"] for n in lab.load()["nodes"]] == ["n1", "n2"]
