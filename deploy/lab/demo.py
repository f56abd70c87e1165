"""`make demo`: a live fleet under steady load, with its live view, for a room to watch.

Brings up a lab (3 nodes behind HAProxy with Prometheus, or on the anycast
front), starts a steady, bounded locust load in the background, prints where
everything is and the drill commands, then shows the live view. Ctrl+C (or
any error) stops the load and tears the lab down; nothing is left running.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

from rich.console import Console

from deploy.lab import cli, netns, procs, watch
from deploy.lab.cluster import REPO_ROOT, Lab, LabError, LabOptions
from deploy.lab.postgres import PostgresError, PostgresNotInstalled

DEFAULT_RUN_DIR = REPO_ROOT / "run" / "demo"
TIMING_FILE = "demo-timing.json"
LOAD_MODULE = "deploy.lab.demoload"
RATE_QUERY = "node:http_requests:rate15s"


def graph_url(prometheus_url: str, expr: str = RATE_QUERY, range_input: str = "5m") -> str:
    """Prometheus's graph page for `expr`, as a link the room can open."""
    query = urllib.parse.urlencode({"g0.expr": expr, "g0.tab": "0", "g0.range_input": range_input})
    return f"{prometheus_url}/graph?{query}"


def _start_load(lab: Lab, front: str, *, users: int, rate: float, console: Console) -> int:
    out = lab.run_dir / watch.LOAD_FILE
    argv = [sys.executable, "-m", LOAD_MODULE, "--host", front, "--users", str(users),
            "--rate-per-user", f"{rate:g}", "--duration-s", "3600", "--out", str(out)]  # fmt: skip
    plan = lab.load().get("anycast")
    if plan:
        # The VIP is reached from the client's namespace, as a client elsewhere would.
        argv = netns.exec_argv(plan["client_netns"], argv)
    pid = procs.spawn(argv, log=lab.run_dir / "load.log", cwd=REPO_ROOT)
    with console.status("starting the load (seeding notes)"):
        deadline = time.monotonic() + 60
        while not out.exists():
            if not procs.is_ours(pid, str(out)) or time.monotonic() > deadline:
                log = (lab.run_dir / "load.log").read_text(errors="replace")[-1500:]
                raise LabError(f"the load did not start ({_fate(pid)}):\n{log}")
            time.sleep(0.2)
    return pid


def _fate(pid: int) -> str:
    """What became of the load process `pid` (our child), for the error that
    says it did not start."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return f"process {pid} is gone"
    if not done:
        return f"process {pid} still runs, but has not written its counts"
    if os.WIFSIGNALED(status):
        return f"process {pid} was killed by signal {os.WTERMSIG(status)}"
    return f"process {pid} exited with status {os.waitstatus_to_exitcode(status)}"


def _stop_load(pid: int | None, lab: Lab) -> dict[str, Any]:
    """Stop the load (the one `pid` names, or one a previous demo left); its last counts."""
    out = lab.run_dir / watch.LOAD_FILE
    try:
        counts: dict[str, Any] = json.loads(out.read_text())
    except (OSError, ValueError):
        counts = {}
    for candidate in {pid, counts.get("pid")} - {None}:
        procs.stop(candidate, str(out), timeout_s=15)
    with contextlib.suppress(OSError, ValueError):
        counts = json.loads(out.read_text())
    return counts


def _where(state: dict[str, Any], lab: Lab, console: Console) -> None:
    try:
        run_dir = lab.run_dir.relative_to(Path.cwd())
    except ValueError:
        run_dir = lab.run_dir
    lab_cmd = ".venv/bin/python -m deploy.lab"
    on = f"--run-dir {run_dir}"
    lines = [
        f"[bold]front[/]        {state['front']}   (API docs: {state['front']}/docs)",
    ]
    if state.get("haproxy"):
        lines.append(f"[bold]haproxy[/]      {state['haproxy']['stats_url']}")
    if state.get("prometheus"):
        lines.append(f"[bold]prometheus[/]   {graph_url(state['prometheus']['url'])}")
    lines += [
        "[bold]live view[/]    below (Ctrl+C stops the load and tears the lab down)",
        "[bold]drills[/] (from another terminal):",
    ]
    if state.get("anycast"):
        lines += [
            f"  {lab_cmd} drain n2 {on}      graceful: its route withdrawn, then gone",
            f"  {lab_cmd} kill n3 {on}       SIGKILL: the router drops its route",
            f"  {lab_cmd} restart n3 {on}    announced again",
        ]
    else:
        lines += [
            f"  {lab_cmd} drain n2 {on}      graceful: draining, out of rotation, gone",
            f"  {lab_cmd} kill n3 {on}       SIGKILL: HAProxy routes around it",
            f"  {lab_cmd} restart n3 {on}    back in rotation",
            f"  {lab_cmd} scale 4 {on}       a fourth node joins HAProxy and Prometheus",
        ]
    if state["options"]["backend"] == "patroni":
        lines.append(f"  {lab_cmd} kill-primary {on}  the database fails over")
    for line in lines:
        console.print(line, highlight=False, soft_wrap=True)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m deploy.lab.demo", description=__doc__)
    top.add_argument("--front", choices=("haproxy", "anycast"), default="haproxy")
    top.add_argument("--backend", choices=("sqlite", "postgres", "patroni"), default="sqlite")
    top.add_argument("--nodes", type=int, default=3)
    top.add_argument("--max-nodes", type=int, default=6, help="the most `scale` may grow to")
    top.add_argument("--users", type=int, default=10, help="locust users of the steady load")
    top.add_argument("--rate", type=float, default=4.0, help="requests/s per user")
    top.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR)
    top.add_argument("--interval", type=float, default=1.0, help="live view refresh, seconds")
    top.add_argument(
        "--count", type=int, default=0, help="live view refreshes before ending (0: until Ctrl+C)"
    )
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    console = Console()
    started = time.monotonic()
    lab = Lab(args.run_dir)
    # A demo interrupted hard (its terminal closed) may have left its lab up.
    with console.status("stopping what a previous demo left running"):
        _stop_load(None, lab)
        left = lab.down()
    if left:
        console.print(f"a previous demo's lab was still up; stopped: {', '.join(left)}")
    options = LabOptions(
        nodes=args.nodes,
        max_nodes=max(args.nodes, args.max_nodes),
        backend=args.backend,
        replicas=1 if args.backend == "postgres" else 0,
        front=args.front,
        prometheus=args.front == "haproxy",
    )
    load_pid: int | None = None
    # SIGTERM or SIGHUP (a closed terminal) ends the demo like Ctrl+C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGHUP, signal.default_int_handler)
    code = 0
    try:
        state = cli.bring_up(lab, options, console)
        load_pid = _start_load(lab, state["front"], users=args.users, rate=args.rate,
                               console=console)  # fmt: skip
        _where(state, lab, console)
        to_view_s = round(time.monotonic() - started, 1)
        (lab.run_dir / TIMING_FILE).write_text(json.dumps({"seconds_to_live_view": to_view_s}))
        console.print(f"live view after {to_view_s:.1f} s")
        watch.watch(lab, interval_s=args.interval, count=args.count, console=console)
    except KeyboardInterrupt:
        pass
    except (LabError, PostgresNotInstalled, PostgresError) as exc:
        console.print(f"[red]demo: {exc}[/]")
        code = 1
    finally:
        # Ctrl+C again while tearing down would leave processes: not until done.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        console.print()
        counts = _stop_load(load_pid, lab)
        with console.status("tearing the lab down"):
            stopped = lab.down()
        if counts:
            console.print(
                f"load: {counts.get('requests', 0)} requests, {counts.get('failures', 0)} failed"
            )
        console.print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
