"""The scale-out and node-loss experiments, shrunk to seconds: the code works end to end.

These check that each experiment brings up its lab, drives it, measures,
audits and writes its report, not how fast this machine is: figures are
checked for shape, never against a threshold.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from deploy.lab import cgroups
from loadtests import report as reports
from loadtests.experiments import nodeloss, scaleout
from tests.support import require

pytestmark = pytest.mark.cluster


@pytest.fixture(autouse=True)
def _lab_parts() -> None:
    require(
        shutil.which("haproxy") is not None or os.path.exists("/usr/sbin/haproxy"),
        "haproxy is not installed",
    )
    try:
        cgroups.check_available()
    except cgroups.CgroupsUnavailable as exc:
        require(False, str(exc))


def test_scaleout_smoke_writes_a_complete_report(tmp_path):
    out = tmp_path / "scaleout"
    assert scaleout.main(["--smoke", "--out", str(out)]) == 0
    saved = json.loads(out.with_suffix(".json").read_text())
    assert reports.problems(saved) == []
    assert saved["command"] == f"python -m loadtests.experiments.scaleout --smoke --out {out}"
    assert [row["n"] for row in saved["rows"]] == list(scaleout.SMOKE.ns)
    for row in saved["rows"]:
        assert row["throughput_rps"] > 0
        assert row["efficiency"] > 0
        assert row["p50_ms"] > 0
    assert saved["rows"][0]["efficiency"] == pytest.approx(1.0)
    for point in saved["points"]:
        # The validity checks ran on real samples of every node and the load generator.
        assert set(point["nodes"]) == {f"n{i}" for i in range(1, point["n"] + 1)}
        assert point["loadgen_cpu_cores"] is not None
        assert isinstance(point["valid"], bool)
    assert "| N | X(N) req/s |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_usl_fit_recovers_known_parameters():
    points = [
        {"n": n, "throughput_rps": scaleout.usl(n, 100.0, 0.03, 0.001)} for n in (1, 2, 4, 8, 16)
    ]
    fit = scaleout.fit_usl(points)
    assert fit is not None
    assert fit["lambda"] == pytest.approx(100.0, rel=1e-3)
    assert fit["sigma"] == pytest.approx(0.03, abs=1e-4)
    assert fit["kappa"] == pytest.approx(0.001, abs=1e-5)


def test_nodeloss_smoke_runs_the_drill_and_audits(tmp_path):
    out = tmp_path / "nodeloss"
    assert nodeloss.main(["--smoke", "--out", str(out)]) == 0
    saved = json.loads(out.with_suffix(".json").read_text())
    assert reports.problems(saved) == []
    assert set(saved["runs"]) == {"saturation", "steady"}
    for name, run in saved["runs"].items():
        events = [e["event"] for e in run["events"]]
        assert events == ["drain n1", "restart n1", "kill n2", "restart n2"], name
        assert all(e["error"] is None for e in run["events"]), run["events"]
        # A killed node is out of HAProxy's rotation within a second (it
        # observes live traffic), a drained one as soon as its agent says so.
        left = {
            e["event"]: e["out_of_rotation_s"] for e in run["events"] if "out_of_rotation_s" in e
        }
        assert set(left) == {"drain n1", "kill n2"}, run["events"]
        assert all(s is not None and s < 1.0 for s in left.values()), left
        assert run["audit"]["acknowledged"] > 0
        assert run["audit"]["lost"] == 0
        assert run["audit"]["duplicated"] == 0
        assert len(run["timeline"]) >= nodeloss.SMOKE.duration_s - 1
    assert saved["runs"]["steady"]["offered_rps"] > 0
    assert "| drain n1 |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 10_000
