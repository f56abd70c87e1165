"""Fixtures for telemetry tests: a node app whose spans land in memory.

Each test builds its own app (the OTel globals are never touched), so tests
also show that many apps in one process keep their telemetry apart.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from service.app import create_app
from service.config import Settings
from service.telemetry import Telemetry
from tests.conftest import serve_asgi


@dataclass
class RunningNode:
    app: FastAPI
    http: httpx.AsyncClient
    exporter: InMemorySpanExporter
    state: dict[str, Any]  # the lifespan's state: database, settings, ...

    @property
    def telemetry(self) -> Telemetry:
        telemetry: Telemetry = self.app.state.telemetry
        return telemetry

    def spans(self) -> tuple[ReadableSpan, ...]:
        return tuple(self.exporter.get_finished_spans())

    def server_spans(self) -> list[ReadableSpan]:
        return [s for s in self.spans() if s.kind is SpanKind.SERVER]


@contextlib.asynccontextmanager
async def running_node(
    settings: Settings, prepare: Callable[[FastAPI], Any] | None = None
) -> AsyncIterator[RunningNode]:
    """A node app with an in-memory span exporter, lifespan run, and a client.

    `prepare(app)` runs before the lifespan: tests add a route of their own there.
    """
    app = create_app(settings)
    exporter = InMemorySpanExporter()
    telemetry: Telemetry = app.state.telemetry
    if telemetry.enabled:
        telemetry.add_span_processor(SimpleSpanProcessor(exporter))
    if prepare is not None:
        prepare(app)
    async with serve_asgi(app) as (http, state):
        yield RunningNode(app, http, exporter, state)


@pytest.fixture
def always_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    """Record every trace (the default samples 10% of new traces)."""
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")


@pytest.fixture(autouse=True)
def _no_ambient_otel(monkeypatch: pytest.MonkeyPatch) -> None:
    # An OTEL_* variable in the developer's shell must not change what a test sees.
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)


@pytest.fixture
def sqlite_settings(sqlite_template: Path, tmp_path: Path) -> Settings:
    """Settings for a node on a fresh, migrated SQLite file (backend-agnostic tests)."""
    path = tmp_path / "cattle.db"
    shutil.copyfile(sqlite_template, path)
    return Settings(
        database_url=f"sqlite+aiosqlite:///{path}",
        data_dir=tmp_path,
        node_id="test-node",
        environment="production",
        cursor_secret="test-cursor-secret-0123456789",
    )


TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_SPAN_ID = "b7ad6b7169203331"


def traceparent(sampled: bool = True) -> str:
    return f"00-{TRACE_ID}-{PARENT_SPAN_ID}-{'01' if sampled else '00'}"


async def create_note(http: httpx.AsyncClient, **headers: str) -> str:
    """Create a note; returns its path (the Location header)."""
    response = await http.post(
        "/v1/notes", json={"title": "observed", "body": "a note"}, headers=headers
    )
    assert response.status_code == 201, response.text
    return response.headers["location"]
