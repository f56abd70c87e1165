"""The bus benchmark shrunk to seconds: it measures end to end and writes a complete report."""

from __future__ import annotations

import json
from pathlib import Path

from loadtests import report as reports
from loadtests.benchmarks import bus as bench_bus


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
