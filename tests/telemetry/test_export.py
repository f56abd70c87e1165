"""OTLP export: off the request path, bounded at shutdown, and reported for /healthz."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from service.config import Settings
from tests.support import wait_until
from tests.telemetry.conftest import running_node


@pytest.fixture
def collector() -> Iterator[tuple[str, list[str]]]:
    """A stand-in OTLP/HTTP collector: accepts every export, records the paths."""
    received: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            received.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def black_hole() -> Iterator[str]:
    """An endpoint that accepts connections and never answers: the worst collector."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)  # the kernel completes handshakes; nobody ever reads
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


def fast_export(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")  # ms
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "200")  # ms
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")  # s, in the Python SDK


async def test_without_an_endpoint_nothing_is_exported(sqlite_settings: Settings) -> None:
    async with running_node(sqlite_settings) as node:
        status = node.telemetry.export_status()
        assert status.status == "off"
        assert status.ok
        assert status.signals == ()


async def test_export_to_a_collector_reports_ok(
    sqlite_settings: Settings, collector: tuple[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint, received = collector
    fast_export(monkeypatch, endpoint)
    async with running_node(sqlite_settings) as node:
        await node.http.get("/test/items/1")
        assert (
            wait_until(
                lambda: {"/v1/traces", "/v1/metrics"} <= set(received),
                timeout_s=10,
                interval_s=0.05,
            )
            is not None
        )
        assert (
            wait_until(
                lambda: all(s.last_success_at for s in node.telemetry.export_status().signals),
                timeout_s=5,
                interval_s=0.05,
            )
            is not None
        )
        status = node.telemetry.export_status()
        assert status.status == "ok"
        assert {s.signal for s in status.signals} == {"traces", "metrics"}
        assert {s.endpoint for s in status.signals} == {
            f"{endpoint}/v1/traces",
            f"{endpoint}/v1/metrics",
        }


async def test_an_unresponsive_collector_costs_requests_nothing_and_is_reported(
    sqlite_settings: Settings, black_hole: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast_export(monkeypatch, black_hole)
    settings = sqlite_settings.model_copy(update={"telemetry_shutdown_timeout_s": 1.0})
    async with running_node(settings) as node:
        slowest = 0.0
        for _ in range(30):
            started = time.monotonic()
            assert (await node.http.get("/test/items/1")).status_code == 200
            slowest = max(slowest, time.monotonic() - started)
            await node.http.get("/metrics")
        # An export blocks for its 1 s timeout; no request waited for one.
        assert slowest < 0.5, f"a request took {slowest:.3f} s"

        assert (
            wait_until(lambda: not node.telemetry.export_status().ok, timeout_s=15, interval_s=0.05)
            is not None
        )
        status = node.telemetry.export_status()
        assert status.status == "failing"
        assert status.last_error is not None and black_hole in status.last_error
        failing = [s for s in status.signals if not s.ok]
        assert failing and all(s.consecutive_failures >= 1 for s in failing)
        # /healthz warns, readiness does not care: still serving, still answering /metrics.
        health = (await node.http.get("/healthz")).json()
        assert health["status"] == "warn"
        export = health["checks"]["telemetry:export"][0]
        assert export["status"] == "warn" and export["observedValue"] == "failing"
        assert black_hole in export["output"]
        assert (await node.http.get("/readyz")).status_code == 200
        assert (await node.http.get("/metrics")).status_code == 200
        stopping = time.monotonic()
    # Shutdown gives up on the black hole at its bound instead of the SDK's 30 s.
    assert time.monotonic() - stopping < 1.0 + 1.5


async def test_a_broken_exporter_setting_does_not_stop_the_node(
    sqlite_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_CERTIFICATE", "/nonexistent/ca.pem")
    async with running_node(sqlite_settings) as node:
        assert (await node.http.get("/test/items/1")).status_code == 200
        status = node.telemetry.export_status()
    assert status.status in ("ok", "failing")  # set up, or reported as broken: never fatal
