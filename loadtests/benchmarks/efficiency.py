"""Benchmark: req/s per core of cattle's read endpoint vs bare FastAPI, Starlette and raw ASGI.

    python -m loadtests.benchmarks.efficiency   # ~2 min; docs/results/efficiency.{md,json}

Five servers, each one uvicorn process as the node runs it (uvloop, httptools,
one worker, uvicorn's access log off), all pinned to CPU core 0; wrk pinned to
core 1 drives GET /v1/notes/{id} of one existing note at saturation on
127.0.0.1, one server at a time, same connections and duration for all.
Rounds alternate the configurations (rotating the order) so drift in the
machine's load hits them alike; ratios are computed within each round and the
report gives their median and range.

Configurations:
  cattle                the real node (`python -m service serve`, production
                        settings, SQLite), defaults: telemetry on, access log on
  cattle-telemetry-off  the same with CATTLE_TELEMETRY_ENABLED=false and
                        CATTLE_ACCESS_LOG=false (for reference)
  fastapi               bare FastAPI, in-memory: the same route and JSON through
                        a pydantic response model, from a dict (no database)
  starlette             bare Starlette: JSONResponse from a dict
  raw-asgi              a hand-written ASGI callable sending the same JSON bytes

Each wrk run also records the CPU the server process used (/proc/<pid>/stat)
and wrk's own (its rusage): a server near 1.0 core was saturated, and wrk well
below 1.0 core was not the bottleneck. Takes the machine-wide experiment lock
(loadtests.harness.lock), so it waits for any other experiment to finish first.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtests import report as reports
from loadtests.benchmarks import baselines
from loadtests.harness import wrk as wrkbench
from loadtests.harness.wrk import request

RESULTS = reports.RESULTS / "efficiency"
REFERENCE = "raw-asgi"
CATTLE = "cattle"
FASTAPI = "fastapi"
# A server using at least this much of its core was saturated; a client
# using this much of its own may have been the limit instead.
SATURATED_CORES = 0.9
CLIENT_LIMIT_CORES = 0.9
PACKAGES = ("uvicorn", "uvloop", "httptools", "fastapi", "starlette", "pydantic", "sqlalchemy")


@dataclass
class Config:
    name: str
    what: str
    node_env: dict[str, str] | None = None  # a cattle node with these overrides
    app: str | None = None  # or a baseline app for uvicorn
    server: wrkbench.Server | None = None
    rounds: list[dict[str, Any]] = field(default_factory=list)

    @property
    def running(self) -> wrkbench.Server:
        assert self.server is not None, f"{self.name} was not started"
        return self.server


def configs() -> list[Config]:
    return [
        Config(CATTLE, "the real node, defaults: telemetry on, JSON access log", node_env={}),
        Config(
            "cattle-telemetry-off",
            "the real node, telemetry and access log off",
            node_env={"CATTLE_TELEMETRY_ENABLED": "false", "CATTLE_ACCESS_LOG": "false"},
        ),
        Config(
            FASTAPI,
            "bare FastAPI, in-memory: pydantic response model, no database",
            app=baselines.APPS["fastapi"],
        ),
        Config(
            "starlette",
            "bare Starlette, in-memory: JSONResponse from a dict",
            app=baselines.APPS["starlette"],
        ),
        Config(
            REFERENCE,
            "raw ASGI callable: pre-encoded JSON bytes",
            app=baselines.APPS["raw-asgi"],
        ),
    ]


def parser() -> argparse.ArgumentParser:
    parser = wrkbench.argument_parser(
        "python -m loadtests.benchmarks.efficiency", __doc__, seconds=6
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="writes OUT.json and OUT.md")
    return parser


def baseline_env(note_json: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CATTLE_", "OTEL_"))}
    return env | {baselines.NOTE_ENV: note_json}


def start_all(
    all_configs: list[Config], args: argparse.Namespace, data_dir: Path, run_dir: Path
) -> str:
    """Start every server (the nodes first: they create the note); return the note's path."""
    nodes = [c for c in all_configs if c.node_env is not None]
    for config in nodes:
        assert config.node_env is not None
        config.server = wrkbench.start_node(
            config.name, config.node_env, data_dir=data_dir, core=args.server_core, log_dir=run_dir
        )
    for config in nodes:
        wrkbench.wait_ready(config.running, "/startupz")
    note = json.dumps({"title": "bench", "body": "x" * 200}).encode()
    status, body = request(nodes[0].running.port, "POST", "/v1/notes", note)
    assert status == 201, body
    path = f"/v1/notes/{json.loads(body)['id']}"
    status, body = request(nodes[0].running.port, "GET", path)
    assert status == 200, body
    # The baselines serve the very note cattle stored, so every body is the same JSON.
    env = baseline_env(body.decode())
    for config in all_configs:
        if config.app is not None:
            port = wrkbench.free_port()
            config.server = wrkbench.start(
                config.name,
                wrkbench.uvicorn_command(config.app, port),
                port=port,
                env=env,
                core=args.server_core,
                log_dir=run_dir,
            )
    for config in all_configs:
        if config.app is not None:
            wrkbench.wait_ready(config.running, path)
    return path


def check_same_body(all_configs: list[Config], path: str) -> dict[str, int]:
    """Every server answers the path 200 with the same JSON; returns body sizes."""
    sizes: dict[str, int] = {}
    expected: Any = None
    for config in all_configs:
        status, body = request(config.running.port, "GET", path)
        if status != 200:
            raise SystemExit(f"{config.name} answered {status} on {path}: {body!r}")
        parsed = json.loads(body)
        if expected is None:
            expected = parsed
        elif parsed != expected:
            raise SystemExit(f"{config.name} serves other JSON: {parsed} vs {expected}")
        sizes[config.name] = len(body)
    return sizes


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark (without the machine lock: main takes it) and return the report."""
    wrkbench.require_tools()
    all_configs = configs()
    run_dir = Path(tempfile.mkdtemp(prefix="cattle-bench-efficiency-"))
    data_dir = run_dir / "data"
    loadavg_before = os.getloadavg()
    try:
        wrkbench.migrate(data_dir)
        path = start_all(all_configs, args, data_dir, run_dir)
        body_bytes = check_same_body(all_configs, path)
        if args.warmup > 0:
            for config in all_configs:
                wrkbench.run_wrk(
                    config.running.url + path,
                    seconds=args.warmup,
                    connections=args.connections,
                    client_core=args.client_core,
                )
        for round_no in range(args.rounds):
            shift = round_no % len(all_configs)
            for config in all_configs[shift:] + all_configs[:shift]:
                result = wrkbench.run_wrk(
                    config.running.url + path,
                    seconds=args.seconds,
                    connections=args.connections,
                    client_core=args.client_core,
                    server_pid=config.running.pid,
                )
                config.rounds.append(result)
                print(
                    f"round {round_no + 1} {config.name:21s} {result['rps']:8.0f} req/s  "
                    f"server {result['server_cpu_cores']:.2f} cores  "
                    f"wrk {result['wrk_cpu_cores']:.2f} cores",
                    flush=True,
                )
    finally:
        for config in all_configs:
            if config.server is not None:
                wrkbench.stop(config.server)
    shutil.rmtree(run_dir, ignore_errors=True)

    figures = {
        "versions": {name: _version(name) for name in PACKAGES},
        "setup": {
            **wrkbench.setup_of(args, loadavg_before),
            "body_bytes": body_bytes,
            "cattle_database": "SQLite (embedded)",
        },
        "thresholds": {
            "saturated_cores": SATURATED_CORES,
            "client_limit_cores": CLIENT_LIMIT_CORES,
        },
        "summary": summarize(all_configs),
        "pairs": pairs(all_configs),
        "rounds": {c.name: c.rounds for c in all_configs},
    }
    return reports.stamped(command(args), figures)


def command(args: argparse.Namespace) -> str:
    """The command line that repeats this run: the options that differ from the defaults."""
    words = ["python -m loadtests.benchmarks.efficiency"]
    defaults = parser().parse_args([])
    for option in ("seconds", "rounds", "warmup", "connections", "server_core", "client_core"):
        if getattr(args, option) != getattr(defaults, option):
            words.append(f"--{option.replace('_', '-')} {getattr(args, option)}")
    return " ".join(words)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _per_core(run: dict[str, Any]) -> float:
    """Requests served per CPU-second the server used: req/s per core, busy or not."""
    return float(run["requests"]) / max(float(run["server_cpu_s"]), 1e-9)


def _spread(values: list[float], digits: int = 4) -> dict[str, Any]:
    return {
        "per_round": [round(v, digits) for v in values],
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
    }


def _ratios(a: Config, b: Config) -> dict[str, Any]:
    """a/b within each round, for throughput and for throughput per core."""
    rounds = list(zip(a.rounds, b.rounds, strict=True))
    return {
        "rps": _spread([x["rps"] / y["rps"] for x, y in rounds]),
        "per_core": _spread([_per_core(x) / _per_core(y) for x, y in rounds]),
    }


def summarize(all_configs: list[Config]) -> dict[str, Any]:
    reference = next(c for c in all_configs if c.name == REFERENCE)
    summary: dict[str, Any] = {}
    for config in all_configs:
        runs = config.rounds
        server_cores = [r["server_cpu_cores"] for r in runs]
        wrk_cores = [r["wrk_cpu_cores"] for r in runs]
        other_cores = [
            max(0.0, r["machine_busy_cores"] - r["server_cpu_cores"] - r["wrk_cpu_cores"])
            for r in runs
        ]
        summary[config.name] = {
            "what": config.what,
            "env": config.node_env,
            "app": config.app,
            "rps": _spread([r["rps"] for r in runs], 1),
            "rps_per_core": _spread([_per_core(r) for r in runs], 1),
            "ratio_to_raw_asgi": _ratios(config, reference),
            "server_cpu_cores": _spread(server_cores, 3),
            "wrk_cpu_cores": _spread(wrk_cores, 3),
            "other_cpu_cores": _spread(other_cores, 3),
            "saturated": min(server_cores) >= SATURATED_CORES,
            "client_limited": max(wrk_cores) >= CLIENT_LIMIT_CORES,
            "p50_ms_median": statistics.median(r["latency_ms"].get("p50", 0) for r in runs),
            "p99_ms_median": statistics.median(r["latency_ms"].get("p99", 0) for r in runs),
            "non_2xx": sum(r["non_2xx"] for r in runs),
            "socket_errors": [r["socket_errors"] for r in runs if r["socket_errors"]],
        }
    return summary


def pairs(all_configs: list[Config]) -> dict[str, Any]:
    """cattle (both rows) over bare FastAPI, in-memory, round by round."""
    by_name = {c.name: c for c in all_configs}
    fastapi = by_name[FASTAPI]
    return {
        f"{c.name}/{FASTAPI}": _ratios(c, fastapi) for c in all_configs if c.node_env is not None
    }


def _range(spread: dict[str, Any]) -> str:
    return f"{spread['median']:.3f} ({spread['min']:.3f}-{spread['max']:.3f})"


def markdown(report: dict[str, Any]) -> str:
    s = report["summary"]
    setup = report["setup"]
    cattle = s[CATTLE]
    vs_fastapi = report["pairs"][f"{CATTLE}/{FASTAPI}"]
    versions = ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v)
    unsaturated = [n for n, row in s.items() if not row["saturated"]]
    client_limited = [n for n, row in s.items() if row["client_limited"]]
    lines = [
        "# Per-node efficiency: cattle against bare frameworks",
        "",
        f"{reports.measured(report)} Versions: {versions}.",
        "",
        f"**cattle's read endpoint at default settings serves {cattle['rps']['median']:.0f} req/s "
        f"on one core ({cattle['rps_per_core']['median']:.0f} per core-second used): "
        f"{vs_fastapi['rps']['median']:.1%} of bare FastAPI, in-memory, and "
        f"{cattle['ratio_to_raw_asgi']['rps']['median']:.1%} of a raw ASGI app, "
        "in the same process model.**",
        "",
        *(
            [
                f"**Caution:** {', '.join(f'`{n}`' for n in unsaturated + client_limited)} "
                "had runs where the server was not saturated or wrk neared its core; see the "
                "per-round table and the notes below.",
                "",
            ]
            if unsaturated or client_limited
            else []
        ),
        "| configuration | what | req/s (median) | ratio to raw ASGI (median, range) "
        "| req/s per core-second | server CPU, cores (min) | wrk CPU, cores (max) "
        "| p50 ms | p99 ms | non-2xx |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in s.items():
        lines.append(
            f"| `{name}` | {row['what']} | {row['rps']['median']:.0f} | "
            f"{_range(row['ratio_to_raw_asgi']['rps'])} | {row['rps_per_core']['median']:.0f} | "
            f"{row['server_cpu_cores']['median']:.2f} ({row['server_cpu_cores']['min']:.2f}) | "
            f"{row['wrk_cpu_cores']['median']:.2f} ({row['wrk_cpu_cores']['max']:.2f}) | "
            f"{row['p50_ms_median']:.2f} | {row['p99_ms_median']:.2f} | {row['non_2xx']} |"
        )
    lines += [
        "",
        "cattle over bare FastAPI, in-memory (within each round; median and range):",
        "",
        "| ratio | throughput | per core-second |",
        "| --- | --- | --- |",
    ]
    for pair, ratio in report["pairs"].items():
        lines.append(f"| `{pair}` | {_range(ratio['rps'])} | {_range(ratio['per_core'])} |")
    lines += [
        "",
        "Per-round throughput (req/s), with the server's CPU use (cores) in brackets; within a "
        "round the configurations ran in a rotated order. The last column is the most CPU "
        "anything else on the machine used during one of the round's runs:",
        "",
        "| round | " + " | ".join(f"`{n}`" for n in s) + " | other CPU, cores (max) |",
        "| --- | " + " | ".join("---:" for _ in s) + " | ---: |",
    ]
    for i in range(setup["rounds"]):
        other_max = max(row["other_cpu_cores"]["per_round"][i] for row in s.values())
        lines.append(
            f"| {i + 1} | "
            + " | ".join(
                f"{row['rps']['per_round'][i]:.0f} ({row['server_cpu_cores']['per_round'][i]:.2f})"
                for row in s.values()
            )
            + f" | {other_max:.2f} |"
        )
    saturation = (
        f"every server used at least {SATURATED_CORES:.2f} of its core in every run (saturated)"
        if not unsaturated
        else f"NOT saturated in every run: {', '.join(unsaturated)} (their figures are not "
        "per-core limits)"
    )
    client = (
        f"wrk stayed below {CLIENT_LIMIT_CORES:.2f} of its core in every run, so the client was "
        "not the bottleneck"
        if not client_limited
        else f"wrk reached {CLIENT_LIMIT_CORES:.2f} of its core for {', '.join(client_limited)}: "
        "the client may have been the limit there, so those figures are lower bounds"
    )
    other = max(row["other_cpu_cores"]["max"] for row in s.values())
    lines += [
        "",
        *reports.how_measured(report),
        "(`make bench-efficiency` runs the same with the defaults.)",
        "",
        f"- One uvicorn process per configuration (uvloop, httptools, one worker, uvicorn's "
        f"access log off), all pinned to CPU core {setup['server_core']} with taskset and all "
        "running throughout; only the one under test receives load. cattle runs as "
        "`python -m service serve` with production settings on a migrated SQLite database "
        "seeded with one note; the baselines run under `python -m uvicorn "
        "loadtests.benchmarks.baselines:<app>` and serve that same note from a dict.",
        f"- wrk pinned to core {setup['client_core']}: `wrk -t1 -c{setup['connections']} "
        f"-d{setup['seconds']}s --latency` against `GET /v1/notes/{{id}}` on 127.0.0.1, after "
        f"a {setup['warmup_seconds']} s warm-up per server. Latency percentiles are wrk's.",
        f"- Rounds: {setup['rounds']}; every round runs each configuration once, in a rotated "
        "order. Ratios are computed within each round; tables give the median (and range).",
        "- At saturation the latency is mostly queueing: with a closed loop of "
        f"{setup['connections']} connections, p50 is close to connections / throughput.",
        "- Before measuring, every server answered the path with the same JSON (body bytes: "
        + ", ".join(f"`{n}` {b}" for n, b in setup["body_bytes"].items())
        + ").",
        "- CPU: the server's user+system time from /proc/<pid>/stat (all its threads) and "
        "wrk's from its rusage, each over the wall time of the wrk run; 1.00 is one core busy "
        "throughout. req/s per core-second = requests completed / server CPU-seconds. "
        f"Of this, {saturation}; {client}.",
        f"- Other CPU use on the machine during the runs (all cores, minus server and wrk): "
        f"at most {other:.2f} cores. Load average {setup['loadavg_before']} before, "
        f"{setup['loadavg_after']} after; the run held the machine-wide experiment lock.",
        "- What the gap contains: per request cattle runs three plain-ASGI middlewares "
        "(telemetry: spans, metrics, access log; edge: node attribution, body limit, "
        "last-resort errors; in-flight counting for the drain), resolves its dependencies "
        "(database, consistency token), reads the note from SQLite through SQLAlchemy async "
        "and aiosqlite's thread, and sends `ETag` and `X-Read-Source` headers. The baselines "
        "do none of that: `fastapi` is the floor for a FastAPI route of this shape, not a "
        "competitor that does the same work without a database.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    report = reports.main(
        "bench_efficiency",
        args.out,
        render_only=args.render,
        measure=lambda: measure(args),
        markdown=markdown,
    )
    if report is None:
        return 0
    cattle = report["summary"][CATTLE]
    print(
        f"cattle {cattle['rps']['median']:.0f} req/s: "
        f"{report['pairs'][f'{CATTLE}/{FASTAPI}']['rps']['median']:.3f} of bare FastAPI, "
        f"{cattle['ratio_to_raw_asgi']['rps']['median']:.3f} of raw ASGI; "
        f"wrote {args.out}.md and .json"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
