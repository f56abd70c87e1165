"""Traces: server spans with SQL children, W3C traceparent, sampling, resource."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, StatusCode
from sqlalchemy import text

from service.config import Settings
from service.db.engines import Database
from service.telemetry import tracing
from tests.telemetry.conftest import (
    PARENT_SPAN_ID,
    TRACE_ID,
    create_note,
    running_node,
    traceparent,
)


@pytest.mark.usefixtures("always_sample")
async def test_a_request_yields_a_server_span_with_its_sql_children(settings: Settings) -> None:
    async with running_node(settings) as node:
        location = await create_note(node.http)
        node.exporter.clear()

        response = await node.http.get(location)
        assert response.status_code == 200

        [server] = node.server_spans()
        assert server.name == "GET /v1/notes/{note_id}"
        attributes = dict(server.attributes or {})
        assert attributes["http.request.method"] == "GET"
        assert attributes["http.route"] == "/v1/notes/{note_id}"
        assert attributes["http.response.status_code"] == 200
        assert attributes["url.path"] == location
        assert attributes["url.scheme"] == "http"
        assert server.status.status_code is not StatusCode.ERROR

        sql = [s for s in node.spans() if s.kind is SpanKind.CLIENT]
        assert sql, "no SQL spans"
        for span in sql:
            assert span.context.trace_id == server.context.trace_id
            assert span.parent is not None and span.parent.span_id == server.context.span_id
            assert span.attributes is not None
            assert span.attributes["db.system"] == (
                "sqlite" if settings.is_sqlite else "postgresql"
            )
        [select] = [
            s for s in sql if str((s.attributes or {})["db.statement"]).startswith("SELECT")
        ]
        assert "FROM notes" in str((select.attributes or {})["db.statement"])

        # service.instance.id is the node id: spans join the node's logs and metrics.
        resource = dict(server.resource.attributes)
        assert resource["service.name"] == "cattle"
        assert resource["service.instance.id"] == "test-node"
        assert resource["service.version"]


async def test_an_incoming_traceparent_is_continued(sqlite_settings: Settings) -> None:
    # The default sampler, parent-based: a sampled parent is always followed.
    async with running_node(sqlite_settings) as node:
        location = await create_note(node.http)
        node.exporter.clear()

        response = await node.http.get(location, headers={"traceparent": traceparent()})
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
        location = await create_note(node.http)
        node.exporter.clear()
        await node.http.get(location, headers={"traceparent": traceparent(sampled=False)})
        assert node.spans() == ()


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
        assert (server.attributes or {})["error.type"] == "500"


@pytest.mark.usefixtures("always_sample")
async def test_sql_is_traced_only_inside_a_recorded_span(sqlite_settings: Settings) -> None:
    # Start-up's schema check, the replica monitor and key purging would
    # otherwise each start a one-statement trace, over and over.
    async with running_node(sqlite_settings) as node:
        database: Database = node.state["database"]
        async with database.read() as session:
            await session.execute(text("SELECT 1"))
        assert node.spans() == ()

        with node.telemetry.tracer("tests").start_as_current_span("a job"):
            async with database.read() as session:
                await session.execute(text("SELECT 1"))
        [job] = [s for s in node.spans() if s.name == "a job"]
        sql = [s for s in node.spans() if s.kind is SpanKind.CLIENT]
        assert sql
        assert {s.parent.span_id for s in sql if s.parent} == {job.context.span_id}


@pytest.mark.usefixtures("always_sample")
async def test_probes_and_scrapes_are_not_traced(sqlite_settings: Settings) -> None:
    async with running_node(sqlite_settings) as node:
        for path in ("/livez", "/readyz", "/healthz", "/metrics"):
            await node.http.get(path)
        assert [s.name for s in node.spans()] == []


@pytest.mark.usefixtures("always_sample")
async def test_two_apps_in_one_process_keep_their_spans_apart(
    sqlite_settings: Settings,
) -> None:
    other = sqlite_settings.model_copy(update={"node_id": "other-node"})
    async with running_node(sqlite_settings) as first, running_node(other) as second:
        await first.http.get("/v1/notes")
        [span] = first.server_spans()
        assert span.name == "GET /v1/notes"
        assert second.server_spans() == []
        assert span.context.trace_id not in {s.context.trace_id for s in second.spans()}
        await second.http.get("/v1/notes")
        [span] = second.server_spans()
        assert span.resource.attributes["service.instance.id"] == "other-node"
        assert len(first.server_spans()) == 1


async def test_telemetry_off_serves_without_spans_or_metrics(sqlite_settings: Settings) -> None:
    settings = sqlite_settings.model_copy(update={"telemetry_enabled": False})
    async with running_node(settings) as node:
        assert node.telemetry.tracer_provider is None
        location = await create_note(node.http)
        assert (await node.http.get(location)).status_code == 200
        metrics = await node.http.get("/metrics")
        assert metrics.status_code == 200
        assert metrics.text == ""


def test_the_default_sampler_is_parent_based_with_a_modest_ratio() -> None:
    sampler = tracing.choose_sampler({})
    assert isinstance(sampler, ParentBased)
    assert "TraceIdRatioBased{0.1}" in sampler.get_description()


@pytest.mark.parametrize(
    ("environ", "description"),
    [
        ({"OTEL_TRACES_SAMPLER": "always_off"}, ALWAYS_OFF.get_description()),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.5"},
         TraceIdRatioBased(0.5).get_description()),
        ({"OTEL_TRACES_SAMPLER_ARG": "0.25"}, "ParentBased{root:TraceIdRatioBased{0.25}"),
        ({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio"}, "TraceIdRatioBased{1.0}"),
        ({"OTEL_TRACES_SAMPLER": "nonsense"}, "TraceIdRatioBased{0.1}"),
        ({"OTEL_TRACES_SAMPLER_ARG": "2"}, "TraceIdRatioBased{0.1}"),
    ],
)  # fmt: skip
def test_the_standard_sampler_variables_are_honoured(
    environ: dict[str, str], description: str
) -> None:
    assert description in tracing.choose_sampler(environ).get_description()


def test_otel_service_name_overrides_the_default_name(
    sqlite_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "notes-eu")
    resource = tracing.build_resource(sqlite_settings)
    assert resource.attributes["service.name"] == "notes-eu"
    assert resource.attributes["service.instance.id"] == "test-node"
