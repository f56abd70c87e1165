"""Network namespaces for the anycast lab: create, run in, open sockets in, delete.

Every namespace the lab makes is named `cattle-<lab id>-<role>`, so a lab
only ever lists, enters or deletes its own, and two labs never collide.
Interfaces are created directly inside the namespaces (never in the host's),
so deleting a lab's namespaces removes every interface it made.

The lab talks to processes inside its namespaces from the host's namespace
through sockets created in them: a socket belongs to the namespace its
creating thread was in at the time, so `socket_in` enters the namespace for
one system call and returns (setns(2) on the calling thread only).
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

NETNS_DIR = Path("/run/netns")
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(RuntimeError):
    pass


def ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    """Run `ip [-n NETNS] ARGS...` (bounded); its stdout, or NetnsError on failure."""
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except subprocess.TimeoutExpired:
        raise NetnsError(f"{' '.join(argv)}: no answer in 10 s") from None
    if check and result.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: {result.stderr.strip()}")
    return result.stdout


def exec_argv(netns: str, argv: Sequence[str]) -> list[str]:
    """`argv` run inside `netns` (ip netns exec execs it: the PID stays the program's)."""
    return ["ip", "netns", "exec", netns, *argv]


def run_in(netns: str, argv: Sequence[str], *, timeout_s: float = 10) -> str:
    result = subprocess.run(
        exec_argv(netns, argv), capture_output=True, text=True, timeout=timeout_s, check=False
    )
    if result.returncode != 0:
        raise NetnsError(f"in {netns}: {' '.join(argv)}: {result.stderr.strip()}")
    return result.stdout


def add(name: str) -> None:
    ip("netns", "add", name)
    ip("link", "set", "lo", "up", netns=name)


def sysctl(netns: str, key: str, value: str) -> None:
    run_in(netns, ["sysctl", "-q", "-w", f"{key}={value}"])


def names(prefix: str) -> list[str]:
    """Namespaces whose name starts with `prefix` (the lab's own)."""
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix))


def pids(netns: str) -> list[int]:
    out = ip("netns", "pids", netns, check=False)
    return [int(word) for word in out.split() if word.isdigit()]


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")  # a zombie is gone


def delete(name: str, *, timeout_s: float = 5.0) -> None:
    """SIGKILL whatever still runs inside `name` (all the lab's own), then delete it."""
    if not (NETNS_DIR / name).exists():
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = [pid for pid in pids(name) if _alive(pid)]
        if not left:
            break
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)
        time.sleep(0.02)
    else:
        left = [pid for pid in pids(name) if _alive(pid)]
        if left:
            # Deleting the name would hide them in a nameless namespace.
            raise NetnsError(f"{name}: pids {left} still running after SIGKILL; kept the name")
    ip("netns", "delete", name, check=False)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns: {os.strerror(errno)}")


@contextlib.contextmanager
def entered(netns: str) -> Iterator[None]:
    """The calling thread inside `netns` for the block, back in its own after it."""
    with open("/proc/thread-self/ns/net") as own, open(NETNS_DIR / netns) as target:
        _setns(target.fileno())
        try:
            yield
        finally:
            _setns(own.fileno())


def socket_in(netns: str, family: int = socket.AF_INET) -> socket.socket:
    """A TCP socket that lives in `netns` (usable from any thread afterwards)."""
    with entered(netns):
        return socket.socket(family, socket.SOCK_STREAM)


class HTTPConnection(http.client.HTTPConnection):
    """http.client's connection, its socket made inside a network namespace."""

    def __init__(self, netns: str, host: str, port: int, *, timeout: float = 2.0) -> None:
        super().__init__(host, port, timeout=timeout)
        self.netns = netns

    def connect(self) -> None:
        sock = socket_in(self.netns)
        try:
            sock.settimeout(self.timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.connect((self.host, self.port))
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def http_get(
    netns: str, host: str, port: int, path: str, *, timeout_s: float = 1.0
) -> tuple[int, bytes]:
    """One GET on a fresh connection from inside `netns`: (status, body)."""
    connection = HTTPConnection(netns, host, port, timeout=timeout_s)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()
