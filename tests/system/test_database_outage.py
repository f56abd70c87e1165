"""A database that goes away fails readiness, not liveness, and nothing restarts.

The node runs against a real PostgreSQL server (this module's own, so
stopping its primary cannot disturb other tests); the test stops the primary,
watches the probes, starts it again and watches the node come back by itself.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from deploy.lab.postgres import PostgresCluster
from service.config import Settings
from tests import hardening
from tests.support import wait_until
from tests.system.conftest import StartNode
from tests.system.helpers import agent_port, agent_says, status_of

pytestmark = pytest.mark.postgres

INTERVAL_S = 0.2
TIMEOUT_S = 0.5
# A round every INTERVAL_S, each check bounded by TIMEOUT_S, plus slack for a busy machine.
NOTICE_BOUND_S = INTERVAL_S + TIMEOUT_S + 2.0
# A warning degrades the node once it has held for CATTLE_HEALTH_WARN_ROUNDS rounds.
WARN_ROUNDS = Settings.model_fields["health_warn_rounds"].default
WARN_BOUND_S = WARN_ROUNDS * INTERVAL_S + TIMEOUT_S + 2.0


def test_database_outage_fails_readiness_not_liveness(
    start_node: StartNode, outage_postgres: PostgresCluster
) -> None:
    outage_postgres.create_database("outage")
    port = agent_port()
    node = start_node(
        {
            "CATTLE_DATABASE_URL": outage_postgres.primary_dsn("outage"),
            "CATTLE_AGENT_PORT": str(port),
            "CATTLE_HEALTH_INTERVAL_S": str(INTERVAL_S),
            "CATTLE_HEALTH_TIMEOUT_S": str(TIMEOUT_S),
        }
    )
    pid = node.pid

    def uptime_s() -> float:
        doc = json.loads(node.get("/healthz").body)
        return float(doc["checks"]["uptime"][0]["observedValue"])

    assert status_of(node, "/readyz") == 200
    assert agent_says(port) == "up ready 100%\n"
    before = uptime_s()

    stopping = time.monotonic()
    outage_postgres.stop_member("primary")
    stopped_s = time.monotonic() - stopping
    unready_s = wait_until(lambda: status_of(node, "/readyz") == 503, timeout_s=NOTICE_BOUND_S)
    assert unready_s is not None, node.log_tail()
    assert status_of(node, "/livez") == 200
    assert status_of(node, "/startupz") == 200
    assert status_of(node, "/readyz/primary") == 503
    assert status_of(node, "/readyz/event_loop") == 200
    assert agent_says(port).startswith("down#primary unreachable")  # type: ignore[union-attr]
    healthz = node.get("/healthz")
    assert healthz.status == 503
    doc = json.loads(healthz.body)
    assert doc["status"] == "fail"
    assert doc["lifecycle"] == "degraded"
    (primary,) = doc["checks"]["primary:responseTime"]
    assert primary["status"] == "fail"
    assert "unreachable" in primary["output"]
    # Requests get a clean 503 problem, not a hang or a 500.
    asked = time.monotonic()
    reply = node.get("/v1/notes?limit=1", timeout_s=15)
    waited = time.monotonic() - asked
    assert reply.status == 503
    assert reply.headers["content-type"] == "application/problem+json"

    # Liveness holds through the whole outage (several check rounds).
    livez = [status_of(node, "/livez") for _ in range(20)]
    assert set(livez) == {200}

    starting = time.monotonic()
    outage_postgres.start_member("primary")
    started_s = time.monotonic() - starting
    ready_s = wait_until(lambda: status_of(node, "/readyz") == 200, timeout_s=NOTICE_BOUND_S + 2)
    assert ready_s is not None, node.log_tail()
    assert agent_says(port) == "up ready 100%\n"
    assert json.loads(node.get("/healthz").body)["lifecycle"] == "ready"
    assert node.get("/v1/notes?limit=1").status == 200
    # The same process all along: never restarted, uptime kept growing.
    assert node.alive and node.pid == pid
    assert uptime_s() > before
    hardening.record(
        "database fault",
        "primary stopped (no replica): a read",
        answer=hardening.answer_of(reply.status, reply.headers.get("content-type"), reply.body),
        wait_s=waited,
        healthy=True,  # ready again above, by itself
        audit="/livez 200 throughout; the same process, never restarted",
        backend="postgres",
    )
    print(f"primary stop took {stopped_s:.2f} s, readiness 503 {unready_s:.2f} s later; "
          f"start took {started_s:.2f} s, readiness 200 {ready_s:.2f} s later")  # fmt: skip


def test_a_lost_replica_degrades_the_node_but_it_stays_ready(
    start_node: StartNode, outage_postgres: PostgresCluster
) -> None:
    outage_postgres.create_database("replica_outage")
    port = agent_port()
    (replica_dsn,) = outage_postgres.replica_dsns("replica_outage")
    node = start_node(
        {
            "CATTLE_DATABASE_URL": outage_postgres.primary_dsn("replica_outage"),
            "CATTLE_READ_DATABASE_URLS": replica_dsn,
            "CATTLE_AGENT_PORT": str(port),
            "CATTLE_HEALTH_INTERVAL_S": str(INTERVAL_S),
            "CATTLE_HEALTH_TIMEOUT_S": str(TIMEOUT_S),
            "CATTLE_REPLICA_CHECK_INTERVAL_S": str(INTERVAL_S),
        },
        name="replica-node",
    )

    def healthz() -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(node.get("/healthz").body)
        return doc

    # READY and the replica checked: a warning alone no longer keeps a node
    # from READY for its first rounds (CATTLE_HEALTH_WARN_ROUNDS).
    def settled() -> bool:
        doc = healthz()
        return doc["lifecycle"] == "ready" and doc["checks"]["replicas:lag"][0]["status"] == "pass"

    assert wait_until(settled, timeout_s=5) is not None
    (replicas,) = healthz()["checks"]["replicas:lag"]
    assert replicas["status"] == "pass" and replicas["observedUnit"] == "s"

    outage_postgres.stop_member("replica1")
    try:
        degraded_s = wait_until(
            lambda: healthz()["lifecycle"] == "degraded", timeout_s=WARN_BOUND_S
        )
        assert degraded_s is not None, node.log_tail()
        doc = healthz()
        assert doc["status"] == "warn"
        assert doc["checks"]["replicas:lag"][0]["status"] == "warn"
        assert "out of rotation" in doc["checks"]["replicas:lag"][0]["output"]
        # Reads fall back to the primary: still in rotation, with full weight.
        assert status_of(node, "/readyz") == 200
        assert agent_says(port) == "up ready 100%\n"
        assert node.get("/v1/notes?limit=1").status == 200
    finally:
        outage_postgres.start_member("replica1")
    assert wait_until(lambda: healthz()["lifecycle"] == "ready", timeout_s=10) is not None
