"""Database faults against a real node process: a burst of keyed writes, a
frozen primary, a broken path to it, reads while the primary is down.

Faults are real: the primary's processes stopped with SIGSTOP (a frozen
server accepts bytes and answers nothing, which no server-side timeout can
end), and the lab's TCP fault proxy (deploy/lab/faultproxy.py) between the
node and PostgreSQL stalling, resetting or cutting its connections. The
tests stop only processes of the cluster they started, by PID, and always
send SIGCONT (or put the proxy back to `pass`) before anything is removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.lab.faultproxy import FaultProxy
from deploy.lab.node import Node, Reply
from deploy.lab.postgres import PostgresCluster, PostgresError, parent_pid, postmaster_pid
from tests import hardening
from tests.conftest import TEMPLATE_DB, migrated_template, postgres_cluster
from tests.support import wait_until
from tests.system.conftest import StartNode

pytestmark = pytest.mark.postgres

BURST = 100

# Small client-side bounds so a frozen primary is answered quickly; the
# defaults and their fit under HAProxy are tested in tests/db/test_timeouts.py.
REQUEST_TIMEOUT_S = 3.0
FAULT_ENV = {
    "CATTLE_DB_REQUEST_TIMEOUT_S": str(REQUEST_TIMEOUT_S),
    "CATTLE_DB_COMMAND_TIMEOUT_S": "2",
    "CATTLE_DB_CONNECT_TIMEOUT_S": "1",
    "CATTLE_DB_POOL_TIMEOUT_S": "1",
    "CATTLE_HEALTH_INTERVAL_S": "0.2",
    "CATTLE_HEALTH_TIMEOUT_S": "0.5",
}
# What a loaded two-core machine may add to the bound: process scheduling,
# the HTTP round trip, the problem's rendering.
SLACK_S = 2.0


def post_note(node: Node, title: str, *, key: str | None = None, timeout_s: float = 30) -> Reply:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Idempotency-Key"] = key
    body = json.dumps({"title": title, "body": "b"}).encode()
    return node.request("POST", "/v1/notes", body=body, headers=headers, timeout_s=timeout_s)


def count_titles(cluster: PostgresCluster, dbname: str, prefix: str) -> int:
    assert re.fullmatch(r"[a-z0-9-]+", prefix), prefix  # the tests' own prefixes only
    query = f"SELECT count(*) FROM notes WHERE title LIKE '{prefix}%'"  # noqa: S608
    out = cluster.psql(query, dbname=dbname).strip()
    return int(out.split()[-1]) if out else 0


# -- a burst of keyed creates -------------------------------------------------------


def test_a_burst_of_keyed_creates_on_fresh_connections_is_all_answered(
    start_node: StartNode, postgres: PostgresCluster
) -> None:
    """Each keyed create holds one pooled connection (its key's lock and its
    work share it), so BURST of them at once wait their turn for the pool
    instead of holding half of it for locks: none is answered 503."""
    dbname = f"burst_{uuid.uuid4().hex[:8]}"
    postgres.create_database(dbname, template=TEMPLATE_DB)
    try:
        node = start_node({"CATTLE_DATABASE_URL": postgres.primary_dsn(dbname)})
        barrier = threading.Barrier(BURST)
        replies: list[Reply | BaseException] = [RuntimeError("not sent")] * BURST
        waits = [0.0] * BURST

        def send(i: int) -> None:
            barrier.wait(timeout=30)
            started = time.monotonic()
            try:
                replies[i] = post_note(node, f"burst-{i}", key=f"burst-{i}")
            except BaseException as exc:  # reported below
                replies[i] = exc
            waits[i] = time.monotonic() - started

        threads = [threading.Thread(target=send, args=(i,), daemon=True) for i in range(BURST)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not any(t.is_alive() for t in threads), "requests did not finish in time"
        statuses = [r.status if isinstance(r, Reply) else repr(r) for r in replies]
        assert statuses == [201] * BURST, sorted(map(str, statuses))
        assert count_titles(postgres, dbname, "burst-") == BURST
        hardening.record(
            "burst",
            f"{BURST} keyed creates at once, fresh connections, one node",
            answer=f"201 x{BURST}",
            wait_s=max(waits),
            healthy=node.get("/readyz").status == 200,
            audit=f"{BURST} notes, one per key",
            backend="postgres",
        )
    finally:
        postgres.drop_database(dbname)


# -- a frozen primary ---------------------------------------------------------------


@pytest.fixture(scope="module")
def fault_postgres() -> Iterator[PostgresCluster]:
    """A primary and one streaming replica for these tests alone: they freeze members."""
    with postgres_cluster("cattle-fault-pg-", replicas=1) as cluster:
        yield cluster


def member_pids(cluster: PostgresCluster, name: str) -> list[int]:
    """The postmaster of `name` and every process it started."""
    pid = postmaster_pid(cluster.member(name).data_dir)
    assert pid is not None, f"{name} is not running"
    children = [int(p) for p in os.listdir("/proc") if p.isdigit() and parent_pid(int(p)) == pid]
    return [pid, *children]


def walsenders(cluster: PostgresCluster, name: str) -> list[int]:
    """The processes of `name` that stream WAL to its replicas."""
    found = []
    for pid in member_pids(cluster, name):
        with contextlib.suppress(OSError):
            if b"walsender" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
    return found


@contextlib.contextmanager
def frozen(cluster: PostgresCluster, name: str, pids: list[int] | None = None) -> Iterator[None]:
    """SIGSTOP every process of one member (or `pids` of it); SIGCONT on the
    way out, whatever happens."""
    pids = member_pids(cluster, name) if pids is None else pids
    stopped = []
    try:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
        yield
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


@pytest.fixture
def fault_db(fault_postgres: PostgresCluster) -> str:
    dbname = f"fault_{uuid.uuid4().hex[:8]}"
    migrated_template(fault_postgres, dbname)

    def on_replica() -> bool:
        try:
            query = "SELECT tablename FROM pg_tables WHERE tablename = 'notes'"
            return "notes" in fault_postgres.psql(query, member="replica1", dbname=dbname)
        except PostgresError:  # the database itself has not arrived yet
            return False

    # The replica must have the schema before a node routes reads to it.
    assert wait_until(on_replica, timeout_s=30, interval_s=0.1) is not None
    return dbname


def test_a_frozen_primary_answers_writes_503_within_the_bound_and_commits_nothing_later(
    start_node: StartNode, fault_postgres: PostgresCluster, fault_db: str
) -> None:
    node = start_node({"CATTLE_DATABASE_URL": fault_postgres.primary_dsn(fault_db), **FAULT_ENV})
    assert post_note(node, "warm-up").status == 201  # connections in the pool
    prefix = f"frozen-{uuid.uuid4().hex[:6]}-"
    waits: list[float] = []
    with frozen(fault_postgres, "primary"):
        for i, key in enumerate([None, f"{prefix}key"]):
            started = time.monotonic()
            reply = post_note(node, f"{prefix}{i}", key=key, timeout_s=REQUEST_TIMEOUT_S + 30)
            waits.append(time.monotonic() - started)
            assert reply.status == 503, reply.text
            assert reply.headers["content-type"] == "application/problem+json"
            assert json.loads(reply.body)["type"].endswith("database-unavailable")
            assert int(reply.headers["retry-after"]) >= 1
    print(f"503 after {', '.join(f'{w:.2f}' for w in waits)} s (bound {REQUEST_TIMEOUT_S} s)")
    assert max(waits) <= REQUEST_TIMEOUT_S + SLACK_S, waits
    # The primary resumes: nothing a client was told had failed may commit now.
    assert wait_until(lambda: post_note(node, "after").status == 201, timeout_s=30) is not None
    time.sleep(1.0)
    assert count_titles(fault_postgres, fault_db, prefix) == 0
    hardening.record(
        "database fault",
        "primary frozen (SIGSTOP): a POST, a keyed POST",
        answer="503 database-unavailable + Retry-After",
        wait_s=max(waits),
        healthy=wait_until(lambda: node.get("/readyz").status == 200, timeout_s=10) is not None,
        audit="0 of the refused writes committed after the resume",
        backend="postgres",
    )


# -- a broken path to the primary (the fault proxy) --------------------------------

PROXY_FAULTS = {
    # Accepts and goes silent, like a half-open path: only the node's own bound ends it.
    "stall": "proxy stalls: open and new connections silent",
    # Every open connection reset, every new one reset on accept.
    "reset": "proxy resets every connection",
    # A few bytes of the next answer, then the connection closed mid-message.
    "cut 10": "proxy cuts each answer after 10 bytes",
}


@pytest.mark.parametrize("fault", list(PROXY_FAULTS))
def test_a_broken_path_to_the_primary_answers_writes_503_within_the_bound(
    start_node: StartNode, postgres: PostgresCluster, fault: str
) -> None:
    """Writes through a stalled, reset or cut path are answered 503 with
    Retry-After within the node's bound; none commits once the path heals
    (what was queued in the stalled path included); the node recovers by
    itself."""
    dbname = f"path_{uuid.uuid4().hex[:8]}"
    postgres.create_database(dbname, template=TEMPLATE_DB)
    primary = postgres.member("primary")
    try:
        with FaultProxy(("127.0.0.1", 0), (postgres.host, primary.port)) as proxy:
            dsn = postgres.primary_dsn(dbname).replace(f":{primary.port}/", f":{proxy.listen[1]}/")
            node = start_node({"CATTLE_DATABASE_URL": dsn, **FAULT_ENV})
            assert post_note(node, "warm-up").status == 201  # connections in the pool
            prefix = f"path-{uuid.uuid4().hex[:6]}-"
            waits: list[float] = []
            answers: set[str] = set()
            proxy.set_mode(fault)
            try:
                for i, key in enumerate([None, f"{prefix}key", None]):
                    started = time.monotonic()
                    reply = post_note(
                        node, f"{prefix}{i}", key=key, timeout_s=REQUEST_TIMEOUT_S + 30
                    )
                    waits.append(time.monotonic() - started)
                    assert reply.status == 503, reply.text
                    assert reply.headers["content-type"] == "application/problem+json"
                    assert json.loads(reply.body)["type"].endswith("database-unavailable")
                    assert int(reply.headers["retry-after"]) >= 1
                    answers.add(hardening.answer_of(503, reply.headers["content-type"], reply.body))
            finally:
                proxy.set_mode("pass")
            print(f"{fault}: 503 after {', '.join(f'{w:.2f}' for w in waits)} s")
            assert max(waits) <= REQUEST_TIMEOUT_S + SLACK_S, waits
            recovered = wait_until(
                lambda: post_note(node, "after").status == 201, timeout_s=30, interval_s=0.2
            )
            assert recovered is not None, node.log_tail()
            time.sleep(1.0)  # whatever the stalled path held has reached the server by now
            assert count_titles(postgres, dbname, prefix) == 0
            healthy = wait_until(lambda: node.get("/readyz").status == 200, timeout_s=10)
            hardening.record(
                "database fault",
                f"{PROXY_FAULTS[fault]}: a POST, a keyed POST, a POST",
                answer=" / ".join(sorted(answers)) + " + Retry-After",
                wait_s=max(waits),
                healthy=healthy is not None,
                audit="0 of the refused writes committed after the path healed",
                backend="postgres",
            )
    finally:
        postgres.drop_database(dbname)


# -- reads while the primary is down ------------------------------------------------

MAX_LAG_S = 1.0


def test_replicas_serve_reads_while_the_primary_is_frozen(
    start_node: StartNode, fault_postgres: PostgresCluster, fault_db: str
) -> None:
    """A replica that had replayed what the primary last showed keeps serving
    reads past the lag bound while the primary is down; a token beyond what
    any replica has replayed is refused (503), never answered stale."""
    node = start_node(
        {
            "CATTLE_DATABASE_URL": fault_postgres.primary_dsn(fault_db),
            "CATTLE_READ_DATABASE_URLS": ",".join(fault_postgres.replica_dsns(fault_db)),
            "CATTLE_REPLICA_MAX_LAG_S": str(MAX_LAG_S),
            "CATTLE_REPLICA_CHECK_INTERVAL_S": "0.2",
            "CATTLE_CACHE": "off",  # which source serves the reads is the point here
            **FAULT_ENV,
        }
    )
    created = post_note(node, "read-me")
    assert created.status == 201, created.text
    path = created.headers["location"]
    token = created.headers["consistency-token"]

    def read(headers: dict[str, str] | None = None) -> Reply:
        return node.get(path, headers=headers, timeout_s=REQUEST_TIMEOUT_S + 30)

    def from_replica() -> bool:
        reply = read({"Consistency-Token": token})
        return reply.status == 200 and reply.headers["x-read-source"].startswith("replica")

    assert wait_until(from_replica, timeout_s=15, interval_s=0.1) is not None, node.log_tail()
    senders = walsenders(fault_postgres, "primary")
    assert senders, "no walsender: is the replica streaming?"
    with contextlib.ExitStack() as stack:
        # The primary moves on without the replica (its WAL is not sent), and
        # its position is seen by the node; then the primary stops for good,
        # with the replica short of the last position the node knew.
        stack.enter_context(frozen(fault_postgres, "primary", senders))
        later = post_note(node, "never-replicated")
        assert later.status == 201, later.text
        beyond = later.headers["consistency-token"]
        time.sleep(0.4)  # two replica checks: the node has seen the new position
        others = [p for p in member_pids(fault_postgres, "primary") if p not in senders]
        stack.enter_context(frozen(fault_postgres, "primary", others))
        # Well past the lag bound (and several replica checks).
        time.sleep(MAX_LAG_S * 3)
        read_waits = []
        for headers in (None, {"Consistency-Token": token}):
            for _ in range(5):
                started = time.monotonic()
                reply = read(headers)
                read_waits.append(time.monotonic() - started)
                assert reply.status == 200, (headers, reply.text)
                assert reply.headers["x-read-source"].startswith("replica"), reply.headers
            time.sleep(MAX_LAG_S)
        started = time.monotonic()
        refused = read({"Consistency-Token": beyond})
        waited = time.monotonic() - started
        assert refused.status == 503, refused.text
        assert waited <= REQUEST_TIMEOUT_S + SLACK_S, waited
    # Resumed: the node is ready again without a restart.
    healthy = wait_until(lambda: node.get("/readyz").status == 200, timeout_s=10) is not None
    hardening.record(
        "database fault",
        "primary frozen (SIGSTOP), replica up: reads, with and without a token",
        answer="200 from the replica",
        wait_s=max(read_waits),
        healthy=healthy,
        audit="served past the lag bound, never stale",
        backend="postgres",
    )
    hardening.record(
        "database fault",
        "primary frozen (SIGSTOP): a read with a token no replica has replayed",
        answer=hardening.answer_of(
            refused.status, refused.headers.get("content-type"), refused.body
        ),
        wait_s=waited,
        healthy=healthy,
        audit="refused, not answered stale",
        backend="postgres",
    )
