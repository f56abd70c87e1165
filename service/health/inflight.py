"""Counts the HTTP requests a node is working on right now.

The count feeds the HAProxy agent weight, /healthz and the in-flight metric.
It is a plain int on the event loop's thread: no lock, no I/O, two additions
per request.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

# Probes and scrapes are not work: counting them would make an idle node
# report load (every /healthz would see itself) and make the agent weight
# jitter with the probe rate of the proxies.
PROBE_PATHS = frozenset({"/livez", "/startupz", "/readyz", "/healthz", "/metrics"})
PROBE_PREFIX = "/readyz/"


class InFlight:
    """How many requests are being served now, and how many ever began (for a rate)."""

    __slots__ = ("count", "total")

    def __init__(self) -> None:
        self.count = 0
        self.total = 0


class InFlightMiddleware:
    """Plain ASGI: a request is in flight from its arrival until its response is sent."""

    def __init__(self, app: ASGIApp, *, counter: InFlight) -> None:
        self.app = app
        self.counter = counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _is_probe(scope["path"]):
            await self.app(scope, receive, send)
            return
        counter = self.counter
        counter.count += 1
        counter.total += 1
        try:
            await self.app(scope, receive, send)
        finally:
            counter.count -= 1


def _is_probe(path: str) -> bool:
    return path in PROBE_PATHS or path.startswith(PROBE_PREFIX)
