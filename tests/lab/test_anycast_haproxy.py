"""The anycast+haproxy front: ECMP to an HAProxy in every node's namespace, each
balancing over all the app nodes, so a dead app node costs no flow the router
pinned to its machine.

The same kill -9 of one app node under the same load from the client
namespace runs on both fronts: behind the per-machine proxies nothing fails
(the proxies take the node out and re-send what it dropped, and its machine
keeps its route); the control, on the plain anycast front (in test_anycast.py,
on its lab), fails the requests on flows pinned to the dead node.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from deploy.lab import anycast
from deploy.lab.cluster import REPO_ROOT, LabOptions
from loadtests import report as reports
from tests.lab.test_anycast import NODES, _anycast_lab, kill_one_app_node_under_load

pytestmark = [pytest.mark.cluster]

# ANYCAST_WRITE=1: what the test measured goes to docs/results/anycast-haproxy.json
# (the source of the figures in docs/operations.md, "anycast+haproxy").
RESULT = REPO_ROOT / "docs" / "results" / "anycast-haproxy.json"


def _markdown(report: dict[str, Any]) -> str:
    run = report["app_node_killed"]
    return "\n".join(
        [
            "# anycast+haproxy: kill -9 of one app node under load",
            "",
            f"{reports.measured(report)} Written by the lab test with ANYCAST_WRITE=1:",
            "",
            *reports.how_measured(report),
            "3 nodes, an HAProxy in each node's namespace over all three; 12 client",
            "connections in the client namespace, each sending a request every 50 ms and",
            "opening a new connection every 20 requests; no client retries; n2's app node",
            "killed (SIGKILL) 1.5 s in, 2.5 s more of load. The same run on the plain",
            "anycast front is the `kill -9 of one node, no proxy` row of anycast.md.",
            "",
            "| measured | value |",
            "|---|---:|",
            f"| requests | {run['requests']} |",
            f"| failed | {run['failed']} |",
            f"| served by n2 from 0.5 s after the kill | {run['served_after_by_n2']} |",
            f"| router next hops after | {', '.join(run['next_hops_after'])} |",
            "",
        ]
    )


def test_a_dead_app_node_costs_no_flow_behind_the_per_machine_proxies() -> None:
    options = LabOptions(nodes=3, front="anycast+haproxy", drain_delay_s=0.5)
    with _anycast_lab(options) as lab:
        state = lab.load()
        # VIP:80 in each namespace is that machine's HAProxy; the app nodes
        # listen on their own port behind it.
        assert all(n["port"] == anycast.APP_PORT for n in state["nodes"])
        assert all(anycast.daemon_running(n["proxy"]) for n in state["nodes"])
        proxied = kill_one_app_node_under_load(lab)
        # The machine of the dead node keeps its route: its proxy still
        # reaches the live nodes, so the router keeps its pinned flows there.
        assert set(proxied["next_hops_after"]) == NODES, proxied
        # Back in rotation after a restart (its machine never left).
        lab.restart("n2")
        assert lab.node(lab.load(), "n2")["pid"]
    print(f"\nanycast+haproxy: {proxied}")
    assert proxied["served_before_kill"] == sorted(NODES), proxied
    assert proxied["requests"] > 100
    assert proxied["failed"] == 0, proxied
    assert proxied["served_after_by_n2"] == 0, proxied
    if os.environ.get("ANYCAST_WRITE"):
        command = "python -m pytest tests/lab/test_anycast_haproxy.py"
        report = reports.stamped(command, {"app_node_killed": proxied})
        reports.write(report, RESULT.with_suffix(""), _markdown)
