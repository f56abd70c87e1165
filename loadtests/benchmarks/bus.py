"""Node bus benchmark: invalidation latency and bus CPU per node on a loopback full mesh.

    python -m loadtests.benchmarks.bus [--nodes 8] [--writes-per-s 200] [--seconds 60]

N processes, each one bus (service/bus/, the node's own code, no HTTP in
front), every bus subscribed to all the others over loopback TCP. After an
idle phase (heartbeats only), every process publishes `--writes-per-s`
invalidations a second, one key each, for `--seconds`. Each key carries its
publish time, so a receiver's sink measures publish (just after a commit, in
a node) to applied. Reported: the latency of every delivery (p50, p99, max),
deliveries against the ones expected, losses seen after the start-up
(gaps, restarts), and each process's CPU time in the idle and the write
phases, as a share of one core. Asyncio loop, as the nodes run it under
uvloop only through uvicorn.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtests import REPO_ROOT
from loadtests import report as reports

RESULTS = reports.RESULTS / "bus"


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtests.benchmarks.bus", description=__doc__)
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--writes-per-s", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=RESULTS, help="writes OUT.json and OUT.md")
    parser.add_argument("--render", action="store_true", help="rewrite OUT.md from OUT.json")
    parser.add_argument("--no-lock", action="store_true", help="smoke runs: skip the lock")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # JSON: one process's part
    return parser


# -- one process -----------------------------------------------------------------


class _LatencySink:
    def __init__(self) -> None:
        self.latencies_s: list[float] = []
        self.older_than = 0

    def invalidate(self, keys: Sequence[str], lsn: int | None) -> None:
        now = time.time()
        self.latencies_s.extend(now - float(key.rsplit("@", 1)[1]) for key in keys)

    def invalidate_older_than(self, lsn: int | None) -> None:
        self.older_than += 1


async def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    from service.bus import Bus
    from service.config import Settings

    settings = Settings(
        node_id=spec["node"],
        bus_bind=spec["bind"],
        bus_peers=spec["peers"],
        telemetry_enabled=False,
    )
    bus = Bus(settings, status=lambda: {"state": "ready"})
    sink = _LatencySink()
    bus.subscribe_invalidations(sink)
    await bus.start()
    loop = asyncio.get_running_loop()
    # Every process connects to every other before the common start time.
    await asyncio.sleep(max(0.0, spec["idle_at"] - time.time()))
    losses_at_start = sum(bus.losses.values())
    cpu_idle_0 = time.process_time()
    await asyncio.sleep(max(0.0, spec["writes_at"] - time.time()))
    cpu_idle_s = time.process_time() - cpu_idle_0
    cpu_0 = time.process_time()
    interval_s = 1.0 / spec["writes_per_s"]
    started = loop.time()
    sent = 0
    while (elapsed := loop.time() - started) < spec["seconds"]:
        due = int(elapsed / interval_s) + 1
        while sent < due:
            sent += 1
            bus.publish_invalidations([f"{spec['node']}:{sent}@{time.time():.6f}"], sent)
        await asyncio.sleep(max(0.0, started + sent * interval_s - loop.time()))
    cpu_writes_s = time.process_time() - cpu_0
    await asyncio.sleep(1.0)  # the last deliveries
    losses = sum(bus.losses.values()) - losses_at_start
    await bus.close(2.0)
    return {
        "node": spec["node"],
        "sent": sent,
        "latencies_ms": [round(x * 1000, 3) for x in sink.latencies_s],
        "losses_after_start": losses,
        "cpu_idle_share": cpu_idle_s / spec["idle_seconds"] if spec["idle_seconds"] else None,
        "cpu_writes_share": cpu_writes_s / spec["seconds"],
    }


# -- the run ------------------------------------------------------------------------


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from deploy.lab.postgres import free_port

    ports = [free_port() for _ in range(args.nodes)]
    start_s = 3.0 + 0.5 * args.nodes  # imports and connections of every process
    idle_at = time.time() + start_s
    writes_at = idle_at + args.idle_seconds
    procs = []
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CATTLE_", "OTEL_"))}
    env["PYTHONPATH"] = str(REPO_ROOT)
    for i, port in enumerate(ports):
        spec = {
            "node": f"b{i + 1}",
            "bind": f"tcp://127.0.0.1:{port}",
            "peers": [f"tcp://127.0.0.1:{p}" for p in ports if p != port],
            "idle_at": idle_at,
            "writes_at": writes_at,
            "idle_seconds": args.idle_seconds,
            "writes_per_s": args.writes_per_s,
            "seconds": args.seconds,
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "loadtests.benchmarks.bus", "--worker", json.dumps(spec)],
                cwd=REPO_ROOT,
                env=env,
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    results = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=start_s + args.idle_seconds + args.seconds + 60)
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:  # only the ones this run started, by their Popen
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    latencies = [x for r in results for x in r["latencies_ms"]]
    sent = sum(r["sent"] for r in results)
    figures = {
        "nodes": args.nodes,
        "writes_per_s_per_node": args.writes_per_s,
        "seconds": args.seconds,
        "idle_seconds": args.idle_seconds,
        "loop": "asyncio",
        "deliveries": len(latencies),
        "deliveries_expected": sent * (args.nodes - 1),
        "latency_ms": {
            "p50": _percentile(latencies, 0.50),
            "p99": _percentile(latencies, 0.99),
            "max": max(latencies) if latencies else None,
        },
        "losses_after_start": sum(r["losses_after_start"] for r in results),
        "cpu_share_per_node": {
            "idle": [
                round(r["cpu_idle_share"], 4) for r in results if r["cpu_idle_share"] is not None
            ],
            "writes": [round(r["cpu_writes_share"], 4) for r in results],
        },
    }
    command = reports.command_line(
        "loadtests.benchmarks.bus",
        [
            f"--nodes={args.nodes}",
            f"--writes-per-s={args.writes_per_s:g}",
            f"--seconds={args.seconds:g}",
            f"--idle-seconds={args.idle_seconds:g}",
        ],
    )
    return reports.stamped(command, figures)


def markdown(report: dict[str, Any]) -> str:
    latency = report["latency_ms"]
    cpu = report["cpu_share_per_node"]

    def share(values: list[float]) -> str:
        return f"{min(values):.1%} to {max(values):.1%}" if values else "-"

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f} ms"

    return "\n".join(
        [
            "# Node bus: invalidation latency and CPU",
            "",
            reports.measured(report),
            "",
            f"{report['nodes']} bus processes in a full mesh on loopback, each publishing "
            f"{report['writes_per_s_per_node']:g} invalidations a second for "
            f"{report['seconds']:g} s ({report['loop']} loop).",
            "",
            "| figure | value |",
            "| --- | --- |",
            f"| publish to applied, p50 | {ms(latency['p50'])} |",
            f"| publish to applied, p99 | {ms(latency['p99'])} |",
            f"| publish to applied, max | {ms(latency['max'])} |",
            f"| deliveries / expected | {report['deliveries']} / {report['deliveries_expected']} |",
            f"| losses detected after start-up | {report['losses_after_start']} |",
            f"| bus CPU per process, idle (heartbeats only) | {share(cpu['idle'])} of a core |",
            f"| bus CPU per process, writing | {share(cpu['writes'])} of a core |",
            "",
            *reports.how_measured(report),
            "Each key carries its publish time; a receiver's sink measures to the moment "
            "it applies it (one clock: all processes on one machine).",
            "",
            f"All {report['nodes']} processes share this machine: while writing they used "
            f"{sum(cpu['writes']):.2f} cores together, of its {report['machine']['cores']}. "
            "Past the machine's cores, the latency includes waiting for a CPU.",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.worker:
        print(json.dumps(asyncio.run(_worker(json.loads(args.worker)))), flush=True)
        return 0
    report = reports.main(
        "bench_bus",
        args.out,
        render_only=args.render,
        measure=lambda: measure(args),
        markdown=markdown,
        lock=not args.no_lock,
    )
    if report is not None:
        print(f"p99 {report['latency_ms']['p99']} ms; wrote {args.out}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
