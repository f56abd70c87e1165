"""Benchmark: what telemetry at default settings costs a CPU-bound node, as a throughput ratio.

    python -m loadtests.bench_telemetry   # ~2.5 min; docs/results/telemetry-overhead.{md,json}

One real node process per configuration (`python -m service serve`: uvicorn,
uvloop, httptools, JSON logs to a file as a container runtime would take them),
all pinned to CPU core 0 and sharing one seeded SQLite database; wrk pinned to
core 1 drives GET /v1/notes/{id} at saturation on 127.0.0.1. Rounds alternate
the configurations (rotating the order) so drift in the machine's load hits
them alike; each round's throughput is divided by the telemetry-off figure of
the same round, and the report gives the median of those ratios and their range.

Configurations:
  off          CATTLE_TELEMETRY_ENABLED=false CATTLE_ACCESS_LOG=false
  default      nothing set: traces (parentbased_traceidratio 0.1, no exporter),
               metrics (/metrics), JSON access log
  no-access-log  default with CATTLE_ACCESS_LOG=false (splits the cost)
  otlp-down    default + OTEL_EXPORTER_OTLP_ENDPOINT at a collector that accepts
               connections and never answers (export is off the request path)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loadtests import machine, wrkbench
from loadtests.wrkbench import request

RESULTS = wrkbench.REPO / "docs" / "results" / "telemetry-overhead"
BASELINE = "off"
TARGET_OVERHEAD = 0.15


@dataclass
class Config:
    name: str
    env: dict[str, str]
    note: str
    server: wrkbench.Server | None = None
    rounds: list[dict[str, Any]] = field(default_factory=list)


def configs(black_hole_url: str) -> list[Config]:
    return [
        Config(
            BASELINE,
            {"CATTLE_TELEMETRY_ENABLED": "false", "CATTLE_ACCESS_LOG": "false"},
            "telemetry and access log off",
        ),
        Config("default", {}, "defaults: sampled traces (10%), metrics, JSON access log"),
        Config("no-access-log", {"CATTLE_ACCESS_LOG": "false"}, "defaults, access log off"),
        Config(
            "otlp-down",
            {"OTEL_EXPORTER_OTLP_ENDPOINT": black_hole_url},
            "defaults + OTLP export to a collector that never answers",
        ),
    ]


@contextlib.contextmanager
def black_hole() -> Iterator[str]:
    """A listener that completes TCP handshakes and never reads: a hung collector."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1024)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


def server_of(config: Config) -> wrkbench.Server:
    assert config.server is not None, f"{config.name} was not started"
    return config.server


def counted_requests(port: int, route: str) -> float:
    """What the node's own /metrics says it served on `route` (a cross-check of wrk)."""
    from prometheus_client.parser import text_string_to_metric_families

    status, body = request(port, "GET", "/metrics")
    assert status == 200
    total = 0.0
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if (
                sample.name == "http_server_request_duration_seconds_count"
                and sample.labels.get("http_route") == route
            ):
                total += sample.value
    return total


def summarize(all_configs: list[Config]) -> dict[str, Any]:
    baseline = next(c for c in all_configs if c.name == BASELINE)
    summary: dict[str, Any] = {}
    for config in all_configs:
        rps = [r["rps"] for r in config.rounds]
        ratios = [r["rps"] / b["rps"] for r, b in zip(config.rounds, baseline.rounds, strict=True)]
        median_ratio = statistics.median(ratios)
        summary[config.name] = {
            "note": config.note,
            "env": config.env,
            "rps_per_round": rps,
            "rps_median": round(statistics.median(rps), 1),
            "ratio_per_round": [round(r, 4) for r in ratios],
            "ratio_median": round(median_ratio, 4),
            "ratio_min": round(min(ratios), 4),
            "ratio_max": round(max(ratios), 4),
            "overhead_median": round(1 - median_ratio, 4),
            "p50_ms_median": statistics.median(
                r["latency_ms"].get("p50", 0) for r in config.rounds
            ),
            "p99_ms_median": statistics.median(
                r["latency_ms"].get("p99", 0) for r in config.rounds
            ),
            "non_2xx": sum(r["non_2xx"] for r in config.rounds),
        }
    return summary


def markdown(report: dict[str, Any]) -> str:
    s = report["summary"]
    setup = report["setup"]
    default = s["default"]
    verdict = "meets" if default["overhead_median"] <= TARGET_OVERHEAD else "MISSES"
    lines = [
        "# Telemetry overhead",
        "",
        f"Measured {report['measured_at']} on {setup['cpu']} ({setup['cpus']} CPUs), "
        f"Python {setup['python']}, commit {report.get('commit') or 'uncommitted'}.",
        "",
        f"**Default telemetry keeps {default['ratio_median']:.1%} of the throughput of telemetry "
        f"off (overhead {default['overhead_median']:.1%}; per-round range "
        f"{1 - default['ratio_max']:.1%} to {1 - default['ratio_min']:.1%}), which {verdict} "
        f"the target of at most {TARGET_OVERHEAD:.0%}.**",
        "",
        "| configuration | what | req/s (median) | ratio to off (median, range) "
        "| p50 ms | p99 ms | non-2xx |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for name, row in s.items():
        lines.append(
            f"| `{name}` | {row['note']} | {row['rps_median']:.0f} | "
            f"{row['ratio_median']:.3f} ({row['ratio_min']:.3f}-{row['ratio_max']:.3f}) | "
            f"{row['p50_ms_median']:.2f} | {row['p99_ms_median']:.2f} | {row['non_2xx']} |"
        )
    lines += [
        "",
        "Per-round throughput (req/s); within a round the configurations ran in a rotated order:",
        "",
        "| round | " + " | ".join(f"`{n}`" for n in s) + " |",
        "| --- | " + " | ".join("---:" for _ in s) + " |",
    ]
    for i in range(setup["rounds"]):
        lines.append(
            f"| {i + 1} | "
            + " | ".join(f"{row['rps_per_round'][i]:.0f}" for row in s.values())
            + " |"
        )
    lines += [
        "",
        "## How it was measured",
        "",
        "```",
        report["command"],
        "```",
        "",
        f"- One node process per configuration (`python -m service serve`: uvicorn, uvloop, "
        f"httptools, one process), all pinned to CPU core {setup['server_core']} with taskset, "
        f"sharing one SQLite database seeded with one note; logs go to a file.",
        f"- wrk pinned to core {setup['client_core']}: `wrk -t1 -c{setup['connections']} "
        f"-d{setup['seconds']}s --latency` against `GET /v1/notes/{{id}}` on 127.0.0.1, "
        f"after a {setup['warmup_seconds']} s warm-up per node.",
        f"- {setup['rounds']} rounds; every round runs each configuration once, in a rotated "
        "order. A configuration's ratio is computed within each round against the `off` run of "
        "the same round; the table shows the median and range of those ratios.",
        "- `default` samples 10% of new traces (parentbased_traceidratio) and, with no OTLP "
        "endpoint set, exports nothing; it serves /metrics and writes one JSON access-log line "
        "per request.",
        "- `otlp-down` points OTEL_EXPORTER_OTLP_ENDPOINT at a socket that accepts connections "
        "and never answers: exports time out in the background, the span queue fills and drops.",
        f"- Cross-check: the `default` node's own /metrics counted "
        f"{report['cross_check']['counted']:.0f} requests on the route during the rounds; "
        f"wrk counted {report['cross_check']['sent']} responses (wrk leaves out the requests "
        "still in flight when a run stops, up to one per connection and run).",
        f"- The machine was shared: load average {setup['loadavg_before']} before, "
        f"{setup['loadavg_after']} after. Treat differences of a few percent as noise.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = wrkbench.argument_parser("python -m loadtests.bench_telemetry", __doc__, seconds=8)
    parser.add_argument("--out", type=Path, default=RESULTS, help="writes OUT.json and OUT.md")
    args = parser.parse_args(argv)
    if args.render is not None:
        args.out.with_suffix(".md").write_text(markdown(json.loads(args.render.read_text())))
        return 0
    wrkbench.require_tools()

    run_dir = Path(tempfile.mkdtemp(prefix="cattle-bench-telemetry-"))
    data_dir = run_dir / "data"
    loadavg_before = os.getloadavg()
    with black_hole() as hung_collector:
        all_configs = configs(hung_collector)
        try:
            wrkbench.migrate(data_dir)
            for config in all_configs:
                config.server = wrkbench.start_node(
                    config.name,
                    config.env,
                    data_dir=data_dir,
                    core=args.server_core,
                    log_dir=run_dir,
                )
            servers = [server_of(config) for config in all_configs]
            for server in servers:
                wrkbench.wait_ready(server, "/startupz")
            note = json.dumps({"title": "bench", "body": "x" * 200}).encode()
            status, body = request(servers[0].port, "POST", "/v1/notes", note)
            assert status == 201, body
            path = f"/v1/notes/{json.loads(body)['id']}"
            for server in servers:
                wrkbench.run_wrk(
                    server.url + path,
                    seconds=args.warmup,
                    connections=args.connections,
                    client_core=args.client_core,
                )
            default = all_configs[1]
            warm = counted_requests(server_of(default).port, wrkbench.NOTE_ROUTE)
            for round_no in range(args.rounds):
                shift = round_no % len(all_configs)
                for config in all_configs[shift:] + all_configs[:shift]:
                    server = server_of(config)
                    result = wrkbench.run_wrk(
                        server.url + path,
                        seconds=args.seconds,
                        connections=args.connections,
                        client_core=args.client_core,
                        server_pid=server.pid,
                    )
                    config.rounds.append(result)
                    print(
                        f"round {round_no + 1} {config.name:14s} {result['rps']:8.0f} req/s",
                        flush=True,
                    )
            cross_check = {
                "counted": counted_requests(server_of(default).port, wrkbench.NOTE_ROUTE) - warm,
                "sent": sum(r["requests"] for r in default.rounds),
            }
        finally:
            for config in all_configs:
                if config.server is not None:
                    wrkbench.stop(config.server)

    facts = machine.describe()
    report: dict[str, Any] = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": wrkbench.git_commit(),
        "command": " ".join(["python -m loadtests.bench_telemetry", *(argv or sys.argv[1:])]),
        "target_overhead": TARGET_OVERHEAD,
        "setup": {
            "cpu": facts["cpu"],
            "cpus": facts["cores"],
            "python": facts["python"],
            "server_core": args.server_core,
            "client_core": args.client_core,
            "connections": args.connections,
            "seconds": args.seconds,
            "warmup_seconds": args.warmup,
            "rounds": args.rounds,
            "endpoint": "GET /v1/notes/{id}",
            "database": "SQLite (embedded)",
            "loadavg_before": [round(x, 2) for x in loadavg_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
        "summary": summarize(all_configs),
        "cross_check": cross_check,
        "rounds": {c.name: c.rounds for c in all_configs},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    result = report["summary"]["default"]
    print(
        f"default/off throughput ratio {result['ratio_median']:.3f} "
        f"(overhead {result['overhead_median']:.1%}); wrote {args.out}.md and .json"
    )
    shutil.rmtree(run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
