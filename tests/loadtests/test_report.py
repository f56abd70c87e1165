"""Every result file keeps the one metadata layout, so a new writer cannot drift."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loadtests import REPO_ROOT as REPO
from loadtests import report as reports

RESULT_FILES = sorted(reports.RESULTS.glob("*.json"))


def test_there_are_result_files_to_check() -> None:
    assert RESULT_FILES, f"no result files in {reports.RESULTS}"


@pytest.mark.parametrize("path", RESULT_FILES, ids=lambda path: path.name)
def test_result_file_keeps_the_metadata_layout(path: Path) -> None:
    report = json.loads(path.read_text())
    assert reports.problems(report) == []
    assert list(report)[: len(reports.METADATA)] == list(reports.METADATA)
    # Its markdown was rendered from it by the writer: same sentence, same command.
    markdown = path.with_suffix(".md").read_text()
    assert reports.measured(report) in markdown
    assert report["command"] in markdown


def test_this_machine_fills_every_fact() -> None:
    metadata = reports.metadata("python -m loadtests.benchmarks.efficiency")
    assert reports.problems(metadata) == []
    assert all(value is not None for value in metadata["machine"].values())


@pytest.mark.parametrize(
    ("drift", "complaint"),
    [
        ({"measured_at": "2026-11-25T11:43:00+00:00"}, "measured_at is now date"),
        ({"setup": {"cpus": 2}}, "setup.cpus belongs in the metadata"),
        ({"date": "2026-11-25 11:43 UTC"}, "is not an ISO 8601 time"),
        ({"command": "python -m loadtests.bench_efficiency"}, "names no module"),
        ({"command": "make bench-efficiency"}, "is not `python -m loadtests"),
    ],
)
def test_the_writer_refuses_a_report_that_drifts(
    tmp_path: Path, drift: dict[str, object], complaint: str
) -> None:
    report = reports.metadata("python -m loadtests.benchmarks.efficiency") | drift
    with pytest.raises(ValueError, match="strays from the metadata layout") as refused:
        reports.write(report, tmp_path / "drifted", lambda report: "")
    assert complaint in str(refused.value)
    assert not (tmp_path / "drifted.json").exists()


def test_render_rewrites_the_markdown_from_the_saved_figures(tmp_path: Path) -> None:
    report = reports.stamped("python -m loadtests.benchmarks.efficiency", {"figure": 1})
    out = tmp_path / "result"
    reports.write(report, out, lambda report: f"{reports.measured(report)} v1\n")

    assert reports.render(out, lambda report: f"figure {report['figure']}\n") == report
    assert out.with_suffix(".md").read_text() == "figure 1\n"
    assert json.loads(out.with_suffix(".json").read_text()) == report


_MEASURE_UNTIL_TERMINATED = """
import sys, time
from pathlib import Path
from loadtests import report

tmp = Path(sys.argv[1])

def measure():
    try:
        (tmp / "started").write_text("")
        time.sleep(60)
    finally:
        (tmp / "cleaned").write_text("")  # as an experiment takes its lab down
    return {}

if sys.argv[2] == "main":
    report.main("t", tmp / "out", render_only=False, measure=measure, markdown=str, lock=False)
else:  # the control: the same measurement outside report.main
    measure()
"""


@pytest.mark.parametrize(("how", "cleaned"), [("main", True), ("bare", False)])
def test_sigterm_ends_a_measurement_through_its_finally_blocks(
    tmp_path: Path, how: str, cleaned: bool
) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _MEASURE_UNTIL_TERMINATED, str(tmp_path), how], cwd=REPO
    )
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "started").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (tmp_path / "started").exists()
        child.send_signal(signal.SIGTERM)
        code = child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)
    assert (tmp_path / "cleaned").exists() is cleaned
    assert code == (128 + signal.SIGTERM if cleaned else -signal.SIGTERM)
