"""Trace context across nodes: what the bus uses to continue a trace on another node."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from service.config import Settings
from service.telemetry import Telemetry, extract, inject, link_from


def node(settings: Settings, node_id: str) -> tuple[Telemetry, InMemorySpanExporter]:
    telemetry = Telemetry(
        settings.model_copy(update={"node_id": node_id}),
        environ={"OTEL_TRACES_SAMPLER": "always_on"},
    )
    exporter = InMemorySpanExporter()
    telemetry.add_span_processor(SimpleSpanProcessor(exporter))
    return telemetry, exporter


def test_a_message_carries_its_trace_to_another_node(sqlite_settings: Settings) -> None:
    node_a, spans_a = node(sqlite_settings, "node-a")
    node_b, spans_b = node(sqlite_settings, "node-b")

    headers: dict[str, str] = {}
    with node_a.tracer("service.bus").start_as_current_span(
        "notes publish", kind=SpanKind.PRODUCER
    ):
        inject(headers)
    [sent] = spans_a.get_finished_spans()
    assert headers["traceparent"].split("-")[1] == format(sent.context.trace_id, "032x")

    # On node B, the handler's span is a child of node A's send...
    with node_b.tracer("service.bus").start_as_current_span(
        "notes process", context=extract(headers), kind=SpanKind.CONSUMER
    ):
        pass
    [handled] = spans_b.get_finished_spans()
    assert handled.context.trace_id == sent.context.trace_id
    assert handled.parent is not None and handled.parent.is_remote
    assert handled.parent.span_id == sent.context.span_id
    assert handled.resource.attributes["service.instance.id"] == "node-b"

    # ...or, for work only caused by the message, linked to it.
    link = link_from(headers)
    assert link is not None and link.context.span_id == sent.context.span_id


def test_a_message_without_trace_context_starts_a_new_trace() -> None:
    assert link_from({}) is None
    assert not trace.get_current_span(extract({})).get_span_context().is_valid


def test_disabled_telemetry_hands_out_a_working_no_op_tracer(sqlite_settings: Settings) -> None:
    telemetry = Telemetry(sqlite_settings.model_copy(update={"telemetry_enabled": False}))
    with telemetry.tracer("service.bus").start_as_current_span("x") as span:
        assert not span.is_recording()
