"""Logs: one JSON object per line on stdout, carrying node id and trace context.

The same configuration serves cattle's own loggers, the access log and
uvicorn's (service.server passes `log_config` to uvicorn), so a log shipper
reads one format; a line logged while a request is handled carries that
request's trace_id and span_id, which is how logs join traces.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from opentelemetry import trace

from service.config import Settings

ACCESS_LOGGER = "service.access"

# Attributes every LogRecord has; anything else on a record came from
# `extra=` and is emitted as a field of its own.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",  # uvicorn's ANSI-coloured copy of the message
}


class JsonFormatter(logging.Formatter):
    def __init__(self, node_id: str = "") -> None:
        super().__init__()
        self.node_id = node_id
        # A busy node logs many lines a second: the date-time part is built
        # once per second (this runs once per access-log line). One tuple, so
        # a line formatted on an exporter thread never pairs a stale text
        # with a new second.
        self._second: tuple[int, str] = (-1, "")

    def _time(self, created: float) -> str:
        whole = int(created)
        second, text = self._second
        if second != whole:
            text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
            self._second = (whole, text)
        return f"{text}.{int((created - whole) * 1000):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self._time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "node_id": self.node_id,
        }
        # The handler runs in the caller's context, so the current span is the
        # one of the request (or bus message) being handled, if any.
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            entry["trace_id"] = format(span_context.trace_id, "032x")
            entry["span_id"] = format(span_context.span_id, "016x")
        for key, value in record.__dict__.items():
            if key not in _RECORD_FIELDS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # json escapes newlines inside strings: a traceback stays one line.
        return json.dumps(entry, default=str)


def log_config(settings: Settings) -> dict[str, Any]:
    """A logging.config.dictConfig for the node, also handed to uvicorn.

    uvicorn's own access log is silenced: the edge middleware writes the
    access log (CATTLE_ACCESS_LOG) with route, duration and trace id, in the
    same format. The access log is written at INFO whatever CATTLE_LOG_LEVEL
    says; switch it with CATTLE_ACCESS_LOG.
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
            ACCESS_LOGGER: {"level": "INFO"},
        },
    }


def configure_logging(settings: Settings) -> None:
    """Apply log_config to this process (for commands that run without uvicorn)."""
    import logging.config

    logging.config.dictConfig(log_config(settings))
