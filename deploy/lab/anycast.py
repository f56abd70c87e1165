"""The lab's anycast front: a BIRD router with ECMP, one namespace per node, a client.

    client ns --- router ns (BIRD, ECMP, optional pinning) --+-- node ns n1: VIP on lo, node, ExaBGP
    203.0.113.2   203.0.113.1                                +-- node ns n2: ...
                  198.51.100.4i+1  <->  198.51.100.4i+2 (node i)

Every node's namespace holds the service address (VIP) on its loopback, the
cattle node listening on port 80, an ExaBGP sidecar whose healthcheck
announces VIP/32 to the router while /readyz answers 200, and (BFD on, the
default) a small BIRD answering the router's BFD session. BIRD merges the
equal routes into one multipath route; the router's kernel hashes each flow
(layer 4) onto one node. Addresses come from the documentation ranges and
exist only inside the lab's own namespaces: nothing is added to the host's.

The configs are the files under deploy/bird/ and deploy/exabgp/, the same
ones docs/operations.md gives operators.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deploy.lab import haproxy, netns, procs
from deploy.lab.render import render

VIP = "192.0.2.10"
SERVICE_PORT = 80
# anycast+haproxy: VIP:80 is the namespace's HAProxy; the app node listens here.
APP_PORT = 8000
AGENT_PORT = 8081
PROXY_STATS_PORT = 8404
PROXY_METRICS_PORT = 8405
BUS_PORT = 7400
ROUTER_AS = 64512
NODE_AS = 64513  # one AS for every node: equal AS paths, so the router merges them
ROUTER_ID = "203.0.113.1"
ROUTER_CLIENT_ADDRESS = "203.0.113.1"
CLIENT_ADDRESS = "203.0.113.2"
CLIENT_IFNAME = "client"
# BGP timers: a dead process closes its session at once, and a dead node
# (sidecar alive) is withdrawn by the healthcheck; a node that falls silent
# (a hung or cut-off machine) is dropped when the hold time runs out, or by
# BFD well before that.
HOLD_TIME_S = 3
KEEPALIVE_S = 1
# BFD between the router and each node: a packet every 100 ms each way, down
# after 3 in a row fail to come (0.3 s of silence). Short enough that a
# silent node's route goes well within a second; long enough that on two
# cores shared with the nodes and the load (the daemons at CONTROL_PLANE_NICE)
# one or two late packets do not take a healthy node out.
BFD_INTERVAL_MS = 100
BFD_MULTIPLIER = 3
# Seconds between the sidecar's checks: the bound on seeing the drain file.
CHECK_INTERVAL_S = 0.2
# BIRD and ExaBGP (with its health checks) run ahead of the load: see _control_plane.
CONTROL_PLANE_NICE = -10
PIN_TABLE = "cattle_pin"
MARK_BASE = 100  # node i's flows carry mark 100+i and route through table 100+i
MAX_NODES = 62  # one /30 of 198.51.100.0/24 per node


class AnycastError(RuntimeError):
    pass


def _binary(name: str, package: str) -> str:
    found = shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/usr/bin") / name) if p.exists()), None
    )
    if found is None:
        raise AnycastError(f"{name} is not installed: apt-get install {package}")
    return found


def check_installed() -> None:
    """Every program the anycast front runs, or AnycastError naming the package."""
    if os.geteuid() != 0:
        raise AnycastError("--front anycast creates network namespaces: run it as root")
    for name, package in (
        ("bird", "bird2"),
        ("birdc", "bird2"),
        ("exabgp", "exabgp"),
        ("exabgp-healthcheck", "exabgp"),
        ("nft", "nftables"),
        ("curl", "curl"),
    ):
        _binary(name, package)


def node_link(index: int) -> tuple[str, str]:
    """(router side, node side) addresses of node `index`'s link, a /30 of 198.51.100.0/24."""
    base = 4 * index
    return f"198.51.100.{base + 1}", f"198.51.100.{base + 2}"


def plan(lab_id: str, node_ids: list[str], *, pinning: bool, bfd: bool = True) -> dict[str, Any]:
    """The anycast part of lab.json: every name and address, before anything exists.

    Saved first, so `down` finds the lab's namespaces even after a failed `up`.
    """
    if len(node_ids) > MAX_NODES:
        raise AnycastError(f"--front anycast takes at most {MAX_NODES} nodes")
    prefix = f"cattle-{lab_id}-"
    nodes = {}
    for index, node_id in enumerate(node_ids, start=1):
        router_address, address = node_link(index)
        nodes[node_id] = {
            "netns": f"{prefix}{node_id}",
            "address": address,
            "router_address": router_address,
            "router_ifname": node_id,  # the router's end of the link, named after the node
            "mark": MARK_BASE + index,
        }
    return {
        "prefix": prefix,
        "router_netns": f"{prefix}router",
        "client_netns": f"{prefix}client",
        "client_address": CLIENT_ADDRESS,
        "vip": VIP,
        "port": SERVICE_PORT,
        "router_as": ROUTER_AS,
        "node_as": NODE_AS,
        "hold_time_s": HOLD_TIME_S,
        "check_interval_s": CHECK_INTERVAL_S,
        "pinning": pinning,
        "bfd": bfd,
        "bfd_interval_ms": BFD_INTERVAL_MS,
        "bfd_multiplier": BFD_MULTIPLIER,
        "nodes": nodes,
        "bird": None,
    }


# -- network -----------------------------------------------------------------


def create_network(anycast: dict[str, Any]) -> None:
    router, client = anycast["router_netns"], anycast["client_netns"]
    netns.add(router)
    for key, value in (
        ("net.ipv4.ip_forward", "1"),
        # Layer-4 hash: flows of one client spread over the nodes.
        ("net.ipv4.fib_multipath_hash_policy", "1"),
        ("net.ipv4.conf.all.rp_filter", "0"),
        ("net.ipv4.conf.default.rp_filter", "0"),
    ):
        netns.sysctl(router, key, value)
    netns.add(client)
    # Created inside the namespaces, never in the host's: no name can collide.
    netns.ip(
        "link",
        "add",
        CLIENT_IFNAME,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        client,
        netns=router,
    )
    netns.ip("addr", "add", f"{ROUTER_CLIENT_ADDRESS}/24", "dev", CLIENT_IFNAME, netns=router)
    netns.ip("link", "set", CLIENT_IFNAME, "up", netns=router)
    netns.ip("addr", "add", f"{CLIENT_ADDRESS}/24", "dev", "eth0", netns=client)
    netns.ip("link", "set", "eth0", "up", netns=client)
    netns.ip("route", "add", "default", "via", ROUTER_CLIENT_ADDRESS, netns=client)
    for node in anycast["nodes"].values():
        name = node["netns"]
        netns.add(name)
        netns.ip(
            "link", "add", node["router_ifname"], "type", "veth", "peer", "name", "eth0",
            "netns", name, netns=router,
        )  # fmt: skip
        netns.ip(
            "addr",
            "add",
            f"{node['router_address']}/30",
            "dev",
            node["router_ifname"],
            netns=router,
        )
        netns.ip("link", "set", node["router_ifname"], "up", netns=router)
        netns.ip("addr", "add", f"{node['address']}/30", "dev", "eth0", netns=name)
        netns.ip("link", "set", "eth0", "up", netns=name)
        netns.ip("route", "add", "default", "via", node["router_address"], netns=name)
        netns.ip("addr", "add", f"{anycast['vip']}/32", "dev", "lo", netns=name)
        # Pinned flows: mark M routes through table M, the VIP via this node only.
        mark = str(node["mark"])
        netns.ip(
            "route", "add", f"{anycast['vip']}/32", "via", node["address"],
            "dev", node["router_ifname"], "table", mark, netns=router,
        )  # fmt: skip
        netns.ip("rule", "add", "fwmark", mark, "lookup", mark, netns=router)


def set_pinning(anycast: dict[str, Any], run_dir: Path, on: bool) -> None:
    """Load or remove the router's pinning rules (nftables table `cattle_pin`)."""
    router = anycast["router_netns"]
    nft = _binary("nft", "nftables")
    if _pinned(anycast):
        netns.run_in(router, [nft, "delete", "table", "inet", PIN_TABLE])
    if on:
        marks = ", ".join(
            f'"{node["router_ifname"]}" : {node["mark"]}' for node in anycast["nodes"].values()
        )
        path = run_dir / "pinning.nft"
        path.write_text(
            render(
                "bird/pinning.nft.tmpl", table=PIN_TABLE, marks=marks, client_ifname=CLIENT_IFNAME
            )
        )
        netns.run_in(router, [nft, "-f", str(path)])
    anycast["pinning"] = on


def _pinned(anycast: dict[str, Any]) -> bool:
    out = netns.run_in(anycast["router_netns"], [_binary("nft", "nftables"), "list", "tables"])
    return f"inet {PIN_TABLE}" in out


def teardown(anycast: dict[str, Any]) -> list[str]:
    """Delete every namespace of this lab (and so every interface, route and nftables
    table in them), killing what still runs inside first. Safe to run twice."""
    gone = []
    for name in netns.names(anycast["prefix"]):
        netns.delete(name)
        gone.append(name)
    return gone


# -- BIRD ----------------------------------------------------------------------


def start_router(anycast: dict[str, Any], run_dir: Path, timeout_s: float = 10) -> dict[str, Any]:
    peers = "\n".join(
        f"protocol bgp {node_id} from cattle_node {{\n"
        f"    neighbor {node['address']} as {anycast['node_as']};\n"
        f"    source address {node['router_address']};\n"
        f"}}"
        for node_id, node in anycast["nodes"].items()
    )
    config = run_dir / "bird.conf"
    config.write_text(
        render(
            "bird/bird.conf.tmpl",
            router_id=ROUTER_ID,
            vip=anycast["vip"],
            router_as=anycast["router_as"],
            hold_time_s=anycast["hold_time_s"],
            keepalive_s=KEEPALIVE_S,
            bfd="on" if anycast.get("bfd") else "off",
            bfd_interval_ms=anycast.get("bfd_interval_ms", BFD_INTERVAL_MS),
            bfd_multiplier=anycast.get("bfd_multiplier", BFD_MULTIPLIER),
            max_paths=MAX_NODES,
            peers=peers,
        )
    )
    return _start_bird(anycast["router_netns"], config, run_dir / "bird", timeout_s)


def _start_bird(name: str, config: Path, stem: Path, timeout_s: float) -> dict[str, Any]:
    """BIRD with `config` inside namespace `name`, at the control plane's priority,
    its control socket, pid file and log at `stem`.ctl/.pid/.log (the lab's run
    directory, never /run/bird); returns once it answers on that socket."""
    sock, log, pidfile = (Path(f"{stem}.{suffix}") for suffix in ("ctl", "log", "pid"))
    bird = _binary("bird", "bird2")
    check = subprocess.run(
        [bird, "-p", "-c", str(config)], capture_output=True, text=True, timeout=10, check=False
    )
    if check.returncode != 0:
        raise AnycastError(f"BIRD rejected {config}:\n{check.stdout}{check.stderr}")
    argv = [bird, "-f", "-c", str(config), "-s", str(sock), "-P", str(pidfile)]
    pid = procs.spawn(_control_plane(netns.exec_argv(name, argv)), log=log)
    info = {"pid": pid, "config": str(config), "socket": str(sock), "log": str(log)}

    def answers() -> bool:
        with contextlib.suppress(AnycastError):
            birdc(info, "show status")
            return True
        return False

    _wait_started(info, f"bird in {name}", answers, timeout_s)
    return info


def _wait_started(
    daemon: dict[str, Any], what: str, answers: Callable[[], bool], timeout_s: float
) -> None:
    """Until `answers()` says the daemon (recorded as {"pid", "config", "log"}) is up;
    AnycastError with its log's tail if it exits first, or (stopped) if time runs out."""
    pid, marker, log = daemon["pid"], daemon["config"], Path(daemon["log"])
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not procs.is_ours(pid, marker) and (ended := procs.ended(pid)):
            tail = log.read_text(errors="replace").splitlines()[-10:]
            raise AnycastError(f"{what} {ended} at start:\n" + "\n".join(tail))
        if answers():
            return
        time.sleep(0.05)
    procs.stop(pid, marker, timeout_s=2)
    raise AnycastError(f"{what} did not answer in {timeout_s:.0f} s; see {log}")


def birdc(bird: dict[str, Any], command: str) -> str:
    """One birdc command on the lab's own control socket (never /run/bird)."""
    result = subprocess.run(
        [_binary("birdc", "bird2"), "-s", bird["socket"], *command.split()],
        capture_output=True,
        text=True,
        timeout=5,
        check=False,
    )
    if result.returncode != 0 or "Unable to connect" in result.stdout:
        raise AnycastError(f"birdc {command}: {result.stdout}{result.stderr}".strip())
    return result.stdout


def bgp_sessions(bird: dict[str, Any]) -> dict[str, str]:
    """Each node's BGP session as BIRD sees it: Established, Active, Connect..."""
    sessions = {}
    for line in birdc(bird, "show protocols").splitlines():
        words = line.split()
        if len(words) >= 6 and words[1] == "BGP":
            sessions[words[0]] = words[5]
    return sessions


def bfd_sessions(bird: dict[str, Any], anycast: dict[str, Any]) -> dict[str, str]:
    """Each node's BFD session as the router's BIRD sees it: Up, Down, Init, AdminDown."""
    sessions = {}
    for line in birdc(bird, "show bfd sessions").splitlines():
        words = line.split()
        if len(words) >= 3 and (node_id := node_for_address(anycast, words[0])):
            sessions[node_id] = words[2]
    return sessions


def wait_bfd_up(anycast: dict[str, Any], node_ids: set[str], timeout_s: float) -> float:
    """Seconds until the router's BFD session with each of `node_ids` is Up."""
    started = time.monotonic()
    seen: dict[str, str] = {}
    while time.monotonic() - started < timeout_s:
        with contextlib.suppress(AnycastError):
            seen = bfd_sessions(anycast["bird"], anycast)
        if all(seen.get(n) == "Up" for n in node_ids):
            return time.monotonic() - started
        time.sleep(0.05)
    raise AnycastError(f"router BFD sessions {seen} after {timeout_s:.0f} s, expected all Up")


def announcing(bird: dict[str, Any], vip: str) -> list[str]:
    """The nodes whose route to the VIP BIRD holds (one route per announcing node)."""
    text = birdc(bird, f"show route {vip}/32")
    return sorted(set(re.findall(r"\[(\S+) [^\]]*\]", text)))


def next_hops(anycast: dict[str, Any]) -> list[str]:
    """The router kernel's next hops for the VIP: the nodes ECMP sends new flows to."""
    out = netns.ip(
        "-j", "route", "show", f"{anycast['vip']}/32", netns=anycast["router_netns"], check=False
    )
    try:
        routes = json.loads(out or "[]")
    except ValueError:
        return []
    hops: list[str] = []
    for route in routes:
        if "nexthops" in route:
            hops += [hop["gateway"] for hop in route["nexthops"] if "gateway" in hop]
        elif "gateway" in route:
            hops.append(route["gateway"])
    return sorted(hops)


def node_for_address(anycast: dict[str, Any], address: str) -> str | None:
    for node_id, node in anycast["nodes"].items():
        if node["address"] == address:
            return str(node_id)
    return None


def next_hop_nodes(anycast: dict[str, Any]) -> list[str]:
    return sorted(n for a in next_hops(anycast) if (n := node_for_address(anycast, a)))


def wait_next_hops(anycast: dict[str, Any], node_ids: set[str], timeout_s: float) -> float:
    """Seconds until the router's next hops are exactly `node_ids` (AnycastError past it)."""
    started = time.monotonic()
    seen: list[str] = []
    while time.monotonic() - started < timeout_s:
        seen = next_hop_nodes(anycast)
        if set(seen) == node_ids:
            return time.monotonic() - started
        time.sleep(0.01)
    raise AnycastError(
        f"router next hops {seen} after {timeout_s:.0f} s, expected {sorted(node_ids)}"
    )


# -- ExaBGP sidecars -------------------------------------------------------------


def sidecar_env() -> dict[str, str]:
    """ExaBGP's settings for the lab (environment variables override /etc/exabgp/exabgp.env)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("exabgp")}
    env |= {
        "exabgp_daemon_daemonize": "false",
        # Root in the lab: the check must read the drain file in the run directory.
        "exabgp_daemon_user": "root",
        "exabgp_log_destination": "stdout",
        "exabgp_api_cli": "false",
    }
    return env


def start_sidecar(
    anycast: dict[str, Any], node_id: str, *, drain_file: str, run_dir: Path
) -> dict[str, Any]:
    """ExaBGP in node `node_id`'s namespace, announcing the VIP while the check passes.

    The check asks /readyz of whatever answers on VIP:port there: the node
    itself on the anycast front; on anycast+haproxy that namespace's HAProxy,
    which answers from any ready node, so the route stays while the machine's
    proxy can reach one (a dead app node is the proxy's to route around).
    """
    node = anycast["nodes"][node_id]
    healthcheck_config = run_dir / f"{node_id}.healthcheck.conf"
    healthcheck_config.write_text(
        render(
            "exabgp/healthcheck.conf.tmpl",
            vip=anycast["vip"],
            drain_file=drain_file,
            readyz_url=f"http://{anycast['vip']}:{anycast['port']}/readyz",
            interval_s=anycast["check_interval_s"],
        )
    )
    config = run_dir / f"{node_id}.exabgp.conf"
    config.write_text(
        render(
            "exabgp/exabgp.conf.tmpl",
            healthcheck=_binary("exabgp-healthcheck", "exabgp"),
            healthcheck_config=healthcheck_config,
            router_address=node["router_address"],
            node_address=node["address"],
            node_as=anycast["node_as"],
            router_as=anycast["router_as"],
            hold_time_s=anycast["hold_time_s"],
        )
    )
    log = run_dir / f"{node_id}.exabgp.log"
    argv = [_binary("exabgp", "exabgp"), str(config)]
    pid = procs.spawn(
        _control_plane(netns.exec_argv(node["netns"], argv)), log=log, env=sidecar_env()
    )
    return {"pid": pid, "config": str(config), "log": str(log)}


def start_bfd_responder(
    anycast: dict[str, Any], node_id: str, *, run_dir: Path, timeout_s: float = 10
) -> dict[str, Any]:
    """The small BIRD in node `node_id`'s namespace that answers the router's BFD
    session (ExaBGP has no BFD): deploy/bird/bfd-node.conf.tmpl."""
    node = anycast["nodes"][node_id]
    config = run_dir / f"{node_id}.bfd.conf"
    config.write_text(
        render(
            "bird/bfd-node.conf.tmpl",
            node_address=node["address"],
            router_address=node["router_address"],
            interface="eth0",
            bfd_interval_ms=anycast.get("bfd_interval_ms", BFD_INTERVAL_MS),
            bfd_multiplier=anycast.get("bfd_multiplier", BFD_MULTIPLIER),
        )
    )
    return _start_bird(node["netns"], config, run_dir / f"{node_id}.bfd", timeout_s)


def _control_plane(argv: list[str]) -> list[str]:
    """`argv` at the routing daemons' priority (nice CONTROL_PLANE_NICE; `nice`
    execs it, so the PID stays the program's). On two cores shared with the
    nodes and the client load, a starved sidecar or router would see the drain
    file, or hear the withdrawal, late: routers give their control plane
    priority over the traffic too."""
    return ["nice", "-n", str(CONTROL_PLANE_NICE), *argv]


def start_proxy(
    anycast: dict[str, Any],
    node_id: str,
    servers: list[haproxy.Server],
    *,
    run_dir: Path,
    timeout_s: float = 10,
) -> dict[str, Any]:
    """anycast+haproxy: HAProxy in node `node_id`'s namespace on VIP:port, balancing
    over every app node (the lab's HAProxy configuration; its files in their own
    directory, run_dir/front-NODE). Returns once its admin socket answers."""
    node = anycast["nodes"][node_id]
    home = run_dir / f"front-{node_id}"
    home.mkdir(exist_ok=True)
    config = haproxy.write_config(
        home, servers, front_host=anycast["vip"], front_port=anycast["port"],
        stats_port=PROXY_STATS_PORT, metrics_port=PROXY_METRICS_PORT,
    )  # fmt: skip
    log = home / "haproxy.log"
    argv = [haproxy.find_haproxy(), "-db", "-f", str(config)]
    pid = procs.spawn(netns.exec_argv(node["netns"], argv), log=log)
    sock = home / "haproxy.sock"
    info = {"pid": pid, "config": str(config), "socket": str(sock), "log": str(log)}

    def answers() -> bool:
        with contextlib.suppress(OSError):
            return "Name: HAProxy" in haproxy.admin(sock, "show info")
        return False

    _wait_started(info, f"haproxy in {node['netns']}", answers, timeout_s)
    return info


# What runs beside each node in its namespace, by its key in the node's lab.json
# entry and its name in what `down` and `status` print. Each is recorded as
# {"pid", "config", ...} and found and stopped the same way.
MACHINE_DAEMONS = {"proxy": "haproxy", "sidecar": "exabgp", "bfd_responder": "bird-bfd"}


def daemon_running(daemon: dict[str, Any] | None) -> bool:
    """Whether a daemon recorded as {"pid", "config"} (sidecar, BFD responder, proxy) runs."""
    return daemon is not None and procs.is_ours(daemon.get("pid"), daemon["config"])


def stop_daemon(daemon: dict[str, Any] | None, timeout_s: float = 5) -> None:
    if daemon:
        procs.stop(daemon.get("pid"), daemon["config"], timeout_s=timeout_s)


def kill_namespace(anycast: dict[str, Any], node_id: str) -> list[int]:
    """SIGKILL every process in a node's namespace (node, ExaBGP, its check, its BFD
    responder): a machine lost."""
    killed = []
    for pid in netns.pids(anycast["nodes"][node_id]["netns"]):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    return killed
