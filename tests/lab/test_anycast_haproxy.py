"""The anycast+haproxy front: ECMP to an HAProxy in every node's namespace, each
balancing over all the app nodes, so a dead app node costs no flow the router
pinned to its machine.

The same kill -9 of one app node under the same load from the client
namespace runs on both fronts: behind the per-machine proxies nothing fails
(the proxies take the node out and re-send what it dropped, and its machine
keeps its route); the control, the plain anycast front, fails the requests
on flows pinned to the dead node.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from deploy.lab import anycast
from deploy.lab.cluster import Lab, LabOptions
from tests.lab.test_anycast import NODES, ClientLoad, _anycast_lab, _plan

pytestmark = [pytest.mark.cluster]


def _kill_one_app_node_under_load(lab: Lab) -> dict[str, Any]:
    """kill -9 of n2's app process (only: its machine stays) under bounded load."""
    anycast.wait_next_hops(_plan(lab), NODES, timeout_s=15)
    with ClientLoad(lab, max_s=20.0) as load:
        time.sleep(1.5)
        killed_at = time.monotonic()
        lab.kill("n2")
        time.sleep(2.5)
    before = [o for o in load.outcomes if o.ended < killed_at]
    return {
        "requests": len(load.outcomes),
        "served_before_kill": sorted({o.node for o in before if o.node}),
        "failed": len(load.failed()),
        "errors": load.errors(),
        "served_after_by_n2": sum(o.node == "n2" and o.at > killed_at + 0.5 for o in load.outcomes),
        "next_hops_after": anycast.next_hop_nodes(_plan(lab)),
    }


def test_a_dead_app_node_costs_no_flow_behind_the_per_machine_proxies() -> None:
    options = LabOptions(nodes=3, front="anycast+haproxy", drain_delay_s=0.5)
    with _anycast_lab(options) as lab:
        state = lab.load()
        # VIP:80 in each namespace is that machine's HAProxy; the app nodes
        # listen on their own port behind it.
        assert all(n["port"] == anycast.APP_PORT for n in state["nodes"])
        assert all(anycast.proxy_running(n["proxy"]) for n in state["nodes"])
        proxied = _kill_one_app_node_under_load(lab)
        # The machine of the dead node keeps its route: its proxy still
        # reaches the live nodes, so the router keeps its pinned flows there.
        assert set(proxied["next_hops_after"]) == NODES, proxied
        # Back in rotation after a restart (its machine never left).
        lab.restart("n2")
        assert lab.node(lab.load(), "n2")["pid"]
    with _anycast_lab(LabOptions(nodes=3, front="anycast", drain_delay_s=0.5)) as lab:
        plain = _kill_one_app_node_under_load(lab)
    print(f"\nanycast+haproxy: {proxied}\nanycast (control): {plain}")
    assert proxied["served_before_kill"] == sorted(NODES), proxied
    assert proxied["requests"] > 100
    assert proxied["failed"] == 0, proxied
    assert proxied["served_after_by_n2"] == 0, proxied
    # The control: the same kill on the plain anycast front fails requests.
    assert plain["served_before_kill"] == sorted(NODES), plain
    assert plain["failed"] > 0, plain
