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
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SERVER_OS_USER = "postgres"
SUPERUSER = "postgres"
_MAX_SOCKET_PATH = 100  # the kernel allows 107 bytes; fail early with a clear message


class PostgresNotInstalled(RuntimeError):
    """No PostgreSQL server binaries (or, as root, no postgres OS user) on this machine."""


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


# Ports the lab and the tests take from: above the well-known services (5432,
# 8080, 9090 ...) and below the kernel's ephemeral range.
FREE_PORT_FLOOR = 20000


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free now and outside the kernel's ephemeral range.

    A port the OS hands out for port 0 comes from the ephemeral range, the same
    range every outgoing connection takes its source port from: between our
    choosing it and a server binding it, a client connection (a bus peer
    reconnecting, a test's HTTP client) may take it. That happened in CI.
    Below the range no source port is ever chosen, so only another server
    could race us for it, and the bind check here catches a port in use.
    """
    low, _ = _ephemeral_range()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    rng = random.Random()
    for _ in range(200 if low > FREE_PORT_FLOOR + 1000 else 0):
        port = rng.randrange(FREE_PORT_FLOOR, low)
        with socket.socket(family) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(family) as s:  # an unusual range: let the OS choose
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def server_user() -> pwd.struct_passwd | None:
    """The OS user server processes must run as: None when we are not root."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SERVER_OS_USER)
    except KeyError:
        raise PostgresNotInstalled(
            f"running as root needs the unprivileged {SERVER_OS_USER!r} OS user, "
            "created by `apt-get install postgresql-15`"
        ) from None


def prepare_base_dir(base_dir: Path, user: pwd.struct_passwd | None) -> list[Path]:
    """Create base_dir (0755) so ``user`` can reach it; returns the directories made."""
    paths, created = [base_dir, *base_dir.parents], []
    if user:
        # Refuse before creating anything; base_dir itself is made 0755 below.
        groups = {user.pw_gid, *os.getgrouplist(user.pw_name, user.pw_gid)}
        for path in filter(Path.exists, paths[1:]):
            st = path.stat()
            owner, group = st.st_uid == user.pw_uid, st.st_gid in groups
            if not st.st_mode & (0o100 if owner else 0o010 if group else 0o001):
                raise PostgresError(
                    f"the {SERVER_OS_USER!r} OS user cannot enter {path} (mode "
                    f"{oct(st.st_mode & 0o777)}), so the server cannot use {base_dir}; "
                    "use a base dir under /tmp or /var/tmp"
                )
    for path in reversed([p for p in paths if not p.exists()]):
        path.mkdir()
        path.chmod(0o755)  # whatever the umask: the server user must get through
        created.append(path)
    if user:
        base_dir.chmod(0o755)
    return created


def postmaster_pid(data_dir: Path) -> int | None:
    """The running postmaster of data_dir, from postmaster.pid; a reused PID does not count."""
    try:
        pid = int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) and os.fsencode(data_dir) in cmdline else None


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state first), None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    # A dead postmaster stays a zombie until PID 1 reaps it, which in a container may be
    # late or never; it holds no port or memory any more, so it counts as dead.
    stat = _proc_stat(pid)
    return stat is not None and stat[0] != "Z"


def log_tail(path: Path, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return "(no log)"


@dataclass
class Member:
    name: str
    port: int
    data_dir: Path
    role: str  # "primary" | "replica"
    pid: int | None = None  # postmaster PID, read from postmaster.pid

    @property
    def dir(self) -> Path:
        return self.data_dir.parent

    @property
    def log_file(self) -> Path:
        return self.dir / "postgres.log"


class PostgresCluster:
    """One primary plus ``replicas`` streaming hot standbys, all on ``host``.

    A new object given the same ``base_dir`` and ``ports`` can stop (and ``remove``) a
    cluster that an earlier process started: PIDs come from each ``postmaster.pid``.
    """

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
        if ports is not None and len(set(ports)) != replicas + 1:
            raise ValueError(f"need {replicas + 1} distinct ports, got {ports}")
        self.base_dir = Path(base_dir).absolute()
        self.host = host
        self.durable = durable
        self.bindir = find_bindir()
        self._server_user = server_user()  # set when we must drop root
        picked: set[int] = set(ports or [])
        while len(picked) < replicas + 1:
            picked.add(free_port(host))
        ports = ports or sorted(picked)
        names = ["primary", *(f"replica{i}" for i in range(1, replicas + 1))]
        self._members = [
            Member(n, p, self.base_dir / n / "data", "primary" if n == "primary" else "replica")
            for n, p in zip(names, ports, strict=True)
        ]
        self._created: list[Path] = []  # base_dir and parents we made, removed if empty

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
            "members": [{**asdict(m), "data_dir": str(m.data_dir)} for m in self._members],
        }

    def start(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        # Checked before anything runs, so a refused start never touches a live cluster.
        for m in self._members:
            if m.dir.exists():
                raise PostgresError(f"{m.dir} already exists; remove() that cluster first")
            if len(str(m.dir / f".s.PGSQL.{m.port}")) > _MAX_SOCKET_PATH:
                raise PostgresError(f"{m.dir} is too long for a unix socket path")
        self._prepare_base_dir()
        try:
            self._initdb(self.primary)
            self._start(self.primary, deadline)
            for replica in self.replicas:
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
            except PostgresError as e:  # the other members must still stop
                errors.append(str(e))
        if errors:
            raise PostgresError("\n".join(errors))

    def stop_member(self, name: str, *, mode: str = "fast", timeout_s: float = 30) -> None:
        if mode not in ("fast", "immediate", "kill"):
            raise ValueError(f"mode must be fast, immediate or kill, not {mode!r}")
        m = self.member(name)
        m.pid = self._postmaster_pid(m)
        if m.pid is None:
            return
        if mode != "kill":
            with contextlib.suppress(PostgresError):
                self._run(
                    "pg_ctl", "stop", "-D", str(m.data_dir), "-m", mode, "-w",
                    "-t", str(max(1, int(timeout_s))), timeout_s=timeout_s + 5,
                )  # fmt: skip
        if pid_alive(pid := m.pid):
            # Only the postmaster we recorded gets a signal. Its backends exit by themselves
            # once it is gone; a restart refuses shared memory they still hold, so wait.
            children = [
                int(p) for p in os.listdir("/proc") if p.isdigit() and parent_pid(int(p)) == pid
            ]
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self._wait(lambda: not any(map(pid_alive, [pid, *children])), m, 10, "exit")
            # The server's stale-lock checks take an unreaped zombie for a live postmaster.
            for lock in (m.data_dir / "postmaster.pid", m.dir / f".s.PGSQL.{m.port}.lock"):
                lock.unlink(missing_ok=True)
        m.pid = None

    def start_member(self, name: str, timeout_s: float = 30) -> None:
        m = self.member(name)
        deadline = time.monotonic() + timeout_s
        if self._postmaster_pid(m) is None:
            self._start(m, deadline)
        if m.role == "replica":
            self._wait_streaming(m, deadline)

    def remove(self) -> None:
        """Stop, delete every member directory, and base_dir (and parents) if we made it."""
        self.stop()
        for m in self._members:
            shutil.rmtree(m.dir, ignore_errors=True)
        for path in reversed(self._created):
            with contextlib.suppress(OSError):
                path.rmdir()  # only if empty: the caller may keep other things there
        self._created.clear()

    def __enter__(self) -> PostgresCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def psql(self, sql: str, *, member: str | None = None, dbname: str = "postgres") -> str:
        dsn = self.dsn(member or self.primary, dbname)
        args = ("-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-d", dsn, "-c", sql)
        return self._run("psql", *args, as_server=False).strip()

    def create_database(self, name: str, template: str | None = None) -> None:
        sql = f"CREATE DATABASE {sql_ident(name)}"
        self.psql(sql + (f" TEMPLATE {sql_ident(template)}" if template else ""))

    def drop_database(self, name: str) -> None:
        self.psql(f"DROP DATABASE IF EXISTS {sql_ident(name)} WITH (FORCE)")

    def _postmaster_pid(self, m: Member) -> int | None:
        return postmaster_pid(m.data_dir)

    def _prepare_base_dir(self) -> None:
        self._created += prepare_base_dir(self.base_dir, self._server_user)
        user = self._server_user
        for m in self._members:
            m.dir.mkdir(mode=0o755)
            if user:
                shutil.chown(m.dir, user.pw_uid, user.pw_gid)

    def _initdb(self, m: Member) -> None:
        sync = [] if self.durable else ["--no-sync"]
        self._run(
            "initdb", "-D", str(m.data_dir), "-U", SUPERUSER, "--auth=trust",
            "--encoding=UTF8", "--locale=C", *sync, timeout_s=120,
        )  # fmt: skip
        # Trust is safe only because the server listens on loopback and nothing else.
        self._write(m.data_dir / "pg_hba.conf", "".join(
            f"{kind}\t{db}\tall\t{addr}\ttrust\n"
            for kind, addr in (("local", ""), ("host", "127.0.0.0/8"), ("host", "::1/128"))
            for db in ("all", "replication")
        ))  # fmt: skip
        settings = {
            "listen_addresses": f"'{self.host}'",
            "wal_level": "replica",
            "max_wal_senders": len(self._members) + 5,  # each pg_basebackup takes two
            "max_replication_slots": len(self._members) + 5,
            "hot_standby": "on",
            "hot_standby_feedback": "on",  # replica reads are not cancelled by vacuum
            "wal_receiver_status_interval": "1s",  # fresh replay positions for lag checks
            "max_connections": 200,
            "shared_buffers": "32MB",
            "logging_collector": "off",  # pg_ctl -l writes the log
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
        self._run(
            "pg_basebackup", "-D", str(m.data_dir), "-h", self.host,
            "-p", str(self.primary.port), "-U", SUPERUSER, "-X", "stream", "-c", "fast",
            "-R", "-C", "-S", m.name, *sync, timeout_s=deadline - time.monotonic(),
        )  # fmt: skip

    def _start(self, m: Member, deadline: float) -> None:
        # The copied postgresql.conf includes this per-member file; cluster_name also
        # becomes a standby's application_name in pg_stat_replication.
        self._write(
            m.data_dir / "cattle_member.conf",
            f"port = {m.port}\nunix_socket_directories = '{m.dir}'\ncluster_name = '{m.name}'\n",
        )
        wait_s = max(1, int(deadline - time.monotonic()))
        try:
            self._run(
                "pg_ctl", "start", "-D", str(m.data_dir), "-l", str(m.log_file), "-w",
                "-t", str(wait_s), timeout_s=wait_s + 5,
            )  # fmt: skip
        except PostgresError as e:
            raise PostgresError(f"{m.name} did not start: {e}\n{log_tail(m.log_file)}") from e
        m.pid = self._postmaster_pid(m)

    def _wait_streaming(self, m: Member, deadline: float) -> None:
        sql = "SELECT count(*) FROM pg_stat_wal_receiver WHERE status = 'streaming'"

        def streaming() -> bool:
            with contextlib.suppress(PostgresError):
                return self.psql(sql, member=m.name) == "1"
            return False

        self._wait(streaming, m, deadline - time.monotonic(), "stream from the primary")

    def _wait(self, ready: Callable[[], bool], m: Member, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + max(timeout_s, 1)
        while not ready():
            if time.monotonic() > deadline:
                raise PostgresError(f"{m.name} did not {what} in time\n{log_tail(m.log_file)}")
            time.sleep(0.1)

    def _write(self, path: Path, text: str) -> None:
        path.write_text(text)
        if self._server_user:
            shutil.chown(path, self._server_user.pw_uid, self._server_user.pw_gid)

    def _run(self, tool: str, *args: str, as_server: bool = True, timeout_s: float = 60) -> str:
        """Run a PostgreSQL tool; server-side tools run as the server user when we are root."""
        # Inherited PG* variables (PGHOST, PGDATA, ...) would silently redirect the tools.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env |= {"PGCONNECT_TIMEOUT": "5", "LC_ALL": "C"}
        drop_root: dict[str, Any] = {}
        if as_server and (user := self._server_user):
            # Its own HOME and cwd: the server user cannot read root's (warnings, .pgpass).
            env["HOME"] = str(self.base_dir)
            drop_root = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
            drop_root["cwd"] = self.base_dir
        try:
            proc = subprocess.run(
                [self.bindir / tool, *args], capture_output=True, text=True, env=env,
                timeout=max(1, timeout_s), stdin=subprocess.DEVNULL, **drop_root,
            )  # fmt: skip
        except subprocess.TimeoutExpired as e:
            raise PostgresError(f"{tool} timed out after {e.timeout:.0f}s") from e
        if proc.returncode != 0:
            raise PostgresError(f"{tool} failed: {proc.stderr.strip()}")
        return str(proc.stdout)


def parent_pid(pid: int) -> int | None:
    stat = _proc_stat(pid)
    return int(stat[1]) if stat else None


def sql_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
