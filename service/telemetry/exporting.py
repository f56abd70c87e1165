"""OTLP export off the request path, and the truth about whether it works.

Exporters run on the SDK's background threads, so an unreachable collector costs a request
nothing; it shows up only here, as a status /healthz reports as a warning.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

R = TypeVar("R")
E = TypeVar("E", SpanExporter, MetricExporter)
Signal = Literal["traces", "metrics"]

# An OTLP export returns a bare FAILURE and logs why; the watch exporting on this
# thread registers itself here so the filter below can hand it the reason.
_exporting = threading.local()


def _capture_export_errors(record: logging.LogRecord) -> bool:
    watch: ExportWatch | None = getattr(_exporting, "watch", None)
    if watch is not None and record.levelno >= logging.WARNING:
        watch.reasons.append(record.getMessage())
    return True


def otlp_wanted(signal: Signal) -> bool:
    """Whether the OTEL_* variables ask for OTLP export of `signal`: an endpoint is set (no
    collector is assumed) and OTEL_<SIGNAL>_EXPORTER, when given, names otlp."""
    chosen = os.environ.get(f"OTEL_{signal.upper()}_EXPORTER", "otlp")
    if "otlp" not in {part.strip().lower() for part in chosen.split(",")}:
        return False
    return bool(
        os.environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


@dataclass
class SignalStatus:
    signal: Signal
    endpoint: str = "(not set up)"
    last_error: str | None = None
    consecutive_failures: int = 0
    last_success_at: float | None = None  # unix time
    last_failure_at: float | None = None

    @property
    def ok(self) -> bool:
        return self.consecutive_failures == 0


@dataclass(frozen=True)
class ExportStatus:
    """What /healthz shows: "off" (no OTLP export configured), "ok" (every export last
    succeeded or has not run yet) or "failing" (a signal's last export failed, last_error
    says why): a warning, never a reason to stop serving."""

    status: Literal["ok", "failing", "off"]
    last_error: str | None
    signals: tuple[SignalStatus, ...]

    @property
    def ok(self) -> bool:
        return self.status != "failing"


class ExportWatch:
    """The outcome of one signal's exports, written by its exporter's thread."""

    def __init__(self, signal: Signal) -> None:
        self.status = SignalStatus(signal)
        self.reasons: list[str] = []

    def run(self, export: Callable[[], R], success: R, failure: R) -> R:
        """Run one export on this (the exporter's) thread and record its outcome."""
        self.reasons = []
        _exporting.watch = self
        try:
            result = export()
        except Exception as exc:
            result, self.reasons = failure, [repr(exc)]
        finally:
            _exporting.watch = None
        status = self.status
        if result is success:
            status.consecutive_failures, status.last_success_at = 0, time.time()
        else:
            # The first message names the cause, the last the verdict (gave up after retries).
            reason = " / ".join(dict.fromkeys(self.reasons[:1] + self.reasons[-1:]))
            self.failed(f"export to {status.endpoint} failed: {reason or 'no reason given'}")
        return result

    def attach(self, exporter: E) -> E:
        """The SDK's exporter, its exports made through run() (all else stays its own)."""
        self.status.endpoint = getattr(exporter, "_endpoint", self.status.endpoint)
        export = exporter.export
        results = SpanExportResult if isinstance(exporter, SpanExporter) else MetricExportResult

        def watched(*args: Any, **kwargs: Any) -> Any:
            return self.run(lambda: export(*args, **kwargs), results.SUCCESS, results.FAILURE)

        exporter.export = watched  # type: ignore[method-assign]
        # Idempotent, so every app may add it; it acts only while a watch exports on its thread.
        logging.getLogger(type(exporter).__module__).addFilter(_capture_export_errors)
        return exporter

    def failed(self, error: str) -> None:
        self.status.consecutive_failures += 1
        self.status.last_failure_at = time.time()
        self.status.last_error = f"{self.status.signal} {error}"


def summarize(watches: Sequence[ExportWatch]) -> ExportStatus:
    signals = tuple(dataclasses.replace(watch.status) for watch in watches)
    failing = [s for s in signals if not s.ok]
    if failing:
        return ExportStatus("failing", failing[0].last_error, signals)
    return ExportStatus("ok" if signals else "off", None, signals)
