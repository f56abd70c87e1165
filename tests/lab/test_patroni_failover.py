"""HA mode: the primary's postgres is killed under write load; no acknowledged write is lost.

The experiment itself lives in loadtests/experiments/failover.py
(`python -m loadtests.experiments.failover` writes the measured figures to
docs/results/); this test runs it and asserts on its audit and its progress
lines. On the same cluster, the lab's `kill-primary` drill then fails it over
once more, as a presenter would from a second terminal.
"""

from __future__ import annotations

import json
import re
import shutil
from typing import Any

import pytest

from deploy.lab import cli, drills
from deploy.lab.patroni import PatroniCluster, PatroniNotInstalled
from deploy.lab.postgres import PostgresNotInstalled
from loadtests.experiments import failover
from tests.conftest import scratch_dir
from tests.support import require


@pytest.mark.postgres
@pytest.mark.cluster
@pytest.mark.timeout(420)
def test_writes_resume_on_the_new_primary_and_none_is_lost_or_duplicated(capsys):
    base = scratch_dir("cattle-failover-")
    try:
        PatroniCluster(base / "probe")  # only checks that patroni, etcd and PostgreSQL exist
    except (PatroniNotInstalled, PostgresNotInstalled) as exc:
        shutil.rmtree(base, ignore_errors=True)
        require(False, str(exc))
    drill: dict[str, Any] = {}

    def kill_primary_drill(cluster: PatroniCluster) -> None:
        # A lab whose database is this cluster: `python -m deploy.lab kill-primary` on it.
        lab_dir = base / "lab"
        lab_dir.mkdir()
        database = cluster.to_json() | {"kind": "patroni"}
        (lab_dir / "lab.json").write_text(json.dumps({"database": database}))
        drill["leader"] = cluster.leader()
        drill["code"] = cli.main(["kill-primary", "--run-dir", str(lab_dir)])
        drill["events"] = drills.read_events(lab_dir)[0]

    # Writes resume a few seconds after the kill (docs/results/failover.md): 10 s of
    # load after it leave room for writes acknowledged on the new primary.
    result = failover.run(
        base, failover.LoadPlan(duration_s=14, kill_at_s=4), then=kill_primary_drill
    )
    captured = capsys.readouterr()
    printed = captured.out
    timing, audit = result["timing"], result["audit"]
    kept = f"(node log kept in {base})"

    assert result["new_leader"] != result["old_leader"]
    assert result["audited_on"] == result["new_leader"]  # the multi-host DSN found it
    assert audit["acknowledged"] > 0 and timing["acked_before_kill"] > 0
    assert audit["lost"] == [], f"acknowledged writes missing on the new primary {kept}"
    assert audit["duplicated"] == [], f"one key, several notes {kept}"
    assert audit["unexpected"] == [], f"notes nobody sent {kept}"
    # Writes resumed through the same, never restarted, node.
    assert result["node_alive"], f"the node died {kept}"
    assert timing["acked_after_kill"] > 0, f"no write acknowledged after the kill {kept}"
    assert timing["unavailable_s"] is not None and timing["unavailable_s"] < 30, kept
    # Every refusal said what it was: a 503 database-unavailable, a 409 in flight, or a
    # broken connection; never a 500 or another answer.
    assert timing["unexpected_outcomes"] == [], f"{timing['failed_attempts']} {kept}"

    # While it ran, it said what it was doing, the time in and (once writing) the time left.
    times, left = r", [\d.]+ min in", r", about [\d.]+ min left"
    during = r"failover \(kill -9 of the primary\)"
    expected = [
        rf"failover: 3 PostgreSQL members under Patroni and etcd coming up{times}",
        rf"failover: migrating, then one service node coming up{times}",
        rf"{during}, 4 clients writing for 14 s, the primary's postgres killed at \+4 s"
        rf"{times}{left}",
        rf"{during}: \+[\d.]+ s killed postgres of {result['old_leader']} "
        rf"\(pid {result['killed_pid']}\), waiting for a new leader{times}{left}",
        rf"{during}: \+[\d.]+ s {result['new_leader']} leads{times}{left}",
        rf"{during}: {result['writes_sent']} writes sent, auditing them on the new "
        rf"primary{times}{left}",
    ]
    lines = [line for line in printed.splitlines() if line.startswith("failover")]
    assert len(lines) == len(expected), printed
    for pattern, line in zip(expected, lines, strict=True):
        assert re.fullmatch(pattern, line), (pattern, line)

    # The lab's drill verb on the same cluster: says what it does, fails the primary
    # over, and logs the drill for the live view.
    assert drill["code"] == 0, printed + captured.err
    assert "kill-primary: SIGKILL of the database primary's PostgreSQL" in printed
    assert "  watch for: requests that reach the database are answered 503" in printed
    done = re.search(
        r"done in ([\d.]+) s: killed postgres of (\w+) \(pid \d+\); (\w+) leads after "
        r"([\d.]+) s",
        printed,
    )
    assert done is not None, printed
    assert done[2] == drill["leader"] and done[3] != drill["leader"], printed
    assert [e["phase"] for e in drill["events"]] == ["issued", "done"]
    assert drill["events"][-1]["verb"] == "kill-primary"
    assert drill["events"][-1]["detail"].startswith(f"killed postgres of {drill['leader']}")
    shutil.rmtree(base, ignore_errors=True)


def test_the_audit_catches_lost_duplicated_and_unexpected_notes():
    """So the assertions above are not vacuous."""

    def acked(key: str, note_id: str) -> failover.Write:
        write = failover.Write(key, note_id=note_id)
        write.attempts.append(failover.Attempt(0.0, 0.1, "201"))
        return write

    writes = [acked("k1", "id1"), acked("k2", "id2"), acked("k3", "id3"), failover.Write("k4")]
    rows = [("id1", "k1"), ("id2", "k2"), ("id2b", "k2"), ("id4", "k4"), ("idx", "stranger")]
    result = failover.audit(writes, rows)

    assert result["lost"] == ["k3"]
    assert result["duplicated"] == ["k2"]
    assert result["unacknowledged"] == ["k4"]
    assert result["unexpected"] == ["stranger"]
    # An acknowledged id that is not the one in the table counts as lost, too.
    assert failover.audit([acked("k1", "other")], [("id1", "k1")])["lost"] == ["k1"]
