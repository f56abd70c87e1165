"""The bus benchmark shrunk to seconds: it measures end to end and writes a complete report."""

from __future__ import annotations

import json
from pathlib import Path

from loadtests import report as reports
from loadtests.benchmarks import bus as bench_bus
from loadtests.benchmarks import bus_stall as bench_bus_stall


def test_bus_benchmark_writes_a_complete_report(tmp_path: Path) -> None:
    out = tmp_path / "bus"
    code = bench_bus.main(
        ["--nodes=3", "--writes-per-s=50", "--seconds=2", "--idle-seconds=1",
         f"--out={out}", "--no-lock"]
    )  # fmt: skip
    assert code == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert reports.problems(report) == []
    assert report["deliveries"] == report["deliveries_expected"] > 0
    assert report["losses_after_start"] == 0
    assert report["latency_ms"]["p99"] is not None
    assert len(report["cpu_share_per_node"]["writes"]) == 3
    assert "publish to applied, p99" in out.with_suffix(".md").read_text()


def test_bus_stall_benchmark_stops_a_peer_and_writes_a_complete_report(tmp_path: Path) -> None:
    out = tmp_path / "bus-stall"
    code = bench_bus_stall.main(
        ["--rate=500", "--stopped-s=2", "--window-s=1", f"--out={out}", "--no-lock"]
    )
    assert code == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert reports.problems(report) == []
    assert [w["phase"] for w in report["windows"]] == ["before", "stopped", "stopped", "after"]
    # The flood is real: the node's own counter saw about the rate asked for.
    assert 350 <= report["sent_per_s"] <= 650
    assert report["rss_growth_stopped_bytes"] is not None
    assert report["stopped_at_s"] < report["continued_at_s"]
    assert all(w["requests"] > 0 and w["non_2xx"] == 0 for w in report["windows"])
    assert out.with_suffix(".png").stat().st_size > 0
