"""The efficiency benchmark shrunk to seconds: its machinery works end to end.

Checks that the servers start, wrk drives each one, CPU is measured and the
report is complete and well-formed; never how fast this machine is. It does
not take the machine-wide experiment lock (that is for real measurements), so
it may run next to an experiment and perturb it a little, briefly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI

from deploy.lab.postgres import PostgresNotInstalled, find_bindir
from loadtests import report as reports
from loadtests.benchmarks import efficiency as bench_efficiency
from loadtests.benchmarks import otel_cost as bench_otel_cost
from loadtests.benchmarks import route_cost as bench_route_cost
from loadtests.benchmarks import stock_node
from loadtests.benchmarks import telemetry as bench_telemetry
from loadtests.harness import wrk as wrkbench
from service.app import create_app
from service.config import Settings
from service.telemetry.http import HttpTelemetry
from tests.conftest import serve_asgi
from tests.support import require

pytestmark = pytest.mark.cluster

NAMES = [
    "cattle",
    "cattle-no-cache",
    "cattle-no-cache-no-telemetry",
    "cattle-postgres-no-cache",
    "fastapi",
    "starlette",
    "raw-asgi",
]


def _cores() -> tuple[int, int]:
    """Two cores this process may use (the same one twice on a one-core machine)."""
    allowed = sorted(os.sched_getaffinity(0))
    return allowed[0], allowed[-1]


@pytest.mark.postgres
def test_efficiency_benchmark_writes_a_complete_report(tmp_path: Path) -> None:
    for tool in ("wrk", "taskset"):
        require(shutil.which(tool) is not None, f"{tool} is not installed (apt-get install wrk)")
    try:
        find_bindir()
    except PostgresNotInstalled as exc:
        require(False, str(exc))
    server_core, client_core = _cores()
    out = tmp_path / "efficiency"
    args = bench_efficiency.parser().parse_args(
        [
            "--rounds", "1", "--seconds", "1", "--warmup", "0", "--connections", "4",
            "--server-core", str(server_core), "--client-core", str(client_core),
            "--out", str(out),
        ]
    )  # fmt: skip

    reports.write(
        bench_efficiency.measure(args), args.out, bench_efficiency.markdown, bench_efficiency.plot
    )
    assert out.with_suffix(".png").stat().st_size > 0

    report = json.loads(out.with_suffix(".json").read_text())
    summary = report["summary"]
    assert list(summary) == NAMES
    assert list(report["rounds"]) == NAMES
    for name, row in summary.items():
        run = report["rounds"][name][0]
        assert run["rps"] > 0, name
        assert run["requests"] > 0, name
        assert run["non_2xx"] == 0, name
        assert run["server_cpu_s"] > 0, name
        assert run["wrk_cpu_s"] > 0, name
        assert row["rps_per_core"]["median"] > 0, name
        assert row["cpu_us_per_request"]["median"] > 0, name
        assert row["ratio_to_raw_asgi"]["rps"]["median"] > 0, name
        assert row["p50_ms_median"] > 0, name
        assert row["p99_ms_median"] >= row["p50_ms_median"], name
        assert isinstance(row["saturated"], bool)
        assert isinstance(row["client_limited"], bool)
    assert summary["raw-asgi"]["ratio_to_raw_asgi"]["rps"]["median"] == 1.0
    assert set(report["pairs"]) == {f"{name}/fastapi" for name in NAMES[:4]}
    for ratio in report["pairs"].values():
        assert ratio["rps"]["median"] > 0
        assert ratio["per_core"]["median"] > 0
    # Every server was checked to serve the same JSON before it was measured.
    assert len(set(report["setup"]["body_bytes"].values())) == 1
    assert reports.problems(report) == []
    assert report["machine"]["cores"] == os.cpu_count()
    assert report["command"].startswith("python -m loadtests.benchmarks.efficiency --seconds 1")

    md = out.with_suffix(".md").read_text()
    assert md.startswith("# Per-node efficiency")
    # One round has no interval; the column says so rather than inventing one.
    assert "| per core-second, 95% interval |" in md and "| `cattle/fastapi` |" in md
    for name in NAMES:
        assert f"| `{name}` |" in md
    assert report["command"] in md


TELEMETRY_CONFIGS = [
    "off", "default", "no-access-log", "spans", "fastapi-native", "stock-access-log",
    "asgi-middleware",
    "otlp", "otlp-down",
]  # fmt: skip


def test_telemetry_benchmark_writes_a_complete_report(tmp_path: Path) -> None:
    # Together mode, the one the committed results use; the sequential order
    # is tested without nodes below.
    for tool in ("wrk", "taskset"):
        require(shutil.which(tool) is not None, f"{tool} is not installed (apt-get install wrk)")
    server_core, client_core = _cores()
    argv = [
        "--rounds", "1", "--seconds", "1", "--warmup", "0", "--connections", "4",
        "--server-core", str(server_core), "--client-core", str(client_core),
        "--out", str(tmp_path / "telemetry"), "--together",
    ]  # fmt: skip

    report = bench_telemetry.run(bench_telemetry.parser().parse_args(argv), argv)

    assert reports.problems(report) == []
    summary = report["summary"]
    assert list(summary) == TELEMETRY_CONFIGS
    for name, row in summary.items():
        [run] = report["rounds"][name]
        assert run["requests"] > 0 and run["non_2xx"] == 0, name
        assert run["server_cpu_s"] > 0, name
        assert row["cpu_us_per_request_median"] > 0, name
        assert row["ratio_median"] > 0, name
    assert summary["off"]["ratio_median"] == 1.0
    cross = report["cross_check"]
    # The node's own metrics saw at least what wrk counted (wrk drops in-flight ones).
    assert cross["counted"] >= cross["sent"] > 0
    # The live collector really received spans: export happened, at about the sampled share.
    assert 0 < cross["otlp_spans_exported"] <= 4 * cross["otlp_counted"]
    assert report["setup"]["together"] is True
    # One round: no even rounds to agree with, so the run cannot be valid.
    assert report["judged"]["valid"] is False
    text = bench_telemetry.markdown(report)
    assert "# Telemetry overhead" in text and "Exporting to a live collector" in text
    assert "each beside a run of `off`" in text


def _fake_run(rps: float) -> dict[str, Any]:
    return {"rps": rps, "requests": 100, "non_2xx": 0, "server_cpu_s": 0.1, "latency_ms": {}}


@pytest.mark.parametrize("together", [False, True], ids=["sequential", "together"])
def test_every_configuration_runs_beside_the_baseline_and_none_always_first(
    together: bool,
) -> None:
    off, a, b = (bench_telemetry.Config(name, {}, "") for name in ("off", "a", "b"))
    order: list[str] = []

    def drive(config: bench_telemetry.Config) -> dict[str, Any]:
        order.append(config.name)
        return _fake_run({"off": 1000.0, "a": 900.0, "b": 800.0}[config.name])

    bench_telemetry.run_rounds(off, [a, b], drive, rounds=2, together=together)

    if together:  # each beside one run of off, at the same time
        assert sorted(order) == ["a", "a", "b", "b", "off", "off", "off", "off"]
    else:  # each between two runs of off; the second round starts with b
        assert order == ["off", "a", "off", "b", "off", "off", "b", "off", "a", "off"]
    assert [len(c.rounds) for c in (off, a, b)] == [2, 2, 2]
    assert all(r["baseline_rps"] == 1000.0 for r in a.rounds + b.rounds)
    assert off.rounds[0]["requests"] == (200 if together else 300)


def _summary(default_ratios: list[float]) -> dict[str, dict[str, list[float]]]:
    return {"default": {"ratio_per_round": default_ratios}}


def test_a_telemetry_run_is_valid_when_odd_and_even_rounds_agree() -> None:
    # Odd rounds 0.95, 0.93; even rounds 0.94, 0.92: both meet the 10% target.
    assert bench_telemetry.judge(_summary([0.95, 0.94, 0.93, 0.92]))["valid"]
    # Both miss it, however far apart.
    assert bench_telemetry.judge(_summary([0.50, 0.70, 0.52, 0.72]))["valid"]
    # Odd rounds meet it (0.95), even rounds miss it (0.85): not established.
    judged = bench_telemetry.judge(_summary([0.95, 0.85, 0.95, 0.85]))
    assert not judged["valid"]
    assert (judged["ratio_odd_rounds"], judged["ratio_even_rounds"]) == (0.95, 0.85)
    assert not bench_telemetry.judge(_summary([0.95]))["valid"]


async def test_the_stock_nodes_are_measured_by_their_stock_part_alone(
    sqlite_template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The benchmark's rows are what their names say: `spans` makes spans where
    the default node makes none; spans and HTTP metrics by FastAPI's own
    support or by opentelemetry-instrumentation-asgi, cattle's middleware out
    of the way (each request counted once)."""
    monkeypatch.setenv("OTEL_SEMCONV_STABILITY_OPT_IN", "http")  # what build_app sets
    database = tmp_path / "node.db"
    shutil.copyfile(sqlite_template, database)
    settings = Settings(
        database_url=f"sqlite+aiosqlite:///{database}",
        data_dir=tmp_path,
        environment="production",
        cursor_secret="test-cursor-secret-0123456789",
    )

    async def scrape(app: FastAPI) -> str:
        async with serve_asgi(app) as (http, _):
            created = await http.post("/v1/notes", json={"title": "t"})
            assert created.status_code == 201
            for _ in range(3):
                assert (await http.get(created.headers["location"])).status_code == 200
            return (await http.get("/metrics")).text

    fastapi_app = stock_node.build_app(settings, "fastapi")
    # cattle's middleware is gone, so what counts below is FastAPI's own.
    assert not [m for m in fastapi_app.user_middleware if m.cls is HttpTelemetry]  # type: ignore[comparison-overlap]
    # The stock access log's node writes no access line of its own (uvicorn writes it).
    assert stock_node.build_app(settings, "access").state.telemetry.access_log is None
    assert create_app(settings).state.telemetry.access_log is not None
    # No trace export configured: the node makes no spans; `spans` (and so the
    # stock rows, built the same way) does.
    assert create_app(settings).state.telemetry.tracer_provider is None
    spans_app = stock_node.build_app(settings, "spans")
    assert spans_app.state.telemetry.tracer_provider is not None
    spans = await scrape(spans_app)
    asgi = await scrape(stock_node.build_app(settings, "asgi"))
    fastapi = await scrape(fastapi_app)
    default = await scrape(create_app(settings))
    # Only the ASGI middleware records body sizes (named by whichever HTTP
    # conventions the instrumentation took up first in this process).
    sizes = ("http_server_request_body_size", "http_server_request_size")
    assert any(name in asgi for name in sizes)
    assert not any(name in fastapi or name in default for name in sizes)
    # Each request is counted once: one series for the three GETs answered 200.
    for text in (asgi, fastapi, default, spans):
        counts = [
            line for line in text.splitlines()
            if re.match(r"http_server_(request_)?duration_(seconds|milliseconds)_count\{", line)
            and re.search(r'http_(request_)?method="GET"', line)
            and re.search(r'http_(response_)?status_code="200"', line)
        ]  # fmt: skip
        assert len(counts) == 1 and counts[0].endswith(" 3.0"), counts


def test_the_otel_cost_benchmark_writes_a_complete_report(tmp_path: Path) -> None:
    out = tmp_path / "otel-cost"
    argv = ["--rounds", "2", "--calls", "20", "--no-lock", "--out", str(out)]
    assert bench_otel_cost.main(argv) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert reports.problems(report) == []
    summary = report["summary"]
    assert set(summary) == {
        "read", "read+telemetry", "read+telemetry-no-span", "read+fastapi-telemetry",
        "record", "add", "count",
        "count-prometheus-client",
        "span-dropped", "span-recorded", "access-log-stock", "access-log",
        "access-log-json-dumps",
    }  # fmt: skip
    for name, row in summary.items():
        assert len(report["rounds"][name]) == 2, name
        assert row["us_per_call_median"] > 0, name
    assert summary["read"]["share_of_read_median"] == 1.0
    # A whole read costs more than any one SDK call inside it.
    assert summary["record"]["us_per_call_median"] < summary["read"]["us_per_call_median"]
    assert report["metrics_floor"]["us_median"] > 0
    assert set(report["telemetry_added_us_median"]) == {
        "read+telemetry", "read+telemetry-no-span", "read+fastapi-telemetry"
    }  # fmt: skip
    assert out.with_suffix(".md").read_text().startswith("# What the OpenTelemetry SDK")


def test_the_route_cost_benchmark_writes_a_complete_report(tmp_path: Path) -> None:
    out = tmp_path / "route-cost"
    argv = ["--rounds", "2", "--calls", "20", "--no-lock", "--out", str(out)]
    assert bench_route_cost.main(argv) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert reports.problems(report) == []
    assert set(report["summary"]) == {
        "path-only", "params", "dependency", "by-hand", "probes-first", "domain-first",
    }  # fmt: skip
    for name, row in report["summary"].items():
        assert len(report["rounds"][name]) == 2, name
        assert row["us_per_request_median"] > 0, name
    assert len(report["saved_by_hand"]["us_range"]) == 2
    assert len(report["saved_domain_first"]["us_range"]) == 2
    assert out.with_suffix(".png").stat().st_size > 0
    assert out.with_suffix(".md").read_text().startswith("# What FastAPI's parameters")


def test_a_server_boots_on_any_core_and_is_pinned_to_its_own_once_ready(tmp_path: Path) -> None:
    """Every thread of a ready server runs on its core only (what wrk measures)."""
    require(shutil.which("taskset") is not None, "taskset is not installed (util-linux)")
    core = _cores()[-1]
    port = wrkbench.free_port()
    server = wrkbench.start(
        "probe",
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        port=port,
        env=dict(os.environ),
        core=core,
        log_dir=tmp_path,
    )
    try:
        wrkbench.wait_ready(server, "/")
        tasks = list(Path(f"/proc/{server.pid}/task").iterdir())
        assert tasks
        assert {tuple(sorted(os.sched_getaffinity(int(t.name)))) for t in tasks} == {(core,)}
    finally:
        wrkbench.stop(server)
