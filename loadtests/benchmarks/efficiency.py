"""Benchmark: req/s per core of cattle's read endpoint vs bare FastAPI, Starlette and raw ASGI.

    python -m loadtests.benchmarks.efficiency   # ~2 min; docs/results/efficiency.{md,json}

Seven servers, each one uvicorn process as the node runs it (uvloop, httptools,
one worker, uvicorn's access log off), all pinned to CPU core 0; wrk pinned to
core 1 drives GET /v1/notes/{id} of one existing note at saturation on
127.0.0.1, one server at a time, same connections and duration for all.
Rounds alternate the configurations (rotating the order) so drift in the
machine's load hits them alike; ratios are computed within each round and the
report gives their median and range.

Configurations:
  cattle                the real node (`python -m service serve`, production
                        settings, SQLite), defaults: read cache on, telemetry
                        on, access log on (the cache serves every read)
  cattle-no-cache       the same with CATTLE_CACHE=off: every read reads the
                        database (the per-node figure of the database path)
  cattle-no-cache-no-telemetry  that, and CATTLE_TELEMETRY_ENABLED=false and
                        CATTLE_ACCESS_LOG=false (for reference)
  cattle-postgres-no-cache  cattle-no-cache on PostgreSQL (primary only); the
                        database's processes pinned to wrk's core
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
import contextlib
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

import psutil

from deploy.lab.postgres import PostgresCluster, free_port, postmaster_pid
from loadtests import report as reports
from loadtests.benchmarks import baselines
from loadtests.harness import paired
from loadtests.harness import wrk as wrkbench
from loadtests.harness.wrk import request

RESULTS = reports.RESULTS / "efficiency"
REFERENCE = "raw-asgi"
CATTLE = "cattle"
DATABASE_READ = "cattle-no-cache"  # the database path's figure
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
    postgres: bool = False  # the node's database is the benchmark's PostgreSQL
    server: wrkbench.Server | None = None
    rounds: list[dict[str, Any]] = field(default_factory=list)

    @property
    def running(self) -> wrkbench.Server:
        assert self.server is not None, f"{self.name} was not started"
        return self.server


def configs() -> list[Config]:
    return [
        Config(
            CATTLE,
            "the real node, defaults: read cache on (every read a hit), telemetry on, "
            "JSON access log",
            node_env={},
        ),
        Config(
            DATABASE_READ,
            "the real node, read cache off: every read reads SQLite",
            node_env={"CATTLE_CACHE": "off"},
        ),
        Config(
            "cattle-no-cache-no-telemetry",
            "the same, telemetry and access log off too",
            node_env={
                "CATTLE_CACHE": "off",
                "CATTLE_TELEMETRY_ENABLED": "false",
                "CATTLE_ACCESS_LOG": "false",
            },
        ),
        Config(
            "cattle-postgres-no-cache",
            "the real node on PostgreSQL (primary, on wrk's core), read cache off",
            node_env={"CATTLE_CACHE": "off"},
            postgres=True,
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


def start_postgres(run_dir: Path, core: int) -> tuple[PostgresCluster, str]:
    """A migrated PostgreSQL primary pinned to `core`; returns it and the node's URL."""
    # PostgreSQL runs as an unprivileged user, which must reach its directory.
    run_dir.chmod(0o755)
    cluster = PostgresCluster(run_dir / "pg")
    cluster.start()
    pid = postmaster_pid(cluster.primary.data_dir)
    assert pid is not None
    # Its backends fork from the postmaster and inherit its core; the rest move
    # now. Every PostgreSQL process is single-threaded: one affinity each.
    postmaster = psutil.Process(pid)
    postmaster.cpu_affinity([core])
    for child in postmaster.children():
        # A backend that ended since is no loss: it needs no core.
        with contextlib.suppress(psutil.NoSuchProcess):
            child.cpu_affinity([core])
    url = cluster.primary_dsn().replace("postgresql://", "postgresql+asyncpg://", 1)
    wrkbench.migrate(run_dir / "unused", database_url=url)
    return cluster, url


def _copy_note(cluster: PostgresCluster, note: dict[str, Any]) -> None:
    """The note the SQLite nodes serve, as the same row in PostgreSQL."""
    values = [note["id"], note["title"], note["body"], note["version"]]
    quoted = ", ".join("'" + str(v).replace("'", "''") + "'" for v in values)
    times = f"'{note['created_at']}', '{note['updated_at']}'"
    insert = "INSERT INTO notes (id, title, body, version, created_at, updated_at) VALUES"
    cluster.psql(f"{insert} ({quoted}, {times})")


def start_all(
    all_configs: list[Config],
    args: argparse.Namespace,
    data_dir: Path,
    run_dir: Path,
    postgres: tuple[PostgresCluster, str] | None,
) -> str:
    """Start every server (the nodes first: they create the note); return the note's path."""
    nodes = [c for c in all_configs if c.node_env is not None]
    for config in nodes:
        assert config.node_env is not None
        env = dict(config.node_env)
        if config.postgres:
            assert postgres is not None
            env["CATTLE_DATABASE_URL"] = postgres[1]
        config.server = wrkbench.start_node(
            config.name, env, data_dir=data_dir, core=args.server_core, log_dir=run_dir
        )
    for config in nodes:
        wrkbench.wait_ready(config.running, "/startupz")
    first = next(c for c in nodes if not c.postgres)
    note = json.dumps({"title": "bench", "body": "x" * 200}).encode()
    status, body = request(first.running.port, "POST", "/v1/notes", note)
    assert status == 201, body
    path = f"/v1/notes/{json.loads(body)['id']}"
    status, body = request(first.running.port, "GET", path)
    assert status == 200, body
    if postgres is not None:
        _copy_note(postgres[0], json.loads(body))
    # The baselines serve the very note cattle stored, so every body is the same JSON.
    env = baseline_env(body.decode())
    for config in all_configs:
        if config.app is not None:
            port = free_port()
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
    postgres: tuple[PostgresCluster, str] | None = None
    try:
        wrkbench.migrate(data_dir)
        if any(c.postgres for c in all_configs):
            postgres = start_postgres(run_dir, args.client_core)
        path = start_all(all_configs, args, data_dir, run_dir, postgres)
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
        if postgres is not None:
            postgres[0].stop()
            postgres[0].remove()
    shutil.rmtree(run_dir, ignore_errors=True)

    figures = {
        "versions": {name: _version(name) for name in PACKAGES},
        "setup": {
            **wrkbench.setup_of(args, loadavg_before),
            "body_bytes": body_bytes,
            "cattle_database": "SQLite (embedded); PostgreSQL for cattle-postgres-no-cache",
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
            "cpu_us_per_request": _spread([1e6 / _per_core(r) for r in runs], 1),
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
    cattle, database_read = s[CATTLE], s[DATABASE_READ]
    vs_fastapi = report["pairs"][f"{CATTLE}/{FASTAPI}"]
    database_vs_fastapi = report["pairs"][f"{DATABASE_READ}/{FASTAPI}"]
    versions = ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v)
    unsaturated = [n for n, row in s.items() if not row["saturated"]]
    client_limited = [n for n, row in s.items() if row["client_limited"]]
    lines = [
        "# Per-node efficiency: cattle against bare frameworks",
        "",
        f"{reports.measured(report)} Versions: {versions}.",
        "",
        f"**cattle's read by id with the read cache off (every read reads SQLite, telemetry "
        f"on) serves {database_read['rps']['median']:.0f} req/s on one core "
        f"({database_read['cpu_us_per_request']['median']:.0f} µs of CPU per request): "
        f"{database_vs_fastapi['per_core']['median']:.1%} of bare FastAPI, in-memory, per "
        f"core-second. At default settings (the cache on, every read a hit) it serves "
        f"{cattle['rps']['median']:.0f} req/s ({cattle['cpu_us_per_request']['median']:.0f} µs): "
        f"{vs_fastapi['per_core']['median']:.1%} of bare FastAPI; in the same process model.**",
        "",
        "![requests per core-second against bare FastAPI, and CPU per request](efficiency.png)",
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
        "| req/s per core-second | CPU µs per request | server CPU, cores (min) "
        "| wrk CPU, cores (max) | p50 ms | p99 ms | non-2xx |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in s.items():
        lines.append(
            f"| `{name}` | {row['what']} | {row['rps']['median']:.0f} | "
            f"{_range(row['ratio_to_raw_asgi']['rps'])} | {row['rps_per_core']['median']:.0f} | "
            f"{row['cpu_us_per_request']['median']:.0f} | "
            f"{row['server_cpu_cores']['median']:.2f} ({row['server_cpu_cores']['min']:.2f}) | "
            f"{row['wrk_cpu_cores']['median']:.2f} ({row['wrk_cpu_cores']['max']:.2f}) | "
            f"{row['p50_ms_median']:.2f} | {row['p99_ms_median']:.2f} | {row['non_2xx']} |"
        )
    lines += [
        "",
        "cattle over bare FastAPI, in-memory (within each round; median and range, and the "
        "95% Student-t interval of the mean of the rounds' per-core ratios):",
        "",
        "| ratio | throughput | per core-second | per core-second, 95% interval |",
        "| --- | --- | --- | --- |",
    ]
    for pair, ratio in report["pairs"].items():
        interval = paired.t_interval(ratio["per_core"]["per_round"])
        shown = f"{interval[0]:.3f}-{interval[1]:.3f}" if interval else "–"
        lines.append(
            f"| `{pair}` | {_range(ratio['rps'])} | {_range(ratio['per_core'])} | {shown} |"
        )
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
        "- What the gap contains: per request cattle runs its middlewares (telemetry: "
        "OpenTelemetry's ASGI middleware, metrics, JSON access log; edge: node attribution, "
        "body limit, last-resort errors; in-flight counting for the drain), resolves its "
        "dependencies (consistency token, If-None-Match), reads the note (from the read cache; "
        "with the cache off from SQLite on the driver in the event loop's thread, or from "
        "PostgreSQL through the SQLAlchemy session path), and sends `ETag` and "
        "`X-Read-Source` headers. The baselines do none of that: `fastapi` is the floor for a "
        "FastAPI route of this shape, not a competitor that does the same work without a "
        "database.",
        "- PostgreSQL ran as one primary started by the benchmark (deploy/lab/postgres.py), "
        f"its processes pinned to core {setup['client_core']} beside wrk.",
        "",
    ]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """Left: each configuration's requests per core-second over bare FastAPI's in
    the same round (median, range over rounds); right: CPU µs per request."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, pairs = report["summary"], report["pairs"]
    names = list(summary)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 0.55 * len(names) + 1.8))
    rows = [n for n in names if f"{n}/{FASTAPI}" in pairs]
    medians = [pairs[f"{n}/{FASTAPI}"]["per_core"]["median"] for n in rows]
    low = [
        m - pairs[f"{n}/{FASTAPI}"]["per_core"]["min"] for n, m in zip(rows, medians, strict=True)
    ]
    high = [
        pairs[f"{n}/{FASTAPI}"]["per_core"]["max"] - m for n, m in zip(rows, medians, strict=True)
    ]
    left.barh(rows, medians, xerr=[low, high], color="tab:blue", capsize=3)
    left.axvline(1.0, color="grey", linestyle=":", label="bare FastAPI")
    left.invert_yaxis()
    left.set(xlabel="requests per core-second, ratio to bare FastAPI (same round)")
    left.legend(loc="lower right")
    cpu = [summary[n]["cpu_us_per_request"]["median"] for n in names]
    right.barh(names, cpu, color="tab:orange")
    right.invert_yaxis()
    right.set(xlabel="node CPU µs per request (median over rounds)")
    fig.suptitle(f"Per-node efficiency, GET /v1/notes/{{id}} ({reports.when(report)})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    report = reports.main(
        "bench_efficiency",
        args.out,
        render_only=args.render,
        measure=lambda: measure(args),
        markdown=markdown,
        plot=plot,
    )
    if report is None:
        return 0
    for name in (DATABASE_READ, CATTLE):
        row = report["summary"][name]
        print(
            f"{name} {row['rps']['median']:.0f} req/s: "
            f"{report['pairs'][f'{name}/{FASTAPI}']['per_core']['median']:.3f} of bare FastAPI "
            "per core-second"
        )
    print(f"wrote {args.out}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
