"""Start and stop a Patroni-managed PostgreSQL cluster, with its etcd, on loopback.

The lab's HA mode. Member ``pgN`` lives in ``<base_dir>/pgN/`` (``patroni.yml``, ``data/``,
``patroni.log`` with PostgreSQL's output too), etcd in ``<base_dir>/etcd/``; configs are
rendered from deploy/patroni/ and deploy/etcd/. As in postgres.py, the servers run as the
``postgres`` OS user when we are root. Only processes this cluster started get a signal:
Patroni and etcd by PID file when their command line names its config file, postmasters by
``postmaster.pid`` when theirs names its data directory. So ``from_json`` in another process
can stop what ``start`` left running.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from deploy.lab.postgres import (
    SUPERUSER,
    PostgresError,
    PostgresNotInstalled,
    find_bindir,
    free_port,
    log_tail,
    parent_pid,
    pid_alive,
    postmaster_pid,
    prepare_base_dir,
    server_user,
    sql_ident,
)
from deploy.lab.render import render

SCOPE = "cattle"
HOST = "127.0.0.1"  # trust authentication is only safe on loopback


class PatroniNotInstalled(PostgresNotInstalled):
    """patroni or etcd is missing (Debian: `apt-get install patroni etcd-server`)."""


class PatroniError(PostgresError):
    """A Patroni member or etcd failed, or the cluster did not reach a state in time."""


@dataclass
class PatroniMember:
    name: str
    port: int  # PostgreSQL
    rest_port: int  # Patroni's REST API
    dir: Path

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def log_file(self) -> Path:
        return self.dir / "patroni.log"

    @property
    def config_file(self) -> Path:
        return self.dir / "patroni.yml"

    @property
    def rest_url(self) -> str:
        return f"http://{HOST}:{self.rest_port}"


class PatroniCluster:
    """``members`` PostgreSQL servers under Patroni, one etcd, all on 127.0.0.1.

    ``ports`` (etcd client and peer, then PostgreSQL and REST per member) are picked free
    unless given; ``from_json`` gives them back to a new object for the same cluster.
    """

    def __init__(self, base_dir: Path, *, members: int = 3, ports: list[int] | None = None) -> None:
        if members < 2:
            raise ValueError("a failover needs at least 2 members")
        if ports is not None and len(set(ports)) != 2 * members + 2:
            raise ValueError(f"need {2 * members + 2} distinct ports, got {ports}")
        self.base_dir = Path(base_dir).absolute()
        self.bindir = find_bindir()
        self._bins = {tool: shutil.which(tool) for tool in ("patroni", "etcd")}
        if missing := [tool for tool, path in self._bins.items() if path is None]:
            raise PatroniNotInstalled(
                f"{' and '.join(missing)} not found; install them with "
                "`apt-get install patroni etcd-server`"
            )
        self._server_user = server_user()
        ports = list(ports or [])
        while len(ports) < 2 * members + 2:
            if (port := free_port(HOST)) not in ports:
                ports.append(port)
        self.etcd_port, self.etcd_peer_port = ports[:2]
        self._members = [
            PatroniMember(f"pg{i}", ports[2 * i], ports[2 * i + 1], self.base_dir / f"pg{i}")
            for i in range(1, members + 1)
        ]
        self.etcd_dir = self.base_dir / "etcd"
        self.ports = ports
        self._procs: dict[str, subprocess.Popen[bytes]] = {}  # "etcd" and member names
        self._created: list[Path] = []

    @classmethod
    def from_json(cls, state: dict[str, Any]) -> PatroniCluster:
        """The cluster that ``to_json`` described, e.g. to stop it from another process."""
        return cls(Path(state["base_dir"]), members=len(state["members"]), ports=state["ports"])

    @property
    def members(self) -> list[PatroniMember]:
        return list(self._members)

    def member(self, name: str) -> PatroniMember:
        for m in self._members:
            if m.name == name:
                return m
        raise KeyError(f"no member {name!r}; members: {[m.name for m in self._members]}")

    @property
    def etcd_url(self) -> str:
        return f"http://{HOST}:{self.etcd_port}"

    # -- lifecycle -------------------------------------------------------------------

    def start(self, timeout_s: float = 90) -> None:
        """Start etcd, then every member; return once a leader and a sync standby exist."""
        deadline = time.monotonic() + timeout_s
        for path in [self.etcd_dir, *(m.dir for m in self._members)]:
            if path.exists():
                raise PatroniError(f"{path} already exists; remove() that cluster first")
        self._created += prepare_base_dir(self.base_dir, self._server_user)
        try:
            self._start_etcd(deadline)
            for m in self._members:  # together: one wins the initialize key, others clone
                self._mkdir(m.dir)
                m.config_file.write_text(
                    render(
                        "patroni/patroni.yml.tmpl", scope=SCOPE, name=m.name, member_dir=m.dir,
                        data_dir=m.data_dir, bin_dir=self.bindir, pg_port=m.port,
                        rest_port=m.rest_port, etcd_port=self.etcd_port,
                    )
                )  # fmt: skip
                self._spawn(m.name, [str(self._bins["patroni"]), str(m.config_file)], m.log_file)
            self.wait_ready(deadline - time.monotonic())
        except BaseException:
            # Never leave half a cluster running behind a failed start; the first error wins.
            with contextlib.suppress(Exception):
                self.stop()
            raise

    def wait_ready(self, timeout_s: float = 60) -> None:
        """Wait until every member runs, one leads and one is its synchronous standby."""

        def ready() -> bool:
            members = self._cluster_members()
            roles = [m.get("role") for m in members if m.get("state") == "running"]
            full = len(roles) == len(self._members)
            return full and roles.count("leader") == 1 and "sync_standby" in roles

        self._wait(ready, timeout_s, "elect a leader with a synchronous standby")

    def stop(self, timeout_s: float = 30) -> None:
        """Stop Patroni (which stops its PostgreSQL), any postmaster left, then etcd."""
        leader = self._leader_or_none()
        # Replicas first, so none of them takes over from a leader that is shutting down.
        for names in ([m.name for m in self._members if m.name != leader], [leader]):
            _end([pid for name in names if name and (pid := self._pid(name))], timeout_s)
        # Patroni stops its server; one left behind (say Patroni was killed) is still ours.
        left = [pid for m in self._members if (pid := postmaster_pid(m.data_dir))]
        backends = [
            int(p) for p in os.listdir("/proc") if p.isdigit() and parent_pid(int(p)) in left
        ]
        stuck = _end(left, 5, wait_for=backends)
        _end([pid for pid in [self._pid("etcd")] if pid], timeout_s)
        for proc in self._procs.values():
            proc.poll()  # reap our children
        if stuck:
            raise PatroniError(f"postgres processes {stuck} did not exit")

    def remove(self) -> None:
        """Stop, delete every member directory and etcd's, and base_dir if we made it."""
        self.stop()
        for path in [self.etcd_dir, *(m.dir for m in self._members)]:
            shutil.rmtree(path, ignore_errors=True)
        for path in reversed(self._created):
            with contextlib.suppress(OSError):
                path.rmdir()  # only if empty: the caller may keep other things there
        self._created.clear()

    def __enter__(self) -> PatroniCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- roles and failover ----------------------------------------------------------

    def leader(self) -> str:
        """The member holding the leader key (raises if there is none right now)."""
        if (name := self._leader_or_none()) is None:
            raise PatroniError(f"the cluster has no leader\n{self._log_tails()}")
        return name

    def wait_failover_candidate(self, timeout_s: float = 60) -> None:
        """Wait until a leader has a running synchronous standby to fail over to.

        In synchronous mode only that standby may be promoted. Right after a
        failover the replicas are still following the new timeline: a leader
        crashed then has no candidate, and Patroni restarts it in place.
        """

        def candidate() -> bool:
            members = self._cluster_members()
            running = [m for m in members if m.get("state") in ("running", "streaming")]
            roles = [m.get("role") for m in running]
            return "leader" in roles and "sync_standby" in roles

        self._wait(candidate, timeout_s, "have a synchronous standby to fail over to")

    def kill_postgres(self, member: str) -> int:
        """SIGKILL that member's postmaster (not Patroni): a crash. Returns its PID."""
        m = self.member(member)
        if (pid := postmaster_pid(m.data_dir)) is None:
            raise PatroniError(f"{member} has no running postgres to kill")
        os.kill(pid, signal.SIGKILL)
        return pid

    def wait_for_new_leader(self, old: str, timeout_s: float = 30) -> str:
        """Wait until a member other than ``old`` leads and accepts writes; its name."""
        found: list[str] = []

        def promoted() -> bool:
            name = self._leader_or_none()
            if name is None or name == old:
                return False
            with contextlib.suppress(PostgresError):
                if self.psql("SELECT pg_is_in_recovery()", member=name) == "f":
                    found.append(name)
            return bool(found)

        self._wait(promoted, timeout_s, f"promote a new leader after {old}")
        return found[0]

    # -- connecting ------------------------------------------------------------------

    def primary_dsn(self, dbname: str = "postgres") -> str:
        """Every member, in libpq's multi-host form: clients find the read-write one."""
        hosts = ",".join(f"{HOST}:{m.port}" for m in self._members)
        return f"postgresql://{SUPERUSER}@{hosts}/{dbname}?target_session_attrs=read-write"

    def member_dsn(self, name: str, dbname: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@{HOST}:{self.member(name).port}/{dbname}"

    def replica_dsns(self, dbname: str = "postgres") -> list[str]:
        """The members that do not lead right now (all of them if none does)."""
        leader = self._leader_or_none()
        return [self.member_dsn(m.name, dbname) for m in self._members if m.name != leader]

    def psql(self, sql: str, *, member: str | None = None, dbname: str = "postgres") -> str:
        """Run ``sql`` on ``member``, or on whichever member is the primary; stdout."""
        dsn = self.member_dsn(member, dbname) if member else self.primary_dsn(dbname)
        # Inherited PG* variables (PGHOST, PGDATA, ...) would silently redirect psql.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env |= {"PGCONNECT_TIMEOUT": "5", "LC_ALL": "C"}
        args = ["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-d", dsn, "-c", sql]
        try:
            proc = subprocess.run(
                [self.bindir / "psql", *args], capture_output=True, text=True, env=env,
                timeout=60, stdin=subprocess.DEVNULL, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired as e:
            raise PatroniError(f"psql timed out after {e.timeout:.0f}s") from e
        if proc.returncode != 0:
            raise PatroniError(f"psql failed: {proc.stderr.strip()}")
        return proc.stdout.strip()

    def create_database(self, name: str) -> None:
        self.psql(f"CREATE DATABASE {sql_ident(name)}")

    def to_json(self) -> dict[str, Any]:
        roles = {m["name"]: m.get("role") for m in self._cluster_members()}
        members = [
            {**asdict(m), "dir": str(m.dir), "data_dir": str(m.data_dir)}
            | {"role": roles.get(m.name), "pid": postmaster_pid(m.data_dir)}
            for m in self._members
        ]
        return {
            "base_dir": str(self.base_dir),
            "ports": self.ports,
            "primary": self.primary_dsn(),
            "replicas": self.replica_dsns(),
            "members": members,
            "etcd": self.etcd_url,
            "patroni": [m.rest_url for m in self._members],
        }

    # -- internals -------------------------------------------------------------------

    def _start_etcd(self, deadline: float) -> None:
        self._mkdir(self.etcd_dir)
        config = self._config_file("etcd")
        config.write_text(
            render(
                "etcd/etcd.yml.tmpl", name=f"{SCOPE}-etcd", data_dir=self.etcd_dir / "data",
                client_port=self.etcd_port, peer_port=self.etcd_peer_port,
            )
        )  # fmt: skip
        log = self.etcd_dir / "etcd.log"
        self._spawn("etcd", [str(self._bins["etcd"]), "--config-file", str(config)], log)
        healthy = lambda: _get_json(f"{self.etcd_url}/health").get("health") == "true"  # noqa: E731
        self._wait(healthy, deadline - time.monotonic(), "start etcd")

    def _mkdir(self, path: Path) -> None:
        path.mkdir(mode=0o755)
        if user := self._server_user:
            shutil.chown(path, user.pw_uid, user.pw_gid)

    def _config_file(self, name: str) -> Path:
        return self.etcd_dir / "etcd.yml" if name == "etcd" else self.member(name).config_file

    def _spawn(self, name: str, argv: list[str], log: Path) -> None:
        cwd = self._config_file(name).parent
        drop_root: dict[str, Any] = {}
        if user := self._server_user:
            drop_root = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        # A clean environment: PATRONI_* or PG* variables of ours would reconfigure it, and
        # the system python3 that runs Patroni must not see this project's virtualenv.
        env = {"PATH": "/usr/bin:/bin", "HOME": str(cwd), "LC_ALL": "C.UTF-8"}
        with log.open("ab") as out:
            self._procs[name] = subprocess.Popen(
                argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True, **drop_root,
            )  # fmt: skip
        self._config_file(name).with_suffix(".pid").write_text(f"{self._procs[name].pid}\n")

    def _pid(self, name: str) -> int | None:
        """The running Patroni or etcd we started as ``name``, from its PID file."""
        config = self._config_file(name)
        try:
            pid = int(config.with_suffix(".pid").read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) and os.fsencode(config) in cmdline else None

    def _cluster_members(self) -> list[dict[str, Any]]:
        """Patroni's view (GET /cluster) from the first member that answers; [] if none."""
        for m in self._members:
            members = _get_json(f"{m.rest_url}/cluster").get("members")
            if isinstance(members, list):
                return members
        return []

    def _leader_or_none(self) -> str | None:
        for m in self._cluster_members():
            if m.get("role") == "leader":
                return str(m["name"])
        return None

    def _wait(self, ready: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + max(timeout_s, 1)
        while not ready():
            dead = [
                f"{n} (exit {p.returncode})" for n, p in self._procs.items() if p.poll() is not None
            ]
            if dead or time.monotonic() > deadline:
                why = f"{', '.join(dead)} exited" if dead else "timed out"
                raise PatroniError(f"cluster did not {what}: {why}\n{self._log_tails()}")
            time.sleep(0.2)

    def _log_tails(self) -> str:
        logs = [self.etcd_dir / "etcd.log", *(m.log_file for m in self._members)]
        return "\n".join(f"--- {log}\n{log_tail(log, 15)}" for log in logs if log.exists())


def _end(pids: list[int], timeout_s: float, *, wait_for: Sequence[int] = ()) -> list[int]:
    """SIGTERM, a bounded wait, SIGKILL, another; the PIDs (or wait_for) still alive."""
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
        for pid in filter(pid_alive, pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        end = time.monotonic() + wait_s
        while any(map(pid_alive, [*pids, *wait_for])) and time.monotonic() < end:
            time.sleep(0.1)
    return [pid for pid in [*pids, *wait_for] if pid_alive(pid)]


def _get_json(url: str) -> dict[str, Any]:
    """A JSON object from a loopback REST endpoint; {} when it does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 (http://127.0.0.1)
            body = json.loads(response.read())
    except (OSError, ValueError):  # URLError is an OSError
        return {}
    return body if isinstance(body, dict) else {}
