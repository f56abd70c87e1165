"""Failover experiment: kill -9 the primary's postgres under a write load, then audit.

A Patroni cluster (synchronous mode) and one service node that reaches it through the
multi-host DSN; a few clients create notes, each with its own Idempotency-Key and the key as
its title, retrying the same key on 503, 409 and connection errors. A few seconds in, the
leader's postmaster gets SIGKILL. Afterwards every acknowledged note must be on the new
primary exactly once, and we measure how long writes were unavailable.

`python -m loadtests.experiments.failover` runs it once and writes docs/results/failover.{md,json};
tests/lab/test_patroni_failover.py runs the same code and asserts the audit.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from deploy.lab.node import REPO_ROOT, Node
from deploy.lab.patroni import PatroniCluster
from deploy.lab.postgres import find_bindir
from loadtests import report as reports
from loadtests.harness.progress import Runs

RETRIED_STATUSES = {409, 500, 502, 503, 504}  # same key again: safe, it cannot duplicate
EXPECTED_REFUSALS = {  # what a failover may answer, and must say so
    503: "urn:cattle:problem:database-unavailable",
    409: "urn:cattle:problem:idempotency-key-in-flight",
}


@dataclass
class Attempt:
    started_s: float  # seconds since the load started
    ended_s: float
    outcome: str  # "201", "503", "409", "500 <type>", or an httpx exception name


@dataclass
class Write:
    key: str
    attempts: list[Attempt] = field(default_factory=list)
    note_id: str | None = None  # from the 201
    replayed: bool = False  # the 201 was a replay: an earlier attempt had committed

    @property
    def acked_s(self) -> float | None:
        return self.attempts[-1].ended_s if self.note_id else None


@dataclass
class LoadPlan:
    duration_s: float = 25.0  # new writes start for this long
    kill_at_s: float = 5.0
    clients: int = 4
    interval_s: float = 0.05  # per client between writes: a bounded load, not a flood
    write_deadline_s: float = 30.0  # retries of one key; longer than the 10 s lease
    attempt_timeout_s: float = 5.0


async def write_load(base_url: str, prefix: str, plan: LoadPlan, t0: float) -> list[Write]:
    """``plan.clients`` writers until ``plan.duration_s``; each write retried to a bound."""
    writes: list[Write] = []

    async def client(http: httpx.AsyncClient, n: int) -> None:
        seq = 0
        while time.monotonic() - t0 < plan.duration_s:
            seq += 1
            write = Write(f"{prefix}{n}-{seq}")
            writes.append(write)
            await _create(http, write, plan, t0)
            await asyncio.sleep(plan.interval_s)

    timeout = httpx.Timeout(plan.attempt_timeout_s)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout) as http:
        await asyncio.gather(*(client(http, n) for n in range(plan.clients)))
    return writes


async def _create(http: httpx.AsyncClient, write: Write, plan: LoadPlan, t0: float) -> None:
    deadline, backoff_s = time.monotonic() + plan.write_deadline_s, 0.05
    while time.monotonic() < deadline:
        started = time.monotonic() - t0
        wait_s = backoff_s = min(backoff_s * 2, 1.0)
        try:
            response = await http.post(
                "/v1/notes",
                json={"title": write.key, "body": "failover audit"},
                headers={"Idempotency-Key": write.key},
            )
        except httpx.TransportError as exc:
            outcome = type(exc).__name__
        else:
            outcome = str(response.status_code)
            kind = "" if response.status_code == 201 else _problem_type(response)
            if kind != EXPECTED_REFUSALS.get(response.status_code, ""):
                outcome += f" {kind or 'without a problem type'}"  # an unexpected answer
            if response.status_code == 201:
                write.note_id = str(response.json()["id"])
                write.replayed = response.headers.get("idempotent-replayed") == "true"
            elif response.status_code == 409:
                wait_s = min(float(response.headers.get("retry-after", 1)), 1.0)
        write.attempts.append(Attempt(started, time.monotonic() - t0, outcome))
        status = int(outcome.split()[0]) if outcome[0].isdigit() else None
        if status is not None and status not in RETRIED_STATUSES:
            return  # acknowledged (201), or an answer that retrying would not change
        await asyncio.sleep(wait_s)


def _problem_type(response: httpx.Response) -> str:
    try:
        return str(response.json().get("type", ""))
    except (ValueError, AttributeError):
        return ""


async def notes_with_prefix(dsn: str, prefix: str) -> tuple[list[tuple[str, str]], int]:
    """(id, title) of every note whose title starts with ``prefix``, and the server's port."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        rows = await conn.fetch(
            "SELECT id::text, title FROM notes WHERE starts_with(title, $1)", prefix
        )
        port = await conn.fetchval("SELECT inet_server_port()")
    finally:
        await conn.close()
    return [(r["id"], r["title"]) for r in rows], int(port)


def audit(writes: list[Write], rows: list[tuple[str, str]]) -> dict[str, Any]:
    """Every acknowledged write exactly once; anything else in the table, explained."""
    titles = collections.Counter(title for _, title in rows)
    present = set(rows)
    sent = {w.key for w in writes}
    acked = {w.key: w.note_id for w in writes if w.note_id}
    return {
        "acknowledged": len(acked),
        "rows": len(rows),
        "lost": sorted(k for k, note_id in acked.items() if (note_id, k) not in present),
        "duplicated": sorted(t for t, n in titles.items() if n > 1),
        # Sent and retried to the deadline without an answer, yet committed: in doubt, allowed.
        "unacknowledged": sorted(t for t in titles if t in sent and t not in acked),
        "unexpected": sorted(t for t in titles if t not in sent),  # impossible if all is well
    }


def measure(writes: list[Write], killed_s: float, promoted_s: float) -> dict[str, Any]:
    """When writes stopped and resumed around the kill, and what clients saw meanwhile."""
    attempts = [a for w in writes for a in w.attempts]
    acks = sorted(a for w in writes if (a := w.acked_s) is not None)
    # Resumed: the first write acknowledged whose attempt began after the kill.
    resumed = min(
        (a.ended_s for a in attempts if a.outcome == "201" and a.started_s >= killed_s),
        default=None,
    )
    failed = [a for a in attempts if a.outcome != "201"]
    outcomes = collections.Counter(a.outcome for a in failed)
    latencies = [w.attempts[-1].ended_s - w.attempts[0].started_s for w in writes if w.note_id]
    return {
        "killed_at_s": round(killed_s, 3),
        "new_leader_at_s": round(promoted_s, 3),
        "resumed_at_s": None if resumed is None else round(resumed, 3),
        "unavailable_s": None if resumed is None else round(resumed - killed_s, 3),
        "last_ack_before_kill_s": round(max((t for t in acks if t < killed_s), default=0), 3),
        "max_gap_between_acks_s": round(max((b - a for a, b in pairwise(acks)), default=0), 3),
        "acked_before_kill": sum(t < killed_s for t in acks),
        "acked_after_kill": sum(t >= killed_s for t in acks),
        # Begun before writes resumed, acknowledged after the kill: rode through the failover.
        "acked_through_failover": sum(
            w.acked_s is not None
            and w.acked_s >= killed_s
            and w.attempts[0].started_s < (resumed if resumed is not None else float("inf"))
            for w in writes
        ),
        "retried_writes": sum(len(w.attempts) > 1 for w in writes),
        "replayed_after_error": sum(w.replayed for w in writes),
        "max_write_latency_s": round(max(latencies, default=0.0), 3),
        "failed_attempts": dict(outcomes.most_common()),
        "unexpected_outcomes": sorted(o for o in outcomes if not _expected(o)),
        "errors_from_s": round(min((a.started_s for a in failed), default=0.0), 3),
        "errors_until_s": round(max((a.ended_s for a in failed), default=0.0), 3),
    }


def _expected(outcome: str) -> bool:
    """What a failover may answer: 503 database-unavailable or 409 in flight (not done), or a
    broken connection (in doubt); each is retried with the same key, so none can duplicate."""
    return outcome in ("503", "409") or not outcome[0].isdigit()


async def _drive(
    cluster: PatroniCluster, node: Node, plan: LoadPlan, lines: Runs
) -> dict[str, Any]:
    prefix = f"fo-{uuid.uuid4().hex[:8]}-"
    t0 = time.monotonic()
    lines.begin(
        f"{plan.clients} clients writing for {plan.duration_s:g} s, "
        f"the primary's postgres killed at +{plan.kill_at_s:g} s"
    )
    load = asyncio.create_task(write_load(node.base_url, prefix, plan, t0))
    await asyncio.sleep(plan.kill_at_s)
    old = await asyncio.to_thread(cluster.leader)
    pid = await asyncio.to_thread(cluster.kill_postgres, old)
    killed_s = time.monotonic() - t0
    lines.note(f"+{killed_s:.1f} s killed postgres of {old} (pid {pid}), waiting for a new leader")
    new = await asyncio.to_thread(cluster.wait_for_new_leader, old, 60)
    promoted_s = time.monotonic() - t0
    lines.note(f"+{promoted_s:.1f} s {new} leads")
    writes = await load
    lines.note(f"{len(writes)} writes sent, auditing them on the new primary")
    rows, port = await notes_with_prefix(cluster.primary_dsn("cattle"), prefix)
    lines.end()
    audited_on = next(m.name for m in cluster.members if m.port == port)
    return {
        "old_leader": old,
        "killed_pid": pid,
        "new_leader": new,
        "audited_on": audited_on,
        "writes_sent": len(writes),
        "timing": measure(writes, killed_s, promoted_s),
        "audit": audit(writes, rows),
        "timeline": _timeline(writes),
    }


def _timeline(writes: list[Write]) -> list[dict[str, int]]:
    """Per second: acknowledged writes and failed attempts."""
    acks = collections.Counter(int(a) for w in writes if (a := w.acked_s) is not None)
    fails = collections.Counter(
        int(a.ended_s) for w in writes for a in w.attempts if a.outcome != "201"
    )
    last = max([*acks, *fails], default=0)
    return [{"s": s, "acked": acks[s], "failed": fails[s]} for s in range(last + 1)]


def run(
    base_dir: Path,
    plan: LoadPlan | None = None,
    then: Callable[[PatroniCluster], Any] | None = None,
) -> dict[str, Any]:
    """The whole experiment in ``base_dir``: cluster, migration, node, load, kill, audit.

    Prints its progress as it goes: what it is doing, the minutes in and, once the
    writes begin, an estimate of the minutes left (from the plan's duration).
    `then` is handed the cluster, still up, after the audit (a test's second failover)."""
    plan = plan or LoadPlan()
    lines = Runs("failover", [plan.duration_s], ["kill -9 of the primary"])
    cluster = PatroniCluster(base_dir)  # its members and etcd in subdirectories
    node: Node | None = None
    try:
        lines.say(f"{len(cluster.members)} PostgreSQL members under Patroni and etcd coming up")
        cluster.start()
        cluster.create_database("cattle")
        dsn = cluster.primary_dsn("cattle")
        env = {
            "CATTLE_DATABASE_URL": dsn,
            "CATTLE_ENVIRONMENT": "production",
            "CATTLE_CURSOR_SECRET": "failover-experiment-cursor-secret",
            "CATTLE_DATA_DIR": str(base_dir / "node"),
            "CATTLE_DRAIN_DELAY_S": "0",
        }
        lines.say("migrating, then one service node coming up")
        _migrate(env)
        node = Node(base_dir / "node.log", env=env, name="node1").start(timeout_s=60)
        result = asyncio.run(_drive(cluster, node, plan, lines))
        if then is not None:
            then(cluster)
        # The same process served before, during and after: writes resumed without a restart.
        return result | {
            "plan": asdict(plan),
            "dsn": dsn,
            "node_pid": node.pid,
            "node_alive": node.alive,
        }
    finally:
        if node is not None:
            node.stop(timeout_s=20)
        cluster.remove()


def _migrate(env: dict[str, str]) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CATTLE_")}
    proc = subprocess.run(
        [sys.executable, "-m", "service", "migrate"], cwd=REPO_ROOT, env=clean | env,
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"migrate failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")


def _versions() -> dict[str, str]:
    """The cluster's components (the machine and Python are in the report's metadata)."""

    def first_line(*argv: str) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        text = (out.stdout or out.stderr).strip()
        return text.splitlines()[0] if text else "?"

    return {
        "patroni": first_line("patroni", "--version"),
        "etcd": first_line("etcd", "--version"),
        "postgres": first_line(str(find_bindir() / "postgres"), "--version"),
    }


def markdown(result: dict[str, Any]) -> str:
    t, a, plan, v = result["timing"], result["audit"], result["plan"], result["versions"]
    failed = ", ".join(f"{k}: {v}" for k, v in t["failed_attempts"].items()) or "none"
    figures = [
        ("**writes unavailable**: kill to the first write acknowledged that began after it",
         f"**{t['unavailable_s']} s** (target: under 10 s)"),
        ("new leader accepting writes (Patroni, seen by polling every 0.2 s)",
         f"{result['new_leader']} at +{t['new_leader_at_s'] - t['killed_at_s']:.2f} s"),
        ("longest gap between two acknowledged writes", f"{t['max_gap_between_acks_s']} s"),
        ("slowest acknowledged write, retries included", f"{t['max_write_latency_s']} s"),
        ("writes acknowledged before the kill / after it (of which begun before writes resumed)",
         f"{t['acked_before_kill']} / {t['acked_after_kill']} ({t['acked_through_failover']})"),
        ("writes retried / acknowledged by a replay after an error",
         f"{t['retried_writes']} / {t['replayed_after_error']}"),
        ("failed attempts by outcome", failed),
        ("outcomes other than 503 database-unavailable, 409 in flight, broken connection",
         ", ".join(t["unexpected_outcomes"]) or "none"),
    ]  # fmt: skip
    timeline = [
        f"| {r['s']} | {r['acked']} | {r['failed']} |"
        for r in result["timeline"]
        if -3 <= r["s"] - t["killed_at_s"] <= 12
    ]
    return f"""# Failover: kill -9 of the primary's postgres under write load

{reports.measured(result)}

One run of `{result["command"]}`; the figures vary from run to run. Lab HA
mode: 3 PostgreSQL members under Patroni with one etcd, synchronous mode on (not strict),
`ttl` 10 s, `loop_wait` 1 s, `retry_timeout` 3 s, `primary_start_timeout` 0
(deploy/patroni/patroni.yml.tmpl). One service node reaches the primary through the
multi-host DSN with `target_session_attrs=read-write` and is never restarted.
{plan["clients"]} clients create notes for {plan["duration_s"]:.0f} s, each note with its own
Idempotency-Key, retrying the same key on 503, 409 and broken connections; at
{t["killed_at_s"]:.1f} s the leader's postmaster ({result["old_leader"]}) gets SIGKILL.

## Result

| | |
| --- | --- |
{chr(10).join(f"| {label} | {value} |" for label, value in figures)}

Audit on {result["audited_on"]} (the new primary) of every note the run created:
{a["acknowledged"]} acknowledged, {a["rows"]} rows; **lost {len(a["lost"])}, duplicated
{len(a["duplicated"])}**; committed but never acknowledged (in doubt, allowed):
{len(a["unacknowledged"])}; unexpected: {len(a["unexpected"])}.

Clients retry after 0.1 s, doubling up to 1 s, so they notice the new primary up to a
second after it accepts writes: "writes unavailable" is what a client lived through, and it
can overstate the database's own gap by that much (the errors ended at
{t["errors_until_s"]:.2f} s).

## Timeline (1 s buckets around the kill)

| second | acknowledged | failed attempts |
| --- | --- | --- |
{chr(10).join(timeline)}

## Reproduce

```
{result["command"]}   # as root: PostgreSQL, Patroni and etcd run as `postgres`
```

Versions: {v["patroni"]}; {v["etcd"]}; {v["postgres"]}. The machine was shared with
other work. Raw numbers: failover.json.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.experiments.failover", description=__doc__
    )
    parser.add_argument(
        "--out", type=Path, default=reports.RESULTS / "failover", help="writes OUT.json and OUT.md"
    )
    parser.add_argument(
        "--render", action="store_true", help="only rewrite OUT.md from the saved OUT.json"
    )
    parser.add_argument("--duration-s", type=float, default=LoadPlan.duration_s)
    parser.add_argument("--kill-at-s", type=float, default=LoadPlan.kill_at_s)
    parser.add_argument("--clients", type=int, default=LoadPlan.clients)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    plan = LoadPlan(duration_s=args.duration_s, kill_at_s=args.kill_at_s, clients=args.clients)

    def measure() -> dict[str, Any]:
        # Under /tmp: the servers run as the postgres OS user, which must reach the directory.
        base = Path(tempfile.mkdtemp(prefix="cattle-failover-", dir="/tmp"))
        try:
            result = run(base, plan)
        except BaseException:
            print(f"failed; logs kept in {base}", file=sys.stderr)
            raise
        shutil.rmtree(base, ignore_errors=True)
        command = reports.command_line(__spec__.name, argv)
        return reports.stamped(command, result | {"versions": _versions()})

    result = reports.main(
        "failover", args.out, render_only=args.render, measure=measure, markdown=markdown
    )
    if result is None:
        return 0
    t, a = result["timing"], result["audit"]
    print(
        f"unavailable {t['unavailable_s']} s; acknowledged {a['acknowledged']}, lost "
        f"{len(a['lost'])}, duplicated {len(a['duplicated'])}; wrote {args.out}.md"
    )
    return 0 if not (a["lost"] or a["duplicated"]) and t["unavailable_s"] is not None else 1


if __name__ == "__main__":
    sys.exit(main())
