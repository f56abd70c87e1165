"""Logs: one JSON object per line on stdout, with node id, service and trace context.

python-json-logger formats cattle's lines and uvicorn's (service.server hands it this config);
the access line is written in the same format by service.telemetry.http.
"""

from __future__ import annotations

import logging
import logging.config
from typing import Any

from opentelemetry import trace
from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

import service
from service.config import Settings


def json_formatter(node_id: str) -> JsonFormatter:
    return JsonFormatter(
        "%(levelname)s %(name)s %(message)s",
        rename_fields={"levelname": "level", "name": "logger", "exc_info": "exception"},
        static_fields={"node_id": node_id, "service": service.NAME},
        timestamp="time",  # UTC, ISO 8601
        # uvicorn adds an ANSI-coloured copy of some messages.
        reserved_attrs=[*RESERVED_ATTRS, "color_message"],
    )


class TraceContext(logging.Filter):
    """Adds trace_id and span_id of the current span, if there is one: a handler's filter
    runs in the caller's context, so it is the span of the request being handled."""

    def filter(self, record: logging.LogRecord) -> bool:
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            record.trace_id = format(span_context.trace_id, "032x")
            record.span_id = format(span_context.span_id, "016x")
        return True


def log_config(settings: Settings) -> dict[str, Any]:
    """A logging.config.dictConfig for the node, also handed to uvicorn."""
    level = settings.log_level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": f"{__name__}.json_formatter", "node_id": settings.node_id}},
        "filters": {"trace": {"()": f"{__name__}.TraceContext"}},
        "handlers": {
            "stdout": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "filters": ["trace"],
                "stream": "ext://sys.stdout",
            },
        },
        "root": {"handlers": ["stdout"], "level": level},
        "loggers": {
            "uvicorn": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.error": {"handlers": [], "level": level, "propagate": True},
        },
    }


def configure_logging(settings: Settings) -> None:
    """Apply log_config to this process (for commands that run without uvicorn)."""
    logging.config.dictConfig(log_config(settings))
