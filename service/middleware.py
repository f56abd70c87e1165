"""The edge of every request: node attribution, body limit, last-resort errors.

The limits below the application (request head size, slow clients, the
staged close) are the connection's, in service/server.py.

Written as plain ASGI (not BaseHTTPMiddleware) because it wraps every request
of a node that is meant to be CPU-bound on its own work.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.config import env_var
from service.problems import PROBLEM_JSON, problem_body

log = logging.getLogger("service.errors")


def _never() -> bool:
    return False


class EdgeMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        node_id: str,
        max_body_bytes: int,
        close_connections: Callable[[], bool] = _never,
    ) -> None:
        self.app = app
        self.served_by = (b"x-served-by", node_id.encode())
        self.max_body_bytes = max_body_bytes
        # Asked per response: True while draining, so clients and proxies
        # open their next request on another node.
        self.close_connections = close_connections

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        started = False
        # After a 413 the rest of the body is not wanted: the connection
        # closes, and the server reads and drops what is still coming within
        # its linger bounds (a staged close), so the client reads the 413.
        too_large = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                headers.append(self.served_by)
                if too_large or self.close_connections():
                    headers.append((b"connection", b"close"))
                message["headers"] = headers
            await send(message)

        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            too_large = True
            await self._send_problem(send_with_headers, 413, self._too_large(declared))
            return

        received = 0
        limit = self.max_body_bytes

        async def limited_receive() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    too_large = True
                    # FastAPI re-raises HTTPException from body reading, so this
                    # reaches the problem+json handler as a 413.
                    raise HTTPException(413, self._too_large(received))
            return message

        try:
            await self.app(scope, limited_receive, send_with_headers)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise  # the server closes the connection; nothing else can be said
            await self._send_problem(
                send_with_headers,
                500,
                "the server failed to handle this request; it has been logged",
            )

    def _too_large(self, size: int) -> str:
        return (
            f"request body of {size} bytes exceeds the limit of {self.max_body_bytes} bytes "
            f"({env_var('max_body_bytes')})"
        )

    @staticmethod
    async def _send_problem(send: Send, status: int, detail: str) -> None:
        body = json.dumps(problem_body(status, detail)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", PROBLEM_JSON.encode()),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
