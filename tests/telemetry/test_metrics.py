"""Metrics: /metrics in the Prometheus text format, counted by route template and status."""

from __future__ import annotations

import uuid

from fastapi import FastAPI, Request, Response
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from service.config import Settings
from service.telemetry.metrics import ReplicaLag
from tests.telemetry.conftest import create_note, running_node


def samples(text: str) -> list[Sample]:
    """Every sample of a Prometheus text exposition (fails if it does not parse)."""
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def value(all_samples: list[Sample], name: str, **labels: str) -> float | None:
    found = [s.value for s in all_samples if s.name == name and labels.items() <= s.labels.items()]
    assert len(found) <= 1, f"{name}{labels} matches {len(found)} series"
    return found[0] if found else None


def request_count(all_samples: list[Sample], method: str, route: str, status: int) -> float | None:
    return value(
        all_samples,
        "http_server_request_duration_seconds_count",
        http_request_method=method,
        http_route=route,
        http_response_status_code=str(status),
    )


async def test_metrics_count_the_requests_by_route_template_and_status(settings: Settings) -> None:
    async with running_node(settings) as node:
        locations = [await create_note(node.http) for _ in range(3)]
        for location in locations:
            assert (await node.http.get(location)).status_code == 200
        await node.http.get(locations[0])
        missing = [f"/v1/notes/{uuid.uuid4()}" for _ in range(2)]
        for path in missing:
            assert (await node.http.get(path)).status_code == 404
        assert (await node.http.get("/no/such/path")).status_code == 404

        response = await node.http.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        parsed = samples(response.text)

    assert request_count(parsed, "POST", "/v1/notes", 201) == 3
    assert request_count(parsed, "GET", "/v1/notes/{note_id}", 200) == 4
    assert request_count(parsed, "GET", "/v1/notes/{note_id}", 404) == 2
    assert request_count(parsed, "GET", "<unmatched>", 404) == 1
    # Durations are a histogram: buckets end in +Inf, which holds every request.
    assert (
        value(
            parsed,
            "http_server_request_duration_seconds_bucket",
            http_route="/v1/notes/{note_id}",
            http_response_status_code="200",
            le="+Inf",
        )
        == 4
    )
    # Raw paths never become label values (one series per note would be unbounded).
    labels = {v for s in parsed for v in s.labels.values()}
    assert not any(path in labels for path in [*locations, *missing, "/no/such/path"])


async def test_idempotency_replays_are_counted(sqlite_settings: Settings) -> None:
    async with running_node(sqlite_settings) as node:
        for _ in range(3):  # the first creates, the next two replay
            await create_note(node.http, **{"Idempotency-Key": "replay-me"})
        await create_note(node.http, **{"Idempotency-Key": "another"})
        parsed = samples((await node.http.get("/metrics")).text)
    assert value(parsed, "cattle_idempotency_replays_total", http_route="/v1/notes") == 2


def add_scrape_from_inside(app: FastAPI) -> None:
    """A route that collects the metrics while it is itself in flight."""

    async def scrape(request: Request) -> Response:
        return Response(request.app.state.telemetry.render_metrics(), media_type="text/plain")

    app.add_api_route("/test/scrape", scrape)


async def test_node_state_gauges(settings: Settings) -> None:
    async with running_node(settings, add_scrape_from_inside) as node:
        await create_note(node.http)
        parsed = samples((await node.http.get("/test/scrape")).text)

    # Lifecycle as a state set: exactly one state is 1.
    states = {s.labels["state"]: s.value for s in parsed if s.name == "cattle_lifecycle_state"}
    assert states["ready"] == 1
    assert sum(states.values()) == 1
    # The request that collected them was in flight (the health package's count).
    assert value(parsed, "http_server_active_requests") == 1
    # Pool use: the writer pool exists on every backend; nothing is checked out now.
    pool = "db_client_connection_pool_name"
    assert value(parsed, "db_client_connection_count", **{pool: "writer"},
                 db_client_connection_state="used") == 0  # fmt: skip
    assert value(parsed, "db_client_connection_count", **{pool: "writer"},
                 db_client_connection_state="idle") >= 1  # type: ignore[operator]  # fmt: skip
    # Size plus overflow: SQLite pools allow no overflow, server pools as much again.
    most = settings.db_pool_size * (1 if settings.is_sqlite else 2)
    assert value(parsed, "db_client_connection_max", **{pool: "writer"}) == most
    # No replicas configured: the replica lag gauges report nothing.
    assert not [s for s in parsed if s.name.startswith("cattle_db_replica_lag")]
    # The resource rides along as target_info.
    assert value(parsed, "target_info", service_instance_id="test-node", service_name="cattle")


async def test_each_app_has_its_own_metrics(sqlite_settings: Settings) -> None:
    other = sqlite_settings.model_copy(update={"node_id": "other-node"})
    async with running_node(sqlite_settings) as first, running_node(other) as second:
        for _ in range(2):
            await first.http.get("/v1/notes")
        await second.http.get("/v1/notes")
        first_samples = samples((await first.http.get("/metrics")).text)
        second_samples = samples((await second.http.get("/metrics")).text)
    assert request_count(first_samples, "GET", "/v1/notes", 200) == 2
    assert request_count(second_samples, "GET", "/v1/notes", 200) == 1


async def test_other_parts_of_the_node_add_their_own_instruments(sqlite_settings: Settings) -> None:
    async with running_node(sqlite_settings) as node:
        # What the bus or a read cache will do once the lifespan has started.
        hits = node.telemetry.meter("service.cache").create_counter("cattle.cache.hits")
        hits.add(3, {"cache": "notes"})
        parsed = samples((await node.http.get("/metrics")).text)
    assert value(parsed, "cattle_cache_hits_total", cache="notes") == 3


async def test_replica_lag_is_reported_once_replicas_exist(sqlite_settings: Settings) -> None:
    async with running_node(sqlite_settings) as node:
        # What instrument_database wires to the replica monitor's numbers.
        node.telemetry.observe_replica_lag(lambda: [ReplicaLag("replica1@db2:5432", 0.25, 4096)])
        parsed = samples((await node.http.get("/metrics")).text)
    assert value(parsed, "cattle_db_replica_lag_seconds", replica="replica1@db2:5432") == 0.25
    assert value(parsed, "cattle_db_replica_lag_wal_bytes", replica="replica1@db2:5432") == 4096
