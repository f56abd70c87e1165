"""Logs: JSON lines with node id, service and the trace context of their request."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fastapi import FastAPI

import service
from deploy.lab.node import Node
from service.config import Settings
from service.telemetry.http import AccessLog
from service.telemetry.logs import TraceContext, json_formatter
from tests.telemetry.conftest import PARENT_SPAN_ID, TRACE_ID, running_node, traceparent


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """Everything logged at INFO and above, formatted and filtered as the node does."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(json_formatter("test-node"))
    handler.addFilter(TraceContext())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def lines_of(text: str) -> list[dict[str, object]]:
    # json.loads fails the test on any line that is not one JSON object.
    return [json.loads(line) for line in text.splitlines() if line]


def add_logging_route(app: FastAPI) -> None:
    log = logging.getLogger("tests.telemetry")

    async def handle() -> dict[str, str]:
        log.info("handling a request", extra={"detail": "from the handler"})
        try:
            raise ValueError("something\nmulti-line")
        except ValueError:
            log.exception("it failed")
        return {"ok": "yes"}

    app.add_api_route("/test/log", handle)


async def test_log_lines_are_json_and_carry_the_trace_id_of_their_request(
    sqlite_settings: Settings, captured: io.StringIO
) -> None:
    async with running_node(sqlite_settings, add_logging_route) as node:
        response = await node.http.get("/test/log", headers={"traceparent": traceparent()})
        assert response.status_code == 200
        [server] = node.server_spans()

    lines = lines_of(captured.getvalue())
    assert lines, "nothing was logged"
    for line in lines:
        assert {"time", "level", "logger", "message"} <= line.keys()
        assert line["node_id"] == "test-node"
        assert line["service"] == service.NAME
        datetime.fromisoformat(str(line["time"]))
    mine = [line for line in lines if line.get("trace_id") == TRACE_ID]
    assert {line["span_id"] for line in mine} == {format(server.context.span_id, "016x")}
    [handler_line] = [line for line in mine if line["message"] == "handling a request"]
    assert handler_line["level"] == "INFO"
    assert handler_line["detail"] == "from the handler"
    [failure] = [line for line in mine if line["message"] == "it failed"]
    assert failure["level"] == "ERROR"
    assert "ValueError: something\nmulti-line" in str(failure["exception"])
    # Lines logged outside any request carry no trace context.
    assert all("trace_id" not in line for line in lines if line not in mine)


async def test_without_spans_a_request_keeps_its_callers_trace_id_and_gets_none_of_its_own(
    sqlite_settings: Settings, captured: io.StringIO, capsys: pytest.CaptureFixture[str]
) -> None:
    # No OTLP trace export and no span processor: the node makes no spans.
    async with running_node(sqlite_settings, add_logging_route, spans=False) as node:
        assert node.telemetry.tracer_provider is None
        capsys.readouterr()
        headers = {"traceparent": traceparent()}
        assert (await node.http.get("/test/log", headers=headers)).status_code == 200
        assert (await node.http.get("/test/log")).status_code == 200
        await asyncio.sleep(AccessLog.FLUSH_S * 3)
        written = capsys.readouterr().out
    # The caller's trace: its trace id and its span's id, in the handler's lines ...
    handled = [line for line in lines_of(captured.getvalue())
               if line["message"] == "handling a request"]  # fmt: skip
    assert [(line.get("trace_id"), line.get("span_id")) for line in handled] == [
        (TRACE_ID, PARENT_SPAN_ID),
        (None, None),  # no caller's trace, no span: no trace id
    ]
    # ... and in the access line.
    access = [line for line in lines_of(written) if line["logger"] == "service.access"]
    assert [(line.get("trace_id"), line.get("span_id")) for line in access] == [
        (TRACE_ID, PARENT_SPAN_ID),
        (None, None),
    ]


async def test_the_access_line_is_one_json_object_per_request_probes_only_when_failing(
    sqlite_settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    def add_routes(app: FastAPI) -> None:
        async def failing_probe() -> None:
            raise RuntimeError("probe broke")

        app.add_api_route("/readyz/broken", failing_probe)
        # Ahead of the health routes, which would answer 404 for it.
        app.router.routes.insert(0, app.router.routes.pop())

    async with running_node(sqlite_settings, add_routes) as node:
        capsys.readouterr()
        headers = {"traceparent": traceparent()}
        assert (await node.http.get("/test/items/7?full=1", headers=headers)).status_code == 200
        assert (await node.http.get("/livez")).status_code == 200
        assert (await node.http.get("/readyz/broken")).status_code == 500
        assert (await node.http.get("/no/such/path")).status_code == 404
        [server] = [s for s in node.server_spans() if s.name.endswith("{item_id}")]
        assert "service.access" not in capsys.readouterr().out  # lines wait a moment ...
        await asyncio.sleep(AccessLog.FLUSH_S * 3)
        written = capsys.readouterr().out  # ... and are written together

    access = [line for line in lines_of(written) if line["logger"] == "service.access"]
    assert [(line["path"], line["status"]) for line in access] == [
        ("/test/items/7?full=1", 200),
        ("/readyz/broken", 500),  # a probe that fails is logged; one that answers is not
        ("/no/such/path", 404),
    ]
    item, _, unmatched = access
    assert item["route"] == "/test/items/{item_id}" and unmatched["route"] == ""
    assert item["method"] == "GET" and item["level"] == "INFO"
    assert item["node_id"] == "test-node" and item["service"] == service.NAME
    assert item["trace_id"] == TRACE_ID
    assert item["span_id"] == format(server.context.span_id, "016x")
    assert item["message"].endswith('"GET /test/items/7?full=1 HTTP/1.1" 200')
    assert 0 < float(item["duration_ms"]) < 60_000
    datetime.fromisoformat(str(item["time"]))


async def test_access_log_off_writes_no_access_line(
    sqlite_settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running_node(sqlite_settings.model_copy(update={"access_log": False})) as node:
        capsys.readouterr()
        response = await node.http.get("/test/items/7", headers={"traceparent": traceparent()})
        assert response.status_code == 200
        assert len(node.server_spans()) == 1  # telemetry is still on
        await asyncio.sleep(AccessLog.FLUSH_S * 3)
        assert "service.access" not in capsys.readouterr().out


async def test_the_access_line_is_written_with_telemetry_off(
    sqlite_settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running_node(
        sqlite_settings.model_copy(update={"telemetry_enabled": False})
    ) as node:
        assert (await node.http.get("/test/items/7")).status_code == 200
        assert node.spans() == ()
    [line] = [x for x in lines_of(capsys.readouterr().out) if x["logger"] == "service.access"]
    assert line["path"] == "/test/items/7" and line["status"] == 200
    assert "trace_id" not in line


async def test_waiting_access_lines_are_written_when_the_node_stops(
    sqlite_settings: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(AccessLog, "FLUSH_S", 600.0)  # only the stop can write it
    async with running_node(sqlite_settings) as node:
        assert (await node.http.get("/test/items/7")).status_code == 200
        assert "service.access" not in capsys.readouterr().out
    # The lifespan has ended: the line was written then.
    assert '"logger": "service.access"' in capsys.readouterr().out


def test_a_served_node_writes_only_json_lines_its_access_log_included(tmp_path: Path) -> None:
    """The real process: uvicorn's own lines and the access log, in one format."""
    log_path = tmp_path / "node.log"
    node = Node(
        log_path,
        name="json-node",
        env={"CATTLE_DATA_DIR": str(tmp_path / "data"), "CATTLE_DRAIN_DELAY_S": "0"},
    )
    try:
        node.start(timeout_s=60)
        # No domain is needed: an unmatched path is served (404), traced and logged.
        assert node.get("/no/such/path", headers={"traceparent": traceparent()}).status == 404
        assert node.get("/livez").status == 200
        assert node.stop(timeout_s=30) == 0
    finally:
        node.kill()

    # The runner's own marker lines are not the node's output.
    lines = lines_of("\n".join(x for x in log_path.read_text().splitlines() if x[:3] != "---"))
    assert all(line["node_id"] == "json-node" for line in lines)
    assert all(line["service"] == service.NAME for line in lines)
    loggers = {line["logger"] for line in lines}
    assert "uvicorn.error" in loggers, loggers  # "Uvicorn running on ..." and friends
    access = [line for line in lines if line["logger"] == "service.access"]
    [line] = access  # the probe is not in it
    assert line["path"] == "/no/such/path" and line["status"] == 404
    assert line["method"] == "GET"
    assert line["trace_id"] == TRACE_ID


async def test_an_access_line_is_json_whatever_the_path_holds() -> None:
    # The line is formatted by hand for speed: every text field must still be
    # escaped as json.dumps would, and the time be the request's, in UTC.
    stream = io.StringIO()
    log = AccessLog('node-"1"', stream)
    path = '/v1/notes/"quoted"\\back\nline/é/\u2028/\x00'
    scope = {
        "type": "http",
        "client": ("192.0.2.7", 5000),
        "method": "GET",
        "path": path,
        "query_string": b"a=1&b=%22",
        "http_version": "1.1",
    }
    before = datetime.now(UTC)
    log.write(scope, 404, "", 0.0012, None)
    log.flush()
    after = datetime.now(UTC)
    [line] = lines_of(stream.getvalue())
    assert line["path"] == path + "?a=1&b=%22" and line["node_id"] == 'node-"1"'
    assert line["message"] == f'192.0.2.7:5000 - "GET {path}?a=1&b=%22 HTTP/1.1" 404'
    assert (line["status"], line["route"], line["duration_ms"]) == (404, "", 1.2)
    assert line["client"] == "192.0.2.7:5000" and "trace_id" not in line
    at = datetime.fromisoformat(str(line["time"]))
    assert at.utcoffset() is not None and before.replace(microsecond=0) <= at <= after
