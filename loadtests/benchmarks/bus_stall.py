"""Benchmark: a bus peer stopped for a minute, against a node publishing 1000 messages a second.

    python -m loadtests.benchmarks.bus_stall   # ~2 min; docs/results/bus-stall.{md,json,png}

Two real nodes on the embedded SQLite default, their buses peered over
loopback: A (flood_node: a node whose bus also publishes --rate
invalidation messages a second of --key-bytes each) pinned to core 0, and B
(a plain node) on core 1. wrk, on core 1 too, reads one note from A by id
throughout, in windows of --window-s seconds:

  before    B reads every message
  stopped   B is SIGSTOPped for --stopped-s seconds (no FIN, no reads: its
            socket buffers fill, then A's queue for it)
  after     B is SIGCONTed

A's resident memory is sampled every 0.2 s. Reported: A's memory growth
while B was stopped against what the high-water mark allows
(CATTLE_BUS_HWM messages of the flood's size), the read's p50/p99 in every
window, and A's CPU. The node's ZMTP heartbeat (its PING unanswered for
CATTLE_BUS_SUSPECT_AFTER_S) closes a stopped peer's connection and frees its
queue, so a queue may be dropped before the mark is reached. With --hwm the run sets
CATTLE_BUS_HWM (a control: a mark far above what a minute of the flood
fills).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import service
from deploy.lab.postgres import free_port
from loadtests import report as reports
from loadtests.harness import wrk as wrkbench

RESULTS = reports.RESULTS / "bus-stall"
SERVER_CORE, CLIENT_CORE = 0, 1
# A message's bytes beyond its key: topic, header (node, epoch, seq, lsn, ...).
HEADER_BYTES = 300


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


class Sampler(threading.Thread):
    """A's RSS every `every_s` until stopped: (seconds since start, bytes)."""

    def __init__(self, pid: int, started: float, every_s: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid, self.started, self.every_s = pid, started, every_s
        self.samples: list[tuple[float, int]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.every_s):
            try:
                self.samples.append((time.monotonic() - self.started, rss_bytes(self.pid)))
            except (OSError, RuntimeError):
                return


def sent_invalidations(port: int) -> float:
    """The node's count of `inv` messages sent, from its /metrics."""
    status, body = wrkbench.request(port, "GET", "/metrics")
    if status != 200:
        raise SystemExit(f"/metrics answered {status}")
    name = f"{service.NAME}_bus_messages_total{{"
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in body.decode().splitlines()
        if line.startswith(name) and 'topic="inv"' in line and 'direction="sent"' in line
    )


def _note(port: int) -> str:
    status, body = wrkbench.request(
        port, "POST", "/v1/notes", json.dumps({"title": "bench", "body": "x" * 200}).encode()
    )
    if status != 201:
        raise SystemExit(f"could not create the note to read: {status} {body[:200]!r}")
    return f"/v1/notes/{json.loads(body)['id']}"


def measure(args: argparse.Namespace) -> dict[str, Any]:
    wrkbench.require_tools()
    work = Path(tempfile.mkdtemp(prefix="cattle-bus-stall-"))
    bus_a, bus_b = free_port(), free_port()
    flood = {"BENCH_FLOOD_RATE": str(args.rate), "BENCH_FLOOD_KEY_BYTES": str(args.key_bytes)}
    common = {"CATTLE_BUS": "on"} | ({"CATTLE_BUS_HWM": str(args.hwm)} if args.hwm else {})
    servers = []
    windows: list[dict[str, Any]] = []
    try:
        for name in ("a", "b"):
            (work / name).mkdir()
            wrkbench.migrate(work / name)

        def peered(me: int, peer: int) -> dict[str, str]:
            return common | {
                "CATTLE_BUS_BIND": f"tcp://127.0.0.1:{me}",
                "CATTLE_BUS_PEERS": f"tcp://127.0.0.1:{peer}",
            }

        a = wrkbench.start_node(
            "a", flood | peered(bus_a, bus_b), data_dir=work / "a", core=SERVER_CORE,
            log_dir=work, module="loadtests.benchmarks.flood_node",
        )  # fmt: skip
        servers.append(a)
        b = wrkbench.start_node(
            "b", peered(bus_b, bus_a), data_dir=work / "b", core=CLIENT_CORE, log_dir=work
        )
        servers.append(b)
        for server in servers:
            wrkbench.wait_ready(server, "/readyz")
        path = _note(a.port)
        time.sleep(2.0)  # the buses connect, B hears A's flood
        sent_before = sent_invalidations(a.port)
        started = time.monotonic()
        sampler = Sampler(a.pid, started)
        sampler.start()

        def window(phase: str) -> None:
            t0 = time.monotonic() - started
            result = wrkbench.run_wrk(
                a.url + path,
                seconds=args.window_s,
                connections=args.connections,
                client_core=CLIENT_CORE,
                server_pid=a.pid,
            )
            windows.append({"phase": phase, "t0_s": t0, "t1_s": time.monotonic() - started}
                           | result)  # fmt: skip

        window("before")
        stopped_at = time.monotonic() - started
        os.kill(b.pid, signal.SIGSTOP)
        try:
            for _ in range(max(1, round(args.stopped_s / args.window_s))):
                window("stopped")
        finally:
            os.kill(b.pid, signal.SIGCONT)
        continued_at = time.monotonic() - started
        window("after")
        sampler.done.set()
        sampler.join(timeout=5)
        sent_rate = (sent_invalidations(a.port) - sent_before) / (time.monotonic() - started)
    finally:
        for server in servers:
            if server.process is not None and server.process.poll() is None:
                os.kill(server.pid, signal.SIGCONT)
            wrkbench.stop(server)
        shutil.rmtree(work, ignore_errors=True)
    samples = sampler.samples
    at_stop = [rss for t, rss in samples if t <= stopped_at]
    during = [rss for t, rss in samples if stopped_at < t <= continued_at]
    hwm = args.hwm or 10_000  # the node's default CATTLE_BUS_HWM
    allowed = hwm * (args.key_bytes + HEADER_BYTES)
    growth = (max(during) - at_stop[-1]) if during and at_stop else None
    before = [w for w in windows if w["phase"] == "before"]
    stopped = [w for w in windows if w["phase"] == "stopped"]
    p99_before = before[0]["latency_ms"].get("p99")
    p99_stopped = max(w["latency_ms"].get("p99", 0.0) for w in stopped)
    return reports.stamped(
        reports.command_line("loadtests.benchmarks.bus_stall", args.argv),
        {
            "setup": {
                "rate_per_s": args.rate,
                "key_bytes": args.key_bytes,
                "hwm": hwm,
                "hwm_set": bool(args.hwm),
                "stopped_s": args.stopped_s,
                "window_s": args.window_s,
                "connections": args.connections,
            },
            "sent_per_s": sent_rate,
            "stopped_at_s": stopped_at,
            "continued_at_s": continued_at,
            "rss_samples": samples,
            "rss_at_stop_bytes": at_stop[-1] if at_stop else None,
            "rss_growth_stopped_bytes": growth,
            "hwm_allows_bytes": allowed,
            "within_hwm": growth is not None and growth <= allowed,
            "windows": windows,
            "p99_ms_before": p99_before,
            "p99_ms_stopped_max": p99_stopped,
            "p99_ratio_stopped_to_before": p99_stopped / p99_before if p99_before else None,
            "rps_median_stopped": statistics.median(w["rps"] for w in stopped),
            "rps_before": before[0]["rps"],
        },
    )


def markdown(report: dict[str, Any]) -> str:
    setup = report["setup"]
    growth, allowed = report["rss_growth_stopped_bytes"], report["hwm_allows_bytes"]
    mib = 2**20
    lines = [
        "# A bus peer stopped for a minute, against a node publishing "
        f"{setup['rate_per_s']:.0f} messages a second",
        "",
        reports.measured(report),
        "",
        f"**While its peer was stopped for {setup['stopped_s']:.0f} s, the publishing node grew "
        f"by {growth / mib:.1f} MiB** (resident memory; the high-water mark of "
        f"{setup['hwm']} messages of about {setup['key_bytes'] + HEADER_BYTES} bytes allows "
        f"{allowed / mib:.1f} MiB: {'within' if report['within_hwm'] else 'BEYOND'} it). "
        f"**The read's p99 was {report['p99_ms_before']:.2f} ms before and at most "
        f"{report['p99_ms_stopped_max']:.2f} ms while the peer was stopped** "
        f"({report['p99_ratio_stopped_to_before']:.2f}x); req/s {report['rps_before']:.0f} "
        f"before, median {report['rps_median_stopped']:.0f} while stopped. A sent "
        f"{report['sent_per_s']:.0f} invalidation messages a second over the run (its /metrics).",
        "",
        "![A's resident memory over the run, and the read's p99 per window](bus-stall.png)",
        "",
        "| window | phase | from s | to s | req/s | p50 ms | p99 ms | A's CPU, cores |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for i, w in enumerate(report["windows"], 1):
        lat = w["latency_ms"]
        lines.append(
            f"| {i} | {w['phase']} | {w['t0_s']:.1f} | {w['t1_s']:.1f} | {w['rps']:.0f} | "
            f"{lat.get('p50', 0):.2f} | {lat.get('p99', 0):.2f} | "
            f"{w.get('server_cpu_cores', 0):.2f} |"
        )
    lines += [
        "",
        *reports.how_measured(report),
        f"- Node A (`loadtests.benchmarks.flood_node`: the node, its bus also publishing "
        f"{setup['rate_per_s']:.0f} invalidation messages a second of one "
        f"{setup['key_bytes']}-byte key each) pinned to core {SERVER_CORE}; node B (the node "
        f"as it ships) and wrk (one thread, {setup['connections']} connections, one note "
        f"read by id from A) on core {CLIENT_CORE}. Embedded SQLite, each node its own file.",
        f"- B is SIGSTOPped after the first {setup['window_s']} s window and SIGCONTed "
        f"{setup['stopped_s']:.0f} s later. Growth: A's largest RSS while B was stopped minus "
        "its RSS just before (sampled every 0.2 s from /proc).",
        "- The bound: CATTLE_BUS_HWM messages of the flood's size "
        + ("(set for this run)." if setup["hwm_set"] else "(the default)."),
        "",
    ]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, (memory, latency) = pyplot.subplots(2, 1, figsize=(8, 6), sharex=True)
    t = [s[0] for s in report["rss_samples"]]
    memory.plot(t, [s[1] / 2**20 for s in report["rss_samples"]], label="A's RSS")
    memory.axvspan(report["stopped_at_s"], report["continued_at_s"], alpha=0.15, color="red",
                   label="B stopped")  # fmt: skip
    if report["rss_at_stop_bytes"] is not None:
        memory.axhline((report["rss_at_stop_bytes"] + report["hwm_allows_bytes"]) / 2**20,
                       linestyle="--", color="gray", label="at stop + HWM's worth")  # fmt: skip
    memory.set_ylabel("MiB")
    memory.legend(loc="upper left")
    for w in report["windows"]:
        latency.hlines(w["latency_ms"].get("p99", 0), w["t0_s"], w["t1_s"], linewidth=3)
    latency.axvspan(report["stopped_at_s"], report["continued_at_s"], alpha=0.15, color="red")
    latency.set_ylabel("read p99, ms")
    latency.set_ylim(bottom=0)
    latency.set_xlabel("seconds")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.benchmarks.bus_stall",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rate", type=float, default=1000.0, help="messages a second")
    parser.add_argument("--key-bytes", type=int, default=1000)
    parser.add_argument("--stopped-s", type=float, default=60.0)
    parser.add_argument("--window-s", type=int, default=20)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--hwm", type=int, help="set CATTLE_BUS_HWM (default: the node's)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="writes OUT.{json,md,png}")
    parser.add_argument("--render", action="store_true", help="rewrite OUT.md from OUT.json")
    parser.add_argument("--no-lock", action="store_true", help="smoke runs: skip the lock")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    args.argv = argv
    return reports.run_and_print(
        "bench_bus_stall",
        args.out,
        render_only=args.render,
        measure=lambda: measure(args),
        markdown=markdown,
        plot=plot,
        lock=not args.no_lock,
    )


if __name__ == "__main__":
    sys.exit(main())
