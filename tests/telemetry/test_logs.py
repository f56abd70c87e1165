"""Logs: JSON lines with node id and the trace context of the request they belong to."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from fastapi import FastAPI

from deploy.lab.node import Node
from service.config import Settings
from service.telemetry.logs import JsonFormatter
from tests.telemetry.conftest import TRACE_ID, running_node, traceparent

HEX32 = re.compile(r"^[0-9a-f]{32}$")


class Captured:
    def __init__(self, stdout: pytest.CaptureFixture[str]) -> None:
        self.stream = io.StringIO()
        self.stdout = stdout

    def lines(self) -> list[dict[str, object]]:
        # The access log is written to stdout, the rest through logging.
        self.stream.write(self.stdout.readouterr().out)
        # json.loads fails the test on any line that is not one JSON object.
        return [json.loads(line) for line in self.stream.getvalue().splitlines()]


@pytest.fixture
def captured(capsys: pytest.CaptureFixture[str]) -> Iterator[Captured]:
    """Everything logged at INFO and above, formatted as the node formats it,
    and the access log, which the node writes straight to stdout."""
    capture = Captured(capsys)
    handler = logging.StreamHandler(capture.stream)
    handler.setFormatter(JsonFormatter(node_id="test-node"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield capture
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


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
    sqlite_settings: Settings, captured: Captured
) -> None:
    async with running_node(sqlite_settings, add_logging_route) as node:
        response = await node.http.get("/test/log", headers={"traceparent": traceparent()})
        assert response.status_code == 200
        [server] = node.server_spans()

    lines = captured.lines()
    assert lines, "nothing was logged"
    for line in lines:
        assert {"time", "level", "logger", "message", "node_id"} <= line.keys()
        assert line["node_id"] == "test-node"
        datetime.fromisoformat(str(line["time"]))
    mine = [line for line in lines if line.get("trace_id") == TRACE_ID]
    by_logger = {str(line["logger"]): line for line in mine}
    assert {"tests.telemetry", "service.access"} <= by_logger.keys()
    span_id = format(server.context.span_id, "016x")
    assert {line["span_id"] for line in mine} == {span_id}

    [handler_line] = [line for line in mine if line["message"] == "handling a request"]
    assert handler_line["level"] == "info"
    assert handler_line["detail"] == "from the handler"
    [failure] = [line for line in mine if line["message"] == "it failed"]
    assert failure["level"] == "error"
    assert "ValueError: something\nmulti-line" in str(failure["exception"])

    access = by_logger["service.access"]
    assert access["route"] == "/test/log"
    assert access["path"] == "/test/log"
    assert access["status"] == 200
    assert access["method"] == "GET"
    assert isinstance(access["duration_ms"], float)


async def test_unsampled_requests_still_log_a_trace_id(
    sqlite_settings: Settings, captured: Captured
) -> None:
    async with running_node(sqlite_settings) as node:
        await node.http.get("/v1/notes", headers={"traceparent": traceparent(sampled=False)})
        await node.http.get("/v1/notes")
    access = [line for line in captured.lines() if line["logger"] == "service.access"]
    assert len(access) == 2
    # Not recorded, but its id still joins the lines (and the caller's logs).
    assert access[0]["trace_id"] == TRACE_ID
    assert HEX32.match(str(access[1]["trace_id"]))
    assert access[1]["trace_id"] != TRACE_ID


async def test_the_access_log_can_be_switched_off(
    sqlite_settings: Settings, captured: Captured
) -> None:
    settings = sqlite_settings.model_copy(update={"access_log": False})
    async with running_node(settings) as node:
        assert (await node.http.get("/v1/notes")).status_code == 200
    assert not [line for line in captured.lines() if line["logger"] == "service.access"]


async def test_probes_are_not_access_logged_unless_they_fail(
    sqlite_settings: Settings, captured: Captured
) -> None:
    async with running_node(sqlite_settings) as node:
        await node.http.get("/livez")
        await node.http.get("/metrics")
    assert not [line for line in captured.lines() if line["logger"] == "service.access"]


def test_a_served_node_writes_only_json_lines_uvicorn_included(tmp_path: Path) -> None:
    """The real process: uvicorn's own lines and the access log share the format."""
    log_path = tmp_path / "node.log"
    node = Node(
        log_path,
        name="json-node",
        env={"CATTLE_DATA_DIR": str(tmp_path / "data"), "CATTLE_DRAIN_DELAY_S": "0"},
    )
    try:
        node.start(timeout_s=60)
        assert node.get("/v1/notes", headers={"traceparent": traceparent()}).status == 200
        assert node.stop(timeout_s=30) == 0
    finally:
        node.kill()

    text = log_path.read_text()
    # The runner's own marker line is not the node's output.
    lines = [json.loads(line) for line in text.splitlines() if line and not line.startswith("---")]
    assert all(line["node_id"] == "json-node" for line in lines)
    loggers = {line["logger"] for line in lines}
    assert "uvicorn.error" in loggers, loggers  # "Uvicorn running on ..." and friends
    # Once started, the node took its start-up objects out of the collector's way.
    assert any(
        line["logger"] == "service.server" and str(line["message"]).startswith("froze ")
        for line in lines
    )
    assert "uvicorn.access" not in loggers  # replaced by service.access
    [access] = [
        line for line in lines if line["logger"] == "service.access" and line["path"] == "/v1/notes"
    ]
    assert access["trace_id"] == TRACE_ID
    assert access["route"] == "/v1/notes"
