"""Traces: server spans with SQL children, W3C traceparent, sampling, resource."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from opentelemetry.trace import SpanKind, StatusCode

import service
from service.config import Settings
from service.telemetry import tracing
from tests.telemetry.conftest import (
    ITEM_ROUTE,
    PARENT_SPAN_ID,
    TRACE_ID,
    running_node,
    traceparent,
)


@pytest.mark.usefixtures("always_sample")
async def test_a_request_yields_a_server_span_with_its_sql_children(settings: Settings) -> None:
    async with running_node(settings) as node:
        response = await node.http.get("/test/items/7?full=1")
        assert response.status_code == 200

        [server] = node.server_spans()
        assert server.name == f"GET {ITEM_ROUTE}"
        attributes = dict(server.attributes or {})
        assert attributes["http.request.method"] == "GET"
        assert attributes["http.route"] == ITEM_ROUTE
        assert attributes["http.response.status_code"] == 200
        assert attributes["url.path"] == "/test/items/7"
        assert attributes["url.scheme"] == "http"
        assert server.status.status_code is not StatusCode.ERROR

        sql = [s for s in node.spans() if s.kind is SpanKind.CLIENT]
        assert sql, "no SQL spans"
        for span in sql:
            assert span.context.trace_id == server.context.trace_id
            assert span.parent is not None and span.parent.span_id == server.context.span_id
            assert (span.attributes or {})["db.system"] == (
                "sqlite" if settings.is_sqlite else "postgresql"
            )
        statements = [str((s.attributes or {}).get("db.statement")) for s in sql]
        assert any(statement.startswith("SELECT") for statement in statements), statements

        # service.instance.id is the node id: spans join the node's logs and metrics.
        resource = dict(server.resource.attributes)
        assert resource["service.name"] == service.NAME
        assert resource["service.instance.id"] == "test-node"
        assert resource["service.version"] == service.__version__


async def test_a_signature_in_the_query_is_redacted_in_the_span(
    sqlite_settings: Settings,
) -> None:
    async with running_node(sqlite_settings) as node:
        response = await node.http.get(
            "/test/items/7?sig=secret&full=1", headers={"traceparent": traceparent()}
        )
        assert response.status_code == 200
        [server] = node.server_spans()
    assert (server.attributes or {})["url.query"] == "sig=REDACTED&full=1"


async def test_an_incoming_traceparent_is_continued(sqlite_settings: Settings) -> None:
    # The default sampler is parent-based: a sampled parent is always followed.
    async with running_node(sqlite_settings) as node:
        response = await node.http.get("/test/items/1", headers={"traceparent": traceparent()})
        assert response.status_code == 200

        [server] = node.server_spans()
        assert format(server.context.trace_id, "032x") == TRACE_ID
        assert server.parent is not None and server.parent.is_remote
        assert format(server.parent.span_id, "016x") == PARENT_SPAN_ID
        # The SQL spans stay in the caller's trace too.
        sql = [s for s in node.spans() if s.kind is SpanKind.CLIENT]
        assert sql and {format(s.context.trace_id, "032x") for s in sql} == {TRACE_ID}


async def test_an_unsampled_parent_is_not_recorded(sqlite_settings: Settings) -> None:
    async with running_node(sqlite_settings) as node:
        await node.http.get("/test/items/1", headers={"traceparent": traceparent(sampled=False)})
        assert node.spans() == ()


async def test_the_default_sampler_records_a_tenth_of_new_traces(sqlite_settings: Settings) -> None:
    async with running_node(sqlite_settings) as node:
        for _ in range(200):
            await node.http.get("/test/items/1")
        recorded = len(node.server_spans())
    # Binomial(200, 0.1): 20 expected; outside 3..50 is vanishingly unlikely.
    assert 3 <= recorded <= 50, recorded


async def test_the_sampler_variables_are_honoured(
    sqlite_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    async with running_node(sqlite_settings) as node:
        await node.http.get("/test/items/1", headers={"traceparent": traceparent()})
        assert node.spans() == ()
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "1.0")
    async with running_node(sqlite_settings) as node:
        # Not parent-based: the unsampled parent is overruled.
        await node.http.get("/test/items/1", headers={"traceparent": traceparent(sampled=False)})
        assert len(node.server_spans()) == 1


@pytest.mark.usefixtures("always_sample")
async def test_a_server_error_marks_its_span_and_is_still_answered(
    sqlite_settings: Settings,
) -> None:
    def add_failing_route(app: FastAPI) -> None:
        async def fail() -> None:
            raise RuntimeError("boom")

        app.add_api_route("/test/fail", fail)

    async with running_node(sqlite_settings, add_failing_route) as node:
        response = await node.http.get("/test/fail")
        assert response.status_code == 500
        [server] = node.server_spans()
        assert server.name == "GET /test/fail"
        assert server.status.status_code is StatusCode.ERROR
        assert (server.attributes or {})["http.response.status_code"] == 500


@pytest.mark.usefixtures("always_sample")
async def test_probes_and_scrapes_are_not_traced(sqlite_settings: Settings) -> None:
    async with running_node(sqlite_settings) as node:
        for path in ("/livez", "/readyz", "/startupz", "/healthz", "/metrics"):
            await node.http.get(path)
        assert [s.name for s in node.spans()] == []
        # Only those paths: a route that merely ends like one is traced.
        await node.http.get("/test/items/metrics")
        assert len(node.server_spans()) == 1


@pytest.mark.usefixtures("always_sample")
async def test_two_apps_in_one_process_keep_their_spans_apart(
    sqlite_settings: Settings,
) -> None:
    other = sqlite_settings.model_copy(update={"node_id": "other-node"})
    async with running_node(sqlite_settings) as first, running_node(other) as second:
        await first.http.get("/test/items/1")
        [span] = first.server_spans()
        assert second.spans() == ()
        await second.http.get("/test/items/2")
        [span] = second.server_spans()
        assert span.resource.attributes["service.instance.id"] == "other-node"
        assert len(first.server_spans()) == 1


async def test_telemetry_off_serves_without_spans_or_metrics(sqlite_settings: Settings) -> None:
    settings = sqlite_settings.model_copy(update={"telemetry_enabled": False})
    async with running_node(settings) as node:
        assert node.telemetry.tracer_provider is None
        assert (await node.http.get("/test/items/1")).status_code == 200
        metrics = await node.http.get("/metrics")
        assert metrics.status_code == 200
        assert metrics.text == ""


def test_otel_service_name_overrides_the_default_name(monkeypatch: pytest.MonkeyPatch) -> None:
    assert tracing.build_resource("n1").attributes["service.name"] == service.NAME
    monkeypatch.setenv("OTEL_SERVICE_NAME", "notes-eu")
    resource = tracing.build_resource("test-node")
    assert resource.attributes["service.name"] == "notes-eu"
    assert resource.attributes["service.instance.id"] == "test-node"
