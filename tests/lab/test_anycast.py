"""The anycast front for real: BIRD with ECMP, ExaBGP sidecars, nodes in namespaces.

One lab (3 nodes, SQLite) for the module; each test leaves it with all three
nodes announced. Load comes from the lab's client namespace through sockets
made there, so every packet stays inside namespaces the lab created. Each
"nothing lost" claim has its control run the same way: the same drain and
return with pinning off does break flows.
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from deploy.lab import anycast, netns, procs
from deploy.lab.cluster import REPO_ROOT, Lab, LabError, LabOptions
from deploy.lab.render import render
from loadtests import report as reports
from tests.conftest import scratch_dir
from tests.support import require, wait_until

pytestmark = [pytest.mark.cluster]

NODES = {"n1", "n2", "n3"}
# ANYCAST_WRITE=1: the figures the tests measured go to docs/results/anycast.json
# (the source of the numbers in docs/operations.md, "Anycast").
RESULT = REPO_ROOT / "docs" / "results" / "anycast.json"
# The drain file must take the route away within this (the sidecar checks
# every anycast.CHECK_INTERVAL_S).
DRAIN_WITHDRAW_BOUND_S = 0.5
# A killed node (its sidecar alive, or its whole namespace gone) is withdrawn
# on the next check or at once when its BGP session closes.
KILL_WITHDRAW_BOUND_S = 1.0


def _require_anycast_parts() -> None:
    try:
        anycast.check_installed()
    except anycast.AnycastError as exc:
        require(False, str(exc))


def _host_links() -> set[str]:
    out = netns.ip("-o", "link", "show")
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line}


def _host_nft_tables() -> str:
    result = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=False)
    return result.stdout


def _pids_inside(state: dict[str, Any]) -> list[int]:
    return [pid for name in netns.names(state["anycast"]["prefix"]) for pid in netns.pids(name)]


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")  # PID 1 reaps slowly


def _assert_nothing_left(lab: Lab, state: dict[str, Any], pids: list[int], links: set[str]) -> None:
    assert lab.live_processes(state) == []
    assert netns.names(state["anycast"]["prefix"]) == []
    assert [pid for pid in pids if not _gone(pid)] == []
    assert _host_links() == links  # nothing was ever made in the host's namespace
    assert anycast.PIN_TABLE not in _host_nft_tables()


@contextlib.contextmanager
def _anycast_lab(options: LabOptions) -> Iterator[Lab]:
    _require_anycast_parts()
    base = scratch_dir("cattle-anycast-")
    lab = Lab(base / "run")
    links = _host_links()
    try:
        lab.up(options)
        yield lab
    finally:
        state: dict[str, Any] = {}
        with contextlib.suppress(LabError):
            state = lab.load()
        pids = _pids_inside(state) if state.get("anycast") else []
        lab.down()
        if state.get("anycast"):
            _assert_nothing_left(lab, state, pids, links)
        assert lab.down() == []  # safe to run twice
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with _anycast_lab(LabOptions(nodes=3, front="anycast", drain_delay_s=1.0)) as running:
        yield running


@pytest.fixture(scope="module")
def measured() -> Iterator[dict[str, Any]]:
    """What the lab tests measured; written to RESULT under ANYCAST_WRITE=1 when all ran."""
    figures: dict[str, Any] = {}
    yield figures
    wanted = {"drain_pinning_on", "drain_pinning_off", "kill", "silent_sidecar"}
    if os.environ.get("ANYCAST_WRITE") and wanted <= set(figures):
        figures["timers"] = {
            "check_interval_s": anycast.CHECK_INTERVAL_S,
            "hold_time_s": anycast.HOLD_TIME_S,
            "keepalive_s": anycast.KEEPALIVE_S,
        }
        command = "python -m pytest tests/lab/test_anycast.py"
        report = reports.stamped(command, dict(sorted(figures.items())))
        reports.write(report, RESULT.with_suffix(""), _markdown)


def _markdown(report: dict[str, Any]) -> str:
    on, off, kill = report["drain_pinning_on"], report["drain_pinning_off"], report["kill"]
    rows = [
        ("drain file -> route gone, pinning on", f"{on['withdrawn_s']:.3f} s"),
        ("drain file -> route gone, pinning off", f"{off['withdrawn_s']:.3f} s"),
        ("kill -9 of the node -> route gone", f"{kill['node_killed_route_gone_s']:.3f} s"),
        (
            "kill -9 of the node's namespace -> route gone",
            f"{kill['namespace_killed_route_gone_s']:.3f} s",
        ),
        ("ExaBGP frozen -> route gone", f"{report['silent_sidecar']['route_gone_s']:.3f} s"),
        (
            "drain and return, pinning on: failed / resets / requests",
            f"{on['failed']} / {on['resets']} / {on['requests']}",
        ),
        (
            "drain and return, pinning off: failed / resets / requests",
            f"{off['failed']} / {off['resets']} / {off['requests']}",
        ),
        ("kill -9 run: failed / requests", f"{kill['failed']} / {kill['requests']}"),
    ]
    if "app_node_killed" in report:  # the control of tests/lab/test_anycast_haproxy.py
        app = report["app_node_killed"]
        rows.append(
            ("kill -9 of one node, no proxy: failed / requests", f"{app['failed']} / "
             f"{app['requests']}")
        )  # fmt: skip
    return "\n".join(
        [
            "# Anycast: drain, kill -9 and the BGP timers",
            "",
            f"{reports.measured(report)} Written by the lab tests with ANYCAST_WRITE=1:",
            "",
            *reports.how_measured(report),
            "| measured | value |",
            "|---|---:|",
            *(f"| {name} | {value} |" for name, value in rows),
            "",
            'docs/operations.md ("Anycast") explains them.',
            "",
        ]
    )


def _plan(lab: Lab) -> dict[str, Any]:
    plan: dict[str, Any] = lab.load()["anycast"]
    return plan


def _all_announced(lab: Lab) -> None:
    """Every node running and announced (what each test starts from and leaves)."""
    status = lab.status()
    for node in status["nodes"]:
        if not node["running"] or not node["sidecar_running"]:
            lab.restart(node["id"])
    anycast.wait_next_hops(_plan(lab), NODES, timeout_s=15)


# -- load from the client namespace ----------------------------------------------


@dataclass
class Outcome:
    at: float  # time.monotonic() when the request was sent
    opened_at: float  # when its connection was opened
    node: str | None
    error: str | None  # None: a 200
    ended: float = 0.0  # when its answer (or its error) came


@dataclass
class ClientLoad:
    """Bounded load at the VIP: `connections` keep-alive clients in the client
    namespace, each sending a request every `pause_s` and opening a new
    connection after `requests_per_connection` (so new flows keep starting),
    after a `Connection: close` or after an error; no retries. Stops at
    `max_s` at the latest."""

    lab: Lab
    connections: int = 12
    pause_s: float = 0.05
    requests_per_connection: int = 20
    max_s: float = 40.0
    path: str = "/v1/notes?limit=1"
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        plan = _plan(self.lab)
        self._target = (plan["client_netns"], plan["vip"], plan["port"])
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, daemon=True) for _ in range(self.connections)
        ]

    def __enter__(self) -> ClientLoad:
        self._deadline = time.monotonic() + self.max_s
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        assert not any(t.is_alive() for t in self._threads)

    def _client(self) -> None:
        client_netns, vip, port = self._target
        connection: netns.HTTPConnection | None = None
        opened_at = 0.0
        sent = 0
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            if connection is None:
                connection = netns.HTTPConnection(client_netns, vip, port, timeout=3)
                opened_at = time.monotonic()
                sent = 0
            sent += 1
            sent_at = time.monotonic()
            try:
                connection.request("GET", self.path)
                response = connection.getresponse()
                response.read()
                error = None if response.status == 200 else f"HTTP {response.status}"
                self.outcomes.append(
                    Outcome(
                        sent_at,
                        opened_at,
                        response.getheader("x-served-by"),
                        error,
                        time.monotonic(),
                    )
                )
                if response.will_close or sent >= self.requests_per_connection:
                    connection.close()
                    connection = None
            except (OSError, http.client.HTTPException) as exc:
                self.outcomes.append(
                    Outcome(sent_at, opened_at, None, type(exc).__name__, time.monotonic())
                )
                connection.close()
                connection = None
            self._stop.wait(self.pause_s)
        if connection is not None:
            connection.close()

    # -- what it saw

    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.error]

    def resets(self) -> int:
        return sum(o.error == "ConnectionResetError" for o in self.failed())

    def errors(self) -> dict[str, int]:
        return dict(collections.Counter(o.error for o in self.failed() if o.error))

    def served_on_new_connections(self, since: float) -> dict[str, int]:
        return dict(
            collections.Counter(o.node for o in self.outcomes if o.opened_at >= since and o.node)
        )


def _seconds_until_hops(lab: Lab, expected: set[str], since: float, timeout_s: float) -> float:
    """Seconds from `since` until the router's next hops are `expected` (polled every 5 ms)."""
    plan = _plan(lab)
    assert wait_until(lambda: set(anycast.next_hop_nodes(plan)) == expected, timeout_s=timeout_s), (
        f"router next hops {anycast.next_hop_nodes(plan)}, expected {sorted(expected)}"
    )
    return time.monotonic() - since


def _drain_and_return(lab: Lab, node_id: str) -> dict[str, Any]:
    """Under load: drain `node_id` by its drain file, stop it, start it again.

    The tests drain n3, the last of the router's next hops. Linux's ECMP is
    hash-threshold: each next hop owns a contiguous share of the hash space,
    so taking out the last one moves part of its neighbour's flows too, and
    its return moves the flows that started while it was out. (Taking out
    the middle one would move only its own flows; its return still moves others.)
    """
    with ClientLoad(lab) as load:
        time.sleep(1.5)
        drained_at = time.monotonic()
        Path(lab.node(lab.load(), node_id)["drain_file"]).touch()
        withdrawn_s = _seconds_until_hops(lab, NODES - {node_id}, drained_at, timeout_s=5)
        lab.drain(node_id)  # SIGTERM: the drain runs out, the node exits 0
        restarted_at = time.monotonic()
        lab.restart(node_id)
        announced_s = _seconds_until_hops(lab, NODES, restarted_at, timeout_s=15)
        back_at = time.monotonic()
        time.sleep(2.0)
    return {
        "withdrawn_s": withdrawn_s,
        "announced_after_restart_s": announced_s,
        "requests": len(load.outcomes),
        "failed": len(load.failed()),
        "resets": load.resets(),
        "errors": load.errors(),
        # When the flows broke: the drain (withdrawal to the node's exit) or the return.
        "failed_during_drain": sum(1 for o in load.failed() if o.at < restarted_at),
        "failed_after_return": sum(1 for o in load.failed() if o.at >= back_at - announced_s),
        "served_after_return": load.served_on_new_connections(back_at),
    }


# -- tests ---------------------------------------------------------------------------


def test_three_nodes_announce_and_new_connections_reach_all(lab):
    status = lab.status()
    router = status["router"]
    assert router["bird_running"]
    assert router["sessions"] == dict.fromkeys(sorted(NODES), "Established")
    assert router["announcing"] == sorted(NODES)
    assert router["next_hops"] == sorted(NODES)
    assert all(n["announced"] and n["health"]["status"] == "pass" for n in status["nodes"])
    assert status["front"] == f"http://{anycast.VIP}:{anycast.SERVICE_PORT}"

    # Fresh connections from the client namespace: ECMP spreads their flows.
    plan = _plan(lab)
    served: collections.Counter[str] = collections.Counter()
    for _ in range(60):
        status_code, _body, node = _get(plan, "/v1/notes?limit=1")
        assert status_code == 200
        served[node] += 1
    assert set(served) == NODES, served


def _get(plan: dict[str, Any], path: str) -> tuple[int, bytes, str]:
    connection = netns.HTTPConnection(plan["client_netns"], plan["vip"], plan["port"], timeout=3)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read(), response.getheader("x-served-by") or ""
    finally:
        connection.close()


def test_a_drain_withdraws_at_once_and_pinning_loses_no_flow(lab, measured):
    _all_announced(lab)
    lab.set_pinning(True)
    seen = _drain_and_return(lab, "n3")
    print(f"\npinning on, drain and return of n3: {seen}")
    measured["drain_pinning_on"] = seen
    assert seen["withdrawn_s"] <= DRAIN_WITHDRAW_BOUND_S
    assert seen["requests"] > 200
    assert seen["failed"] == 0, seen["errors"]
    assert seen["resets"] == 0
    # Back in: new connections reach it again.
    assert seen["served_after_return"].get("n3", 0) > 0, seen["served_after_return"]


def test_without_pinning_the_same_drain_and_return_break_flows(lab, measured):
    """The control: plain ECMP rehashes established flows when next hops change."""
    _all_announced(lab)
    lab.set_pinning(False)
    try:
        seen = _drain_and_return(lab, "n3")
    finally:
        lab.set_pinning(True)
    print(f"\npinning off, drain and return of n3: {seen}")
    measured["drain_pinning_off"] = seen
    assert seen["withdrawn_s"] <= DRAIN_WITHDRAW_BOUND_S
    assert seen["resets"] > 0, seen


def kill_one_app_node_under_load(lab: Lab) -> dict[str, Any]:
    """kill -9 of n2's app process (only: its machine stays) under bounded load
    (also the anycast+haproxy front's test, tests/lab/test_anycast_haproxy.py)."""
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


def test_control_a_dead_app_node_fails_flows_pinned_to_it_without_a_proxy(lab, measured):
    """The control of the anycast+haproxy front's test: the same kill -9 of one
    app node under the same load, with no proxy on its machine."""
    _all_announced(lab)
    plain = kill_one_app_node_under_load(lab)
    print(f"\nanycast, kill -9 of n2's node: {plain}")
    assert plain["served_before_kill"] == sorted(NODES), plain
    assert plain["failed"] > 0, plain
    measured["app_node_killed"] = plain
    lab.restart("n2")
    _all_announced(lab)


def test_kill_9_is_withdrawn_and_new_connections_succeed(lab, measured):
    _all_announced(lab)
    plan = _plan(lab)
    with ClientLoad(lab) as load:
        time.sleep(1.0)
        killed_at = time.monotonic()
        lab.kill("n1")  # the node only: its sidecar's next check fails
        node_gone_s = _seconds_until_hops(lab, NODES - {"n1"}, killed_at, timeout_s=5)
        settled_at = time.monotonic()
        time.sleep(1.5)
        machine_at = time.monotonic()
        lab.kill("n3", machine=True)  # node, ExaBGP and its check: the session closes
        machine_gone_s = _seconds_until_hops(lab, {"n2"}, machine_at, timeout_s=5)
        after_machine = time.monotonic()
        time.sleep(1.5)
    seen = {
        "node_killed_route_gone_s": node_gone_s,
        "namespace_killed_route_gone_s": machine_gone_s,
        "requests": len(load.outcomes),
        "failed": len(load.failed()),
        "errors": load.errors(),
        # Every failure: when it was sent and when its connection was opened,
        # in seconds after the kill of n1 (n3's namespace was killed at
        # machine_killed_at_s).
        "machine_killed_at_s": machine_at - killed_at,
        "failures": [
            {
                "sent_s": round(o.at - killed_at, 3),
                "opened_s": round(o.opened_at - killed_at, 3),
                "error": o.error,
            }
            for o in load.failed()
        ],
    }
    print(f"\nkill -9: {seen}")
    measured["kill"] = seen
    assert node_gone_s <= KILL_WITHDRAW_BOUND_S
    assert machine_gone_s <= KILL_WITHDRAW_BOUND_S
    # Once the route is gone, every new connection lands on a live node. (Not
    # asked of a request still in flight on n3 when its namespace was killed:
    # with no proxy in front, nothing can answer it.)
    late = [o for o in load.outcomes if o.opened_at >= settled_at and o.ended < machine_at]
    late += [o for o in load.outcomes if o.opened_at >= after_machine]
    assert late and not [o for o in late if o.error], collections.Counter(o.error for o in late)
    assert {o.node for o in load.outcomes if o.opened_at >= after_machine} == {"n2"}
    for node_id in ("n1", "n3"):
        lab.restart(node_id)
    anycast.wait_next_hops(plan, NODES, timeout_s=15)


def test_a_silent_sidecar_is_dropped_when_the_hold_time_runs_out(lab, measured):
    """A hung machine closes nothing: only BGP's hold time (3 s) takes its route away."""
    _all_announced(lab)
    state = lab.load()
    sidecar = lab.node(state, "n2")["sidecar"]
    assert procs.signal_pid(sidecar["pid"], sidecar["config"], signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        gone_s = _seconds_until_hops(lab, NODES - {"n2"}, stopped_at, timeout_s=10)
    finally:
        procs.signal_pid(sidecar["pid"], sidecar["config"], signal.SIGCONT)
    print(f"\nExaBGP of n2 stopped (SIGSTOP): route gone after {gone_s:.3f} s")
    measured["silent_sidecar"] = {"route_gone_s": gone_s}
    # The hold time runs from the last keepalive BIRD received, which ExaBGP
    # may have sent more than one keepalive interval before the freeze (1.63 s
    # was seen once): not at once, and not past the hold time.
    assert 0.5 <= gone_s <= anycast.HOLD_TIME_S + 1
    lab.kill("n2", machine=True)  # its session is gone; start it clean
    _all_announced(lab)


def test_a_failed_up_leaves_nothing_behind():
    # A node that cannot start (its pool size is invalid) fails `up` after the
    # namespaces, the router and the first node exist.
    with pytest.raises(LabError, match="exited while starting"):  # noqa: SIM117
        with _anycast_lab(
            LabOptions(nodes=1, front="anycast", node_env={"CATTLE_DB_POOL_SIZE": "0"})
        ):
            pass


def test_status_and_cli_show_the_router(lab, capsys):
    from deploy.lab.cli import main

    assert main(["status", "--run-dir", str(lab.run_dir)]) == 0
    out = capsys.readouterr().out
    assert "router ECMP next hops: n1, n2, n3" in out
    assert out.count("Established") == 3
    assert os.path.exists(lab.load()["anycast"]["bird"]["socket"])


# -- the files operators install, checked by the programs that read them -------------


def test_the_deploy_files_are_valid_for_their_programs(tmp_path):
    _require_anycast_parts()
    exabgp = tmp_path / "exabgp.conf"
    exabgp.write_text(
        render(
            "exabgp/exabgp.conf.tmpl",
            healthcheck="/usr/bin/exabgp-healthcheck",
            healthcheck_config="/etc/cattle/healthcheck.conf",
            router_address="198.51.100.5",
            node_address="198.51.100.6",
            node_as=anycast.NODE_AS,
            router_as=anycast.ROUTER_AS,
            hold_time_s=anycast.HOLD_TIME_S,
        )
    )
    env = anycast.sidecar_env()
    checked = subprocess.run(
        ["exabgp", "--test", str(exabgp)], env=env, capture_output=True, timeout=30, check=False
    )
    assert checked.returncode == 0, checked.stdout.decode()[-2000:]
    # The same check fails on a broken file, so it is not vacuous.
    exabgp.write_text(exabgp.read_text().replace("hold-time", "hold-tim"))
    broken = subprocess.run(
        ["exabgp", "--test", str(exabgp)], env=env, capture_output=True, timeout=30, check=False
    )
    assert broken.returncode != 0
    unit = REPO_ROOT / "deploy" / "exabgp" / "cattle-exabgp.service"
    if shutil.which("systemd-analyze"):
        verified = subprocess.run(
            ["systemd-analyze", "verify", str(unit)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert verified.returncode == 0, verified.stderr


def _quoted(result: dict[str, Any]) -> list[str]:
    """The phrases of docs/operations.md ("Measured: drain, kill -9 and the timers")
    that carry the result's figures, as the page words them."""
    on, off, kill = result["drain_pinning_on"], result["drain_pinning_off"], result["kill"]
    failures = kill["failures"]
    in_flight = sum(1 for f in failures if f["opened_s"] < 0)
    refused = sum(1 for f in failures if f["error"] == "ConnectionRefusedError")
    on_namespace = sum(1 for f in failures if f["sent_s"] >= kill["machine_killed_at_s"])
    return [
        f"{on['withdrawn_s']:.2f} s (pinning on), {off['withdrawn_s']:.2f} s (off)",
        f"| {kill['node_killed_route_gone_s']:.2f} s |",
        f"| {kill['namespace_killed_route_gone_s']:.2f} s |",
        f"| {result['silent_sidecar']['route_gone_s']:.2f} s (hold time 3 s) |",
        f"pinning on: {on['failed']} failed requests, {on['resets']} resets, of {on['requests']};",
        f"pinning off: {off['failed']} failed requests, {off['resets']} resets, of "
        f"{off['requests']} ({off['failed_during_drain']} while it drained, "
        f"{off['failed_after_return']} after it came back).",
        f"Kill -9 with pinning on ({kill['failed']} failed of {kill['requests']}):",
        f"sent before its route went: {in_flight};",
        f"new connections refused in the {kill['node_killed_route_gone_s']:.2f} s before the "
        f"route went: {refused};",
        f"requests in flight on n3 when its whole namespace was killed: {on_namespace};",
    ]


def test_the_figures_quoted_are_the_committed_result():
    """docs/operations.md quotes docs/results/anycast.json: a re-run that changes
    the result must change the page too."""
    result = json.loads(RESULT.read_text())
    page = (REPO_ROOT / "docs" / "operations.md").read_text()
    section = page[page.index("## Anycast") : page.index("## systemd (bare metal)")]
    words = " ".join(section.split())
    for phrase in _quoted(result):
        assert phrase in words, phrase
