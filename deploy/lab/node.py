"""Run one cattle node as a real process on loopback: start, probe, signal, stop.

Used by the lifecycle tests and the lab. A node is `python -m service` with
an environment of CATTLE_* variables, its stdout and stderr in one log file,
and a free loopback port. Everything it does to the process goes through the
Popen it started (never a name lookup), so it can only ever signal its own
child, and every wait is bounded.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from deploy.lab.postgres import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
_PORT_ATTEMPTS = 3  # free_port() can race with another process taking the port


class NodeError(RuntimeError):
    """A node did not start, or did not stop, in time."""


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]  # lower-cased names
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


class Node:
    """One service process. Use as a context manager, or call stop() yourself."""

    def __init__(
        self,
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        name: str = "node",
        host: str = "127.0.0.1",
        port: int | None = None,
        python: str = sys.executable,
        cwd: Path = REPO_ROOT,
    ) -> None:
        self.log_path = Path(log_path)
        self.name = name
        self.host = host
        self._fixed_port = port
        self.port = port or 0
        self.python = python
        self.cwd = cwd
        self.env = dict(env or {})
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    # -- process -------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout_s: float = 30.0) -> Node:
        """Start the process and wait until /startupz says 200 (at most `timeout_s`)."""
        if self._proc is not None:
            raise NodeError(f"{self.name} was already started (pid {self._proc.pid})")
        deadline = time.monotonic() + timeout_s
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            self.port = self._fixed_port or free_port(self.host)
            self._spawn()
            try:
                self._wait_started(deadline)
                return self
            except NodeError:
                port_taken = "address already in use" in self.log_text().lower()
                if self._fixed_port or not port_taken or attempt == _PORT_ATTEMPTS:
                    self.kill()
                    raise
                self.kill()
                self._proc = None
        raise AssertionError("unreachable")

    def _spawn(self) -> None:
        # The parent's CATTLE_* variables would leak into the node unseen.
        env = {k: v for k, v in os.environ.items() if not k.startswith("CATTLE_")}
        env |= {
            "PYTHONUNBUFFERED": "1",  # log lines reach the file as they happen
            "CATTLE_HOST": self.host,
            "CATTLE_PORT": str(self.port),
            "CATTLE_NODE_ID": self.name,
        }
        env |= self.env
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self._log.write(f"--- {self.name}: starting on {self.host}:{self.port}\n".encode())
        self._log.flush()
        self._proc = subprocess.Popen(
            [self.python, "-m", "service"],
            cwd=self.cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # Its own session: a Ctrl+C at the terminal reaches the test
            # runner, which stops the node through its PID, in order.
            start_new_session=True,
        )

    def _wait_started(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if not self.alive:
                raise NodeError(
                    f"{self.name} exited with {self.returncode} while starting\n{self.log_tail()}"
                )
            with contextlib.suppress(OSError, http.client.HTTPException):
                if self.get("/startupz", timeout_s=1.0).status == 200:
                    return
            time.sleep(0.05)
        raise NodeError(f"{self.name} did not start in time\n{self.log_tail()}")

    def send_signal(self, sig: int) -> None:
        if self.alive:
            assert self._proc is not None
            self._proc.send_signal(sig)

    def wait(self, timeout_s: float) -> int | None:
        """The exit status, or None if the process is still running after `timeout_s`."""
        if self._proc is None:
            return None
        try:
            return self._proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM (the drain), wait up to `timeout_s`, then SIGKILL. Returns the exit status."""
        if self._proc is None:
            return None
        self.send_signal(signal.SIGTERM)
        code = self.wait(timeout_s)
        if code is None:
            self.kill()
            code = self.returncode
        self._close_log()
        return code

    def kill(self) -> None:
        if self._proc is None:
            return
        if self.alive:
            self._proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=10)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None and self.returncode is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Node:
        if self._proc is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    # -- talking to it -------------------------------------------------------

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def get(
        self, path: str, *, timeout_s: float = 2.0, headers: Mapping[str, str] | None = None
    ) -> Reply:
        return self.request("GET", path, timeout_s=timeout_s, headers=headers)

    def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout_s: float = 2.0,
    ) -> Reply:
        """One request on a fresh connection (raises OSError if the node does not answer)."""
        connection = http.client.HTTPConnection(self.host, self.port, timeout=timeout_s)
        try:
            connection.request(method, path, body=body, headers=dict(headers or {}))
            response = connection.getresponse()
            return Reply(
                response.status,
                {k.lower(): v for k, v in response.getheaders()},
                response.read(),
            )
        finally:
            connection.close()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])
