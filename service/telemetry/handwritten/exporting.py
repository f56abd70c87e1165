"""OTLP export off the request path, and the truth about whether it works.

Exporters run in the SDK's background threads (batch span processor, periodic
metric reader), so an unreachable collector costs the request path nothing; it
only shows up here, as a status /healthz reports as a warning.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricsData
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

R = TypeVar("R")

Signal = Literal["traces", "metrics"]

log = logging.getLogger("service.telemetry")

# The OTLP exporters report why an export failed only in log records (the
# export call returns a bare FAILURE); the watcher exporting on a thread
# registers itself here so the filter below can hand it that reason.
_exporting = threading.local()


class _CaptureExportErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        watcher: ExportWatch | None = getattr(_exporting, "watch", None)
        if watcher is not None and record.levelno >= logging.WARNING:
            watcher.note_reason(record.getMessage())
        return True


_CAPTURE = _CaptureExportErrors()


def otlp_wanted(signal: Signal, environ: Mapping[str, str]) -> bool:
    """Whether the standard OTEL_* variables ask for OTLP export of `signal`.

    An endpoint must be set (no collector is assumed on a fleet node), and
    OTEL_<SIGNAL>_EXPORTER, when given, must name otlp (`none` switches off).
    """
    chosen = environ.get(f"OTEL_{signal.upper()}_EXPORTER", "otlp")
    if "otlp" not in {part.strip().lower() for part in chosen.split(",")}:
        return False
    return bool(
        environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT")
        or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


@dataclass(frozen=True)
class SignalStatus:
    signal: Signal
    endpoint: str
    ok: bool
    last_error: str | None
    consecutive_failures: int
    last_success_at: float | None  # unix time
    last_failure_at: float | None


@dataclass(frozen=True)
class ExportStatus:
    """What /healthz shows: `failing` is a warning, never a reason to stop serving.

    status is "off" when no OTLP export is configured (only /metrics is served),
    "ok" when every configured export last succeeded (or has not run yet), and
    "failing" when the last attempt of any signal failed; last_error says why.
    """

    status: Literal["ok", "failing", "off"]
    last_error: str | None
    signals: tuple[SignalStatus, ...]

    @property
    def ok(self) -> bool:
        return self.status != "failing"


class ExportWatch:
    """The outcome of one signal's exports, written by an exporter thread."""

    def __init__(self, signal: Signal, endpoint: str) -> None:
        self.signal = signal
        self.endpoint = endpoint
        self.last_error: str | None = None
        self.consecutive_failures = 0
        self.last_success_at: float | None = None
        self.last_failure_at: float | None = None
        self._reasons: list[str] = []

    def note_reason(self, message: str) -> None:
        # The first message names the cause (e.g. the connection error), the
        # last one the verdict (gave up after retries); keep both.
        if len(self._reasons) < 2:
            self._reasons.append(message)
        else:
            self._reasons[-1] = message

    def run(self, export: Callable[[], R], success: R, failure: R) -> R:
        """Run one export on this (the exporter's) thread and record its outcome.

        While it runs, what the exporter logs about a failure is kept as its
        reason; an exception counts as a failure and returns `failure`.
        """
        self._reasons = []
        _exporting.watch = self
        try:
            result = export()
        except Exception as exc:
            self._end(False, repr(exc))
            return failure
        finally:
            _exporting.watch = None
        self._end(result is success)
        return result

    def _end(self, success: bool, error: str | None = None) -> None:
        if success:
            self.consecutive_failures = 0
            self.last_success_at = time.time()
            return
        self.consecutive_failures += 1
        self.last_failure_at = time.time()
        reason = error or " / ".join(self._reasons) or "the exporter gave no reason"
        self.last_error = f"{self.signal} export to {self.endpoint} failed: {reason}"

    def failed_to_start(self, error: BaseException) -> None:
        self.consecutive_failures = 1
        self.last_failure_at = time.time()
        self.last_error = f"{self.signal} exporter could not be set up: {error}"

    def snapshot(self) -> SignalStatus:
        return SignalStatus(
            signal=self.signal,
            endpoint=self.endpoint,
            ok=self.consecutive_failures == 0,
            last_error=self.last_error,
            consecutive_failures=self.consecutive_failures,
            last_success_at=self.last_success_at,
            last_failure_at=self.last_failure_at,
        )


def summarize(watches: Sequence[ExportWatch]) -> ExportStatus:
    signals = tuple(w.snapshot() for w in watches)
    if not signals:
        return ExportStatus(status="off", last_error=None, signals=())
    failing = [s for s in signals if not s.ok]
    if not failing:
        return ExportStatus(status="ok", last_error=None, signals=signals)
    return ExportStatus(status="failing", last_error=failing[0].last_error, signals=signals)


def _watch_logger_of(exporter: object) -> None:
    # addFilter is idempotent, so every app may call it; the filter only acts
    # while one of our watchers is exporting on the current thread.
    logging.getLogger(type(exporter).__module__).addFilter(_CAPTURE)


class WatchedSpanExporter(SpanExporter):
    def __init__(self, inner: SpanExporter, watch: ExportWatch) -> None:
        self.inner = inner
        self.watch = watch
        _watch_logger_of(inner)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return self.watch.run(
            lambda: self.inner.export(spans), SpanExportResult.SUCCESS, SpanExportResult.FAILURE
        )

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class WatchedMetricExporter(MetricExporter):
    def __init__(self, inner: MetricExporter, watch: ExportWatch) -> None:
        # The reader asks its exporter which temporality/aggregation it wants.
        super().__init__(
            preferred_temporality=inner._preferred_temporality,
            preferred_aggregation=inner._preferred_aggregation,
        )
        self.inner = inner
        self.watch = watch
        _watch_logger_of(inner)

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        return self.watch.run(
            lambda: self.inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs),
            MetricExportResult.SUCCESS,
            MetricExportResult.FAILURE,
        )

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self.inner.force_flush(timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self.inner.shutdown(timeout_millis=timeout_millis, **kwargs)
