"""Metrics: /metrics in the Prometheus text format, counted by route template and status."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request, Response
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

import service
from service.config import Settings
from service.telemetry.metrics import ReplicaLag
from tests.telemetry.conftest import ITEM_ROUTE, MISSING_ITEM, running_node

PREFIX = service.NAME


def samples(text: str) -> list[Sample]:
    """Every sample of a Prometheus text exposition (fails if it does not parse)."""
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def value(all_samples: list[Sample], name: str, **labels: str) -> float | None:
    found = [s.value for s in all_samples if s.name == name and labels.items() <= s.labels.items()]
    assert len(found) <= 1, f"{name}{labels} matches {len(found)} series"
    return found[0] if found else None


def request_count(all_samples: list[Sample], status: int, route: str | None) -> float | None:
    found = [
        s.value
        for s in all_samples
        if s.name == "http_server_request_duration_seconds_count"
        and s.labels.get("http_response_status_code") == str(status)
        and s.labels.get("http_route", "") == (route or "")
    ]
    assert len(found) <= 1, found
    return found[0] if found else None


async def test_metrics_count_the_requests_by_route_template_and_status(settings: Settings) -> None:
    async with running_node(settings) as node:
        for item in (1, 2, 3, 1):
            assert (await node.http.get(f"/test/items/{item}")).status_code == 200
        for item in (MISSING_ITEM, MISSING_ITEM + 1):
            assert (await node.http.get(f"/test/items/{item}")).status_code == 404
        assert (await node.http.get("/no/such/path")).status_code == 404
        await node.http.get("/livez")

        response = await node.http.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        parsed = samples(response.text)

    assert request_count(parsed, 200, ITEM_ROUTE) == 4
    assert request_count(parsed, 404, ITEM_ROUTE) == 2
    assert request_count(parsed, 404, None) == 1  # no route matched: an empty route label
    # Durations are a histogram, with buckets under 5 ms for fast reads.
    bucket = "http_server_request_duration_seconds_bucket"
    assert value(parsed, bucket, http_route=ITEM_ROUTE, http_response_status_code="200",
                 le="+Inf") == 4  # fmt: skip
    assert value(parsed, bucket, http_route=ITEM_ROUTE, http_response_status_code="200",
                 le="0.001") is not None  # fmt: skip
    # Raw paths never become label values (one series per item would be unbounded),
    # and probes are not counted.
    labels = {v for s in parsed for v in s.labels.values()}
    assert not labels & {"/test/items/1", f"/test/items/{MISSING_ITEM}", "/no/such/path", "/livez"}


def add_scrape_from_inside(app: FastAPI) -> None:
    """A route that collects the metrics while it is itself in flight."""

    async def scrape(request: Request) -> Response:
        return Response(request.app.state.telemetry.render_metrics(), media_type="text/plain")

    app.add_api_route("/test/scrape", scrape)


async def test_node_state_gauges(settings: Settings) -> None:
    # spans=False: a node with no trace export makes no spans; pool use is still counted.
    async with running_node(settings, add_scrape_from_inside, spans=False) as node:
        assert node.telemetry.tracer_provider is None
        await node.http.get("/test/items/1")
        # On PostgreSQL the node may still be starting (its first checks): wait for ready.
        for _ in range(50):
            parsed = samples((await node.http.get("/test/scrape")).text)
            ready = [s.value for s in parsed if s.labels.get("state") == "ready"
                     and s.name == f"{PREFIX}_lifecycle_state"]  # fmt: skip
            if ready == [1]:
                break
            await asyncio.sleep(0.1)

    # Lifecycle as a state set: exactly one state is 1.
    states = {s.labels["state"]: s.value for s in parsed if s.name == f"{PREFIX}_lifecycle_state"}
    assert states["ready"] == 1
    assert sum(states.values()) == 1
    # The request that collected them was in flight.
    assert sum(s.value for s in parsed if s.name == "http_server_active_requests") == 1
    # Pool use: nothing is checked out now, the writer's connection is idle.
    usage = {s.labels["state"]: s.value for s in parsed if s.name == "db_client_connections_usage"}
    assert usage["used"] == 0 and usage["idle"] >= 1, usage
    # No replicas configured: the replica lag gauges report nothing.
    assert not [s for s in parsed if s.name.startswith(f"{PREFIX}_db_replica_lag")]
    # The resource rides along as target_info.
    assert value(parsed, "target_info", service_instance_id="test-node", service_name=PREFIX)


async def test_each_app_has_its_own_metrics(sqlite_settings: Settings) -> None:
    other = sqlite_settings.model_copy(update={"node_id": "other-node"})
    async with running_node(sqlite_settings) as first, running_node(other) as second:
        for _ in range(2):
            await first.http.get("/test/items/1")
        await second.http.get("/test/items/1")
        first_samples = samples((await first.http.get("/metrics")).text)
        second_samples = samples((await second.http.get("/metrics")).text)
    assert request_count(first_samples, 200, ITEM_ROUTE) == 2
    assert request_count(second_samples, 200, ITEM_ROUTE) == 1


async def test_replica_lag_is_reported_once_replicas_exist(sqlite_settings: Settings) -> None:
    async with running_node(sqlite_settings) as node:
        # What instrument_database wires to the replica monitor's numbers.
        node.telemetry.observe_replica_lag(lambda: [ReplicaLag("replica1@db2:5432", 0.25, 4096)])
        parsed = samples((await node.http.get("/metrics")).text)
    replica = {"replica": "replica1@db2:5432"}
    assert value(parsed, f"{PREFIX}_db_replica_lag_seconds", **replica) == 0.25
    assert value(parsed, f"{PREFIX}_db_replica_lag_wal_bytes", **replica) == 4096
