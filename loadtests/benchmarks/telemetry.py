"""Benchmark: what telemetry at default settings costs a CPU-bound node, as a throughput ratio.

    python -m loadtests.benchmarks.telemetry   # ~4 min; docs/results/telemetry-overhead.{md,json}

One real node process per configuration (`python -m service serve`: uvicorn,
uvloop, httptools, JSON logs to a file as a container runtime would take them),
all pinned to CPU core 0 and sharing one seeded SQLite database; wrk pinned to
core 1 drives GET /v1/notes/{id} at saturation on 127.0.0.1. Every round runs
each configuration once (rotating the order), each between two runs of
telemetry off, and divides its throughput and CPU per request by the mean of
those two: drift in the machine's speed hits both sides alike. The report
gives the median of those ratios over rounds and their range.

Configurations:
  off          CATTLE_TELEMETRY_ENABLED=false CATTLE_ACCESS_LOG=false
  default      nothing set: cattle's own middleware (service/telemetry/http.py:
               HTTP metrics, no span, as no trace export is configured),
               /metrics, the node's own JSON access line (AccessLog)
  no-access-log  default with CATTLE_ACCESS_LOG=false (splits the cost)
  spans        default, but a server span per request (10% of new traces
               recorded) for a span processor that does nothing
               (loadtests.benchmarks.stock_node): what making spans costs
  fastapi-native  spans, but spans and HTTP metrics by FastAPI's own
               OpenTelemetry support (loadtests.benchmarks.stock_node), what
               cattle used before its own middleware
  stock-access-log  spans, but the access log is uvicorn's through the
               logging module and python-json-logger
               (loadtests.benchmarks.stock_node), what cattle used before
  asgi-middleware  spans, but spans and HTTP metrics by
               opentelemetry-instrumentation-asgi's middleware
               (loadtests.benchmarks.stock_node), what cattle used before that
  otlp         default + OTEL_EXPORTER_OTLP_ENDPOINT at a live collector
               (loadtests.benchmarks.collector, on the load generator's core): 10% of
               traces recorded and exported, metrics exported every 60 s
  otlp-down    default + OTEL_EXPORTER_OTLP_ENDPOINT at a collector that accepts
               connections and never answers (export is off the request path)

With --together, each configuration runs at the same time as `off`, both
nodes on the server core, and is compared with that run: on a machine whose
speed drifts within seconds (a shared VM), the two see the same drift.

A run is valid when its repeats agree: the odd rounds and the even rounds
give the same verdict on the target.

The stock path was measured beside the hand-written one it replaced, in one
run of this benchmark at the commit that still had both:
docs/results/telemetry-stock-vs-handwritten.md; candidate hand-written parts
over the stock defaults, one by one, at commits that had them:
docs/results/telemetry-parts.md (with --together) and
docs/results/telemetry-parts-sequential.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy.lab.postgres import free_port
from loadtests import report as reports
from loadtests.harness import wrk as wrkbench
from loadtests.harness.wrk import request

RESULTS = reports.RESULTS / "telemetry-overhead"
BASELINE = "off"
TARGET_OVERHEAD = 0.10


@dataclass
class Config:
    name: str
    env: dict[str, str]
    note: str
    module: str = "service"  # the node's `python -m` module
    server: wrkbench.Server | None = None
    rounds: list[dict[str, Any]] = field(default_factory=list)


HEADLINE = "default"  # the verdict is about it
SPANS = "spans"  # the stock rows are compared with it: all of them make spans
OTLP = "otlp"
FASTAPI_NATIVE = "fastapi-native"
STOCK_ACCESS_LOG = "stock-access-log"
ASGI_MIDDLEWARE = "asgi-middleware"


def configs(collector_url: str, black_hole_url: str) -> list[Config]:
    return [
        Config(
            BASELINE,
            {"CATTLE_TELEMETRY_ENABLED": "false", "CATTLE_ACCESS_LOG": "false"},
            "telemetry and access log off",
        ),
        Config("default", {}, "defaults: no spans (no trace export set), metrics, JSON access log"),
        Config("no-access-log", {"CATTLE_ACCESS_LOG": "false"}, "defaults, access log off"),
        Config(
            SPANS,
            {"STOCK_TELEMETRY": "spans"},
            "defaults + a server span per request (10% recorded, none exported)",
            module="loadtests.benchmarks.stock_node",
        ),
        Config(
            FASTAPI_NATIVE,
            {"STOCK_TELEMETRY": "fastapi"},
            "`spans`, but spans and HTTP metrics by FastAPI's own OpenTelemetry support "
            "instead of cattle's middleware",
            module="loadtests.benchmarks.stock_node",
        ),
        Config(
            STOCK_ACCESS_LOG,
            {"STOCK_TELEMETRY": "access"},
            "`spans`, but the access log is uvicorn's through python-json-logger instead of "
            "cattle's own line",
            module="loadtests.benchmarks.stock_node",
        ),
        Config(
            ASGI_MIDDLEWARE,
            {"STOCK_TELEMETRY": "asgi"},
            "`spans`, but spans and HTTP metrics by opentelemetry-instrumentation-asgi's "
            "middleware instead of cattle's",
            module="loadtests.benchmarks.stock_node",
        ),
        Config(
            OTLP,
            {"OTEL_EXPORTER_OTLP_ENDPOINT": collector_url},
            "defaults + OTLP export to a live collector (10% of traces, metrics every 60 s)",
        ),
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


def _halves(values: list[float]) -> tuple[float | None, float | None]:
    """Medians of the odd and of the even rounds (None for a half with no round)."""
    odd, even = values[0::2], values[1::2]
    return (
        statistics.median(odd) if odd else None,
        statistics.median(even) if even else None,
    )


def judge(summary: dict[str, Any]) -> dict[str, Any]:
    """Whether the repeats agree: the same verdict on the target in odd and even rounds."""
    halves = _halves(summary[HEADLINE]["ratio_per_round"])
    verdicts = {None if half is None else 1 - half <= TARGET_OVERHEAD for half in halves}
    valid = None not in verdicts and len(verdicts) == 1
    return {"ratio_odd_rounds": halves[0], "ratio_even_rounds": halves[1], "valid": valid}


def summarize(all_configs: list[Config]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for config in all_configs:
        rps = [r["rps"] for r in config.rounds]
        # Against the baseline runs just before and after (the baseline's own
        # rounds are their median, so its ratio is 1).
        ratios = [r["rps"] / r["baseline_rps"] for r in config.rounds]
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
            # Server CPU per response: a second view of the cost, less exposed
            # to how the time slices of a shared machine fell.
            "cpu_us_per_request_median": round(
                statistics.median(cpu_us_per_request(r) for r in config.rounds), 1
            ),
            "cpu_ratio_median": round(
                statistics.median(
                    cpu_us_per_request(r) / r["baseline_cpu_us"] for r in config.rounds
                ),
                4,
            ),
        }
    return summary


def merge_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One round of the baseline from its runs: medians, and totals of counts."""
    rps = statistics.median(r["rps"] for r in runs)
    merged = {
        "rps": rps,
        "requests": sum(r["requests"] for r in runs),
        "non_2xx": sum(r["non_2xx"] for r in runs),
        "server_cpu_s": sum(r["server_cpu_s"] for r in runs),
        "latency_ms": {
            key: statistics.median(r["latency_ms"].get(key, 0) for r in runs)
            for key in ("p50", "p90", "p99")
        },
        "runs": runs,
    }
    merged["baseline_rps"] = rps
    merged["baseline_cpu_us"] = cpu_us_per_request(merged)
    return merged


def cpu_us_per_request(result: dict[str, Any]) -> float:
    return float(result["server_cpu_s"]) * 1e6 / max(int(result["requests"]), 1)


def markdown(report: dict[str, Any]) -> str:
    s = report["summary"]
    setup = report["setup"]
    cross = report["cross_check"]
    default = s[HEADLINE]
    verdict = "meets" if default["overhead_median"] <= TARGET_OVERHEAD else "MISSES"
    judged = report.get("judged") or judge(s)
    lines = [
        "# Telemetry overhead",
        "",
        reports.measured(report),
        "",
        f"**Default telemetry (`{HEADLINE}`) keeps {default['ratio_median']:.1%} of the "
        f"throughput of telemetry off (overhead {default['overhead_median']:.1%}; per-round range "
        f"{1 - default['ratio_max']:.1%} to {1 - default['ratio_min']:.1%}), which {verdict} "
        f"the target of at most {TARGET_OVERHEAD:.0%}.**",
        "",
        "| configuration | what | req/s (median) | ratio to off (median, range) "
        "| CPU µs/request | CPU ratio to off | p50 ms | p99 ms | non-2xx |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in s.items():
        lines.append(
            f"| `{name}` | {row['note']} | {row['rps_median']:.0f} | "
            f"{row['ratio_median']:.3f} ({row['ratio_min']:.3f}-{row['ratio_max']:.3f}) | "
            f"{row['cpu_us_per_request_median']:.0f} | {row['cpu_ratio_median']:.3f} | "
            f"{row['p50_ms_median']:.2f} | {row['p99_ms_median']:.2f} | {row['non_2xx']} |"
        )
    lines += [
        "",
        f"**{'Valid' if judged['valid'] else 'INVALID'} run**: `{HEADLINE}` keeps "
        f"{_share(judged['ratio_odd_rounds'])} of off's throughput in the odd rounds, "
        f"{_share(judged['ratio_even_rounds'])} in the even ones: "
        + ("the same verdict." if judged["valid"] else "not the same verdict on the target."),
    ]
    for name, what in (
        (
            SPANS,
            "Making a server span per request for a processor that exports nothing "
            "(`{}`, as every node did before spans were made only for an exporter)",
        ),
        (OTLP, "Exporting to a live collector (`{}`, what a production fleet runs)"),
    ):
        if (row := s.get(name)) is not None:
            lines += [
                "",
                f"{what.format(name)} keeps {row['ratio_median']:.1%} of the throughput of "
                f"telemetry off (overhead {row['overhead_median']:.1%}).",
            ]
    lines += [
        "",
        "Per-round throughput (req/s); within a round the configurations ran in a rotated order, "
        + ("each beside a run of `off`:" if setup.get("together") else "`off` between each two:"),
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
        *reports.how_measured(report),
        f"- One node process per configuration (`python -m service serve`: uvicorn, uvloop, "
        f"httptools, one process), all pinned to CPU core {setup['server_core']} with taskset, "
        f"sharing one SQLite database seeded with one note; logs go to a file.",
        f"- wrk pinned to core {setup['client_core']}: `wrk -t1 -c{setup['connections']} "
        f"-d{setup['seconds']}s --latency` against `GET /v1/notes/{{id}}` on 127.0.0.1, "
        f"after a {setup['warmup_seconds']} s warm-up per node.",
        f"- {setup['rounds']} rounds; every round runs each configuration once, in a rotated "
        + (
            "order, each at the same time as a run of `off`, both nodes on the server core "
            "(two wrk processes on the client core), and divides its figures by that run's: "
            "the two nodes share the core's speed at every moment, so its drift cancels (req/s "
            "are each node's half of the core); "
            if setup.get("together")
            else "order, each between two runs of `off`, and divides its figures by the mean of "
            "those two (drift of the machine's speed cancels); "
        )
        + "the table shows the median and range of those ratios over rounds. `off`'s own "
        "figures per round are the median of its runs.",
        "- CPU µs/request is the node process's CPU time (user + system, all its threads) over "
        "the responses wrk counted, per round; its ratio is taken within each round as well.",
        "- `default` is cattle's own middleware (service/telemetry/http.py) with the app's own "
        "meter provider (probes and /metrics excluded), the SQLAlchemy instrumentation's pool "
        "use, /metrics, and the node's own JSON access line (service.telemetry.http.AccessLog). "
        "No trace export is configured, so the node makes no spans (service.telemetry.core).",
        f"- `{SPANS}` is `python -m loadtests.benchmarks.stock_node` (STOCK_TELEMETRY=spans): "
        "the same node with a span processor that does nothing, so it makes a server span per "
        "request, on cattle's default sampler (parentbased_traceidratio 0.1: a tenth of the "
        "requests record a span and its SQL spans), exported nowhere.",
        f"- `{FASTAPI_NATIVE}` and `{ASGI_MIDDLEWARE}` are the same module (STOCK_TELEMETRY="
        f"fastapi or asgi): `{SPANS}` with FastAPI's own OpenTelemetry support (operation spans "
        "off) or opentelemetry-instrumentation-asgi's OpenTelemetryMiddleware (one span per "
        "request) in place of cattle's middleware, with the same providers and exclusions.",
        f"- `{STOCK_ACCESS_LOG}` is the same module with STOCK_TELEMETRY=access: `{SPANS}`, "
        "but no access line of the node's own; uvicorn's access log instead, "
        "through the logging module, the node's trace filter and python-json-logger.",
        "- `otlp` exports to `python -m loadtests.benchmarks.collector` pinned to the load "
        "generator's core: 10% of new traces are recorded with their SQL spans and exported in "
        "batches by the SDK's background thread, which runs on the node's core.",
        "- `otlp-down` points OTEL_EXPORTER_OTLP_ENDPOINT at a socket that accepts connections "
        "and never answers: exports time out in the background, the span queue fills and drops.",
        f"- Cross-checks: the `{HEADLINE}` node's own /metrics counted "
        f"{cross['counted']:.0f} requests on the route during the rounds; "
        f"wrk counted {cross['sent']} responses (wrk leaves out the requests "
        "still in flight when a run stops, up to one per connection and run). "
        + (
            f"The collector received {cross['otlp_spans_exported']} spans from the `{OTLP}` node, "
            f"which served {cross['otlp_counted']:.0f} requests on the route: "
            f"{cross['otlp_spans_exported'] / max(cross['otlp_counted'], 1):.3f} spans per "
            "request (a sampled read has a server span and its SQL spans)."
            if "otlp_spans_exported" in cross
            else ""
        ),
        f"- The machine was shared: load average {setup['loadavg_before']} before, "
        f"{setup['loadavg_after']} after. Treat differences of a few percent as noise.",
        "",
    ]
    return "\n".join(lines)


def _share(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.1%}"


def collector_stats(port: int) -> dict[str, Any]:
    status, body = request(port, "GET", "/stats")
    assert status == 200, body
    stats: dict[str, Any] = json.loads(body)
    return stats


def parser() -> argparse.ArgumentParser:
    parser = wrkbench.argument_parser(
        "python -m loadtests.benchmarks.telemetry", __doc__, seconds=4
    )
    parser.set_defaults(rounds=5)
    parser.add_argument(
        "--together",
        action="store_true",
        help="run each configuration at the same time as `off`, both on the server core",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="writes OUT.json and OUT.md")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def measure() -> dict[str, Any]:
        wrkbench.require_tools()
        return run(args, argv)

    report = reports.main(
        "bench_telemetry", args.out, render_only=args.render, measure=measure, markdown=markdown
    )
    if report is None:
        return 0
    result = report["summary"][HEADLINE]
    print(
        f"{HEADLINE}/off throughput ratio {result['ratio_median']:.3f} "
        f"(overhead {result['overhead_median']:.1%}); wrote {args.out}.md and .json"
    )
    return 0


def run_rounds(
    baseline: Config,
    measured: list[Config],
    drive: Callable[[Config], dict[str, Any]],
    *,
    rounds: int,
    together: bool,
) -> None:
    """Drive every configuration `rounds` times beside the baseline; results go to `.rounds`.

    Each round starts with the next configuration of the last one's order, so
    none always runs first. Sequential: every configuration runs between two
    runs of the baseline and is compared with their mean, so the machine's
    drift cancels. Together: each runs at the same time as a run of the
    baseline, which takes the drift out of the pair but shares the client core.
    """

    def beside_baseline(config: Config) -> dict[str, Any]:
        with ThreadPoolExecutor(2) as pool:
            mine, off = pool.submit(drive, config), pool.submit(drive, baseline)
            result, off_result = mine.result(), off.result()
        result["baseline_rps"] = off_result["rps"]
        result["baseline_cpu_us"] = cpu_us_per_request(off_result)
        config.rounds.append(result)
        return off_result

    for round_no in range(rounds):
        print(f"round {round_no + 1}", flush=True)
        shift = round_no % len(measured)
        order = measured[shift:] + measured[:shift]
        if together:
            baseline.rounds.append(merge_runs([beside_baseline(config) for config in order]))
            continue
        before = drive(baseline)
        off_runs = [before]
        for config in order:
            result = drive(config)
            after = drive(baseline)
            off_runs.append(after)
            result["baseline_rps"] = (before["rps"] + after["rps"]) / 2
            result["baseline_cpu_us"] = (cpu_us_per_request(before) + cpu_us_per_request(after)) / 2
            config.rounds.append(result)
            before = after
        baseline.rounds.append(merge_runs(off_runs))


def run(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    """Run the benchmark (without the machine lock: main takes it) and return the report."""
    run_dir = Path(tempfile.mkdtemp(prefix="cattle-bench-telemetry-"))
    data_dir = run_dir / "data"
    loadavg_before = os.getloadavg()
    collector: wrkbench.Server | None = None
    all_configs: list[Config] = []
    with black_hole() as hung_collector:
        try:
            # The live collector shares the load generator's core: its work is
            # the exporters' on the other side of the wire, not the node's.
            collector_port = free_port()
            collector = wrkbench.start(
                "collector",
                [
                    sys.executable,
                    "-m",
                    "loadtests.benchmarks.collector",
                    "--port",
                    str(collector_port),
                ],
                port=collector_port,
                env=dict(os.environ),
                core=args.client_core,
                log_dir=run_dir,
            )
            all_configs = configs(collector.url, hung_collector)
            wrkbench.migrate(data_dir)
            for config in all_configs:
                config.server = wrkbench.start_node(
                    config.name,
                    config.env,
                    data_dir=data_dir,
                    core=args.server_core,
                    log_dir=run_dir,
                    module=config.module,
                )
            wrkbench.wait_ready(collector, "/stats")
            servers = [server_of(config) for config in all_configs]
            for server in servers:
                wrkbench.wait_ready(server, "/startupz")
            note = json.dumps({"title": "bench", "body": "x" * 200}).encode()
            status, body = request(servers[0].port, "POST", "/v1/notes", note)
            assert status == 201, body
            path = f"/v1/notes/{json.loads(body)['id']}"
            for server in servers if args.warmup > 0 else []:
                wrkbench.run_wrk(
                    server.url + path,
                    seconds=args.warmup,
                    connections=args.connections,
                    client_core=args.client_core,
                )
            by_name = {config.name: config for config in all_configs}
            warm = {
                name: counted_requests(server_of(by_name[name]).port, wrkbench.NOTE_ROUTE)
                for name in (HEADLINE, OTLP)
            }
            spans_before = collector_stats(collector.port).get("/v1/traces", {}).get("spans", 0)
            baseline = by_name[BASELINE]
            measured = [config for config in all_configs if config is not baseline]

            def drive(config: Config) -> dict[str, Any]:
                server = server_of(config)
                result = wrkbench.run_wrk(
                    server.url + path,
                    seconds=args.seconds,
                    connections=args.connections,
                    client_core=args.client_core,
                    server_pid=server.pid,
                )
                print(f"{config.name:14s} {result['rps']:8.0f} req/s", flush=True)
                return result

            run_rounds(baseline, measured, drive, rounds=args.rounds, together=args.together)
            counted = {
                name: counted_requests(server_of(by_name[name]).port, wrkbench.NOTE_ROUTE)
                - warm[name]
                for name in warm
            }
            # Stopping the otlp node flushes the spans still queued in it.
            wrkbench.stop(server_of(by_name[OTLP]))
            spans = collector_stats(collector.port).get("/v1/traces", {}).get("spans", 0)
            cross_check = {
                "counted": counted[HEADLINE],
                "sent": sum(r["requests"] for r in by_name[HEADLINE].rounds),
                "otlp_counted": counted[OTLP],
                "otlp_spans_exported": spans - spans_before,
            }
        finally:
            for config in all_configs:
                if config.server is not None:
                    wrkbench.stop(config.server)
            if collector is not None:
                wrkbench.stop(collector)

    shutil.rmtree(run_dir, ignore_errors=True)
    command = reports.command_line(__spec__.name, sys.argv[1:] if argv is None else argv)
    figures = {
        "target_overhead": TARGET_OVERHEAD,
        "setup": {
            **wrkbench.setup_of(args, loadavg_before),
            "database": "SQLite (embedded)",
            "together": args.together,
        },
        "summary": (summary := summarize(all_configs)),
        "judged": judge(summary),
        "cross_check": cross_check,
        "rounds": {c.name: c.rounds for c in all_configs},
    }
    return reports.stamped(command, figures)


if __name__ == "__main__":
    sys.exit(main())
