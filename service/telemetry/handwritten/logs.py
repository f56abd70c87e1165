"""Logs: one JSON object per line on stdout, carrying node id and trace context.

The same configuration serves cattle's own loggers and uvicorn's
(service.server passes `log_config` to uvicorn), and the access log writes
the same format, so a log shipper reads one format; a line logged while a
request is handled carries that request's trace_id and span_id, which is how
logs join traces.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, TextIO

from opentelemetry import trace

from service.config import Settings

if TYPE_CHECKING:
    from service.telemetry.handwritten.requests import CompletedRequest

ACCESS_LOGGER = "service.access"

# Attributes every LogRecord has; anything else on a record came from
# `extra=` and is emitted as a field of its own.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",  # uvicorn's ANSI-coloured copy of the message
}


class _Clock:
    """UTC timestamps with milliseconds, the date-time part built once per second.

    A busy node writes many lines a second. One tuple, so a line formatted on
    another thread never pairs a stale text with a new second.
    """

    def __init__(self) -> None:
        self._second: tuple[int, str] = (-1, "")

    def text(self, created: float) -> str:
        whole = int(created)
        second, text = self._second
        if second != whole:
            text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
            self._second = (whole, text)
        return f"{text}.{int((created - whole) * 1000):03d}Z"


def _add_trace_context(entry: dict[str, Any]) -> None:
    """trace_id and span_id of the current span, if there is one.

    Called in the caller's context, so the current span is the one of the
    request (or bus message) being handled.
    """
    span_context = trace.get_current_span().get_span_context()
    if span_context.is_valid:
        entry["trace_id"] = format(span_context.trace_id, "032x")
        entry["span_id"] = format(span_context.span_id, "016x")


class JsonFormatter(logging.Formatter):
    def __init__(self, node_id: str = "") -> None:
        super().__init__()
        self.node_id = node_id
        self._clock = _Clock()

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self._clock.text(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "node_id": self.node_id,
        }
        _add_trace_context(entry)
        for key, value in record.__dict__.items():
            if key not in _RECORD_FIELDS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # json escapes newlines inside strings: a traceback stays one line.
        return json.dumps(entry, default=str)


class AccessLog:
    """The access log: one JSON line per request on stdout, in the format above.

    Its lines look like any other (time, level, logger "service.access",
    message, node_id, trace_id and span_id of the request's server span) plus
    the request's fields, but they are written straight to the stream rather
    than through `logging`: a LogRecord, the handler's lock and the generic
    formatter made a line cost about twice as much (14 µs against 6 µs, timed
    in a loop). Switched with CATTLE_ACCESS_LOG, not by logger levels. Lines
    come in batches (service.telemetry.handwritten.requests); a batch is one write,
    flushed at once, so lines logged by other threads never interleave with a
    line of it.
    """

    def __init__(self, node_id: str, stream: TextIO | None = None) -> None:
        self.node_id = node_id
        self._stream = stream  # None: whatever sys.stdout is when lines are written
        self._clock = _Clock()

    def write(self, requests: Iterable[CompletedRequest]) -> None:
        lines = [self._line(request) for request in requests]
        if not lines:
            return
        stream = self._stream or sys.stdout
        stream.write("".join(lines))
        stream.flush()

    def _line(self, request: CompletedRequest) -> str:
        entry: dict[str, Any] = {
            "time": self._clock.text(request.ended),
            "level": "info",
            "logger": ACCESS_LOGGER,
            "message": f"{request.method} {request.path} {request.status}",
            "node_id": self.node_id,
        }
        if request.trace_id:
            entry["trace_id"] = format(request.trace_id, "032x")
            entry["span_id"] = format(request.span_id, "016x")
        entry["method"] = request.method
        entry["path"] = request.path
        entry["route"] = request.route
        entry["status"] = request.status
        entry["duration_ms"] = round(request.duration_s * 1000, 3)
        entry["client"] = request.client
        return json.dumps(entry) + "\n"


def log_config(settings: Settings) -> dict[str, Any]:
    """A logging.config.dictConfig for the node, also handed to uvicorn.

    uvicorn's own access log is silenced: the telemetry middleware writes the
    access log (AccessLog, switched by CATTLE_ACCESS_LOG) with route, duration
    and trace id, in the same format.
    """
    level = settings.log_level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "json": {"()": f"{__name__}.JsonFormatter", "node_id": settings.node_id},
        },
        "handlers": {
            "stdout": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "stream": "ext://sys.stdout",
            },
        },
        "root": {"handlers": ["stdout"], "level": level},
        "loggers": {
            "uvicorn": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.error": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
        },
    }


def configure_logging(settings: Settings) -> None:
    """Apply log_config to this process (for commands that run without uvicorn)."""
    import logging.config

    logging.config.dictConfig(log_config(settings))
