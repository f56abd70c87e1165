"""Start and stop a real PostgreSQL primary with streaming hot standbys on loopback.

Used by the test suite and the lab. Each member lives in ``<base_dir>/<name>/``: the data
directory ``data/``, the server log ``postgres.log`` and the unix socket. PostgreSQL refuses
to run as root, so when we are root every server-side command runs as the ``postgres`` OS
user (created by the Debian package) and the directories it writes are chowned to it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SERVER_OS_USER = "postgres"
SUPERUSER = "postgres"
# Unix socket paths are limited to 107 bytes; fail early with a clear message instead.
_MAX_SOCKET_PATH = 100


class PostgresNotInstalled(RuntimeError):
    """No PostgreSQL server binaries on this machine."""


class PostgresError(RuntimeError):
    """A PostgreSQL command failed or a member did not get ready in time."""


def find_bindir() -> Path:
    """Newest Debian-layout server bindir, else what ``pg_config --bindir`` says."""
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else -1,
        reverse=True,
    )
    if pg_config := shutil.which("pg_config"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.check_output([pg_config, "--bindir"], text=True, timeout=10)
            candidates.append(Path(out.strip()))
    for bindir in candidates:
        if all(os.access(bindir / tool, os.X_OK) for tool in ("initdb", "postgres", "pg_ctl")):
            return bindir
    raise PostgresNotInstalled(
        "PostgreSQL server binaries (initdb, postgres) not found; "
        "install them with `apt-get install postgresql-15`"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS considers free right now (another process may still take it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _alive(pid: int) -> bool:
    # A killed postmaster may stay a zombie if PID 1 does not reap: count that as dead.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(stat.parent.name))
    return kids


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class Member:
    name: str
    port: int
    data_dir: Path
    role: str  # "primary" | "replica"
    pid: int | None = None  # postmaster PID, read from postmaster.pid after start

    @property
    def dir(self) -> Path:
        return self.data_dir.parent

    @property
    def log_file(self) -> Path:
        return self.dir / "postgres.log"


class PostgresCluster:
    """One primary plus ``replicas`` streaming hot standbys, all on ``host``."""

    def __init__(
        self,
        base_dir: Path,
        *,
        replicas: int = 0,
        host: str = "127.0.0.1",
        durable: bool = False,
        ports: list[int] | None = None,
    ) -> None:
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"host must be a loopback address (trust auth is used): {host}")
        if ports is not None and len(ports) != replicas + 1:
            raise ValueError(f"need {replicas + 1} ports, got {len(ports)}")
        self.base_dir = Path(base_dir).absolute()
        self.host = host
        self.durable = durable
        self.bindir = find_bindir()
        self._as_root = os.geteuid() == 0
        ports = ports or self._pick_ports(replicas + 1)
        names = ["primary", *(f"replica{i}" for i in range(1, replicas + 1))]
        self._members = [
            Member(n, p, self.base_dir / n / "data", "primary" if i == 0 else "replica")
            for i, (n, p) in enumerate(zip(names, ports, strict=True))
        ]
        self._created: list[Path] = []  # directories we made, removed by remove()

    # -- addresses ---------------------------------------------------------------------------

    @property
    def members(self) -> list[Member]:
        return list(self._members)

    @property
    def primary(self) -> Member:
        return self._members[0]

    @property
    def replicas(self) -> list[Member]:
        return self._members[1:]

    def member(self, name: str) -> Member:
        for m in self._members:
            if m.name == name:
                return m
        raise KeyError(f"no member {name!r}; members: {[m.name for m in self._members]}")

    def dsn(self, member: Member | str, dbname: str = "postgres") -> str:
        m = self.member(member) if isinstance(member, str) else member
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"postgresql://{SUPERUSER}@{host}:{m.port}/{dbname}"

    def primary_dsn(self, dbname: str = "postgres") -> str:
        return self.dsn(self.primary, dbname)

    def replica_dsns(self, dbname: str = "postgres") -> list[str]:
        return [self.dsn(m, dbname) for m in self.replicas]

    def to_json(self) -> dict[str, Any]:
        return {
            "primary": self.primary_dsn(),
            "replicas": self.replica_dsns(),
            "members": [
                {"name": m.name, "port": m.port, "data_dir": str(m.data_dir), "role": m.role,
                 "pid": m.pid}
                for m in self._members
            ],
        }  # fmt: skip

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        self._prepare_base_dir()
        try:
            primary = self.primary
            self._make_member_dir(primary)
            self._initdb(primary)
            self._start(primary, deadline)
            for replica in self.replicas:
                self._make_member_dir(replica)
                self._basebackup(replica, deadline)
                self._start(replica, deadline)
            for replica in self.replicas:
                self._wait_streaming(replica, deadline)
        except BaseException:
            # Never leave half a cluster running behind a failed start; the first error wins.
            with contextlib.suppress(Exception):
                self.stop()
            raise

    def stop(self, timeout_s: float = 30) -> None:
        # Standbys first, so they do not spend the shutdown retrying a vanished primary.
        errors = []
        for m in [*self.replicas, self.primary]:
            try:
                self.stop_member(m.name, timeout_s=timeout_s)
            except PostgresError as e:  # keep going: the other members must stop too
                errors.append(str(e))
        if errors:
            raise PostgresError("\n".join(errors))

    def stop_member(self, name: str, *, mode: str = "fast", timeout_s: float = 30) -> None:
        if mode not in ("fast", "immediate", "kill"):
            raise ValueError(f"mode must be fast, immediate or kill, not {mode!r}")
        m = self.member(name)
        pid = m.pid
        if pid is None or not _alive(pid):
            m.pid = None
            return
        if mode != "kill":
            # pg_ctl finds the postmaster through postmaster.pid; if it hangs we fall back
            # to SIGKILL of the PID we recorded at start, and nothing else.
            with contextlib.suppress(PostgresError, subprocess.TimeoutExpired):
                self._server_cmd(
                    "pg_ctl", "stop", "-D", str(m.data_dir), "-m", mode, "-w",
                    "-t", str(max(1, int(timeout_s))), timeout_s=timeout_s + 5,
                )  # fmt: skip
        if _alive(pid):
            children = _children(pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            # Backends exit on their own once the postmaster is gone; a restart would
            # refuse to reuse shared memory they still hold, so wait for them (no signals).
            self._wait(lambda: not any(_alive(p) for p in [pid, *children]), m, 10, "exit")
            # The server's stale-lock checks count a not-yet-reaped zombie as a live
            # postmaster (PID 1 in a container may reap late); the owner is gone for sure.
            for lock in (m.data_dir / "postmaster.pid", m.dir / f".s.PGSQL.{m.port}.lock"):
                lock.unlink(missing_ok=True)
        m.pid = None

    def start_member(self, name: str, timeout_s: float = 30) -> None:
        m = self.member(name)
        deadline = time.monotonic() + timeout_s
        if m.pid is None or not _alive(m.pid):
            self._start(m, deadline)
        if m.role == "replica":
            self._wait_streaming(m, deadline)

    def remove(self) -> None:
        self.stop()
        for path in reversed(self._created):
            if path == self.base_dir or path in self.base_dir.parents:
                with contextlib.suppress(OSError):
                    path.rmdir()  # only if empty: the caller may keep other things there
            else:
                shutil.rmtree(path, ignore_errors=True)
        self._created.clear()

    def __enter__(self) -> PostgresCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- SQL ---------------------------------------------------------------------------------

    def psql(self, sql: str, *, member: str | None = None, dbname: str = "postgres") -> str:
        m = self.member(member) if member else self.primary
        args = [str(self.bindir / "psql"), "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"]
        out = self._run([*args, "-d", self.dsn(m, dbname), "-c", sql], as_server=False)
        return out.strip()

    def create_database(self, name: str, template: str | None = None) -> None:
        sql = f"CREATE DATABASE {_ident(name)}"
        self.psql(sql + (f" TEMPLATE {_ident(template)}" if template else ""))

    def drop_database(self, name: str) -> None:
        self.psql(f"DROP DATABASE IF EXISTS {_ident(name)} WITH (FORCE)")

    # -- internals ---------------------------------------------------------------------------

    def _pick_ports(self, count: int) -> list[int]:
        ports: set[int] = set()
        while len(ports) < count:
            ports.add(free_port(self.host))
        return sorted(ports)

    def _prepare_base_dir(self) -> None:
        missing = [p for p in [self.base_dir, *self.base_dir.parents] if not p.exists()]
        for path in reversed(missing):
            path.mkdir(mode=0o755)
            path.chmod(0o755)  # mkdir's mode is filtered by the umask
            self._created.append(path)
        if not self._as_root:
            return
        self.base_dir.chmod(0o755)
        user = pwd.getpwnam(SERVER_OS_USER)
        groups = {user.pw_gid, *os.getgrouplist(user.pw_name, user.pw_gid)}
        for path in [self.base_dir, *self.base_dir.parents]:
            st = path.stat()
            bit = 0o100 if st.st_uid == user.pw_uid else 0o010 if st.st_gid in groups else 0o001
            if not st.st_mode & bit:
                raise PostgresError(
                    f"the {SERVER_OS_USER!r} OS user cannot enter {path} (mode "
                    f"{oct(st.st_mode & 0o777)}), so the server cannot reach {self.base_dir}; "
                    "use a base dir under /tmp or /var/tmp"
                )

    def _make_member_dir(self, m: Member) -> None:
        if m.data_dir.exists():
            raise PostgresError(f"{m.data_dir} already exists; remove() the old cluster first")
        if len(str(m.dir / f".s.PGSQL.{m.port}")) > _MAX_SOCKET_PATH:
            raise PostgresError(f"{m.dir} is too long for a unix socket path; use a shorter one")
        m.dir.mkdir(mode=0o755, exist_ok=True)
        self._created.append(m.dir)
        if self._as_root:
            shutil.chown(m.dir, SERVER_OS_USER, SERVER_OS_USER)

    def _initdb(self, m: Member) -> None:
        sync = [] if self.durable else ["--no-sync"]
        self._server_cmd(
            "initdb", "-D", str(m.data_dir), "-U", SUPERUSER, "--auth=trust",
            "--encoding=UTF8", "--locale=C", *sync, timeout_s=120,
        )  # fmt: skip
        # Trust is safe only because the server listens on loopback and nothing else.
        hba = "".join(
            f"{kind}\t{db}\tall\t{addr}\ttrust\n"
            for kind, addr in (("local", ""), ("host", "127.0.0.0/8"), ("host", "::1/128"))
            for db in ("all", "replication")
        )
        self._write(m.data_dir / "pg_hba.conf", hba)
        settings = {
            "listen_addresses": f"'{self.host}'",
            "wal_level": "replica",
            "max_wal_senders": str(len(self._members) + 5),
            "max_replication_slots": str(len(self._members) + 5),
            "hot_standby": "on",
            # Keeps replica queries from being cancelled by vacuum on the primary.
            "hot_standby_feedback": "on",
            # Replay positions reach pg_stat_replication within a second (lag checks).
            "wal_receiver_status_interval": "1s",
            "max_connections": "200",
            "shared_buffers": "32MB",
            "logging_collector": "off",
        }
        if not self.durable:
            # Test speed: a crash may lose or corrupt data, which a throwaway cluster accepts.
            settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        conf = "".join(f"{k} = {v}\n" for k, v in settings.items())
        with (m.data_dir / "postgresql.conf").open("a") as f:
            f.write(f"\n# cattle lab\n{conf}include = 'cattle_member.conf'\n")

    def _basebackup(self, m: Member, deadline: float) -> None:
        # -R writes standby.signal and primary_conninfo; -C/-S give each standby a slot so
        # the primary keeps the WAL it needs while that standby is stopped.
        sync = [] if self.durable else ["--no-sync"]
        self._server_cmd(
            "pg_basebackup", "-D", str(m.data_dir), "-h", self.host,
            "-p", str(self.primary.port), "-U", SUPERUSER, "-X", "stream", "-c", "fast",
            "-R", "-C", "-S", m.name, *sync, timeout_s=max(1, deadline - time.monotonic()),
        )  # fmt: skip

    def _start(self, m: Member, deadline: float) -> None:
        # Per-member settings; cluster_name also becomes the standby's application_name.
        self._write(
            m.data_dir / "cattle_member.conf",
            f"port = {m.port}\nunix_socket_directories = '{m.dir}'\ncluster_name = '{m.name}'\n",
        )
        wait_s = max(1, int(deadline - time.monotonic()))
        try:
            self._server_cmd(
                "pg_ctl", "start", "-D", str(m.data_dir), "-l", str(m.log_file), "-w",
                "-t", str(wait_s), timeout_s=wait_s + 5,
            )  # fmt: skip
        except (PostgresError, subprocess.TimeoutExpired) as e:
            raise PostgresError(f"{m.name} did not start: {e}\n{_log_tail(m.log_file)}") from e
        m.pid = int((m.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])

    def _wait_streaming(self, m: Member, deadline: float) -> None:
        sql = "SELECT count(*) FROM pg_stat_wal_receiver WHERE status = 'streaming'"
        self._wait(lambda: self.psql(sql, member=m.name) == "1", m, deadline - time.monotonic(),
                   "stream from the primary")  # fmt: skip

    def _wait(self, ready: Callable[[], bool], m: Member, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + max(timeout_s, 0.5)
        while not ready():
            if time.monotonic() > deadline:
                raise PostgresError(f"{m.name} did not {what} in time\n{_log_tail(m.log_file)}")
            time.sleep(0.1)

    def _write(self, path: Path, text: str) -> None:
        path.write_text(text)
        if self._as_root:
            shutil.chown(path, SERVER_OS_USER, SERVER_OS_USER)

    def _server_cmd(self, tool: str, *args: str, timeout_s: float) -> str:
        return self._run([str(self.bindir / tool), *args], as_server=True, timeout_s=timeout_s)

    def _run(self, argv: list[str], *, as_server: bool, timeout_s: float = 60) -> str:
        # Inherited PG* variables (PGHOST, PGDATA, ...) would silently redirect the tools.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env |= {"PGCONNECT_TIMEOUT": "5", "LC_ALL": "C"}
        drop_root: dict[str, Any] = {}
        if as_server and self._as_root:
            env["HOME"] = str(self.base_dir)
            drop_root = {"user": SERVER_OS_USER, "group": SERVER_OS_USER, "extra_groups": []}
        proc = subprocess.run(
            argv, capture_output=True, text=True, env=env, timeout=timeout_s,
            cwd=self.base_dir, stdin=subprocess.DEVNULL, **drop_root,
        )  # fmt: skip
        if proc.returncode != 0:
            raise PostgresError(f"{Path(argv[0]).name} failed: {proc.stderr.strip()}")
        return str(proc.stdout)


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
