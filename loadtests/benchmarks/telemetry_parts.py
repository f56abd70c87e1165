"""What each part of default telemetry costs a request, measured inside one process.

    python -m loadtests.benchmarks.telemetry_parts

Takes about 1.5 min; writes docs/results/telemetry-parts.{md,json}.

The telemetry benchmark answers "how much throughput does telemetry cost a node?";
this one answers "which part of it is that?", finer than a throughput
benchmark on a shared machine can. One process, pinned to one core, builds
two apps on one SQLite database: one with telemetry and access log off, one
at the defaults. It calls them directly through ASGI (no sockets, no HTTP
parsing), `--concurrency` requests at a time, GET /v1/notes/{id}, and times
batches of requests in CPU time of the process (its aiosqlite thread
included). Between batches it switches parts of the second app's telemetry
off and on again (the access log, the request metrics, the server span), so
every variant runs in the same app, with the same code and memory layout,
interleaved with the others in a rotating order. A part's cost is the full
telemetry's CPU per request minus that of the variant without the part.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from loadtests import report as reports
from loadtests.harness import wrk as wrkbench

RESULTS = reports.RESULTS / "telemetry-parts"

# variant -> the parts switched off in it
VARIANTS: dict[str, frozenset[str]] = {
    "full": frozenset(),
    "no-access-log": frozenset({"access_log"}),
    "no-metrics": frozenset({"metrics"}),
    "no-server-span": frozenset({"span"}),
    "none-of-the-three": frozenset({"access_log", "metrics", "span"}),
}
PARTS = {
    "access_log": "no-access-log",
    "metrics": "no-metrics",
    "span": "no-server-span",
}
OFF = "off"

Call = Callable[[str], Awaitable[int]]


def asgi_caller(app: Any, state: dict[str, Any]) -> Call:
    """GET `path` from `app` as uvicorn would call it; returns the status."""

    async def call(path: str) -> int:
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": "GET", "scheme": "http", "path": path, "raw_path": path.encode(),
            "query_string": b"", "root_path": "",
            "headers": [(b"host", b"node"), (b"user-agent", b"telemetry-parts")],
            "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8000),
            "state": dict(state),
        }  # fmt: skip
        status = 0
        received = False

        async def receive() -> dict[str, Any]:
            nonlocal received
            if not received:
                received = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await asyncio.Event().wait()  # never: the client stays connected
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]

        await app(scope, receive, send)
        return status

    return call


async def measure(
    args: argparse.Namespace, data_dir: Path, log_path: Path
) -> dict[str, list[float]]:
    from service.app import create_app
    from service.config import Settings
    from service.telemetry.logs import AccessLog

    base: dict[str, Any] = {
        "environment": "production",
        "cursor_secret": wrkbench.CURSOR_SECRET,
        "data_dir": data_dir,
        "drain_delay_s": 0,
    }
    apps: dict[str, Any] = {
        OFF: create_app(Settings(**base, node_id=OFF, telemetry_enabled=False, access_log=False)),
        "on": create_app(Settings(**base, node_id="on")),
    }
    lifespans = {name: app.router.lifespan_context(app) for name, app in apps.items()}
    states = {name: await lifespan.__aenter__() for name, lifespan in lifespans.items()}
    try:
        with log_path.open("w") as log:
            telemetry = apps["on"].state.telemetry
            recorder = telemetry.requests
            # The access log goes to a file, as a container runtime would take stdout.
            recorder.access_log = AccessLog("on", stream=log)
            parts = {
                "access_log": recorder.access_log,
                "metrics": recorder.http,
                "span": telemetry.server_tracer,
            }

            def switch(off: frozenset[str]) -> None:
                recorder.access_log = None if "access_log" in off else parts["access_log"]
                recorder.http = None if "metrics" in off else parts["metrics"]
                telemetry.server_tracer = None if "span" in off else parts["span"]

            callers = {name: asgi_caller(app, dict(states[name])) for name, app in apps.items()}
            note = await seed(apps[OFF], dict(states[OFF]))
            path = f"/v1/notes/{note}"
            names = [OFF, *VARIANTS]
            samples: dict[str, list[float]] = {name: [] for name in names}
            for round_no in range(args.rounds + 1):  # round 0 warms up
                shift = round_no % len(names)
                for name in names[shift:] + names[:shift]:
                    if name != OFF:
                        switch(VARIANTS[name])
                    call = callers[OFF if name == OFF else "on"]
                    # The batch's last requests are recorded inside its timing.
                    settle = (lambda: None) if name == OFF else recorder.flush
                    cpu_us = await batch(call, path, args.requests, args.concurrency, settle)
                    if round_no:
                        samples[name].append(cpu_us)
            switch(frozenset())
            sampled = await measure_sampling(args, telemetry, callers["on"], path)
            recorder.flush()  # the last lines, while their file is open
            recorder.access_log = None
    finally:
        for lifespan in lifespans.values():
            await lifespan.__aexit__(None, None, None)
    return {**samples, **sampled}


async def measure_sampling(
    args: argparse.Namespace, telemetry: Any, call: Call, path: str
) -> dict[str, list[float]]:
    """What a sampled request costs once spans have a receiver (an OTLP endpoint).

    A processor that keeps nothing opens the sampler's gate; the gate's sampler
    is then switched between dropping and recording every trace, batch by batch.
    Afterwards the spans of 100 recorded requests go through the real OTLP/HTTP
    exporter to loadtests.benchmarks.collector: its CPU per span is what encoding and
    sending costs (the SDK's batch processor does it on a background thread of
    the node's process).
    """
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON

    kept: list[ReadableSpan] = []
    keeping = False

    class Keeper(SpanProcessor):
        def on_end(self, span: ReadableSpan) -> None:
            if keeping:
                kept.append(span)

    gate = telemetry.sampler_gate
    configured = gate.inner
    telemetry.add_span_processor(Keeper())
    samples: dict[str, list[float]] = {"none-sampled": [], "all-sampled": []}
    try:
        for round_no in range(max(args.rounds // 2, 1) + 1):
            order = list(samples) if round_no % 2 else list(reversed(samples))
            for name in order:
                gate.inner = ALWAYS_ON if name == "all-sampled" else ALWAYS_OFF
                cpu_us = await batch(
                    call, path, args.requests, args.concurrency, telemetry.requests.flush
                )
                if round_no:
                    samples[name].append(cpu_us)
        gate.inner = ALWAYS_ON
        keeping = True
        for _ in range(100):
            await call(path)
        keeping = False
    finally:
        gate.inner = configured
    samples["spans_per_request"] = [len(kept) / 100]
    samples["export_us_per_span"] = [export_cost(OTLPSpanExporter, kept, args.core)]
    return samples


def export_cost(exporter_class: Any, spans: list[Any], core: int) -> float:
    """CPU µs per span for the OTLP/HTTP exporter to send `spans` to a live collector."""
    others = sorted(os.sched_getaffinity(0) | set(range(os.cpu_count() or 1)) - {core})
    port = wrkbench.free_port()
    with tempfile.TemporaryDirectory(prefix="cattle-collector-") as log_dir:
        collector = wrkbench.start(
            "collector",
            [sys.executable, "-m", "loadtests.benchmarks.collector", "--port", str(port)],
            port=port,
            env=dict(os.environ),
            core=others[0] if others else core,
            log_dir=Path(log_dir),
        )
        try:
            wrkbench.wait_ready(collector, "/stats")
            exporter = exporter_class(endpoint=f"{collector.url}/v1/traces", timeout=10)
            exporter.export(spans)  # connection set up, code paths warm
            rounds = 10
            started = time.process_time()
            for _ in range(rounds):
                exporter.export(spans)
            cpu_s = time.process_time() - started
            exporter.shutdown()
        finally:
            wrkbench.stop(collector)
    return cpu_s * 1e6 / (rounds * max(len(spans), 1))


async def seed(app: Any, state: dict[str, Any]) -> str:
    """Create the note the reads will fetch; returns its id."""
    body = json.dumps({"title": "parts", "body": "x" * 200}).encode()
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
        "method": "POST", "scheme": "http", "path": "/v1/notes", "raw_path": b"/v1/notes",
        "query_string": b"", "root_path": "",
        "headers": [(b"host", b"node"), (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8000), "state": state,
    }  # fmt: skip
    sent: list[dict[str, Any]] = []
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if delivered:
            await asyncio.Event().wait()
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    assert sent[0]["status"] == 201, sent
    answer = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
    return str(answer["id"])


async def batch(
    call: Call, path: str, requests: int, concurrency: int, settle: Callable[[], None]
) -> float:
    """CPU µs per request for `requests` GETs, `concurrency` at a time, and `settle()`."""

    async def worker(count: int) -> None:
        for _ in range(count):
            status = await call(path)
            if status != 200:
                raise SystemExit(f"GET {path} answered {status}")

    share, extra = divmod(requests, concurrency)
    started = time.process_time()
    await asyncio.gather(*(worker(share + (i < extra)) for i in range(concurrency)))
    settle()
    return (time.process_time() - started) * 1e6 / requests


def summarize(samples: dict[str, list[float]]) -> dict[str, Any]:
    off = samples[OFF]
    rows: dict[str, Any] = {}
    for name in [OFF, *VARIANTS]:
        values = samples[name]
        extra = [v - o for v, o in zip(values, off, strict=True)]
        rows[name] = {
            "cpu_us_per_request_median": round(statistics.median(values), 1),
            "extra_us_median": round(statistics.median(extra), 1),
            "ratio_to_off_median": round(
                statistics.median(v / o for v, o in zip(values, off, strict=True)), 4
            ),
        }
    full = samples["full"]
    parts = {}
    for part, variant in PARTS.items():
        without = samples[variant]
        parts[part] = round(statistics.median(f - w for f, w in zip(full, without, strict=True)), 1)
    parts["rest"] = round(
        statistics.median(n - o for n, o in zip(samples["none-of-the-three"], off, strict=True)),
        1,
    )
    recording = [
        a - n for a, n in zip(samples["all-sampled"], samples["none-sampled"], strict=True)
    ]
    spans = samples["spans_per_request"][0]
    export = samples["export_us_per_span"][0]
    sampled = {
        "record_us_per_sampled_request": round(statistics.median(recording), 1),
        "spans_per_sampled_request": round(spans, 2),
        "export_us_per_span": round(export, 1),
        "export_us_per_sampled_request": round(export * spans, 1),
    }
    return {"variants": rows, "parts_us": parts, "sampled": sampled}


PART_NAMES = {
    "access_log": "access log (one JSON line per request, written in batches)",
    "metrics": "request metrics (one histogram measurement per request, in batches)",
    "span": "server span (started, made current, ended; none recorded without an exporter)",
    "rest": "the rest: the middleware itself, its per-request tuple, SQL statement hooks",
}


def markdown(report: dict[str, Any]) -> str:
    summary = report["summary"]
    setup = report["setup"]
    rows = summary["variants"]
    lines = [
        "# What each part of telemetry costs",
        "",
        reports.measured(report),
        "",
        f"Default telemetry costs **{rows['full']['extra_us_median']:.0f} µs** of CPU per request "
        f"over telemetry off ({rows[OFF]['cpu_us_per_request_median']:.0f} µs), in this "
        "process without HTTP; by part:",
        "",
        "| part | µs per request |",
        "| --- | ---: |",
    ]
    for part, cost in summary["parts_us"].items():
        lines.append(f"| {PART_NAMES[part]} | {cost:.1f} |")
    lines += [
        "",
        "| variant | CPU µs per request (median) | extra over off | ratio to off |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, row in rows.items():
        lines.append(
            f"| `{name}` | {row['cpu_us_per_request_median']:.1f} | "
            f"{row['extra_us_median']:.1f} | {row['ratio_to_off_median']:.3f} |"
        )
    sampled = summary["sampled"]
    lines += [
        "",
        "## With an OTLP endpoint: recorded spans",
        "",
        "Once spans have a receiver, a sampled request also records its spans "
        f"({sampled['spans_per_sampled_request']:.0f} for this read: the server span and its "
        "SQL statements) and the SDK's batch processor encodes and sends them:",
        "",
        "| step | CPU µs per sampled request |",
        "| --- | ---: |",
        f"| recording its spans | {sampled['record_us_per_sampled_request']:.0f} |",
        f"| encoding and sending them by OTLP/HTTP ({sampled['export_us_per_span']:.0f} µs per "
        f"span) | {sampled['export_us_per_sampled_request']:.0f} |",
        "",
        "At the default ratio of 10% a request pays a tenth of that on average; the cost "
        "scales with `OTEL_TRACES_SAMPLER_ARG`.",
        "",
        *reports.how_measured(report),
        f"- One process pinned to core {setup['core']}: two apps on one SQLite database, one "
        "with `CATTLE_TELEMETRY_ENABLED=false CATTLE_ACCESS_LOG=false`, one at the defaults "
        "(no OTLP endpoint, so no span is recorded).",
        f"- Each batch is {setup['requests']} `GET /v1/notes/{{id}}` called through ASGI, "
        f"{setup['concurrency']} at a time, timed in CPU time of the process (the aiosqlite "
        f"thread included). {setup['rounds']} rounds after one warm-up round; each round runs "
        "every variant once, in a rotating order.",
        "- The variants are the same app with parts of its telemetry switched off between "
        "batches. A part's cost is the median over rounds of (full − the variant without it); "
        "'the rest' is `none-of-the-three` − `off`. Parts interact a little (a cache warmed by "
        "one helps another), so the parts need not add up to the total exactly, and repeated "
        "runs move each figure by several µs: a part within a few µs of zero costs nothing "
        "this method can see.",
        "- Recorded spans: the same app with a span processor that keeps nothing (so spans "
        "have a receiver), its sampler switched between recording every trace and none, batch "
        "by batch, half as many rounds; then the spans of 100 recorded requests sent 10 times "
        "by the OTLP/HTTP exporter to `python -m loadtests.benchmarks.collector` on another "
        "core, timed in this process's CPU time.",
        "- In-process figures leave out HTTP parsing and sockets (a real node spends about "
        "200 µs more per request there), so ratios here are larger than the throughput ratios "
        "of the telemetry benchmark, which measures whole nodes.",
        "",
    ]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.benchmarks.telemetry_parts",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--requests", type=int, default=240, help="requests per batch")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--core", type=int, default=0, help="CPU core to pin the process to")
    parser.add_argument("--out", type=Path, default=RESULTS, help="writes OUT.json and OUT.md")
    parser.add_argument(
        "--render", action="store_true", help="only rewrite OUT.md from the saved OUT.json"
    )
    return parser


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Measure (without the machine lock: main takes it) and return the report."""
    if args.requests < args.concurrency or args.rounds < 1:
        raise SystemExit("--requests must be at least --concurrency, and --rounds at least 1")
    run_dir = Path(tempfile.mkdtemp(prefix="cattle-telemetry-parts-"))
    affinity = os.sched_getaffinity(0)
    try:
        data_dir = run_dir / "data"
        wrkbench.migrate(data_dir)
        import uvloop

        os.sched_setaffinity(0, {args.core})
        samples = uvloop.run(measure(args, data_dir, run_dir / "access.log"))
    finally:
        os.sched_setaffinity(0, affinity)
        shutil.rmtree(run_dir, ignore_errors=True)
    figures = {
        "setup": {
            "core": args.core,
            "rounds": args.rounds,
            "requests": args.requests,
            "concurrency": args.concurrency,
            "endpoint": "GET /v1/notes/{id}",
            "database": "SQLite (embedded)",
        },
        "summary": summarize(samples),
        "samples_us": samples,
    }
    return reports.stamped(reports.command_line(__spec__.name, argv), figures)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    report = reports.main(
        "telemetry_parts",
        args.out,
        render_only=args.render,
        measure=lambda: run(args, argv),
        markdown=markdown,
    )
    if report is None:
        return 0
    parts = report["summary"]["parts_us"]
    print(
        "µs per request: "
        + ", ".join(f"{part} {cost:.1f}" for part, cost in parts.items())
        + f"; wrote {args.out}.md and .json"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
