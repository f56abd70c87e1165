"""A response's head leaves the node with its body, in one write.

A node killed between the two writes would leave its proxy a 200 without a
body: too late to retry, so the client gets a response cut short. These tests
run uvicorn's real protocol (the node's subclass of it) over a transport that
records each write, with an application that pauses between starting its
response and sending the body, as the node's telemetry and edge do.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import uvicorn
from uvicorn.server import ServerState

from service.config import Settings
from service.server import protocol_class


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def can_write_eof(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(
            name, default
        )

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def slow_app(scope: Any, receive: Any, send: Any) -> None:
    """Starts its response, works a little, then sends the body; /fail fails in between."""
    if scope["type"] != "http":
        return
    message = await receive()
    while message.get("more_body"):
        message = await receive()
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]}
    )
    await asyncio.sleep(0.01)
    if scope["path"] == "/fail":
        raise RuntimeError("failed after its head")
    await send(
        {"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else b"hello"}
    )


async def _exchange(request: bytes, *, settle_s: float = 0.1) -> RecordingTransport:
    config = uvicorn.Config(
        slow_app, http=protocol_class(Settings()), lifespan="off", log_config=None
    )
    config.load()
    protocol = config.http_protocol_class(  # type: ignore[call-arg]
        config=config, server_state=ServerState(), app_state={}
    )
    transport = RecordingTransport()
    protocol.connection_made(transport)
    protocol.data_received(request)
    await asyncio.sleep(settle_s)
    protocol.connection_lost(None)
    return transport


async def test_the_head_and_the_body_go_in_one_write() -> None:
    transport = await _exchange(b"GET /note HTTP/1.1\r\nHost: node\r\n\r\n")
    assert len(transport.writes) == 1, transport.writes
    assert transport.writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert transport.writes[0].endswith(b"\r\n\r\nhello")


async def test_pipelined_requests_each_go_in_one_write() -> None:
    request = b"GET /note HTTP/1.1\r\nHost: node\r\n\r\n"
    transport = await _exchange(request * 3, settle_s=0.2)
    assert len(transport.writes) == 3, transport.writes
    assert all(w.startswith(b"HTTP/1.1 200") and w.endswith(b"hello") for w in transport.writes)


async def test_a_head_request_gets_its_head() -> None:
    # No body write follows a HEAD's head, so it is not held.
    transport = await _exchange(b"HEAD /note HTTP/1.1\r\nHost: node\r\n\r\n")
    assert len(transport.writes) == 1
    assert transport.writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert transport.writes[0].endswith(b"\r\n\r\n")


async def test_100_continue_is_not_held_back() -> None:
    # The client waits for the interim answer before it sends the body.
    request = (
        b"POST /note HTTP/1.1\r\nHost: node\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n"
    )
    transport = await _exchange(request, settle_s=0.05)
    assert transport.writes[:1] == [b"HTTP/1.1 100 Continue\r\n\r\n"], transport.writes


async def test_a_failure_after_the_head_still_sends_the_head_then_closes() -> None:
    # As before: what was started is sent and the connection closes; nothing is lost silently.
    transport = await _exchange(b"GET /fail HTTP/1.1\r\nHost: node\r\n\r\n")
    assert [w[:15] for w in transport.writes] == [b"HTTP/1.1 200 OK"], transport.writes
    assert transport.closed


@pytest.fixture(autouse=True)
def _quiet_uvicorn_errors(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("CRITICAL", logger="uvicorn.error")
