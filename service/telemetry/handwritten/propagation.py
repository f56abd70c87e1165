"""Trace context across process boundaries: HTTP requests and bus messages.

The formats are whatever OTEL_PROPAGATORS names (W3C tracecontext and baggage
by default); the same helpers serve the HTTP edge and the node bus, so a trace
started on one node continues on every node a message reaches.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import Link


def inject(carrier: MutableMapping[str, str], context: Context | None = None) -> None:
    """Write the current (or given) trace context into `carrier`, e.g. a message's headers."""
    propagate.inject(carrier, context=context)


def extract(carrier: Mapping[str, str]) -> Context:
    """The trace context `carrier` carries, as a parent for the spans that handle it.

    A carrier without trace context gives an empty Context: spans started with
    it begin a new trace, as they would with no parent at all.
    """
    return propagate.extract(carrier)


def link_from(carrier: Mapping[str, str]) -> Link | None:
    """A link to the span that sent `carrier`, for work that is caused by a
    message but is not part of its trace (e.g. a batch of invalidations)."""
    span_context = trace.get_current_span(extract(carrier)).get_span_context()
    return Link(span_context) if span_context.is_valid else None


class _AsgiHeaders(Getter[Any]):
    """Reads propagation headers straight from an ASGI scope (no dict built per request)."""

    def get(self, carrier: Any, key: str) -> list[str] | None:
        name = key.lower().encode("latin-1")
        values = [value.decode("latin-1") for header, value in carrier["headers"] if header == name]
        return values or None

    def keys(self, carrier: Any) -> list[str]:
        return [header.decode("latin-1") for header, _ in carrier["headers"]]


_ASGI_HEADERS = _AsgiHeaders()


_NO_CONTEXT = Context()


def propagation_headers() -> frozenset[bytes]:
    """The header names the configured propagators read (OTEL_PROPAGATORS),
    lowercase, as ASGI spells them: traceparent, tracestate, baggage by default."""
    fields = propagate.get_global_textmap().fields
    return frozenset(name.lower().encode("latin-1") for name in fields)


def extract_from_scope(
    scope: Mapping[str, Any], headers: frozenset[bytes] | None = None
) -> Context:
    """The trace context of an incoming HTTP request (W3C traceparent by default).

    With `headers` (from propagation_headers()), a request that carries none
    of them gets an empty context without asking the propagators, which is
    what most requests at a fleet's edge are.
    """
    if headers is not None and not any(name in headers for name, _ in scope["headers"]):
        return _NO_CONTEXT
    return propagate.extract(scope, getter=_ASGI_HEADERS)
