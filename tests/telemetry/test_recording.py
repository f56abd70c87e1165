"""What keeps telemetry cheap on the request path, and what it must not cost in meaning.

Finished requests are recorded in batches (metrics and access log), spans are
sampled only once something receives them, the SQL tracer leaves the pool
alone, and requests without trace headers skip the propagators.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from typing import Any

import pytest
from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, get_current_span, use_span

from service.config import Settings
from service.telemetry import Telemetry
from service.telemetry.logs import AccessLog
from service.telemetry.propagation import extract_from_scope, propagation_headers
from service.telemetry.requests import MAX_AGE_S, MAX_BATCH, CompletedRequest, RequestRecorder
from tests.telemetry.conftest import TRACE_ID, running_node, traceparent


class FakeInstruments:
    """Stands in for HttpInstruments: remembers what it was asked to record."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.recorded: list[tuple[str, str, int]] = []
        self.replays: list[str] = []
        self.in_a_trace: bool | None = None  # whether a span was current at the last record

    def record(self, method: str, route: str, status: int, duration_s: float) -> None:
        if self.fail:
            raise RuntimeError("instrument broke")
        self.recorded.append((method, route, status))
        self.in_a_trace = get_current_span().get_span_context().is_valid

    def replayed(self, route: str) -> None:
        self.replays.append(route)


class CountedWrites(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def finished(n: int, *, logged: bool = True, replayed: bool = False) -> CompletedRequest:
    return CompletedRequest(
        time.time(), "GET", f"/v1/notes/{n}", "/v1/notes/{note_id}", 200, 0.002,
        "127.0.0.1", 0xABC, 0xDEF, replayed, logged,
    )  # fmt: skip


def recorder(
    instruments: FakeInstruments | None = None,
) -> tuple[RequestRecorder, FakeInstruments, CountedWrites]:
    instruments = instruments or FakeInstruments()
    stream = CountedWrites()
    rec = RequestRecorder()
    rec.http = instruments  # type: ignore[assignment]
    rec.access_log = AccessLog("node-7", stream=stream)
    return rec, instruments, stream


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


async def test_a_batch_is_recorded_once_its_oldest_request_is_max_age_old() -> None:
    rec, instruments, stream = recorder()
    for n in range(3):
        rec.add(finished(n))
    assert instruments.recorded == [] and stream.getvalue() == ""  # not on the request path
    await asyncio.sleep(MAX_AGE_S * 4)
    assert instruments.recorded == [("GET", "/v1/notes/{note_id}", 200)] * 3
    # One write for the batch: lines from other threads cannot land inside it.
    assert stream.writes == 1
    logged = lines(stream)
    assert [line["path"] for line in logged] == ["/v1/notes/0", "/v1/notes/1", "/v1/notes/2"]
    first = logged[0]
    assert first["logger"] == "service.access" and first["node_id"] == "node-7"
    assert first["trace_id"] == format(0xABC, "032x") and first["span_id"] == format(0xDEF, "016x")
    assert first["duration_ms"] == 2.0 and first["status"] == 200


async def test_a_batch_is_recorded_outside_the_trace_of_the_request_that_started_it() -> None:
    rec, instruments, _ = recorder()
    request_span = NonRecordingSpan(
        SpanContext(int(TRACE_ID, 16), 0xB7AD6B7169203331, is_remote=False)
    )
    with use_span(request_span):
        rec.add(finished(1))  # the timer is set here, inside the request's trace
    await asyncio.sleep(MAX_AGE_S * 4)
    assert instruments.recorded and instruments.in_a_trace is False


async def test_a_full_batch_is_recorded_at_once() -> None:
    rec, instruments, stream = recorder()
    for n in range(MAX_BATCH):
        rec.add(finished(n))
    assert len(instruments.recorded) == MAX_BATCH
    assert len(lines(stream)) == MAX_BATCH


def test_without_an_event_loop_a_request_is_recorded_at_once() -> None:
    rec, instruments, stream = recorder()
    rec.add(finished(1, replayed=True))
    assert len(instruments.recorded) == 1
    assert instruments.replays == ["/v1/notes/{note_id}"]
    assert len(lines(stream)) == 1


async def test_only_requests_meant_for_the_access_log_are_written() -> None:
    rec, instruments, stream = recorder()
    rec.add(finished(1, logged=False))  # a probe that succeeded
    rec.add(finished(2))
    rec.flush()
    assert len(instruments.recorded) == 2  # both counted
    assert [line["path"] for line in lines(stream)] == ["/v1/notes/2"]


async def test_a_failing_instrument_is_logged_and_never_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rec, _, _ = recorder(FakeInstruments(fail=True))
    rec.add(finished(1))
    with caplog.at_level(logging.ERROR, logger="service.telemetry"):
        rec.flush()
    assert "recording telemetry for 1 requests failed" in caplog.text


async def test_a_stopping_node_writes_its_last_access_lines(
    sqlite_settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running_node(sqlite_settings) as node:
        assert (await node.http.get("/v1/notes")).status_code == 200
    # Checked before anything else runs on the loop: the line was written by
    # the shutdown, not by a timer that happened to fire.
    access = [
        line for line in map(json.loads, capsys.readouterr().out.splitlines())
        if line["logger"] == "service.access"
    ]  # fmt: skip
    assert [line["path"] for line in access] == ["/v1/notes"]


async def test_spans_are_dropped_until_something_receives_them(sqlite_settings: Settings) -> None:
    telemetry = Telemetry(sqlite_settings, environ={"OTEL_TRACES_SAMPLER": "always_on"})
    tracer = telemetry.tracer("tests")
    unreceived = tracer.start_span("nobody listens", kind=SpanKind.SERVER)
    assert not unreceived.is_recording()
    # Still a trace: its ids go into log lines and propagate downstream.
    assert unreceived.get_span_context().is_valid

    exporter = InMemorySpanExporter()
    telemetry.add_span_processor(SimpleSpanProcessor(exporter))
    with tracer.start_as_current_span("someone listens") as span:
        assert span.is_recording()
    assert [s.name for s in exporter.get_finished_spans()] == ["someone listens"]


async def test_an_otlp_endpoint_opens_spans_to_sampling(
    sqlite_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")
    settings = sqlite_settings.model_copy(update={"telemetry_shutdown_timeout_s": 1.0})
    telemetry = Telemetry(settings)
    tracer = telemetry.tracer("tests")
    assert not tracer.start_span("before start").is_recording()
    telemetry.start()
    try:
        assert tracer.start_span("after start").is_recording()
    finally:
        await telemetry.shutdown()


def test_disabled_telemetry_takes_no_span_processor(sqlite_settings: Settings) -> None:
    telemetry = Telemetry(sqlite_settings.model_copy(update={"telemetry_enabled": False}))
    with pytest.raises(RuntimeError, match="telemetry is disabled"):
        telemetry.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))


async def test_sql_tracing_listens_to_statements_not_to_the_pool(settings: Settings) -> None:
    async with running_node(settings) as node:
        engine = node.state["database"].writer.sync_engine

        def tracers(listeners: Any) -> list[object]:
            return [
                fn for fn in listeners if isinstance(getattr(fn, "__self__", None), EngineTracer)
            ]

        assert tracers(engine.dispatch.before_cursor_execute)  # SQL spans are on
        pool = engine.pool.dispatch
        for name in ("checkout", "checkin", "connect", "close"):
            assert tracers(getattr(pool, name)) == [], name


def asgi_scope(*headers: tuple[bytes, bytes]) -> dict[str, Any]:
    return {"type": "http", "headers": [(b"host", b"node"), *headers]}


def test_a_request_without_trace_headers_starts_a_new_trace() -> None:
    fields = propagation_headers()
    assert {b"traceparent", b"tracestate", b"baggage"} <= fields
    context = extract_from_scope(asgi_scope((b"user-agent", b"wrk")), fields)
    assert not get_current_span(context).get_span_context().is_valid


@pytest.mark.parametrize("with_fields", [True, False])
def test_a_traceparent_is_read_with_or_without_the_header_filter(with_fields: bool) -> None:
    scope = asgi_scope((b"traceparent", traceparent().encode()))
    context = extract_from_scope(scope, propagation_headers() if with_fields else None)
    span_context = get_current_span(context).get_span_context()
    assert format(span_context.trace_id, "032x") == TRACE_ID
