"""The lab: N real cattle nodes, a real database and HAProxy, in one run directory.

Everything the lab starts is written to `lab.json` in the run directory, the
one contract the tests, the load tests and the docs read the lab through.
Later commands (`kill`, `restart`, `down`) act on what that file names, by
PID checked against a marker, so nothing else on the machine is touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deploy.lab import anycast, cgroups, haproxy, netns, procs
from deploy.lab import prometheus as prom
from deploy.lab.postgres import PostgresCluster, free_port

if TYPE_CHECKING:
    from deploy.lab.patroni import PatroniCluster

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_RUN_DIR = REPO_ROOT / "run" / "lab"
STATE_FILE = "lab.json"
BACKENDS = ("sqlite", "postgres", "patroni")
FRONTS = ("haproxy", "anycast", "anycast+haproxy", "none")
# Fronts with the BIRD router, ECMP and a namespace per node; anycast+haproxy
# adds an HAProxy in every node's namespace, balancing over all the app nodes.
ANYCAST_FRONTS = ("anycast", "anycast+haproxy")


def _unclaimed_port(state: dict[str, Any]) -> int:
    """A free port that this lab has not handed out already. free_port() only
    checks that nothing is bound to it now, and the bus ports are chosen before
    any node binds them: in CI a node's HTTP port was a peer's bus port."""
    claimed: list[int] = state.setdefault("claimed_ports", [])
    for _ in range(50):
        port = free_port()
        if port not in claimed:
            claimed.append(port)
            return port
    raise LabError("no free port left that this lab has not handed out already")


class LabError(RuntimeError):
    """Something the operator must act on; the message says what."""


@dataclass
class LabOptions:
    nodes: int = 3
    backend: str = "sqlite"
    replicas: int = 0
    front: str = "haproxy"
    cpu: float | None = None
    # The CFS period the cap is enforced over (deploy/lab/cgroups.py).
    cpu_period_ms: float = cgroups.PERIOD_US / 1000
    drain_delay_s: float = 2.0
    shutdown_timeout_s: float = 10.0
    retries: bool = True
    observe: bool = True  # HAProxy marks a server down on its first failed connection
    # HAProxy's per-client limit (429 past it); the default never throttles the lab's load.
    rate_limit_per_10s: int = haproxy.DEFAULT_RATE_LIMIT_PER_10S
    node_env: dict[str, str] = field(default_factory=dict)
    # Anycast front: the router keeps each flow on the node it started on.
    pinning: bool = True
    # Anycast front: BFD between the router and each node, so a node that
    # falls silent loses its route in a fraction of a second, not the hold time.
    bfd: bool = True
    # A Prometheus scraping every node and the front (haproxy front only).
    prometheus: bool = False
    # The most nodes `scale` may grow to: each planned node's bus port is
    # known from the start, so every node names every possible peer.
    max_nodes: int | None = None


def up_steps(options: LabOptions) -> int:
    """How many steps `Lab.up` tells its `progress` of: the length of a bar."""
    return 5 + (1 if options.prometheus else 0)


def _http_status(url: str, timeout_s: float = 1.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 (loopback)
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def _http_json(url: str, timeout_s: float = 1.0) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 (loopback)
            return json.load(response)
    except urllib.error.HTTPError as exc:
        with contextlib.suppress(ValueError):
            return json.load(exc)
    except (OSError, ValueError):
        pass
    return None


def _start_with_database(cluster: PostgresCluster | PatroniCluster, dbname: str) -> None:
    """Start a database cluster and create the service's database; stop it if either fails."""
    try:
        cluster.start()
        cluster.create_database(dbname)
    except BaseException:
        cluster.stop()
        raise


class Lab:
    def __init__(self, run_dir: Path = DEFAULT_RUN_DIR) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.state_path = self.run_dir / STATE_FILE

    # -- state ---------------------------------------------------------------

    def load(self) -> dict[str, Any]:
        try:
            state: dict[str, Any] = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            raise LabError(f"no lab in {self.run_dir}: start one with `up`") from None
        return state

    def _save(self, state: dict[str, Any]) -> None:
        # It holds the admin token and the cursor secret: owner only, from
        # the first byte (created 0600, never chmod-ed after the fact).
        tmp = self.state_path.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.state_path)  # readers never see half a file

    def node(self, state: dict[str, Any], node_id: str) -> dict[str, Any]:
        for node in state["nodes"]:
            if node["id"] == node_id:
                return dict(node)
        names = ", ".join(n["id"] for n in state["nodes"])
        raise LabError(f"no node {node_id!r} in this lab; its nodes are: {names}")

    def _marker(self, state: dict[str, Any], node_id: str) -> str:
        return f"CATTLE_LAB_MARK={state['lab_id']}:{node_id}"

    def live_processes(self, state: dict[str, Any]) -> list[str]:
        """Human-readable names of the processes this lab started that still run."""
        live = [
            f"node {n['id']} (pid {n['pid']})"
            for n in state.get("nodes", [])
            if procs.is_ours(n.get("pid"), self._marker(state, n["id"]))
        ]
        proxy = state.get("haproxy") or {}
        if procs.is_ours(proxy.get("pid"), proxy.get("config", "-")):
            live.append(f"haproxy (pid {proxy['pid']})")
        database = state.get("database") or {}
        for member in database.get("members", []):
            pid = member.get("pid")
            if pid and procs.is_ours(pid, str(member.get("data_dir", "-"))):
                live.append(f"postgres {member['name']} (pid {pid})")
        metrics = state.get("prometheus") or {}
        if procs.is_ours(metrics.get("pid"), metrics.get("config", "-")):
            live.append(f"prometheus (pid {metrics['pid']})")
        live += [
            f"{name} {n['id']} (pid {n[key]['pid']})"
            for key, name in anycast.MACHINE_DAEMONS.items()
            for n in state.get("nodes", [])
            if anycast.daemon_running(n.get(key))
        ]
        bird = (state.get("anycast") or {}).get("bird") or {}
        if procs.is_ours(bird.get("pid"), bird.get("config", "-")):
            live.append(f"bird (pid {bird['pid']})")
        return live

    # -- up ------------------------------------------------------------------

    def up(
        self, options: LabOptions, *, progress: Callable[[str], None] | None = None
    ) -> dict[str, Any]:
        """Start the lab; `progress` is told each step as it begins (`up_steps` of them)."""
        step = progress or (lambda _what: None)
        if options.backend not in BACKENDS:
            raise LabError(f"--backend {options.backend!r}: choose one of {', '.join(BACKENDS)}")
        if options.nodes < 1:
            raise LabError("--nodes must be at least 1")
        if options.cpu is not None:
            try:
                cgroups.check_available()
            except cgroups.CgroupsUnavailable as exc:
                raise LabError(str(exc)) from None
        if options.front not in FRONTS:
            raise LabError(f"--front {options.front!r}: choose one of {', '.join(FRONTS)}")
        if options.front in ("haproxy", "anycast+haproxy"):
            try:
                haproxy.find_haproxy()
            except haproxy.HAProxyError as exc:
                raise LabError(str(exc)) from None
        if options.front in ANYCAST_FRONTS:
            try:
                anycast.check_installed()
            except anycast.AnycastError as exc:
                raise LabError(str(exc)) from None
            if options.backend != "sqlite":
                raise LabError(f"--front {options.front} runs on --backend sqlite for now")
        max_nodes = max(options.nodes, options.max_nodes or 0)
        if options.prometheus:
            if options.front != "haproxy":
                raise LabError(
                    "--prometheus needs --front haproxy for now: the anycast nodes live in "
                    "namespaces Prometheus on the host cannot reach"
                )
            try:
                prom.find_prometheus()
            except prom.PrometheusError as exc:
                raise LabError(str(exc)) from None
        self._prepare_run_dir()
        state: dict[str, Any] = {
            "lab_id": secrets.token_hex(4),
            "run_dir": str(self.run_dir),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "options": {
                "nodes": options.nodes,
                "backend": options.backend,
                "replicas": options.replicas,
                "front": options.front,
                "cpu": options.cpu,
                "cpu_period_ms": options.cpu_period_ms,
                "retries": options.retries,
                "observe": options.observe,
                "pinning": options.pinning if options.front in ANYCAST_FRONTS else None,
                "bfd": options.bfd if options.front in ANYCAST_FRONTS else None,
                "drain_delay_s": options.drain_delay_s,
                "shutdown_timeout_s": options.shutdown_timeout_s,
                "max_nodes": max_nodes,
                "prometheus": options.prometheus,
                "node_env": options.node_env,
            },
            "front": None,
            "nodes": [],
            "database": None,
            "haproxy": None,
            "cursor_secret": secrets.token_urlsafe(24),
            "admin_token": secrets.token_urlsafe(24),
        }
        self._save(state)
        try:
            step(f"database ({options.backend})")
            state["database"] = self._start_database(options)
            self._save(state)
            step("migrations")
            self._migrate(state)
            # Fixed bus ports, known before any node starts: each node's
            # CATTLE_BUS_PEERS names all the others.
            node_ids = [f"n{i}" for i in range(1, options.nodes + 1)]
            if options.front in ANYCAST_FRONTS:
                self._start_anycast_router(state, node_ids, options)
                # Each node in its own namespace: the same port everywhere.
                bus_ports = dict.fromkeys(node_ids, anycast.BUS_PORT)
            else:
                planned = [f"n{i}" for i in range(1, max_nodes + 1)]
                bus_ports = {node_id: _unclaimed_port(state) for node_id in planned}
                state["bus_ports"] = bus_ports
            step(f"starting {len(node_ids)} nodes")
            for node_id in node_ids:
                state["nodes"].append(self._new_node(state, node_id, options, bus_ports))
                self._save(state)
            step("nodes getting ready")
            self._wait_nodes(state)
            for node in state["nodes"]:
                if node["cgroup"]:
                    cgroups.CpuGroup(Path(node["cgroup"])).cap(options.cpu)
            step(f"front ({options.front})")
            if options.front == "haproxy":
                state["haproxy"] = self._start_haproxy(state, options)
                state["front"] = state["haproxy"]["front_url"]
            if options.prometheus:
                step("prometheus")
                self._save(state)
                state["prometheus"] = self._start_prometheus(state)
            if options.front in ANYCAST_FRONTS:
                self._start_sidecars(state, options)
                state["front"] = f"http://{anycast.VIP}:{anycast.SERVICE_PORT}"
            self._save(state)
        except BaseException:
            self.down()
            raise
        return state

    def _prepare_run_dir(self) -> None:
        live: list[str] = []
        if self.state_path.exists():
            try:
                live = self.live_processes(self.load())
            except ValueError:
                raise LabError(
                    f"{self.state_path} is unreadable, so whether its lab still runs is "
                    "unknown; stop its processes by hand, then remove the directory"
                ) from None
        if live:
            raise LabError(
                f"{self.run_dir} still has a running lab: {', '.join(live)}; "
                "run `down` first (or pick another --run-dir)"
            )
        if self.run_dir.exists():
            shutil.rmtree(self.run_dir)  # only leftovers of a lab that is down
        self.run_dir.mkdir(parents=True)

    def _start_database(self, options: LabOptions) -> dict[str, Any]:
        if options.backend == "sqlite":
            if options.replicas:
                raise LabError("--replicas needs --backend postgres (SQLite has no replicas)")
            path = self.run_dir / "cattle.db"
            return {"kind": "sqlite", "primary": f"sqlite+aiosqlite:///{path}", "replicas": []}
        if options.backend == "postgres":
            cluster = PostgresCluster(self.run_dir / "postgres", replicas=options.replicas)
            _start_with_database(cluster, "cattle")
            info = cluster.to_json()
            info |= {
                "kind": "postgres",
                "base_dir": str(cluster.base_dir),
                "ports": [m.port for m in cluster.members],
                "primary": cluster.primary_dsn("cattle"),
                "replicas": cluster.replica_dsns("cattle"),
            }
            return info
        return self._start_patroni(options)

    def _start_patroni(self, options: LabOptions) -> dict[str, Any]:
        from deploy.lab.patroni import PatroniCluster

        cluster = PatroniCluster(self.run_dir / "patroni", members=max(3, options.replicas + 1))
        _start_with_database(cluster, "cattle")
        info: dict[str, Any] = cluster.to_json()
        info |= {
            "kind": "patroni",
            "base_dir": str(self.run_dir / "patroni"),
            "primary": cluster.primary_dsn("cattle"),
            "replicas": [],
        }
        return info

    def _start_anycast_router(
        self, state: dict[str, Any], node_ids: list[str], options: LabOptions
    ) -> None:
        try:
            state["anycast"] = anycast.plan(
                state["lab_id"], node_ids, pinning=options.pinning, bfd=options.bfd
            )
            self._save(state)  # names first: `down` finds them after a failed `up`
            anycast.create_network(state["anycast"])
            state["anycast"]["bird"] = anycast.start_router(state["anycast"], self.run_dir)
            self._save(state)
        except (anycast.AnycastError, netns.NetnsError) as exc:
            raise LabError(str(exc)) from None

    def _start_sidecars(self, state: dict[str, Any], options: LabOptions) -> None:
        plan = state["anycast"]
        try:
            if options.front == "anycast+haproxy":
                for node in state["nodes"]:
                    node["proxy"] = self._start_machine_proxy(state, node["id"])
                    self._save(state)
            for node in state["nodes"]:
                if plan.get("bfd"):
                    node["bfd_responder"] = anycast.start_bfd_responder(
                        plan, node["id"], run_dir=self.run_dir
                    )
                    self._save(state)
                node["sidecar"] = anycast.start_sidecar(
                    plan, node["id"], drain_file=node["drain_file"], run_dir=self.run_dir
                )
                self._save(state)
            node_ids = {n["id"] for n in state["nodes"]}
            anycast.wait_next_hops(plan, node_ids, timeout_s=20)
            if plan.get("bfd"):
                # Up before `up` returns: from then on a silent node is seen in < 1 s.
                anycast.wait_bfd_up(plan, node_ids, timeout_s=10)
            anycast.set_pinning(plan, self.run_dir, options.pinning)
        except (anycast.AnycastError, netns.NetnsError) as exc:
            raise LabError(str(exc)) from None

    def _start_machine_proxy(self, state: dict[str, Any], node_id: str) -> dict[str, Any]:
        """anycast+haproxy: the HAProxy in `node_id`'s namespace, over every app node."""
        servers = [
            haproxy.Server(n["id"], n["host"], n["port"], n["agent_port"]) for n in state["nodes"]
        ]
        try:
            return anycast.start_proxy(state["anycast"], node_id, servers, run_dir=self.run_dir)
        except haproxy.HAProxyError as exc:
            raise anycast.AnycastError(str(exc)) from None

    def set_pinning(self, on: bool) -> dict[str, Any]:
        """Switch the anycast router's connection pinning on or off (for new flows)."""
        state = self.load()
        if not state.get("anycast"):
            raise LabError("pinning needs a lab with --front anycast")
        anycast.set_pinning(state["anycast"], self.run_dir, on)
        state["options"]["pinning"] = on
        self._save(state)
        return state

    def _migrate(self, state: dict[str, Any]) -> None:
        env = self._base_env(state)
        result = subprocess.run(
            [sys.executable, "-m", "service", "migrate"],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            raise LabError(f"migration failed:\n{result.stdout}{result.stderr}")

    def _base_env(self, state: dict[str, Any]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CATTLE_")}
        database = state["database"]
        env |= {
            "CATTLE_DATABASE_URL": database["primary"],
            "CATTLE_ENVIRONMENT": "production",
            "CATTLE_CURSOR_SECRET": state["cursor_secret"],
            "PYTHONUNBUFFERED": "1",
        }
        if database.get("replicas"):
            env["CATTLE_READ_DATABASE_URLS"] = ",".join(database["replicas"])
        return env

    def _new_node(
        self,
        state: dict[str, Any],
        node_id: str,
        options: LabOptions,
        bus_ports: dict[str, int],
    ) -> dict[str, Any]:
        plan = state.get("anycast")
        if plan:
            # Its own namespace: listens on every address there (the VIP on
            # lo and its link), the same ports as every other node; behind
            # the namespace's HAProxy (anycast+haproxy) on the app port.
            behind_proxy = state["options"]["front"] == "anycast+haproxy"
            port = anycast.APP_PORT if behind_proxy else anycast.SERVICE_PORT
            agent_port = anycast.AGENT_PORT
            address = {n: plan["nodes"][n]["address"] for n in bus_ports}
            bind_host = "0.0.0.0"  # inside the node's own namespace only
        else:
            port, agent_port = _unclaimed_port(state), _unclaimed_port(state)
            address = dict.fromkeys(bus_ports, "127.0.0.1")
            bind_host = "127.0.0.1"
        peers = [f"tcp://{address[o]}:{p}" for o, p in bus_ports.items() if o != node_id]
        node: dict[str, Any] = {
            "id": node_id,
            "host": address[node_id],
            "port": port,
            "url": f"http://{address[node_id]}:{port}",
            "netns": plan["nodes"][node_id]["netns"] if plan else None,
            "agent_port": agent_port,
            "bus": f"tcp://{address[node_id]}:{bus_ports[node_id]}",
            "drain_file": str(self.run_dir / f"{node_id}.drain"),
            "log": str(self.run_dir / f"{node_id}.log"),
            "cgroup": None,
            "pid": None,
            "env": {
                "CATTLE_NODE_ID": node_id,
                "CATTLE_HOST": bind_host,
                "CATTLE_PORT": str(port),
                "CATTLE_AGENT_PORT": str(agent_port),
                "CATTLE_DRAIN_FILE": str(self.run_dir / f"{node_id}.drain"),
                "CATTLE_DRAIN_DELAY_S": str(options.drain_delay_s),
                "CATTLE_SHUTDOWN_TIMEOUT_S": str(options.shutdown_timeout_s),
                "CATTLE_ADMIN_TOKEN": state["admin_token"],
                "CATTLE_ACCESS_LOG": "false",
                "CATTLE_BUS_BIND": f"tcp://{bind_host}:{bus_ports[node_id]}",
                "CATTLE_BUS_PEERS": ",".join(peers),
                **options.node_env,
            },
        }
        if options.cpu is not None:
            # Uncapped while it starts (imports are heavy on a 0.1-core node);
            # `up` caps every node once all are ready.
            group = cgroups.CpuGroup.create(
                f"cattle-{state['lab_id']}-{node_id}",
                period_us=int(options.cpu_period_ms * 1000),
            )
            node["cgroup"] = str(group.path)
        self._spawn_node(state, node)
        return node

    def _spawn_node(self, state: dict[str, Any], node: dict[str, Any]) -> None:
        env = self._base_env(state) | node["env"]
        env["CATTLE_LAB_MARK"] = f"{state['lab_id']}:{node['id']}"
        argv = [sys.executable, "-m", "service", "serve"]
        if node.get("netns"):
            argv = netns.exec_argv(node["netns"], argv)
        if node["cgroup"]:
            # Join the cgroup before exec, so not one instruction runs uncapped
            # (and before `ip netns exec`, which mounts its own /sys).
            argv = [
                "/bin/sh",
                "-c",
                f'echo $$ > "{node["cgroup"]}/cgroup.procs" && exec "$@"',
                "sh",
                *argv,
            ]
        with contextlib.suppress(FileNotFoundError):
            Path(node["drain_file"]).unlink()
        node["pid"] = procs.spawn(argv, log=Path(node["log"]), env=env, cwd=REPO_ROOT)

    def _wait_nodes(self, state: dict[str, Any], timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        for node in state["nodes"]:
            self._wait_node(state, node, deadline)

    def _wait_node(self, state: dict[str, Any], node: dict[str, Any], deadline: float) -> None:
        marker = self._marker(state, node["id"])
        while time.monotonic() < deadline:
            if not procs.is_ours(node["pid"], marker) and (ended := procs.ended(node["pid"])):
                tail = Path(node["log"]).read_text(errors="replace").splitlines()[-15:]
                raise LabError(
                    f"node {node['id']} exited while starting ({ended}):\n" + "\n".join(tail)
                )
            if self._node_status(node, "/readyz") == 200:
                return
            time.sleep(0.05)
        raise LabError(f"node {node['id']} not ready in time; see {node['log']}")

    def _node_status(self, node: dict[str, Any], path: str) -> int | None:
        if not node.get("netns"):
            return _http_status(node["url"] + path)
        try:
            return netns.http_get(node["netns"], "127.0.0.1", node["port"], path)[0]
        except (OSError, ValueError):
            return None

    def _node_json(self, node: dict[str, Any], path: str) -> Any:
        if not node.get("netns"):
            return _http_json(node["url"] + path)
        try:
            return json.loads(netns.http_get(node["netns"], "127.0.0.1", node["port"], path)[1])
        except (OSError, ValueError):
            return None

    def _start_haproxy(self, state: dict[str, Any], options: LabOptions) -> dict[str, Any]:
        front_port, stats_port, metrics_port = (_unclaimed_port(state) for _ in range(3))
        servers = [
            haproxy.Server(n["id"], n["host"], n["port"], n["agent_port"]) for n in state["nodes"]
        ]
        config = haproxy.write_config(
            self.run_dir,
            servers,
            front_port=front_port,
            stats_port=stats_port,
            metrics_port=metrics_port,
            retries=options.retries,
            observe=options.observe,
            rate_limit_per_10s=options.rate_limit_per_10s,
        )
        pid = haproxy.start(config, self.run_dir / "haproxy.log", front=("127.0.0.1", front_port))
        info: dict[str, Any] = {
            "pid": pid,
            "config": str(config),
            "socket": str(self.run_dir / "haproxy.sock"),
            "front_url": f"http://127.0.0.1:{front_port}",
            "stats_url": f"http://127.0.0.1:{stats_port}/stats",
            "metrics": ["127.0.0.1", metrics_port],
            "retries": options.retries,
            "observe": options.observe,
            "rate_limit_per_10s": options.rate_limit_per_10s,
        }
        haproxy.wait_servers(Path(info["socket"]), [s.name for s in servers], "UP", timeout_s=20)
        return info

    def _write_prometheus_targets(self, state: dict[str, Any]) -> None:
        proxy = state.get("haproxy") or {}
        front = proxy.get("metrics")
        prom.write_targets(
            self.run_dir,
            [prom.Target(n["id"], n["host"], n["port"]) for n in state["nodes"]],
            (front[0], int(front[1])) if front else None,
        )

    def _start_prometheus(self, state: dict[str, Any]) -> dict[str, Any]:
        self._write_prometheus_targets(state)
        prom.write_config(self.run_dir)
        try:
            server = prom.start(self.run_dir, port=_unclaimed_port(state))
        except prom.PrometheusError as exc:
            raise LabError(str(exc)) from None
        return {"pid": server.pid, "port": server.port, "config": str(server.config),
                "url": server.url}  # fmt: skip

    def prometheus(self, state: dict[str, Any] | None = None) -> prom.Prometheus:
        """The lab's running Prometheus, to query."""
        info = (state or self.load()).get("prometheus")
        if not info or not procs.is_ours(info["pid"], info["config"]):
            raise LabError("this lab has no running Prometheus (start it with `up --prometheus`)")
        return prom.Prometheus(info["pid"], info["port"], Path(info["config"]))

    # -- scale -----------------------------------------------------------------

    def scale(self, count: int, timeout_s: float = 60) -> dict[str, list[str]]:
        """Grow or shrink the fleet to `count` nodes while it serves.

        New nodes start, become ready, and only then join HAProxy's backend
        and Prometheus's targets; leaving nodes are drained first (out of
        HAProxy's rotation, in-flight requests finished), then removed from both.
        """
        state = self.load()
        if not state.get("haproxy"):
            raise LabError("scale needs a lab with --front haproxy for now")
        planned = list(state.get("bus_ports") or {})
        if not 1 <= count <= len(planned):
            raise LabError(
                f"scale to between 1 and {len(planned)} nodes (the lab was started with "
                f"--max-nodes {len(planned)})"
            )
        proxy = state["haproxy"]
        socket_path, config = Path(proxy["socket"]), Path(proxy["config"])
        current = [n["id"] for n in state["nodes"]]
        added = [n for n in planned if n not in current][: max(0, count - len(current))]
        removed = current[count:]
        options = self._options(state)
        for node_id in added:
            node = self._new_node(state, node_id, options, state["bus_ports"])
            state["nodes"].append(node)
            self._save(state)
        deadline = time.monotonic() + timeout_s
        for node in state["nodes"]:
            if node["id"] in added:
                self._wait_node(state, node, deadline)
                if node["cgroup"]:
                    cgroups.CpuGroup(Path(node["cgroup"])).cap(options.cpu)
                haproxy.add_server(
                    socket_path,
                    config,
                    haproxy.Server(node["id"], node["host"], node["port"], node["agent_port"]),
                )
        if added:
            haproxy.wait_servers(socket_path, added, "UP", timeout_s=20)
        for node_id in removed:
            self.drain(node_id, timeout_s=timeout_s)
            haproxy.remove_server(socket_path, node_id)
            node = self.node(state, node_id)
            if node.get("cgroup"):
                with contextlib.suppress(OSError):
                    cgroups.CpuGroup(Path(node["cgroup"])).remove()
            state["nodes"] = [n for n in state["nodes"] if n["id"] != node_id]
            self._save(state)
        if state.get("prometheus"):
            self._write_prometheus_targets(state)
        self._save(state)
        return {"added": added, "removed": removed}

    def _options(self, state: dict[str, Any]) -> LabOptions:
        """The options a node is started with, as `up` was given them."""
        saved = state["options"]
        return LabOptions(
            nodes=saved["nodes"],
            backend=saved["backend"],
            front=saved["front"],
            cpu=saved.get("cpu"),
            cpu_period_ms=float(saved.get("cpu_period_ms", cgroups.PERIOD_US / 1000)),
            drain_delay_s=float(saved.get("drain_delay_s", 2.0)),
            shutdown_timeout_s=float(saved.get("shutdown_timeout_s", 10.0)),
            node_env=dict(saved.get("node_env") or {}),
        )

    # -- the database primary (patroni) ----------------------------------------

    def kill_primary(self, timeout_s: float = 30) -> dict[str, Any]:
        """SIGKILL the PostgreSQL of Patroni's leader; return the old and the new leader."""
        state = self.load()
        database = state.get("database") or {}
        if database.get("kind") != "patroni":
            raise LabError("kill-primary needs a lab with --backend patroni")
        from deploy.lab.patroni import PatroniCluster, PatroniError

        cluster = PatroniCluster.from_json(database)
        try:
            cluster.wait_failover_candidate(timeout_s)
            old = cluster.leader()
            started = time.monotonic()
            pid = cluster.kill_postgres(old)
            new = cluster.wait_for_new_leader(old, timeout_s=timeout_s)
        except PatroniError as exc:
            raise LabError(str(exc)) from None
        return {"old": old, "new": new, "pid": pid, "seconds": time.monotonic() - started}

    # -- verbs on nodes --------------------------------------------------------

    def drain(self, node_id: str, *, keep: bool = False, timeout_s: float = 60) -> dict[str, Any]:
        """Take a node out gracefully: SIGTERM runs its drain sequence to exit 0.

        With `keep`, only create its drain file: it stays up, out of rotation,
        until `undrain`.
        """
        state = self.load()
        node = self.node(state, node_id)
        if keep:
            Path(node["drain_file"]).touch()
            return node
        marker = self._marker(state, node_id)
        if not procs.signal_pid(node["pid"], marker, signal.SIGTERM):
            raise LabError(f"node {node_id} is not running")
        if not procs.wait_gone(node["pid"], marker, timeout_s):
            raise LabError(f"node {node_id} still running {timeout_s:.0f} s after SIGTERM")
        return node

    def undrain(self, node_id: str) -> dict[str, Any]:
        node = self.node(self.load(), node_id)
        with contextlib.suppress(FileNotFoundError):
            Path(node["drain_file"]).unlink()
        return node

    def kill(self, node_id: str, *, machine: bool = False) -> dict[str, Any]:
        """SIGKILL the node; with `machine` (anycast), everything in its namespace
        too (ExaBGP and its check): the router then sees the session close."""
        state = self.load()
        node = self.node(state, node_id)
        marker = self._marker(state, node_id)
        if machine:
            if not node.get("netns"):
                raise LabError("kill --machine needs a lab with --front anycast")
            anycast.kill_namespace(state["anycast"], node_id)
        elif not procs.signal_pid(node["pid"], marker, signal.SIGKILL):
            raise LabError(f"node {node_id} is not running")
        procs.wait_gone(node["pid"], marker, 5)
        return node

    def restart(self, node_id: str, timeout_s: float = 60) -> dict[str, Any]:
        state = self.load()
        node = self.node(state, node_id)
        marker = self._marker(state, node_id)
        procs.stop(node["pid"], marker, timeout_s=timeout_s)
        group = cgroups.CpuGroup(Path(node["cgroup"])) if node.get("cgroup") else None
        if group is not None:
            group.cap(None)  # start at full speed, as `up` does; capped once ready
        self._spawn_node(state, node)
        for i, existing in enumerate(state["nodes"]):
            if existing["id"] == node_id:
                state["nodes"][i] = node
        self._save(state)
        try:
            self._wait_node(state, node, time.monotonic() + timeout_s)
        finally:
            if group is not None:
                group.cap(state["options"]["cpu"])
        plan = state.get("anycast") or {}
        lost = {
            "proxy": "proxy" in node and not anycast.daemon_running(node.get("proxy")),
            "sidecar": node.get("netns") and not anycast.daemon_running(node.get("sidecar")),
            "bfd": plan.get("bfd") and not anycast.daemon_running(node.get("bfd_responder")),
        }
        if any(lost.values()):
            # Its machine was lost with it (kill --machine): what ran beside it comes back too.
            try:
                if lost["proxy"]:
                    node["proxy"] = self._start_machine_proxy(state, node_id)
                if lost["bfd"]:
                    node["bfd_responder"] = anycast.start_bfd_responder(
                        plan, node_id, run_dir=self.run_dir
                    )
                if lost["sidecar"]:
                    node["sidecar"] = anycast.start_sidecar(
                        plan, node_id, drain_file=node["drain_file"], run_dir=self.run_dir
                    )
            except anycast.AnycastError as exc:
                raise LabError(str(exc)) from None
            for i, existing in enumerate(state["nodes"]):
                if existing["id"] == node_id:
                    state["nodes"][i] = node
            self._save(state)
        return node

    # -- down ----------------------------------------------------------------

    @staticmethod
    def _stop_machine_daemons(state: dict[str, Any], keys: tuple[str, ...]) -> list[str]:
        """Stop what runs beside each node (anycast.MACHINE_DAEMONS, by key); what was stopped."""
        stopped = []
        for node in state.get("nodes", []):
            for key in keys:
                if anycast.daemon_running(node.get(key)):
                    anycast.stop_daemon(node[key])
                    stopped.append(f"{anycast.MACHINE_DAEMONS[key]} {node['id']}")
        return stopped

    def down(self) -> list[str]:
        """Stop everything this lab started; safe to run twice. Returns what it stopped."""
        try:
            state = self.load()
        except (LabError, ValueError):
            return []
        stopped = []
        metrics = state.get("prometheus") or {}
        if procs.is_ours(metrics.get("pid"), metrics.get("config", "-")):
            procs.stop(metrics["pid"], metrics["config"], timeout_s=5)
            stopped.append("prometheus")
        proxy = state.get("haproxy") or {}
        if proxy.get("pid") and procs.is_ours(proxy["pid"], proxy["config"]):
            procs.stop(proxy["pid"], proxy["config"], timeout_s=5)
            stopped.append("haproxy")
        stopped += self._stop_machine_daemons(state, ("proxy",))
        # SIGTERM every node at once, so their drain delays run side by side.
        running = [
            node
            for node in state.get("nodes", [])
            if procs.signal_pid(node.get("pid"), self._marker(state, node["id"]), signal.SIGTERM)
        ]
        deadline = time.monotonic() + 30
        for node in running:
            marker = self._marker(state, node["id"])
            # No second SIGTERM: to a draining node it means "exit at once".
            if not procs.wait_gone(node["pid"], marker, max(0.0, deadline - time.monotonic())):
                procs.signal_pid(node["pid"], marker, signal.SIGKILL)
                procs.wait_gone(node["pid"], marker, 5)
            stopped.append(f"node {node['id']}")
        stopped += self._stop_machine_daemons(state, ("sidecar", "bfd_responder"))
        for node in state.get("nodes", []):
            if node.get("cgroup"):
                with contextlib.suppress(OSError):
                    cgroups.CpuGroup(Path(node["cgroup"])).remove()
        plan = state.get("anycast")
        if plan:
            bird = plan.get("bird") or {}
            if procs.is_ours(bird.get("pid"), bird.get("config", "-")):
                procs.stop(bird["pid"], bird["config"], timeout_s=5)
                stopped.append("bird")
            stopped += [f"namespace {name}" for name in anycast.teardown(plan)]
        database: dict[str, Any] = state.get("database") or {}
        database_live = any(name.startswith("postgres") for name in self.live_processes(state))
        if database.get("kind") == "postgres" and database_live:
            cluster = PostgresCluster(
                Path(database["base_dir"]),
                replicas=len(database.get("replicas", [])),
                ports=database["ports"],
            )
            cluster.stop()
            stopped.append("postgres")
        elif database.get("kind") == "patroni":
            from deploy.lab.patroni import PatroniCluster

            PatroniCluster.from_json(database).stop()
            stopped.append("patroni")
        state["stopped_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._save(state)
        return stopped

    # -- status ----------------------------------------------------------------

    def _router_view(self, state: dict[str, Any]) -> dict[str, Any]:
        """What the anycast router says: BGP sessions, announcing nodes, ECMP next hops."""
        plan = state["anycast"]
        bird = plan.get("bird") or {}
        view: dict[str, Any] = {
            "bird_running": procs.is_ours(bird.get("pid"), bird.get("config", "-"))
        }
        view["pinning"] = plan.get("pinning")
        view["bfd"] = plan.get("bfd")
        if view["bird_running"]:
            with contextlib.suppress(anycast.AnycastError):
                view["sessions"] = anycast.bgp_sessions(bird)
                view["announcing"] = anycast.announcing(bird, plan["vip"])
            if view["bfd"]:
                with contextlib.suppress(anycast.AnycastError):
                    view["bfd_sessions"] = anycast.bfd_sessions(bird, plan)
        with contextlib.suppress(netns.NetnsError):
            view["next_hops"] = anycast.next_hop_nodes(plan)
        for node in state["nodes"]:
            node["sidecar_running"] = anycast.daemon_running(node.get("sidecar"))
            if "proxy" in node:
                node["proxy_running"] = anycast.daemon_running(node["proxy"])
            node["bgp"] = (view.get("sessions") or {}).get(node["id"])
            node["bfd_responder_running"] = anycast.daemon_running(node.get("bfd_responder"))
            node["bfd"] = (view.get("bfd_sessions") or {}).get(node["id"])
            node["announced"] = node["id"] in (view.get("announcing") or [])
        return view

    def status(self) -> dict[str, Any]:
        """lab.json plus each node's live health and HAProxy's view."""
        state = self.load()
        proxy_view: dict[str, dict[str, str]] = {}
        proxy = state.get("haproxy")
        if proxy and procs.is_ours(proxy["pid"], proxy["config"]):
            with contextlib.suppress(OSError):
                proxy_view = haproxy.server_states(Path(proxy["socket"]))
        for node in state["nodes"]:
            running = procs.is_ours(node["pid"], self._marker(state, node["id"]))
            health = self._node_json(node, "/healthz") if running else None
            node["running"] = running
            node["health"] = health
            if node["id"] in proxy_view:
                row = proxy_view[node["id"]]
                node["haproxy"] = {
                    "status": row.get("status"),
                    "weight": row.get("weight"),
                    "sessions": row.get("scur"),
                    "agent": row.get("agent_status"),
                }
        plan = state.get("anycast")
        if plan:
            state["router"] = self._router_view(state)
        state.pop("cursor_secret", None)
        state.pop("admin_token", None)
        state["options"].pop("node_env", None)
        for node in state["nodes"]:
            node.pop("env", None)
        return state
