"""HAProxy for the lab: render the config, run it, read its view of the servers."""

from __future__ import annotations

import contextlib
import csv
import io
import shutil
import socket
import subprocess
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

from deploy.lab import procs
from deploy.lab.render import render

# Requests one client address may send in 10 s before HAProxy answers 429.
# The lab's load generator is one address for all its simulated users, so the
# lab's limit sits far above any rate it can send; tests that show the limit
# set a low one (LabOptions.rate_limit_per_10s).
DEFAULT_RATE_LIMIT_PER_10S = 1_000_000


class HAProxyError(RuntimeError):
    pass


def find_haproxy() -> str:
    binary = shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None
    )
    if binary is None:
        raise HAProxyError(
            "haproxy is not installed: apt-get install haproxy (or use --front none)"
        )
    return binary


@dataclass(frozen=True)
class Server:
    name: str
    host: str
    port: int
    agent_port: int


def server_lines(servers: list[Server], *, agent: bool = True) -> str:
    lines = []
    for s in servers:
        line = f"    server {s.name} {s.host}:{s.port} check weight 100"
        if agent and s.agent_port:
            line += f" agent-check agent-port {s.agent_port}"
        lines.append(line)
    return "\n".join(lines)


def write_config(
    run_dir: Path,
    servers: list[Server],
    *,
    front_port: int,
    stats_port: int,
    metrics_port: int,
    front_host: str = "127.0.0.1",
    retries: bool = True,
    observe: bool = True,
    balance: str = "leastconn",
    rate_limit_per_10s: int = DEFAULT_RATE_LIMIT_PER_10S,
) -> Path:
    text = render(
        "haproxy/haproxy.cfg.tmpl",
        run_dir=run_dir,
        front_host=front_host,
        front_port=front_port,
        stats_port=stats_port,
        metrics_port=metrics_port,
        balance=balance,
        rate_limit_per_10s=rate_limit_per_10s,
        servers=server_lines(servers),
    )
    if not retries:
        # The unprotected case, for experiments that show what retries buy.
        text = text.replace("    retries 3\n", "    retries 0\n").replace(
            "    retry-on conn-failure empty-response response-timeout 503\n",
            "    retry-on none\n",
        )
    if not observe:
        # The unprotected case: only the health checks take a dead server out.
        text = text.replace(
            "    default-server observe layer4 error-limit 1 on-error mark-down\n", ""
        )
    path = run_dir / "haproxy.cfg"
    path.write_text(text)
    check = subprocess.run(
        [find_haproxy(), "-c", "-q", "-f", str(path)], capture_output=True, text=True, check=False
    )
    if check.returncode != 0:
        raise HAProxyError(f"HAProxy rejected {path}:\n{check.stdout}{check.stderr}")
    return path


def start(config: Path, log: Path, *, front: tuple[str, int], timeout_s: float = 10) -> int:
    pid = procs.spawn([find_haproxy(), "-db", "-f", str(config)], log=log)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not procs.is_ours(pid, str(config)):
            raise HAProxyError(f"haproxy exited at start; see {log}")
        try:
            with socket.create_connection(front, timeout=0.2):
                return pid
        except OSError:
            time.sleep(0.05)
    procs.stop(pid, str(config), timeout_s=2)
    raise HAProxyError(f"haproxy did not listen on {front[0]}:{front[1]} in {timeout_s:.0f} s")


def admin(socket_path: Path, command: str, timeout_s: float = 2.0) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(str(socket_path))
        sock.sendall(command.encode() + b"\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


def server_states(socket_path: Path) -> dict[str, dict[str, str]]:
    """HAProxy's view of each server of the `nodes` backend: status, weight, sessions..."""
    raw = admin(socket_path, "show stat")
    rows = csv.DictReader(io.StringIO(raw.lstrip("# ")))
    return {
        row["svname"]: row
        for row in rows
        if row.get("pxname") == "nodes" and row.get("svname") not in ("FRONTEND", "BACKEND")
    }


# Statuses of a server that gets no new requests.
OUT_OF_ROTATION = ("DOWN", "DRAIN", "MAINT", "NOLB")


def seconds_until_out(socket_path: Path, name: str, timeout_s: float = 5.0) -> float | None:
    """Seconds from now until HAProxy stops giving `name` new requests; None past the bound."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        with contextlib.suppress(OSError):
            status = server_states(socket_path).get(name, {}).get("status", "")
            if status.startswith(OUT_OF_ROTATION):
                return time.monotonic() - started
        time.sleep(0.01)
    return None


def wait_servers(socket_path: Path, names: list[str], status: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    seen: dict[str, str] = {}
    while time.monotonic() < deadline:
        try:
            states = server_states(socket_path)
        except OSError:
            states = {}
        seen = {n: states.get(n, {}).get("status", "?") for n in names}
        if all(s.startswith(status) for s in seen.values()):
            return
        time.sleep(0.1)
    raise HAProxyError(f"servers not {status} after {timeout_s:.0f} s: {seen}")


def serve_only(socket_path: Path, serving: Collection[str], names: Iterable[str]) -> None:
    """Exactly `serving` of the `nodes` backend in rotation, the rest of `names` in MAINT.

    A server taken out has its agent check disabled first: the node's agent
    answers `ready`, which would cancel a MAINT set here. A server put back
    is made ready and its agent asked again.
    """
    for name in names:
        if name in serving:
            _admin_ok(socket_path, f"set server nodes/{name} state ready")
            _admin_ok(socket_path, f"enable agent nodes/{name}")
        else:
            _admin_ok(socket_path, f"disable agent nodes/{name}")
            _admin_ok(socket_path, f"set server nodes/{name} state maint")


def _default_server_options(config: Path) -> str:
    """The `default-server` options of the rendered config, as one server line's tail.

    A server added at run time inherits none of them (HAProxy applies
    `default-server` when it reads the file), so `add_server` spells them out:
    an added node is checked, observed and weighted exactly like the first ones.
    """
    options = [
        line.split(None, 1)[1]
        for line in config.read_text().splitlines()
        if line.strip().startswith("default-server ")
    ]
    return " ".join(options)


def _admin_ok(socket_path: Path, command: str) -> str:
    answer = admin(socket_path, command).strip()
    if answer and not answer.startswith("New server registered") and "deleted" not in answer:
        raise HAProxyError(f"haproxy refused {command!r}: {answer}")
    return answer


def add_server(socket_path: Path, config: Path, server: Server) -> None:
    """Put a new server into the running `nodes` backend (runtime API, no reload)."""
    name = f"nodes/{server.name}"
    line = f"add server {name} {server.host}:{server.port} {_default_server_options(config)}"
    line += " check weight 100"
    if server.agent_port:
        line += f" agent-check agent-port {server.agent_port}"
    _admin_ok(socket_path, line)
    # An added server starts in maintenance with its checks off.
    if server.agent_port:
        _admin_ok(socket_path, f"enable agent {name}")
    _admin_ok(socket_path, f"enable health {name}")
    _admin_ok(socket_path, f"enable server {name}")


def remove_server(socket_path: Path, name: str, timeout_s: float = 10.0) -> None:
    """Take a server out of the running backend for good: maintenance, then delete
    once its last connection has closed (bounded)."""
    _admin_ok(socket_path, f"disable server nodes/{name}")
    deadline = time.monotonic() + timeout_s
    answer = ""
    while time.monotonic() < deadline:
        answer = admin(socket_path, f"del server nodes/{name}").strip()
        if "deleted" in answer.lower():
            return
        time.sleep(0.1)
    raise HAProxyError(f"haproxy kept server {name} for {timeout_s:.0f} s: {answer}")
