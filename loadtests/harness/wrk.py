"""Shared machinery for wrk benchmarks: servers and wrk pinned to cores, parsed results.

A benchmark starts its servers (`start` each, then `wait_ready` each, so they
boot in parallel), drives one at a time with `run_wrk` and stops every server
it started with `stop`, by the PID it got, also when something failed. Every
wait is bounded. A server boots on any core (a dozen imports at once would
otherwise queue on one) and is pinned to its core, every thread of it, once
it answers, before anything is measured; wrk is pinned with taskset, which
execs it. The PID Popen reports is the server's own, so /proc/<pid>/stat is
its CPU use.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.lab.postgres import free_port
from loadtests import REPO_ROOT as REPO
from loadtests.harness import machine

CURSOR_SECRET = "bench-cursor-secret-0123456789"  # noqa: S105 (a throwaway database)
NOTE_ROUTE = "/v1/notes/{note_id}"

# Bounds on every wait: a server that has not answered by then is broken.
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
KILL_TIMEOUT_S = 5.0
# wrk stops itself after -d; this much more is for its start and exit.
WRK_MARGIN_S = 30.0


def require_tools() -> None:
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (apt-get install wrk util-linux)")


def request(
    port: int, method: str, path: str, body: bytes | None = None, timeout_s: float = 5
) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@dataclass
class Server:
    """One server process, pinned to `core` once ready; `process` is set while it runs."""

    name: str
    port: int
    log_path: Path
    core: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError(f"{self.name} is not running")
        return self.process.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start(
    name: str,
    command: list[str],
    *,
    port: int,
    env: dict[str, str],
    core: int,
    log_dir: Path,
    cwd: Path = REPO,
) -> Server:
    """Start `command` (pinned to `core` by `wait_ready`), output to LOG_DIR/NAME.log;
    does not wait."""
    server = Server(name, port, log_dir / f"{name}.log", core)
    with server.log_path.open("wb") as log:
        server.process = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return server


def uvicorn_command(app: str, port: int) -> list[str]:
    """uvicorn as the node runs it: uvloop, httptools, one process, no access log."""
    return [
        sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port),
        "--loop", "uvloop", "--http", "httptools", "--workers", "1", "--lifespan", "on",
        "--no-access-log", "--no-server-header", "--log-level", "warning",
    ]  # fmt: skip


def wait_ready(server: Server, path: str, timeout_s: float = START_TIMEOUT_S) -> None:
    """Poll GET `path` until it answers 200, then pin every thread of the server to
    its core; raise if the process exits or time runs out."""
    assert server.process is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise SystemExit(f"{server.name} exited; see {server.log_path}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            if request(server.port, "GET", path, timeout_s=2)[0] == 200:
                machine.pin_process(server.pid, {server.core})
                return
        time.sleep(0.1)
    raise SystemExit(f"{server.name} did not start in {timeout_s:.0f} s; see {server.log_path}")


def stop(server: Server) -> None:
    """SIGTERM the PID we started, SIGKILL it if it overruns; a no-op if it already exited."""
    process = server.process
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=KILL_TIMEOUT_S)


# The cattle node itself: `python -m service serve` on a migrated data dir.


def node_env(name: str, port: int, data_dir: Path, extra: dict[str, str]) -> dict[str, str]:
    """Production settings for a bench node, plus `extra` (CATTLE_*/OTEL_* overrides)."""
    # The parent's CATTLE_*/OTEL_* variables would leak into the node unseen.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CATTLE_", "OTEL_"))}
    env |= {
        "CATTLE_ENVIRONMENT": "production",
        "CATTLE_CURSOR_SECRET": CURSOR_SECRET,
        "CATTLE_DATA_DIR": str(data_dir),
        "CATTLE_HOST": "127.0.0.1",
        "CATTLE_PORT": str(port),
        "CATTLE_NODE_ID": f"bench-{name}",
        "CATTLE_DRAIN_DELAY_S": "0",
    }
    return env | extra


def start_node(
    name: str,
    extra_env: dict[str, str],
    *,
    data_dir: Path,
    core: int,
    log_dir: Path,
    module: str = "service",
) -> Server:
    """A node (`python -m service serve`, or `python -m MODULE` serving the same way)."""
    port = free_port()
    return start(
        name,
        [sys.executable, "-m", module, *(["serve"] if module == "service" else [])],
        port=port,
        env=node_env(name, port, data_dir, extra_env),
        core=core,
        log_dir=log_dir,
    )


def migrate(data_dir: Path, *, database_url: str | None = None) -> None:
    """Migrate the embedded SQLite under `data_dir`, or the database at `database_url`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CATTLE_")}
    env["CATTLE_DATA_DIR"] = str(data_dir)
    if database_url is not None:
        env["CATTLE_DATABASE_URL"] = database_url
    subprocess.run(
        [sys.executable, "-m", "service", "migrate"],
        cwd=REPO,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        timeout=START_TIMEOUT_S,
    )


# wrk


_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
_TOTAL = re.compile(r"(\d+) requests in")
_NON_2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_SOCKET_ERRORS = re.compile(r"Socket errors:.*")
_PERCENTILE = re.compile(r"^\s+(50|90|99)%\s+([\d.]+)(us|ms|s)\s*$", re.MULTILINE)
_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def parse_wrk(output: str) -> dict[str, Any]:
    rps = _RPS.search(output)
    total = _TOTAL.search(output)
    if rps is None or total is None:
        raise SystemExit(f"could not read wrk's output:\n{output}")
    non_2xx = _NON_2XX.search(output)
    socket_errors = _SOCKET_ERRORS.search(output)
    return {
        "rps": float(rps.group(1)),
        "requests": int(total.group(1)),
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
        "socket_errors": socket_errors.group(0) if socket_errors else None,
        "latency_ms": {
            f"p{p}": round(float(v) * _UNIT_MS[unit], 3)
            for p, v, unit in _PERCENTILE.findall(output)
        },
    }


def run_wrk(
    url: str,
    *,
    seconds: int,
    connections: int,
    client_core: int,
    server_pid: int | None = None,
) -> dict[str, Any]:
    """One wrk run (one thread, pinned), with the CPU it and the server used meanwhile.

    `wrk_cpu_cores` and `server_cpu_cores` are CPU-seconds per second of the
    run: 1.0 is one core kept busy throughout. `machine_busy_cores` is all the
    machine's CPUs together (from /proc/stat), so whatever else ran shows as
    the remainder.
    """
    command = [
        "taskset", "-c", str(client_core), "wrk", "-t1", f"-c{connections}",
        f"-d{seconds}s", "--latency", "--timeout", "5s", url,
    ]  # fmt: skip
    server_before = machine.cpu_seconds(server_pid) if server_pid is not None else 0.0
    busy_before, total_before = machine.machine_jiffies()
    started = time.monotonic()
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    # wait4 rather than wait: it hands back wrk's own rusage (its CPU time).
    # wrk's output is a few kB, far below a pipe's buffer, so it cannot block.
    deadline = started + seconds + WRK_MARGIN_S
    try:
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid == process.pid:
                process.returncode = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"wrk overran {seconds + WRK_MARGIN_S:.0f} s: {url}")
            time.sleep(0.02)
    finally:
        if process.returncode is None:
            process.kill()
            process.wait(timeout=KILL_TIMEOUT_S)
    wall_s = time.monotonic() - started
    busy_after, total_after = machine.machine_jiffies()
    assert process.stdout is not None
    assert process.stderr is not None
    output = process.stdout.read().decode()
    errors = process.stderr.read().decode()
    process.stdout.close()
    process.stderr.close()
    if process.returncode != 0:
        raise SystemExit(f"wrk exited {process.returncode}: {errors.strip() or output}")
    result = parse_wrk(output)
    wrk_cpu_s = usage.ru_utime + usage.ru_stime
    cores = os.cpu_count() or 1
    result |= {
        "wall_s": round(wall_s, 3),
        "wrk_cpu_s": round(wrk_cpu_s, 3),
        "wrk_cpu_cores": round(wrk_cpu_s / wall_s, 3),
        "machine_busy_cores": round(
            (busy_after - busy_before) / max(total_after - total_before, 1.0) * cores, 3
        ),
    }
    if server_pid is not None:
        server_cpu_s = machine.cpu_seconds(server_pid) - server_before
        result |= {
            "server_cpu_s": round(server_cpu_s, 3),
            "server_cpu_cores": round(server_cpu_s / wall_s, 3),
        }
    return result


def setup_of(args: argparse.Namespace, loadavg_before: tuple[float, ...]) -> dict[str, Any]:
    """What a report records of a run made with argument_parser's options."""
    return {
        "server_core": args.server_core,
        "client_core": args.client_core,
        "connections": args.connections,
        "seconds": args.seconds,
        "warmup_seconds": args.warmup,
        "rounds": args.rounds,
        "endpoint": "GET /v1/notes/{id}",
        "loadavg_before": [round(x, 2) for x in loadavg_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }


def argument_parser(prog: str, doc: str | None, *, seconds: int) -> argparse.ArgumentParser:
    """The options every wrk benchmark shares: durations, rounds, cores, output."""
    parser = argparse.ArgumentParser(
        prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=seconds, help="wrk duration per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2, help="seconds of warm-up per server")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--server-core", type=int, default=0)
    parser.add_argument("--client-core", type=int, default=1)
    parser.add_argument(
        "--render", action="store_true", help="only rewrite OUT.md from the saved OUT.json"
    )
    return parser
